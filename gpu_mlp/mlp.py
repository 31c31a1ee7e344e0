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
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np

from . import _checks
from . import activations as _activations
from . import device as _device
from . import losses as _losses
from . import ops
from .reference import resolve_activations
from .workspace import Workspace

MEMORY_MODES = ("output", "recompute", "store_both")

# What predict's buffers may hold at most, by default: it runs big inputs in chunks of
# as many rows as fit, so its memory does not grow with the input.
PREDICT_BUFFER_BYTES = 64 << 20


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
        rng = np.random.default_rng(_checks.seed(seed))
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
        loss = _losses.get(loss)
        if loss.name == "softmax_cross_entropy":
            if acts[-1].kind.rowwise:
                raise ValueError("softmax_cross_entropy takes logits and applies softmax "
                                 "itself; use an identity output layer (softmax would be "
                                 "applied twice)")
            if params[-1][0].shape[0] < 2:
                raise ValueError("softmax_cross_entropy needs at least 2 outputs (classes); "
                                 "with one, every loss is 0: use the logistic loss")
        self.device, self._xp = _device.resolve(device)
        self.dtype = np.dtype(dtype)
        self.loss = loss
        self.memory = memory
        self.activations = list(acts)
        self._modes = [_layer_mode(memory, a) for a in acts]
        xp = self._xp
        self.params = [(xp.array(W, dtype=self.dtype, order="C", copy=True),
                        xp.array(b, dtype=self.dtype, order="C", copy=True))
                       for W, b in params]
        self._shapes = [(W.shape, b.shape) for W, b in self.params]
        self._checked_params = []
        # training and inference keep apart, so evaluating between epochs does not
        # rebuild the training buffers (and free_buffers() can drop either)
        self.training_workspace = Workspace(xp, self.dtype)
        self.inference_workspace = Workspace(xp, self.dtype)

    # --- description ------------------------------------------------------------------

    @property
    def sizes(self) -> list[int]:
        return [int(self._shapes[0][0][1])] + [int(W[0]) for W, _ in self._shapes]

    def __repr__(self) -> str:
        acts = ", ".join(str(a) for a in self.activations)
        return (f"MLP(sizes={self.sizes}, activations=[{acts}], loss={self.loss.name!r}, "
                f"memory={self.memory!r}, device={self.device!r}, dtype={self.dtype.name!r})")

    def free_buffers(self) -> None:
        """Release the buffers kept between calls (training's and predict's); the next
        call allocates them again. On a GPU the memory goes back to CuPy's pool, which
        keeps it for reuse (``cupy.get_default_memory_pool().free_all_blocks()`` hands
        it back to the driver)."""
        self.training_workspace.clear()
        self.inference_workspace.clear()

    # --- public steps -------------------------------------------------------------------

    def predict(self, X, batch_size: Optional[int] = None):
        """The network output for a (B, d_0) batch or one (d_0,) sample.

        Large inputs run in chunks of ``batch_size`` rows; by default as many as fit in
        ``PREDICT_BUFFER_BYTES`` (64 MiB) of buffers, so memory does not grow with B.
        """
        self._check_params()
        X = self._raw_inputs(X)
        single = X.ndim == 1
        batch = X[None, :] if single else X
        rows = (self._predict_rows() if batch_size is None
                else _checks.integer("batch_size", batch_size))
        out = self._xp.empty((batch.shape[0], self.sizes[-1]), dtype=self.dtype)
        verdicts = _checks.Verdicts(self._xp)
        for first in range(0, batch.shape[0], rows):
            chunk = _checks.cast(batch[first:first + rows], self.dtype, self._xp)
            _checks.finite("X", chunk, self._xp, verdicts)
            verdicts.settle()
            self._forward(chunk, self.inference_workspace, keep=False,
                          out=out[first:first + rows])
        return out[0] if single else out

    def _predict_rows(self) -> int:
        # predict holds two buffers at a time: a layer's input and its output
        per_row = max(a + b for a, b in zip(self.sizes[:-1], self.sizes[1:]))
        return max(1, PREDICT_BUFFER_BYTES // (per_row * self.dtype.itemsize))

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

    def fit(self, X, Y, epochs: int = 10, batch_size: int = 32, lr: float = 0.05,
            shuffle: bool = True, seed: int = 0, validation=None, verbose: bool = True,
            on_epoch: Optional[Callable] = None, resume=None):
        """Train on (X, Y) by minibatch SGD and return the History; see
        :func:`gpu_mlp.training.fit` for the arguments."""
        from .training import fit

        return fit(self, X, Y, epochs=epochs, batch_size=batch_size, lr=lr, shuffle=shuffle,
                   seed=seed, validation=validation, verbose=verbose, on_epoch=on_epoch,
                   resume=resume)

    def save(self, path, history=None) -> None:
        """Write parameters and architecture (and the History to resume training from) to
        ``path``, atomically; see :func:`gpu_mlp.checkpoint.save`."""
        from .checkpoint import save

        save(self, path, history=history)

    @classmethod
    def load(cls, path, device: str = "auto") -> "MLP":
        """The network stored at ``path``, on ``device``; see :func:`gpu_mlp.checkpoint.load`."""
        from .checkpoint import load

        return load(path, device=device)

    # --- input handling -----------------------------------------------------------------

    def _raw_inputs(self, X):
        """X on the net's device, shape and kind checked; not yet cast or scanned."""
        X = _checks.unmasked("X", X)
        X = _checks.numeric("X", _device.to_device(X, self._xp))
        d_in = self.sizes[0]
        if X.ndim not in (1, 2) or X.shape[-1] != d_in:
            raise ValueError(f"X must have shape (batch, {d_in}) or ({d_in},), got "
                             f"{tuple(X.shape)}")
        if X.ndim == 2 and X.shape[0] == 0:
            raise ValueError("X is an empty batch: it must hold at least one sample")
        return X

    def _batch(self, X, Y, check: bool):
        """(X, Y) as a C-contiguous batch in the net's dtype, checked as computed with:
        the value checks come after the cast and are read from the device at once."""
        self._check_params()
        X = self._raw_inputs(X)
        Y = _device.to_device(_checks.unmasked("Y", Y), self._xp)
        if X.ndim == 1:  # one sample: a batch of one
            X = X[None, :]
            Y = Y[None] if Y.ndim < 2 else Y
        X = _checks.cast(X, self.dtype, self._xp)
        verdicts = _checks.Verdicts(self._xp) if check else None
        if check:
            _checks.finite("X", X, self._xp, verdicts)
        Y = self.loss.check_targets(Y, X.shape[0], self.sizes[-1], self._xp, self.dtype,
                                    values=verdicts if check else False)
        if check:
            verdicts.settle()
        return X, self._xp.ascontiguousarray(Y)

    def _check_params(self) -> None:
        """``self.params`` is public: entries replaced since must still be what the
        engine computes with, or a step would fail half-way with some layers updated."""
        arrays = [a for pair in self.params for a in pair]
        if len(arrays) == len(self._checked_params) and all(
                a is b for a, b in zip(arrays, self._checked_params)):
            return  # the same objects as last checked (kept alive here): still good
        if len(self.params) != len(self._shapes):
            raise ValueError(f"net.params must hold {len(self._shapes)} (W, b) pairs, "
                             f"got {len(self.params)}")
        for k, (pair, shapes) in enumerate(zip(self.params, self._shapes), start=1):
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                raise ValueError(f"net.params[{k - 1}] must be a (W_{k}, b_{k}) pair")
            for name, a, shape in zip((f"W_{k}", f"b_{k}"), pair, shapes):
                if not isinstance(a, self._xp.ndarray):
                    raise TypeError(f"{name} must be a {self._xp.__name__} array on the "
                                    f"net's device, got {type(a).__name__}")
                if a.dtype != self.dtype or a.shape != shape or not a.flags.c_contiguous:
                    raise ValueError(f"{name} must be a C-contiguous {self.dtype} array of "
                                     f"shape {shape}, got {a.dtype} {tuple(a.shape)}"
                                     f"{'' if a.flags.c_contiguous else ', not C-contiguous'}")
        self._checked_params = arrays

    # --- the layer loop -----------------------------------------------------------------

    def _forward(self, X, ws: Workspace, keep: bool, out=None):
        """Forward pass. ``keep=False``: the output, written into ``out`` (predict).
        ``keep=True``: ``(F_n, saved)`` with what each layer keeps for the backward pass."""
        B, n = X.shape[0], len(self.params)
        saved, F = [], X
        for k, ((W, b), act, mode) in enumerate(zip(self.params, self.activations, self._modes)):
            last = k == n - 1
            A = out if not keep and last else ws.take((B, W.shape[0]))
            ops.gemm("N", "T", F, W, A)
            if k > 0 and (not keep or self._modes[k - 1] == "recompute"):
                ws.give(F)  # F_{k-1}, consumed by this GEMM and not kept for backward
            if not keep or mode == "output":
                ops.bias_act(act, A, b)
                if keep:
                    saved.append(_Saved(F=A))
                F = A
            elif mode == "recompute":
                F_next = ws.take(A.shape)
                ops.bias_act_keep(act, A, b, F_next)
                saved.append(_Saved(A=A))  # F_next is transient: backward makes it again
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
        ws = self.training_workspace
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

def _layer_mode(memory: str, act) -> str:
    """The memory mode a layer runs in: "output" where it keeps the same and costs less
    -- identity (F = A, sigma' = 1) in every mode, and softmax for "store_both" (it has
    no elementwise sigma' to store: its output is what backward needs)."""
    if act.name == "identity" or (memory == "store_both" and act.kind.rowwise):
        return "output"
    return memory


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
