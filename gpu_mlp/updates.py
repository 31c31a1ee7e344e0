"""What happens to a layer's gradient: the sinks of the backward pass.

The backward loop of :class:`gpu_mlp.Network` hands every layer's gradient to a *sink*
as its two factors, ``G_k = T_rows^T X_rows`` and ``g_k = T_rows^T 1``, never formed
unless the sink forms it (:func:`gpu_mlp.ops.weight_gradient`: ``X_rows`` (rows, K) has
W's column order, or comes as (rows, kh, kw, c_in) in a convolution's windows' order) (docs/MATH.md, "Factored weight gradients" and "Memory modes"),
last layer first and only after ``dJ/dF_{k-1}`` has used the old ``W_k``; then it calls
``sink.finish()``. Sinks chain, each stage handing the factors on::

    [DP: clip each sample, add noise] -> [data parallel: sum over ranks] -> Apply

A :class:`Sink` is a callable ``sink(k, T_rows, X_rows, ones, noise=None)`` with
``keeps_factors`` (True when it reads the factors after its call returns -- DP needs
every layer's norms before it clips any, communication overlaps the backward pass; the
loop then gives the buffers back only after ``finish()``), ``takes_row_blocks`` (True
when all it does with ``X_rows`` is :func:`gpu_mlp.ops.weight_gradient`, which also
takes a convolution's rows(x) made block by block, :class:`gpu_mlp.ops.RowBlocks`,
where they would outgrow ``ops.COLUMN_BUDGET_BYTES``) and ``finish()`` (called once,
after the last layer). A :class:`Stage` hands the factors to its ``downstream`` and
finishes it when it finishes; a :class:`Rule` ends the chain (:class:`Apply`, the update
rule, plain SGD or an optimizer's fused kernel; :class:`WriteGradients`;
:class:`EachLayer`) and also takes a gradient already formed (``gradient(k, G, noise)``,
for the data-parallel allreduce). :class:`gpu_mlp.plan.StepPlan` builds a step's chain.

``noise`` is None, or DP's ``noise(k, which, array, alpha)``, which adds ``alpha`` times
the Gaussian noise of layer ``k``'s weight (``which = 0``) or bias (``1``) gradient to
``array`` in place (``alpha`` a number; on a GPU a device view of
:class:`gpu_mlp.plan.StepScalars` that holds ``alpha`` times the noise's std already).
The stage that forms the summed gradient calls it, once per step: the same noise on
every rank, so it is added once, not once per rank.
"""

from __future__ import annotations

from typing import Callable, Optional, Protocol, Sequence

from . import ops
from .layers import Layer


class Sink(Protocol):
    """What the backward loop hands each layer's gradient to, as its two factors."""

    keeps_factors: bool  # reads the factors after its call returns, until finish()
    takes_row_blocks: bool  # X_rows may be ops.RowBlocks (read by ops.weight_gradient)

    def __call__(self, k: int, T_rows, X_rows, ones, noise: Optional[Callable] = None) -> None:
        """Layer ``k``'s gradient ``G_k = T_rows^T X_rows``, ``g_k = T_rows^T ones`` (and
        ``noise``, see the module), last layer first."""

    def finish(self) -> None:
        """Called once, after the last layer."""


class Stage:
    """A sink between others: it hands the factors, changed or summed, on to
    ``downstream`` (a :class:`Sink`), and finishes it after its own :meth:`finish`."""

    keeps_factors = True
    takes_row_blocks = False

    def __init__(self, downstream: Sink):
        self.downstream = downstream

    def __call__(self, k, T_rows, X_rows, ones, noise=None):
        raise NotImplementedError

    def finish(self) -> None:
        self.downstream.finish()


class Rule:
    """The end of a chain: what becomes of each layer's gradient. It reads the factors
    only during its call, and takes a gradient formed already (:meth:`gradient`)."""

    keeps_factors = False
    takes_row_blocks = False

    def __call__(self, k, T_rows, X_rows, ones, noise=None):
        raise NotImplementedError

    def gradient(self, k: int, G, noise: Optional[Callable] = None) -> None:
        """Layer ``k``'s gradient formed: ``G`` is flat, ``dW_k`` then ``db_k`` (e.g.
        summed over ranks by an allreduce); it may be overwritten."""
        raise NotImplementedError

    def finish(self) -> None:
        """Nothing to finish unless a rule says so."""


