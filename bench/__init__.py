"""Benchmarks of vmae-fast: ``vmae-bench COMMAND`` or ``python -m bench.<module>`` (``dual_masking``
= ``make bench``, ``memory``, ``kernels``, ``attention``, ``loader``, ``visualize``); what they
share is in ``bench.common``; pytest-benchmark microbenchmarks in ``bench/micro``."""
