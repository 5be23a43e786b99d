"""Empirical neural tangent kernel of any torch model (Jacot, Gabriel, Hongler 2018): the Gram matrix
Theta = J J^T of the Jacobian J = d f(X) / d theta [n k, P] of the outputs on n samples (k outputs each, rows
ordered sample-major, i k + output) with respect to the parameters, and an operator for its top eigenvalues that
never forms it.

Both run through ``torch.func`` (``jacrev``, ``vjp``, ``jvp``) over ``functional_call``, with the model in its
current mode and buffers copied (untouched), blocked over samples (see :func:`ntk_gram` for the cost and the
memory bound; in train mode a BatchNorm couples the samples of a block, so its NTK depends on the blocks: use eval
mode for the NTK). Random layers (dropout in train mode) draw from torch's generators seeded from ``(seed, block)``
on every pass, so J and the operator are those of one fixed draw of masks (torch's random state is restored after).
A model returning a tuple or dict is read through ``output_fn(outputs) -> tensor [b, ...]``. Under MSE,
0.5 * mean over n k entries, the Gauss-Newton part of the loss Hessian is J^T J / (n k), so its nonzero
eigenvalues are those of Theta / (n k): the top one is the lambda_0 of the catapult phase (Lewkowycz et al. 2020,
with their 1/n normalisation: Theta / n).
"""
from __future__ import annotations

import numpy as np

from physai._checks import check_int, check_seed
from physai.spectrum.eigensolvers import EigenResult, lanczos
from physai.spectrum.torch_model import (_batch_seed, _call, _Counted, _fixed_rng, _leading_extent, _progress_bar,
                                         _select)


def _torch():
    import torch

    return torch


def _map(f, inputs, torch):
    """``f`` applied to every tensor of a tensor / tuple / list / dict structure."""
    if isinstance(inputs, torch.Tensor):
        return f(inputs)
    if isinstance(inputs, dict):
        return {key: _map(f, value, torch) for key, value in inputs.items()}
    return type(inputs)(_map(f, value, torch) for value in inputs)


class _Network:
    """The model's outputs on a block of samples as a function of the chosen parameters, flattened [b k]."""

    def __init__(self, model, inputs, params, block_size: int, seed: int, output_fn):
        torch = _torch()
        if output_fn is not None and not callable(output_fn):
            raise TypeError(f"output_fn: expected a function outputs -> tensor, got {output_fn!r}")
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(inputs, (torch.Tensor, tuple, list, dict)):
            raise TypeError(f"inputs: expected a tensor, or a tuple or dict of tensors, got {type(inputs).__name__}")
        self.model, self.inputs, self.output_fn = model, inputs, output_fn
        self.block_size, self.seed = check_int(block_size, "block_size", min=1), check_seed(seed)
        self.n = _leading_extent(inputs, torch, "inputs")
        if self.n == 0:
            raise ValueError("inputs: expected at least one sample, got 0")
        names = _select(model, params, torch)
        named = dict(model.named_parameters())
        self.params = {name: named[name].detach() for name in names}
        self.fixed = {name: p.detach() for name, p in named.items() if name not in self.params}
        self.buffers = dict(model.named_buffers())
        dtypes = {p.dtype for p in self.params.values()}
        if len(dtypes) != 1 or next(iter(dtypes)) not in (torch.float32, torch.float64):
            raise TypeError(f"model: expected all parameters float32 or all float64, got {sorted(map(str, dtypes))}")
        self.torch_dtype = next(iter(dtypes))
        self.dtype = np.dtype(np.float32 if self.torch_dtype == torch.float32 else np.float64)
        self.device = next(iter(self.params.values())).device
        self.blocks = [slice(start, min(start + self.block_size, self.n))
                       for start in range(0, self.n, self.block_size)]
        # k from the first block as the solvers will run it: a single sample would fail under train-mode BatchNorm
        with torch.no_grad():
            out = self(self.params, 0)
        rows = self.blocks[0].stop
        if out.numel() % rows:
            raise ValueError(f"model: its outputs on {rows} samples have {out.numel()} entries, not a multiple of "
                             f"{rows}; the leading output dimension must be the sample (pass output_fn)")
        self.k = out.numel() // rows

    def rng(self, block: int):
        """The fixed random state block ``block`` runs under (a context manager)."""
        return _fixed_rng(_torch(), self.device, _batch_seed(self.seed, block))

    def __call__(self, params, block: int):
        """Outputs on the samples of block ``block`` (an index into ``blocks``), flattened [b k]."""
        with self.rng(block):
            return self.outputs(params, _map(lambda t: t[self.blocks[block]], self.inputs, _torch()))

    def outputs(self, params, inputs):
        torch = _torch()
        from torch.func import functional_call

        state = {**self.fixed, **params, **{name: b.clone() for name, b in self.buffers.items()}}
        out = _call(lambda *a, **kw: functional_call(self.model, state, a, kw), inputs)
        if self.output_fn is not None:
            out = self.output_fn(out)
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"model: returned a {type(out).__name__}, the NTK needs a tensor of outputs; pass "
                            f"output_fn(outputs) -> tensor [b, ...] to pick it")
        return out.reshape(-1)


