# make demo: clone a generated disk image and use it while it copies.
# make test: the whole test suite. Both set themselves up and are safe to rerun.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench setup clean

setup: $(STAMP)

$(STAMP): pyproject.toml setup.py src/liveclone/nbd/lane.c src/liveclone/nbd/lane_build.py src/liveclone/core/putruns.c src/liveclone/core/bitruns.c src/liveclone/core/copyc_build.py scripts/install-system-deps.sh
	./scripts/install-system-deps.sh
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev,s3]'
	# An editable install leaves our modules uncompiled; with PYTHONDONTWRITEBYTECODE
	# every start would compile them again (about 40 ms).
	$(PY) -m compileall -q src
	touch $(STAMP)

demo: $(STAMP)
	$(PY) scripts/demo.py

test: $(STAMP)
	$(PY) -m ruff check src tests benchmarks scripts
	$(PY) -m mypy
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) -m compileall -q src
	$(PY) benchmarks/clone_bench.py
	$(PY) benchmarks/nbd_bench.py --write-results
	$(PY) benchmarks/boot_bench.py
	$(PY) benchmarks/http_bench.py
	$(PY) benchmarks/daemon_bench.py --write-results

clean:
	rm -rf $(VENV) demo-out benchmarks/work .pytest_cache .mypy_cache
