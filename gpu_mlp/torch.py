"""PyTorch modules on gpu_mlp's engine: :class:`MLPModule` and :class:`NetworkModule`.

An ``nn.Module`` whose forward pass is gpu_mlp's (:meth:`Network.forward`, keeping what
the memory mode keeps) and whose backward pass is the engine's from the upstream
gradient (:meth:`Network.backward`; docs/MATH.md, "General bilinear layers"), inside a
``torch.autograd.Function``: the rest of a model, its loss and ``torch.optim`` work
unchanged.

>>> import torch
>>> from gpu_mlp.torch import MLPModule
>>> torch.manual_seed(0)  # doctest: +ELLIPSIS
<torch._C.Generator object at ...>
>>> model = torch.nn.Sequential(torch.nn.Linear(10, 64),
...                             MLPModule([64, 128, 128, 3], activations="tanh"))
>>> opt = torch.optim.Adam(model.parameters(), lr=1e-3)
>>> loss = model(torch.randn(32, 10)).square().mean()
>>> loss.backward(); opt.step()
>>> [name for name, _ in model[1].named_parameters()]
['W_1', 'b_1', 'W_2', 'b_2', 'W_3', 'b_3']

* **Parameters** ``W_1, b_1, ...`` (``nn.Linear`` / ``nn.Conv2d`` layouts) *are* the
  engine's arrays, shared through DLPack: in-place updates and ``load_state_dict`` reach it.
* **Devices**: CPU tensors run on NumPy, CUDA tensors on CuPy (the tensor's GPU, PyTorch's
  current stream); ``.to()`` and friends rebuild the engine from the moved parameters.
  Other dtypes than float32/float64, or other devices, raise; an input of another dtype
  is cast, one on another device is an error, as for ``nn.Linear``.
* **Grad mode**: with no gradient needed, forward is :meth:`Network.predict` (nothing
  kept); otherwise a tape in the training workspace, given back after backward or when
  the graph is freed. ``dJ/dX`` only when the input needs it; a second backward through a
  retained graph reruns the forward; double backward is not supported.
* A deep-copied or unpickled module builds its engine at its first forward.
* **Threads**: on the CPU the engine's BLAS runs on :data:`BLAS_THREADS` (1) threads while
  it computes for a module; ``None`` leaves BLAS alone, at the risk described there.
"""

from __future__ import annotations

import contextlib
import functools
import math
import threading

try:
    import torch  # Python 3 imports are absolute: this is PyTorch, not gpu_mlp.torch
except ModuleNotFoundError as e:  # pragma: no cover - depends on the environment
    if e.name != "torch":
        raise
    raise ModuleNotFoundError("gpu_mlp.torch needs PyTorch: pip install 'gpu_mlp[torch]'",
                              name="torch") from None

from torch import nn

from . import device as _device
from .inputs import sample_ndim
from .mlp import MLP
from .network import Network

__all__ = ["NetworkModule", "MLPModule"]

# Threads of the engine's CPU BLAS (SciPy's and NumPy's OpenBLAS) while it computes for a
# module; None: BLAS's own setting. An OpenBLAS thread spins for a while (2^28 cycles, a
# tenth of a second: OPENBLAS_THREAD_TIMEOUT) after each call, on the cores PyTorch's
# intra-op threads want next, and PyTorch's idle OpenMP threads spin in turn: two pools,
# each as large as the machine, taking turns. On 2 cores the README's example took 16-74 s
# that way, 4-8 s with this (3.8-4.0 s with OMP_NUM_THREADS=1). Kept to 1 thread, the
# engine's BLAS threads never wake; PyTorch keeps all of its own. Needs threadpoolctl (the
# torch extra installs it); without it BLAS keeps its own setting.
BLAS_THREADS = 1

_DTYPES = {torch.float32: "float32", torch.float64: "float64"}
_TORCH_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def _torch_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype in _DTYPES:
            return dtype
    else:
        try:
            import numpy as np

            name = np.dtype(dtype).name
        except TypeError:
            name = None
        if name in _TORCH_DTYPES:
            return _TORCH_DTYPES[name]
    raise TypeError(f"gpu_mlp computes in float32 or float64, got dtype {dtype!r}")


def _engine_device(device: torch.device) -> str:
    if device.type == "cpu":
        return "cpu"
    if device.type == "cuda":
        return "cuda"
    raise RuntimeError(f"gpu_mlp runs on CPU tensors (NumPy) and CUDA tensors (CuPy), not on "
                       f"{device.type!r} ones")


