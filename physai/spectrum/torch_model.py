"""Hessian spectra of any torch model's loss: top-k eigenpairs, trace, spectral density.

The Hessian is that of the parameters' loss over the whole ``data``: either one batch ``(inputs, targets)``
or an iterable of such batches (a DataLoader), whose HVPs are accumulated weighted by batch size, so the
operator is the Hessian of the mean loss over the dataset (``loss_fn`` must return a per-batch mean).
HVPs are forward-over-reverse: ``torch.func.jvp`` of ``torch.func.grad`` of the loss through
``torch.func.functional_call``; where an op has no forward-mode derivative of its backward (torch 2.13's
``mse_loss``), the operator switches once to reverse-over-reverse (``vjp`` of ``grad``), equal by symmetry.

Model mode: the model is used in whatever mode the caller put it in (``model.train()`` or ``model.eval()``),
and is never switched. PyHessian silently forces eval mode; here a model in train mode keeps dropout and
batch-norm batch statistics, which makes the Hessian stochastic/batch-dependent; call ``model.eval()``
first for the Hessian of the deterministic network. Buffers (e.g. running statistics) are read, not updated.
"""
from __future__ import annotations

import sys

import math

import numpy as np

from physai._checks import check_choice, check_float, check_int, check_seed
from physai._progress import progress
from physai.spectrum.eigensolvers import EigenResult, lanczos, power_iteration


def _torch():
    import torch

    return torch


def _pair(batch):
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise ValueError(f"data: each batch must be an (inputs, targets) pair, got a {type(batch).__name__}"
                         + (f" of {len(batch)}" if isinstance(batch, (tuple, list)) else ""))
    return batch


def _batches(data):
    if hasattr(data, "shape"):
        raise TypeError("data: expected (inputs, targets) tensors or an iterable of such batches, got one tensor")
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(hasattr(x, "shape") for x in data):
        batches = [tuple(data)]
    else:
        try:
            batches = data if hasattr(data, "__len__") and not isinstance(data, (tuple, list)) else list(data)
        except TypeError as error:
            raise TypeError("data: expected (inputs, targets) tensors or an iterable of such batches") from error
    if hasattr(batches, "__len__") and len(batches) == 0:
        raise ValueError("data: expected at least one batch, got an empty dataset")
    return batches


class HessianOperator:
    """The Hessian of ``loss_fn(model(inputs), targets)`` w.r.t. the trainable parameters, as an operator.

    shape: (1, P, P) with P the number of trainable parameters; dtype: the parameters' dtype (float32/64);
    ``matvec(V [1, P]) -> [1, P]``; ``hvps`` counts the full-data HVPs done. ``progress_bar=True`` shows a bar over
    batches for DataLoaders.
    """

    def __init__(self, model, loss_fn, data, *, progress_bar: bool = False):
        torch = _torch()
        if not callable(loss_fn):
            raise TypeError(f"loss_fn: expected a callable loss(outputs, targets), got {loss_fn!r} (loss names such as "
                            f"'mse' select the fused path of a physai TwoLayerModule only)")
        self.model, self.loss_fn, self.progress_bar = model, loss_fn, progress_bar
        self.names = [name for name, p in model.named_parameters() if p.requires_grad]
        params = [p for _, p in model.named_parameters() if p.requires_grad]
        if not params:
            raise ValueError("model: has no trainable parameters")
        dtypes = {p.dtype for p in params}
        if len(dtypes) != 1 or next(iter(dtypes)) not in (torch.float32, torch.float64):
            raise TypeError(f"model: expected all parameters float32 or all float64, got {sorted(map(str, dtypes))}")
        self.params = {name: p.detach() for name, p in zip(self.names, params)}
        self.sizes = [p.numel() for p in params]
        self.n = sum(self.sizes)
        self.shape = (1, self.n, self.n)
        self.torch_dtype = params[0].dtype
        self.dtype = np.dtype(np.float32 if self.torch_dtype == torch.float32 else np.float64)
        self.device = params[0].device
        self.batches = _batches(data)
        self.hvps = 0
        self.forward_over_reverse = True

    def _unflatten(self, flat):
        return {name: chunk.view_as(self.params[name])
                for name, chunk in zip(self.names, flat.split(self.sizes))}

    def hvp(self, v):
        """Hessian-vector product of a flat torch vector [P] in the parameters' dtype and device (the mean loss over
        all of ``data``); returns [P] likewise."""
        torch = _torch()
        from torch.func import functional_call

        tangents = self._unflatten(v)
        total, count = torch.zeros_like(v), 0
        batches = self.batches
        for batch in progress(batches, total=len(batches) if hasattr(batches, "__len__") else None, desc="hvp",
                              enabled=self.progress_bar):
            inputs, targets = _pair(batch)

            def loss(params):
                return self.loss_fn(functional_call(self.model, params, (inputs,)), targets)

            hv = self._batch_hvp(loss, tangents)
            size = len(inputs)
            total += size * torch.cat([hv[name].reshape(-1) for name in self.names])
            count += size
        if count == 0:
            raise ValueError("data: expected at least one sample, got an empty dataset")
        self.hvps += 1
        return total / count

    def _batch_hvp(self, loss, tangents):
        from torch.func import grad, jvp, vjp

        if self.forward_over_reverse:
            try:
                return jvp(grad(loss), (self.params,), (tangents,))[1]
            except RuntimeError:
                # Some torch ops lack a forward-mode derivative of their backward (torch 2.13: mse_loss raises
                # "ZeroTensors are immutable"); the Hessian is symmetric, so reverse-over-reverse gives the same.
                self.forward_over_reverse = False
        return vjp(grad(loss), self.params)[1](tangents)[0]

    def matvec(self, V: np.ndarray) -> np.ndarray:
        """[1, P] numpy -> [1, P] numpy."""
        torch = _torch()
        v = torch.as_tensor(V[0], device=self.device, dtype=self.torch_dtype)
        return self.hvp(v).detach().cpu().numpy()[None]


