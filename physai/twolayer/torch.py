"""torch integration of the fused two-layer kernels (CPU tensors; imports torch).

- ``two_layer(X, W, b, a, ...)``: outputs F through the native forward; backward through the native backward.
  Differentiable to any order and under ``torch.func`` (``grad``, ``jvp``, ``vjp``, ``vmap``, ``functional_call``,
  ``jacrev``/``jacfwd``): the autograd Function has ``setup_context``, a forward-mode rule and a vmap rule (members
  of the native ensemble), and where a transform or ``create_graph`` asks for a differentiable backward, the
  backward runs as torch ops of the same network (``torch_reference``) instead of the native kernel.
- ``two_layer_loss(X, Y, W, b, a, ...)``: the fused loss; backward through the native gradient and *double*
  backward (and the forward-mode derivative of the gradient) through the native Hessian-vector product.
- ``TwoLayerModule``: an ``nn.Module`` drop-in for ``Linear(d, m) -> activation -> Linear(m, k, bias=False)``
  (``from_linear`` copies the weights of such a pair) that composes inside any larger model, with ``loss(X, Y)``
  for the fused loss and ``hessian_operator`` / ``ntk`` / ``ntk_operator`` for the fused spectra.

Shapes: W [m, d] or [E, m, d], b [m] / [E, m] or None, a [k, m] / [E, k, m]. A single network takes X [..., d]
and returns [..., k], as ``nn.Linear`` does; an ensemble takes X [n, d] (shared) or [E, n, d] and returns
[E, n, k]. Tensors are passed to the kernels as zero-copy numpy views; float32 and float64.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import numpy as np
import torch
from torch.autograd.function import once_differentiable

from physai import _core
from physai._checks import check_choice, check_float, check_int
from physai.twolayer.params import LOSSES, PARAMETERIZATIONS, activation_code, loss_code

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


def _native(name: str):
    return getattr(_core.twolayer, name)


class _Spec(NamedTuple):
    """The network's scalars, readable from Python for the torch-op rules, with the native ``Config`` built once and
    whether a saving forward keeps sigma' (``keeps_slope``: it is not read off sigma's value)."""

    input_scale: float
    output_scale: float
    activation: str
    config: object
    keeps_slope: bool


def _spec(input_scale: float, output_scale: float, activation: str) -> _Spec:
    code = activation_code(activation)
    input_scale, output_scale = check_float(input_scale, "input_scale"), check_float(output_scale, "output_scale")
    return _Spec(input_scale, output_scale, activation, _core.twolayer.Config(input_scale, output_scale, code),
                 not _core.twolayer.slope_from_value(code))


def _plain(*tensors) -> bool:
    """Whether every tensor is an ordinary one (no torch.func wrapper): only those can cross as numpy views."""
    return not any(t is not None and torch._C._functorch.is_functorch_wrapped_tensor(t) for t in tensors)


_SQRT_2_OVER_PI = float(np.sqrt(2 / np.pi))


def _activation_slope(name: str, Z: torch.Tensor) -> torch.Tensor:
    """sigma'(Z) in torch ops (the same formulas as ``physai.twolayer.reference.activation``)."""
    if name == "relu":
        return (Z > 0).to(Z.dtype)
    if name == "tanh":
        return 1 - torch.tanh(Z) ** 2
    if name == "gelu":
        t = torch.tanh(_SQRT_2_OVER_PI * (Z + 0.044715 * Z**3))
        return 0.5 * (1 + t) + 0.5 * Z * (1 - t**2) * _SQRT_2_OVER_PI * (1 + 3 * 0.044715 * Z**2)
    if name == "erf":
        return 2 / np.sqrt(np.pi) * torch.exp(-Z**2)
    if name == "quadratic":
        return 2 * Z
    if name == "linear":
        return torch.ones_like(Z)
    return torch.sigmoid(Z)  # softplus


def _reference_forward(spec: _Spec):
    return lambda X, W, b, a: torch_reference(X, W, b, a, activation=spec.activation, input_scale=spec.input_scale,
                                              output_scale=spec.output_scale)


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