@contextlib.contextmanager
def _on(device: torch.device):
    """Run the engine where ``device``'s tensors live: for CUDA on that GPU and on
    PyTorch's current stream there, so CuPy's kernels and cuBLAS calls are ordered with
    PyTorch's; on the CPU with its BLAS at :data:`BLAS_THREADS` threads."""
    if device.type != "cuda":
        with _cpu_blas_threads():
            yield
        return
    _device.resolve("cuda")  # a clear RuntimeError when CuPy cannot use the GPU
    import cupy

    index = device.index if device.index is not None else torch.cuda.current_device()
    with cupy.cuda.Device(index):
        pointer = torch.cuda.current_stream(index).cuda_stream
        stream = cupy.cuda.Stream.null if pointer == 0 else cupy.cuda.ExternalStream(pointer)
        with stream:
            yield


@functools.cache
def _blas_pools():
    """threadpoolctl's controller of the BLAS libraries loaded (NumPy's and SciPy's, both
    loaded by ``import gpu_mlp``), or None without threadpoolctl."""
    try:
        import threadpoolctl
    except ModuleNotFoundError:
        return None
    return threadpoolctl.ThreadpoolController().select(user_api="blas")


_blas_lock = threading.Lock()
_blas_users = 0      # calls within _cpu_blas_threads now, in every thread
_blas_limiter = None  # threadpoolctl's limiter of the first of them, which restores


@contextlib.contextmanager
def _cpu_blas_threads():
    """Within: the BLAS libraries at :data:`BLAS_THREADS` threads (10 us to set and
    restore). The setting is the process's, so calls in several Python threads share one
    limit: the first to enter sets it, the last to leave restores the process's own (each
    restoring what it saw on entry would leave another's limit behind for good)."""
    global _blas_users, _blas_limiter
    pools = _blas_pools() if BLAS_THREADS is not None else None
    if pools is None or not pools.lib_controllers:
        yield
        return
    with _blas_lock:
        if _blas_users == 0:
            _release_openblas_control()  # (one a thread left behind: not to block ours)
            _blas_limiter = pools.limit(limits=BLAS_THREADS)
            _release_openblas_control()  # whichever thread leaves last restores it
        _blas_users += 1
    try:
        yield
    finally:
        with _blas_lock:
            _blas_users -= 1
            if _blas_users == 0:
                _blas_limiter.restore_original_limits()
                _blas_limiter = None
                _release_openblas_control()


def _release_openblas_control() -> None:
    """threadpoolctl >= 3.6 lets one Python thread set a pthreads OpenBLAS's limit -- the
    first that sets it, until it lets go -- and others' calls silently do nothing; the
    shared limit above is set and restored by whichever thread comes first and leaves
    last, so none may keep it. (A user's own threadpool_limits open in another thread
    at that moment is overridden: the limit is the process's either way.)"""
    import threadpoolctl

    controller = getattr(threadpoolctl, "OpenBLASController", None)
    clear = getattr(controller, "clear_controlling_thread", None)
    if clear is not None:
        clear(force=True)


def _pointer(a) -> int:
    return a.ctypes.data if hasattr(a, "ctypes") else a.data.ptr


def _shares(t: torch.Tensor, a) -> bool:
    """True when tensor ``t`` is the engine array ``a``: same memory, shape and dtype."""
    return (t.layout == torch.strided and t.data_ptr() == _pointer(a)
            and tuple(t.shape) == tuple(a.shape)
            and _DTYPES.get(t.dtype) == a.dtype.name and t.is_contiguous()
            and _engine_device(t.device) == ("cpu" if hasattr(a, "ctypes") else "cuda"))


def _to_engine(t: torch.Tensor, net, name: str):
    return _device.to_device(t.detach(), _device.resolve(net.device)[1], name)


# torch.compile (Dynamo) would trace the engine's NumPy/CuPy calls, which it cannot: the
# modules' forward runs as it is, a graph break, inside a compiled model
_not_compiled = getattr(getattr(torch, "compiler", None), "disable", lambda fn: fn)