def _fused_two_layer(model, loss_fn, data):
    """(X, Y) when ``model`` is physai's TwoLayerModule and ``loss_fn`` names one of its fused losses: then the
    native fused HVP serves the solver. A TwoLayerModule with a torch loss callable is refused (its autograd
    Function has no torch.func rules)."""
    if "physai.twolayer.torch" not in sys.modules:  # no TwoLayerModule can exist before that module is imported
        return None
    from physai.twolayer.params import LOSSES
    from physai.twolayer.torch import TwoLayerModule

    if not isinstance(model, TwoLayerModule):
        return None
    if not isinstance(loss_fn, str) or loss_fn not in LOSSES:
        raise TypeError(f"loss_fn: for a TwoLayerModule pass the name of a fused loss {LOSSES}, got {loss_fn!r}")
    if not all(p.requires_grad for p in model.parameters()):
        raise ValueError("model: the fused Hessian is over all of W, b and a; a TwoLayerModule with frozen "
                         "parameters is not supported (unfreeze them, or use the equivalent torch layers)")
    batches = _batches(data)
    if not isinstance(batches, list) or len(batches) != 1:
        raise ValueError("data: the fused two-layer path takes the full batch as one (X, Y) pair")
    return _pair(batches[0])


def hessian_eigs(model, loss_fn, data, k: int = 1, method: str = "lanczos", which: str = "LA", tol: float = 1e-6,
                 max_iter: int = 1000, v0=None, seed: int = 0, progress_bar: bool = False) -> EigenResult:
    """Top-k Hessian eigenpairs of a torch model's mean loss over ``data``.

    For physai's ``TwoLayerModule`` with ``loss_fn`` a fused loss name ("mse", "logistic", "cross_entropy"),
    the native fused HVP is used instead of torch.func (full batch).

    data: (inputs, targets) tensors or an iterable of such batches. method: "lanczos" or "power" (power:
    k=1, dominant by magnitude). Returns an :class:`EigenResult` with values [1, k], vectors [1, k, P]
    (flattened over the trainable parameters in ``named_parameters`` order) and the HVP count in ``matvecs``;
    for a fused ``TwoLayerModule`` of E members, one row per member: values [E, k], vectors [E, k, P].
    """
    method = check_choice(method, "method", ("lanczos", "power"))
    fused = _fused_two_layer(model, loss_fn, data)
    if fused is not None:
        X, Y = fused
        return model.hessian_eigs(X, Y, loss=loss_fn, k=k, method=method, which=which, tol=tol, max_iter=max_iter,
                                  v0=v0, seed=seed)
    op = HessianOperator(model, loss_fn, data, progress_bar=progress_bar)
    k = check_int(k, "k", min=1)
    if k > op.n:
        raise ValueError(f"k: expected at most the number of trainable parameters ({op.n}), got {k}")
    if method == "power":
        if k != 1:
            raise ValueError(f"k: power iteration finds one eigenpair, got k={k}; use method='lanczos'")
        return power_iteration(op, tol=tol, max_iter=max_iter, v0=v0, seed=seed)
    return lanczos(op, k=k, which=which, tol=tol, max_iter=max_iter, v0=v0, seed=seed)


def _probe(torch, kind: str, n: int, generator, dtype, device):
    if kind == "rademacher":
        return (torch.randint(0, 2, (n,), generator=generator).to(dtype) * 2 - 1).to(device)
    return torch.randn(n, generator=generator, dtype=dtype).to(device)


