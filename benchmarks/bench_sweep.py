"""Sweeps: a 16 lr x 4 width x 4 seed edge-of-stability sweep (256 points; 100 steps on 100 samples so that it
takes seconds). ``physai.sweep.run`` in-process folds the 16 learning rates of each (width, seed) into one
native call (16 calls) and stores every point in Zarr; the baseline is what a user would write without it, a
loop of ``run()`` one point at a time (256 calls, nothing stored).

Every side runs its native code on THREADS threads (1: the machine has 2 cores, busy with other work), the
in-process sides through ``physai.num_threads``, the Dask workers through OMP_NUM_THREADS set before they start:
the ratios compare the work done, not the thread start-up of one side. The Dask path is timed twice on a
LocalCluster of worker processes (one thread each): 1 worker against in-process is Dask's overhead alone
(scheduler round trips, pickling, results shipped back), 2 workers adds the parallelism of two processes. The
sweeps write to a fresh store each round (nothing resumed)."""
import itertools
import os

import numpy as np
import pytest

import physai
from physai import sweep
from physai.experiments import eos

THREADS = 1

RATIOS = [
    ("EoS sweep 16 lr x 4 width x 4 seed, 1 thread each side: in-process sweep (lr folded, Zarr store) vs a loop "
     "of run() per point", "test_loop_of_runs", "test_sweep_in_process", 1.5),
    ("same sweep: Dask LocalCluster of 1 worker process (1 thread) vs in-process (1 thread): Dask's overhead "
     "(goal: within 1.5x)", "test_sweep_in_process", "test_sweep_dask[1]", 1 / 1.5),
    ("same sweep: Dask LocalCluster of 2 worker processes (1 thread each) vs in-process (1 thread) (information)",
     "test_sweep_in_process", "test_sweep_dask[2]", 0.0),
    ("same sweep: the 16 folded run() calls alone vs the in-process sweep (information: the store's cost)",
     "test_folded_runs_alone", "test_sweep_in_process", 0.0),
]

BASE = eos.Config(learning_rates=(0.5,), n=100, steps=100, track_every=10)
LRS = np.geomspace(0.05, 1.0, 16).tolist()
WIDTHS = [16, 32, 64, 128]
SEEDS = [0, 1, 2, 3]
SPACE = sweep.grid(lr=LRS, width=WIDTHS, seed=SEEDS)


@pytest.fixture
def fresh_store(tmp_path):
    counter = itertools.count()
    return lambda: ((), {"out": tmp_path / f"sweep{next(counter)}.zarr"})


def test_loop_of_runs(benchmark):
    def loop():
        for lr, width, seed in itertools.product(LRS, WIDTHS, SEEDS):
            eos.run(BASE.replace(learning_rates=(lr,), width=width, seed=seed))

    with physai.num_threads(THREADS):
        benchmark.pedantic(loop, rounds=1, iterations=1)


def test_folded_runs_alone(benchmark):
    def folded():
        for width, seed in itertools.product(WIDTHS, SEEDS):
            eos.run(BASE.replace(learning_rates=tuple(LRS), width=width, seed=seed))

    with physai.num_threads(THREADS):
        benchmark.pedantic(folded, rounds=3, iterations=1)


def test_sweep_in_process(benchmark, fresh_store):
    with physai.num_threads(THREADS):
        ds = benchmark.pedantic(lambda out: sweep.run(BASE, SPACE, out=out, progress=False), setup=fresh_store,
                                rounds=3, iterations=1)
    assert (ds["status"] == sweep.STATUS_DONE).all()


@pytest.fixture(scope="module", params=[1, 2])
def dask_executor(request):
    """(workers, executor) of a LocalCluster whose worker processes run THREADS native threads each."""
    distributed = pytest.importorskip("distributed")
    previous = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = str(THREADS)  # inherited by the worker processes as they start
    try:
        with distributed.LocalCluster(n_workers=request.param, threads_per_worker=1, processes=True,
                                      dashboard_address=None) as cluster, distributed.Client(cluster) as client:
            executor = client.get_executor()
            # the workers import physai once, as this process already has
            sweep.run(BASE.replace(steps=2), sweep.grid(width=[8, 16]), executor=executor, progress=False)
            yield executor
    finally:
        if previous is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = previous


def test_sweep_dask(benchmark, fresh_store, dask_executor):
    ds = benchmark.pedantic(lambda out: sweep.run(BASE, SPACE, out=out, executor=dask_executor, progress=False),
                            setup=fresh_store, rounds=3, iterations=1)
    assert (ds["status"] == sweep.STATUS_DONE).all()
