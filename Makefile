# The README's two commands: `make test` and `make bench`. Both create .venv on first use.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed

.PHONY: test bench bench-micro install clean

$(STAMP): pyproject.toml setup.py CMakeLists.txt $(wildcard kernels/*)
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip "setuptools>=77" wheel
	# torch first, from PyPI's normal resolution, so setup.py can find it to build vmae_fast._C
	$(PIP) install -q "torch>=2.6"
	$(PIP) install -q --no-build-isolation -e ".[test,bench,train]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) -m bench.dual_masking $(BENCH_ARGS)

# pytest-benchmark microbenchmarks of the CPU ops (kept out of `make test`)
bench-micro: $(STAMP)
	$(PY) -m pytest bench/micro --benchmark-only -q

clean:
	rm -rf $(VENV) build *.egg-info vmae_fast/_C*.so