class Apply(Rule):
    """The update rule of one step, applied layer by layer as the gradients arrive.

    Plain SGD with weight decay, ``W <- keep W - lr G`` (``kernels=None``): one GEMM
    straight into ``W`` (``alpha = -lr, beta = keep``), no gradient buffer; ``keep`` is
    ``(keep of W, keep of b)``. Otherwise ``kernels = (kernel of W, kernel of b)``, each
    ``kernel(w, g, state)`` a fused in-place update of a flat tensor from its gradient
    ``g`` (in ``scratch``, one buffer for all layers) and its state (``state(k)`` gives
    ``(W_k's, b_k's)`` lists). ``on_finish`` runs once the step is done (the optimizer
    counts it).

    ``scalars``: a :class:`gpu_mlp.plan.StepScalars` (CuPy): the step's scalars -- the
    GEMMs' ``alpha = -lr`` and ``beta = keep``, the noise's scale -- are read on the
    device from its views (``lr`` and ``keep`` are then its views too), so that a step
    captured as a CUDA graph sees each replay's own. ``ws``: the workspace that lends
    :func:`gpu_mlp.ops.weight_gradient` its buffer (the net's).
    """

    takes_row_blocks = True

    def __init__(self, params, lr: float = 0.0, keep=(1.0, 1.0),
                 kernels: Optional[Sequence[Callable]] = None, scratch=None,
                 state: Optional[Callable] = None, on_finish: Optional[Callable] = None,
                 scalars=None, ws=None):
        self.params, self.lr, self.keep, self.ws = params, lr, keep, ws
        self.kernels, self.scratch, self.state = kernels, scratch, state
        self.on_finish = on_finish
        if scalars is None:  # host numbers: the noise's alpha times its std, on the host
            self.alpha, self.betas, self.noise_lr, self.noise_one = -lr, keep, -lr, 1.0
        else:  # device views; the noise's are its scale already (see StepScalars)
            v = scalars.views
            self.lr, self.keep = v["lr"], (v["keep_W"], v["keep_b"])
            self.alpha, self.betas = v["alpha"], self.keep
            self.noise_lr, self.noise_one = v["noise_lr"], v["noise_one"]

    def __call__(self, k, T_rows, X_rows, ones, noise=None):
        """Apply ``G = T_rows^T X_rows``, ``g = T_rows^T 1`` (+ noise) to layer ``k``."""
        W, b = self.params[k]
        if self.kernels is None:
            alpha, (beta_W, beta_b) = self.alpha, self.betas
            ops.weight_gradient(T_rows, X_rows, Layer.weight_matrix(W), alpha=alpha,
                                beta=beta_W, ws=self.ws)
            if noise is not None:
                noise(k, 0, W.reshape(-1), self.noise_lr)
            ops.gemv("T", T_rows, ones, b, alpha=alpha, beta=beta_b)
            if noise is not None:
                noise(k, 1, b, self.noise_lr)
            return
        W_state, b_state = self.state(k)
        G = self.scratch[:W.size]
        ops.weight_gradient(T_rows, X_rows, G.reshape(W.shape[0], -1), ws=self.ws)
        if noise is not None:
            noise(k, 0, G, self.noise_one)
        self.kernels[0](W.reshape(-1), G, W_state)
        g = self.scratch[:b.size]  # W is done with the scratch: the bias takes it
        ops.gemv("T", T_rows, ones, g)
        if noise is not None:
            noise(k, 1, g, self.noise_one)
        self.kernels[1](b, g, b_state)

    def gradient(self, k, G, noise=None):
        """Apply a formed gradient: ``G`` is flat, ``dW_k`` then ``db_k`` (e.g. summed
        over ranks by an allreduce); the update may overwrite it."""
        W, b = self.params[k]
        parts = ((W.reshape(-1), G[:W.size]), (b, G[W.size:W.size + b.size]))
        states = self.state(k) if self.kernels is not None else (None, None)
        for which, ((p, g), state) in enumerate(zip(parts, states)):
            if noise is not None:
                noise(k, which, g, self.noise_one)
            if self.kernels is None:
                ops.sgd(p, g, self.lr, self.keep[which])
            else:
                self.kernels[which](p, g, state)

    def finish(self):
        if self.on_finish is not None:
            self.on_finish()


class WriteGradients(Rule):
    """A sink that writes each layer's gradient into ``grads[k] = (dW_k, db_k)``
    (:meth:`Network.loss_and_gradients`, :meth:`Network.backward`); ``ws``: the workspace
    that lends :func:`gpu_mlp.ops.weight_gradient` its buffer (the net's)."""

    takes_row_blocks = True

    def __init__(self, grads, ws):
        self.grads, self.ws = grads, ws

    def __call__(self, k, T_rows, X_rows, ones, noise=None):
        dW, db = self.grads[k]
        ops.weight_gradient(T_rows, X_rows, Layer.weight_matrix(dW), ws=self.ws)
        ops.gemv("T", T_rows, ones, db)
        if noise is not None:
            noise(k, 0, dW.reshape(-1), 1.0)
            noise(k, 1, db, 1.0)

    def gradient(self, k, G, noise=None):
        dW, db = self.grads[k]
        dW.reshape(-1)[...] = G[:dW.size]
        db[...] = G[dW.size:dW.size + db.size]
        if noise is not None:
            noise(k, 0, dW.reshape(-1), 1.0)
            noise(k, 1, db, 1.0)


class EachLayer(Rule):
    """A sink that calls ``visit(k, T_rows, X_rows)`` for each layer's factors and
    applies nothing (:meth:`Network.per_sample_grad_norms`)."""

    def __init__(self, visit: Callable):
        self.visit = visit

    def __call__(self, k, T_rows, X_rows, ones, noise=None):
        self.visit(k, T_rows, X_rows)
