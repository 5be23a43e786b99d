"""Hessian and NTK spectra: batched native eigensolvers over any matvec, Hessian tools for any torch model, and
the empirical neural tangent kernel of any torch model."""
from physai.spectrum.eigensolvers import (DenseOperator, EigenResult, certified_top_k, lanczos,
                                          largest_algebraic_by_power, power_iteration)
from physai.spectrum.ntk import TorchNTK, ntk_eigs, ntk_gram
from physai.spectrum.torch_model import (TorchHessian, hessian_density, hessian_eigs, hessian_operator,
                                         hessian_trace)

__all__ = ["DenseOperator", "EigenResult", "TorchHessian", "TorchNTK", "certified_top_k", "hessian_density",
           "hessian_eigs", "hessian_operator", "hessian_trace", "lanczos", "largest_algebraic_by_power", "ntk_eigs",
           "ntk_gram", "power_iteration"]
