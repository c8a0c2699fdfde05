"""Benchmarks of vmae-fast: ``vmae-bench COMMAND`` or ``python -m bench.<module>`` (``dual_masking``
= ``make bench``, ``memory``, ``kernels``, ``attention``, ``loader``); what they share is in ``bench.common``;
pytest-benchmark microbenchmarks in ``bench/micro``. (The reconstruction picture is a user tool:
``vmae-visualize``, ``vmae_fast.tools``.)"""
