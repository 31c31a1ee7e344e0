"""What happens to a layer's gradient: the sinks of the backward pass.

The backward loop of :class:`gpu_mlp.Network` hands every layer's gradient to a *sink*
as its two factors, ``G_k = T_rows^T X_rows`` and ``g_k = T_rows^T 1`` (Remark 8 (iii):
never formed unless the sink forms it), last layer first and only after ``dJ/dF_{k-1}``
has used the old ``W_k``; then it calls ``sink.finish()``. Sinks chain, each stage
handing the factors on::

    [DP: clip each sample, add noise] -> [data parallel: sum over ranks] -> Apply

A sink is a callable ``sink(k, T_rows, X_rows, ones, noise=None)`` (a plain function
will do) with two optional attributes:

* ``keeps_factors``: True when it still reads the factors after its call returns --
  DP needs every layer's per-sample norms before it may clip any layer, communication
  runs while the backward pass goes on. The loop then gives the factors' buffers back
  to the workspace only after ``finish()``.
* ``finish()``: called once, after the last layer.

``noise`` is None, or DP's ``noise(k, which, array, alpha)``: it adds ``alpha`` times the
Gaussian noise of layer ``k``'s weight (``which = 0``) or bias (``1``) gradient to
``array`` in place. The stage that forms the summed gradient calls it -- once per step,
on every rank the same noise, so it is added once, not once per rank.

:class:`Apply` is the end of every chain: the update rule, plain SGD or an optimizer's
fused kernel.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

from . import ops
from .layers import Layer


class Apply:
    """The update rule of one step, applied layer by layer as the gradients arrive.

    Plain SGD with weight decay, ``W <- keep W - lr G`` (``kernels=None``): one GEMM
    straight into ``W`` (``alpha = -lr, beta = keep``), no gradient buffer; ``keep`` is
    ``(keep of W, keep of b)``. Otherwise ``kernels = (kernel of W, kernel of b)``, each
    ``kernel(w, g, state)`` a fused in-place update of a flat tensor from its gradient
    ``g`` (in ``scratch``, one buffer for all layers) and its state (``state(k)`` gives
    ``(W_k's, b_k's)`` lists). ``on_finish`` runs once the step is done (the optimizer
    counts it).
    """

    keeps_factors = False

    def __init__(self, params, lr: float = 0.0, keep=(1.0, 1.0),
                 kernels: Optional[Sequence[Callable]] = None, scratch=None,
                 state: Optional[Callable] = None, on_finish: Optional[Callable] = None):
        self.params, self.lr, self.keep = params, lr, keep
        self.kernels, self.scratch, self.state = kernels, scratch, state
        self.on_finish = on_finish

    def __call__(self, k, T_rows, X_rows, ones, noise=None):
        """Apply ``G = T_rows^T X_rows``, ``g = T_rows^T 1`` (+ noise) to layer ``k``."""
        W, b = self.params[k]
        if self.kernels is None:
            lr, (keep_W, keep_b) = self.lr, self.keep
            ops.gemm("T", "N", T_rows, X_rows, Layer.weight_matrix(W), alpha=-lr, beta=keep_W)
            if noise is not None:
                noise(k, 0, W.reshape(-1), -lr)
            ops.gemv("T", T_rows, ones, b, alpha=-lr, beta=keep_b)
            if noise is not None:
                noise(k, 1, b, -lr)
            return
        W_state, b_state = self.state(k)
        G = self.scratch[:W.size]
        ops.gemm("T", "N", T_rows, X_rows, G.reshape(W.shape[0], -1))
        if noise is not None:
            noise(k, 0, G, 1.0)
        self.kernels[0](W.reshape(-1), G, W_state)
        g = self.scratch[:b.size]  # W is done with the scratch: the bias takes it
        ops.gemv("T", T_rows, ones, g)
        if noise is not None:
            noise(k, 1, g, 1.0)
        self.kernels[1](b, g, b_state)

    def gradient(self, k, G, noise=None):
        """Apply a formed gradient: ``G`` is flat, ``dW_k`` then ``db_k`` (e.g. summed
        over ranks by an allreduce); the update may overwrite it."""
        W, b = self.params[k]
        parts = ((W.reshape(-1), G[:W.size]), (b, G[W.size:W.size + b.size]))
        states = self.state(k) if self.kernels is not None else (None, None)
        for which, ((p, g), state) in enumerate(zip(parts, states)):
            if noise is not None:
                noise(k, which, g, 1.0)
            if self.kernels is None:
                ops.sgd(p, g, self.lr, self.keep[which])
            else:
                self.kernels[which](p, g, state)

    def finish(self):
        if self.on_finish is not None:
            self.on_finish()


class WriteGradients:
    """A sink that writes each layer's gradient into ``grads[k] = (dW_k, db_k)``
    (:meth:`Network.loss_and_gradients`)."""

    keeps_factors = False

    def __init__(self, grads):
        self.grads = grads

    def __call__(self, k, T_rows, X_rows, ones, noise=None):
        dW, db = self.grads[k]
        ops.gemm("T", "N", T_rows, X_rows, Layer.weight_matrix(dW))
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
