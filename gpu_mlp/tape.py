"""A network's step split in two calls, for frameworks with their own autograd.

PyTorch (:mod:`gpu_mlp.torch`) runs the forward pass when the model is called and the
backward pass when the loss's gradient arrives, with its own code between them. So
:meth:`ForwardBackward.forward` runs the engine's forward pass and hands back the
output and a :class:`Tape`, what the pass kept for the backward pass as the memory mode
says; :meth:`ForwardBackward.backward` takes the tape and a given ``dJ/dF_n`` and runs
the engine's backward loop, the same loop as every other step (docs/MATH.md, "General
bilinear layers"), into fresh gradient arrays. :class:`gpu_mlp.Network` inherits both.
"""

from __future__ import annotations

from . import _checks, ops
from . import device as _device
from .updates import WriteGradients


class ForwardBackward:
    """:meth:`forward` and :meth:`backward` as two calls; a mixin of the Network, whose
    layer loop (``_forward``, ``_backward``) they run."""

    def forward(self, X, check: bool = True):
        """``(F_n, tape)``: the output for a batch, and what :meth:`backward` needs of
        this forward pass (kept in the training workspace, as the memory mode says).

        For frameworks that split a step in two (:mod:`gpu_mlp.torch`): ``F_n`` is the
        caller's array; the tape's buffers return to the workspace when :meth:`backward`
        has used them (or :meth:`Tape.release` drops them unused).
        """
        self.inputs.check_params(self.params)
        X, single = self.inputs.raw(X)
        if single:
            raise ValueError("forward takes a batch, not one sample")
        X = _checks.cast(X, self.dtype, self.xp)
        if check:
            ops.finite("X", X, self.xp)
        F_out, saved = self._forward(X, self.training_workspace, keep=True)
        return self.xp.array(F_out, copy=True), Tape(self, X, F_out, saved)

    def _parameters_now(self) -> tuple:
        """What a tape's backward needs unchanged since its forward: the parameter arrays
        (the objects) and the count of training steps that updated them in place."""
        return (tuple(a for pair in self.params for a in pair), self._updates)

    def backward(self, tape: "Tape", grad_output, want_dx: bool = True, check: bool = True):
        """``([(dW_k, db_k)], dJ/dX)`` for ``J = <F_n, grad_output>``: the backward pass
        started from a given ``dJ/dF_n`` (``grad_output``, shaped as F_n)
        instead of a loss; the same loop as every other step. Updates nothing. The
        parameters must be those of the tape's forward: a training step of the net, or
        ``net.params`` replaced, between the two is refused (the activations are of the
        old weights); arrays written in place by hand are not seen, and give an
        unspecified mix (a layer may read the copy of W its forward kept).
        ``check=False`` skips the scan of ``grad_output`` for NaN/Inf (a device sync on a
        GPU), as autograd does."""
        if not isinstance(tape, Tape) or tape.net is not self:
            raise ValueError("backward needs the tape of a forward pass of this network")
        changed = not _same(tape.parameters, self._parameters_now())
        X, F_out, saved = tape.take()
        if changed:  # its activations are of other weights than the backward would use
            tape.release_buffers(X, F_out, saved)
            raise ValueError("the parameters changed since this tape's forward pass (a "
                             "training step, or net.params replaced): its gradient would "
                             "mix the old activations with the new weights; run forward "
                             "again")
        ws, xp = self.training_workspace, self.xp
        try:
            grad_output = _device.to_device(grad_output, xp, "grad_output")
            if tuple(grad_output.shape) != tuple(F_out.shape):
                raise ValueError(f"grad_output must have the output's shape "
                                 f"{tuple(F_out.shape)}, got {tuple(grad_output.shape)}")
            grad_output = _checks.cast(grad_output, self.dtype, xp)
            if check:
                ops.finite("grad_output", grad_output, xp)
            delta = ws.take(F_out.shape)
            delta[...] = grad_output
        except BaseException:
            tape.release_buffers(X, F_out, saved)
            raise
        grads = [(xp.empty_like(W), xp.empty_like(b)) for W, b in self.params]
        sink = WriteGradients(grads, self.training_workspace)
        dX = self._backward(X, F_out, saved, delta, sink, want_dx)
        return grads, dX


class Tape:
    """What one :meth:`Network.forward` kept for its :meth:`Network.backward`: used once."""

    def __init__(self, net, X, F_out, saved):
        self.net, self._kept = net, (X, F_out, saved)
        self.parameters = net._parameters_now()

    def take(self):
        if self._kept is None:
            raise ValueError("this tape was used already (a forward pass serves one backward)")
        kept, self._kept = self._kept, None
        return kept

    def release(self) -> None:
        """Give the forward pass's buffers back unused (no backward will come)."""
        if self._kept is not None:
            self.release_buffers(*self.take())

    def __del__(self):
        # a tape dropped unused (the caller's code raised before backward, an autograd
        # graph freed without one): its buffers go back, or the workspace would count
        # them in use for good, and never size its buffers down again
        try:
            self.release()
        except Exception:  # noqa: BLE001 -- at interpreter exit the modules may be gone
            pass

    def release_buffers(self, X, F_out, saved) -> None:
        """Give back the buffers of a forward pass: its output and what each layer kept."""
        given = {id(F_out): F_out}
        for s in saved:
            for buf in (s.F, s.A, s.D, s.rows, s.weight):
                if buf is not None:
                    given[id(buf)] = buf
        self.net.training_workspace.give(*given.values())


def _same(kept, now) -> bool:
    (arrays, updates), (arrays_now, updates_now) = kept, now
    return updates == updates_now and len(arrays) == len(arrays_now) and all(
        a is b for a, b in zip(arrays, arrays_now))
