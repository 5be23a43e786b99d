"""Hessian spectra of any torch model's loss: top-k eigenpairs, trace, spectral density.

Data and weighting. ``data`` is one batch or an iterable of batches (a list, a DataLoader). With a loss
``loss_fn(outputs, targets)`` each batch is an ``(inputs, targets)`` pair, and the model is called as
``model(inputs)``, ``model(*inputs)`` for a tuple or list of inputs, or ``model(**inputs)`` for a dict; one such
pair may be passed alone when its targets are a tensor. With ``loss_form="model"`` the loss is
``loss_fn(model, batch)`` for any batch structure (LEGO's dict batches, say): ``model`` is then the model run on the
parameters being differentiated, to be called as usual; ``data`` must be an iterable of batches (a lone dict is one
batch; a tuple of tensors is refused as ambiguous, since a lone ``(X, Y)`` would read as two batches: pass
``[(X, Y)]``). A generator or other one-pass iterator is read once into a list (it could not be read again for the
next HVP). Each batch counts ``batch_size(batch)`` samples: by default the leading extent of the targets (or, with
``loss_form="model"``, of the first tensor in the batch, all tensors agreeing). With ``reduction="mean"`` (the
default) ``loss_fn`` returns a per-batch *mean* and the operator is the Hessian of the mean loss over every sample,
sum_b n_b H_b / sum_b n_b; with ``reduction="sum"`` it returns a per-batch *sum* and the operator is the Hessian
of the total, sum_b H_b. A torch loss module or ``functools.partial`` whose own ``reduction`` disagrees is refused,
and (for ``loss_form="outputs"``) so is a loss that behaves otherwise: it is evaluated once on the first batch's
outputs and on those outputs repeated twice, where a mean stays the same and a sum doubles.

HVPs are reverse-over-reverse: ``torch.autograd.grad`` of the loss's gradient (taken with ``create_graph``) through
``torch.func.functional_call`` over the parameters and a fresh copy of the buffers. (Forward-over-reverse fails in
torch 2.13 on ``mse_loss`` and measured 1.7x slower on a 64-256-10 MLP, n=2048.) For in-memory data (a list or
one batch) the graph of each batch's gradient is built once and each HVP is one double-backward pass over it, as
PyHessian does (``cache_graphs``); memory then holds every batch's graph (activations included), growing with the
data: for large data pass a DataLoader (re-iterated for each HVP, one batch's graph at a time). The operator must be
the same on every HVP, so a DataLoader with a shuffling sampler is refused unless its batches are cached.

Model mode: the model is used in whatever mode the caller put it in and is never switched. In train mode
BatchNorm uses batch statistics and dropout is active (the Hessian is then that of the stochastic, batch-dependent
loss; call ``model.eval()`` first for the deterministic network); buffers are copied for every evaluation, so the
module's running statistics are left exactly as they were. Random layers draw the same values on every HVP: batch i
runs with torch's generators seeded from ``(seed, i)`` (torch's own random state is restored afterwards), so the
Hessian is that of one fixed draw of dropout masks, a symmetric operator the solvers can certify.
"""
from __future__ import annotations

import contextlib
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


class _Counted:
    """An operator (``shape``, ``dtype``, ``matvec``) whose matvecs advance a progress bar ``bar``."""

    def __init__(self, op, bar):
        self.op, self.bar, self.shape, self.dtype = op, bar, op.shape, op.dtype

    def matvec(self, V):
        out = self.op.matvec(V)
        self.bar.update()
        return out


