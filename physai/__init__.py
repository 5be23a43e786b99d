"""physai: fast, exact controlled experiments for the physics of AI.

Subpackages, each reachable as an attribute of this package and imported on first use (PEP 562, as scipy does):
``physai.lego`` (LEGO reasoning tasks), ``physai.twolayer`` (fused two-layer network kernels),
``physai.spectrum`` (sharpness, Hessian and NTK spectra), ``physai.theory`` (kernel recursions, criticality,
finite-width corrections), ``physai.experiments`` and ``physai.sweep``.
Importing physai never imports torch; the torch integrations import it when used.
"""
import importlib as _importlib

from physai._native import cuda_available, get_num_threads, native_info, num_threads, set_num_threads

__version__ = "0.1.0"

_SUBMODULES = ("lego", "twolayer", "spectrum", "theory", "experiments", "sweep", "cuda")

__all__ = ["native_info", "cuda_available", "get_num_threads", "set_num_threads", "num_threads", "__version__",
           *_SUBMODULES]


def __getattr__(name):
    if name in _SUBMODULES:
        return _importlib.import_module(f"physai.{name}")
    raise AttributeError(f"module 'physai' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_SUBMODULES))
