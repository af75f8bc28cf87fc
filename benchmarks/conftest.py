"""Benchmarks time only under ``pytest --benchmark-only``; a plain ``pytest`` runs each once.

That keeps the default run fast while still checking that every benchmark
computes the right thing.
"""


def pytest_configure(config):
    option = config.option
    if not (getattr(option, "benchmark_only", False) or getattr(option, "benchmark_enable", False)):
        option.benchmark_disable = True