def _batch_seed(seed: int, index: int) -> int:
    """The torch seed of batch (or block) ``index``: fixed, so random layers draw alike on every pass."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1, np.uint64)[0] % 2**63)


@contextlib.contextmanager
def _fixed_rng(torch, device, seed: int):
    """Runs its body with torch's generators (CPU and ``device``'s) seeded by ``seed`` and restores them after, so
    dropout draws the same masks on every pass while the caller's random stream is left as it was."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        # only the generators fork_rng restores (torch.manual_seed would reseed every GPU)
        torch.random.default_generator.manual_seed(seed)
        if device.type == "cuda":
            with torch.cuda.device(device):
                torch.cuda.manual_seed(seed)
        yield


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
    """The batches of ``data``: a list when in memory (a one-pass iterator is read into one), else the iterable."""
    if isinstance(data, torch.Tensor):
        raise TypeError("data: expected (inputs, targets) tensors or an iterable of such batches, got one tensor")
    if loss_form == "outputs" and _is_pair(data, torch) or loss_form == "model" and isinstance(data, dict):
        return [data]
    if loss_form == "model" and isinstance(data, tuple) and data and all(isinstance(x, torch.Tensor) for x in data):
        raise ValueError(f"data: with loss_form='model', a tuple of {len(data)} tensors is ambiguous (one batch such "
                         f"as (X, Y), or {len(data)} batches); pass a list: [(X, Y)] for one batch")
    if isinstance(data, (tuple, list)):
        batches = list(data)
    elif hasattr(data, "__iter__") and iter(data) is data:  # a generator: the next HVP could not read it again
        batches = list(data)
    elif hasattr(data, "__iter__"):
        batches = data
    else:
        raise TypeError(f"data: expected a batch or an iterable of batches, got {type(data).__name__}")
    if hasattr(batches, "__len__") and len(batches) == 0:
        raise ValueError("data: expected at least one batch, got an empty dataset")
    return batches


