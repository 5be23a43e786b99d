"""torch integration of the fused two-layer kernels (CPU tensors; imports torch).

- ``two_layer(X, W, b, a, ...)``: outputs F through the native forward; backward through the native backward
  (gradients for X, W, b, a). Use it inside any loss; it is differentiable once.
- ``two_layer_loss(X, Y, W, b, a, ...)``: the fused loss; backward through the native gradient and *double*
  backward through the native Hessian-vector product, so ``torch.autograd.grad(grad, params, v)`` and
  ``torch.func``-free HVP recipes work.
- ``TwoLayerModule``: an ``nn.Module`` drop-in for ``Linear(d, m) -> activation -> Linear(m, k, bias=False)``
  (``from_linear`` copies the weights of such a pair), with ``loss(X, Y)`` for the fused loss.

Shapes: W [m, d] or [E, m, d], b [m] / [E, m] or None, a [k, m] / [E, k, m]; X [n, d] or [E, n, d]; outputs
[n, k] for a single network or [E, n, k] for an ensemble. Tensors are passed to the kernels as zero-copy numpy
views; float32 and float64.
"""
from __future__ import annotations

import numpy as np
import torch
from torch.autograd.function import once_differentiable

from physai import _core
from physai._checks import check_choice, check_float, check_int
from physai.twolayer.params import ACTIVATIONS, LOSSES, PARAMETERIZATIONS, scaling

_ACTIVATION_FUNCTIONS = {
    "relu": torch.relu,
    "tanh": torch.tanh,
    "gelu": lambda z: torch.nn.functional.gelu(z, approximate="tanh"),
    "erf": torch.erf,
    "quadratic": lambda z: z * z,
    "linear": lambda z: z,
    "softplus": torch.nn.functional.softplus,
}


def _view(t: torch.Tensor | None, name: str) -> np.ndarray | None:
    if t is None:
        return None
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.device.type != "cpu":
        raise ValueError(f"{name}: the fused kernels here take CPU tensors, got device {t.device}")
    if t.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{name}: expected float32 or float64, got {t.dtype}")
    return t.detach().contiguous().numpy()


def _native(name: str, dtype: torch.dtype):
    return getattr(_core.twolayer, f"{name}_{'f32' if dtype == torch.float32 else 'f64'}")


def _config(input_scale: float, output_scale: float, activation: str):
    return _core.twolayer.Config(check_float(input_scale, "input_scale"), check_float(output_scale, "output_scale"),
                                 ACTIVATIONS.index(check_choice(activation, "activation", ACTIVATIONS)))


class _Ensemble:
    """Adds a leading member axis to single-network tensors and removes it from results."""

    def __init__(self, W: torch.Tensor):
        if not isinstance(W, torch.Tensor):
            raise TypeError(f"W: expected a torch.Tensor, got {type(W).__name__}")
        if W.dim() not in (2, 3):
            raise ValueError(f"W: expected [m, d] or [E, m, d], got shape {tuple(W.shape)}")
        self.single = W.dim() == 2

    def up(self, t: torch.Tensor | None, single_rank: int) -> torch.Tensor | None:
        return t.unsqueeze(0) if t is not None and self.single and t.dim() == single_rank else t

    def down(self, t):
        return t.squeeze(0) if t is not None and self.single else t


class _TwoLayerFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, X, W, b, a, config):
        ctx.save_for_backward(X, W, b, a)
        ctx.config = config
        return torch.from_numpy(_native("forward", W.dtype)(_view(X, "X"), _view(W, "W"), _view(b, "b"), _view(a, "a"),
                                                            config))

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_F):
        X, W, b, a = ctx.saved_tensors
        dW, db, da, dX = _native("backward", W.dtype)(_view(X, "X"), _view(W, "W"), _view(b, "b"), _view(a, "a"),
                                                      _view(grad_F, "grad"), ctx.config, ctx.needs_input_grad[0])
        if dX is not None and X.dim() == 2:
            dX = dX.sum(0)  # a shared input collects the gradient of every member
        as_tensor = lambda x: None if x is None else torch.from_numpy(x)
        return as_tensor(dX), as_tensor(dW), as_tensor(db), as_tensor(da), None


def two_layer(X, W, b, a, *, activation: str = "relu", input_scale: float = 1.0, output_scale: float = 1.0):
    """F = output_scale * sigma(input_scale * X W^T + b) a^T via the fused kernels, differentiable (once) in all
    of X, W, b, a. Single network: W [m,d], b [m] or None, a [k,m], X [n,d] -> F [n,k]; ensemble: leading E axis
    on W, b, a and F, X [n,d] shared or [E,n,d]. CPU tensors of one dtype, float32 or float64; F has that dtype."""
    ensemble = _Ensemble(W)
    F = _TwoLayerFunction.apply(X, ensemble.up(W, 2), ensemble.up(b, 1), ensemble.up(a, 2),
                                _config(input_scale, output_scale, activation))
    return ensemble.down(F)


