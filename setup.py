# The compiled parts, built with cffi: the NBD read lane (src/liveclone/nbd/lane.c)
# and the copier's helpers (src/liveclone/core/putruns.c, bitruns.c); the rest of the
# project's metadata is in pyproject.toml.
from setuptools import setup

setup(cffi_modules=["src/liveclone/nbd/lane_build.py:ffibuilder",
                    "src/liveclone/core/copyc_build.py:ffibuilder"])
