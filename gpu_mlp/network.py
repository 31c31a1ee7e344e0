"""The engine: Algorithm 2 forward and the fused backward pass, on CuPy or NumPy.

One layer loop serves every layer type, backend, memory mode and use. Each layer is a
bilinear map with a bias (:mod:`gpu_mlp.layers`): per layer the forward pass computes
``A_k = C_k(F_{k-1}, W_k)`` (one GEMM, for a convolution on im2col rows) and one fused
bias + activation kernel; the backward pass is one fused loss-gradient kernel at the
output, then per layer ``C_k^dagger`` (one GEMM, for a convolution then col2im), one
fused kernel for the product with sigma', and the layer's *sink* with the factors
``(T_rows, rows(F_{k-1}))`` of its weight gradient ``G_k = T_rows^T rows(F_{k-1})``.
What happens to the gradient is the sink's (:mod:`gpu_mlp.updates`): :meth:`Network.train_step`
applies SGD straight into ``W_k`` and ``b_k`` (BLAS with ``alpha = -lr, beta = 1``: no
gradient buffer exists) or an optimizer's fused update, after DP's clipping and noise
(:mod:`gpu_mlp.privacy`) and the sum over data-parallel ranks
(:mod:`gpu_mlp.distributed`) where asked; :meth:`Network.loss_and_gradients` writes
fresh gradient arrays, :meth:`Network.per_sample_grad_norms` keeps only per-sample norms
(Remark 8 (ii)). A sink that reads the factors after its call (DP, communication) keeps
them until the loop calls its ``finish()``.

Memory modes (MATH.md, Remark 8 (i)), what the forward pass keeps per layer:

* ``"output"``: F_k only; sigma' is computed from F_k. One buffer per layer.
* ``"recompute"``: A_k only; backward turns it into F_k and sigma'(A_k) in one kernel.
* ``"store_both"``: F_k and D_k = sigma'(A_k); backward only multiplies.

All three give the same numbers. Each kept buffer goes back to the workspace as soon
as the backward pass is done with it, and the update of ``W_k`` waits until
``dJ/dF_{k-1}`` has used the old ``W_k``.
"""

from __future__ import annotations

import math
import numbers
import os
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np

from . import _checks
from . import device as _device
from . import layers as _layers
from . import losses as _losses
from . import ops
from .updates import Apply, WriteGradients
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


