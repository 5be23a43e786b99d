"""Hessian spectra: batched native eigensolvers over any matvec, and Hessian tools for any torch model."""
from physai.spectrum.eigensolvers import DenseOperator, EigenResult, lanczos, power_iteration
from physai.spectrum.torch_model import HessianOperator, hessian_density, hessian_eigs, hessian_trace

__all__ = ["DenseOperator", "EigenResult", "HessianOperator", "hessian_density", "hessian_eigs", "hessian_trace",
           "lanczos", "power_iteration"]
