"""The engine: Algorithm 1 forward and the fused backward pass, on CuPy or NumPy.

One layer loop serves every backend, memory mode and use. Per layer the forward pass is
one GEMM into a workspace buffer and one fused bias + activation kernel; the backward
pass is one fused loss-gradient kernel at the output, then per layer one GEMM for
``Delta_{k+1} W_{k+1}``, one fused kernel for the product with sigma', one GEMM for the
weight gradient and one GEMV for the bias gradient. What happens to a layer's gradient
is a *sink*: :meth:`MLP.train_step` applies SGD straight into ``W_k`` and ``b_k`` (BLAS
with ``alpha = -lr, beta = 1``: no gradient buffer exists), :meth:`MLP.loss_and_gradients`
writes fresh gradient arrays, :meth:`MLP.per_sample_grad_norms` keeps only the factors'
row norms (Remark 8 (ii)).

Memory modes (MATH.md, Remark 8 (i)), what the forward pass keeps per layer:

* ``"output"``: F_k only; sigma' is computed from F_k. One buffer per layer.
* ``"recompute"``: A_k only; backward turns it into F_k and sigma'(A_k) in one kernel.
* ``"store_both"``: F_k and D_k = sigma'(A_k); backward only multiplies.

All three give the same numbers. Each kept buffer goes back to the workspace as soon
as the backward pass is done with it, and the update of ``W_k`` waits until
``Delta_{k-1}`` has used the old ``W_k``.
"""

from __future__ import annotations

import numbers
import operator
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import _checks
from . import activations as _activations
from . import device as _device
from . import losses as _losses
from . import ops
from .reference import resolve_activations
from .workspace import Workspace

MEMORY_MODES = ("output", "recompute", "store_both")

_WORKSPACES_KEPT = 2  # batch shapes whose buffers stay cached (full batch + remainder)


@dataclass
class _Saved:
    """What the forward pass kept of one layer for the backward pass."""

    F: Any = None  # the output F_k (in "recompute" mode only after backward made it)
    A: Any = None  # "recompute": the pre-activation A_k
    D: Any = None  # "store_both": sigma'(A_k)


def _init_gain(act) -> float:
    # He initialisation for ReLU-like layers (divided by ReLU's scale), Glorot-like else
    if act.name == "relu":
        return np.sqrt(2.0) / act.alpha
    if act.name == "gelu":
        return np.sqrt(2.0)
    return 1.0