class Network:
    """A network of :mod:`gpu_mlp.layers` trained by the backprop of MATH.md (Algorithm 2).

    >>> import numpy as np, gpu_mlp
    >>> from gpu_mlp.layers import Conv2d, Dense
    >>> net = gpu_mlp.Network([Conv2d(1, 4, 3, padding=1), Dense(4 * 8 * 8, 10, "identity")],
    ...                       loss="softmax_cross_entropy", device="cpu", seed=0)
    >>> X, y = np.zeros((5, 1, 8, 8)), np.array([0, 1, 2, 3, 4])
    >>> float(net.train_step(X, y, lr=0.1)) > 0
    True
    >>> net.predict(X).shape
    (5, 10)

    Args:
        layers: the layers, first to last (a Dense may follow a Conv2d: it flattens).
        loss: a name from :mod:`gpu_mlp.losses`.
        memory: ``"output"``, ``"recompute"`` or ``"store_both"``.
        device: ``"auto"``, ``"cpu"`` (NumPy) or ``"cuda"`` (CuPy).
        dtype: ``"float32"`` or ``"float64"``.
        seed: the seed of the initial weights, drawn on the host so that every device
            starts from the same numbers.
        input_shape: the shape of one sample, e.g. ``(1, 28, 28)``, to check the layers
            against now; otherwise each batch is checked as it comes.
    """

    def __init__(self, layers, loss="squared", memory="output", device="auto",
                 dtype="float32", seed=0, input_shape=None):
        layers = _check_layers(layers)
        dt = _checks.dtype_of("dtype", dtype)
        rng = np.random.default_rng(_checks.seed(seed))
        params = []
        try:
            for layer in layers:
                scale = _init_gain(layer.activation) / np.sqrt(layer.fan_in)
                W = rng.standard_normal(layer.weight_shape) * scale
                params.append((W.astype(dt), np.zeros(layer.bias_shape, dtype=dt)))
            self._setup(layers, params, loss, memory, device, dt)
        except MemoryError:  # NumPy's, or CuPy's OutOfMemoryError: say what was asked for
            raise _too_large(layers, dt) from None
        if input_shape is not None:
            self._shapes(_input_shape(input_shape))

    @classmethod
    def from_params(cls, layers, params, loss="squared", memory="output", device="auto",
                    dtype=None) -> "Network":
        """A network of ``layers`` with the given ``(W_k, b_k)`` (copied), in torch's
        layouts; ``dtype`` defaults to the parameters' own."""
        layers = _check_layers(layers)
        name, xp = _device.resolve(device)
        pairs = [(_device.to_device(W, xp, f"W_{k}"), _device.to_device(b, xp, f"b_{k}"))
                 for k, (W, b) in enumerate(_iter_pairs(params), start=1)]
        pairs = _checks.layer_params(layers, pairs)
        dt = _checks.dtype_of("dtype", pairs[0][0].dtype if dtype is None else dtype)
        net = cls.__new__(cls)
        net._setup(layers, pairs, loss, memory, name, dt)
        return net

    def _setup(self, layers, params, loss, memory, device, dtype):
        acts = [layer.activation for layer in layers]
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
            if params[-1][0].shape[0] < 2 and isinstance(layers[-1], _layers.Dense):
                raise ValueError("softmax_cross_entropy needs at least 2 outputs (classes); "
                                 "with one, every loss is 0: use the logistic loss")
        self.device, self.xp = _device.resolve(device)
        self.dtype = np.dtype(dtype)
        self.loss = loss
        self.memory = memory
        self.layers = list(layers)
        self._modes = [_layer_mode(memory, a) for a in acts]
        xp = self.xp
        self.params = [(xp.array(W, dtype=self.dtype, order="C", copy=True),
                        xp.array(b, dtype=self.dtype, order="C", copy=True))
                       for W, b in params]
        self._param_shapes = [(W.shape, b.shape) for W, b in self.params]
        self._checked_params = []
        self._shape_cache = {}
        # training and inference keep apart, so evaluating between epochs does not
        # rebuild the training buffers (and free_buffers() can drop either)
        self.training_workspace = Workspace(xp, self.dtype)
        self.inference_workspace = Workspace(xp, self.dtype)

    # --- description ------------------------------------------------------------------

    @property
    def activations(self) -> list:
        return [layer.activation for layer in self.layers]

    def __repr__(self) -> str:
        layers = ", ".join(str(layer) for layer in self.layers)
        return (f"Network([{layers}], loss={self.loss.name!r}, memory={self.memory!r}, "
                f"device={self.device!r}, dtype={self.dtype.name!r})")

    def free_buffers(self) -> None:
        """Release the buffers kept between calls (training's and predict's); the next
        call allocates them again. On a GPU the memory goes back to CuPy's pool, which
        keeps it for reuse (``cupy.get_default_memory_pool().free_all_blocks()`` hands
        it back to the driver)."""
        self.training_workspace.clear()
        self.inference_workspace.clear()

    # --- public steps -------------------------------------------------------------------

    def predict(self, X, batch_size: Optional[int] = None):
        """The network output for a batch (B, *input_shape) or one sample.

        Large inputs run in chunks of ``batch_size`` rows; by default as many as fit in
        ``PREDICT_BUFFER_BYTES`` (64 MiB) of buffers, so memory does not grow with B.
        """
        self._check_params()
        X, single = self._raw_inputs(X)
        shapes = self._shapes(X.shape[1:])
        rows = (self._predict_rows(shapes) if batch_size is None
                else _checks.integer("batch_size", batch_size))
        out = self.xp.empty((X.shape[0], *shapes[-1][1]), dtype=self.dtype)
        verdicts = _checks.Verdicts(self.xp)
        for first in range(0, X.shape[0], rows):
            chunk = _checks.cast(X[first:first + rows], self.dtype, self.xp)
            _checks.finite("X", chunk, self.xp, verdicts)
            verdicts.settle()
            self._forward(chunk, self.inference_workspace, keep=False,
                          out=out[first:first + rows])
        return out[0] if single else out

    def _predict_rows(self, shapes) -> int:
        per_row = max(layer.working_size(s_in) for layer, (s_in, _) in zip(self.layers, shapes))
        return max(1, PREDICT_BUFFER_BYTES // (per_row * self.dtype.itemsize))

    def loss_and_gradients(self, X, Y):
        """``(loss, [(dW_k, db_k)], dX)`` as :func:`gpu_mlp.reference.network_loss_and_gradients`.

        Nothing is updated. The loss is a 0-d array on the net's device.
        """
        X, Y, single = self._batch(X, Y, check=True)
        xp = self.xp
        grads = [(xp.empty_like(W), xp.empty_like(b)) for W, b in self.params]
        J, dX = self._backprop(X, Y, WriteGradients(grads), scale=1.0 / X.shape[0],
                               want_dx=True)
        return J, grads, (dX[0] if single else dX)

    def train_step(self, X, Y, lr, check: bool = True, dp=None, comm=None):
        """One update on the batch (X, Y), fused into the backward pass; returns the loss.

        ``lr`` a number: plain SGD, ``W_k <- W_k - lr dJ/dW_k`` as one GEMM straight into
        ``W_k``, done as soon as ``T_k`` is known and ``dJ/dF_{k-1}`` has used the old
        ``W_k``; no gradient buffer exists. ``lr`` an optimizer of :mod:`gpu_mlp.optim`:
        each layer's gradient lives in the optimizer's one scratch buffer from its GEMM to
        the optimizer's fused update. The loss (the batch mean) comes back as a 0-d array
        on the device. With ``check=False`` the data are not scanned for NaN/Inf and bad
        labels, which on a GPU costs one device-to-host synchronisation; shapes are
        always checked.

        ``dp``: a :class:`gpu_mlp.privacy.DP`: a differentially private step -- each
        sample's gradient clipped to ``dp.max_grad_norm``, summed, Gaussian noise added,
        divided by the batch size -- in the same one backward pass
        (:mod:`gpu_mlp.privacy`). ``comm``: a :class:`gpu_mlp.distributed.Communicator`:
        (X, Y) is this rank's share of a global batch, and every rank applies the
        gradient of the global batch mean (:mod:`gpu_mlp.distributed`); a rank's share
        may hold no rows. (fit's Poisson samples, which may be empty too, divide by the
        expected batch size.) mpi4py's own communicator will do on the CPU (wrapped in a
        Communicator kept with the net). With ``comm`` the loss is the global batch's,
        every rank's mean weighted by its rows: a small allreduce that waits for the step.
        """
        return self._step(X, Y, lr, check, dp, comm, global_loss=True)

    def _step(self, X, Y, lr, check, dp, comm, expected_batch=None, counts=None,
              global_loss=False):
        """:meth:`train_step`; ``expected_batch``: what DP divides by (fit's Poisson
        sampling: the expected batch size); ``counts``: every rank's rows, when known;
        ``global_loss``: with ``comm``, return the global batch's loss (else this rank's,
        with no wait: fit sums the epoch's losses over the ranks at its end)."""
        if isinstance(lr, numbers.Real):
            lr = _check_lr(lr)
        elif not hasattr(lr, "begin_step"):
            raise TypeError(f"lr must be a number or a gpu_mlp.optim optimizer, got {lr!r}")
        if dp is not None and not hasattr(dp, "_stage"):
            raise TypeError(f"dp must be a gpu_mlp.privacy.DP, got {dp!r}")
        if comm is not None and not hasattr(comm, "_stage"):
            from .distributed import communicator

            comm = communicator(comm, self)  # mpi4py's own: wrapped, as fit does
        _check_scalars(self.dtype, lr, dp)
        empty = (dp is not None or comm is not None) and _rows(X) == 0
        if empty and comm is None and expected_batch is None:
            raise ValueError("X is an empty batch: a private step divides by the batch "
                             "size, so it needs at least one sample (fit's Poisson "
                             "samples divide by the expected size instead)")
        if empty:  # nothing to forward: only the noise and the collectives remain
            self._check_params()
            self._shapes(tuple(X.shape[1:]))
            B = 0
        else:
            X, Y, _ = self._batch(X, Y, check=check)
            B = X.shape[0]
        if comm is not None:
            counts = comm._counts(B) if counts is None else counts
            total = sum(counts)
        else:
            total = B
        rule = (Apply(self.params, lr=lr) if isinstance(lr, float) else lr.begin_step(self))
        sink = rule if comm is None else comm._stage(self, rule, counts)
        if dp is not None:
            sink = dp._stage(self, sink, B, total if expected_batch is None else expected_batch)
        if empty:
            self._empty_backward(sink)
            J = self.xp.zeros((), dtype=self.dtype)
        else:
            # DP needs each sample's own gradient (scale 1) and divides by the batch itself
            scale = 1.0 if dp is not None else 1.0 / total
            J, _ = self._backprop(X, Y, sink, scale=scale, want_dx=False)
        if comm is None or not global_loss:
            return J
        summed = comm.sum([float(J) * B])[0]  # every rank's loss times its rows
        return self.xp.asarray(summed / total if total else 0.0, dtype=self.dtype)

    def _empty_backward(self, sink):
        """What a backward pass over no rows hands the sink: empty factors per layer."""
        xp = self.xp
        for k in reversed(range(len(self.layers))):
            W = _layers.Layer.weight_matrix(self.params[k][0])
            sink(k, xp.empty((0, W.shape[0]), self.dtype), xp.empty((0, W.shape[1]), self.dtype),
                 xp.empty(0, self.dtype))
        _finish(sink)

    def per_sample_grad_norms(self, X, Y):
        """(B,) norms of each sample's own loss gradient over all W_k and b_k.

        From the factors alone (Remark 8 (ii)), no per-sample gradient formed where that
        is cheaper: a dense layer's ``||G_i|| = ||T_i|| ||x_i||``; a convolution's
        ``||G_i||^2 = <T_i T_i^T, X_i X_i^T>`` over its P output positions (cost
        ``P^2 (c_out + K)``) or ``||T_i^T X_i||^2`` (cost ``P c_out K``), whichever is
        cheaper for the layer; the bias part ``||T_i^T 1||^2``.
        """
        X, Y, _ = self._batch(X, Y, check=True)
        xp, B = self.xp, X.shape[0]
        squares = xp.zeros(B, dtype=self.dtype)

        def accumulate(k, T_rows, X_rows, ones, noise=None):
            squares[...] += _per_sample_squares(xp, T_rows.reshape(B, -1, T_rows.shape[1]),
                                                X_rows.reshape(B, -1, X_rows.shape[1]))

        self._backprop(X, Y, accumulate, scale=1.0, want_dx=False)
        return xp.sqrt(squares)

    def forward(self, X, check: bool = True):
        """``(F_n, tape)``: the output for a batch, and what :meth:`backward` needs of
        this forward pass (kept in the training workspace, as the memory mode says).

        For frameworks that split a step in two (:mod:`gpu_mlp.torch`): ``F_n`` is the
        caller's array; the tape's buffers return to the workspace when :meth:`backward`
        has used them (or :meth:`Tape.release` drops them unused).
        """
        self._check_params()
        X, single = self._raw_inputs(X)
        if single:
            raise ValueError("forward takes a batch, not one sample")
        X = _checks.cast(X, self.dtype, self.xp)
        if check:
            _checks.finite("X", X, self.xp)
        F_out, saved = self._forward(X, self.training_workspace, keep=True)
        return self.xp.array(F_out, copy=True), Tape(self, X, F_out, saved)

    def backward(self, tape: "Tape", grad_output, want_dx: bool = True, check: bool = True):
        """``([(dW_k, db_k)], dJ/dX)`` for ``J = <F_n, grad_output>``: the backward pass of
        Algorithm 2 started from a given ``dJ/dF_n`` (``grad_output``, shaped as F_n)
        instead of a loss; the same loop as every other step. Updates nothing.
        ``check=False`` skips the scan of ``grad_output`` for NaN/Inf (a device sync on a
        GPU), as autograd does."""
        if not isinstance(tape, Tape) or tape.net is not self:
            raise ValueError("backward needs the tape of a forward pass of this network")
        X, F_out, saved = tape.take()
        ws, xp = self.training_workspace, self.xp
        try:
            grad_output = _device.to_device(grad_output, xp, "grad_output")
            if tuple(grad_output.shape) != tuple(F_out.shape):
                raise ValueError(f"grad_output must have the output's shape "
                                 f"{tuple(F_out.shape)}, got {tuple(grad_output.shape)}")
            grad_output = _checks.cast(grad_output, self.dtype, xp)
            if check:
                _checks.finite("grad_output", grad_output, xp)
            delta = ws.take(F_out.shape)
            delta[...] = grad_output
        except BaseException:
            tape.release_buffers(X, F_out, saved)
            raise
        grads = [(xp.empty_like(W), xp.empty_like(b)) for W, b in self.params]

        def write_gradient(k, T_rows, X_rows, ones):
            dW, db = grads[k]
            ops.gemm("T", "N", T_rows, X_rows, _layers.Layer.weight_matrix(dW))
            ops.gemv("T", T_rows, ones, db)

        dX = self._backward(X, F_out, saved, delta, write_gradient, want_dx)
        return grads, dX

    # --- training and checkpoints (see gpu_mlp/training.py and gpu_mlp/checkpoint.py) ---

    def fit(self, X, Y, epochs: int = 10, batch_size: int = 32, lr: Optional[float] = None,
            shuffle: bool = True, seed: int = 0, validation=None, verbose: bool = True,
            on_epoch: Optional[Callable] = None, resume=None, optimizer=None, dp=None,
            comm=None):
        """Train on (X, Y) by minibatch SGD (``lr``, default 0.05) or a
        :mod:`gpu_mlp.optim` ``optimizer``, privately with ``dp``, data-parallel with
        ``comm``, and return the History; see :func:`gpu_mlp.training.fit`."""
        from .training import fit

        return fit(self, X, Y, epochs=epochs, batch_size=batch_size, lr=lr, shuffle=shuffle,
                   seed=seed, validation=validation, verbose=verbose, on_epoch=on_epoch,
                   resume=resume, optimizer=optimizer, dp=dp, comm=comm)

    def save(self, path, history=None, optimizer=None, dp=None) -> None:
        """Write parameters and architecture (and the History, optimizer state and DP
        position to resume training with) to ``path``, atomically; see
        :func:`gpu_mlp.checkpoint.save`."""
        from .checkpoint import save

        save(self, path, history=history, optimizer=optimizer, dp=dp)

    @classmethod
    def load(cls, path, device: str = "auto") -> "Network":
        """The network stored at ``path``, on ``device``; see :func:`gpu_mlp.checkpoint.load`.
        ``MLP.load`` returns MLPs only: a network of other layers is refused."""
        from .checkpoint import CheckpointError, load

        net = load(path, device=device)
        if not isinstance(net, cls):
            raise CheckpointError(f"{os.fsdecode(path)}: holds a {type(net).__name__}, which "
                                  f"{cls.__name__}.load does not return; load it with "
                                  f"gpu_mlp.Network.load")
        return net

    # --- input handling -----------------------------------------------------------------

    def _sample_ndim(self) -> int:
        """How many axes one sample has: 3 for images into a Conv2d, else 1."""
        return 3 if isinstance(self.layers[0], _layers.Conv2d) else 1

    def _raw_inputs(self, X):
        """``(X, single)``: X on the net's device as a batch, its shape and kind checked;
        not yet cast or scanned. ``single``: X was one sample."""
        X = _device.to_device(_checks.unmasked("X", X), self.xp, "X")
        first = self.layers[0]
        if X.ndim < 1 or (isinstance(first, _layers.Dense) and X.ndim <= 2
                          and X.shape[-1] != first.d_in):
            raise ValueError(f"X must have shape {self._expected_input()}, got "
                             f"{tuple(X.shape)}")
        single = X.ndim == self._sample_ndim()
        if single:
            X = X[None]
        if X.shape[0] == 0:
            raise ValueError("X is an empty batch: it must hold at least one sample")
        self._shapes(X.shape[1:])  # every layer must fit, before anything runs
        return X, single

    def _expected_input(self) -> str:
        first = self.layers[0]
        if isinstance(first, _layers.Conv2d):
            return f"(batch, {first.c_in}, height, width) or ({first.c_in}, height, width)"
        return f"(batch, {first.d_in}) or ({first.d_in},)"

    def _shapes(self, input_shape: tuple) -> list:
        """``[(input shape, output shape)]`` of every layer for per-sample
        ``input_shape``; a ValueError naming the first layer that does not fit."""
        input_shape = tuple(int(n) for n in input_shape)
        shapes = self._shape_cache.get(input_shape)
        if shapes is None:
            shapes, shape = [], input_shape
            for k, layer in enumerate(self.layers, start=1):
                try:
                    out = layer.output_shape(shape)
                except ValueError as e:
                    raise ValueError(f"layer {k}, {e}") from None
                shapes.append((shape, out))
                shape = out
            self._shape_cache[input_shape] = shapes
        return shapes

    def _batch(self, X, Y, check: bool):
        """``(X, Y, single)``: a C-contiguous batch in the net's dtype, checked as
        computed with: the value checks come after the cast and are read from the device
        at once."""
        self._check_params()
        X, single = self._raw_inputs(X)
        Y = _device.to_device(_checks.unmasked("Y", Y), self.xp, "Y")
        given = tuple(Y.shape)
        if single:
            Y = Y[None] if Y.ndim < 2 else Y
        X = _checks.cast(X, self.dtype, self.xp)
        verdicts = _checks.Verdicts(self.xp) if check else None
        if check:
            _checks.finite("X", X, self.xp, verdicts)
        d_out = math.prod(self._shapes(X.shape[1:])[-1][1])
        try:
            Y = self.loss.check_targets(Y, X.shape[0], d_out, self.xp, self.dtype,
                                        values=verdicts if check else False)
        except ValueError as e:  # a shape: the values wait in the verdicts
            if not single:
                raise
            sample = tuple(X.shape[1:])
            raise ValueError(f"X is one sample, of shape {sample}, so Y, of shape {given}, "
                             f"must be one sample's target (for a batch of one, give X the "
                             f"shape {(1, *sample)}); with the batch axis added: {e}") from None
        if check:
            verdicts.settle()
        return X, self.xp.ascontiguousarray(Y), single

    def _check_params(self) -> None:
        """``self.params`` is public: entries replaced since must still be what the
        engine computes with, or a step would fail half-way with some layers updated."""
        arrays = [a for pair in self.params for a in pair]
        if len(arrays) == len(self._checked_params) and all(
                a is b for a, b in zip(arrays, self._checked_params)):
            return  # the same objects as last checked (kept alive here): still good
        if len(self.params) != len(self._param_shapes):
            raise ValueError(f"net.params must hold {len(self._param_shapes)} (W, b) pairs, "
                             f"got {len(self.params)}")
        for k, (pair, shapes) in enumerate(zip(self.params, self._param_shapes), start=1):
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                raise ValueError(f"net.params[{k - 1}] must be a (W_{k}, b_{k}) pair")
            for name, a, shape in zip((f"W_{k}", f"b_{k}"), pair, shapes):
                if not isinstance(a, self.xp.ndarray):
                    raise TypeError(f"{name} must be a {self.xp.__name__} array on the "
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
        n = len(self.layers)
        saved, F = [], X
        for k, (layer, (W, b), mode) in enumerate(zip(self.layers, self.params, self._modes)):
            act, bias = layer.activation, layer.bias_view(b)
            A = layer.linear(F, W, ws, out=out if not keep and k == n - 1 else None)
            if k > 0 and (not keep or self._modes[k - 1] == "recompute"):
                ws.give(F)  # F_{k-1}, consumed by C_k and not kept for backward
            if not keep or mode == "output":
                ops.bias_act(act, A, bias)
                if keep:
                    saved.append(_Saved(F=A))
                F = A
            elif mode == "recompute":
                F_next = ws.take(A.shape)
                ops.bias_act_keep(act, A, bias, F_next)
                saved.append(_Saved(A=A))  # F_next is transient: backward makes it again
                F = F_next
            else:  # store_both
                F_next = ws.take(A.shape)
                ops.bias_act_grad(act, A, bias, F_next)  # A now holds D = sigma'(A)
                saved.append(_Saved(F=F_next, D=A))
                F = F_next
        return (F, saved) if keep else F

    def _activation_backward(self, k, saved, delta, ws):
        """dJ/dF_k -> dJ/dA_k in place; afterwards ``saved[k].F`` holds F_k in every mode."""
        act, mode, s = self.layers[k].activation, self._modes[k], saved[k]
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
        ``(T_rows, rows(F_{k-1}))`` to ``sink``. Returns ``(loss, dJ/dX or None)``."""
        ws = self.training_workspace
        B = X.shape[0]
        F_out, saved = self._forward(X, ws, keep=True)
        delta = ws.take(F_out.shape)
        flat = (B, -1)  # the loss sees each sample's output flattened
        scratch = ws.take(ops.loss_scratch_shape(self.loss, (B, F_out[0].size)))
        J = ops.loss_and_grad(self.loss, F_out.reshape(flat), Y, delta.reshape(flat), scale,
                              scratch)
        ws.give(scratch)
        return J, self._backward(X, F_out, saved, delta, sink, want_dx)

    def _backward(self, X, F_out, saved, delta, sink, want_dx: bool):
        """The backward loop from ``delta = dJ/dF_n`` (a workspace buffer): each layer's
        factors ``(T_rows, rows(F_{k-1}))`` go to ``sink``; every buffer of the forward
        pass goes back to the workspace. Returns dJ/dX (or None)."""
        ws = self.training_workspace
        B, n = X.shape[0], len(self.layers)
        shapes = self._shapes(X.shape[1:])
        if self._modes[-1] == "recompute":
            ws.give(F_out)  # the transient output; backward rebuilds it from A_n
        self._activation_backward(n - 1, saved, delta, ws)
        ws.give(saved[n - 1].F)  # F_n: nothing below needs it

        grad_input = None
        deferred = []  # what a sink that keeps the factors reads until it finishes
        keeps = getattr(sink, "keeps_factors", False)
        for k in reversed(range(n)):
            layer, W = self.layers[k], self.params[k][0]
            T_rows = layer.to_rows(delta, ws)
            if k > 0 or want_dx:
                in_shape = (B, *shapes[k][0])
                grad_input = (ws.take(in_shape) if k > 0
                              else self.xp.empty(in_shape, dtype=self.dtype))
                layer.input_grad(T_rows, W, ws, grad_input)  # W_k before the sink updates it
            if k > 0:
                self._activation_backward(k - 1, saved, grad_input, ws)
            F_prev = saved[k - 1].F if k > 0 else X
            X_rows = layer.rows(F_prev, ws)
            sink(k, T_rows, X_rows, ws.ones(T_rows.shape[0]))
            factors = (layer, T_rows, X_rows, F_prev if k > 0 else None)
            if keeps:
                deferred.append(factors)
            else:
                self._give_factors(*factors)
            delta = grad_input
        _finish(sink)
        for factors in deferred:
            self._give_factors(*factors)
        return grad_input if want_dx else None

    def _give_factors(self, layer, T_rows, X_rows, F_prev):
        ws = self.training_workspace
        layer.give_rows(X_rows, ws)
        ws.give(T_rows)
        if F_prev is not None:
            ws.give(F_prev)


class Tape:
    """What one :meth:`Network.forward` kept for its :meth:`Network.backward`: used once."""

    def __init__(self, net, X, F_out, saved):
        self.net, self._kept = net, (X, F_out, saved)

    def take(self):
        if self._kept is None:
            raise ValueError("this tape was used already (a forward pass serves one backward)")
        kept, self._kept = self._kept, None
        return kept

    def release(self) -> None:
        """Give the forward pass's buffers back unused (no backward will come)."""
        if self._kept is not None:
            self.release_buffers(*self.take())

    def release_buffers(self, X, F_out, saved) -> None:
        ws, mode = self.net.training_workspace, self.net._modes
        given = {id(F_out): F_out}
        for s, m in zip(saved, mode):
            for buf in (s.F, s.A, s.D):
                if buf is not None:
                    given[id(buf)] = buf
        ws.give(*given.values())


def _finish(sink) -> None:
    finish = getattr(sink, "finish", None)
    if finish is not None:
        finish()


def _rows(X) -> int:
    """The number of rows of a batch, before any other check (an empty one is allowed
    in a DP or data-parallel step)."""
    shape = getattr(X, "shape", None)
    return shape[0] if shape is not None and len(shape) > 1 else -1


def _per_sample_squares(xp, T, X):
    """``||G_i||^2 + ||g_i||^2`` per sample of one layer, from T (B, P, d_out) and the
    rows X (B, P, K) of its input, without a per-sample gradient where that is cheaper."""
    B, P, d_out = T.shape
    K = X.shape[2]
    bias = _row_squares(xp, T.sum(axis=1))
    if P == 1:  # dense: the outer product's norm is the product of the norms
        return _row_squares(xp, T[:, 0]) * _row_squares(xp, X[:, 0]) + bias
    gram = P * (d_out + K) < d_out * K  # the Gram matrices are the smaller work
    if xp is not np:  # batched on the GPU
        if gram:
            gram_T = xp.matmul(T, T.transpose(0, 2, 1))
            gram_X = xp.matmul(X, X.transpose(0, 2, 1))
            return (gram_T * gram_X).sum(axis=(1, 2)) + bias
        G = xp.matmul(T.transpose(0, 2, 1), X)  # the per-sample gradients, (B, d_out, K)
        return (G * G).sum(axis=(1, 2)) + bias
    # On the CPU one sample at a time through ops.gemm: SciPy's BLAS, as every other GEMM
    # of the step (NumPy's matmul runs on NumPy's own BLAS, whose idle threads spin against
    # SciPy's on a small machine), into one sample's buffers, not B of them.
    squares = np.empty(B, dtype=T.dtype)
    if gram:
        gram_T, gram_X = np.empty((P, P), T.dtype), np.empty((P, P), T.dtype)
        for i in range(B):
            ops.gemm("N", "T", T[i], T[i], gram_T)
            ops.gemm("N", "T", X[i], X[i], gram_X)
            squares[i] = np.vdot(gram_T, gram_X)
    else:
        G = np.empty((d_out, K), T.dtype)
        for i in range(B):
            ops.gemm("T", "N", T[i], X[i], G)
            squares[i] = np.vdot(G, G)
    return squares + bias


def _row_squares(xp, A):
    """``||A[i]||^2`` of each row of a 2-D array, without a temporary of A's size."""
    return xp.einsum("ij,ij->i", A, A)


# --- argument checks --------------------------------------------------------------------

def _check_layers(layers) -> list:
    try:
        layers = list(layers)
    except TypeError:
        raise TypeError("layers must be a list of gpu_mlp.layers.Dense / Conv2d") from None
    if not layers:
        raise ValueError("a network needs at least one layer")
    for k, layer in enumerate(layers, start=1):
        if not isinstance(layer, _layers.Layer):
            raise TypeError(f"layer {k} must be a gpu_mlp.layers.Dense or Conv2d, got "
                            f"{type(layer).__name__}")
    for k, (before, layer) in enumerate(zip(layers, layers[1:]), start=2):
        if isinstance(layer, _layers.Conv2d) and isinstance(before, _layers.Dense):
            raise ValueError(f"layer {k}, {layer}: follows a Dense layer, whose output has "
                             f"no image shape")
        if isinstance(layer, _layers.Conv2d) and before.c_out != layer.c_in:
            raise ValueError(f"layer {k}, {layer}: takes {layer.c_in} channels, but layer "
                             f"{k - 1} gives {before.c_out}")
        if isinstance(layer, _layers.Dense) and isinstance(before, _layers.Dense) \
                and before.d_out != layer.d_in:
            raise ValueError(f"layer {k}, {layer}: takes {layer.d_in} inputs, but layer "
                             f"{k - 1} gives {before.d_out}")
    return layers


def _input_shape(shape) -> tuple:
    try:
        return tuple(_checks.integer("input_shape", n) for n in shape)
    except TypeError:
        raise TypeError(f"input_shape must be a tuple of sizes, got {shape!r}") from None


def _layer_mode(memory: str, act) -> str:
    """The memory mode a layer runs in: "output" where it keeps the same and costs less
    -- identity (F = A, sigma' = 1) in every mode, and softmax for "store_both" (it has
    no elementwise sigma' to store: its output is what backward needs)."""
    if act.name == "identity" or (memory == "store_both" and act.kind.rowwise):
        return "output"
    return memory


def _check_lr(lr) -> float:
    if isinstance(lr, bool) or not isinstance(lr, numbers.Real):
        raise TypeError(f"lr must be a number, got {lr!r}")
    lr = float(lr)
    if not (np.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a finite number > 0, got {lr}")
    return lr


def _check_scalars(dtype, lr, dp) -> None:
    """The scalars a step scales into its kernels -- the learning rate, an optimizer's
    hyperparameters, DP's clip norm and noise -- checked in the net's dtype, as the
    kernels compute with them (:func:`gpu_mlp._checks.scalar`): finite, and those that
    divide or must do something (lr, eps, the clip norm) > 0. A schedule only lowers the
    base lr; the products the rules form are checked too."""
    if isinstance(lr, float):
        scalars = [("", "lr", lr)]
    else:
        where, hyper = f"{type(lr).__name__}: ", lr.hyperparameters()
        scalars = [(where, name, v) for name, v in hyper.items() if isinstance(v, float)]
        scalars += [(where, f"beta{i}", beta)
                    for i, beta in enumerate(hyper.get("betas", ()), start=1)]
        scalars.append((where, "lr * weight_decay", lr.lr * lr.weight_decay))
    if dp is not None:
        C, sigma = dp.max_grad_norm, dp.noise_multiplier
        scalars += [("DP: ", "max_grad_norm", C), ("DP: ", "noise_multiplier", sigma),
                    ("DP: ", "noise_multiplier * max_grad_norm", sigma * C)]
    for where, name, value in scalars:
        _checks.scalar(name, value, dtype, where, positive=name in _POSITIVE)


_POSITIVE = ("lr", "eps", "max_grad_norm")  # 0 would do nothing, or divide by 0


def _too_large(layers, dtype) -> MemoryError:
    """The error for parameters that memory cannot hold, naming their size."""
    n = sum(math.prod(layer.weight_shape) + math.prod(layer.bias_shape) for layer in layers)
    size = n * dtype.itemsize
    unit, scale = next((u, s) for u, s in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("B", 1))
                       if size >= s or s == 1)
    return MemoryError(f"the model needs {size / scale:.3g} {unit} for its {n:,} parameters "
                       f"({dtype.name}): out of memory")


def _iter_pairs(params):
    try:
        pairs = [tuple(p) for p in params]
    except TypeError:
        raise TypeError("params must be a list of (W, b) pairs") from None
    for k, pair in enumerate(pairs, start=1):
        if len(pair) != 2:
            raise ValueError(f"layer {k}: expected a (W, b) pair, got {len(pair)} items")
    return pairs
