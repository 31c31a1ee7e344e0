"""Checkpoints: a network's parameters, architecture, history and optimizer in one ``.npz``.

The format (version 2) is a plain, uncompressed ``.npz`` that NumPy alone can read:

* ``meta``: a 0-d string array holding JSON: ``format``, ``version``, ``model``
  (``"MLP"`` or ``"Network"``: the class to rebuild), ``layers`` (one dict per layer, as
  :meth:`gpu_mlp.layers.Layer.spec` writes it, the activation as ``str(activation)``, so
  ReLU's alpha survives), ``loss``, ``memory``, ``dtype``, ``written_by`` and
  ``history`` (the :class:`~gpu_mlp.training.History` to resume from, or null);
* ``W_1, b_1, ..., W_n, b_n``: the parameters in torch's layouts, ``W_k`` of shape
  ``(d_k, d_{k-1})`` for a dense layer, ``(c_out, c_in, kh, kw)`` for a convolution;
* optionally, a :mod:`gpu_mlp.optim` optimizer to resume with: ``meta["optimizer"]``
  (absent or null: none, i.e. plain SGD) holds its ``type``, ``hyperparameters``,
  ``schedule``, ``steps`` (the schedule's position) and ``last_lr``, and the arrays
  ``opt_<state>_W_k``, ``opt_<state>_b_k`` its per-parameter state (``<state>``:
  ``momentum_buffer``, or ``exp_avg`` and ``exp_avg_sq``), shaped as the parameters;
* optionally, the :class:`gpu_mlp.privacy.DP` of a private run: ``meta["dp"]`` holds its
  settings and ``steps``, the position of its noise stream, so that a resumed run adds
  the very noise the uninterrupted one would.

Version 1 files (an MLP, described by ``sizes`` and ``activations`` instead of
``layers`` and ``model``) are still read, as are version 2 files without an optimizer.

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
from . import layers as _layers
from . import optim as _optim
from . import privacy as _privacy
from .layers import Dense
from .mlp import MLP
from .network import Network
from .training import History

FORMAT = "gpu_mlp.checkpoint"
VERSION = 2  # written; version 1 (MLPs before convolutions) is read too
_OPT = "opt_"  # the prefix of the optimizer's state entries


class CheckpointError(ValueError):
    """A file that is not a valid gpu_mlp checkpoint."""


# what reading a damaged member of the zip can raise: a bad CRC or header, a broken
# deflate stream, data cut short, a compression method zipfile lacks
_DAMAGED = (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error, NotImplementedError)


@dataclass
class Checkpoint:
    """What :func:`read` returns: the network, the training history (or None) and the
    optimizer (or None: plain SGD), bound to ``net`` with its state on net's device."""

    net: Network
    history: Optional[History]
    optimizer: Optional[_optim.Optimizer] = None
    dp: Optional[_privacy.DP] = None


def save(net: Network, path, history: Optional[History] = None,
         optimizer: Optional[_optim.Optimizer] = None, dp: Optional[_privacy.DP] = None) -> None:
    """Write ``net`` (and ``history``, ``optimizer`` and ``dp``, to resume training with)
    to ``path``, atomically.

    The file is written exactly at ``path`` (no suffix is added); ``.npz`` is customary.
    The optimizer must be ``net``'s (bound to it by a step) or not yet bound.
    """
    if history is not None and not isinstance(history, History):
        raise TypeError(f"history must be a gpu_mlp.training.History, got "
                        f"{type(history).__name__}")
    if optimizer is not None:
        if not isinstance(optimizer, _optim.Optimizer):
            raise TypeError(f"optimizer must be a gpu_mlp.optim optimizer, got "
                            f"{type(optimizer).__name__}")
        optimizer._check_net(net)
    if dp is not None and not isinstance(dp, _privacy.DP):
        raise TypeError(f"dp must be a gpu_mlp.privacy.DP, got {type(dp).__name__}")
    from . import __version__

    meta = {
        "format": FORMAT,
        "version": VERSION,
        "model": "MLP" if isinstance(net, MLP) else "Network",
        "layers": [layer.spec() for layer in net.layers],
        "loss": net.loss.name,
        "memory": net.memory,
        "dtype": net.dtype.name,
        "written_by": f"gpu_mlp {__version__}",
        "history": None if history is None else history.as_dict(),
    }
    arrays = {}
    for k, (W, b) in enumerate(net.params, start=1):
        arrays[f"W_{k}"], arrays[f"b_{k}"] = to_numpy(W), to_numpy(b)
    if optimizer is not None:
        state = optimizer.state_dict()
        for name, pairs in state.pop("state").items():
            for k, (W_state, b_state) in enumerate(pairs, start=1):
                arrays[f"{_OPT}{name}_W_{k}"], arrays[f"{_OPT}{name}_b_{k}"] = W_state, b_state
        meta["optimizer"] = state
    if dp is not None:
        meta["dp"] = dp.state_dict()
    arrays = {"meta": np.array(json.dumps(meta)), **arrays}

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


