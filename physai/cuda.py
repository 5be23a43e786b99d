"""CUDA kernels for ensembles of two-layer networks, on torch CUDA tensors.

A thin layer over ``physai._cuda``: it checks that every tensor is a contiguous CUDA tensor of one float dtype
(float32 or float64) on one device with the expected shape, then passes raw device pointers and
``torch.cuda.current_stream().cuda_stream`` to the kernels, so the calls order correctly with the rest of a torch
program. torch is imported lazily; physai itself does not need it.

Model (per ensemble member e): ``h = input_scale * (W[e] @ x) + b[e]``, ``f = output_scale * a[e] @ act(h)``.
Arguments come in the order of every two-layer function in physai: data (X, then Y), then parameters (W, b, a).
Shapes: X [n, d] (shared) or [E, n, d]; Y [n, k] or [E, n, k]; W [E, m, d], b [E, m] or None, a [E, k, m].
Activations and losses are those of ``physai.twolayer.params`` (the kernels' enums). Losses are means: ``mse`` =
0.5 mean over n*k of (f - y)^2; ``logistic`` = mean over n*k of log(1 + exp(-y f)) (labels +-1); ``cross_entropy``
= mean over n of -sum_j y_j log softmax(f)_j.

Example::

    import torch, physai.cuda as pc
    W = torch.randn(8, 64, 10, device="cuda"); a = torch.randn(8, 1, 64, device="cuda") / 8
    X = torch.randn(512, 10, device="cuda"); Y = torch.randn(512, 1, device="cuda")
    loss, (dW, db, da) = pc.loss_and_grad(X, Y, W, None, a, activation="tanh", loss="mse")
    sharp = pc.sharpness(X, Y, W, None, a, activation="tanh", loss="mse")  # [8]
"""
from __future__ import annotations

from physai._checks import MAX_INT64, check_float, check_int, check_seed
from physai._native import _cuda
from physai.twolayer.params import activation_code, loss_code


def _torch():
    import torch

    return torch


def _require_module():
    if _cuda is None:
        raise RuntimeError("physai was built without CUDA (no nvcc at build time): physai._cuda is missing")


def _check_tensor(t, name, shape, dtype=None, device=None):
    torch = _torch()
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.device.type != "cuda":
        raise ValueError(f"{name}: expected a CUDA tensor, got a tensor on device '{t.device}'")
    if t.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{name}: expected dtype float32 or float64, got {t.dtype}")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{name}: expected dtype {dtype} (that of W), got {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{name}: expected device {device} (that of W), got {t.device}")
    if tuple(t.shape) not in [tuple(s) for s in shape]:
        alts = " or ".join(str(list(s)) for s in shape)
        raise ValueError(f"{name}: expected shape {alts}, got {list(t.shape)}")
    if not t.is_contiguous():
        raise ValueError(f"{name}: expected a contiguous tensor (call .contiguous())")
    return t


def _prepare(X, Y, W, b, a, activation, loss, input_scale, output_scale, needs_targets):
    """Checks the network arguments; returns the ``_cuda.Call`` of the kernels."""
    activation = activation_code(activation)
    loss = loss_code(loss)
    input_scale = check_float(input_scale, "input_scale")
    output_scale = check_float(output_scale, "output_scale")
    # the loss kernels read Y: a missing Y would be a null pointer on the device, which poisons the context
    if needs_targets and Y is None:
        raise TypeError("Y: expected a torch.Tensor of targets, got None")
    torch = _torch()
    if not isinstance(W, torch.Tensor):
        raise TypeError(f"W: expected a torch.Tensor, got {type(W).__name__}")
    if W.dim() != 3:
        raise ValueError(f"W: expected shape [E, m, d], got {list(W.shape)}")
    _check_tensor(W, "W", [tuple(W.shape)])
    _require_module()
    E, m, d = W.shape
    dt, dev = W.dtype, W.device
    if b is not None:
        _check_tensor(b, "b", [(E, m)], dt, dev)
    if not isinstance(a, torch.Tensor) or a.dim() != 3:
        raise ValueError("a: expected a torch.Tensor of shape [E, k, m]")
    k = a.shape[1]
    _check_tensor(a, "a", [(E, k, m)], dt, dev)
    if not isinstance(X, torch.Tensor) or X.dim() not in (2, 3):
        raise ValueError("X: expected a torch.Tensor of shape [n, d] or [E, n, d]")
    n = X.shape[-2]
    _check_tensor(X, "X", [(n, d), (E, n, d)], dt, dev)
    if needs_targets:
        _check_tensor(Y, "Y", [(n, k), (E, n, k)], dt, dev)
    if min(E, m, d, k, n) < 1:
        raise ValueError(f"all sizes must be positive, got E={E} m={m} d={d} k={k} n={n}")
    return _cuda.Call(E, n, d, m, k, X.data_ptr(), Y.data_ptr() if needs_targets else 0, W.data_ptr(),
                      0 if b is None else b.data_ptr(), a.data_ptr(), X.dim() == 3, needs_targets and Y.dim() == 3,
                      input_scale, output_scale, activation, loss, str(dt).replace("torch.", ""))


