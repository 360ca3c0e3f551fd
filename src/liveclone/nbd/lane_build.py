"""Build recipe of ``liveclone.nbd._lane``, the compiled lane (``lane.c``).

Run by setuptools at install (``cffi_modules`` in setup.py), with the C compiler
and Python's headers from Debian (``build-essential``, ``python3-dev``). When the
module is missing, ``liveclone.nbd.lane`` says so and the server answers every
request in Python, with the same results.
"""

from pathlib import Path

from cffi import FFI

ffibuilder = FFI()
ffibuilder.cdef("""
struct lc_lane {
    int fd;
    int structured;
    uint32_t max_block;
    uint32_t max_write;
    uint32_t shift;
    uint64_t size;
    const uint8_t *present;
    const uint8_t *marked;
};
struct lc_done {
    size_t out_used;
    size_t rest_used;
    uint64_t reads, read_bytes, writes, write_bytes;
};
size_t lc_lane(const struct lc_lane *l, const uint8_t *in, size_t n,
               uint8_t *out, size_t cap, uint8_t *rest, struct lc_done *done);
int lc_sendable(const struct lc_lane *l, uint64_t offset, uint32_t length);
struct pollfd {
    int fd;
    short events;
    short revents;
};
int lc_poll(struct pollfd *fds, unsigned n, int64_t ns);
struct lc_served {
    size_t out_used;
    size_t sent;
    uint64_t reads, read_bytes, writes, write_bytes;
    int idle;
};
void lc_serve(const struct lc_lane *l, struct pollfd *fds, unsigned n, unsigned self,
              int64_t ns, int64_t budget, uint8_t *in, size_t in_cap, uint8_t *out,
              size_t cap, struct lc_served *s);
""")

ffibuilder.set_source("liveclone.nbd._lane", (Path(__file__).parent / "lane.c").read_text(),
                      extra_compile_args=["-O2", "-std=c11", "-Wall"])

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
