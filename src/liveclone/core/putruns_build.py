"""Build recipe of ``liveclone.core._putruns`` (``putruns.c``): a fill's runs
written in one call without the GIL.

Run by setuptools at install (``cffi_modules`` in setup.py), like the NBD lane.
When the module is missing, ``fsops.put_runs`` does the same in Python.
"""

from pathlib import Path

from cffi import FFI

ffibuilder = FFI()
ffibuilder.cdef("""
int lc_put_runs(int fd, const uint8_t *buf, uint64_t base, const uint64_t *runs,
                uint8_t **ptrs, size_t n, uint64_t zb, uint64_t *progress);
""")

ffibuilder.set_source("liveclone.core._putruns",
                      (Path(__file__).parent / "putruns.c").read_text(),
                      extra_compile_args=["-O2", "-std=c11", "-Wall"])

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
