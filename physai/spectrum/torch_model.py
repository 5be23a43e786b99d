"""Hessian spectra of any torch model's loss: top-k eigenpairs, trace, spectral density.

Data and weighting. ``data`` is one batch or an iterable of batches (a list, a DataLoader). With a loss
``loss_fn(outputs, targets)`` each batch is an ``(inputs, targets)`` pair, and the model is called as
``model(inputs)``, ``model(*inputs)`` for a tuple or list of inputs, or ``model(**inputs)`` for a dict; one such
pair may be passed alone when its targets are a tensor. With ``loss_form="model"`` the loss is
``loss_fn(model, batch)`` for any batch structure (LEGO's dict batches, say): ``model`` is then the model run on the
parameters being differentiated, to be called as usual; ``data`` must be an iterable of batches (a lone dict is one
batch). Each batch counts ``batch_size(batch)`` samples: by default the leading extent of the targets (or, with
``loss_form="model"``, of the first tensor in the batch, all tensors agreeing). With ``reduction="mean"`` (the
default) ``loss_fn`` returns a per-batch *mean* and the operator is the Hessian of the mean loss over every sample,
sum_b n_b H_b / sum_b n_b; with ``reduction="sum"`` it returns a per-batch *sum* and the operator is the Hessian
of the total, sum_b H_b. A torch loss module or ``functools.partial`` whose own ``reduction`` disagrees is refused.

HVPs are reverse-over-reverse: ``torch.func.vjp`` of ``torch.func.grad`` of the loss through
``torch.func.functional_call`` over the parameters and a fresh copy of the buffers. (Forward-over-reverse fails in
torch 2.13 on ``mse_loss`` and measured 1.7x slower on a 64-256-10 MLP, n=2048.) For in-memory data (a list or
one batch) the graph of each batch's gradient is built once and each HVP is one double-backward pass over it, as
PyHessian does (``cache_graphs``).

Model mode: the model is used in whatever mode the caller put it in and is never switched. In train mode
BatchNorm uses batch statistics and dropout is active (the Hessian is then that of the stochastic, batch-dependent
loss; call ``model.eval()`` first for the deterministic network); buffers are copied for every evaluation, so the
module's running statistics are left exactly as they were.
"""
from __future__ import annotations

import functools
import math

import numpy as np

from physai._checks import check_choice, check_float, check_int, check_seed
from physai.spectrum.eigensolvers import WHICH, EigenResult, lanczos, power_iteration

REDUCTIONS = ("mean", "sum")
LOSS_FORMS = ("outputs", "model")


def _torch():
    import torch

    return torch


def _progress_bar(enabled, desc: str):
    """A tqdm counter: ``enabled`` None shows it on a terminal only, after 2 s (long runs only); True always."""
    from tqdm.auto import tqdm

    return tqdm(desc=desc, unit="HVP", disable=None if enabled is None else not enabled, delay=2.0 if enabled is None
                else 0.0, leave=False)


def _declared_reduction(loss_fn):
    """The ``reduction`` a torch loss module or a ``functools.partial`` of a functional loss declares, or None."""
    if isinstance(getattr(loss_fn, "reduction", None), str):
        return loss_fn.reduction
    if isinstance(loss_fn, functools.partial):
        return loss_fn.keywords.get("reduction")
    return None


def _tensor_leaves(x, torch):
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, dict):
        return [leaf for value in x.values() for leaf in _tensor_leaves(value, torch)]
    if isinstance(x, (tuple, list)):
        return [leaf for value in x for leaf in _tensor_leaves(value, torch)]
    return []


def _leading_extent(x, torch, name: str) -> int:
    leaves = [t for t in _tensor_leaves(x, torch) if t.dim() > 0]
    if not leaves:
        raise ValueError(f"{name}: expected tensors with a leading batch dimension, pass batch_size=fn(batch)")
    extents = {t.shape[0] for t in leaves}
    if len(extents) != 1:
        raise ValueError(f"{name}: tensors disagree on the leading (batch) extent {sorted(extents)}; pass "
                         f"batch_size=fn(batch)")
    return extents.pop()


def _is_pair(batch, torch) -> bool:
    return isinstance(batch, (tuple, list)) and len(batch) == 2 and isinstance(batch[1], torch.Tensor) and (
        isinstance(batch[0], (torch.Tensor, tuple, list, dict)))