def _differentiable_backward(spec: _Spec, X, W, b, a, grad_F):
    """(dX, dW, db, da) of sum(F * grad_F) by torch ops of the same network (any shapes torch_reference takes): the
    backward for create_graph and torch.func transforms, which must itself be differentiable."""
    if b is None:
        _, pullback = torch.func.vjp(lambda X, W, a: _reference_forward(spec)(X, W, None, a), X, W, a)
        dX, dW, da = pullback(grad_F)
        return dX, dW, None, da
    _, pullback = torch.func.vjp(_reference_forward(spec), X, W, b, a)
    return pullback(grad_F)


def _array(t: torch.Tensor) -> np.ndarray:
    """The zero-copy numpy view of a tensor whose dtype and device are known to suit the kernels (a copy only when
    it is not contiguous). numpy(force=True) detaches in one call: a third cheaper than detach().numpy()."""
    return t.numpy(force=True) if t.is_contiguous() else t.detach().contiguous().numpy()


class _SavingTwoLayerFunction(torch.autograd.Function):
    """A training step's path for ordinary tensors (no torch.func transform, no forward-mode AD): the native forward
    writes the hidden layer S = sigma(Z) (and sigma'(Z), where it is not read off S) into tensors the Function saves,
    and the native backward takes them instead of computing the hidden layer again. It takes the caller's shapes as
    they are (W [m, d] or [E, m, d], X [..., d], or [E, n, d] for an ensemble), so no view op of its own enters the
    graph, and it is an old-style Function (forward takes ctx), whose apply costs a third of one with setup_context:
    at small sizes such overheads cost as much as the kernels. The backward reads X, W, b, a from the saved tensors,
    not from the forward's views: a saved-tensor hook (offloading, checkpointing) may hand back copies made before an
    in-place change, and the gradient is that of those. The Function holds nothing outside its saved tensors, so a
    hook that drops them (checkpointing) frees the hidden layer. A backward that must itself be differentiable
    (create_graph) runs as torch ops."""

    @staticmethod
    def _arrays(X, W, b, a):
        """Kernel views of the inputs: X as rows [n, d] or [E, n, d], W, b, a with a member axis."""
        rows, Wn, bn, an = _array(X), _array(W), None if b is None else _array(b), _array(a)
        if Wn.ndim == 2:  # a single network
            rows, Wn, an = rows.reshape(-1, rows.shape[-1]), Wn[None], an[None]
            bn = None if bn is None else bn[None]
        return rows, Wn, bn, an

    @staticmethod
    def forward(ctx, X, W, b, a, spec):
        # numpy allocates the outputs (torch.from_numpy shares them, zero-copy): half the cost of torch.empty and
        # .numpy() per array, which counts at small sizes.
        rows, Wn, bn, an = _SavingTwoLayerFunction._arrays(X, W, b, a)
        single = W.dim() == 2
        (E, m, _), k, n = Wn.shape, an.shape[1], rows.shape[-2]
        F = np.empty((E, n, k), rows.dtype)
        S = np.empty((E, n, m), rows.dtype)
        D1 = np.empty((E, n, m), rows.dtype) if spec.keeps_slope else None
        _core.twolayer.forward_saving(rows, Wn, bn, an, spec.config, F, S, D1)
        ctx.save_for_backward(X, W, b, a, torch.from_numpy(S), None if D1 is None else torch.from_numpy(D1))
        ctx.spec = spec
        return torch.from_numpy(F.reshape(*X.shape[:-1], k) if single else F)

    @staticmethod
    def backward(ctx, grad_F):
        X, W, b, a, S, D1 = ctx.saved_tensors
        if torch.is_grad_enabled() or not _plain(grad_F):
            return (*_differentiable_backward(ctx.spec, X, W, b, a, grad_F), None)
        rows, Wn, bn, an = _SavingTwoLayerFunction._arrays(X, W, b, a)
        (E, n, _), k = S.shape, an.shape[1]
        dW, da = np.empty_like(Wn), np.empty_like(an)
        db = None if bn is None else np.empty_like(bn)
        dX = np.empty((E, n, rows.shape[-1]), rows.dtype) if ctx.needs_input_grad[0] else None
        _core.twolayer.backward_saved(rows, _array(grad_F).reshape(E, n, k), Wn, bn, an, S.numpy(),
                                      None if D1 is None else D1.numpy(), ctx.spec.config, dW, db, da, dX)
        if W.dim() == 2:  # a single network: the member axis goes
            dW, da, db = dW[0], da[0], None if db is None else db[0]
            dX = None if dX is None else dX.reshape(X.shape)
        as_tensor = lambda x: None if x is None else torch.from_numpy(x)  # noqa: E731
        dX = as_tensor(dX)
        if dX is not None and W.dim() == 3 and X.dim() == 2:
            dX = dX.sum(0)  # a shared input collects the gradient of every member
        return dX, as_tensor(dW), as_tensor(db), as_tensor(da), None