def hessian_trace(model, loss_fn, data, method: str = "hutchinson", num_samples: int = 100, seed: int = 0,
                  progress_bar: bool = False) -> tuple[float, float]:
    """Stochastic estimate of the Hessian trace: returns ``(estimate, standard_error)``.

    method: "hutchinson" (Rademacher probes, num_samples HVPs) or "hutch++" (Meyer et al. 2021: a third of
    the HVPs build a low-rank sketch whose trace is exact, the rest estimate the remainder's trace).
    """
    torch = _torch()
    method = check_choice(method, "method", ("hutchinson", "hutch++"))
    num_samples = check_int(num_samples, "num_samples", min=2 if method == "hutchinson" else 6)
    seed = check_seed(seed)
    op = HessianOperator(model, loss_fn, data)
    gen = torch.Generator().manual_seed(seed % 2**63)
    probe = lambda: _probe(torch, "rademacher", op.n, gen, op.torch_dtype, op.device)  # noqa: E731
    if method == "hutchinson":
        samples = [float(z @ op.hvp(z)) for z in progress((probe() for _ in range(num_samples)),
                                                          total=num_samples, desc="hutchinson",
                                                          enabled=progress_bar)]
        return float(np.mean(samples)), float(np.std(samples, ddof=1) / math.sqrt(num_samples))
    s = num_samples // 3
    S = torch.stack([probe() for _ in range(s)], 1)
    Q, _ = torch.linalg.qr(torch.stack([op.hvp(S[:, i]) for i in range(s)], 1))
    exact = float(sum(Q[:, i] @ op.hvp(Q[:, i]) for i in range(Q.shape[1])))
    rest = []
    for _ in progress(range(num_samples - 2 * s), desc="hutch++", enabled=progress_bar):
        z = probe()
        z = z - Q @ (Q.T @ z)
        rest.append(float(z @ op.hvp(z)))
    return exact + float(np.mean(rest)), float(np.std(rest, ddof=1) / math.sqrt(len(rest))) if len(rest) > 1 else 0.0


def slq_nodes(matvec, n: int, num_steps: int, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Gauss quadrature of the spectral measure seen from unit vector ``v`` [n] (float64): ``num_steps`` steps of
    Lanczos with full reorthogonalization; returns Ritz values and weights (summing to 1), each [<= num_steps]."""
    basis = [v / np.linalg.norm(v)]
    alphas, betas = [], []
    for step in range(min(num_steps, n)):
        w = matvec(basis[-1])
        alphas.append(basis[-1] @ w)
        V = np.array(basis)
        for _ in range(2):
            w = w - (V @ w) @ V
        beta = np.linalg.norm(w)
        if step == min(num_steps, n) - 1 or beta <= 1e-10 * max(abs(a) for a in alphas + [1e-300]):
            break
        betas.append(beta)
        basis.append(w / beta)
    T = np.diag(alphas) + np.diag(betas, 1) + np.diag(betas, -1)
    theta, S = np.linalg.eigh(T)
    return theta, S[0] ** 2


def hessian_density(model, loss_fn, data, num_steps: int = 30, num_probes: int = 4, grid_size: int = 1000,
                    sigma: float | None = None, seed: int = 0, progress_bar: bool = False):
    """Hessian spectral density by stochastic Lanczos quadrature (Ghorbani et al. 2019).

    Averages the Gauss quadratures of ``num_probes`` Gaussian probes (``num_steps`` HVPs each), broadened by
    Gaussians of width ``sigma`` (default 1% of the spectral range). Returns ``(grid [grid_size],
    density [grid_size])`` float64; the grid extends 5 sigma past the extreme nodes so the density
    integrates to 1.
    """
    torch = _torch()
    num_steps = check_int(num_steps, "num_steps", min=1)
    num_probes = check_int(num_probes, "num_probes", min=1)
    grid_size = check_int(grid_size, "grid_size", min=2)
    seed = check_seed(seed)
    op = HessianOperator(model, loss_fn, data)
    gen = torch.Generator().manual_seed(seed % 2**63)
    matvec = lambda x: op.matvec(x[None].astype(op.dtype))[0].astype(np.float64)  # noqa: E731
    nodes, weights = [], []
    for _ in progress(range(num_probes), desc="slq", enabled=progress_bar):
        v = torch.randn(op.n, generator=gen, dtype=torch.float64).numpy()
        theta, w = slq_nodes(matvec, op.n, num_steps, v)
        nodes.append(theta)
        weights.append(w / num_probes)
    nodes, weights = np.concatenate(nodes), np.concatenate(weights)
    span = nodes.max() - nodes.min()
    sigma = check_float(sigma, "sigma", positive=True) if sigma is not None else max(0.01 * span, 1e-6 * max(
        abs(nodes).max(), 1e-300), 1e-12)
    grid = np.linspace(nodes.min() - 5 * sigma, nodes.max() + 5 * sigma, grid_size)
    density = (weights[None] * np.exp(-0.5 * ((grid[:, None] - nodes[None]) / sigma) ** 2)).sum(1)
    return grid, density / (sigma * math.sqrt(2 * math.pi))
