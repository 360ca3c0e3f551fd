"""Build recipe of ``liveclone.core._copyc``, the copier's C helpers:
``putruns.c`` (a fill's runs written in one call without the GIL) and
``bitruns.c`` (the region map's runs and batch ends).

Run by setuptools at install (``cffi_modules`` in setup.py), like the NBD lane.
When the module is missing, the Python in ``fsops.put_runs`` and ``RegionMap``
gives the same results.
"""

from pathlib import Path

from cffi import FFI

ffibuilder = FFI()
ffibuilder.cdef("""
int lc_put_runs(int fd, const uint8_t *buf, uint64_t base, const uint64_t *runs,
                uint8_t **ptrs, size_t n, uint64_t zb, uint64_t *progress);
size_t lc_run_edges(const uint8_t *bits, uint64_t start, uint64_t stop, uint64_t *out,
                    size_t cap);
uint64_t lc_batch_end(const uint8_t *bits, uint64_t start, uint64_t stop, uint64_t budget,
                      uint64_t gap, uint64_t max_reads);
""")

_here = Path(__file__).parent
ffibuilder.set_source("liveclone.core._copyc",
                      "\n".join((_here / f).read_text() for f in ("putruns.c", "bitruns.c")),
                      extra_compile_args=["-O2", "-std=c11", "-Wall"])

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