def _batches(data, loss_form, torch):
    if isinstance(data, torch.Tensor):
        raise TypeError("data: expected (inputs, targets) tensors or an iterable of such batches, got one tensor")
    if loss_form == "outputs" and _is_pair(data, torch) or loss_form == "model" and isinstance(data, dict):
        return [data]
    if isinstance(data, (tuple, list)):
        batches = list(data)
    elif hasattr(data, "__iter__"):
        batches = data
    else:
        raise TypeError(f"data: expected a batch or an iterable of batches, got {type(data).__name__}")
    if hasattr(batches, "__len__") and len(batches) == 0:
        raise ValueError("data: expected at least one batch, got an empty dataset")
    return batches


def _call(model, inputs):
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def _select(model, params, torch):
    """Names of the parameters to differentiate: all trainable ones, or those of ``params`` (a module, or an
    iterable of parameters or parameter names of ``model``)."""
    named = dict(model.named_parameters())
    if params is None:
        names = [name for name, p in named.items() if p.requires_grad]
        if not names:
            raise ValueError("model: has no trainable parameters")
        return names
    if isinstance(params, torch.nn.Module):
        params = list(params.parameters())
    try:
        chosen = list(params)
    except TypeError:
        raise TypeError(f"params: expected a module or an iterable of parameters or names, got "
                        f"{type(params).__name__}") from None
    by_id = {id(p): name for name, p in named.items()}
    names = []
    for item in chosen:
        name = item if isinstance(item, str) else by_id.get(id(item))
        if name not in named:
            what = repr(item) if isinstance(item, str) else f"a {type(item).__name__} that is not one"
            raise ValueError(f"params: expected parameters of model (or their names), got {what}")
        if name not in names:
            names.append(name)
    if not names:
        raise ValueError("params: expected at least one parameter, got none")
    return [name for name in named if name in names]  # model order, so vectors are laid out as named_parameters