# torch's Function.apply wraps the native apply in Python that unwraps the dead wrappers of torch.func transforms;
# _direct_applies has ruled those out, so the saving path calls the native apply and spares that per call.
_apply_saving = super(torch.autograd.Function, _SavingTwoLayerFunction).apply
_FLOATS = (torch.float32, torch.float64)


def _wants_grad(X, W, b, a) -> bool:
    return torch.is_grad_enabled() and (W.requires_grad or a.requires_grad or X.requires_grad
                                        or (b is not None and b.requires_grad))


def _direct_applies(X, W, b, a) -> bool:
    """Whether a call on ordinary tensors goes straight to the kernels (the saving Function when a gradient is
    wanted, the native forward alone when not): no torch.func transform or forward-mode AD active, CPU tensors of one
    float dtype of ranks they handle. Any other call takes the general Function, which also words the errors."""
    if torch._C._functorch.maybe_current_level() is not None or torch.autograd.forward_ad._current_level >= 0:
        return False
    if not _plain(X, W, b, a):  # a dead wrapper, escaped from a finished transform
        return False
    dtype = W.dtype
    if dtype not in _FLOATS or a.dtype != dtype or X.dtype != dtype or (b is not None and b.dtype != dtype):
        return False
    if not (W.is_cpu and a.is_cpu and X.is_cpu and (b is None or b.is_cpu)):
        return False
    # the ranks of a single network or an ensemble (a bias of another rank is the general Function's error to word)
    if W.dim() == 2:
        return a.dim() == 2 and (b is None or b.dim() == 1) and X.dim() >= 1 and X.shape[-1] == W.shape[-1]
    return W.dim() == 3 and a.dim() == 3 and (b is None or b.dim() == 2) and X.dim() in (2, 3)