def load(path, device: str = "auto") -> Network:
    """The network stored at ``path``, on ``device``; see :func:`read`."""
    return read(path, device=device).net


def read(path, device: str = "auto") -> Checkpoint:
    """The network, training history and optimizer stored at ``path``.

    Raises :class:`CheckpointError` (a ValueError) saying what is wrong with a file that
    is not a complete, consistent checkpoint; OSError if it cannot be opened at all.
    """
    path = os.fspath(path)
    meta, arrays = _read_npz(path)
    try:
        model, layers, dtype = _check_meta(meta)
        state = {key: arrays.pop(key) for key in list(arrays) if key.startswith(_OPT)}
        params = _check_params(arrays, layers, dtype)
        history = None if meta["history"] is None else History.from_dict(meta["history"])
        optimizer = _check_optimizer(meta.get("optimizer"), state, len(layers), dtype)
        dp = None if meta.get("dp") is None else _check_dp(meta["dp"])
        if model == "MLP":
            net = MLP.from_params(params, [layer.activation for layer in layers],
                                  meta["loss"], memory=meta["memory"], device=device,
                                  dtype=dtype)
        else:
            net = Network.from_params(layers, params, meta["loss"], memory=meta["memory"],
                                      device=device, dtype=dtype)
        if optimizer is not None:
            optimizer._bind(net)  # checks its state against the net, puts it on the device
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: {e}") from None
    return Checkpoint(net, history, optimizer, dp)


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


_META_KEYS = {
    1: ("format", "version", "sizes", "activations", "loss", "memory", "dtype",
        "written_by", "history"),
    2: ("format", "version", "model", "layers", "loss", "memory", "dtype", "written_by",
        "history"),
}


def _check_meta(meta):
    """``(model, layers, dtype)`` from checked metadata of either version."""
    version = meta.get("version")
    if version not in _META_KEYS:
        raise ValueError(f"format version {version!r}, but this gpu_mlp reads versions "
                         f"{', '.join(map(str, _META_KEYS))}")
    missing = [key for key in _META_KEYS[version] if key not in meta]
    if missing:
        raise ValueError(f"metadata lacks {', '.join(missing)}")
    if meta["dtype"] not in ("float32", "float64"):
        raise ValueError(f"dtype must be float32 or float64, got {meta['dtype']!r}")
    dtype = np.dtype(meta["dtype"])
    if version == 1:
        return "MLP", _version_1_layers(meta["sizes"], meta["activations"]), dtype
    if meta["model"] not in ("MLP", "Network"):
        raise ValueError(f"model must be MLP or Network, got {meta['model']!r}")
    specs = meta["layers"]
    if not isinstance(specs, list) or not specs:
        raise ValueError(f"layers must be a non-empty list, got {specs!r}")
    layers = []
    for k, spec in enumerate(specs, start=1):
        try:
            layers.append(_layers.from_spec(spec))
        except (TypeError, ValueError) as e:
            raise ValueError(f"layer {k}: {e}") from None
    if meta["model"] == "MLP" and not all(isinstance(layer, Dense) for layer in layers):
        raise ValueError("model MLP must have Dense layers only")
    return meta["model"], layers, dtype