def _shuffles(data) -> bool:
    """Whether ``data`` is a DataLoader whose sampler draws a new order on every pass."""
    from torch.utils.data import RandomSampler, SubsetRandomSampler, WeightedRandomSampler

    return isinstance(getattr(data, "sampler", None), (RandomSampler, SubsetRandomSampler, WeightedRandomSampler))


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
    cache_graphs: keep each batch's gradient graph between HVPs (default: True when data is in memory, a list,
    a single batch or a generator read into a list; False for any other iterable, which is re-iterated for every
    HVP and must then not shuffle). seed: random layers of batch i draw from torch's generators seeded from
    ``(seed, i)`` on every HVP (see the module docstring).

    shape: (1, P, P) with P the number of chosen parameters, ``dtype`` their dtype (float32/float64, all alike),
    ``matvec(V [1, P]) -> [1, P]``, ``hvp(v [P] tensor) -> [P]``; vectors are flat in ``named_parameters`` order.
    ``names`` lists the chosen parameters, ``hvps`` counts the full-data HVPs done. Raises TypeError/ValueError
    naming the argument for a bad model, loss, data, reduction or batch.
    """

    def __init__(self, model, loss_fn, data, *, params=None, loss_form: str = "outputs", reduction: str = "mean",
                 batch_size=None, cache_graphs: bool | None = None, seed: int = 0):
        torch = _torch()
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
        if not callable(loss_fn):
            raise TypeError(f"loss_fn: expected a callable loss, got {loss_fn!r}")
        self.loss_form = check_choice(loss_form, "loss_form", LOSS_FORMS)
        self.reduction = check_choice(reduction, "reduction", REDUCTIONS)
        self.seed = check_seed(seed)
        declared = _declared_reduction(loss_fn)
        if declared is not None and declared not in REDUCTIONS:
            raise ValueError(f"loss_fn: reduces by {declared!r}, but a scalar loss is needed; use a loss with "
                             f"reduction='mean' (or 'sum', passing reduction='sum')")
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
        elif not self.cache_graphs and _shuffles(self.batches):
            raise ValueError("data: the DataLoader shuffles, so every HVP would see other batches (the operator must "
                             "be the same on every matvec); use shuffle=False, or cache_graphs=True to fix one pass")
        self._graphs = None
        self.hvps = 0
        if self.loss_form == "outputs":
            self._check_loss()

    def _run(self, params, *args, **kwargs):
        """``model(*args, **kwargs)`` at ``params`` (the chosen parameters; the rest fixed) with fresh copies of the
        buffers, since BatchNorm in train mode updates its running statistics in place."""
        from torch.func import functional_call

        state = {**self.fixed, **params, **{name: b.clone() for name, b in self.buffers.items()}}
        return functional_call(self.model, state, args, kwargs)

    def _forward(self, params, inputs):
        """The model's outputs on the inputs of an (inputs, targets) batch, at ``params``."""
        return _call(functools.partial(self._run, params), inputs)

    def _check_loss(self):
        """Evaluates loss_fn on the first batch's outputs, alone and repeated twice: it must return a scalar, and a
        mean stays the same where a sum doubles, which must agree with ``reduction``."""
        torch = _torch()
        batch = self.batches[0] if isinstance(self.batches, list) else next(iter(self.batches), None)
        if batch is None:
            raise ValueError("data: expected at least one batch, got an empty dataset")
        inputs, targets = self._pair(batch)
        with torch.no_grad(), _fixed_rng(torch, self.device, _batch_seed(self.seed, 0)):
            outputs = self._forward(self.params, inputs)
            try:
                once = self.loss_fn(outputs, targets)
                twice = None
                if isinstance(outputs, torch.Tensor) and outputs.dim() > 0 and outputs.shape[0] == targets.shape[0]:
                    twice = self.loss_fn(torch.cat([outputs, outputs]), torch.cat([targets, targets]))
            except TypeError as error:
                raise TypeError(f"loss_fn: loss_fn(outputs, targets) failed ({error}); a loss written as "
                                f"loss_fn(model, batch) needs loss_form='model'") from error
        if not isinstance(once, torch.Tensor) or once.numel() != 1:
            raise ValueError(f"loss_fn: expected a scalar loss, got "
                             f"{tuple(once.shape) if isinstance(once, torch.Tensor) else type(once).__name__}; "
                             f"reduce it by a mean (or a sum, with reduction='sum')")
        if twice is None or not torch.isfinite(once) or float(once) == 0:
            return
        ratio = float(twice) / float(once)
        if self.reduction == "mean" and abs(ratio - 2) < 0.25:
            raise ValueError("reduction: loss_fn sums over the batch (doubling the batch doubles it); pass "
                             "reduction='sum', or make it a mean")
        if self.reduction == "sum" and abs(ratio - 1) < 0.25:
            raise ValueError("reduction: loss_fn averages over the batch (doubling the batch leaves it as it is); "
                             "pass reduction='mean', or make it a sum")

    def _pair(self, batch):
        """The (inputs, targets) of a batch of the "outputs" form."""
        if not _is_pair(batch, _torch()):
            raise ValueError(f"data: each batch must be an (inputs, targets) pair with targets a tensor, got a "
                             f"{type(batch).__name__}" + (f" of {len(batch)}" if isinstance(batch, (tuple, list))
                                                          else "") + " (use loss_form='model' for other batches)")
        return batch

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
        if self.loss_form == "model":
            return lambda params: self.loss_fn(functools.partial(self._run, params), batch)
        inputs, targets = self._pair(batch)
        return lambda params: self.loss_fn(self._forward(params, inputs), targets)

    def _gradient_graph(self, index, batch, retain: bool = True):
        """The HVP of batch ``index``'s loss: a function of the tangents (one per chosen parameter, in ``names``
        order) returning H v as one tensor per parameter. Its gradient is taken once with its graph
        (create_graph), random draws seeded from the index, and each call is one backward pass over that graph,
        kept for the next call when ``retain``. torch.autograd, not torch.func's vjp of grad: the same passes,
        without the transform wrappers, measured 1.03-1.25x faster per HVP on a small CNN with BatchNorm and
        1.11-1.14x on a 64-256-10 MLP."""
        torch = _torch()
        leaves = [p.detach().requires_grad_() for p in self.params.values()]
        # a caller's no_grad or inference_mode would leave the loss without a graph: a Hessian of zeros
        with torch.inference_mode(False), torch.enable_grad(), _fixed_rng(torch, self.device,
                                                                           _batch_seed(self.seed, index)):
            loss = self._loss(batch)(dict(zip(self.names, leaves)))
            grads = (torch.autograd.grad(loss, leaves, create_graph=True, allow_unused=True, materialize_grads=True)
                     if loss.requires_grad else ())
        # a gradient without a graph (a loss linear in those parameters, or none using them) adds nothing to H v
        linked = [i for i, g in enumerate(grads) if g.requires_grad]

        def apply(tangents):
            if not linked:
                return [torch.zeros_like(p) for p in leaves]
            with torch.inference_mode(False), torch.enable_grad():
                return torch.autograd.grad([grads[i] for i in linked], leaves, [tangents[i] for i in linked],
                                           retain_graph=retain, allow_unused=True, materialize_grads=True)

        return apply

    def hvp(self, v):
        """Hessian-vector product of a flat torch vector [P] in the parameters' dtype and device; returns [P]."""
        torch = _torch()
        tangents = [chunk.view_as(p) for chunk, p in zip(v.split(self.sizes), self.params.values())]
        total, count = torch.zeros_like(v), 0.0
        if self.cache_graphs and self._graphs is None:
            self._graphs = [(self._gradient_graph(i, batch), self._weight(batch))
                            for i, batch in enumerate(self.batches)]
        pairs = self._graphs if self.cache_graphs else (
            (self._gradient_graph(i, batch, retain=False), self._weight(batch))
            for i, batch in enumerate(self.batches))
        for apply, weight in pairs:
            total += weight * torch.cat([h.reshape(-1) for h in apply(tangents)])
            count += weight
        if count == 0:
            raise ValueError("data: expected at least one sample, got an empty dataset")
        self.hvps += 1
        return total / count if self.reduction == "mean" else total

    def matvec(self, V: np.ndarray) -> np.ndarray:
        """[1, P] numpy -> [1, P] numpy."""
        torch = _torch()
        v = torch.as_tensor(np.asarray(V)[0], device=self.device, dtype=self.torch_dtype)
        return self.hvp(v).detach().cpu().numpy()[None]


