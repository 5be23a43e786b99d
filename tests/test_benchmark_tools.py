"""The benchmark report's own machinery (benchmarks/conftest.py: interleaved, benchmarks/report.py): the ratios of
the closing notes come from it, and CI runs no benchmark."""
import importlib.util
import pathlib
import sys

import pytest

BENCHMARKS = pathlib.Path(__file__).resolve().parent.parent / "benchmarks"


def load(name):
    """A module of benchmarks/ under a private name (their conftest would clash with the tests')."""
    sys.path.insert(0, str(BENCHMARKS))  # benchmarks/conftest.py imports report
    try:
        spec = importlib.util.spec_from_file_location(f"_benchmarks_{name}", BENCHMARKS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCHMARKS))


class FakeBenchmark:
    """pytest-benchmark's fixture as interleaved uses it: pedantic runs the target `rounds` times."""

    def __init__(self):
        self.extra_info, self.rounds = {}, None

    def pedantic(self, target, rounds, iterations):
        assert iterations == 1
        self.rounds = rounds
        for _ in range(rounds):
            target()


def test_interleaved_rotates_the_order_and_reports_each_median(monkeypatch):
    conftest = load("conftest")
    clock = iter(range(10**6))  # perf_counter: 1 s per read, so a run lasts as long as the reads it spans
    monkeypatch.setattr(conftest.time, "perf_counter", lambda: float(next(clock)))
    calls = []
    runs = {name: (lambda name=name: calls.append(name)) for name in ("a", "b", "c")}
    benchmark = FakeBenchmark()
    conftest.interleaved(benchmark, runs, info={"a": {"flops": 7}}, rounds=4)
    assert benchmark.rounds == 4
    # the warm-up round, then four rounds, each starting one name further on
    assert calls == list("abc") + list("bca") + list("cab") + list("abc") + list("bca")
    assert set(benchmark.extra_info["interleaved"]) == {"a", "b", "c"}
    assert benchmark.extra_info["interleaved"]["a"] == {"median": 1.0, "flops": 7}  # one clock tick per run
    assert benchmark.extra_info["interleaved"]["b"] == {"median": 1.0}


@pytest.mark.parametrize("elapsed, expected", [(0.001, 1000), (0.5, 12), (100.0, 5)])
def test_interleaved_fills_its_time_with_5_to_1000_rounds(monkeypatch, elapsed, expected):
    conftest = load("conftest")
    # the warm-up round reads the clock at its start, around its one run, and once more when it is over
    ticks = iter([0.0, 0.0, 0.0, elapsed] + [0.0] * 10**4)
    monkeypatch.setattr(conftest.time, "perf_counter", lambda: next(ticks))
    benchmark = FakeBenchmark()
    conftest.interleaved(benchmark, {"only": lambda: None}, seconds=6.0)
    assert benchmark.rounds == expected


def test_report_expands_interleaved_runs_into_benchmarks():
    report = load("report")
    medians = {"test_x": 3.0, "test_y": 1.0}
    extras = {"test_x": {"sgemm_gflops": 200.0, "interleaved": {"fast": {"median": 1.0, "flops": 5e9},
                                                                  "slow": {"median": 2.0}}}}
    report.expand_interleaved(medians, extras)
    assert medians == {"test_x": 3.0, "test_y": 1.0, "test_x::fast": 1.0, "test_x::slow": 2.0}
    assert extras["test_x::fast"] == {"flops": 5e9, "sgemm_gflops": 200.0}
    assert extras["test_x::slow"] == {"sgemm_gflops": 200.0}