def _stream(W):
    return _torch().cuda.current_stream(W.device).cuda_stream


def forward(X, W, b, a, *, activation="relu", input_scale=1.0, output_scale=1.0):
    """Outputs f [E, n, k] of every member (dtype of W).

    X [n, d] or [E, n, d], W [E, m, d], b [E, m] or None, a [E, k, m]: contiguous CUDA tensors, float32/float64.
    """
    call = _prepare(X, None, W, b, a, activation, "mse", input_scale, output_scale, needs_targets=False)
    torch = _torch()
    f = torch.empty((W.shape[0], X.shape[-2], a.shape[1]), dtype=W.dtype, device=W.device)
    with torch.cuda.device(W.device):
        _cuda.forward(call, f.data_ptr(), _stream(W))
    return f


def loss_and_grad(X, Y, W, b, a, *, activation="relu", loss="mse", input_scale=1.0, output_scale=1.0):
    """Mean loss per member and its gradients.

    Returns ``(loss [E], (dW [E, m, d], db [E, m] or None, da [E, k, m]))``. Gradient reductions are
    deterministic (fixed summation order, no float atomics).
    """
    call = _prepare(X, Y, W, b, a, activation, loss, input_scale, output_scale, needs_targets=True)
    torch = _torch()
    out = torch.empty(W.shape[0], dtype=W.dtype, device=W.device)
    dW, da = torch.empty_like(W), torch.empty_like(a)
    db = None if b is None else torch.empty_like(b)
    with torch.cuda.device(W.device):
        _cuda.loss_and_grad(call, out.data_ptr(), dW.data_ptr(), 0 if db is None else db.data_ptr(), da.data_ptr(),
                            _stream(W))
    return out, (dW, db, da)


def hvp(X, Y, W, b, a, vW, vb, va, *, activation="relu", loss="mse", input_scale=1.0, output_scale=1.0):
    """Hessian of the mean loss (per member, w.r.t. (W, b, a)) applied to the direction (vW, vb, va).

    vW, vb, va have the shapes of W, b, a (vb is None exactly when b is None). Returns (HW, Hb, Ha) of the same
    shapes, computed analytically (Pearlmutter's R-operator), not by finite differences.
    """
    call = _prepare(X, Y, W, b, a, activation, loss, input_scale, output_scale, needs_targets=True)
    if (vb is None) != (b is None):
        raise ValueError("vb: expected None exactly when b is None")
    _check_tensor(vW, "vW", [tuple(W.shape)], W.dtype, W.device)
    _check_tensor(va, "va", [tuple(a.shape)], W.dtype, W.device)
    if vb is not None:
        _check_tensor(vb, "vb", [tuple(b.shape)], W.dtype, W.device)
    torch = _torch()
    HW, Ha = torch.empty_like(W), torch.empty_like(a)
    Hb = None if b is None else torch.empty_like(b)
    with torch.cuda.device(W.device):
        _cuda.hvp(call, vW.data_ptr(), 0 if vb is None else vb.data_ptr(), va.data_ptr(), HW.data_ptr(),
                  0 if Hb is None else Hb.data_ptr(), Ha.data_ptr(), _stream(W))
    return HW, Hb, Ha


