"""physai: fast, exact controlled experiments for the physics of AI.

Subpackages: ``physai.lego`` (LEGO reasoning tasks), ``physai.twolayer`` (fused two-layer network kernels),
``physai.spectrum`` (sharpness and Hessian spectra) and ``physai.experiments``.
Importing physai never imports torch; the torch integrations import it when used.
"""
from physai._native import cuda_available, get_num_threads, native_info, num_threads, set_num_threads

__version__ = "0.1.0"

__all__ = ["native_info", "cuda_available", "get_num_threads", "set_num_threads", "num_threads", "__version__"]
