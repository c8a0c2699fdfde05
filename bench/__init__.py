"""Benchmarks of vmae-fast: ``python -m bench.dual_masking`` (``make bench``), ``bench.kernels``,
``bench.attention``; pytest-benchmark microbenchmarks in ``bench/micro``."""
