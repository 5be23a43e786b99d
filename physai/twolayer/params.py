"""Activations, losses and parameterizations of two-layer networks (names and enums bound from the kernels).

A parameterization fixes, as functions of the input dimension d and the width m:
the init standard deviations of W and a, the scalar multipliers of the kernel contract

    h = input_scale * (W x) + b,        f = output_scale * (a . sigma(h)),

and per-layer learning-rate multipliers (the rate used for W is ``lr * lr_W`` and so on). Biases start at 0.

============  ===========  ===========  ===========  ============  ======  ======  ======
param         std(W)       std(a)       input_scale  output_scale  lr_W    lr_b    lr_a
============  ===========  ===========  ===========  ============  ======  ======  ======
standard      1/sqrt(d)    1/sqrt(m)    1            1             1       1       1
ntk           1            1            1/sqrt(d)    1/sqrt(m)     1       1       1
mean-field    1            1            1/sqrt(d)    1/m           m       m       m
mup           1/sqrt(d)    1/m          1            1             m       m       1/m
============  ===========  ===========  ===========  ============  ======  ======  ======

``mup`` is Yang & Hu's maximal-update parameterization for SGD (Tensor Programs IV/V, Table 3): input weights
and biases with init variance 1/fan_in and learning rate lr * fan_out (= m), output weights with variance
1/fan_in^2 and learning rate lr / fan_in (= lr / m). ``mean-field`` is the same limit written with explicit
multipliers (f = (1/m) sum_i a_i sigma(w_i . x / sqrt(d))), whose gradient flow needs the rate scaled by m.
Under ``standard`` and ``ntk``, the function at init is O(1) and the features stop moving as m grows.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from physai._checks import check_choice
from physai._native import _core

# The kernels' enums (bound once, in csrc/bindings/twolayer.cpp); their member names are the names used everywhere.
Activation = _core.twolayer.Activation
Loss = _core.twolayer.Loss
ACTIVATIONS = tuple(Activation.__members__)
LOSSES = tuple(Loss.__members__)
PARAMETERIZATIONS = ("standard", "ntk", "mean-field", "mup")


def activation_code(name, argument: str = "activation") -> Activation:
    """The kernels' ``Activation`` for a name of ``ACTIVATIONS``; ValueError/TypeError naming ``argument``."""
    return Activation.__members__[check_choice(name, argument, ACTIVATIONS)]


def loss_code(name, argument: str = "loss") -> Loss:
    """The kernels' ``Loss`` for a name of ``LOSSES``; ValueError/TypeError naming ``argument``."""
    return Loss.__members__[check_choice(name, argument, LOSSES)]


@dataclass(frozen=True)
class Scaling:
    """What a parameterization fixes for given (d, m): init stds, kernel multipliers, per-layer lr multipliers."""

    std_W: float
    std_a: float
    input_scale: float
    output_scale: float
    lr_W: float
    lr_b: float
    lr_a: float


def scaling(param: str, d: int, m: int) -> Scaling:
    """The table in this module's docstring, evaluated at input dimension ``d`` and width ``m``."""
    if param == "standard":
        return Scaling(1 / math.sqrt(d), 1 / math.sqrt(m), 1.0, 1.0, 1.0, 1.0, 1.0)
    if param == "ntk":
        return Scaling(1.0, 1.0, 1 / math.sqrt(d), 1 / math.sqrt(m), 1.0, 1.0, 1.0)
    if param == "mean-field":
        return Scaling(1.0, 1.0, 1 / math.sqrt(d), 1 / m, float(m), float(m), float(m))
    if param == "mup":
        return Scaling(1 / math.sqrt(d), 1 / m, 1.0, 1.0, float(m), float(m), 1 / m)
    raise ValueError(f"param: expected one of {PARAMETERIZATIONS}, got {param!r}")
