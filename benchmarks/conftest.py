"""Benchmarks share the pytest-benchmark fixture; each module declares the ratios it is judged by in
``RATIOS`` (see report.py), so comparisons are always between timings taken in the same run."""
import pytest


@pytest.fixture(scope="session")
def torch():
    """Benchmarks against torch skip cleanly where torch is not installed."""
    return pytest.importorskip("torch")
