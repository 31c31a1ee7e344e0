"""Where arrays live: choosing NumPy or CuPy, and moving inputs there without copies.

``device="auto"`` takes the GPU when CuPy is installed and can run the engine there --
a CUDA device, NVRTC to compile the kernels and cuBLAS for the matrix products -- else
the CPU. No CuPy, no driver or no device is the normal CPU machine and falls back
silently; a GPU that CuPy sees but cannot use (the CUDA libraries of CuPy 14's wheels
missing, a driver too old for the wheel) falls back with one warning saying why and how
to fix it, and ``device="cuda"`` raises a RuntimeError with the same reason.
Inputs may be NumPy or CuPy arrays or anything with ``__dlpack__`` (a PyTorch tensor,
say); an input already on the right device is used as it is, through DLPack, with no
copy unless its dtype or memory order must change.
"""

from __future__ import annotations

import functools
import importlib
import typing

import numpy as np

from . import _checks

DEVICES = ("auto", "cpu", "cuda")

_CUDA_HINT = "install gpu_mlp[cuda12] or gpu_mlp[cuda13], or use device='cpu'"
_CUDA_NO_DEVICE = 100  # cudaErrorNoDevice: a driver, but no GPU


class _Probe(typing.NamedTuple):
    ok: bool
    reason: str  # why not, when not ok
    loud: bool   # a GPU is there but unusable: worth a warning under device="auto"


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}".rstrip(": ")


def _toolkit_fix(major: int | None) -> str:
    if major is None:
        return ('pip install "gpu_mlp[cuda13]" (or [cuda12], matching the driver) for CuPy '
                "with the CUDA toolkit libraries, or install the CUDA toolkit")
    return (f'pip install "gpu_mlp[cuda{major}]" for CuPy with the CUDA {major} toolkit '
            f"libraries, or install the CUDA {major} toolkit")


@functools.cache
def _probe() -> _Probe:
    try:
        import cupy
    except ModuleNotFoundError as e:
        if e.name == "cupy":  # the plain CPU install: nothing to say
            return _Probe(False, "CuPy is not installed", False)
        return _Probe(False, f"CuPy failed to import ({_first_line(e)})", True)
    except Exception as e:
        return _Probe(False, f"CuPy failed to import ({_first_line(e)})", True)

    runtime = cupy.cuda.runtime
    try:
        major = runtime.runtimeGetVersion() // 1000  # the CUDA version CuPy was built for
    except Exception:
        major = None
    try:
        count = runtime.getDeviceCount()
    except Exception as e:
        try:
            driver = runtime.driverGetVersion()  # 0 when there is no driver at all
        except Exception:
            driver = 0
        if not driver or getattr(e, "status", None) == _CUDA_NO_DEVICE:
            return _Probe(False, f"CuPy finds no CUDA driver or device ({_first_line(e)})", False)
        wheel = f'pip install "gpu_mlp[cuda{driver // 1000}]"' if driver // 1000 in (12, 13) \
            else "install the CuPy"
        return _Probe(False, f"the CUDA driver (for CUDA {driver // 1000}.{driver % 1000 // 10}) "
                             f"cannot run CuPy's CUDA {major or '?'} runtime ({_first_line(e)}); "
                             f"update the driver, or {wheel} for the CuPy that matches it", True)
    if count <= 0:
        return _Probe(False, "CuPy finds no CUDA device", False)
    try:
        cupy.cuda.nvrtc.getVersion()
    except Exception as e:
        return _Probe(False, f"a CUDA GPU is present but CuPy cannot load NVRTC, which compiles "
                             f"gpu_mlp's kernels ({_first_line(e)}); {_toolkit_fix(major)}", True)
    try:
        importlib.import_module("cupy.cublas")
        cupy.cuda.device.get_cublas_handle()
    except Exception as e:
        return _Probe(False, f"a CUDA GPU is present but CuPy cannot load cuBLAS, which "
                             f"does gpu_mlp's matrix products ({_first_line(e)}); "
                             f"{_toolkit_fix(major)}", True)
    return _Probe(True, "", False)


def gpu_status() -> tuple[bool, str]:
    """``(True, "")`` when the engine can run on the GPU, else ``(False, why)``: CuPy sees a
    CUDA device and loads NVRTC and cuBLAS. Probed once per process."""
    probe = _probe()
    return probe.ok, probe.reason


def gpu_available() -> bool:
    """True when the engine can run on the GPU (see :func:`gpu_status`)."""
    return _probe().ok


_warned = False


def _clear_cache() -> None:
    """Forget the probe and the warning (for tests)."""
    global _warned
    _probe.cache_clear()
    _warned = False


def _warn_cpu_fallback(reason: str) -> None:
    """Warn once per process, pointing at the first caller outside gpu_mlp."""
    global _warned
    if _warned:
        return
    _warned = True
    _checks.warn(f"gpu_mlp: device='auto' falls back to the CPU: {reason}", RuntimeWarning)


def resolve(device: str) -> tuple[str, object]:
    """``(name, xp)`` for a device name: ``"cpu"`` with NumPy or ``"cuda"`` with CuPy."""
    if device in ("gpu", "cupy"):
        device = "cuda"
    if device == "numpy":
        device = "cpu"
    if device not in DEVICES:
        raise ValueError(f"unknown device {device!r}; valid: {', '.join(DEVICES)}")
    probe = _probe()
    if device == "auto":
        if not probe.ok and probe.loud:
            _warn_cpu_fallback(probe.reason)
        device = "cuda" if probe.ok else "cpu"
    if device == "cuda":
        if not probe.ok:
            raise RuntimeError(f"device='cuda' needs CuPy and a CUDA GPU; {_CUDA_HINT}: "
                               f"{probe.reason}")
        import cupy

        return "cuda", cupy
    return "cpu", np


