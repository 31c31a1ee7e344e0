"""Where arrays live: choosing NumPy or CuPy, and moving inputs there without copies.

``device="auto"`` takes the GPU when CuPy is installed and sees one, else the CPU.
Inputs may be NumPy or CuPy arrays or anything with ``__dlpack__`` (a PyTorch tensor,
say); an input already on the right device is used as it is, through DLPack, with no
copy unless its dtype or memory order must change.
"""

from __future__ import annotations

import functools

import numpy as np

DEVICES = ("auto", "cpu", "cuda")


@functools.cache
def gpu_available() -> bool:
    """True when CuPy imports and sees at least one CUDA device."""
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # no CuPy, no driver, no device: all mean "no GPU"
        return False


def resolve(device: str) -> tuple[str, object]:
    """``(name, xp)`` for a device name: ``"cpu"`` with NumPy or ``"cuda"`` with CuPy."""
    if device in ("gpu", "cupy"):
        device = "cuda"
    if device == "numpy":
        device = "cpu"
    if device not in DEVICES:
        raise ValueError(f"unknown device {device!r}; valid: {', '.join(DEVICES)}")
    if device == "auto":
        device = "cuda" if gpu_available() else "cpu"
    if device == "cuda":
        if not gpu_available():
            raise RuntimeError("device='cuda' needs CuPy and a CUDA GPU; install "
                               "gpu_mlp[cuda12] or gpu_mlp[cuda13], or use device='cpu'")
        import cupy

        return "cuda", cupy
    return "cpu", np


def _is_cupy(a) -> bool:
    return type(a).__module__.split(".")[0] == "cupy"


def to_device(a, xp):
    """``a`` as an array of ``xp`` (NumPy or CuPy), zero-copy where the device matches."""
    if hasattr(a, "detach") and hasattr(a, "requires_grad"):
        a = a.detach()  # a PyTorch tensor: DLPack refuses one that requires grad
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
        return np.asarray(a)
    if isinstance(a, xp.ndarray):
        return a
    if hasattr(a, "__dlpack__") and not isinstance(a, np.ndarray):
        try:
            return xp.from_dlpack(a)
        except (RuntimeError, BufferError, TypeError, ValueError):
            return xp.asarray(np.from_dlpack(a))  # a CPU tensor: one host-to-device copy
    return xp.asarray(a)


def to_numpy(a) -> np.ndarray:
    """A NumPy copy (or view) of a NumPy or CuPy array."""
    return a.get() if _is_cupy(a) else np.asarray(a)
