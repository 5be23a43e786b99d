"""Monte Carlo ensembles of deep MLPs at initialisation, streamed in batches with running moments, so any number of
networks needs the memory of one batch.

Two samplers of the network of :mod:`physai.theory.kernels` (equal hidden widths n, depth L):

- ``"weights"``: whole networks, every weight and bias drawn, batched over networks with ``numpy.matmul``; the
  neural tangent kernel of neuron 0 of every layer comes from one stacked backward pass.
- ``"metric"``: the same joint law of the preactivations (z^(1), ..., z^(L)) at n P^2 instead of n^2 P cost per
  layer. Given layer l, the rows of W S + b (S = sigma(z^(l)) [n, P]) are independent N(0, G) vectors with
  G = C_b + C_W S^T S / n (the stochastic metric), so z^(l+1) = F xi with F F^T = G and xi ~ N(0, 1) [P, n].
  No weights exist there, so it has no NTK.

Per network and layer it records, for inputs X [P, n_0]: the empirical kernel O^(l) = z^T z / n [P, P], the
stochastic metric G^(l) (its conditional mean), and (``"weights"``) the NTK H^(l)_ab of neuron 0,
sum over parameters theta of layers <= l of lambda_theta dz_0a/dtheta dz_0b/dtheta with lambda = lambda_b^(l) for
biases and lambda_W^(l) / n_(l-1) for weights (Roberts, Yaida, Hanin, ch. 8). :class:`RunningMoments` keeps the
mean and the second to fourth central moments over networks (merged batch by batch with the pairwise formulas of
Pébay 2008, Sandia report SAND2008-6212), which give standard errors of means, of variances and of normalised
variances, and the same per group of networks for jackknife standard errors.

Reproducibility: the draws of network i come from ``numpy.random.default_rng([seed, i // 64])`` in a fixed order,
every network's computation involves only its own draws (a singular metric is factored member by member), and the
accumulators merge those chunks in order, so a result is a pure function of the arguments other than ``batch`` and
``progress`` (same seed, same bits whatever the batch size).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from physai._checks import check_choice, check_dtype, check_float, check_int, check_seed
from physai._progress import progress as _progress
from physai.theory.gaussian import get_activation
from physai.theory.kernels import check_inputs, layer_values

METHODS = ("weights", "metric")
CHUNK = 64  # networks per random stream


class RunningMoments:
    """Streaming mean and central moments (orders 2–4) of a vector-valued statistic over samples, optionally also
    per group of samples, for delete-a-group jackknife standard errors (:meth:`jackknife`).

    ``update(batch)`` takes [B, *shape]; batches are merged exactly in float64 (Pébay 2008: Chan, Golub and
    LeVeque's pairwise update extended to M3 and M4), so the result does not depend on how samples are batched
    beyond rounding. With ``groups`` = G > 0, ``update(batch, group=g)`` also accumulates the batch into group g
    (0 <= g < G), whose moments are ``self.groups[g]``."""

    def __init__(self, shape, groups: int = 0):
        self.shape = tuple(shape)
        self.count = 0
        self.mean_ = np.zeros(self.shape)
        self.M2 = np.zeros(self.shape)
        self.M3 = np.zeros(self.shape)
        self.M4 = np.zeros(self.shape)
        self.groups = [RunningMoments(self.shape) for _ in range(check_int(groups, "groups", min=0))]

    def update(self, batch, group: int | None = None) -> None:
        batch = np.asarray(batch, dtype=float)
        if batch.shape[1:] != self.shape:
            raise ValueError(f"batch: expected shape (B, {', '.join(map(str, self.shape))}), got {batch.shape}")
        if group is not None:
            check_int(group, "group", min=0, max=len(self.groups) - 1)
        nb = batch.shape[0]
        if nb == 0:
            return
        mb = batch.mean(axis=0)
        d = batch - mb
        d2 = d * d
        self._combine(nb, mb, d2.sum(0), (d2 * d).sum(0), (d2 * d2).sum(0))
        if group is not None:
            self.groups[group].update(batch)

    def merge(self, other: "RunningMoments") -> None:
        """Add the samples summarised by ``other`` (same shape; its groups are not merged)."""
        if other.shape != self.shape:
            raise ValueError(f"other: expected moments of shape {self.shape}, got {other.shape}")
        if other.count:
            self._combine(other.count, other.mean_, other.M2, other.M3, other.M4)

    def _combine(self, nb, mb, M2b, M3b, M4b):
        na = self.count
        n = na + nb
        delta = mb - self.mean_
        self.M4 = (self.M4 + M4b + delta**4 * na * nb * (na**2 - na * nb + nb**2) / n**3
                   + 6 * delta**2 * (na**2 * M2b + nb**2 * self.M2) / n**2 + 4 * delta * (na * M3b - nb * self.M3) / n)
        self.M3 = (self.M3 + M3b + delta**3 * na * nb * (na - nb) / n**2 + 3 * delta * (na * M2b - nb * self.M2) / n)
        self.M2 = self.M2 + M2b + delta**2 * na * nb / n
        self.mean_ = self.mean_ + delta * nb / n
        self.count = n

    def jackknife(self, statistic) -> tuple[np.ndarray, np.ndarray]:
        """(statistic(self), its delete-a-group jackknife standard error) over the G >= 2 nonempty groups.

        ``statistic`` maps a :class:`RunningMoments` (of this shape) to an array or a tuple of arrays (e.g.
        ``lambda m: m.normalized_variance``); both results have its shape. With theta_g the statistic of all
        samples but group g's, the error is sqrt((G - 1)/G sum_g (theta_g - mean theta)^2) (Efron & Tibshirani 1993,
        *An Introduction to the Bootstrap*, ch. 11, with groups of about equal size in place of single samples).
        It needs no sample moments beyond those the statistic itself uses (the delta method's errors of a variance
        need fourth moments), and an estimate over its error is roughly Student-t with G - 1 degrees of freedom.
        Neither cures heavy tails: where the statistic's own sampling law is far from normal, both errors come out
        too small in most samples. ValueError with fewer than two nonempty groups, or when some samples went to no
        group."""
        parts = [g for g in self.groups if g.count]
        G = len(parts)
        if G < 2:
            raise ValueError(f"groups: the jackknife needs at least 2 nonempty groups, got {G}")
        if sum(g.count for g in parts) != self.count:
            raise ValueError(f"groups: {self.count - sum(g.count for g in parts)} samples were updated without a "
                             f"group; the jackknife needs every sample in one")
        # All G leave-one-out sets at once: each group's power sums about the pooled mean c, S_k = sum (x - c)^k
        # (binomial expansion of its central moments), summed over the others, then re-centred on their own mean.
        counts = np.array([g.count for g in parts], dtype=float).reshape(G, *(1,) * len(self.shape))
        d = np.stack([g.mean_ for g in parts]) - self.mean_
        M2, M3, M4 = (np.stack([getattr(g, name) for g in parts]) for name in ("M2", "M3", "M4"))
        S1, S2 = counts * d, M2 + counts * d**2
        S3 = M3 + 3 * d * M2 + counts * d**3
        S4 = M4 + 4 * d * M3 + 6 * d**2 * M2 + counts * d**4
        rest = self.count - counts
        L1, L2, L3, L4 = (S.sum(0) - S for S in (S1, S2, S3, S4))
        e = L1 / rest
        M2_rest = L2 - rest * e**2
        M3_rest = L3 - 3 * e * L2 + 2 * rest * e**3
        M4_rest = L4 - 4 * e * L3 + 6 * e**2 * L2 - 3 * rest * e**4
        values = []
        for g in range(G):
            leave_out = RunningMoments(self.shape)
            leave_out.count = self.count - parts[g].count  # the groups hold every sample (checked above)
            leave_out.mean_, leave_out.M2, leave_out.M3, leave_out.M4 = (
                self.mean_ + e[g], M2_rest[g], M3_rest[g], M4_rest[g])
            values.append(np.asarray(statistic(leave_out), dtype=float))
        values = np.array(values)
        spread = ((values - values.mean(0)) ** 2).sum(0)
        return np.asarray(statistic(self), dtype=float), np.sqrt((G - 1) / G * spread)

    @property
    def mean(self) -> np.ndarray:
        return self.mean_

    @property
    def variance(self) -> np.ndarray:
        """Unbiased sample variance M2 / (N - 1)."""
        return self.M2 / (self.count - 1)

    @property
    def sem(self) -> np.ndarray:
        """Standard error of the mean, sqrt(variance / N)."""
        return np.sqrt(self.variance / self.count)

    def _central(self):
        N = self.count
        return self.M2 / N, self.M3 / N, self.M4 / N

    @property
    def variance_sem(self) -> np.ndarray:
        """Standard error of the sample variance, sqrt((mu_4 - mu_2^2) / N) (large-N form)."""
        m2, _, m4 = self._central()
        return np.sqrt(np.maximum(m4 - m2**2, 0) / self.count)

    @property
    def normalized_variance(self) -> np.ndarray:
        """variance / mean^2."""
        return self.variance / self.mean_**2

    @property
    def normalized_variance_sem(self) -> np.ndarray:
        """Delta-method standard error of variance / mean^2 from the first four moments: with r = s^2 / m^2,
        Var r = [Var s^2 - 4 (s^2 / m) Cov(m, s^2) + 4 (s^2 / m)^2 Var m] / m^4, Cov(m, s^2) = mu_3 / N.
        It relies on the sample fourth moment, which heavy tails (deep, narrow networks: L/n ~ 0.5) make
        unreliable, mostly too small; use :meth:`jackknife` there."""
        m2, m3, m4 = self._central()
        N, m = self.count, self.mean_
        var = (m4 - m2**2 - 4 * (m2 / m) * m3 + 4 * (m2 / m) ** 2 * m2) / N
        return np.sqrt(np.maximum(var, 0)) / m**2


def bonferroni_bound(comparisons: int, alpha: float = 0.01, dof: int | None = None) -> float:
    """The |z| bound that ``comparisons`` z-scores (estimate - theory) / standard error stay under, all at once,
    with probability >= 1 - ``alpha`` when theory is right, whatever their correlations (Bonferroni: each
    two-sided at level alpha / comparisons). The z-scores are taken as standard normal, or Student-t with ``dof``
    degrees of freedom (a jackknife over G groups: G - 1). At alpha = 0.01, 10 comparisons: 3.29 (normal),
    3.88 (dof 19); 40: 3.66. Returns a float; ValueError naming a bad argument."""
    from scipy import stats

    comparisons = check_int(comparisons, "comparisons", min=1)
    alpha = check_float(alpha, "alpha", positive=True)
    if alpha >= 1:
        raise ValueError(f"alpha: expected a probability in (0, 1), got {alpha}")
    tail = alpha / (2 * comparisons)
    if dof is None:
        return float(stats.norm.isf(tail))
    return float(stats.t.isf(tail, check_int(dof, "dof", min=1)))


@dataclass
class MonteCarlo:
    """What :func:`sample_mlp` returns: running moments over ``networks`` networks of the per-layer statistics,
    each of shape [depth, P, P]: ``kernel`` (O^(l) = z^T z / n), ``metric`` (the stochastic metric G^(l)) and
    ``ntk`` (the NTK of neuron 0; None for the ``"metric"`` sampler); and ``susceptibilities`` [depth, 2, P]:
    per-network estimates of (chi_parallel, chi_perp) at each layer and input (means -> the susceptibilities at
    K^(l) as n -> infinity)."""

    networks: int
    width: int
    depth: int
    kernel: RunningMoments
    metric: RunningMoments
    susceptibilities: RunningMoments
    ntk: RunningMoments | None


def _draws_per_network(method, n0, n, depth, P):
    if method == "metric":
        return depth * n * P
    return n * n0 + n + (depth - 1) * (n * n + n)


def _fill(buffer, seed, first):
    """Draws of networks first .. first + len(buffer) - 1 (``first`` a multiple of CHUNK), each chunk of CHUNK
    rows from its own stream."""
    for start in range(0, buffer.shape[0], CHUNK):
        rng = np.random.default_rng([seed, (first + start) // CHUNK])
        rng.standard_normal(out=buffer[start:start + CHUNK], dtype=buffer.dtype)


def _metric_factor(G):
    """F with F F^T = G for a batch of PSD matrices [B, P, P]: Cholesky, and eigh for each member where Cholesky
    fails (a singular G: the same input twice, a layer of dead ReLUs). Member by member, so a member's factor, like
    its draws, does not depend on which other members share its batch."""
    try:
        return np.linalg.cholesky(G)
    except np.linalg.LinAlgError:
        out = np.empty_like(G)
        for i, g in enumerate(G):
            try:
                out[i] = np.linalg.cholesky(g)
            except np.linalg.LinAlgError:
                w, U = np.linalg.eigh(g)
                out[i] = U * np.sqrt(np.maximum(w, 0))
        return out


def _susceptibilities(z, G, act, C_W):
    """Per-network estimates of chi_parallel and chi_perp at one layer from z [B, P, n] and the diagonal of its
    metric G [B, P]: C_W/(2 G^2) mean_j sigma(z_j)^2 (z_j^2 - G) and C_W mean_j sigma'(z_j)^2, whose expectations
    given G are the susceptibilities at K = G. A network whose metric vanished (every ReLU of a layer off, odds
    ~2^-n) has z = 0 and contributes 0 to chi_parallel."""
    chi_par = np.divide(C_W * (act.fn(z) ** 2 * (z**2 - G[..., None])).mean(axis=-1), 2 * G**2,
                        out=np.zeros(G.shape), where=G > 0)
    chi_perp = C_W * (act.derivative(z) ** 2).mean(axis=-1)
    return np.stack([chi_par, chi_perp], axis=1)


def _batch_metric(X, act, noise, n, depth, C_b, C_W):
    B, P = noise.shape[0], X.shape[0]
    xi = noise.reshape(B, depth, P, n)
    O = np.empty((B, depth, P, P))
    G = np.empty_like(O)
    chi = np.empty((B, depth, 2, P))
    G[:, 0] = C_b + C_W * (X @ X.T) / X.shape[1]
    for layer in range(depth):
        if layer:
            S = act.fn(z)
            G[:, layer] = C_b + C_W * (S @ S.transpose(0, 2, 1)) / n
        z = _metric_factor(G[:, layer]) @ xi[:, layer]
        O[:, layer] = z @ z.transpose(0, 2, 1) / n
        chi[:, layer] = _susceptibilities(z, np.diagonal(G[:, layer], axis1=1, axis2=2), act, C_W)
    return O, G, chi


def _batch_weights(X, act, noise, n, depth, C_b, C_W, lb, lW, ntk):
    B, P, n0 = noise.shape[0], X.shape[0], X.shape[1]
    Ws, zs = [], []
    offset = 0
    O = np.empty((B, depth, P, P))
    G = np.empty_like(O)
    chi = np.empty((B, depth, 2, P))
    a = np.broadcast_to(X, (B, P, n0))
    fan_in = n0
    for layer in range(depth):
        W = noise[:, offset:offset + n * fan_in].reshape(B, n, fan_in) * np.sqrt(C_W / fan_in)
        b = noise[:, offset + n * fan_in:offset + n * fan_in + n] * np.sqrt(C_b)
        offset += n * fan_in + n
        G[:, layer] = C_b + C_W * (a @ a.transpose(0, 2, 1)) / fan_in
        z = a @ W.transpose(0, 2, 1) + b[:, None, :]
        O[:, layer] = z @ z.transpose(0, 2, 1) / n
        chi[:, layer] = _susceptibilities(z, np.diagonal(G[:, layer], axis1=1, axis2=2), act, C_W)
        Ws.append(W)
        zs.append(z)
        a = act.fn(z)
        fan_in = n
    if not ntk:
        return O, G, chi, None
    # Backward from neuron 0 of every layer at once: at layer l' the stack holds d z^(l)_0 / d z^(l') for
    # l = l'..L, [B, L - l' + 1, P, n]; layer l' parameters add (g g^T) (lambda_b + lambda_W a a^T / fan_in).
    H = np.zeros((B, depth, P, P))
    source = np.zeros((B, 1, P, n))
    source[..., 0] = 1.0
    g = source
    for layer in range(depth - 1, -1, -1):
        below = np.broadcast_to(X, (B, P, n0)) if layer == 0 else act.fn(zs[layer - 1])
        A = below @ below.transpose(0, 2, 1) / below.shape[-1]
        gram = np.einsum("bspk,bsqk->bspq", g, g)
        H[:, layer:] += gram * (lb[layer] + lW[layer] * A)[:, None]
        if layer:
            S = g.shape[1]
            g = (g.reshape(B, S * P, n) @ Ws[layer]).reshape(B, S, P, n) * act.derivative(zs[layer - 1])[:, None]
            g = np.concatenate([source, g], axis=1)
    return O, G, chi, H


def sample_mlp(X, activation="relu", depth: int = 10, width: int = 64, networks: int = 10_000, *, C_b: float = 0.0,
               C_W: float = 1.0, lambda_b=1.0, lambda_W=1.0, method: str = "weights", ntk: bool | None = None,
               batch: int = 512, groups: int = 20, seed: int = 0, dtype="float64",
               progress: bool = False) -> MonteCarlo:
    """Sample ``networks`` MLPs at initialisation and return running moments of their per-layer statistics.

    Parameters
    ----------
    X : inputs [P, n_0].
    activation : a name of :data:`physai.theory.ACTIVATIONS`, a vectorised callable or ``(sigma, sigma')``.
    depth, width : L >= 1 layers of n >= 1 neurons.
    networks : N >= 2 networks.
    C_b, C_W : initialisation variances (biases C_b, weights C_W / fan_in).
    lambda_b, lambda_W : learning-rate tensors of the NTK, scalars or one per layer.
    method : ``"weights"`` (whole networks; NTK available) or ``"metric"`` (preactivations drawn from the
        stochastic metric; same law, n/P times cheaper; no NTK). See the module docstring.
    ntk : whether to compute the NTK (``"weights"`` only; default: for ``"weights"``).
    batch : networks per vectorised step, rounded up to a multiple of 64 (memory ~ batch x (draws of one network
        + depth x P x n) x 8 bytes).
    groups : G >= 0 groups of consecutive networks (sizes within one of N / G; at most N / 2 groups), kept apart
        in every :class:`RunningMoments` for :meth:`RunningMoments.jackknife` standard errors.
    seed : the draws of network i depend only on (seed, i).
    dtype : float64 or float32 for the draws and the forward pass (statistics are accumulated in float64).
    progress : show a progress bar over batches.

    Returns a :class:`MonteCarlo`. Raises ValueError/TypeError naming a bad argument.
    """
    X = check_inputs(X)
    depth = check_int(depth, "depth", min=1)
    n = check_int(width, "width", min=1)
    networks = check_int(networks, "networks", min=2)
    C_b = check_float(C_b, "C_b", nonnegative=True)
    C_W = check_float(C_W, "C_W", positive=True)
    lb = layer_values(lambda_b, depth, "lambda_b")
    lW = layer_values(lambda_W, depth, "lambda_W")
    method = check_choice(method, "method", METHODS)
    ntk = method == "weights" if ntk is None else ntk
    if not isinstance(ntk, (bool, np.bool_)):
        raise TypeError(f"ntk: expected a bool, got {type(ntk).__name__}")
    if ntk and method == "metric":
        raise ValueError("ntk: the 'metric' sampler draws no weights, so it has no NTK; use method='weights'")
    batch = -(-check_int(batch, "batch", min=1) // CHUNK) * CHUNK
    groups = min(check_int(groups, "groups", min=0), networks // 2)
    # Network i belongs to group i G // N; group g starts at network ceil(g N / G).
    bounds = [-(-g * networks // groups) for g in range(groups + 1)]
    seed = check_seed(seed)
    dtype = check_dtype(dtype)
    act = get_activation(activation)
    P = X.shape[0]
    Xd = X.astype(dtype)
    shape = (depth, P, P)
    kernel, metric = RunningMoments(shape, groups), RunningMoments(shape, groups)
    susceptibility = RunningMoments((depth, 2, P), groups)
    ntk_moments = RunningMoments(shape, groups) if ntk else None
    draws = _draws_per_network(method, X.shape[1], n, depth, P)
    starts = range(0, networks, batch)
    for first in _progress(starts, total=len(starts), desc="networks", enabled=progress):
        noise = np.empty((min(batch, networks - first), draws), dtype=dtype)
        _fill(noise, seed, first)
        if method == "metric":
            O, G, chi = _batch_metric(Xd, act, noise, n, depth, C_b, C_W)
            H = None
        else:
            O, G, chi, H = _batch_weights(Xd, act, noise, n, depth, C_b, C_W, lb, lW, ntk)
        # Merged one random-stream chunk at a time, so the rounding of the accumulators, like the draws, does not
        # depend on the batch size.
        stats = [(kernel, O), (metric, G), (susceptibility, chi)] + ([(ntk_moments, H)] if ntk else [])
        for start in range(0, O.shape[0], CHUNK):
            part = slice(start, start + CHUNK)
            for moments, values in stats:
                moments.update(values[part])
            if groups:
                # The chunk's networks first + start + [0, len), split where groups begin.
                lo, hi = first + start, first + min(start + CHUNK, O.shape[0])
                for g in range(lo * groups // networks, (hi - 1) * groups // networks + 1):
                    piece = slice(max(lo, bounds[g]) - first, min(hi, bounds[g + 1]) - first)
                    for moments, values in stats:
                        moments.groups[g].update(values[piece])
    return MonteCarlo(networks, n, depth, kernel, metric, susceptibility, ntk_moments)
