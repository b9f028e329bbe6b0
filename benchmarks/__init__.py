"""Benchmarks: pytest-benchmark suites (``bench_*.py``) and the one-command GPU suite (``gpu_suite.py``).

Not collected by the test run (``testpaths = ["tests"]``); see ``benchmarks/RESULTS.md`` for commands.
"""