def _first_derivative_only(backward):
    """torch's ``once_differentiable``, whatever the incoming gradient. The gradients
    depend on the saved input and weights, which may require grad where grad_output
    does not: torch's own decorator then returns them detached under ``create_graph``,
    so a second derivative through the module (a gradient penalty, a Hessian) came back
    0, silently. Here, under ``create_graph``, they carry a function that raises when
    differentiated. ``backward(ctx, saved, *grads)`` gets the saved tensors, unpacked
    once here: non-reentrant checkpointing and one-shot saved-tensor hooks (offloading)
    allow no second unpacking."""
    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        unpacked = ctx.saved_tensors  # raises if one was changed in place since
        with torch.no_grad():
            outputs = backward(ctx, unpacked, *grads)
        saved = [t for t in (*unpacked, *grads) if t is not None and t.requires_grad]
        if not torch.is_grad_enabled() or not saved:  # no create_graph, or nothing to
            return outputs                            # differentiate the gradients by
        # an exact 0 (an empty slice's sum: inf weights do not make it NaN) joined to the
        # saved input and weights, and the incoming gradient (a JVP by double backward
        # differentiates by it), through the raising function, added to each gradient
        anchor = sum(t.reshape(-1)[:0].sum() for t in saved)
        anchor = torch._C._functions.DelayedError(
            b"gpu_mlp's modules give first derivatives only: a gradient through one "
            b"cannot be differentiated (create_graph=True: a gradient penalty, a Hessian)",
            1)(anchor)
        return tuple(None if g is None else g + anchor for g in outputs)
    return wrapper


class _EngineFunction(torch.autograd.Function):
    """``F_n = net(x)`` with the parameters as inputs, so autograd routes their gradients."""

    @staticmethod
    def forward(ctx, net, x, *params):
        with _on(x.device):
            out, tape = net.forward(_to_engine(x, net, "x"), check=False)
            out = torch.from_dlpack(out)
        # (a graph freed without a backward drops the tape: its buffers go back)
        ctx.net, ctx.tape = net, tape
        ctx.save_for_backward(x, *params)  # for autograd's in-place-modification check
        return out

    @staticmethod
    @_first_derivative_only
    def backward(ctx, saved, grad_output):
        x, *params = saved
        net = ctx.net
        want_dx = ctx.needs_input_grad[1]
        with _on(x.device):
            tape, ctx.tape = ctx.tape, None
            if tape is None:  # a retained graph's second backward: its own forward
                _, tape = net.forward(_to_engine(x, net, "x"), check=False)
            grad = _to_engine(grad_output.contiguous(), net, "grad_output")
            grads, dX = net.backward(tape, grad, want_dx=want_dx, check=False)
            dX = torch.from_dlpack(dX) if want_dx else None
            flat = [torch.from_dlpack(g) for pair in grads for g in pair]
        flat = [g if need else None for g, need in zip(flat, ctx.needs_input_grad[2:])]
        return (None, dX, *flat)


