"""Benchmarks share the pytest-benchmark fixture; each module declares the ratios it is judged by in
``RATIOS`` (see report.py), so comparisons are always between timings taken in the same run."""
import itertools
import time

import pytest
from report import SGEMM_SIZE, median_of, sgemm_times

# Seconds to let numpy's OpenBLAS threads stop spinning after the sgemm timings (they busy-wait a while after each
# product and would slow the next benchmark's threads).
OPENBLAS_SPIN_SECONDS = 0.3


@pytest.fixture(autouse=True)
def sgemm_rate_nearby(request):
    """After a benchmark that declares its FLOP count (``extra_info["flops"]``), the machine's sgemm rate (GFLOP/s,
    median of 5 numpy float32 matmuls of SGEMM_SIZE squares) measured right then, as ``extra_info["sgemm_gflops"]``:
    report.py judges the benchmark's fraction against it, so a machine whose load drifts during the run compares
    each kernel with the rate of its own minutes rather than with the rate at the start and end of the run."""
    yield
    benchmark = request.node.funcargs.get("benchmark")
    if benchmark is None or benchmark.disabled:
        return
    info = benchmark.extra_info
    if not info.get("flops") and not any(run.get("flops") for run in info.get("interleaved", {}).values()):
        return
    benchmark.extra_info["sgemm_gflops"] = 2 * SGEMM_SIZE**3 / median_of(sgemm_times(repeats=5)) / 1e9
    time.sleep(OPENBLAS_SPIN_SECONDS)


@pytest.fixture(scope="session")
def torch():
    """Benchmarks against torch skip cleanly where torch is not installed."""
    return pytest.importorskip("torch")


def two_layer_gemms(X, W, a, S, G):
    """The five GEMMs of a two-layer forward + backward, nothing else: the numpy bound the fused kernels are judged
    against (X [n, d], W [m, d], a [k, m], S [n, m] hidden activations, G [n, k] output gradients)."""
    Z = X @ W.T          # pre-activations
    F = S @ a.T          # outputs
    da = G.T @ S         # output-layer gradient
    dS = G @ a           # backprop into the hidden layer
    dW = dS.T @ X        # input-layer gradient
    return Z, F, da, dW


def interleaved(benchmark, runs: dict, info: dict | None = None, rounds: int | None = None, seconds: float = 6.0,
                pause: float = 0.0) -> None:
    """Time the callables ``runs`` (name -> callable) round by round, each once per round and the order rotating from
    round to round, so that a load that comes and goes on a shared machine slows them alike rather than whichever
    ran in its minutes. One round first as a warm-up, then ``rounds`` rounds (or as many as fill ``seconds``, 5 to
    1000); ``pause`` seconds between two runs, untimed (for BLAS threads that spin after a product). Each name's median
    time goes to ``extra_info["interleaved"][name]`` with ``info[name]`` (its FLOP count, peak memory), which
    report.py judges as the benchmark ``<test name>::<name>``; the benchmark's own time is one whole round."""
    names = list(runs)
    times = {name: [] for name in names}
    turn = itertools.count()

    def one_round():
        first = next(turn)
        for i in range(len(names)):
            name = names[(first + i) % len(names)]
            start = time.perf_counter()
            runs[name]()
            times[name].append(time.perf_counter() - start)
            time.sleep(pause)

    start = time.perf_counter()
    one_round()
    if rounds is None:
        rounds = int(min(1000, max(5, seconds / (time.perf_counter() - start))))
    for measured in times.values():
        measured.clear()
    benchmark.pedantic(one_round, rounds=rounds, iterations=1)
    benchmark.extra_info["interleaved"] = {name: {"median": median_of(times[name]), **(info or {}).get(name, {})}
                                           for name in names}