def _version_1_layers(sizes, activations) -> list:
    if (not isinstance(sizes, list) or len(sizes) < 2
            or not all(type(s) is int and s >= 1 for s in sizes)):
        raise ValueError(f"sizes must list at least two widths >= 1, got {sizes!r}")
    if not isinstance(activations, list) or not all(isinstance(a, str) for a in activations):
        raise ValueError(f"activations must be a list of names, got {activations!r}")
    if len(activations) != len(sizes) - 1:
        raise ValueError(f"expected {len(sizes) - 1} activations (one per layer), got "
                         f"{len(activations)}")
    return [Dense(d_in, d_out, act) for d_in, d_out, act in zip(sizes, sizes[1:], activations)]


def _check_params(arrays, layers, dtype):
    n = len(layers)
    expected = [f"{p}_{k}" for k in range(1, n + 1) for p in ("W", "b")]
    missing = [key for key in expected if key not in arrays]
    extra = sorted(set(arrays) - set(expected))
    if missing or extra:
        raise ValueError(f"the parameter entries do not match the {n} layers: "
                         f"missing {missing or 'none'}, unexpected {extra or 'none'}")
    params = []
    for k, layer in enumerate(layers, start=1):
        W, b = arrays[f"W_{k}"], arrays[f"b_{k}"]
        for name, a, shape in ((f"W_{k}", W, layer.weight_shape), (f"b_{k}", b, layer.bias_shape)):
            if a.shape != tuple(shape):
                raise ValueError(f"{name} has shape {a.shape}, but layer {k}, {layer}, needs "
                                 f"{tuple(shape)}")
            if a.dtype != dtype:
                raise ValueError(f"{name} has dtype {a.dtype}, but the metadata says {dtype}")
        params.append((W, b))
    return params


def _check_optimizer(spec, entries, n: int, dtype):
    """The optimizer of ``meta["optimizer"]`` and its ``opt_*`` entries, not yet bound;
    None for a checkpoint without one."""
    if spec is None:
        if entries:
            raise ValueError(f"optimizer state entries {sorted(entries)} but no optimizer "
                             f"in the metadata")
        return None
    if not isinstance(spec, dict) or spec.get("type") not in _optim.OPTIMIZERS:
        raise ValueError(f"optimizer must be a dict with a type in "
                         f"{list(_optim.OPTIMIZERS)}, got {spec!r}")
    names = sorted({key[len(_OPT):].rsplit("_", 2)[0] for key in entries})
    state = {}
    for name in names:
        expected = [f"{_OPT}{name}_{p}_{k}" for k in range(1, n + 1) for p in ("W", "b")]
        missing = [key for key in expected if key not in entries]
        if missing:
            raise ValueError(f"the optimizer state {name!r} lacks {missing}")
        pairs = [(entries[f"{_OPT}{name}_W_{k}"], entries[f"{_OPT}{name}_b_{k}"])
                 for k in range(1, n + 1)]
        for key in expected:
            if entries[key].dtype != dtype:
                raise ValueError(f"{key} has dtype {entries[key].dtype}, but the metadata "
                                 f"says {dtype}")
        state[name] = pairs
    extra = sorted(set(entries) - {f"{_OPT}{name}_{p}_{k}" for name in names
                                   for k in range(1, n + 1) for p in ("W", "b")})
    if extra:
        raise ValueError(f"unexpected optimizer entries {extra}")
    try:
        return _optim.from_state_dict({**spec, "state": state})
    except (TypeError, ValueError) as e:
        raise ValueError(f"optimizer: {e}") from None


def _check_dp(spec):
    try:
        return _privacy.DP.from_state_dict(spec)
    except (TypeError, ValueError) as e:
        raise ValueError(f"dp: {e}") from None