class NetworkModule(nn.Module):
    """A :class:`gpu_mlp.Network` of :mod:`gpu_mlp.layers` as an ``nn.Module``.

    Args:
        layers: the layers, first to last (``Dense``, ``Conv2d``).
        memory: the engine's memory mode, ``"output"``, ``"recompute"`` or ``"store_both"``.
        dtype: ``"float32"`` / ``torch.float32`` or ``"float64"`` / ``torch.float64``.
        device: where the parameters start (``"cpu"``, ``"cuda"``, ``"cuda:1"``, a
            ``torch.device``); ``.to()`` moves them later.
        seed: ``None`` initialises every layer as ``nn.Linear`` / ``nn.Conv2d`` do, from
            PyTorch's generator (so ``torch.manual_seed`` decides, and a model of
            ``nn.Linear`` layers built in the same order gets the same numbers); an
            integer uses gpu_mlp's own initialisation with that seed.

    Inputs are ``(B, *input_shape)`` batches (NCHW images for a convolution), or one
    sample without the batch axis.
    """

    def __init__(self, layers, memory: str = "output", dtype="float32", device="cpu",
                 seed=None):
        super().__init__()
        device = torch.device(device)
        dtype = _torch_dtype(dtype)
        with _on(device):
            net = self._new_engine(layers, memory, device, dtype, seed)
        self._layers, self._memory, self._net = list(net.layers), memory, net
        for k, (W, b) in enumerate(net.params, start=1):
            self.register_parameter(f"W_{k}", nn.Parameter(torch.from_dlpack(W)))
            self.register_parameter(f"b_{k}", nn.Parameter(torch.from_dlpack(b)))
        if seed is None:
            self.reset_parameters()

    def _new_engine(self, layers, memory, device, dtype, seed):
        return Network(layers, memory=memory, device=_engine_device(device),
                       dtype=_DTYPES[dtype], seed=0 if seed is None else seed)

    def _engine_from(self, params, device, dtype):
        return Network.from_params(self._layers, params, memory=self._memory,
                                   device=_engine_device(device), dtype=_DTYPES[dtype],
                                   copy=False, check=False)  # NaN weights compute, as torch's

    def reset_parameters(self) -> None:
        """Initialise as ``nn.Linear`` / ``nn.Conv2d``: ``W`` Kaiming-uniform with
        ``a = sqrt(5)``, ``b`` uniform in ``+-1/sqrt(fan_in)``, layer by layer, in place."""
        with torch.no_grad():
            for W, b in self._pairs():
                nn.init.kaiming_uniform_(W, a=math.sqrt(5))
                fan_in = W[0].numel()
                bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
                nn.init.uniform_(b, -bound, bound)

    # --- the engine, sharing memory with the parameters ---------------------------------

    def _pairs(self) -> list:
        return [(getattr(self, f"W_{k}"), getattr(self, f"b_{k}"))
                for k in range(1, len(self._layers) + 1)]

    @property
    def layers(self) -> list:
        return list(self._layers)

    @property
    def memory(self) -> str:
        return self._memory

    @property
    def net(self) -> Network:
        """The engine, its ``params`` the very memory of this module's parameters (made
        again from them if something -- ``.to()``, ``param.data = ...`` -- replaced it)."""
        return self._engine(self._pairs())

    def _engine(self, pairs) -> Network:
        """:attr:`net` for the parameters ``pairs`` (:meth:`_pairs`, read once by the
        caller: a parametrized weight is computed anew at each read)."""
        net = self._net
        if net is not None and all(_shares(t, a) for pair, arrays in zip(pairs, net.params)
                                   for t, a in zip(pair, arrays)):
            return net
        return self._rebuild(pairs)

    def _rebuild(self, pairs) -> Network:
        for k, pair in enumerate(pairs, start=1):
            for name, t in zip((f"W_{k}", f"b_{k}"), pair):
                _device.check_takeable(t, name)  # (a sparse one has no data pointer)
        tensors = [t for pair in pairs for t in pair]
        device, dtype = tensors[0].device, tensors[0].dtype
        for t in tensors:
            if t.device != device or t.dtype != dtype:
                raise RuntimeError(f"all parameters of a {type(self).__name__} must share "
                                   f"one device and dtype; got {device} {dtype} and "
                                   f"{t.device} {t.dtype}")
        if dtype not in _DTYPES:
            raise TypeError(f"{type(self).__name__}: gpu_mlp computes in float32 or float64, "
                            f"but the parameters are {dtype} (e.g. after .half()); use "
                            f".float() or .double()")
        _engine_device(device)
        # never inference tensors, even when the first forward after a copy runs under
        # torch.inference_mode(): the parameters must stay usable by autograd
        with _on(device), torch.inference_mode(False), torch.no_grad():
            # checked, and computing in the parameters' own memory (no copy), which keeps
            # what their owner made of it: share_memory() for Hogwild workers, say
            net = self._engine_from([(W.detach(), b.detach()) for W, b in pairs], device,
                                    dtype)
            params = []
            for pair, arrays in zip(pairs, net.params):
                own = []
                for t, a in zip(pair, arrays):
                    if not _shares(t, a):
                        if t.is_contiguous():  # tied (one tensor twice): the engine's
                            a = _device.to_device(t.detach(), net.xp)  # view of it too
                        else:  # strided: the engine's copy becomes the parameter
                            t.data = torch.from_dlpack(a)
                    own.append(a)
                params.append(tuple(own))
            net.params = params
        self._net = net
        return net

    def _apply(self, fn, recurse=True):
        W = self.W_1
        try:  # where would fn take the parameters? refuse before changing anything
            probe = fn(torch.empty(0, dtype=W.dtype, device=W.device))
        except Exception:
            probe = None
        if isinstance(probe, torch.Tensor):
            if probe.dtype not in _DTYPES:
                raise TypeError(f"{type(self).__name__}: gpu_mlp computes in float32 or "
                                f"float64, not {probe.dtype}")
            if _engine_device(probe.device) == "cuda":
                _device.resolve("cuda")  # CuPy must be able to run there
        module = super()._apply(fn, recurse)
        self._net = None  # the engine follows at the next call: a pruned or re-parametrized
        return module     # module's weights are made anew by its forward pre-hook first

    def __getstate__(self):
        state = super().__getstate__()
        state["_net"] = None  # a copy builds its own engine from its own parameters
        return state

    # --- forward ------------------------------------------------------------------------

    def _output_shape(self, input_shape) -> tuple:
        shape = tuple(input_shape)
        for layer in self._layers:
            shape = layer.output_shape(shape)
        return shape

    @_not_compiled
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_tracing():
            raise RuntimeError(f"{type(self).__name__} cannot be traced (torch.jit): its "
                               f"forward computes with NumPy or CuPy, which a trace records "
                               f"as a constant output; torch.compile runs it as a graph "
                               f"break")
        active = getattr(torch._C, "_are_functorch_transforms_active", lambda: False)
        if active():
            raise RuntimeError(f"{type(self).__name__} does not run under torch.func's "
                               f"transforms (vmap, grad, jacrev, functional_call inside "
                               f"them): its forward computes with NumPy or CuPy; use "
                               f"torch.autograd (per-sample gradient norms: "
                               f"Network.per_sample_grad_norms)")
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{type(self).__name__} takes a torch.Tensor, got "
                            f"{type(x).__name__}")
        _device.check_takeable(x, "x")
        # the parameters read once: a parametrization (spectral_norm, weight_norm)
        # computes the weight at each read, and the engine and autograd must see one
        pairs = self._pairs()
        net = self._engine(pairs)
        W = pairs[0][0]
        if x.device != W.device:
            raise RuntimeError(f"Expected all tensors to be on the same device: the input is "
                               f"on {x.device}, {type(self).__name__}'s parameters on "
                               f"{W.device} (move one with .to())")
        if x.is_complex():  # a cast would drop the imaginary part; the engine refuses too
            raise TypeError(f"{type(self).__name__} takes real numbers, got dtype {x.dtype}")
        if x.dtype != W.dtype:
            x = x.to(W.dtype)  # through autograd: dX comes back in the input's dtype
        single = x.dim() == sample_ndim(self._layers)
        if single:
            x = x.unsqueeze(0)
        out = self._run(net, x, [t for pair in pairs for t in pair])
        return out.squeeze(0) if single else out

    def _run(self, net, x, params):
        needs_grad = torch.is_grad_enabled() and (
            x.requires_grad or any(p.requires_grad for p in params))
        if x.shape[0] == 0:  # an empty batch: nothing for the engine to do
            out = x.new_zeros((0, *self._output_shape(x.shape[1:])))
            if needs_grad:  # zero gradients, as nn.Linear gives
                out = out + sum(t.sum() for t in (x, *params)) * 0
            return out
        if needs_grad:
            return _EngineFunction.apply(net, x, *params)
        with _on(x.device):
            return torch.from_dlpack(net.predict(_to_engine(x, net, "x"), check=False))

    def extra_repr(self) -> str:
        layers = ", ".join(str(layer) for layer in self._layers)
        W = self.W_1
        return f"layers=[{layers}], memory={self._memory!r}, dtype={W.dtype}, device={W.device}"