def _fused_operator(model, loss_fn, data, params, options: dict):
    """The operator of a model offering the fused-Hessian protocol ``hessian_operator(inputs, targets, loss)``
    (e.g. physai's TwoLayerModule), for a loss given by name. ``options``: the TorchHessian options the caller
    passed, which the fused Hessian cannot honour unless at their defaults (it is the full-batch mean's)."""
    torch = _torch()
    factory = getattr(model, "hessian_operator", None)
    if not callable(factory):
        raise TypeError(f"loss_fn: expected a callable loss, got {loss_fn!r}; a loss name is for models offering "
                        f"hessian_operator(inputs, targets, loss), {type(model).__name__} does not")
    if params is not None:
        raise ValueError("params: a fused Hessian is over all of the model's parameters; use a callable loss_fn for "
                         "a subset")
    defaults = {"loss_form": "outputs", "reduction": "mean", "batch_size": None, "cache_graphs": None}
    for name, value in options.items():
        if value != defaults[name]:
            raise ValueError(f"{name}: the fused Hessian of loss {loss_fn!r} is that of the mean loss over one full "
                             f"batch and takes no {name} (got {value!r}); use a callable loss_fn for it"
                             + (" (for the sum, multiply the eigenvalues by the number of samples)"
                                if name == "reduction" else ""))
    if not _is_pair(data, torch):
        raise ValueError("data: the fused Hessian takes the full batch as one (inputs, targets) pair")
    return factory(data[0], data[1], loss_fn)