class _TwoLayerFunction(torch.autograd.Function):
    """F [E, n, k] of W [E, m, d], b [E, m] or None, a [E, k, m] and X [n, d] or [E, n, d]."""

    @staticmethod
    def forward(X, W, b, a, spec):
        return torch.from_numpy(_native("forward")(_view(X, "X"), _view(W, "W"), _view(b, "b"), _view(a, "a"),
                                                   spec.config))

    @staticmethod
    def setup_context(ctx, inputs, output):
        X, W, b, a, spec = inputs
        ctx.save_for_backward(X, W, b, a)
        ctx.save_for_forward(X, W, b, a)
        ctx.spec = spec

    @staticmethod
    def backward(ctx, grad_F):
        X, W, b, a = ctx.saved_tensors
        if torch.is_grad_enabled() or not _plain(X, W, b, a, grad_F):
            # A differentiable backward is asked for (create_graph, or a torch.func transform): torch ops.
            return (*_differentiable_backward(ctx.spec, X, W, b, a, grad_F), None)
        dW, db, da, dX = _native("backward")(_view(X, "X"), _view(grad_F, "grad"), _view(W, "W"), _view(b, "b"),
                                             _view(a, "a"), ctx.spec.config, ctx.needs_input_grad[0])
        if dX is not None and X.dim() == 2:
            dX = dX.sum(0)  # a shared input collects the gradient of every member
        as_tensor = lambda x: None if x is None else torch.from_numpy(x)  # noqa: E731
        return as_tensor(dX), as_tensor(dW), as_tensor(db), as_tensor(da), None

    @staticmethod
    def jvp(ctx, tX, tW, tb, ta, _):
        # dF = s_out [(sigma'(Z) dZ) a^T + sigma(Z) da^T], dZ = s_in (dX W^T + X dW^T) + db, in torch ops (written
        # out: a nested torch.func.jvp is refused inside torch.autograd.forward_ad).
        X, W, b, a = ctx.saved_tensors
        spec = ctx.spec
        Z = spec.input_scale * X @ W.transpose(-1, -2) + (0 if b is None else b.unsqueeze(-2))
        dZ = 0
        if tX is not None:
            dZ = dZ + spec.input_scale * tX @ W.transpose(-1, -2)
        if tW is not None:
            dZ = dZ + spec.input_scale * X @ tW.transpose(-1, -2)
        if tb is not None:
            dZ = dZ + tb.unsqueeze(-2)
        dF = 0
        if not isinstance(dZ, int):
            dF = (_activation_slope(spec.activation, Z) * dZ) @ a.transpose(-1, -2)
        if ta is not None:
            dF = dF + _ACTIVATION_FUNCTIONS[spec.activation](Z) @ ta.transpose(-1, -2)
        if isinstance(dF, int):
            return torch.zeros(W.shape[0], X.shape[-2], a.shape[-2], dtype=W.dtype)
        return spec.output_scale * dF.expand(W.shape[0], *dF.shape[-2:])

    @staticmethod
    def vmap(info, in_dims, X, W, b, a, spec):
        # A vmapped slice is one more set of members: batched parameters become a larger native ensemble, a batched
        # input with shared parameters more rows.
        B = info.batch_size
        X_dim, W_dim, b_dim, a_dim, _ = in_dims
        front = lambda t, dim: t if dim is None else t.movedim(dim, 0)  # noqa: E731
        X, W, b, a = front(X, X_dim), front(W, W_dim), front(b, b_dim), front(a, a_dim)
        per_slice_rank = X.dim() - (X_dim is not None)
        if W_dim is None and b_dim is None and a_dim is None:
            E, n = W.shape[0], X.shape[-2]
            rows = X if per_slice_rank == 2 else X.movedim(0, 1)  # [B, n, d] or [E, B, n, d]
            F = _TwoLayerFunction.apply(rows.reshape(*rows.shape[:-3], -1, rows.shape[-1]), W, b, a, spec)
            return F.reshape(E, B, n, -1), 1
        grow = lambda t, dim: None if t is None else (t if dim is not None else t.expand(B, *t.shape))  # noqa: E731
        W, b, a = grow(W, W_dim), grow(b, b_dim), grow(a, a_dim)
        E = W.shape[1]
        flat = lambda t: None if t is None else t.reshape(B * E, *t.shape[2:])  # noqa: E731
        if X_dim is None and per_slice_rank == 2:
            inputs = X
        else:
            X = grow(X, X_dim)
            if per_slice_rank == 2:
                X = X.unsqueeze(1).expand(B, E, *X.shape[1:])
            inputs = flat(X)
        F = _TwoLayerFunction.apply(inputs, flat(W), flat(b), flat(a), spec)
        return F.reshape(B, E, *F.shape[1:]), 0


def two_layer(X, W, b, a, *, activation: str = "relu", input_scale: float = 1.0, output_scale: float = 1.0):
    """F = output_scale * sigma(input_scale * X W^T + b) a^T via the fused kernels, differentiable to any order and
    under torch.func in all of X, W, b, a. Single network: W [m,d], b [m] or None, a [k,m], X [..., d] -> F [..., k];
    ensemble: leading E axis on W, b, a and F, X [n,d] shared or [E,n,d] -> F [E,n,k]. CPU tensors of one dtype,
    float32 or float64; F has that dtype. Raises TypeError/ValueError naming a bad argument."""
    return _two_layer(X, W, b, a, _spec(input_scale, output_scale, activation))