def _is_cupy(a) -> bool:
    return type(a).__module__.split(".")[0] == "cupy"


def to_device(a, xp, name: str = "the array"):
    """``a`` as an array of ``xp`` (NumPy or CuPy), zero-copy where the device matches;
    a TypeError naming it ``name`` unless it holds real numbers (floats, integers,
    booleans). A host array is checked on the host, before CuPy sees it: CuPy refuses
    strings, objects and dates with a ValueError of its own."""
    if xp is np and type(a) is np.ndarray:  # where it is already (every NumPy step's)
        return _checks.numeric(name, a)
    return _checks.numeric(name, _moved(a, xp, name))


def _moved(a, xp, name):
    if isinstance(a, np.ndarray) or _is_cupy(a) or not hasattr(a, "__dlpack__"):
        return _moved_as_is(a, xp, name)
    try:
        return _moved_as_is(a, xp, name)
    except (BufferError, NotImplementedError) as e:  # what DLPack refuses to export
        raise TypeError(f"{name} cannot be taken as an array: a {type(a).__name__} of "
                        f"dtype {getattr(a, 'dtype', '?')}: {type(e).__name__}: {e}") from None


# PyTorch dtypes with no NumPy or CuPy counterpart (DLPack refuses them with a bare
# RuntimeError, which is not theirs alone: an out-of-memory error is one too)
_UNTAKEABLE_DTYPES = ("torch.float8", "torch.float4", "torch.complex32", "torch.bits")


def check_takeable(t, name) -> None:
    """A TypeError naming ``name`` for a PyTorch tensor that holds no array DLPack can pass:
    a sparse or quantized one, one on the meta device, one of a dtype NumPy lacks."""
    if str(t.layout) != "torch.strided":
        raise TypeError(f"{name} cannot be taken as an array: a tensor of layout {t.layout} "
                        f"(give {name}.to_dense())")
    if t.is_meta:
        raise TypeError(f"{name} cannot be taken as an array: a meta tensor has no values")
    if t.is_quantized or str(t.dtype).startswith(_UNTAKEABLE_DTYPES):
        fix = "dequantize" if t.is_quantized else "float"
        raise TypeError(f"{name} cannot be taken as an array: its dtype {t.dtype} has no "
                        f"NumPy or CuPy counterpart (give {name}.{fix}())")


def _moved_as_is(a, xp, name):
    if hasattr(a, "detach") and hasattr(a, "requires_grad"):
        a = a.detach()  # a PyTorch tensor: DLPack refuses one that requires grad
        check_takeable(a, name)
        if a.is_neg():  # a lazy negation (x.conj().imag, say), which DLPack drops: its
            a = a.resolve_neg()  # values would arrive with their sign flipped
        if str(a.dtype) == "torch.bfloat16":
            a = a.float()  # neither NumPy nor CuPy has bfloat16; float32 holds it exactly
    if xp is np:
        if isinstance(a, np.ndarray):
            return a
        if _is_cupy(a):
            return a.get()
        if hasattr(a, "__dlpack__"):
            try:
                return np.from_dlpack(a)
            except (RuntimeError, BufferError, TypeError):
                # on another device (a CUDA tensor): copy through the host
                if hasattr(a, "cpu"):
                    return np.from_dlpack(a.cpu())
                raise
        return _as_array(name, a)
    if isinstance(a, xp.ndarray):
        return _on_this_gpu(a, xp, name)
    if hasattr(a, "__dlpack__") and not isinstance(a, np.ndarray):
        try:
            taken = xp.from_dlpack(a)  # (on the producer's GPU, which may be another)
        except (RuntimeError, BufferError, TypeError, ValueError):
            return xp.asarray(np.from_dlpack(a))  # a CPU tensor: one host-to-device copy
        return _on_this_gpu(taken, xp, name)
    return xp.asarray(_checks.numeric(name, _as_array(name, a)))


def _on_this_gpu(a, xp, name):
    """``a``, a CuPy array, if it is on the current GPU (the net's), else a ValueError:
    the engine's kernels would read another GPU's memory (CuPy's own ufuncs check, or
    enable peer access; a RawKernel does neither)."""
    gpu = getattr(getattr(a, "device", None), "id", None)  # (a cupy.cuda.Device's)
    if gpu is not None and gpu != xp.cuda.runtime.getDevice():
        raise ValueError(f"{name} is on GPU {gpu}, but this computes on GPU "
                         f"{xp.cuda.runtime.getDevice()}: move it there first (with "
                         f"cupy.cuda.Device({xp.cuda.runtime.getDevice()}): "
                         f"cupy.asarray(...) copies it; tensor.to(...) in PyTorch)")
    return a


def _as_array(name: str, a) -> np.ndarray:
    """``np.asarray(a)``, its ValueError naming ``name`` (a ragged list, say)."""
    try:
        return np.asarray(a)
    except ValueError as e:
        raise ValueError(f"{name} cannot be made an array: {e}") from None


def to_numpy(a) -> np.ndarray:
    """A NumPy copy (or view) of a NumPy or CuPy array."""
    return a.get() if _is_cupy(a) else np.asarray(a)


def write(target, value) -> None:
    """Copy the host array ``value`` into ``target``, a NumPy or CuPy array, in place:
    ``target`` stays the same object (for CuPy one host-to-device copy on the current
    stream, ``cupy.ndarray.set``: no device memory allocated, and no wait for the GPU)."""
    if hasattr(target, "set"):  # CuPy's (a NumPy array has no such method)
        target.set(np.ascontiguousarray(value, dtype=target.dtype))
    else:
        target[...] = value
