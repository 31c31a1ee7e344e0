"""Checkpoints: a network's parameters, architecture and training history in one ``.npz``.

The format (version 1) is a plain, uncompressed ``.npz`` that NumPy alone can read:

* ``meta``: a 0-d string array holding JSON: ``format``, ``version``, ``sizes``,
  ``activations`` (one per layer, as ``str(activation)``, so ReLU's alpha survives),
  ``loss``, ``memory``, ``dtype``, ``written_by`` and ``history`` (the
  :class:`~gpu_mlp.training.History` to resume from, or null);
* ``W_1, b_1, ..., W_n, b_n``: the parameters, ``W_k`` of shape ``(d_k, d_{k-1})``.

:func:`save` writes to a temporary file in the target's directory and renames it over
the target (``os.replace``, atomic), so the path holds the old checkpoint or the new
one, never part of one, whenever the writer is interrupted. A symlink is written
through (the file it points to is replaced, the link kept) and a replaced file keeps
its permission bits. :func:`read` loads with ``allow_pickle=False`` (a checkpoint
cannot run code) and checks the format, the entries, shapes, dtypes and names before
it builds a network; what is wrong comes as a :class:`CheckpointError` naming the file.

>>> import os, tempfile, gpu_mlp
>>> net = gpu_mlp.MLP([4, 8, 3], activations="relu(alpha=0.5)", device="cpu")
>>> path = os.path.join(tempfile.mkdtemp(), "net.npz")
>>> net.save(path)
>>> copy = gpu_mlp.MLP.load(path, device="cpu")
>>> copy.sizes, str(copy.activations[0]), copy.dtype.name
([4, 8, 3], 'relu(alpha=0.5)', 'float32')
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import stat
import zipfile
import zlib
from dataclasses import dataclass
from typing import Optional

import numpy as np

from .device import to_numpy
from .mlp import MLP
from .training import History

FORMAT = "gpu_mlp.checkpoint"
VERSION = 1


class CheckpointError(ValueError):
    """A file that is not a valid gpu_mlp checkpoint."""


# what reading a damaged member of the zip can raise: a bad CRC or header, a broken
# deflate stream, data cut short, a compression method zipfile lacks
_DAMAGED = (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error, NotImplementedError)


@dataclass
class Checkpoint:
    """What :func:`read` returns: the network and the training history (or None)."""

    net: MLP
    history: Optional[History]


def save(net: MLP, path, history: Optional[History] = None) -> None:
    """Write ``net`` (and ``history``, to resume training from) to ``path``, atomically.

    The file is written exactly at ``path`` (no suffix is added); ``.npz`` is customary.
    """
    if history is not None and not isinstance(history, History):
        raise TypeError(f"history must be a gpu_mlp.training.History, got "
                        f"{type(history).__name__}")
    from . import __version__

    meta = {
        "format": FORMAT,
        "version": VERSION,
        "sizes": net.sizes,
        "activations": [str(a) for a in net.activations],
        "loss": net.loss.name,
        "memory": net.memory,
        "dtype": net.dtype.name,
        "written_by": f"gpu_mlp {__version__}",
        "history": None if history is None else history.as_dict(),
    }
    arrays = {"meta": np.array(json.dumps(meta))}
    for k, (W, b) in enumerate(net.params, start=1):
        arrays[f"W_{k}"], arrays[f"b_{k}"] = to_numpy(W), to_numpy(b)

    target = writable_target(path)
    try:
        mode = stat.S_IMODE(os.stat(target).st_mode)  # what the new file keeps
    except FileNotFoundError:
        mode = None
    directory, name = os.path.split(target)
    temp = os.path.join(directory, f".{name}.{secrets.token_hex(4)}.tmp")
    f = open(temp, "xb")
    try:
        with f:
            _write(f, arrays)
        if mode is not None:
            os.chmod(temp, mode)
        os.replace(temp, target)
    except BaseException:  # KeyboardInterrupt too: leave no temporary file behind
        with contextlib.suppress(OSError):
            os.remove(temp)
        raise


def writable_target(path) -> str:
    """The file that writing ``path`` creates or replaces (for a symlink, the file it
    points to), as an absolute path.

    Raises an OSError (ValueError for ``""``) naming ``path`` when it cannot be written:
    it is a directory, or its directory is missing or not writable. Checking first
    gives a clear error before any work is done, never one about a temporary file.
    """
    path = os.fspath(path)
    if not path:
        raise ValueError("cannot write to an empty path")
    target = os.path.realpath(path)
    if os.path.isdir(target):
        raise IsADirectoryError(f"cannot write {path}: it is a directory")
    directory = os.path.dirname(target)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"cannot write {path}: no directory {directory}")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot write {path}: directory {directory} is not writable")
    return target


def _write(f, arrays) -> None:
    np.savez(f, **arrays)
    f.flush()
    os.fsync(f.fileno())  # the data is on disk before the rename makes it the checkpoint


def load(path, device: str = "auto") -> MLP:
    """The network stored at ``path``, on ``device``; see :func:`read`."""
    return read(path, device=device).net


def read(path, device: str = "auto") -> Checkpoint:
    """The network and training history stored at ``path``.

    Raises :class:`CheckpointError` (a ValueError) saying what is wrong with a file that
    is not a complete, consistent checkpoint; OSError if it cannot be opened at all.
    """
    path = os.fspath(path)
    meta, arrays = _read_npz(path)
    try:
        sizes, dtype = _check_meta(meta)
        params = _check_params(arrays, sizes, dtype)
        history = None if meta["history"] is None else History.from_dict(meta["history"])
        net = MLP.from_params(params, meta["activations"], meta["loss"],
                              memory=meta["memory"], device=device, dtype=dtype)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: {e}") from None
    return Checkpoint(net, history)


def _read_npz(path):
    try:
        data = np.load(path, allow_pickle=False)
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        raise
    except zipfile.BadZipFile as e:  # a zip, but its directory at the end is missing
        raise CheckpointError(f"{path}: damaged or truncated file ({e})") from None
    except _DAMAGED:
        raise CheckpointError(f"{path}: not a checkpoint (not an .npz file)") from None
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise CheckpointError(f"{path}: not a checkpoint (a single .npy array, not an .npz)")
    try:
        with data:
            arrays = {key: data[key] for key in data.files}
    except _DAMAGED as e:
        raise CheckpointError(f"{path}: damaged or unreadable entry ({e})") from None
    if "meta" not in arrays:
        raise CheckpointError(f"{path}: not a gpu_mlp checkpoint (no 'meta' entry)")
    meta = arrays.pop("meta")
    try:
        meta = json.loads(str(meta)) if meta.dtype.kind == "U" and meta.ndim == 0 else None
    except json.JSONDecodeError:
        meta = None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a gpu_mlp checkpoint (no {FORMAT} metadata)")
    return meta, arrays


_META_KEYS = ("format", "version", "sizes", "activations", "loss", "memory", "dtype",
              "written_by", "history")


def _check_meta(meta):
    if meta.get("version") != VERSION:
        raise ValueError(f"format version {meta.get('version')!r}, but this gpu_mlp "
                         f"reads version {VERSION}")
    missing = [key for key in _META_KEYS if key not in meta]
    if missing:
        raise ValueError(f"metadata lacks {', '.join(missing)}")
    sizes = meta["sizes"]
    if (not isinstance(sizes, list) or len(sizes) < 2
            or not all(type(s) is int and s >= 1 for s in sizes)):
        raise ValueError(f"sizes must list at least two widths >= 1, got {sizes!r}")
    activations = meta["activations"]
    if not isinstance(activations, list) or not all(isinstance(a, str) for a in activations):
        raise ValueError(f"activations must be a list of names, got {activations!r}")
    if meta["dtype"] not in ("float32", "float64"):
        raise ValueError(f"dtype must be float32 or float64, got {meta['dtype']!r}")
    return sizes, np.dtype(meta["dtype"])


def _check_params(arrays, sizes, dtype):
    n = len(sizes) - 1
    expected = [f"{p}_{k}" for k in range(1, n + 1) for p in ("W", "b")]
    missing = [key for key in expected if key not in arrays]
    extra = sorted(set(arrays) - set(expected))
    if missing or extra:
        raise ValueError(f"the parameter entries do not match sizes {sizes}: "
                         f"missing {missing or 'none'}, unexpected {extra or 'none'}")
    params = []
    for k in range(1, n + 1):
        W, b = arrays[f"W_{k}"], arrays[f"b_{k}"]
        for name, a, shape in ((f"W_{k}", W, (sizes[k], sizes[k - 1])),
                               (f"b_{k}", b, (sizes[k],))):
            if a.shape != shape:
                raise ValueError(f"{name} has shape {a.shape}, but sizes {sizes} need {shape}")
            if a.dtype != dtype:
                raise ValueError(f"{name} has dtype {a.dtype}, but the metadata says {dtype}")
        params.append((W, b))
    return params