def _jacobian(net, index: int, per_sample: bool):
    """J of block ``index`` [b k, P] (columns in the parameters' order)."""
    torch = _torch()
    from torch.func import jacrev, vmap

    rows = net.blocks[index]
    if per_sample:
        block = _map(lambda t: t[rows], net.inputs, torch)
        single = lambda params, x: net.outputs(params, _map(lambda t: t.unsqueeze(0), x, torch))  # noqa: E731
        with net.rng(index):
            J = vmap(jacrev(single), in_dims=(None, 0))(net.params, block)
    else:
        J = jacrev(net, argnums=0)(net.params, index)
    count = (rows.stop - rows.start) * net.k
    return torch.cat([J[name].reshape(count, -1) for name in net.params], dim=1)


def ntk_gram(model, inputs, *, params=None, per_sample: bool = False, block_size: int = 32,
             max_jacobian_bytes: int = 2**30, output_fn=None, seed: int = 0, progress_bar: bool | None = None):
    """The empirical NTK Theta = J J^T [n k, n k] on ``inputs`` (a tensor [n, ...], or a tuple or dict of tensors
    sharing the leading extent n, passed to the model as ``model(x)``, ``model(*x)`` or ``model(**x)``), in the
    parameters' dtype and device, with k the number of outputs per sample.

    params: the parameters to differentiate (a module, or parameters or names; default every trainable one).
    per_sample: the model maps each sample on its own (eval mode, no batch statistics), so each sample's Jacobian
    is taken alone, ``vmap`` over ``jacrev`` of a batch of one (the torch.func NTK recipe): ~n k single-sample
    backwards. Otherwise (the default, exact for any model on the block it sees) ``jacrev`` of a block of b samples
    is b k backward passes over the block, ~b^2 k sample-backwards per block and ~n b k for the Gram (against
    n^2 k for one ``jacrev`` over every sample). block_size: samples per Jacobian block. Each block's Jacobian
    [b k, P] is kept while all of J fits in ``max_jacobian_bytes``; beyond that only two blocks are held at a time
    and blocks are recomputed (time ~(n / b)^2 / 2 blocks). output_fn: maps the model's outputs (a tuple or dict,
    say) to the tensor [b, ...] whose entries are the NTK's outputs. seed: random layers of block i are seeded from
    ``(seed, i)`` (see the module docstring).
    Raises TypeError/ValueError naming a bad argument.
    """
    torch = _torch()
    if not isinstance(per_sample, bool):
        raise TypeError(f"per_sample: expected a bool, got {type(per_sample).__name__}")
    max_jacobian_bytes = check_int(max_jacobian_bytes, "max_jacobian_bytes", min=0)
    net = _Network(model, inputs, params, block_size, seed, output_fn)
    blocks = net.blocks
    k = net.k
    P = sum(p.numel() for p in net.params.values())
    keep = net.n * k * P * net.dtype.itemsize <= max_jacobian_bytes
    kept = {}

    def jacobian(index):
        if index in kept:
            return kept[index]
        J = _jacobian(net, index, per_sample)
        if keep:
            kept[index] = J
        bar.update()
        return J

    theta = torch.empty(net.n * k, net.n * k, dtype=net.torch_dtype, device=net.device)
    with _progress_bar(progress_bar, "NTK blocks") as bar:
        for i, rows_i in enumerate(blocks):
            J_i = jacobian(i)
            for j in range(i, len(blocks)):
                rows_j = blocks[j]
                block = J_i @ (J_i if j == i else jacobian(j)).T
                theta[rows_i.start * k:rows_i.stop * k, rows_j.start * k:rows_j.stop * k] = block
                theta[rows_j.start * k:rows_j.stop * k, rows_i.start * k:rows_i.stop * k] = block.T
    return theta.detach()


