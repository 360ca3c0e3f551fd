# The compiled NBD read lane (src/liveclone/nbd/lane.c), built with cffi; the rest
# of the project's metadata is in pyproject.toml.
from setuptools import setup

setup(cffi_modules=["src/liveclone/nbd/lane_build.py:ffibuilder"])