class TorchHessian:
    """The Hessian of a torch model's loss over ``data`` w.r.t. a set of its parameters, as an operator.

    model: any ``torch.nn.Module`` (used in its current mode, buffers untouched). loss_fn, data, loss_form,
    reduction, batch_size: see the module docstring. params: the parameters to differentiate (default: every
    trainable one), as a module or an iterable of parameters or names; the others are held at their values.
    cache_graphs: keep each batch's gradient graph between HVPs (default: True when data is in memory, a list or a
    single batch; False for any other iterable, which is re-iterated for every HVP).

    shape: (1, P, P) with P the number of chosen parameters, ``dtype`` their dtype (float32/float64, all alike),
    ``matvec(V [1, P]) -> [1, P]``, ``hvp(v [P] tensor) -> [P]``; vectors are flat in ``named_parameters`` order.
    ``names`` lists the chosen parameters, ``hvps`` counts the full-data HVPs done. Raises TypeError/ValueError
    naming the argument for a bad model, loss, data, reduction or batch.
    """

    def __init__(self, model, loss_fn, data, *, params=None, loss_form: str = "outputs", reduction: str = "mean",
                 batch_size=None, cache_graphs: bool | None = None):
        torch = _torch()
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
        if not callable(loss_fn):
            raise TypeError(f"loss_fn: expected a callable loss, got {loss_fn!r} (loss names such as 'mse' select the "
                            f"fused Hessian of a model offering hessian_operator)")
        self.loss_form = check_choice(loss_form, "loss_form", LOSS_FORMS)
        self.reduction = check_choice(reduction, "reduction", REDUCTIONS)
        declared = _declared_reduction(loss_fn)
        if declared is not None and declared != self.reduction:
            raise ValueError(f"reduction: loss_fn reduces by {declared!r} but reduction={self.reduction!r}; pass "
                             f"reduction={declared!r} (batches then add up) or use a loss with reduction="
                             f"{self.reduction!r}")
        if batch_size is not None and not callable(batch_size):
            raise TypeError(f"batch_size: expected a function batch -> number of samples, got {batch_size!r}")
        self.model, self.loss_fn, self.batch_size = model, loss_fn, batch_size
        self.names = _select(model, params, torch)
        named = dict(model.named_parameters())
        chosen = [named[name] for name in self.names]
        dtypes = {p.dtype for p in chosen}
        if len(dtypes) != 1 or next(iter(dtypes)) not in (torch.float32, torch.float64):
            raise TypeError(f"model: expected all parameters float32 or all float64, got {sorted(map(str, dtypes))}")
        self.params = {name: p.detach() for name, p in zip(self.names, chosen)}
        self.fixed = {name: p.detach() for name, p in named.items() if name not in self.params}
        self.buffers = dict(model.named_buffers())
        self.sizes = [p.numel() for p in chosen]
        self.n = sum(self.sizes)
        self.shape = (1, self.n, self.n)
        self.torch_dtype = chosen[0].dtype
        self.dtype = np.dtype(np.float32 if self.torch_dtype == torch.float32 else np.float64)
        self.device = chosen[0].device
        self.batches = _batches(data, self.loss_form, torch)
        in_memory = isinstance(self.batches, list)
        self.cache_graphs = in_memory if cache_graphs is None else bool(cache_graphs)
        if self.cache_graphs and not in_memory:
            self.batches = list(self.batches)
        self._graphs = None
        self.hvps = 0
        self.bar = None  # a tqdm bar that counts matvecs, set by the tools that run a solver

    def _weight(self, batch) -> float:
        torch = _torch()
        if self.reduction == "sum":
            return 1.0
        if self.batch_size is not None:
            size = self.batch_size(batch)
            return float(check_int(size, "batch_size(batch)", min=0))
        if self.loss_form == "outputs":
            return float(_leading_extent(batch[1], torch, "data: targets"))
        return float(_leading_extent(batch, torch, "data: batch"))

    def _loss(self, batch):
        """The batch's loss as a function of the chosen parameters."""
        torch = _torch()
        from torch.func import functional_call

        model, fixed, buffers = self.model, self.fixed, self.buffers

        def run(params, *args, **kwargs):
            # Fresh copies: BatchNorm in train mode updates its running statistics in place.
            state = {**fixed, **params, **{name: b.clone() for name, b in buffers.items()}}
            return functional_call(model, state, args, kwargs)

        if self.loss_form == "model":
            return lambda params: self.loss_fn(functools.partial(run, params), batch)
        if not _is_pair(batch, torch):
            raise ValueError(f"data: each batch must be an (inputs, targets) pair with targets a tensor, got a "
                             f"{type(batch).__name__}" + (f" of {len(batch)}" if isinstance(batch, (tuple, list))
                                                          else "") + " (use loss_form='model' for other batches)")
        inputs, targets = batch

        def loss(params):
            return self.loss_fn(_call(lambda *a, **k: run(params, *a, **k), inputs), targets)

        return loss

    def _batch_hvp(self, batch, tangents):
        from torch.func import grad, vjp

        return vjp(grad(self._loss(batch)), self.params)[1](tangents)[0]

    def _unflatten(self, flat):
        return {name: chunk.view_as(self.params[name]) for name, chunk in zip(self.names, flat.split(self.sizes))}

    def hvp(self, v):
        """Hessian-vector product of a flat torch vector [P] in the parameters' dtype and device; returns [P]."""
        torch = _torch()
        from torch.func import grad, vjp

        tangents = self._unflatten(v)
        total, count = torch.zeros_like(v), 0.0
        if self.cache_graphs and self._graphs is None:
            self._graphs = [(vjp(grad(self._loss(batch)), self.params)[1], self._weight(batch))
                            for batch in self.batches]
        pairs = self._graphs if self.cache_graphs else ((lambda t, b=batch: self._batch_hvp(b, t), self._weight(batch))
                                                        for batch in self.batches)
        for apply, weight in pairs:
            hv = apply(tangents)
            if isinstance(hv, tuple):
                hv = hv[0]
            total += weight * torch.cat([hv[name].reshape(-1) for name in self.names])
            count += weight
        if count == 0:
            raise ValueError("data: expected at least one sample, got an empty dataset")
        self.hvps += 1
        return total / count if self.reduction == "mean" else total

    def matvec(self, V: np.ndarray) -> np.ndarray:
        """[1, P] numpy -> [1, P] numpy."""
        torch = _torch()
        v = torch.as_tensor(np.asarray(V)[0], device=self.device, dtype=self.torch_dtype)
        out = self.hvp(v).detach().cpu().numpy()[None]
        if self.bar is not None:
            self.bar.update()
        return out


