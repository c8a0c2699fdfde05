# The README's two commands: `make test` and `make bench`. Both create .venv on first use.
# `make test-oldest`: the same suite on the oldest supported torch (.ci/constraints-oldest.txt),
# in .venv-oldest. .ci/run (CI) runs both.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
OLDEST_VENV        ?= .venv-oldest
OLDEST_CONSTRAINTS := .ci/constraints-oldest.txt
EXTRAS := .[test,bench,train]
BUILD_INPUTS := pyproject.toml setup.py CMakeLists.txt $(wildcard kernels/*)
PYTEST_ARGS ?=

.PHONY: test test-oldest bench bench-micro gpu-check install clean mutate mutate-interpret

# $(call make_venv,VENV,PIP_CONSTRAINT_ARGS): the venv, every dependency, then the extension.
# 1. Every dependency (torch among them) and the package, without building vmae_fast._C.
# 2. vmae_fast._C last, against the torch installed now, with --no-deps: nothing installed after
#    it can move torch under it (an older torch built first and then upgraded by the resolver for
#    timm/torchvision leaves a library that no longer loads). setup.py names the library after that
#    torch, so the builds of .venv and .venv-oldest coexist in vmae_fast/.
define make_venv
	$(PYTHON) -m venv $(1)
	$(1)/bin/python -m pip install -q --upgrade pip "setuptools>=77" wheel
	VMAE_FAST_NO_EXT=1 $(1)/bin/python -m pip install -q --no-build-isolation $(2) -e "$(EXTRAS)"
	$(1)/bin/python -m pip install -q --no-build-isolation --no-deps -e .
	@echo "$(1):"; $(1)/bin/python -m pip list 2>/dev/null | grep -iE '^(torch|triton|torchvision|timm|torchcodec|numpy) ' || true
	touch $(1)/.installed
endef

# $(call run_suite,VENV): the suite in two processes. Triton decides interpret-vs-compile when a
# kernel is decorated, so the tests marked `interpret` run in their own process started with
# TRITON_INTERPRET=1, the others without it. Both always run; pytest's exit code 5 ("no tests
# collected") is not a failure.
define run_suite
	@rc=0; \
	echo "== $(1): pytest -m 'not interpret'"; \
	$(1)/bin/python -m pytest -q -m "not interpret" --durations=15 $(PYTEST_ARGS) || [ $$? -eq 5 ] || rc=1; \
	echo "== $(1): TRITON_INTERPRET=1 pytest -m interpret"; \
	TRITON_INTERPRET=1 $(1)/bin/python -m pytest -q -m interpret --durations=5 $(PYTEST_ARGS) || [ $$? -eq 5 ] || rc=1; \
	exit $$rc
endef

$(STAMP): $(BUILD_INPUTS)
	$(call make_venv,$(VENV),)

$(OLDEST_VENV)/.installed: $(BUILD_INPUTS) $(OLDEST_CONSTRAINTS)
	$(call make_venv,$(OLDEST_VENV),-c $(OLDEST_CONSTRAINTS))

install: $(STAMP)

# the suite on what PyPI resolves today
test: $(STAMP)
	$(call run_suite,$(VENV))

# Mutation testing of the core modules (mutmut; what and which tests: pyproject [tool.mutmut]).
# Slow (masking.py alone: ~460 mutants, ~15 minutes on 2 shared cores), so not in CI; its
# summary per module is in the README.
# MUTANTS picks mutants by name, e.g. make mutate MUTANTS='vmae_fast.masking*'; a rerun
# continues, and mutmut results / mutmut show NAME tell the survivors. Installs mutmut (the
# `mutate` extra's one requirement) into the venv first.
MUTANTS ?=
$(VENV)/bin/mutmut: $(STAMP)
	$(PIP) install -q "mutmut>=3.8"
	@touch $@

mutate: $(VENV)/bin/mutmut
	$(VENV)/bin/mutmut run --max-children 2 $(MUTANTS); $(VENV)/bin/mutmut results

# The fused ops' Triton launchers run only where TRITON_INTERPRET=1 was set before Triton was
# imported (the `interpret` tests), so their mutants get a second run of their own: a copy of the
# sources in build/mutate-interpret (mutmut keeps its results in ./mutants), config
# tests/mutmut_interpret.cfg. A mutant killed by either run is killed. MUTANTS as above.
MUTATE_INTERPRET := build/mutate-interpret
mutate-interpret: $(VENV)/bin/mutmut
	mkdir -p $(MUTATE_INTERPRET)
	@# a fresh copy each run (a file deleted here must not linger there); mutmut's ./mutants stays
	cd $(MUTATE_INTERPRET) && rm -rf vmae_fast train tests bench docs README.md setup.py
	cp -a vmae_fast train tests bench docs README.md setup.py $(MUTATE_INTERPRET)/
	cp tests/mutmut_interpret.cfg $(MUTATE_INTERPRET)/setup.cfg
	cd $(MUTATE_INTERPRET) && TRITON_INTERPRET=1 $(abspath $(VENV))/bin/mutmut run --max-children 2 $(MUTANTS); \
		$(abspath $(VENV))/bin/mutmut results

# the suite on the oldest supported torch, triton, torchvision and timm, pinned
test-oldest: $(OLDEST_VENV)/.installed
	$(call run_suite,$(OLDEST_VENV))

bench: $(STAMP)
	$(PY) -m bench.dual_masking $(BENCH_ARGS)

# the first GPU hour: every GPU goal met or missed on one CUDA device in under 8 minutes
# (GPU_CHECK_ARGS=--dry-run: the same plan at toy sizes on the CPU)
gpu-check: $(STAMP)
	$(PY) -m bench.gpu_check $(GPU_CHECK_ARGS)

# pytest-benchmark microbenchmarks of the CPU ops (kept out of `make test`)
bench-micro: $(STAMP)
	$(PY) -m pytest bench/micro --benchmark-only -q

clean:
	rm -rf $(VENV) $(OLDEST_VENV) build *.egg-info vmae_fast/_C*.so