class MLP:
    """A multilayer perceptron trained by the backprop of MATH.md.

    >>> import numpy as np, gpu_mlp
    >>> net = gpu_mlp.MLP([4, 8, 3], activations="tanh", loss="softmax_cross_entropy",
    ...                   device="cpu", dtype="float64", seed=0)
    >>> X, y = np.ones((5, 4)), np.array([0, 1, 2, 1, 0])
    >>> float(net.train_step(X, y, lr=0.1)) > 0
    True
    >>> net.predict(X).shape
    (5, 3)

    Args:
        sizes: layer widths ``[d_0, d_1, ..., d_n]``.
        activations: one activation for every hidden layer, or a list of ``n`` with one
            per layer, the output layer included (then ``output`` is not used).
        output: the output layer's activation.
        loss: a name from :mod:`gpu_mlp.losses`.
        memory: ``"output"``, ``"recompute"`` or ``"store_both"``.
        device: ``"auto"``, ``"cpu"`` (NumPy) or ``"cuda"`` (CuPy).
        dtype: ``"float32"`` or ``"float64"``.
        seed: the seed of the initial weights, drawn on the host so that every device
            starts from the same numbers.
    """

    def __init__(self, sizes, activations="relu", output="identity", loss="squared",
                 memory="output", device="auto", dtype="float32", seed=0):
        sizes = _check_sizes(sizes)
        n = len(sizes) - 1
        if isinstance(activations, (str, _activations.Activation)):
            activations = [activations] * (n - 1) + [output]
        acts = resolve_activations(activations, n)
        dt = _checks.dtype_of("dtype", dtype)
        rng = np.random.default_rng(seed)
        params = []
        for d_in, d_out, act in zip(sizes[:-1], sizes[1:], acts):
            W = rng.standard_normal((d_out, d_in)) * (_init_gain(act) / np.sqrt(d_in))
            params.append((W.astype(dt), np.zeros(d_out, dtype=dt)))
        self._setup(params, acts, loss, memory, device, dt)

    @classmethod
    def from_params(cls, params, activations, loss="squared", memory="output",
                    device="auto", dtype=None) -> "MLP":
        """A network with the given ``(W_k, b_k)`` (copied), ``W_k`` of shape (d_out, d_in).

        ``activations`` is one activation for every layer or a list with one per layer.
        ``dtype`` defaults to the parameters' own.
        """
        name, xp = _device.resolve(device)
        pairs = [(_device.to_device(W, xp), _device.to_device(b, xp))
                 for W, b in _iter_pairs(params)]
        pairs = _checks.params(pairs)
        dt = _checks.dtype_of("dtype", pairs[0][0].dtype if dtype is None else dtype)
        acts = resolve_activations(activations, len(pairs))
        net = cls.__new__(cls)
        net._setup(pairs, acts, loss, memory, name, dt)
        return net

    def _setup(self, params, acts, loss, memory, device, dtype):
        if memory not in MEMORY_MODES:
            raise ValueError(f"unknown memory mode {memory!r}; valid: {', '.join(MEMORY_MODES)}")
        if memory == "output":
            refused = list(dict.fromkeys(str(a) for a in acts if not a.has_grad_from_output))
            if refused:
                raise ValueError(f"memory='output' needs sigma' as a function of the output, "
                                 f"which {', '.join(refused)} lacks; use memory='recompute' "
                                 f"or 'store_both'")
        self.device, self._xp = _device.resolve(device)
        self.dtype = np.dtype(dtype)
        self.loss = _losses.get(loss)
        self.memory = memory
        self.activations = list(acts)
        # softmax has no elementwise sigma' to store: its stored output is its derivative
        self._modes = ["output" if memory == "store_both" and a.kind.rowwise else memory
                       for a in acts]
        xp = self._xp
        self.params = [(xp.array(W, dtype=self.dtype, order="C", copy=True),
                        xp.array(b, dtype=self.dtype, order="C", copy=True))
                       for W, b in params]
        self._workspaces: "OrderedDict[int, Workspace]" = OrderedDict()

    # --- description ------------------------------------------------------------------

    @property
    def sizes(self) -> list[int]:
        return [int(self.params[0][0].shape[1])] + [int(W.shape[0]) for W, _ in self.params]

    def __repr__(self) -> str:
        acts = ", ".join(str(a) for a in self.activations)
        return (f"MLP(sizes={self.sizes}, activations=[{acts}], loss={self.loss.name!r}, "
                f"memory={self.memory!r}, device={self.device!r}, dtype={self.dtype.name!r})")

    def workspace(self, batch: int) -> Workspace:
        """The buffer pool for batches of ``batch`` rows (the last two sizes are kept)."""
        ws = self._workspaces.pop(batch, None) or Workspace(self._xp, self.dtype)
        self._workspaces[batch] = ws
        while len(self._workspaces) > _WORKSPACES_KEPT:
            self._workspaces.popitem(last=False)
        return ws

    # --- public steps -------------------------------------------------------------------

    def predict(self, X):
        """The network output for a (B, d_0) batch or one (d_0,) sample."""
        X = self._inputs(X)
        batch = X if X.ndim == 2 else X[None, :]
        out = self._forward(batch, self.workspace(batch.shape[0]), keep=False)
        return out if X.ndim == 2 else out[0]

    def loss_and_gradients(self, X, Y):
        """``(loss, [(dW_k, db_k)], dX)`` as :func:`gpu_mlp.reference.loss_and_gradients`.

        Nothing is updated. The loss is a 0-d array on the net's device.
        """
        single = _ndim(X) == 1
        X, Y = self._batch(X, Y, check=True)
        xp = self._xp
        grads = [(xp.empty_like(W), xp.empty_like(b)) for W, b in self.params]

        def write_gradient(k, delta, F_prev, ones):
            dW, db = grads[k]
            ops.gemm("T", "N", delta, F_prev, dW)
            ops.gemv("T", delta, ones, db)

        J, dX = self._backprop(X, Y, write_gradient, scale=1.0 / X.shape[0], want_dx=True)
        return J, grads, (dX[0] if single else dX)

    def train_step(self, X, Y, lr: float, check: bool = True):
        """One SGD step on the batch (X, Y), fused into the backward pass; returns the loss.

        The update ``W_k <- W_k - lr dJ/dW_k`` is one GEMM straight into ``W_k``, done as
        soon as ``Delta_k`` is known and ``Delta_{k-1}`` has used the old ``W_k``; no
        gradient buffer exists. The loss comes back as a 0-d array on the device.
        With ``check=False`` the data are not scanned for NaN/Inf and bad labels, which
        on a GPU costs one device-to-host synchronisation; shapes are always checked.
        """
        lr = _check_lr(lr)
        X, Y = self._batch(X, Y, check=check)
        neg_lr = -lr

        def sgd(k, delta, F_prev, ones):
            W, b = self.params[k]
            ops.gemm("T", "N", delta, F_prev, W, alpha=neg_lr, beta=1.0)
            ops.gemv("T", delta, ones, b, alpha=neg_lr, beta=1.0)

        J, _ = self._backprop(X, Y, sgd, scale=1.0 / X.shape[0], want_dx=False)
        return J

    def per_sample_grad_norms(self, X, Y):
        """(B,) norms of each sample's own loss gradient over all W_k and b_k.

        From the factors alone (Remark 8 (ii)): ``||dl_i/dW_k|| = ||Delta_k[i]|| ||F_{k-1}[i]||``
        and ``||dl_i/db_k|| = ||Delta_k[i]||``; no per-sample gradient is formed.
        """
        X, Y = self._batch(X, Y, check=True)
        xp = self._xp
        squares = xp.zeros(X.shape[0], dtype=self.dtype)

        def accumulate(k, delta, F_prev, ones):
            squares[...] += (delta * delta).sum(axis=1) * ((F_prev * F_prev).sum(axis=1) + 1)

        self._backprop(X, Y, accumulate, scale=1.0, want_dx=False)
        return xp.sqrt(squares)

    # --- training and checkpoints (see gpu_mlp/training.py and gpu_mlp/checkpoint.py) ---

    def fit(self, X, Y, **kwargs):
        """Train on (X, Y) by minibatch SGD; see :func:`gpu_mlp.training.fit`."""
        from .training import fit

        return fit(self, X, Y, **kwargs)

    def save(self, path, **kwargs) -> None:
        """Write parameters and architecture to ``path``; see :func:`gpu_mlp.checkpoint.save`."""
        from .checkpoint import save

        save(self, path, **kwargs)

    @classmethod
    def load(cls, path, **kwargs) -> "MLP":
        """A network from a checkpoint; see :func:`gpu_mlp.checkpoint.load`."""
        from .checkpoint import load

        return load(path, **kwargs)

    # --- input handling -----------------------------------------------------------------

    def _inputs(self, X, check: bool = True):
        X = _device.to_device(X, self._xp)
        X = _checks.inputs(X, self.sizes[0], self._xp, values=check)
        return self._xp.ascontiguousarray(X, dtype=self.dtype)

    def _batch(self, X, Y, check: bool):
        X = self._inputs(X, check)
        Y = _device.to_device(Y, self._xp)
        if X.ndim == 1:  # one sample: a batch of one
            X = X[None, :]
            Y = Y[None] if Y.ndim < 2 else Y
        Y = self.loss.check_targets(Y, X.shape[0], self.sizes[-1], self._xp, self.dtype,
                                    values=check)
        return X, self._xp.ascontiguousarray(Y)

    # --- the layer loop -----------------------------------------------------------------

    def _forward(self, X, ws: Workspace, keep: bool):
        """Forward pass. ``keep=False``: the output, as a new array (used by predict).
        ``keep=True``: ``(F_n, saved)`` with what each layer keeps for the backward pass."""
        B, n = X.shape[0], len(self.params)
        saved, F = [], X
        for k, ((W, b), act, mode) in enumerate(zip(self.params, self.activations, self._modes)):
            last = k == n - 1
            if not keep and last:
                A = self._xp.empty((B, W.shape[0]), dtype=self.dtype)  # the caller's to keep
            else:
                A = ws.take((B, W.shape[0]))
            ops.gemm("N", "T", F, W, A)
            if not keep:
                if k > 0:
                    ws.give(F)  # consumed by this layer's GEMM
                ops.bias_act(act, A, b)
                F = A
            elif mode == "output":
                ops.bias_act(act, A, b)
                saved.append(_Saved(F=A))
                F = A
            elif mode == "recompute":
                F_next = ws.take(A.shape)
                ops.bias_act_keep(act, A, b, F_next)
                if k > 0:
                    ws.give(F)  # the transient F_{k-1}: backward makes it again from A
                saved.append(_Saved(A=A))
                F = F_next
            else:  # store_both
                F_next = ws.take(A.shape)
                ops.bias_act_grad(act, A, b, F_next)  # A now holds D = sigma'(A)
                saved.append(_Saved(F=F_next, D=A))
                F = F_next
        return (F, saved) if keep else F

    def _activation_backward(self, k, saved, delta, ws):
        """dJ/dF_k -> dJ/dA_k in place; afterwards ``saved[k].F`` holds F_k in every mode."""
        act, mode, s = self.activations[k], self._modes[k], saved[k]
        if mode == "output":
            ops.grad_from_output(act, s.F, delta)
        elif mode == "recompute":
            ops.recompute_grad(act, s.A, delta)
            s.F, s.A = s.A, None
        else:
            ops.mul(delta, s.D)
            ws.give(s.D)
            s.D = None

    def _backprop(self, X, Y, sink, scale: float, want_dx: bool):
        """Forward, output delta, then the backward loop handing each layer's factors
        ``(Delta_k, F_{k-1})`` to ``sink``. Returns ``(loss, dJ/dX or None)``."""
        ws = self.workspace(X.shape[0])
        n = len(self.params)
        F_out, saved = self._forward(X, ws, keep=True)

        delta = ws.take(F_out.shape)
        scratch = ws.take(ops.loss_scratch_shape(self.loss, F_out.shape))
        J = ops.loss_and_grad(self.loss, F_out, Y, delta, scale, scratch)
        ws.give(scratch)
        if self._modes[-1] == "recompute":
            ws.give(F_out)  # the transient output; backward rebuilds it from A_n
        self._activation_backward(n - 1, saved, delta, ws)
        ws.give(saved[n - 1].F)  # F_n: nothing below needs it

        ones = ws.ones(X.shape[0])
        grad_input = None
        for k in reversed(range(n)):
            W = self.params[k][0]
            if k > 0 or want_dx:
                grad_input = ws.take((X.shape[0], W.shape[1])) if k > 0 else \
                    self._xp.empty((X.shape[0], W.shape[1]), dtype=self.dtype)
                ops.gemm("N", "N", delta, W, grad_input)  # uses W_k before the sink updates it
            if k > 0:
                self._activation_backward(k - 1, saved, grad_input, ws)
            F_prev = saved[k - 1].F if k > 0 else X
            sink(k, delta, F_prev, ones)
            ws.give(delta)
            if k > 0:
                ws.give(F_prev)
            delta = grad_input
        return J, (grad_input if want_dx else None)


# --- argument checks --------------------------------------------------------------------

def _check_sizes(sizes) -> list[int]:
    try:
        sizes = [operator.index(s) for s in sizes]  # ints only: 2.5 or "3" is a mistake
    except TypeError:
        raise TypeError(f"sizes must be a list of integer layer widths, got {sizes!r}") from None
    if len(sizes) < 2 or min(sizes) < 1:
        raise ValueError(f"sizes must list at least two widths >= 1 (input, output), got {sizes}")
    return sizes


def _check_lr(lr) -> float:
    if isinstance(lr, bool) or not isinstance(lr, numbers.Real):
        raise TypeError(f"lr must be a number, got {lr!r}")
    lr = float(lr)
    if not (np.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a finite number > 0, got {lr}")
    return lr


def _iter_pairs(params):
    try:
        pairs = [tuple(p) for p in params]
    except TypeError:
        raise TypeError("params must be a list of (W, b) pairs") from None
    for k, pair in enumerate(pairs, start=1):
        if len(pair) != 2:
            raise ValueError(f"layer {k}: expected a (W, b) pair, got {len(pair)} items")
    return pairs


def _ndim(a) -> int:
    return len(getattr(a, "shape", np.shape(a)))
