"""``TwoLayer``: an ensemble of two-layer networks with numpy parameters and fused native kernels."""
from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from physai import _core
from physai._checks import (MAX_INT64, as_array, check_array, check_choice, check_dtype, check_float, check_int, check_seed,
                            check_v0)
from physai._records import ArrayRecord
from physai.twolayer.params import ACTIVATIONS, PARAMETERIZATIONS, activation_code, loss_code, scaling


@dataclass
class Trajectory(ArrayRecord):
    """What ``TwoLayer.train`` returns: losses [steps, E]; sharpness [T, E] at sharpness_steps [T] with the
    Hessian-vector products each estimate took, matvecs [T, E] (T = 0 when not tracked)."""

    losses: np.ndarray
    sharpness: np.ndarray
    sharpness_steps: np.ndarray
    matvecs: np.ndarray

    @property
    def diverged(self) -> np.ndarray:
        """[E] bool: members whose loss was not finite at some step of the run (in a learning-rate sweep, typically
        the rates beyond the edge of stability). Losses are recorded before each update, so a member that breaks
        on the very last update shows only in its parameters."""
        return ~np.isfinite(self.losses).all(axis=0)


class HessianOperator:
    """Each member's loss Hessian at fixed parameters: ``shape`` (E, P, P), ``dtype``, ``matvec(V [E, P])``.

    A zero row of V costs nothing (its product is zero), so a batched eigensolver pays only for its unconverged
    members."""

    def __init__(self, native, shape, dtype):
        self.native, self.shape, self.dtype = native, shape, dtype

    def matvec(self, V: np.ndarray) -> np.ndarray:
        """V [E, P] (the operator's dtype) -> each member's Hessian applied to its row, [E, P]."""
        V = check_array(np.ascontiguousarray(V, dtype=self.dtype), "V", shape=self.shape[:2])
        return self.native.matvec(V)


