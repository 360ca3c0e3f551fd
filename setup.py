# The compiled parts, built with cffi: the NBD read lane (src/liveclone/nbd/lane.c)
# and the fill's run writer (src/liveclone/core/putruns.c); the rest of the
# project's metadata is in pyproject.toml.
from setuptools import setup

setup(cffi_modules=["src/liveclone/nbd/lane_build.py:ffibuilder",
                    "src/liveclone/core/putruns_build.py:ffibuilder"])