def sharpness(X, Y, W, b, a, *, activation="relu", loss="mse", input_scale=1.0, output_scale=1.0, tol=1e-6,
              max_matvecs=1000, seed=0, return_vectors=False):
    """Top Hessian eigenvalue (by magnitude) of the mean loss of each member, by power iteration on the GPU HVP.

    The convergence test is the CPU solvers' (``physai.spectrum.power_iteration``): member e stops when
    ``||H v - theta v|| <= tol * |theta|`` (theta = v . H v, v a unit vector) or after ``max_matvecs`` products.
    Returns eig [E] (dtype of W); with ``return_vectors=True``, ``(eig, v, matvecs, converged)``: the unit
    eigenvector estimates v [E, P] in the flattened order [W.ravel(), b, a.ravel()] (P = m d + m (if bias) + k m),
    and each member's products [E] (int64) and convergence [E] (bool), both numpy arrays. The start vector is
    Gaussian from a CPU torch generator seeded with ``seed``, so results are reproducible. Raises ValueError naming
    the member whose Hessian-vector product is not finite.
    """
    tol = check_float(tol, "tol", positive=True)
    max_matvecs = check_int(max_matvecs, "max_matvecs", min=1, max=MAX_INT64)
    seed = check_seed(seed)
    call = _prepare(X, Y, W, b, a, activation, loss, input_scale, output_scale, needs_targets=True)
    torch = _torch()
    E, m, d = W.shape
    P = m * d + (m if b is not None else 0) + a.shape[1] * m
    generator = torch.Generator().manual_seed(seed)
    v = torch.randn((E, P), generator=generator, dtype=W.dtype).to(W.device).contiguous()
    eig = torch.empty(E, dtype=W.dtype, device=W.device)
    with torch.cuda.device(W.device):
        matvecs, converged = _cuda.power_iteration(call, v.data_ptr(), eig.data_ptr(), max_matvecs, tol, _stream(W))
    return (eig, v, matvecs, converged) if return_vectors else eig


def ensemble_loss(X, Y, W, b, a, *, activation="relu", loss="mse", input_scale=1.0, output_scale=1.0):
    """Differentiable mean loss per member, loss [E], for use inside an existing torch training loop.

    Backward returns the fused kernel's gradients for W, b, a (scaled by the incoming gradient of each member's
    loss); X and Y get no gradient. Example: ``ensemble_loss(X, Y, W, None, a, loss="mse").sum().backward()``.
    """
    return _EnsembleLoss.apply(X, Y, W, b, a, activation, loss, input_scale, output_scale)


def _make_function():
    torch = _torch()

    class EnsembleLoss(torch.autograd.Function):
        @staticmethod
        def forward(ctx, X, Y, W, b, a, activation, loss, input_scale, output_scale):
            detach = lambda t: t.detach() if isinstance(t, torch.Tensor) else t  # noqa: E731 -- loss_and_grad checks
            value, grads = loss_and_grad(*map(detach, (X, Y, W, b, a)), activation=activation, loss=loss,
                                         input_scale=input_scale, output_scale=output_scale)
            ctx.save_for_backward(*[g for g in grads if g is not None])
            ctx.has_bias = b is not None
            return value

        @staticmethod
        def backward(ctx, grad_out):
            saved = list(ctx.saved_tensors)
            dW, da = saved[0], saved[-1]
            db = saved[1] if ctx.has_bias else None
            scale = grad_out.view(-1, 1, 1)
            return (None, None, dW * scale, None if db is None else db * grad_out.view(-1, 1), da * scale,
                    None, None, None, None)

    return EnsembleLoss


class _Lazy:
    """Builds the autograd Function on first use, so importing physai.cuda does not import torch."""

    fn = None

    def apply(self, *args):
        if _Lazy.fn is None:
            _Lazy.fn = _make_function()
        return _Lazy.fn.apply(*args)


_EnsembleLoss = _Lazy()
