"""Loads the native modules and reports what this build can do.

``physai._core`` (CPU kernels) is required. ``physai._cuda`` exists only where the build found a CUDA
compiler; whether a GPU is present is asked at run time, so a machine without one imports physai normally.
"""
from __future__ import annotations

import contextlib
import ctypes
import os


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
            # not started: idle OpenBLAS workers spin for a while after start-up and steal the cores. The variable
            # is read once, when the library loads; the user's setting is restored right after.
            previous = os.environ.get("OPENBLAS_NUM_THREADS")
            os.environ["OPENBLAS_NUM_THREADS"] = "1"
            try:
                ctypes.CDLL(os.path.join(lib_dir, name), mode=ctypes.RTLD_GLOBAL)
            finally:
                if previous is None:
                    del os.environ["OPENBLAS_NUM_THREADS"]
                else:
                    os.environ["OPENBLAS_NUM_THREADS"] = previous
            return


_preload_openblas()

from physai import _core  # noqa: E402

try:
    from physai import _cuda  # type: ignore[attr-defined]
except ImportError:
    _cuda = None


def cuda_compiled() -> bool:
    """Whether this build contains the CUDA kernels (``physai._cuda``)."""
    return _cuda is not None


def cuda_available() -> bool:
    """Whether CUDA kernels are compiled *and* a CUDA device is present now."""
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