def _two_layer(X, W, b, a, spec: _Spec):
    if not isinstance(W, torch.Tensor):
        raise TypeError(f"W: expected a torch.Tensor, got {type(W).__name__}")
    if not isinstance(X, torch.Tensor):
        raise TypeError(f"X: expected a torch.Tensor, got {type(X).__name__}")
    if W.dim() >= 1 and W.shape[-1] == 0:
        raise ValueError(f"W: expected at least one input feature (d >= 1), got shape {tuple(W.shape)}")
    if isinstance(a, torch.Tensor) and (b is None or isinstance(b, torch.Tensor)) and _direct_applies(X, W, b, a):
        if _wants_grad(X, W, b, a):
            return _apply_saving(X, W, b, a, spec)
        # No gradient wanted (evaluation under torch.no_grad): the native forward without a Function around it,
        # whose apply cost twice the kernel at n = 1024, d = 2, m = 256 (measured).
        rows, Wn, bn, an = _SavingTwoLayerFunction._arrays(X, W, b, a)
        F = _native("forward")(rows, Wn, bn, an, spec.config)
        return torch.from_numpy(F.reshape(*X.shape[:-1], F.shape[-1]) if W.dim() == 2 else F)
    ensemble = _Ensemble(W)
    if ensemble.single:
        if X.dim() < 1 or X.shape[-1] != W.shape[-1]:
            raise ValueError(f"X: expected shape [..., {W.shape[-1]}], got {tuple(X.shape)}")
        F = _TwoLayerFunction.apply(X.reshape(-1, X.shape[-1]), ensemble.up(W, 2), ensemble.up(b, 1),
                                    ensemble.up(a, 2), spec)
        return F[0].reshape(*X.shape[:-1], F.shape[-1])
    return _TwoLayerFunction.apply(X, W, b, a, spec)


def _refuse_data_tangents(tX, tY) -> None:
    # torch.func.jvp hands zero tangents to inputs it does not differentiate; only nonzero ones are refused.
    if any(t is not None and bool(t.any()) for t in (tX, tY)):
        raise NotImplementedError("two_layer_loss: derivatives with respect to X or Y are not fused")


def _fused_loss_and_grad(X, Y, W, b, a, spec, loss):
    return _native("loss_and_grad")(_view(X, "X"), _view(Y, "Y"), _view(W, "W"), _view(b, "b"), _view(a, "a"),
                                    spec.config, loss_code(loss))


def _reference_gradient(X, Y, spec, loss):
    """(W, b, a) -> (dW, db, da) of the members' losses in torch ops (b may be None)."""
    def total(W, b, a):
        return torch_loss(_reference_forward(spec)(X, W, b, a), Y, loss).sum()

    def gradient(W, b, a):
        if b is None:
            dW, da = torch.func.grad(lambda W, a: total(W, None, a), argnums=(0, 1))(W, a)
            return dW, None, da
        return torch.func.grad(total, argnums=(0, 1, 2))(W, b, a)

    return gradient


def _fused_hvp(X, Y, W, b, a, spec, loss, vW, vb, va):
    """Each member's Hessian applied to (vW, vb, va) (None parts are zero): natively on ordinary tensors, by
    torch ops under a torch.func transform."""
    zeros = lambda t, like: torch.zeros_like(like) if t is None else t  # noqa: E731
    vW, va = zeros(vW, W), zeros(va, a)
    vb = None if b is None else zeros(vb, b)
    if not _plain(X, Y, W, b, a, vW, vb, va):
        gradient = _reference_gradient(X, Y, spec, loss)
        if b is None:
            HW, Ha = torch.func.jvp(lambda W, a: gradient(W, None, a)[::2], (W, a), (vW, va))[1]
            return HW, None, Ha
        return torch.func.jvp(gradient, (W, b, a), (vW, vb, va))[1]
    parts = [vW.reshape(W.shape[0], -1)] + ([vb.reshape(b.shape[0], -1)] if b is not None else [])
    V = torch.cat(parts + [va.reshape(a.shape[0], -1)], dim=1).contiguous()
    operator = _native("hessian_operator")(_view(X, "X"), _view(Y, "Y"), _view(W, "W"), _view(b, "b"), _view(a, "a"),
                                           spec.config, loss_code(loss))
    HV = torch.from_numpy(operator.matvec(_view(V, "v")))
    sizes = [W[0].numel()] + ([b[0].numel()] if b is not None else []) + [a[0].numel()]
    pieces = list(torch.split(HV, sizes, dim=1))
    Hb = pieces[1].reshape(b.shape) if b is not None else None
    return pieces[0].reshape(W.shape), Hb, pieces[-1].reshape(a.shape)