def _fused_loss_and_grad(X, Y, W, b, a, config, loss_code):
    return _native("loss_and_grad", W.dtype)(_view(X, "X"), _view(W, "W"), _view(b, "b"), _view(a, "a"), _view(Y, "Y"),
                                             config, loss_code)


class _LossGradFunction(torch.autograd.Function):
    """(dW, db, da) of the fused loss; its backward is the Hessian-vector product, which makes double backward of
    the loss exact and native."""

    @staticmethod
    def forward(ctx, X, Y, W, b, a, config, loss_code):
        ctx.save_for_backward(X, Y, W, b, a)
        ctx.config, ctx.loss_code = config, loss_code
        _, dW, db, da = _fused_loss_and_grad(X, Y, W, b, a, config, loss_code)
        return torch.from_numpy(dW), None if db is None else torch.from_numpy(db), torch.from_numpy(da)

    @staticmethod
    @once_differentiable
    def backward(ctx, vW, vb, va):
        X, Y, W, b, a = ctx.saved_tensors
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            raise NotImplementedError("two_layer_loss: second derivatives with respect to X or Y are not fused")
        zeros = lambda t, like: torch.zeros_like(like) if t is None else t
        parts = [zeros(vW, W).reshape(W.shape[0], -1)]
        if b is not None:
            parts.append(zeros(vb, b).reshape(b.shape[0], -1))
        parts.append(zeros(va, a).reshape(a.shape[0], -1))
        V = torch.cat(parts, dim=1).contiguous()
        operator = _native("HessianOperator", W.dtype)(_view(X, "X"), _view(W, "W"), _view(b, "b"), _view(a, "a"),
                                                       _view(Y, "Y"), ctx.config, ctx.loss_code)
        HV = torch.from_numpy(operator.matvec(_view(V, "v")))
        sizes = [W[0].numel()] + ([b[0].numel()] if b is not None else []) + [a[0].numel()]
        pieces = list(torch.split(HV, sizes, dim=1))
        HW = pieces[0].reshape(W.shape)
        Hb = pieces[1].reshape(b.shape) if b is not None else None
        return None, None, HW, Hb, pieces[-1].reshape(a.shape), None, None


class _LossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, X, Y, W, b, a, config, loss_code):
        ctx.save_for_backward(X, Y, W, b, a)
        ctx.config, ctx.loss_code = config, loss_code
        value, _, _, _ = _fused_loss_and_grad(X, Y, W, b, a, config, loss_code)
        return torch.from_numpy(value)

    @staticmethod
    def backward(ctx, grad_value):
        X, Y, W, b, a = ctx.saved_tensors
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            raise NotImplementedError("two_layer_loss: gradients with respect to X or Y are not fused; use two_layer "
                                      "and a torch loss for those")
        dW, db, da = _LossGradFunction.apply(X, Y, W, b, a, ctx.config, ctx.loss_code)
        g = grad_value.reshape(-1, 1, 1)
        return None, None, g * dW, None if db is None else g[:, :, 0] * db, g * da, None, None


def two_layer_loss(X, Y, W, b, a, *, loss: str = "mse", activation: str = "relu", input_scale: float = 1.0,
                   output_scale: float = 1.0):
    """The fused loss (a scalar for a single network, [E] for an ensemble), differentiable twice in W, b, a:
    backward runs the native gradient, double backward the native Hessian-vector product. Losses as in
    ``physai.twolayer.TwoLayer``. Shapes as in :func:`two_layer`, with targets Y [n,k] (or [E,n,k]); CPU tensors
    of one dtype, float32 or float64."""
    ensemble = _Ensemble(W)
    code = LOSSES.index(check_choice(loss, "loss", LOSSES))
    value = _LossFunction.apply(X, Y, ensemble.up(W, 2), ensemble.up(b, 1), ensemble.up(a, 2),
                                _config(input_scale, output_scale, activation), code)
    return value[0] if ensemble.single else value