class MLPModule(NetworkModule):
    """A :class:`gpu_mlp.MLP` as an ``nn.Module``: ``MLP``'s arguments (``sizes``,
    ``activations``, ``output``, ``memory``, ``dtype``; ``seed`` as in
    :class:`NetworkModule`) and ``device``. Inputs are ``(*, d_in)`` as for ``nn.Linear``:
    any leading axes, or none."""

    def __init__(self, sizes, activations="relu", output="identity", memory: str = "output",
                 dtype="float32", device="cpu", seed=None):
        self._spec = (sizes, activations, output)
        super().__init__(None, memory=memory, dtype=dtype, device=device, seed=seed)

    def _new_engine(self, layers, memory, device, dtype, seed):
        sizes, activations, output = self._spec
        return MLP(sizes, activations=activations, output=output, memory=memory,
                   device=_engine_device(device), dtype=_DTYPES[dtype],
                   seed=0 if seed is None else seed)

    def _engine_from(self, params, device, dtype):
        return MLP.from_params(params, [layer.activation for layer in self._layers],
                               memory=self._memory, device=_engine_device(device),
                               dtype=_DTYPES[dtype], copy=False, check=False)

    @property
    def sizes(self) -> list:
        return [self._layers[0].d_in] + [layer.d_out for layer in self._layers]

    @_not_compiled
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d_in = self._layers[0].d_in
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"MLPModule takes a torch.Tensor, got {type(x).__name__}")
        _device.check_takeable(x, "x")  # before the reshape, which a sparse x refuses
        if x.dim() == 0 or x.shape[-1] != d_in:
            raise ValueError(f"MLPModule{self.sizes} takes inputs of shape (*, {d_in}), got "
                             f"{tuple(x.shape)}")
        lead = x.shape[:-1]
        out = super().forward(x.reshape(-1, d_in))
        return out.reshape(*lead, out.shape[-1])