def _fused_operator(model, loss_fn, data, params):
    """The operator of a model offering the fused-Hessian protocol ``hessian_operator(inputs, targets, loss)``
    (e.g. physai's TwoLayerModule), for a loss given by name."""
    torch = _torch()
    factory = getattr(model, "hessian_operator", None)
    if not callable(factory):
        raise TypeError(f"loss_fn: expected a callable loss, got {loss_fn!r}; a loss name is for models offering "
                        f"hessian_operator(inputs, targets, loss), {type(model).__name__} does not")
    if params is not None:
        raise ValueError("params: a fused Hessian is over all of the model's parameters; use a callable loss_fn for "
                         "a subset")
    if not _is_pair(data, torch):
        raise ValueError("data: the fused Hessian takes the full batch as one (inputs, targets) pair")
    return factory(data[0], data[1], loss_fn)


def hessian_operator(model, loss_fn, data, *, params=None, loss_form: str = "outputs", reduction: str = "mean",
                     batch_size=None, cache_graphs: bool | None = None):
    """The loss Hessian as an operator (``shape``, ``dtype``, ``matvec``): a :class:`TorchHessian`, or for a
    ``loss_fn`` given by name, the fused operator of a model offering ``hessian_operator(inputs, targets, loss)``
    (physai's ``TwoLayerModule``: one row per ensemble member)."""
    if isinstance(loss_fn, str):
        return _fused_operator(model, loss_fn, data, params)
    return TorchHessian(model, loss_fn, data, params=params, loss_form=loss_form, reduction=reduction,
                        batch_size=batch_size, cache_graphs=cache_graphs)


def hessian_eigs(model, loss_fn, data, k: int = 1, *, which: str = "LA", method: str = "lanczos", tol: float = 1e-3,
                 max_matvecs: int = 1000, params=None, loss_form: str = "outputs", reduction: str = "mean",
                 batch_size=None, cache_graphs: bool | None = None, v0=None, seed: int = 0,
                 progress_bar: bool | None = None) -> EigenResult:
    """k Hessian eigenpairs of a torch model's loss over ``data`` (see the module docstring for data, loss forms
    and batch weighting).

    which: "LA" (largest, the sharpness first), "SA" (most negative first), "LM" or "BE" (both ends), as in
    :func:`physai.spectrum.lanczos`, which certifies repeated eigenvalues (k copies of a Kronecker-structured
    last-layer Hessian are all found). method: "lanczos" or "power" (k=1, dominant by magnitude; slower, kept
    for comparison with PyHessian). tol: relative residual; the default 1e-3 gives eigenvalues to ~1e-6
    relative at a spectral gap of the eigenvalue's size (Kato-Temple: error <= (tol lambda)^2 / gap), in ~20-40
    HVPs on the models of tests/test_spectrum_torch.py, where power iteration to the same residual needs
    hundreds. params: differentiate only these (a module, or parameters or names); the rest are held fixed.
    cache_graphs: as in :class:`TorchHessian`.
    progress_bar: None shows a bar of HVPs on a terminal for runs longer than 2 s.

    For a model offering ``hessian_operator(inputs, targets, loss)`` (physai's ``TwoLayerModule``) and ``loss_fn``
    naming one of its fused losses ("mse", "logistic", "cross_entropy"), the fused native HVP serves the solver
    (``data``: one full-batch pair; one row per ensemble member).

    Returns an :class:`EigenResult`: values [1, k], vectors [1, k, P] flattened over the chosen parameters in
    ``named_parameters`` order, HVPs in ``matvecs``. Raises TypeError/ValueError naming the argument.
    """
    method = check_choice(method, "method", ("lanczos", "power"))
    which = check_choice(which, "which", WHICH)
    op = hessian_operator(model, loss_fn, data, params=params, loss_form=loss_form, reduction=reduction,
                          batch_size=batch_size, cache_graphs=cache_graphs)
    k = check_int(k, "k", min=1)
    if k > op.shape[-1]:
        raise ValueError(f"k: expected at most the number of parameters differentiated ({op.shape[-1]}), got {k}")
    if method == "power" and k != 1:
        raise ValueError(f"k: power iteration finds one eigenpair, got k={k}; use method='lanczos'")
    if method == "power" and which not in ("LA", "LM"):
        raise ValueError(f"which: power iteration finds the largest-magnitude eigenvalue, got which={which!r}")
    with _progress_bar(progress_bar, "Hessian eigs") as bar:
        if isinstance(op, TorchHessian):
            op.bar = bar
        if method == "power":
            return power_iteration(op, tol=tol, max_matvecs=max_matvecs, v0=v0, seed=seed)
        return lanczos(op, k=k, which=which, tol=tol, max_matvecs=max_matvecs, v0=v0, seed=seed)