class TwoLayerModule(torch.nn.Module):
    """Drop-in for ``Sequential(Linear(d, m), activation, Linear(m, k, bias=False))`` on the fused kernels.

    ``param`` selects the initialisation and multipliers (see ``physai.twolayer.params``); ``ensemble=E`` adds a
    leading member axis to the parameters and outputs. ``forward(X)`` -> [n, k] ([E, n, k]);
    ``loss(X, Y, loss="mse")`` -> the fused loss, twice differentiable.
    """

    def __init__(self, d: int, m: int, k: int = 1, activation: str = "relu", param: str = "standard",
                 bias: bool = True, ensemble: int | None = None, dtype=torch.float32, seed: int = 0):
        super().__init__()
        from physai.twolayer.model import TwoLayer

        numpy_dtype = {torch.float32: np.float32, torch.float64: np.float64}.get(dtype)
        if numpy_dtype is None:
            raise TypeError(f"dtype: expected torch.float32 or torch.float64, got {dtype}")
        members = 1 if ensemble is None else check_int(ensemble, "ensemble", min=1)
        init = TwoLayer(d, m, k, activation, param, bias, members, numpy_dtype, seed)
        squeeze = (lambda x: x[0]) if ensemble is None else (lambda x: x)
        self.W = torch.nn.Parameter(torch.from_numpy(squeeze(init.W).copy()))
        self.b = torch.nn.Parameter(torch.from_numpy(squeeze(init.b).copy())) if bias else None
        self.a = torch.nn.Parameter(torch.from_numpy(squeeze(init.a).copy()))
        self.activation, self.param = activation, check_choice(param, "param", PARAMETERIZATIONS)
        self.scaling = init.scaling

    @classmethod
    def from_linear(cls, first: torch.nn.Linear, second: torch.nn.Linear, activation: str = "relu"):
        """The fused equivalent of ``second(activation(first(x)))`` (``second`` without bias), sharing nothing."""
        for layer, name in ((first, "first"), (second, "second")):
            if not isinstance(layer, torch.nn.Linear):
                raise TypeError(f"{name}: expected a torch.nn.Linear, got {type(layer).__name__}")
        if second.in_features != first.out_features:
            raise ValueError(f"second: expected {first.out_features} input features (first's outputs), got "
                             f"{second.in_features}")
        if second.bias is not None and torch.any(second.bias != 0):
            raise ValueError("second: the output layer of a fused two-layer network has no bias")
        module = cls(first.in_features, first.out_features, second.out_features, activation,
                     bias=first.bias is not None, dtype=first.weight.dtype)
        with torch.no_grad():
            module.W.copy_(first.weight)
            if first.bias is not None:
                module.b.copy_(first.bias)
            module.a.copy_(second.weight)
        return module

    def _kwargs(self):
        return dict(activation=self.activation, input_scale=self.scaling.input_scale,
                    output_scale=self.scaling.output_scale)

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        """X [n, d] (or [E, n, d]) -> outputs [n, k] ([E, n, k] for an ensemble), in the parameters' dtype."""
        return two_layer(X, self.W, self.b, self.a, **self._kwargs())

    def loss(self, X: torch.Tensor, Y: torch.Tensor, loss: str = "mse") -> torch.Tensor:
        """The fused mean loss on X [n, d], Y [n, k] (or per member [E, ...]): a scalar, or [E] for an ensemble;
        differentiable twice (double backward is the native HVP)."""
        return two_layer_loss(X, Y, self.W, self.b, self.a, loss=loss, **self._kwargs())

    def hessian_eigs(self, X: torch.Tensor, Y: torch.Tensor, loss: str = "mse", **options):
        """Top Hessian eigenpairs of the fused loss on (X, Y) by the native solvers on the fused HVP (no torch in
        the loop): ``physai.twolayer.TwoLayer.sharpness`` options (k, method, tol, max_iter, which, v0, seed).
        Returns an ``EigenResult`` with a leading member axis (1 for a single network); vectors are flattened in
        ``named_parameters`` order (W, b, a)."""
        from physai.twolayer.model import TwoLayer

        ensemble = _Ensemble(self.W)
        net = TwoLayer.from_arrays(_view(ensemble.up(self.W, 2), "W"), _view(ensemble.up(self.b, 1), "b"),
                                   _view(ensemble.up(self.a, 2), "a"), self.activation, self.param)
        return net.sharpness(_view(X, "X"), _view(Y, "Y"), loss=loss, **options)

    def extra_repr(self) -> str:
        E = "" if self.W.dim() == 2 else f", ensemble={self.W.shape[0]}"
        return (f"d={self.W.shape[-1]}, m={self.W.shape[-2]}, k={self.a.shape[-2]}, activation={self.activation!r}, "
                f"param={self.param!r}, bias={self.b is not None}{E}")


def torch_reference(X, W, b, a, *, activation="relu", input_scale=1.0, output_scale=1.0):
    """Plain torch ops of the same network (the autograd oracle in tests and the eager baseline in benchmarks).
    Shapes as in :func:`two_layer` (any leading batch axes broadcast); any float dtype."""
    Z = input_scale * X @ W.transpose(-1, -2)
    if b is not None:
        Z = Z + b.unsqueeze(-2)
    return output_scale * _ACTIVATION_FUNCTIONS[activation](Z) @ a.transpose(-1, -2)


def torch_loss(F, Y, loss="mse"):
    """Plain torch version of the losses, averaged as in the kernels: F, Y [..., n, k] -> [...] (reduces the last
    two axes, so one value per member); any float dtype."""
    n, k = F.shape[-2], F.shape[-1]
    if loss == "mse":
        return 0.5 * ((F - Y) ** 2).sum((-1, -2)) / (n * k)
    if loss == "logistic":
        return torch.nn.functional.softplus(-Y * F).sum((-1, -2)) / (n * k)
    if loss == "cross_entropy":
        return -(Y * torch.log_softmax(F, -1)).sum((-1, -2)) / n
    raise ValueError(f"loss: expected one of {LOSSES}, got {loss!r}")


__all__ = ["two_layer", "two_layer_loss", "TwoLayerModule", "torch_reference", "torch_loss"]