class _FusedLossFunction(torch.autograd.Function):
    """What the loss and its gradient save: the data and parameters, the network's spec and the loss name."""

    @staticmethod
    def setup_context(ctx, inputs, output):
        X, Y, W, b, a, spec, loss = inputs
        ctx.save_for_backward(X, Y, W, b, a)
        ctx.save_for_forward(X, Y, W, b, a)
        ctx.spec, ctx.loss = spec, loss


class _LossGradFunction(_FusedLossFunction):
    """(dW, db, da) of the fused loss; its backward and its forward-mode derivative are the Hessian-vector product,
    which makes double backward and forward-over-reverse HVPs of the loss exact and native."""

    @staticmethod
    def forward(X, Y, W, b, a, spec, loss):
        _, dW, db, da = _fused_loss_and_grad(X, Y, W, b, a, spec, loss)
        return torch.from_numpy(dW), None if db is None else torch.from_numpy(db), torch.from_numpy(da)

    @staticmethod
    @once_differentiable
    def backward(ctx, vW, vb, va):
        X, Y, W, b, a = ctx.saved_tensors
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            raise NotImplementedError("two_layer_loss: second derivatives with respect to X or Y are not fused")
        HW, Hb, Ha = _fused_hvp(X, Y, W, b, a, ctx.spec, ctx.loss, vW, vb, va)
        return None, None, HW, Hb, Ha, None, None

    @staticmethod
    def jvp(ctx, tX, tY, tW, tb, ta, _, __):
        X, Y, W, b, a = ctx.saved_tensors
        _refuse_data_tangents(tX, tY)
        return _fused_hvp(X, Y, W, b, a, ctx.spec, ctx.loss, tW, tb, ta)


class _LossFunction(_FusedLossFunction):
    @staticmethod
    def forward(X, Y, W, b, a, spec, loss):
        return torch.from_numpy(_fused_loss_and_grad(X, Y, W, b, a, spec, loss)[0])

    @staticmethod
    def backward(ctx, grad_value):
        X, Y, W, b, a = ctx.saved_tensors
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            raise NotImplementedError("two_layer_loss: gradients with respect to X or Y are not fused; use two_layer "
                                      "and a torch loss for those")
        dW, db, da = _LossGradFunction.apply(X, Y, W, b, a, ctx.spec, ctx.loss)
        g = grad_value.reshape(-1, 1, 1)
        return None, None, g * dW, None if db is None else g[:, :, 0] * db, g * da, None, None

    @staticmethod
    def jvp(ctx, tX, tY, tW, tb, ta, _, __):
        X, Y, W, b, a = ctx.saved_tensors
        _refuse_data_tangents(tX, tY)
        dW, db, da = _LossGradFunction.apply(X, Y, W, b, a, ctx.spec, ctx.loss)
        total = lambda g, t: 0 if t is None else (g * t).flatten(1).sum(1)  # noqa: E731
        return total(dW, tW) + total(da, ta) + (0 if b is None else total(db, tb))


def two_layer_loss(X, Y, W, b, a, *, loss: str = "mse", activation: str = "relu", input_scale: float = 1.0,
                   output_scale: float = 1.0):
    """The fused loss (a scalar for a single network, [E] for an ensemble), differentiable twice in W, b, a:
    backward runs the native gradient, double backward (or forward-over-reverse, ``torch.func.jvp`` of
    ``torch.func.grad``) the native Hessian-vector product. Losses as in ``physai.twolayer.TwoLayer``. Shapes as in
    :func:`two_layer` for an ensemble, with targets Y [n,k] (or [E,n,k]); CPU tensors of one dtype, float32 or
    float64."""
    ensemble = _Ensemble(W)
    loss_code(loss)  # checks the name
    value = _LossFunction.apply(X, Y, ensemble.up(W, 2), ensemble.up(b, 1), ensemble.up(a, 2),
                                _spec(input_scale, output_scale, activation), loss)
    return value[0] if ensemble.single else value


