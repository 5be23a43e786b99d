import numpy as np
import pytest

import physai


def test_native_info_reports_the_build():
    info = physai.native_info()
    assert info["version"] == physai.__version__
    assert "OpenBLAS" in info["blas"]
    assert info["threads"] >= 1
    assert isinstance(info["cuda_compiled"], bool)
    assert info["cuda_devices"] >= 0


def test_thread_context_restores():
    from physai import _core

    configured, before = _core.configured_num_threads(), physai.get_num_threads()
    try:
        _core.set_num_threads(0)  # unset: OpenMP's default
        with physai.num_threads(1):
            assert physai.get_num_threads() == 1
        assert _core.configured_num_threads() == 0  # unset again, not pinned to the count it resolved to
        physai.set_num_threads(3)
        with physai.num_threads(1):
            pass
        assert _core.configured_num_threads() == 3
    finally:
        _core.set_num_threads(configured)
    assert physai.get_num_threads() == before


@pytest.mark.parametrize("bad", [0, -3, 2**40])
def test_set_num_threads_rejects_out_of_range(bad):
    with pytest.raises(ValueError, match="n: expected an integer [<>]="):
        physai.set_num_threads(bad)


@pytest.mark.parametrize("bad", [1.5, "2", None, True])
def test_set_num_threads_rejects_non_integers(bad):
    with pytest.raises(TypeError, match="n: expected an integer"):
        physai.set_num_threads(bad)


def test_import_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, physai, physai.lego, physai.twolayer, physai.spectrum; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_cli_info_runs():
    import json
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "physai", "info"], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout)["version"] == physai.__version__


@pytest.mark.parametrize("argv,match", [
    (["lego", "-n", "-1"], "argument -n/--count: expected an integer >= 0"),
    (["eos", "--lr", "-1"], "physai eos: error: learning_rates: expected a number > 0"),
    (["lego", "--group", "q8"], "physai lego: error: group:"),
    (["eos", "--steps", "3", "--json", "/nonexistent/eos.json", "--plot", ""], "physai eos: error: "),
])
def test_cli_reports_bad_values_as_usage_errors(argv, match, capsys):
    from physai.cli import main

    try:
        status = main(argv)
    except SystemExit as exit:  # argparse's own usage errors
        status = exit.code
    assert status == 2
    error = capsys.readouterr().err
    assert match in error and "Traceback" not in error


def _runs_beside_python(call, native_name):
    """Whether the main thread ran Python while ``call`` was inside the native function ``native_name`` on another
    thread. A profile hook on that thread reads the main thread's loop counter as the function is entered and as it
    returns: a binding that holds the GIL throughout leaves the counter where it was. The main loop yields the GIL
    by sleeping, and the switch interval is made far longer than any call, so that the interpreter never forces a
    switch around the call (between the return and the hook); a binding that releases the GIL lets the main thread
    count at once."""
    import sys
    import threading
    import time

    counter, seen, failure, finished = [0], {}, [], threading.Event()

    def profile(frame, event, arg):
        if event in ("c_call", "c_return") and getattr(arg, "__name__", None) == native_name:
            seen[event] = counter[0]

    def worker():
        try:
            call()  # on this thread first: its one-off costs (thread pool, scratch memory) are per calling thread
            sys.setprofile(profile)
            call()
        except BaseException as error:
            failure.append(error)
        finally:
            sys.setprofile(None)
            finished.set()

    interval = sys.getswitchinterval()
    sys.setswitchinterval(30.0)
    thread = threading.Thread(target=worker)
    thread.start()
    try:
        while not finished.is_set():
            counter[0] += 1
            time.sleep(1e-4)
        thread.join()
    finally:
        sys.setswitchinterval(interval)
    if failure:
        raise failure[0]
    assert set(seen) == {"c_call", "c_return"}, f"{native_name} was not called"
    return seen["c_return"] > seen["c_call"]


def test_long_native_calls_release_the_gil():
    from physai.lego import LegoTask
    from physai.twolayer import TwoLayer

    # calls of a few tens of milliseconds: long enough for the main thread to wake beside them
    rng = np.random.default_rng(0)
    X, Y = rng.standard_normal((512, 16)), rng.standard_normal((512, 1))
    net = TwoLayer(16, 64, 1, "tanh", ensemble=4, dtype=np.float64)
    task = LegoTask(12)
    assert _runs_beside_python(lambda: task.sample(100_000), "generate")
    assert _runs_beside_python(lambda: net.train(X, Y, 0.01, 100), "train")
    assert _runs_beside_python(lambda: net.sharpness(X, Y, tol=1e-10), "hessian_eigs")


def _environment_after_import(env):
    import json
    import os
    import subprocess
    import sys

    code = ("import json, os, physai; "
            "print(json.dumps({k: os.environ.get(k) for k in ('GOMP_SPINCOUNT', 'OMP_WAIT_POLICY')}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={k: v for k, v in {**os.environ, **env}.items() if v is not None})
    return json.loads(out.stdout)


@pytest.mark.parametrize("env", [{"GOMP_SPINCOUNT": None, "OMP_WAIT_POLICY": None}, {"GOMP_SPINCOUNT": "5"},
                                 {"OMP_WAIT_POLICY": "active", "GOMP_SPINCOUNT": None}])
def test_import_leaves_the_users_openmp_environment_as_it_was(env):
    # physai shortens libgomp's spin while it loads it (so threads waiting at a barrier sleep soon when another
    # process has their partner's core) unless the user chose a wait policy, and leaves the environment as it was
    # for child processes.
    import os

    expected = {name: env.get(name, os.environ.get(name)) for name in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    assert _environment_after_import(env) == expected