def _probe(torch, n: int, generator, dtype, device):
    return (torch.randint(0, 2, (n,), generator=generator).to(dtype) * 2 - 1).to(device)


def hessian_trace(model, loss_fn, data, method: str = "hutchinson", num_samples: int = 100, seed: int = 0, *,
                  params=None, loss_form: str = "outputs", reduction: str = "mean", batch_size=None,
                  cache_graphs: bool | None = None, progress_bar: bool | None = None) -> tuple[float, float]:
    """Stochastic estimate of the Hessian trace: returns ``(estimate, standard_error)``.

    method: "hutchinson" (Rademacher probes, num_samples HVPs; Hutchinson 1990) or "hutch++" (Meyer et al. 2021:
    a third of the HVPs build a low-rank sketch whose trace is exact, the rest estimate the remainder's trace).
    Data, loss forms, parameters, weighting and graph caching as in :func:`hessian_eigs`.
    """
    torch = _torch()
    method = check_choice(method, "method", ("hutchinson", "hutch++"))
    num_samples = check_int(num_samples, "num_samples", min=2 if method == "hutchinson" else 6)
    seed = check_seed(seed)
    op = TorchHessian(model, loss_fn, data, params=params, loss_form=loss_form, reduction=reduction,
                      batch_size=batch_size, cache_graphs=cache_graphs)
    gen = torch.Generator().manual_seed(seed % 2**63)
    probe = lambda: _probe(torch, op.n, gen, op.torch_dtype, op.device)  # noqa: E731
    with _progress_bar(progress_bar, method) as bar:
        def hvp(z):
            bar.update()
            return op.hvp(z)

        if method == "hutchinson":
            samples = [float(z @ hvp(z)) for z in (probe() for _ in range(num_samples))]
            return float(np.mean(samples)), float(np.std(samples, ddof=1) / math.sqrt(num_samples))
        s = num_samples // 3
        S = torch.stack([probe() for _ in range(s)], 1)
        Q, _ = torch.linalg.qr(torch.stack([hvp(S[:, i]) for i in range(s)], 1))
        exact = float(sum(Q[:, i] @ hvp(Q[:, i]) for i in range(Q.shape[1])))
        rest = []
        for _ in range(num_samples - 2 * s):
            z = probe()
            z = z - Q @ (Q.T @ z)
            rest.append(float(z @ hvp(z)))
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
                    sigma: float | None = None, seed: int = 0, *, params=None, loss_form: str = "outputs",
                    reduction: str = "mean", batch_size=None, cache_graphs: bool | None = None,
                    progress_bar: bool | None = None):
    """Hessian spectral density by stochastic Lanczos quadrature (Ghorbani et al. 2019).

    Averages the Gauss quadratures of ``num_probes`` Gaussian probes (``num_steps`` HVPs each), broadened by
    Gaussians of width ``sigma`` (default 1% of the spectral range). Returns ``(grid [grid_size],
    density [grid_size])`` float64; the grid extends 5 sigma past the extreme nodes so the density
    integrates to 1. Data, loss forms, parameters, weighting and graph caching as in :func:`hessian_eigs`.
    """
    torch = _torch()
    num_steps = check_int(num_steps, "num_steps", min=1)
    num_probes = check_int(num_probes, "num_probes", min=1)
    grid_size = check_int(grid_size, "grid_size", min=2)
    seed = check_seed(seed)
    op = TorchHessian(model, loss_fn, data, params=params, loss_form=loss_form, reduction=reduction,
                      batch_size=batch_size, cache_graphs=cache_graphs)
    gen = torch.Generator().manual_seed(seed % 2**63)
    nodes, weights = [], []
    with _progress_bar(progress_bar, "slq") as bar:
        op.bar = bar
        matvec = lambda x: op.matvec(x[None].astype(op.dtype))[0].astype(np.float64)  # noqa: E731
        for _ in range(num_probes):
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
