"""The engine: :class:`Network`, forward and fused backward pass, on CuPy or NumPy.

One layer loop serves every layer type, backend, memory mode and use; its maths is
docs/MATH.md, "General bilinear layers" (the dense case: "Backward"). Per layer the
forward pass is one GEMM ``A_k = C_k(F_{k-1}, W_k)`` (on im2col rows for a convolution,
:mod:`gpu_mlp.layers`) and one fused bias + activation kernel; the backward pass is one
fused loss-gradient kernel at the output, then per layer ``C_k^dagger`` (one GEMM, then
col2im for a convolution), one fused kernel for the product with sigma', and the
layer's *sink* (:mod:`gpu_mlp.updates`) with the factors ``(T_rows, rows(F_{k-1}))`` of
its weight gradient. :meth:`Network.train_step` applies SGD straight into ``W_k`` and
``b_k`` (BLAS with ``alpha = -lr, beta = 1``: no gradient buffer) or an optimizer's fused
update, after DP's clipping and noise (:mod:`gpu_mlp.privacy`) and the sum over
data-parallel ranks (:mod:`gpu_mlp.distributed`) where asked, the chain of sinks that
its :class:`~gpu_mlp.plan.StepPlan` builds; :meth:`Network.loss_and_gradients` writes fresh gradient arrays and
:meth:`Network.per_sample_grad_norms` keeps only per-sample norms. A sink that reads the
factors after its call keeps them until the loop calls its ``finish()``.

Memory modes (docs/MATH.md, "Memory modes"), what the forward pass keeps per layer:
``"output"`` (F_k; sigma' from F_k), ``"recompute"`` (A_k; F_k and sigma' recomputed in
one kernel), ``"store_both"`` (F_k and sigma'(A_k)). All three give the same numbers.
Each kept buffer goes back to the workspace as soon as the backward pass is done with
it, and ``W_k`` is updated only after ``dJ/dF_{k-1}`` has used the old ``W_k``.

What a call is given is checked before the loop runs (:mod:`gpu_mlp.inputs`); the
per-sample norms are :mod:`gpu_mlp.norms`'; :mod:`gpu_mlp.tape` splits a step into
``forward`` and ``backward`` calls for frameworks.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np

from . import _checks
from . import checkpoint as _checkpoint
from . import device as _device
from . import distributed as _distributed
from . import graph as _graph
from . import inputs as _inputs
from . import layers as _layers
from . import losses as _losses
from . import norms, ops
from . import training as _training
from .plan import StepPlan
from .tape import ForwardBackward
from .updates import EachLayer, Sink, WriteGradients
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
    # where cheap, outside "recompute" (gpu_mlp.layers.Layer.linear): rows(F_{k-1}), and
    # the layer's copy of W_k in its engine's column order
    rows: Any = None
    weight: Any = None


class Network(ForwardBackward):
    """A network of :mod:`gpu_mlp.layers` trained by the backprop of docs/MATH.md.

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

    _updates = 0  # training steps taken: a forward's Tape holds its parameters to it

    def __init__(self, layers, loss="squared", memory="output", device="auto",
                 dtype="float32", seed=0, input_shape=None):
        layers = _inputs.check_layers(layers)
        dt = _checks.dtype_of("dtype", dtype)
        rng = np.random.default_rng(_checks.seed(seed))
        params = []
        # past any array's index range, not just memory (drawn in float64, then cast)
        if any(math.prod(layer.weight_shape) * 8 >= 2**63 for layer in layers):
            raise _too_large(layers, dt)
        try:
            for layer in layers:
                scale = layer.activation.init_gain / math.sqrt(layer.fan_in)
                W = rng.standard_normal(layer.weight_shape) * scale
                with np.errstate(over="ignore"):  # _setup names what overflowed
                    params.append((W.astype(dt), np.zeros(layer.bias_shape, dtype=dt)))
            self._setup(layers, params, loss, memory, device, dt, copy=False)
        except MemoryError:  # NumPy's, or CuPy's OutOfMemoryError: say what was asked for
            raise _too_large(layers, dt) from None
        if input_shape is not None:
            self.inputs.shapes(_inputs.input_shape(input_shape))

    @classmethod
    def from_params(cls, layers, params, loss="squared", memory="output", device="auto",
                    dtype=None, copy=True, check=True) -> "Network":
        """A network of ``layers`` with the given ``(W_k, b_k)``, in torch's layouts;
        ``dtype`` defaults to the parameters' own. The net holds copies; with
        ``copy=False`` it holds the arrays themselves where they are already C-contiguous
        writable arrays of the dtype on the device (as ``numpy.asarray``), and trains in
        their memory -- one copy of the parameters, not two. ``check=False`` takes NaN
        and Inf parameters as they are (a diverged model's, to inspect or copy)."""
        layers = _inputs.check_layers(layers)
        name, xp = _device.resolve(device)
        check = _checks.flag("check", check)
        pairs = _checks.layer_params(layers, params_on(xp, params, layers), check)
        dt = _checks.dtype_of("dtype", pairs[0][0].dtype if dtype is None else dtype)
        net = cls.__new__(cls)
        net._setup(layers, pairs, loss, memory, name, dt, _checks.flag("copy", copy), check)
        return net

    def _setup(self, layers, params, loss, memory, device, dtype, copy=True, check=True):
        acts = [layer.activation for layer in layers]
        if memory not in MEMORY_MODES:
            raise ValueError(f"unknown memory mode {memory!r}; valid: {', '.join(MEMORY_MODES)}")
        if memory == "output":
            refused = list(dict.fromkeys(str(a) for a in acts if not a.has_grad_from_output))
            if refused:
                raise ValueError(f"memory='output' needs sigma' as a function of the output, "
                                 f"which {', '.join(refused)} lacks; use memory='recompute' "
                                 f"or 'store_both'")
        for k, a in enumerate(acts, start=1):  # as its kernels compute with it
            if a.kind.has_alpha:
                _checks.scalar("alpha", a.alpha, dtype, f"layer {k}'s {a}: ", positive=True)
        loss = _losses.get(loss)
        if isinstance(layers[-1], _layers.Dense):  # a convolution's: per input shape
            loss.check_outputs(layers[-1].d_out)
        if loss.name == "softmax_cross_entropy":
            if acts[-1].kind.rowwise:
                raise ValueError("softmax_cross_entropy takes logits and applies softmax "
                                 "itself; use an identity output layer (softmax would be "
                                 "applied twice)")
        self.device, self.xp = _device.resolve(device)
        self.dtype = np.dtype(dtype)
        self.loss = loss
        self.memory = memory
        self.layers = list(layers)
        self._modes = [_layer_mode(memory, a) for a in acts]
        xp = self.xp
        with np.errstate(over="ignore"):
            self.params = _own(xp, params, self.dtype, copy)
        for k, pair in enumerate(self.params if check else [], start=1):  # finite given,
            for name, a in zip((f"W_{k}", f"b_{k}"), pair):              # finite as cast
                ops.finite(f"{name} in {self.dtype}", a, xp)
        # what each call is given is checked against the net (gpu_mlp/inputs.py)
        self.inputs = _inputs.Inputs(self.layers, loss, xp, self.dtype,
                                     [(W.shape, b.shape) for W, b in self.params])
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
        """Release the buffers kept between calls (training's and predict's, and the
        captured steps' graphs); the next call allocates them again. On a GPU the memory
        goes back to CuPy's pool, which keeps it for reuse
        (``cupy.get_default_memory_pool().free_all_blocks()`` hands it back to the
        driver)."""
        self.training_workspace.clear()
        self.inference_workspace.clear()
        self.step_graphs.clear()

    # --- copies: pickle, copy.deepcopy, a process pool -----------------------------------

    def __getstate__(self) -> dict:
        """What a copy is made from: the layers, the parameters (as NumPy arrays), the
        loss, memory mode, device and dtype. The copy makes its own buffers, engine forms
        and graphs, and is bound to no optimizer; unpickled where its device is missing
        (a GPU net on a machine without one), it raises as ``device="cuda"`` would there
        (``gpu_mlp.checkpoint`` moves a net between devices)."""
        self.inputs.check_params(self.params)  # (a copy could not compute with others)
        # the loss by name, or itself where it is not the table's (clipped: Loss.clipped)
        loss = self.loss.name if self.loss is _losses.TABLE.get(self.loss.name) else self.loss
        return {"layers": self.layers, "loss": loss, "memory": self.memory,
                "device": self.device, "dtype": self.dtype.name,
                "params": [(_device.to_numpy(W), _device.to_numpy(b)) for W, b in self.params]}

    def __setstate__(self, state: dict) -> None:
        # the values as they are: a diverged net copies too (from_params(check=False))
        self._setup(state["layers"], state["params"], state["loss"], state["memory"],
                    state["device"], np.dtype(state["dtype"]), check=False)

    @property
    def step_graphs(self) -> _graph.StepGraphs:
        """The training steps captured as CUDA graphs (:mod:`gpu_mlp.graph`)."""
        graphs = self.__dict__.get("_step_graphs")
        if graphs is None:
            graphs = self._step_graphs = _graph.StepGraphs()
        return graphs

    # --- public steps -------------------------------------------------------------------

    def predict(self, X, batch_size: Optional[int] = None, check: bool = True):
        """The network output for a batch (B, *input_shape) or one sample.

        Large inputs run in chunks of ``batch_size`` rows; by default as many as fit in
        ``PREDICT_BUFFER_BYTES`` (64 MiB) of buffers, so memory does not grow with B.
        ``check=False`` skips the scan of X for NaN/Inf (a device sync on a GPU): they
        propagate, as in PyTorch.
        """
        check = _checks.flag("check", check)
        self.inputs.check_params(self.params)
        X, single = self.inputs.raw(X)
        shapes = self.inputs.shapes(X.shape[1:])
        rows = (self._predict_rows(shapes) if batch_size is None
                else _checks.integer("batch_size", batch_size))
        out = self.xp.empty((X.shape[0], *shapes[-1][1]), dtype=self.dtype)
        verdicts = _checks.Verdicts(self.xp)
        for first in range(0, X.shape[0], rows):
            chunk = _checks.cast(X[first:first + rows], self.dtype, self.xp)
            if check:
                ops.finite("X", chunk, self.xp, verdicts)
                verdicts.settle()
            self._forward(chunk, self.inference_workspace, keep=False,
                          out=out[first:first + rows])
        return out[0] if single else out

    def _predict_rows(self, shapes) -> int:
        # what a chunk leaves in the workspace: its buffers are kept per output shape,
        # at most two of one (a layer's input and output), and one column pool that the
        # convolutions share -- not the widest layer's alone
        outputs, rows = {}, 0
        for layer, (s_in, s_out) in zip(self.layers, shapes):
            size, seen = math.prod(s_out), outputs.get(tuple(s_out), (0, 0))[1]
            outputs[tuple(s_out)] = (size, min(2, seen + 1))
            rows = max(rows, layer.working_size(s_in) - math.prod(s_in) - size)
        per_row = math.prod(shapes[0][0]) + rows + sum(
            size * count for size, count in outputs.values())
        return max(1, PREDICT_BUFFER_BYTES // (per_row * self.dtype.itemsize))

    def loss_and_gradients(self, X, Y):
        """``(loss, [(dW_k, db_k)], dX)`` as :func:`gpu_mlp.reference.network_loss_and_gradients`.

        Nothing is updated. The loss is a 0-d array on the net's device.
        """
        X, Y, single = self.inputs.batch(self.params, X, Y, check=True)
        xp = self.xp
        grads = [(xp.empty_like(W), xp.empty_like(b)) for W, b in self.params]
        J, dX = self._backprop(X, Y, WriteGradients(grads, self.training_workspace),
                               scale=1.0 / X.shape[0], want_dx=True)
        return J, grads, (dX[0] if single else dX)

    def train_step(self, X, Y, lr, check: bool = True, dp=None, comm=None):
        """One update on the batch (X, Y), fused into the backward pass; returns the loss.

        ``lr`` a number: plain SGD, ``W_k <- W_k - lr dJ/dW_k`` as one GEMM straight into
        ``W_k``, done as soon as ``T_k`` is known and ``dJ/dF_{k-1}`` has used the old
        ``W_k``; no gradient buffer exists. ``lr`` an optimizer of :mod:`gpu_mlp.optim`:
        each layer's gradient lives in the optimizer's one scratch buffer from its GEMM to
        the optimizer's fused update. ``lr`` a :class:`gpu_mlp.plan.StepPlan`: the step it
        plans (it holds its own ``dp`` and ``comm``); the others become one too. The loss
        (the batch mean) comes back as a 0-d array on the device, one of two buffers the
        net keeps for it and takes in turn, so a steady-state step allocates nothing: it
        keeps its value through the next step, and for good while you hold a reference
        to it (a loss still referenced when its buffer's turn comes back is left to you
        and replaced; ``float(J)`` reads it, one synchronisation). With ``check=False``
        the data are not scanned for NaN/Inf and bad labels, which on a GPU costs one
        device-to-host synchronisation -- for a batch on the GPU: a host batch (NumPy
        arrays, lists) is scanned on the host, then copied into buffers the net keeps for
        its shape, with no allocation and no wait; shapes are always checked.

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

        On a GPU a step's configuration (batch shape, rule and its settings, DP, memory
        mode, the parameter arrays) runs eagerly on its first use, is captured as one
        CUDA graph on its second and replayed after (:mod:`gpu_mlp.graph`): the same
        numbers, bit for bit, with the host's work per step cut to copying the batch in
        and launching the graph. Bad input still raises before anything runs, and
        data-parallel steps (``comm``, on any number of ranks: their collectives are not
        captured) always run eagerly.
        """
        try:
            plan, check = StepPlan.of(lr, dp, comm), _checks.flag("check", check)
        except Exception as e:
            if comm is None or isinstance(lr, StepPlan):
                raise
            # every rank hears of it in the step's first collective, as of a bad batch
            _distributed.communicator(comm, self).row_counts(0, failed=e)
        return self._step(X, Y, plan, check, global_loss=True)

    def _step(self, X, Y, plan: StepPlan, check, expected_batch=None, counts=None,
              global_loss=False, capture=True, lasting=True, prepared=False, gathered=None,
              tally=None, graphs=_graph.MAX_GRAPHS):
        """:meth:`train_step` by ``plan``; ``expected_batch``: what DP divides by (fit's
        Poisson sampling: the expected batch size); ``counts``: every rank's rows, when
        known; ``global_loss``: with communication, return the global batch's loss (else
        this rank's, with no wait: fit sums the epoch's losses over the ranks at its end);
        ``capture``: whether the step may be captured as a CUDA graph
        (:mod:`gpu_mlp.graph`; fit's Poisson samples, of ever other sizes, are not);
        ``lasting=False``: the loss is read at once, and may be one the next step
        overwrites (:meth:`StepGraphs.step <gpu_mlp.graph.StepGraphs.step>`);
        ``prepared``: X and Y are rows of data checked whole by :meth:`Inputs.batch
        <gpu_mlp.inputs.Inputs.batch>` (fit's), so only the parameters are checked
        here; ``gathered``: X and Y are the buffers those rows are to be gathered into
        (:class:`gpu_mlp.graph.Gathered`: by the step, or inside its graph); ``tally``: a
        :class:`gpu_mlp.plan.LossTally` the step adds its loss to (not on a rank's empty
        share, which has none); ``graphs``: how many graphs the net may hold for such
        steps (fit's Poisson samples: one per size)."""
        comm = plan.communicator(self)
        if comm is None:
            return self._step_of(X, Y, plan, comm, check, expected_batch, counts,
                                 global_loss, capture, lasting, prepared, gathered, tally,
                                 graphs)
        with comm.guard():  # an error on one rank alone: the others wait in collectives
            return self._step_of(X, Y, plan, comm, check, expected_batch, counts,
                                 global_loss, capture, lasting, prepared, gathered, tally,
                                 graphs)

    def _step_of(self, X, Y, plan, comm, check, expected_batch, counts, global_loss,
                 capture, lasting, prepared, gathered, tally, graphs):
        """:meth:`_step` on ``comm``, plan.communicator(self)."""
        try:
            X, Y, B, empty = self._step_input(X, Y, plan, comm, check, expected_batch,
                                              prepared)
        except Exception as e:
            if comm is None or counts is not None:
                raise
            # told to every rank in the step's first collective, and raised on each: a
            # mistake every rank makes alike reaches the caller, not an MPI_Abort
            comm.row_counts(0, failed=e)
        if comm is not None:
            counts = comm.row_counts(B) if counts is None else counts
            if plan.private:
                plan.dp.agree(comm)
            total = sum(counts)
        else:
            total = B
        divisor = total if expected_batch is None else expected_batch
        self._updates += 1  # checked: the step updates the parameters (Tape sees it)
        if empty:
            self._empty_backward(plan.sink(self, B, counts, divisor))
            J = self.xp.zeros((), dtype=self.dtype)
        else:
            # DP needs each sample's own gradient (scale 1) and divides by the batch itself
            scale = 1.0 if plan.private else 1.0 / total
            J = self.step_graphs.step(self, X, Y, plan, B, counts, divisor, scale,
                                      capture=capture, lasting=lasting, gathered=gathered,
                                      tally=tally, graphs=graphs)
        if comm is None or not global_loss:
            return J
        summed = comm.sum([float(J) * B])[0]  # every rank's loss times its rows
        return self.xp.asarray(summed / total if total else 0.0, dtype=self.dtype)

    def _step_input(self, X, Y, plan, comm, check, expected_batch, prepared):
        """``(X, Y, B, empty)``: a step's plan and batch checked (nothing changed, or a
        TypeError or ValueError), the batch as it will be computed with."""
        plan.check(self)
        empty = (plan.private or plan.parallel) and _inputs.rows(X) == 0
        if empty and comm is None and expected_batch is None:
            raise ValueError("X is an empty batch: a private step divides by the batch "
                             "size, so it needs at least one sample (fit's Poisson "
                             "samples divide by the expected size instead)")
        if empty:  # nothing to forward: only the noise and the collectives remain
            self.inputs.check_params(self.params, write=True)
            self.inputs.shapes(tuple(X.shape[1:]))
        elif prepared:
            self.inputs.check_params(self.params, write=True)
        else:
            X, Y, _ = self.inputs.batch(self.params, X, Y, check=check, write=True,
                                        staging=self.training_workspace)
        return X, Y, (0 if empty else X.shape[0]), empty

    def _empty_backward(self, sink: Sink):
        """What a backward pass over no rows hands the sink: empty factors per layer."""
        xp = self.xp
        for k in reversed(range(len(self.layers))):
            W = _layers.Layer.weight_matrix(self.params[k][0])
            sink(k, xp.empty((0, W.shape[0]), self.dtype), xp.empty((0, W.shape[1]), self.dtype),
                 xp.empty(0, self.dtype))
        sink.finish()

    def per_sample_grad_norms(self, X, Y):
        """(B,) norms of each sample's own loss gradient over all W_k and b_k.

        From the factors alone, no per-sample gradient formed where that is cheaper:
        a dense layer's ``||G_i|| = ||T_i|| ||x_i||``, a convolution's Gram or direct
        form, whichever costs less (docs/MATH.md, "Factored weight gradients" and the
        end of "General bilinear layers").
        """
        X, Y, _ = self.inputs.batch(self.params, X, Y, check=True)
        xp, B = self.xp, X.shape[0]
        squares = xp.zeros(B, dtype=self.dtype)

        def accumulate(k, T_rows, X_rows):
            norms.add_squares(xp, T_rows.reshape(B, -1, T_rows.shape[1]),
                              ops.sample_rows(X_rows, B), squares, self.training_workspace)

        self._backprop(X, Y, EachLayer(accumulate), scale=1.0, want_dx=False)
        return xp.sqrt(squares)

    # --- training and checkpoints (see gpu_mlp/training.py and gpu_mlp/checkpoint.py) ---

    def fit(self, X, Y, epochs: int = 10, batch_size: int = 32, lr: Optional[float] = None,
            shuffle: bool = True, seed: int = 0, validation=None, verbose: bool = True,
            on_epoch: Optional[Callable] = None, resume=None, optimizer=None, dp=None,
            comm=None, plan: Optional[StepPlan] = None):
        """Train on (X, Y) by minibatch SGD (``lr``, default 0.05) or a
        :mod:`gpu_mlp.optim` ``optimizer``, privately with ``dp``, data-parallel with
        ``comm`` (or all three as one ``plan``), and return the History; see
        :func:`gpu_mlp.training.fit`."""
        return _training.fit(self, X, Y, epochs=epochs, batch_size=batch_size, lr=lr,
                             shuffle=shuffle, seed=seed, validation=validation,
                             verbose=verbose, on_epoch=on_epoch, resume=resume,
                             optimizer=optimizer, dp=dp, comm=comm, plan=plan)

    def save(self, path, history=None, optimizer=None, dp=None,
             plan: Optional[StepPlan] = None) -> None:
        """Write parameters and architecture (and the History, optimizer state and DP
        position, or a ``plan``'s, to resume training with) to ``path``, atomically; see
        :func:`gpu_mlp.checkpoint.save`."""
        _checkpoint.save(self, path, history=history, optimizer=optimizer, dp=dp, plan=plan)

    @classmethod
    def load(cls, path, device: str = "auto") -> "Network":
        """The network stored at ``path``, on ``device``; see :func:`gpu_mlp.checkpoint.load`.
        ``MLP.load`` returns MLPs only: a network of other layers is refused."""
        net = _checkpoint.load(path, device=device)
        if not isinstance(net, cls):
            raise _checkpoint.CheckpointError(
                f"{os.fsdecode(path)}: holds a {type(net).__name__}, which {cls.__name__}.load "
                f"does not return; load it with gpu_mlp.Network.load")
        return net

    # --- the layer loop -----------------------------------------------------------------

    def _forward(self, X, ws: Workspace, keep: bool, out=None, forms_batch=None):
        """Forward pass. ``keep=False``: the output, written into ``out`` (predict).
        ``keep=True``: ``(F_n, saved)`` with what each layer keeps for the backward pass.
        Each layer runs in its engine form (:attr:`gpu_mlp.layers.Layer.engine`): what it
        keeps is in that layout; ``F_n`` is in torch's. ``forms_batch``: see
        :meth:`_engine_layers`."""
        layers, n = self._engine_layers(X.shape[0], forms_batch), len(self.layers)
        direct_out = not keep and not layers[-1].gives_channels_last
        if keep:
            ws.largest_batch = max(ws.largest_batch, X.shape[0])
        saved, F = [], X
        for k, (layer, (W, b), mode) in enumerate(zip(layers, self.params, self._modes)):
            act, rows = layer.activation, layer.as_rows
            F_in = self._relayout(layers, k, F, ws)
            s = _Saved() if keep else None
            A = layer.linear(F_in, W, ws, out=out if direct_out and k == n - 1 else None,
                             # the net's mode, not the layer's: an identity layer runs
                             # as "output" in a "recompute" net, which keeps no columns
                             kept=s if keep and self.memory != "recompute" else None)
            if F_in is not F:
                ws.give(F_in)
            if k > 0 and (not keep or self._modes[k - 1] == "recompute"):
                ws.give(F)  # F_{k-1}, consumed by C_k and not kept for backward
            if not keep or mode == "output":
                ops.bias_act(act, rows(A), b, ws)
                if keep:
                    s.F = A
                F = A
            elif mode == "recompute":
                F_next = ws.take(A.shape)
                ops.bias_act_keep(act, rows(A), b, rows(F_next), ws)
                s.A = A  # F_next is transient: backward makes it again
                F = F_next
            else:  # store_both
                F_next = ws.take(A.shape)
                ops.bias_act_grad(act, rows(A), b, rows(F_next))  # A now holds D = sigma'(A)
                s.F, s.D = F_next, A
                F = F_next
            if keep:
                saved.append(s)
        if layers[-1].gives_channels_last:  # the output in torch's layout (NCHW)
            F_out = _layers.to_channels_first(F, ws, out=None if keep else out)
            if not keep or self._modes[-1] == "recompute":
                ws.give(F)
            F = F_out
        return (F, saved) if keep else F

    def _engine_layers(self, batch: int, forms_batch=None):
        """The layers' engine forms for a batch of ``batch`` samples
        (:func:`gpu_mlp.layers.engine_forms`), kept per list of layers and batch size;
        or, given, for ``forms_batch`` samples. A data-parallel step on several ranks
        passes 0 (the forms of no batch, which an empty rank's factors have): every
        rank's factors are then in one layout, which ranks that all-gather them need."""
        key = (batch if forms_batch is None else forms_batch,
               ops.is_numpy(self.params[0][0]))  # (the tests' CuPy stand-in says no)
        made = getattr(self, "_engine", None)
        if made is None or made[0] is not self.layers or len(made[1]) > 16:
            made = self._engine = (self.layers, {})
        forms = made[1].get(key)
        if forms is None:
            forms = made[1][key] = _layers.engine_forms(self.layers, key[1], key[0])
        return forms

    @staticmethod
    def _relayout(layers, k, F, ws, backward=False):
        """``F`` between the engine forms ``layers[k-1]`` (the input X for k = 0) and
        ``layers[k]`` (the output for k = n) in the layout of the one it goes to: itself
        where both keep one layout, else a copy into a workspace buffer. ``backward``: a
        gradient, from layer k's layout to layer k-1's."""
        before = layers[k - 1].gives_channels_last if k > 0 else False
        after = layers[k].takes_channels_last if k < len(layers) else False
        if before == after:
            return F
        if backward:
            before, after = after, before
        return _layers.to_channels_last(F, ws) if after else _layers.to_channels_first(F, ws)

    def _fuses_derivative(self, layers, k, grad_input) -> bool:
        """Whether layer k's input gradient takes layer k-1's backward (dJ/dF -> dJ/dA)
        into its last pass: an elementwise sigma' from the output ("output" mode), no
        layout change between them, and a form that can (a GPU's col2im)."""
        act = self.layers[k - 1].activation
        return (self._modes[k - 1] == "output" and not act.kind.is_identity
                and not act.kind.rowwise
                and layers[k - 1].gives_channels_last == layers[k].takes_channels_last
                and layers[k].fuses_derivative(grad_input))

    def _activation_backward(self, k, saved, delta, ws):
        """dJ/dF_k -> dJ/dA_k in place; afterwards ``saved[k].F`` holds F_k in every mode."""
        act, mode, s = self.layers[k].activation, self._modes[k], saved[k]
        if mode == "output":
            ops.grad_from_output(act, s.F, delta, ws)
        elif mode == "recompute":
            ops.recompute_grad(act, s.A, delta, ws)
            s.F, s.A = s.A, None
        else:
            ops.mul(delta, s.D)
            ws.give(s.D)
            s.D = None

    def _backprop(self, X, Y, sink: Sink, scale: float, want_dx: bool, loss_out=None,
                  forms_batch=None):
        """Forward, output delta, then the backward loop handing each layer's factors
        ``(T_rows, rows(F_{k-1}))`` to ``sink``. Returns ``(loss, dJ/dX or None)``; the
        loss into ``loss_out`` (a captured step's own buffer) if given. ``forms_batch``:
        see :meth:`_engine_layers`."""
        ws = self.training_workspace
        B = X.shape[0]
        F_out, saved = self._forward(X, ws, keep=True, forms_batch=forms_batch)
        delta = ws.take(F_out.shape)
        flat = (B, -1)  # the loss sees each sample's output flattened
        scratch = ws.take(ops.loss_scratch_shape(self.loss, (B, F_out[0].size)))
        # the loss into a 0-d buffer of the workspace (Workspace.loss: reused when free)
        J = ops.loss_and_grad(self.loss, F_out.reshape(flat), Y, delta.reshape(flat), scale,
                              scratch, out=ws.loss() if loss_out is None else loss_out,
                              ones=ws.ones(ops.loss_terms(self.loss, scratch).size))
        ws.give(scratch)
        return J, self._backward(X, F_out, saved, delta, sink, want_dx, forms_batch)

    def _backward(self, X, F_out, saved, delta, sink: Sink, want_dx: bool,
                  forms_batch=None):
        """The backward loop from ``delta = dJ/dF_n`` (a workspace buffer): each layer's
        factors ``(T_rows, rows(F_{k-1}))`` go to ``sink``; every buffer of the forward
        pass goes back to the workspace. Returns dJ/dX (or None)."""
        ws, xp = self.training_workspace, self.xp
        B, n = X.shape[0], len(self.layers)
        layers = self._engine_layers(B, forms_batch)
        shapes = self.inputs.shapes(X.shape[1:])
        if F_out is not saved[n - 1].F:
            ws.give(F_out)  # recompute's transient output, or the torch-layout copy
        delta_n = self._relayout(layers, n, delta, ws, backward=True)
        if delta_n is not delta:
            ws.give(delta)
            delta = delta_n
        self._activation_backward(n - 1, saved, delta, ws)
        ws.give(saved[n - 1].F)  # F_n: nothing below needs it

        grad_input = None
        # dJ/dX, the caller's array in torch's layout (made first: held to the end anyway)
        dX = xp.empty((B, *shapes[0][0]), dtype=self.dtype) if want_dx else None
        deferred = []  # what a sink that keeps the factors reads until it finishes
        keeps = sink.keeps_factors
        # a sink that forms each gradient as it comes takes a large rows(x) block by block
        blocks = not keeps and sink.takes_row_blocks
        for k in reversed(range(n)):
            layer, W, s = layers[k], self.params[k][0], saved[k]
            T_rows = layer.to_rows(delta, ws)
            # at the entrance a form that takes NHWC (a GPU's) leaves X and dJ/dX to the
            # layer's torch form (NCHW im2col and col2im): no copy of either
            form = self.layers[k] if k == 0 and layer.takes_channels_last else layer
            derivative = None  # layer k-1's sigma', when C^dagger's last pass takes it
            if k > 0 or want_dx:
                grad_input = dX if k == 0 else ws.take((B, *layer.engine_shape(shapes[k][0])))
                if k > 0 and self._fuses_derivative(layers, k, grad_input):
                    derivative = (self.layers[k - 1].activation, saved[k - 1].F)
                # W_k before the sink updates it
                form.input_grad(T_rows, W, ws, grad_input, weight=s.weight,
                                derivative=derivative)
                relaid = (self._relayout(layers, k, grad_input, ws, backward=True) if k > 0
                          else grad_input)
                if relaid is not grad_input:
                    ws.give(grad_input)
                    grad_input = relaid
            if s.weight is not None:
                ws.give(s.weight)
                s.weight = None
            if k > 0 and derivative is None:
                self._activation_backward(k - 1, saved, grad_input, ws)
            F_prev = saved[k - 1].F if k > 0 else X
            F_in = F_prev
            if s.rows is not None:  # kept by the forward
                X_rows, s.rows = s.rows, None
            else:  # made again: cheaper than kept
                F_in = self._relayout(layers, k, F_prev, ws) if k > 0 else X
                X_rows = form.rows(F_in, ws, blocks)
            sink(k, T_rows, X_rows, ws.ones(T_rows.shape[0]))
            factors = (form, T_rows, X_rows, F_prev if k > 0 else None,
                       F_in if F_in is not F_prev else None)
            if keeps:
                deferred.append(factors)
            else:
                self._give_factors(*factors)
            delta = grad_input
        sink.finish()
        for factors in deferred:
            self._give_factors(*factors)
        return grad_input if want_dx else None

    def _give_factors(self, layer, T_rows, X_rows, F_prev, F_in):
        ws = self.training_workspace
        layer.give_rows(X_rows, ws)
        ws.give(T_rows)
        for buffer in (F_prev, F_in):
            if buffer is not None:
                ws.give(buffer)


_checkpoint.register("Network", Network)


def params_on(xp, params, layers=None) -> list[tuple]:
    """``params`` as ``(W_k, b_k)`` pairs on ``xp``'s device (one per layer, if given):
    a masked array must have no masked entry (NaN hides there as easily as anything)."""
    return [tuple(_device.to_device(_checks.unmasked(name, a), xp, name)
                  for name, a in ((f"W_{k}", W), (f"b_{k}", b)))
            for k, (W, b) in enumerate(_checks.pairs(params, layers), start=1)]


def _own(xp, params, dtype, copy: bool) -> list[tuple]:
    """The net's arrays of ``params``: C-contiguous copies in ``dtype``, or with
    ``copy=False`` the arrays themselves where they are such arrays already, writable
    (the steps update them in place), aligned (BLAS writes no other) and apart from one
    another (tied weights would get each update twice)."""
    held = []
    for a in (a for pair in params for a in pair):
        own = None if copy else xp.asarray(a, dtype=dtype, order="C")
        if own is None or not _inputs.writable(own) or any(
                xp.may_share_memory(own, h) for h in held):
            own = xp.array(a, dtype=dtype, order="C", copy=True)
        held.append(own)
    return list(zip(held[::2], held[1::2]))


def _layer_mode(memory: str, act) -> str:
    """The memory mode a layer runs in: "output" where it keeps the same and costs less
    -- identity (F = A, sigma' = 1) in every mode, and softmax for "store_both" (it has
    no elementwise sigma' to store: its output is what backward needs)."""
    if act.kind.is_identity or (memory == "store_both" and act.kind.rowwise):
        return "output"
    return memory


def _too_large(layers, dtype) -> MemoryError:
    """The error for parameters that memory cannot hold, naming their size."""
    n = sum(math.prod(layer.weight_shape) + math.prod(layer.bias_shape) for layer in layers)
    size = n * dtype.itemsize
    unit, scale = next((u, s) for u, s in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("B", 1))
                       if size >= s or s == 1)
    if size < 1e300:
        amount, count = f"{size / scale:.3g} {unit}", f"{n:,}"
    else:  # past any float, and perhaps Python's digits for a str
        amount, count = f"2^{size.bit_length() - 1} bytes and more", f"2^{n.bit_length() - 1}+"
    return MemoryError(f"the model needs {amount} for its {count} parameters "
                       f"({dtype.name}): out of memory")
