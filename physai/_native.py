"""Loads the native modules and reports what this build can do.

``physai._core`` (CPU kernels) is required. ``physai._cuda`` exists only where the build found a CUDA
compiler; whether a GPU is present is asked at run time, so a machine without one imports physai normally.
Loading ``_core`` sets libgomp's spin before a waiting thread sleeps (``GOMP_SPINCOUNT``) unless the user chose a
wait policy, and leaves the environment as it was.
"""
from __future__ import annotations

import contextlib
import ctypes
import os


@contextlib.contextmanager
def _environment(**values: str):
    """Set environment variables for the enclosed library loads (which read them once), then restore the user's
    environment, so that child processes see the user's own settings."""
    previous = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in previous.items():
            if value is None:
                del os.environ[name]
            else:
                os.environ[name] = value


def _preload_openblas() -> None:
    # The extension links libscipy_openblas from the scipy-openblas32 wheel. Its RPATH finds it in a normal
    # install; loading it by path first also covers editable installs and virtualenvs layered on a system
    # site-packages, where the relative RPATH points elsewhere.
    try:
        import scipy_openblas32
    except ImportError:
        return
    lib_dir = scipy_openblas32.get_lib_dir()
    for name in os.listdir(lib_dir):
        if name.startswith("libscipy_openblas") and ".so" in name:
            # physai calls this BLAS single-threaded only (its OpenMP loops own the cores), so its thread pool is
            # not started: idle OpenBLAS workers spin for a while after start-up and steal the cores.
            with _environment(OPENBLAS_NUM_THREADS="1"):
                ctypes.CDLL(os.path.join(lib_dir, name), mode=ctypes.RTLD_GLOBAL)
            return


# How long an idle OpenMP thread spins before it sleeps, in libgomp's pause iterations (tens of microseconds here).
# libgomp's default, 300000, spins for milliseconds: when another process shares the cores, a thread that waits at
# a barrier for a descheduled partner burns its whole time slice, and a run with a barrier every step slows down
# tens of times. A short spin still catches a partner that arrives at once on an idle machine.
GOMP_SPINCOUNT = 1000


def _load_core():
    # The wait policy is the user's when they chose one (OMP_WAIT_POLICY or GOMP_SPINCOUNT). libgomp reads it when
    # it loads, which is here unless another extension loaded it first.
    chosen = "OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ
    with _environment(**({} if chosen else {"GOMP_SPINCOUNT": str(GOMP_SPINCOUNT)})):
        from physai import _core
    return _core


_preload_openblas()
_core = _load_core()

try:
    from physai import _cuda  # type: ignore[attr-defined]
except ImportError:
    _cuda = None


def cuda_compiled() -> bool:
    """Whether this build contains the CUDA kernels (``physai._cuda``)."""
    return _cuda is not None


def cuda_available() -> bool:
    """Whether CUDA kernels are compiled *and* a CUDA device is present now (RuntimeError when the CUDA runtime
    fails for another reason than a missing driver or device: a broken install must not read as "no GPU")."""
    return _cuda is not None and _cuda.device_count() > 0


def native_info() -> dict:
    """Describe the native build: version, compiler, OpenMP threads, BLAS, CUDA compiled and present.

    Returns
    -------
    dict with keys ``version``, ``compiler``, ``openmp``, ``threads``, ``blas``, ``blas_threads``,
    ``cuda_compiled``, ``cuda_devices`` (0 when none or not compiled).
    """
    info = dict(_core.build_info())
    info["threads"] = _core.num_threads()
    info["blas_threads"] = _core.blas_num_threads()
    info["cuda_compiled"] = cuda_compiled()
    info["cuda_devices"] = _cuda.device_count() if _cuda is not None else 0
    return info


def get_num_threads() -> int:
    """Number of threads the native kernels use (OpenMP)."""
    return _core.num_threads()


def set_num_threads(n: int) -> None:
    """Set the number of threads of the native kernels. Results do not depend on it, only speed."""
    from physai._checks import MAX_INT32, check_int

    _core.set_num_threads(check_int(n, "n", min=1, max=MAX_INT32))


@contextlib.contextmanager
def num_threads(n: int):
    """Context manager: run the enclosed native calls on ``n`` threads."""
    previous = _core.configured_num_threads()  # 0 when unset: OpenMP's default then stays in force afterwards
    set_num_threads(n)
    try:
        yield
    finally:
        _core.set_num_threads(previous)