class TwoLayer:
    """E independent two-layer networks ``f(x) = output_scale * a . sigma(input_scale * W x + b)``.

    Parameters
    ----------
    d, m, k : input dimension, width, outputs.
    activation : one of ``relu, tanh, gelu, erf, quadratic, linear, softplus``.
    param : ``standard``, ``ntk``, ``mean-field`` or ``mup`` (see ``physai.twolayer.params`` for the formulas of
        init, multipliers and per-layer learning rates).
    bias : whether the hidden layer has a bias (initialised to 0).
    ensemble : number of members E.
    dtype : float32 or float64.
    seed : member e is initialised from ``numpy.random.default_rng([seed, e])``, so it does not depend on E.
    same_init : every member starts from member 0's initialisation (what a learning-rate sweep compares).

    Attributes
    ----------
    W [E, m, d], b [E, m] (or None), a [E, k, m] : numpy arrays of ``dtype``, C-contiguous, owned by the model;
        assign new arrays of the same shape and dtype to set them (checked on assignment: a wrong shape, dtype or
        layout raises there, not at the next kernel call).
    scaling : the parameterization evaluated at (d, m).
    init_index [E] int64 : the index whose stream initialised each member (e, or 0 under ``same_init``; e for
        ``from_arrays``). ``train`` keys member e's sharpness-solver start by it, so a member gives the same values
        alone (``TwoLayer(..., seed=seed)`` with one member) as in any ensemble. Pickled and saved with the model.

    Arrays passed to methods: X [n, d] (shared by the members) or [E, n, d]; Y [n, k] or [E, n, k] (a 1-D Y [n] is
    one column). They are converted as numpy converts arrays: any real dtype is cast to the model's and a C-contiguous
    copy is made where the array is not one already (no copy otherwise); complex or object arrays raise TypeError.
    Models pickle, deep-copy and ``save``/``load`` (``.npz``). Losses: ``mse`` (0.5 mean of squared errors over n k entries), ``logistic`` (labels +-1, mean over n k),
    ``cross_entropy`` (Y rows are class distributions, mean over n).
    """

    def __init__(self, d: int, m: int, k: int = 1, activation: str = "relu", param: str = "standard",
                 bias: bool = True, ensemble: int = 1, dtype=np.float32, seed: int = 0, same_init: bool = False):
        self._configure(d, m, k, activation, param, bias, ensemble, dtype)
        seed = check_seed(seed)
        if not isinstance(same_init, (bool, np.bool_)):
            raise TypeError(f"same_init: expected a bool, got {type(same_init).__name__}")
        W, a = [], []
        for e in [0] * self.ensemble if same_init else range(self.ensemble):
            rng = np.random.default_rng([seed, e])
            W.append(rng.standard_normal((self.m, self.d)) * self.scaling.std_W)
            a.append(rng.standard_normal((self.k, self.m)) * self.scaling.std_a)
        self.W = np.ascontiguousarray(W, dtype=self.dtype)
        self.a = np.ascontiguousarray(a, dtype=self.dtype)
        self.b = np.zeros((self.ensemble, self.m), dtype=self.dtype) if self._bias else None
        self.init_index = np.zeros(self.ensemble, np.int64) if same_init else np.arange(self.ensemble, dtype=np.int64)

    def _configure(self, d, m, k, activation, param, bias, ensemble, dtype) -> None:
        """Checked sizes, names and dtype, and the parameterization's scaling (no parameters)."""
        self.d = check_int(d, "d", min=1)
        self.m = check_int(m, "m", min=1)
        self.k = check_int(k, "k", min=1)
        self.activation = check_choice(activation, "activation", ACTIVATIONS)
        self.param = check_choice(param, "param", PARAMETERIZATIONS)
        self.ensemble = check_int(ensemble, "ensemble", min=1)
        self.dtype = check_dtype(dtype)
        if not isinstance(bias, (bool, np.bool_)):
            raise TypeError(f"bias: expected a bool, got {type(bias).__name__}")
        self._bias = bool(bias)
        self.scaling = scaling(self.param, self.d, self.m)
        self._config = _core.twolayer.Config(self.scaling.input_scale, self.scaling.output_scale,
                                             activation_code(self.activation))

    # -- copies and files: the kernel configuration is rebuilt from the names, never pickled ---------------------
    def __getstate__(self) -> dict:
        return {name: value for name, value in self.__dict__.items() if name != "_config"}

    def __setstate__(self, state: dict) -> None:
        self._configure(state["d"], state["m"], state["k"], state["activation"], state["param"], state["_bias"],
                        state["ensemble"], state["dtype"])
        # a pickle from before init_index existed: members keyed by position, as they were then
        self.init_index = np.arange(state["ensemble"], dtype=np.int64)
        self.__dict__.update(state)

    def save(self, path) -> None:
        """Write the parameters (bit for bit), ``init_index`` and the activation and parameterization to ``path``, a
        ``.npz``."""
        biases = {} if self.b is None else {"b": self.b}
        header = json.dumps({"activation": self.activation, "param": self.param})
        np.savez(path, W=self.W, a=self.a, **biases, init_index=self.init_index, __header__=header)

    @classmethod
    def load(cls, path) -> "TwoLayer":
        """The model ``save`` wrote to ``path``."""
        with np.load(path, allow_pickle=False) as data:
            b = data["b"] if "b" in data.files else None
            model = cls.from_arrays(data["W"], b, data["a"], **json.loads(str(data["__header__"])))
            if "init_index" in data.files:  # files written before init_index existed keep from_arrays' e
                model.init_index = np.array(data["init_index"], dtype=np.int64)
            return model

    @classmethod
    def from_arrays(cls, W: np.ndarray, b: np.ndarray | None, a: np.ndarray, activation: str = "relu",
                    param: str = "standard") -> "TwoLayer":
        """A model around existing parameter arrays (shared, not copied): W [E, m, d], b [E, m] or None,
        a [E, k, m], all float32 or all float64 and C-contiguous."""
        check_array(W, "W", ndim=3)
        E, m, d = W.shape
        check_array(a, "a", dtype=W.dtype, ndim=3)
        model = cls.__new__(cls)
        model._configure(d, m, a.shape[1], activation, param, b is not None, E, W.dtype)
        model.W, model.b, model.a = W, b, a
        model.init_index = np.arange(E, dtype=np.int64)
        return model

    # -- parameters: checked when assigned, so kernel calls need not check them again ----------------------------
    @property
    def W(self) -> np.ndarray:
        """Input weights [E, m, d]."""
        return self._W

    @W.setter
    def W(self, value: np.ndarray) -> None:
        self._W = check_array(value, "W", dtype=self.dtype, shape=(self.ensemble, self.m, self.d))

    @property
    def b(self) -> np.ndarray | None:
        """Hidden biases [E, m], or None for a model without bias."""
        return self._b

    @b.setter
    def b(self, value: np.ndarray | None) -> None:
        if (value is None) == self._bias:
            raise ValueError(f"b: the model was built with bias={self._bias}, got {type(value).__name__}")
        self._b = value if value is None else check_array(value, "b", dtype=self.dtype, shape=(self.ensemble, self.m))

    @property
    def a(self) -> np.ndarray:
        """Output weights [E, k, m]."""
        return self._a

    @a.setter
    def a(self, value: np.ndarray) -> None:
        self._a = check_array(value, "a", dtype=self.dtype, shape=(self.ensemble, self.k, self.m))

    # -- plumbing -----------------------------------------------------------------------------------------------
    def _native(self, name: str):
        return getattr(_core.twolayer, name)

    @property
    def config(self):
        """The kernel configuration (scales and activation code) passed to ``physai._core.twolayer``."""
        return self._config

    @property
    def num_params(self) -> int:
        """Parameters per member P = m d + m (with bias) + k m, in the flattened order [W, b, a]."""
        return self.m * self.d + (self.m if self.b is not None else 0) + self.k * self.m

    def _check_data(self, x, name: str, *shape) -> np.ndarray:
        """x converted to the model's dtype (see the class docstring), shaped ``shape`` (shared by the members) or
        [E, *shape] (one slice per member)."""
        x = as_array(x, name, self.dtype)
        per_member = (self.ensemble,) if x.ndim == len(shape) + 1 else ()
        return check_array(x, name, shape=per_member + shape)

    def _check_X(self, X) -> np.ndarray:
        return self._check_data(X, "X", None, self.d)

    def _check_XY(self, X, Y, loss) -> tuple[np.ndarray, np.ndarray, int]:
        X = self._check_X(X)
        Y = as_array(Y, "Y", self.dtype)
        Y = self._check_data(Y[:, None] if Y.ndim == 1 else Y, "Y", X.shape[-2], self.k)
        code = loss_code(loss)
        # 0/1 labels would run silently as a different loss: the logistic loss is log(1 + exp(-y f)), y = +-1
        if loss == "logistic" and not ((Y == 1) | (Y == -1)).all():
            raise ValueError("Y: the logistic loss takes labels -1 or +1 (map 0/1 labels with 2 Y - 1)")
        return X, Y, code

    # -- kernels ------------------------------------------------------------------------------------------------
    def forward(self, X: np.ndarray) -> np.ndarray:
        """Outputs F [E, n, k]."""
        return self._native("forward")(self._check_X(X), self.W, self.b, self.a, self.config)

    __call__ = forward

    def loss_and_grad(self, X: np.ndarray, Y: np.ndarray, loss: str = "mse"):
        """Per-member loss [E] and gradients ``(dW [E,m,d], db [E,m] or None, da [E,k,m])``, one fused pass."""
        X, Y, code = self._check_XY(X, Y, loss)
        value, dW, db, da = self._native("loss_and_grad")(X, Y, self.W, self.b, self.a, self.config, code)
        return value, (dW, db, da)

    def hessian_operator(self, X: np.ndarray, Y: np.ndarray, loss: str = "mse") -> "HessianOperator":
        """The Hessian of each member's loss at the current parameters, as an operator (``shape`` (E, P, P),
        ``dtype``, ``matvec(V [E, P]) -> [E, P]``, vectors flattened as [W, b, a], see ``flatten``) that
        ``physai.spectrum.lanczos`` and friends accept. Building it caches the activations and their derivatives, so
        each matvec costs about one gradient. It keeps references to X, Y and the parameter arrays; changing them in
        place afterwards changes what it computes."""
        X, Y, code = self._check_XY(X, Y, loss)
        native = self._native("hessian_operator")(X, Y, self.W, self.b, self.a, self.config, code)
        return HessianOperator(native, (self.ensemble, self.num_params, self.num_params), self.dtype)

    def sharpness(self, X: np.ndarray, Y: np.ndarray, k: int = 1, method: str = "lanczos", loss: str = "mse",
                  tol: float = 1e-6, max_matvecs: int = 1000, which: str = "LA", v0=None, seed: int = 0):
        """Top-k eigenpairs of each member's loss Hessian (the sharpness is ``values[:, 0]``). With which "LA"/"LM"
        they are computed natively by Lanczos (``method="lanczos"``) or power iteration (``"power"``, k = 1, largest
        magnitude; for "LA" a member whose dominant eigenvalue is negative is solved again on a shifted operator by
        ``physai.spectrum.largest_algebraic_by_power``) on the fused HVP, with no Python per product; Lanczos's
        pairs are certified by ``physai.spectrum.certified_top_k`` on ``hessian_operator`` (every copy of a repeated
        eigenvalue found, true residuals recomputed); which "SA"/"BE" runs ``physai.spectrum.lanczos`` on
        ``hessian_operator``. ``v0`` [E, P] warm-starts from earlier eigenvectors; the rows of diverged members are
        ignored (NaN, as their earlier result). A member whose loss is not finite (diverged, in a
        learning-rate sweep) gets NaN values and vectors, converged False and diverged True; the others are solved
        as an ensemble of their own. Returns a ``physai.spectrum.EigenResult`` (values [E, k], vectors [E, k, P],
        matvecs [E], converged [E], diverged [E])."""
        from physai.spectrum import EigenResult, certified_top_k, lanczos, largest_algebraic_by_power

        X, Y, code = self._check_XY(X, Y, loss)
        which = check_choice(which, "which", ("LA", "SA", "LM", "BE"))
        options = self._eig_options(k, method, tol, max_matvecs, which if which in ("LA", "LM") else "LA", seed)
        if method == "lanczos" and max_matvecs >= 2 * k:  # certified_top_k's final residual check takes k matvecs
            options = self._eig_options(k, method, tol, max_matvecs - k, which if which in ("LA", "LM") else "LA",
                                        seed)
        if method == "power" and which not in ("LA", "LM"):
            raise ValueError(f"which: power iteration finds the largest-magnitude eigenvalue, got which={which!r}")
        finite = np.isfinite(self.loss_and_grad(X, Y, loss)[0])
        if v0 is not None:
            v0 = np.array(v0)  # a copy: the rows of diverged members are overwritten below
            if v0.ndim == 1:
                v0 = v0[None]
            if v0.dtype.kind in "iuf" and v0.shape == (self.ensemble, self.num_params):
                for e in np.flatnonzero(finite):
                    if not (np.isfinite(v0[e]).all() and np.abs(v0[e]).max() > 0):
                        raise ValueError(f"v0: row {e} (member {e}, not diverged) must be finite and nonzero")
                v0[~finite] = 1  # diverged members are not solved: their rows are unused
        v0 = check_v0(v0, self.ensemble, self.num_params, self.dtype)
        if not finite.all():
            result = EigenResult(np.full((self.ensemble, k), np.nan, self.dtype),
                                 np.full((self.ensemble, k, self.num_params), np.nan, self.dtype),
                                 np.zeros(self.ensemble, np.int64), np.zeros(self.ensemble, bool), ~finite)
            if finite.any():
                rows = lambda x: x if x is None or x.ndim == 2 else np.ascontiguousarray(x[finite])  # noqa: E731
                healthy = TwoLayer.from_arrays(*(None if p is None else np.ascontiguousarray(p[finite])
                                                 for p in (self.W, self.b, self.a)), self.activation, self.param)
                part = healthy.sharpness(rows(X), rows(Y), k, method, loss, tol, max_matvecs, which,
                                         None if v0 is None else v0[finite], seed)
                for name in ("values", "vectors", "matvecs", "converged"):
                    getattr(result, name)[finite] = getattr(part, name)
            return result
        if which not in ("LA", "LM"):
            return lanczos(self.hessian_operator(X, Y, loss), k=k, which=which, tol=tol, max_matvecs=max_matvecs,
                           v0=v0, seed=seed)
        first = self._native("hessian_eigs")(X, Y, self.W, self.b, self.a, self.config, code, options, v0)
        op = self.hessian_operator(X, Y, loss)
        if method == "power":
            if which == "LA":
                first = largest_algebraic_by_power(op.matvec, self.ensemble, self.num_params, self.dtype, first,
                                                   tol=tol, max_matvecs=max_matvecs, seed=seed)
            return EigenResult(*first)
        return EigenResult(*certified_top_k(op.matvec, self.ensemble, self.num_params, self.dtype, k=k, which=which,
                                            tol=tol, max_matvecs=max_matvecs, seed=seed, first=first))

    def _eig_options(self, k, method, tol, max_matvecs, which, seed, prefix=""):
        """Native solver options; ``prefix`` names the arguments as the caller spells them (``sharpness_``)."""
        method = check_choice(method, prefix + "method", ("lanczos", "power"))
        k = check_int(k, "k", min=1, max=self.num_params)
        if method == "power" and k != 1:
            raise ValueError(f"k: power iteration finds one eigenpair, got k={k}; use method='lanczos'")
        which = check_choice(which, "which", ("LA", "LM"))
        return _core.twolayer.EigOptions(k, which, check_float(tol, prefix + "tol", positive=True),
                                         check_int(max_matvecs, prefix + "max_matvecs", min=k, max=MAX_INT64), 0,
                                         check_seed(seed), method == "lanczos")

    def hvp(self, X: np.ndarray, Y: np.ndarray, direction, loss: str = "mse"):
        """Hessian-vector product for a direction ``(vW, vb, va)`` shaped like the parameters; returns the same
        structure. For many products at fixed parameters use ``hessian_operator``."""
        operator = self.hessian_operator(X, Y, loss)
        return self.unflatten(operator.native.matvec(self.flatten(direction)))

    def flatten(self, tensors) -> np.ndarray:
        """(W-like, b-like or None, a-like), each shaped like that parameter, -> [E, P] in the model's dtype."""
        if not isinstance(tensors, (tuple, list)) or len(tensors) != 3:
            raise TypeError("direction: expected a tuple (W-like, b-like or None, a-like) of three parts")
        parts = []
        for part, param, name in zip(tensors, (self.W, self.b, self.a), "Wba"):
            if param is None:
                if part is not None:
                    raise ValueError(f"direction: the model has no bias, so the {name} part must be None")
                continue
            if part is None:
                raise ValueError(f"direction: the {name} part is missing (got None)")
            part = np.asarray(part, self.dtype)
            if part.shape != param.shape:
                raise ValueError(f"direction: the {name} part must have the shape of {name}, {param.shape}, got "
                                 f"{part.shape}")
            parts.append(part.reshape(self.ensemble, -1))
        return np.ascontiguousarray(np.concatenate(parts, axis=1))

    def unflatten(self, flat: np.ndarray):
        """[E, P] -> (W-like, b-like or None, a-like)."""
        E, m, d, k = self.ensemble, self.m, self.d, self.k
        W = flat[:, :m * d].reshape(E, m, d)
        b = flat[:, m * d:m * d + m] if self.b is not None else None
        a = flat[:, flat.shape[1] - k * m:].reshape(E, k, m)
        return W, b, a

    def train(self, X: np.ndarray, Y: np.ndarray, lr, steps: int, loss: str = "mse", batch_size: int | None = None,
              track_sharpness_every: int | None = None, sharpness_tol: float = 1e-3, sharpness_method: str = "lanczos",
              sharpness_max_matvecs: int = 100) -> "Trajectory":
        """Run ``steps`` of gradient descent in native code (no Python per step), updating W, b, a in place.

        ``lr`` is a float or one rate per member [E] (a learning-rate sweep is an ensemble with one rate per member);
        each layer's rate is further multiplied by the parameterization's (``scaling.lr_W`` etc.). ``batch_size``
        None trains full-batch; otherwise step t uses rows [j B, (j+1) B) with j = t mod ceil(n / B) (shuffle X and Y
        beforehand for SGD).

        ``track_sharpness_every=s`` records, every s steps and before that step's update, the top eigenvalue of each
        member's full-batch loss Hessian, warm-started from the previous top eigenvector (a few HVPs per step), to
        relative residual ``sharpness_tol`` (Lanczos's estimate of it, not rechecked as ``sharpness`` does). With
        ``sharpness_method="power"`` it is the largest-*magnitude* eigenvalue, which is the top one only while no
        negative eigenvalue is larger in magnitude; "lanczos" (the default) tracks the top one. Member e's first
        start is random from the stream keyed by ``init_index[e]``, so a member's values do not depend on the rest
        of the ensemble.

        Returns a ``Trajectory``: losses [steps, E] (each step's loss before its update; the loss after the last
        update is ``loss_and_grad(X, Y)[0]``), ``diverged`` [E], and when tracking sharpness [T, E],
        sharpness_steps [T], matvecs [T, E].
        """
        X, Y, code = self._check_XY(X, Y, loss)
        steps = check_int(steps, "steps", min=0)
        batch_size = 0 if batch_size is None else check_int(batch_size, "batch_size", min=1)
        rates = np.asarray(lr)
        if rates.dtype.kind not in "iuf":
            raise TypeError(f"lr: expected real learning rates, got {type(lr).__name__} {lr!r}")
        if rates.ndim > 1 or rates.size not in (1, self.ensemble):
            raise ValueError(f"lr: expected a float or {self.ensemble} rates (one per member), got shape {rates.shape}")
        with np.errstate(over="ignore"):  # a rate beyond the dtype's range is refused just below
            rates = np.ascontiguousarray(np.broadcast_to(rates, (self.ensemble,)), dtype=self.dtype)
        if not np.all(np.isfinite(rates)) or np.any(rates < 0):
            raise ValueError(f"lr: expected finite non-negative learning rates in {self.dtype.name}, got {lr!r}")
        every = 0 if track_sharpness_every is None else check_int(track_sharpness_every, "track_sharpness_every", min=1)
        options = self._eig_options(1, sharpness_method, sharpness_tol, sharpness_max_matvecs, "LA", 0, "sharpness_")
        s = self.scaling
        losses, sharpness, matvecs = self._native("train")(X, Y, self.W, self.b, self.a, self.config, code,
                                                           rates, s.lr_W, s.lr_b, s.lr_a, steps,
                                                           batch_size, every, options,
                                                           np.ascontiguousarray(self.init_index, dtype=np.int64))
        tracked_steps = np.arange(0, steps, every) if every else np.zeros(0, dtype=np.int64)
        return Trajectory(losses, sharpness, tracked_steps, matvecs)

    def reference_params(self):
        """The parameters and configuration as ``physai.twolayer.reference.Params`` (views, not copies)."""
        from physai.twolayer.reference import Params

        return Params(self.W, self.b, self.a, self.scaling.input_scale, self.scaling.output_scale, self.activation)

    def __repr__(self) -> str:
        return (f"TwoLayer(d={self.d}, m={self.m}, k={self.k}, activation={self.activation!r}, param={self.param!r}, "
                f"bias={self.b is not None}, ensemble={self.ensemble}, dtype={self.dtype.name})")