class TorchNTK:
    """The empirical NTK Theta = J J^T on ``inputs`` as an operator: ``shape`` (1, n k, n k), ``dtype``,
    ``matvec(V [1, n k]) -> [1, n k]`` (numpy, computed on the parameters' device), as J (J^T v): one ``vjp`` and
    one ``jvp`` per block of samples, never forming J or Theta. inputs, params, output_fn, seed: as in
    :func:`ntk_gram`. block_size: samples per pass (default 1024, larger than ntk_gram's 32: a pass holds one block's
    activations, not a Jacobian [b k, P]). Raises TypeError/ValueError naming a bad argument."""

    def __init__(self, model, inputs, *, params=None, block_size: int = 1024, output_fn=None, seed: int = 0):
        self.net = _Network(model, inputs, params, block_size, seed, output_fn)
        self.n = self.net.n * self.net.k
        self.shape = (1, self.n, self.n)
        self.dtype = self.net.dtype

    def matvec(self, V: np.ndarray) -> np.ndarray:
        """[1, n k] numpy -> [1, n k] numpy."""
        torch = _torch()
        from torch.func import jvp, vjp

        net = self.net
        v = torch.as_tensor(np.asarray(V)[0], dtype=net.torch_dtype, device=net.device)
        u = {name: torch.zeros_like(p) for name, p in net.params.items()}
        for index, rows in enumerate(net.blocks):
            _, pullback = vjp(lambda p: net(p, index), net.params)
            for name, g in pullback(v[rows.start * net.k:rows.stop * net.k])[0].items():
                u[name] += g
        out = torch.cat([jvp(lambda p: net(p, index), (net.params,), (u,))[1] for index in range(len(net.blocks))])
        return out.detach().cpu().numpy()[None]


def ntk_eigs(model, inputs, k: int = 1, *, params=None, tol: float = 1e-3, max_matvecs: int = 1000,
             block_size: int = 1024, output_fn=None, seed: int = 0, progress_bar: bool | None = None) -> EigenResult:
    """Top-k eigenpairs of the empirical NTK on ``inputs`` by certified Lanczos on :class:`TorchNTK` (two
    passes over the samples per matvec; Theta is never formed). tol: true relative residual, default 1e-3 as in
    :func:`physai.spectrum.hessian_eigs` (eigenvalues to ~1e-6 relative at a gap of their size); seed: the
    solver's start and the random layers' draws. Returns an ``EigenResult`` with values [1, k] and vectors
    [1, k, n k] (sample-major). Other arguments as in :class:`TorchNTK` and :func:`physai.spectrum.lanczos`."""
    op = TorchNTK(model, inputs, params=params, block_size=block_size, output_fn=output_fn, seed=seed)
    with _progress_bar(progress_bar, "NTK eigs") as bar:
        return lanczos(_Counted(op, bar), k=k, tol=tol, max_matvecs=max_matvecs, seed=seed)