def hessian_operator(model, loss_fn, data, *, params=None, loss_form: str = "outputs", reduction: str = "mean",
                     batch_size=None, cache_graphs: bool | None = None, seed: int = 0):
    """The loss Hessian as an operator (``shape``, ``dtype``, ``matvec``): a :class:`TorchHessian`, or for a
    ``loss_fn`` given by name, the fused operator of a model offering ``hessian_operator(inputs, targets, loss)``
    (physai's ``TwoLayerModule``: one row per ensemble member; loss_form, reduction, batch_size and cache_graphs
    must then stay at their defaults, or ValueError)."""
    if isinstance(loss_fn, str):
        return _fused_operator(model, loss_fn, data, params, {"loss_form": loss_form, "reduction": reduction,
                                                               "batch_size": batch_size, "cache_graphs": cache_graphs})
    return TorchHessian(model, loss_fn, data, params=params, loss_form=loss_form, reduction=reduction,
                        batch_size=batch_size, cache_graphs=cache_graphs, seed=seed)


def hessian_eigs(model, loss_fn, data, k: int = 1, *, which: str = "LA", method: str = "lanczos", tol: float = 1e-3,
                 max_matvecs: int = 1000, params=None, loss_form: str = "outputs", reduction: str = "mean",
                 batch_size=None, cache_graphs: bool | None = None, v0=None, seed: int = 0,
                 progress_bar: bool | None = None) -> EigenResult:
    """k Hessian eigenpairs of a torch model's loss over ``data`` (see the module docstring for data, loss forms
    and batch weighting).

    which: "LA" (largest, the sharpness first), "SA" (most negative first), "LM" or "BE" (both ends), as in
    :func:`physai.spectrum.lanczos`, which certifies repeated eigenvalues (k copies of a Kronecker-structured
    last-layer Hessian are all found). method: "lanczos" or "power" (k=1, which "LA" or "LM" only; power
    iteration finds the largest magnitude, and for "LA" reruns on a shifted operator when that is negative, see
    :func:`physai.spectrum.power_iteration`; slower, kept for comparison with PyHessian). tol: true relative
    residual, as in :func:`physai.spectrum.lanczos`; the default 1e-3 gives eigenvalues to ~1e-6 relative at a
    spectral gap of the eigenvalue's size (Kato-Temple: error <= (tol lambda)^2 / gap), in ~20-40 HVPs on the
    models of tests/test_spectrum_torch.py, where power iteration to the same residual needs hundreds. params:
    differentiate only these (a module, or parameters or names); the rest are held fixed. cache_graphs and seed
    (also the solver's start): as in :class:`TorchHessian`.
    progress_bar: None shows a bar of HVPs on a terminal for runs longer than 2 s.

    For a model offering ``hessian_operator(inputs, targets, loss)`` (physai's ``TwoLayerModule``) and ``loss_fn``
    naming one of its fused losses ("mse", "logistic", "cross_entropy"), the fused native HVP serves the solver
    (``data``: one full-batch pair; one row per ensemble member; loss_form, reduction, batch_size, cache_graphs at
    their defaults). Its "mse" is 0.5 * the mean of squared errors over the n k outputs, half of
    ``torch.nn.functional.mse_loss``: its Hessian (and eigenvalues) are half of that loss's.

    Returns an :class:`EigenResult`: values [1, k], vectors [1, k, P] flattened over the chosen parameters in
    ``named_parameters`` order, HVPs in ``matvecs``. Raises TypeError/ValueError naming the argument.
    """
    method = check_choice(method, "method", ("lanczos", "power"))
    which = check_choice(which, "which", WHICH)
    op = hessian_operator(model, loss_fn, data, params=params, loss_form=loss_form, reduction=reduction,
                          batch_size=batch_size, cache_graphs=cache_graphs, seed=seed)
    k = check_int(k, "k", min=1)
    if k > op.shape[-1]:
        raise ValueError(f"k: expected at most the number of parameters differentiated ({op.shape[-1]}), got {k}")
    if method == "power" and k != 1:
        raise ValueError(f"k: power iteration finds one eigenpair, got k={k}; use method='lanczos'")
    if method == "power" and which not in ("LA", "LM"):
        raise ValueError(f"which: power iteration finds the largest eigenvalue ('LA') or the largest in magnitude "
                         f"('LM'), got which={which!r}; use method='lanczos'")
    with _progress_bar(progress_bar, "Hessian eigs") as bar:
        counted = _Counted(op, bar)
        if method == "power":
            return power_iteration(counted, tol=tol, max_matvecs=max_matvecs, v0=v0, seed=seed, which=which)
        return lanczos(counted, k=k, which=which, tol=tol, max_matvecs=max_matvecs, v0=v0, seed=seed)


