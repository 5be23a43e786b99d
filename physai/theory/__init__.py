"""The effective theory of deep MLPs at initialisation (Roberts, Yaida, Hanin, *The Principles of Deep Learning
Theory*, arXiv 2106.10165), made computable and checked against Monte Carlo ensembles of real networks.

- :mod:`~physai.theory.gaussian`: activations and Gaussian expectations by quadrature.
- :mod:`~physai.theory.kernels`: infinite-width kernel and NTK recursions over a set of inputs; closed forms.
- :mod:`~physai.theory.criticality`: susceptibilities, fixed points, critical initialisation, universality classes.
- :mod:`~physai.theory.finite_width`: the four-point vertex and the O(1/n) corrections to the kernel (one or two
  inputs); exact forms (linear, ReLU). The NTK's O(1/n) corrections (book ch. 8 and 11) are not computed.
- :mod:`~physai.theory.montecarlo`: batched, streaming Monte Carlo of deep MLPs (kernel, NTK, 1/n quantities), with
  delta-method and jackknife standard errors and Bonferroni bounds for many comparisons at once.
- :mod:`~physai.theory.two_layer`: the infinite-width NTK of physai's ``TwoLayer`` networks.

numpy (and scipy.special / scipy.optimize / scipy.stats, for erf, root finding and t quantiles) only; torch is
never imported.
"""
from physai.theory.criticality import (UNIVERSALITY_CLASSES, CriticalPoint, FixedPoint, critical_point, fixed_points,
                                       susceptibilities, taylor_coefficients)
from physai.theory.finite_width import (FiniteWidth, FiniteWidthKernel, exact_metric_variance,
                                        exact_normalized_variance, finite_width, finite_width_kernel)
from physai.theory.gaussian import ACTIVATIONS, Activation, gauss_1d, gauss_2d, get_activation
from physai.theory.kernels import (erf_expectations, erf_pair, first_layer_kernel, kernel_map, kernel_recursion,
                                   ntk_recursion, pair_expectation, relu_expectations, relu_pair)
from physai.theory.montecarlo import MonteCarlo, RunningMoments, bonferroni_bound, sample_mlp
from physai.theory.two_layer import two_layer_ntk

__all__ = ["ACTIVATIONS", "Activation", "get_activation", "gauss_1d", "gauss_2d", "pair_expectation",
           "first_layer_kernel", "kernel_map", "kernel_recursion", "ntk_recursion", "relu_pair", "erf_pair",
           "relu_expectations", "erf_expectations", "susceptibilities", "taylor_coefficients", "critical_point",
           "CriticalPoint", "UNIVERSALITY_CLASSES", "fixed_points", "FixedPoint", "finite_width", "FiniteWidth",
           "finite_width_kernel", "FiniteWidthKernel", "exact_normalized_variance", "exact_metric_variance",
           "sample_mlp", "MonteCarlo", "RunningMoments", "bonferroni_bound", "two_layer_ntk"]