# A module's scalars were checked when it was built: its spec is built once per value, not on every forward.
_module_spec = functools.lru_cache(maxsize=64)(_spec)


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
        """X [..., d] -> outputs [..., k] (an ensemble: X [n, d] or [E, n, d] -> [E, n, k]), in the parameters'
        dtype."""
        return _two_layer(X, self.W, self.b, self.a,
                          _module_spec(self.scaling.input_scale, self.scaling.output_scale, self.activation))

    def loss(self, X: torch.Tensor, Y: torch.Tensor, loss: str = "mse") -> torch.Tensor:
        """The fused mean loss on X [n, d], Y [n, k] (or per member [E, ...]): a scalar, or [E] for an ensemble;
        differentiable twice (double backward is the native HVP)."""
        return two_layer_loss(X, Y, self.W, self.b, self.a, loss=loss, **self._kwargs())

    def numpy_model(self):
        """The parameters as a ``physai.twolayer.TwoLayer`` ensemble (E = 1 for a single network) sharing their
        memory (no copy): the native numpy API on the same network."""
        from physai.twolayer.model import TwoLayer

        ensemble = _Ensemble(self.W)
        return TwoLayer.from_arrays(_view(ensemble.up(self.W, 2), "W"), _view(ensemble.up(self.b, 1), "b"),
                                    _view(ensemble.up(self.a, 2), "a"), self.activation, self.param)

    def hessian_operator(self, X: torch.Tensor, Y: torch.Tensor, loss: str = "mse"):
        """The fused Hessian of each member's loss on (X [n, d], Y [n, k]) as an operator (``shape`` (E, P, P),
        ``dtype``, ``matvec``; vectors flattened in ``named_parameters`` order W, b, a): the protocol through which
        ``physai.spectrum.hessian_eigs(module, "mse", (X, Y))`` uses the native HVP. Raises ValueError when a
        parameter is frozen (the fused Hessian is over all of them)."""
        if not all(p.requires_grad for p in self.parameters()):
            raise ValueError("model: the fused Hessian is over all of W, b and a; a TwoLayerModule with frozen "
                             "parameters is not supported (unfreeze them, or use the equivalent torch layers)")
        return self.numpy_model().hessian_operator(_view(X, "X"), _view(Y, "Y"), loss)

    def hessian_eigs(self, X: torch.Tensor, Y: torch.Tensor, loss: str = "mse", **options):
        """Top Hessian eigenpairs of the fused loss on (X, Y) by the native solvers on the fused HVP (no torch in
        the loop): ``physai.twolayer.TwoLayer.sharpness`` options (k, method, tol, max_matvecs, which, v0, seed).
        Returns an ``EigenResult`` with a leading member axis (1 for a single network); vectors are flattened in
        ``named_parameters`` order (W, b, a)."""
        return self.numpy_model().sharpness(_view(X, "X"), _view(Y, "Y"), loss=loss, **options)

    def ntk(self, X: torch.Tensor, X2: torch.Tensor | None = None) -> torch.Tensor:
        """The empirical NTK Theta = J J2^T of each member, analytic (``physai.twolayer.ntk``): [E, n k, n2 k] (one
        member: [n k, n2 k]), rows ordered sample-major (i k + output)."""
        from physai.twolayer.ntk import empirical_ntk

        X2 = None if X2 is None else _view(X2, "X2")
        theta = torch.from_numpy(empirical_ntk(self.numpy_model(), _view(X, "X"), X2))
        return theta[0] if self.W.dim() == 2 else theta

    def ntk_operator(self, X: torch.Tensor):
        """The empirical NTK on X [n, d] as an operator (``shape`` (E, n k, n k), ``dtype``, ``matvec``) that
        never forms it: ``physai.spectrum.lanczos(module.ntk_operator(X))`` gives its top eigenvalues."""
        from physai.twolayer.ntk import NTKOperator

        return NTKOperator(self.numpy_model(), _view(X, "X"))

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