def _refuse_loss_name(loss_fn, tool: str):
    if isinstance(loss_fn, str):
        raise TypeError(f"loss_fn: {tool} takes a callable loss, got the name {loss_fn!r} (loss names select a "
                        f"model's fused Hessian, which only hessian_eigs uses); pass e.g. a torch loss function")


def _probe(torch, n: int, generator, dtype, device):
    return (torch.randint(0, 2, (n,), generator=generator).to(dtype) * 2 - 1).to(device)


def hessian_trace(model, loss_fn, data, method: str = "hutchinson", num_samples: int = 100, seed: int = 0, *,
                  params=None, loss_form: str = "outputs", reduction: str = "mean", batch_size=None,
                  cache_graphs: bool | None = None, progress_bar: bool | None = None) -> tuple[float, float]:
    """Stochastic estimate of the Hessian trace: returns ``(estimate, standard_error)``.

    method: "hutchinson" (Rademacher probes, num_samples HVPs; Hutchinson 1990) or "hutch++" (Meyer et al. 2021:
    a third of the HVPs build a low-rank sketch whose trace is exact, the rest estimate the remainder's trace).
    Data, loss forms, parameters, weighting, graph caching and seeding as in :func:`hessian_eigs`; ``loss_fn`` must
    be callable (the fused losses named by a string serve :func:`hessian_eigs` only). Raises TypeError/ValueError
    naming the argument.
    """
    torch = _torch()
    _refuse_loss_name(loss_fn, "hessian_trace")
    method = check_choice(method, "method", ("hutchinson", "hutch++"))
    num_samples = check_int(num_samples, "num_samples", min=2 if method == "hutchinson" else 6)
    seed = check_seed(seed)
    op = TorchHessian(model, loss_fn, data, params=params, loss_form=loss_form, reduction=reduction,
                      batch_size=batch_size, cache_graphs=cache_graphs, seed=seed)
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
    integrates to 1. Data, loss forms, parameters, weighting, graph caching and seeding as in :func:`hessian_eigs`
    (``loss_fn`` callable, as in :func:`hessian_trace`). Raises TypeError/ValueError naming the argument.
    """
    torch = _torch()
    _refuse_loss_name(loss_fn, "hessian_density")
    num_steps = check_int(num_steps, "num_steps", min=1)
    num_probes = check_int(num_probes, "num_probes", min=1)
    grid_size = check_int(grid_size, "grid_size", min=2)
    seed = check_seed(seed)
    op = TorchHessian(model, loss_fn, data, params=params, loss_form=loss_form, reduction=reduction,
                      batch_size=batch_size, cache_graphs=cache_graphs, seed=seed)
    gen = torch.Generator().manual_seed(seed % 2**63)
    nodes, weights = [], []
    with _progress_bar(progress_bar, "slq") as bar:
        counted = _Counted(op, bar)
        matvec = lambda x: counted.matvec(x[None].astype(op.dtype))[0].astype(np.float64)  # noqa: E731
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
