"""Checkpoints: a network's parameters, architecture, history and optimizer in one ``.npz``.

:func:`save` writes, :func:`read` gives a :class:`Checkpoint` (net, history, optimizer,
DP, data name), :func:`load` the net alone; :func:`hold` keeps other processes from
writing the same checkpoint while a run lasts. The format (version 2) is a plain,
uncompressed ``.npz`` that NumPy alone can read:

* ``meta``: a 0-d string array of JSON: ``format``, ``version``, ``model`` (``"MLP"`` or
  ``"Network"``), ``layers`` (:meth:`gpu_mlp.layers.Layer.spec` of each, the activation
  as ``str(activation)`` so ReLU's alpha survives), ``loss``, ``memory``, ``dtype``,
  ``written_by``, ``history`` (a :class:`~gpu_mlp.training.History` or null) and,
  optionally, ``optimizer`` (``type``, ``hyperparameters``, ``schedule``, ``steps``,
  ``last_lr``; absent or null: plain SGD), ``dp`` (the :class:`gpu_mlp.privacy.DP`
  settings and ``steps``, its noise stream's position) and ``data`` (the data set's name);
* ``W_1, b_1, ..., W_n, b_n`` in torch's layouts (``(d_k, d_{k-1})``, or ``(c_out, c_in,
  kh, kw)``), and ``opt_<state>_W_k``, ``opt_<state>_b_k`` for the optimizer's state
  (``momentum_buffer``, or ``exp_avg`` and ``exp_avg_sq``).

Version 1 files (an MLP as ``sizes`` and ``activations``) are still read. A save goes to
a temporary ``.NAME.PID.RANDOM.tmp`` beside the target, renamed over it (atomic), so an
interrupted writer leaves the old checkpoint; the next save removes temporaries of
writers that died. Symlinks are written through; permission bits are kept. :func:`read`
trusts nothing: metadata first (32 MiB at most), then every entry's name, shape, dtype
and size from its ``.npy`` header against the model described, and only then the data,
no more bytes than that model has (a deflate bomb or a lying header is refused unread).
Object arrays are never unpickled. Errors are a :class:`CheckpointError` naming the file.

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
import errno
import functools
import inspect
import io
import json
import math
import os
import secrets
import stat
import time
import zipfile
import zlib
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np

from ._version import __version__
from .device import to_numpy
from . import _checks
from . import layers as _layers
from . import optim as _optim
from . import privacy as _privacy
from .layers import Dense
from .plan import StepPlan
from .training import History

FORMAT = "gpu_mlp.checkpoint"
VERSION = 2  # written; version 1 (MLPs before convolutions) is read too
_OPT = "opt_"  # the prefix of the optimizer's state entries


class CheckpointError(ValueError):
    """A file that is not a valid gpu_mlp checkpoint."""


# The model classes a checkpoint names and rebuilds: ``MODELS[name] = (cls, build)``,
# ``build(layers, params, loss, memory, device, dtype[, copy])`` the net. The modules that
# define them register them (gpu_mlp.network, gpu_mlp.mlp), so this module imports neither.
MODELS: dict[str, tuple[type, Callable]] = {}


def register(name: str, cls: type, build: Optional[Callable] = None) -> None:
    """Save instances of ``cls`` (and of its subclasses not registered themselves) as
    model ``name``, and rebuild them with ``build(layers, params, loss, memory=, device=,
    dtype=)`` (default: ``cls.from_params``), given ``copy=False`` too where it takes it."""
    MODELS[name] = (cls, cls.from_params if build is None else build)


def _takes(function: Callable, name: str) -> bool:
    """Whether ``function`` takes the keyword ``name`` (a builder registered before
    ``copy`` existed does not)."""
    parameters = inspect.signature(function).parameters
    return name in parameters or any(p.kind is p.VAR_KEYWORD for p in parameters.values())


def _model_name(net) -> str:
    for kind in type(net).__mro__:
        for name, (cls, _) in MODELS.items():
            if cls is kind:
                return name
    raise TypeError(f"net must be a gpu_mlp network ({', '.join(sorted(MODELS))}), got "
                    f"{type(net).__name__}")


# what reading a damaged member of the zip can raise: a bad CRC or header, a broken
# deflate stream, data cut short, a compression method zipfile lacks
_DAMAGED = (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error, NotImplementedError)


@dataclass
class Checkpoint:
    """What :func:`read` returns: the network, the training history (or None) and the
    optimizer (or None: plain SGD), bound to ``net`` with its state on net's device."""

    net: Any  # the gpu_mlp.Network (or MLP) stored
    history: Optional[History]
    optimizer: Optional[_optim.Optimizer] = None
    dp: Optional[_privacy.DP] = None
    data: Optional[str] = None  # the name of the data set trained on, if the writer gave it


def save(net, path, history: Optional[History] = None,
         optimizer: Optional[_optim.Optimizer] = None, dp: Optional[_privacy.DP] = None,
         data: Optional[str] = None, plan: Optional[StepPlan] = None) -> None:
    """Write ``net`` (and ``history``, ``optimizer``, ``dp`` and the name of the ``data``
    set, to resume training with) to ``path``, atomically.

    ``plan``: a :class:`gpu_mlp.plan.StepPlan` instead of ``optimizer`` and ``dp``: its
    optimizer (none for plain SGD, which has no state) and its DP are saved.
    The file is written exactly at ``path`` (no suffix is added); ``.npz`` is customary.
    The optimizer must be ``net``'s (bound to it by a step) or not yet bound. Temporary
    files of ``path`` left by writers that were killed mid-save are removed.
    """
    # parameters replaced by hand must be what the net computes with (and what load
    # takes), before the file -- which replaces the last good one -- is written
    net.inputs.check_params(net.params)
    if plan is not None:
        if not isinstance(plan, StepPlan):
            raise TypeError(f"plan must be a gpu_mlp.plan.StepPlan, got {type(plan).__name__}")
        if optimizer is not None or dp is not None:
            raise ValueError("give plan or optimizer and dp, not both: the plan holds them")
        optimizer, dp = plan.optimizer, plan.dp
    if history is not None and not isinstance(history, History):
        raise TypeError(f"history must be a gpu_mlp.training.History, got "
                        f"{type(history).__name__}")
    if optimizer is not None:
        if not isinstance(optimizer, _optim.Optimizer):
            raise TypeError(f"optimizer must be a gpu_mlp.optim optimizer, got "
                            f"{type(optimizer).__name__}")
        optimizer.check_net(net)
    if dp is not None and not isinstance(dp, _privacy.DP):
        raise TypeError(f"dp must be a gpu_mlp.privacy.DP, got {type(dp).__name__}")
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "model": _model_name(net),
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
    if data is not None:
        if not isinstance(data, str):
            raise TypeError(f"data must be the name of a data set, got {type(data).__name__}")
        meta["data"] = data
    arrays = {"meta": np.array(json.dumps(meta)), **arrays}

    target = writable_target(path)
    try:
        mode = stat.S_IMODE(os.stat(target).st_mode)  # what the new file keeps
    except FileNotFoundError:
        mode = None
    directory, name = os.path.split(target)
    _remove_stale_temporaries(directory, name)
    # the writer's pid in the name tells a later save whether the file is still in use
    temp = os.path.join(directory, f".{name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:  # opened inside: an interrupt right after the open leaves no temporary either
        with open(temp, "xb") as f:
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
    A path may be ``str``, ``bytes`` or path-like, as for ``open``.
    """
    path = os.fsdecode(path)
    if not path:
        raise ValueError("cannot write to an empty path")
    given = os.path.dirname(path) or os.curdir
    if not os.path.isdir(given):  # as open() resolves it: "missing/.." is no directory,
        # though realpath's lexical ".." would make it one (and write where open cannot)
        raise FileNotFoundError(f"cannot write {path}: no directory {given}")
    target = os.path.realpath(path)
    if os.path.isdir(target):
        raise IsADirectoryError(f"cannot write {path}: it is a directory")
    if os.path.exists(target) and not os.path.isfile(target):  # a FIFO, a device: the
        # save's rename would replace the node itself (/dev/null, as root)
        raise OSError(f"cannot write {path}: {target} is not a regular file")
    directory = os.path.dirname(target)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"cannot write {path}: no directory {directory}")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot write {path}: directory {directory} is not writable")
    return target


_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)  # POSIX; Windows has no symlinks to plant
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)  # POSIX; Windows has no FIFOs to block on

# A temporary unwritten this long is a killed writer's, if its pid is no process here; a
# live writer in another PID namespace or on another host (a shared file system) looks
# dead from here, but writes on. One unwritten for a day is a killed writer's whatever its
# pid (which another process may have taken since).
STALE_AFTER_S = 60.0
ABANDONED_AFTER_S = 86400.0


def _remove_stale_temporaries(directory, name) -> None:
    """Remove the temporaries of ``name`` that writers killed mid-save left behind (no
    cleanup runs after a SIGKILL): see STALE_AFTER_S."""
    prefix = f".{name}."
    now = time.time()
    for entry in os.listdir(directory):
        parts = entry[len(prefix):].split(".")  # PID, RANDOM, "tmp"
        if not (entry.startswith(prefix) and len(parts) == 3 and parts[2] == "tmp"
                and parts[0].isdigit()):
            continue
        path = os.path.join(directory, entry)
        with contextlib.suppress(OSError):  # another save may have removed it first
            idle = now - os.stat(path).st_mtime
            if idle >= ABANDONED_AFTER_S or (idle >= STALE_AFTER_S
                                             and not _alive(int(parts[0]))):
                os.remove(path)


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists (where that cannot be asked, it is assumed to)."""
    if os.name != "posix":  # os.kill would end the process on Windows
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # it exists, owned by someone else
        return True
    return True


class CheckpointInUse(OSError):
    """Another process holds the checkpoint for writing (see :func:`hold`)."""


@contextlib.contextmanager
def hold(path):
    """Hold ``path`` for this process's writes for the duration of the block: a second
    ``hold`` of it, in any process, raises :class:`CheckpointInUse` naming the holder's
    pid, so two runs cannot save over each other's checkpoints.

    The lock is ``flock`` on a hidden ``.NAME.lock`` file beside the target, removed on
    exit; the kernel releases it when its holder dies, so a file left by a killed run
    blocks nothing. Where ``flock`` is missing (Windows) nothing is held.
    """
    try:
        import fcntl
    except ImportError:
        yield
        return
    directory, name = os.path.split(writable_target(path))
    lock = os.path.join(directory, f".{name}.lock")
    while True:
        try:  # never through a link planted there, nor onto a FIFO (which would block)
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | _NOFOLLOW | _NONBLOCK, 0o644)
        except OSError as e:  # a directory that refuses new files (/proc, a read-only
            # mount), or a link where the lock goes (ELOOP)
            raise type(e)(f"cannot write {os.fsdecode(path)}: {e.strerror.lower()} (its "
                          f"lock file {lock})") from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise OSError(f"cannot write {os.fsdecode(path)}: its lock file {lock} is not "
                          f"a regular file")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            with os.fdopen(fd) as f:
                holder = f.read().strip()
            # (a holder in this process: another thread's run, or a hold within a hold)
            where = " in this process" if holder == str(os.getpid()) else ""
            raise CheckpointInUse(f"{os.fsdecode(path)}: another run{where} (pid "
                                  f"{holder or '?'}) writes it") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # a holder removed it as we opened it: lock the new one
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        with contextlib.suppress(OSError):
            os.remove(lock)  # while still held: whoever opens it next sees it gone
        os.close(fd)


def _write(f, arrays) -> None:
    np.savez(f, **arrays)
    f.flush()
    os.fsync(f.fileno())  # the data is on disk before the rename makes it the checkpoint


def load(path, device: str = "auto"):
    """The network stored at ``path``, on ``device``; see :func:`read`."""
    return read(path, device=device).net


def read(path, device: str = "auto") -> Checkpoint:
    """The network, training history and optimizer stored at ``path``.

    Raises :class:`CheckpointError` (a ValueError) saying what is wrong with a file that
    is not a complete, consistent checkpoint; OSError if it cannot be opened at all.
    """
    path = os.fsdecode(path)
    with _open_regular(path) as f:
        try:
            return _read(f, device)
        except (TypeError, ValueError, RecursionError, ArithmeticError) as e:
            raise CheckpointError(f"{path}: {e}") from None


def _open_regular(path: str):
    """``path`` opened for reading if it is a regular file (after links); an OSError
    naming it if not -- a FIFO would block the read forever, a device stream on."""
    # non-blocking: a FIFO's open returns at once (binary: Windows translates no bytes)
    fd = os.open(path, os.O_RDONLY | _NONBLOCK | getattr(os, "O_BINARY", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", path)
        if _NONBLOCK:
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _read(f, device: str) -> Checkpoint:
    # the metadata first, then every name, shape and dtype against the model it
    # describes, and only then the data: a hostile file cannot make the reader hold
    # more than that model
    with _open_zip(f) as archive:
        members = _members(archive, os.fstat(f.fileno()).st_size)
        meta = _read_meta(members.pop("meta", None))
        model, layers, dtype = _check_meta(meta)
        entries = {key: members.pop(key) for key in list(members) if key.startswith(_OPT)}
        params = _check_params(members, layers, dtype)
        history = None if meta["history"] is None else History.from_dict(meta["history"])
        spec, state = _check_optimizer(meta.get("optimizer"), entries, layers, dtype)
        dp = None if meta.get("dp") is None else _check_dp(meta["dp"])
        data = _check_data(meta.get("data"))
        params = [(W.read(), b.read()) for W, b in params]
        state = {name: [(W.read(), b.read()) for W, b in pairs] for name, pairs in state.items()}
    optimizer = None if spec is None else _optimizer(spec, state)
    build = MODELS[model][1]
    # the arrays just read: one copy of the parameters, not two, where the builder can
    extra = {"copy": False} if _takes(build, "copy") else {}
    net = build(layers, params, meta["loss"], memory=meta["memory"], device=device, dtype=dtype,
                **extra)
    if optimizer is not None:
        optimizer.bind(net)  # checks its state against the net, puts it on the device
    return Checkpoint(net, history, optimizer, dp, data)


# The metadata is read whole, so it has a bound: 32 MiB of JSON in UTF-32, some 70,000
# epochs of history. Every other member is read only as large as the model needs it.
_META_BYTES = 1 << 25
_HEADER_BYTES = 10_000 + 16  # NumPy's own bound on a header, and the bytes before it
_DEFLATE_RATIO = 1032  # no deflate stream inflates more: a zip directory saying so lies
_INFLATED_BYTES, _INFLATION = 1 << 26, 20  # what deflated entries may grow to, together
_CHUNK = 1 << 20  # bytes inflated at a time into an array


def _open_zip(f) -> zipfile.ZipFile:
    start = f.read(6)
    f.seek(0)
    if start.startswith(b"\x93NUMPY"):
        raise ValueError("not a checkpoint (a single .npy array, not an .npz)")
    if not start.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        raise ValueError("not a checkpoint (not an .npz file)")
    try:
        return zipfile.ZipFile(f)
    except zipfile.BadZipFile as e:  # a zip, but its directory at the end is missing
        raise ValueError(f"damaged or truncated file ({e})") from None
    except _DAMAGED as e:
        raise ValueError(f"damaged or truncated file ({type(e).__name__}: {e})") from None


def _members(archive: zipfile.ZipFile, file_size: int) -> dict:
    """The ``.npy`` members by name (``W_1`` for ``W_1.npy``), none read yet. Deflated
    ones may inflate to at most :data:`_INFLATED_BYTES` or :data:`_INFLATION` times the
    file, together: a small file of honestly deflated zeros describing a huge model
    (a zip bomb) is refused before it fills the memory."""
    members = {}
    inflated = sum(info.file_size for info in archive.infolist()
                   if info.compress_type == zipfile.ZIP_DEFLATED)
    if inflated > max(_INFLATED_BYTES, _INFLATION * file_size):
        raise ValueError(f"its deflated entries would inflate {file_size:,} bytes into "
                         f"{inflated:,}, more than {_INFLATION}x (gpu_mlp stores its "
                         f"checkpoints uncompressed, whose numbers deflate little)")
    for info in archive.infolist():
        if not info.filename.endswith(".npy"):
            raise ValueError(f"unexpected entry {info.filename!r} (not an .npy array)")
        member = _Member(archive, info, file_size)
        if member.name in members:
            raise ValueError(f"the entry {member.name!r} appears twice")
        members[member.name] = member
    return members


class _Member:
    """One ``.npy`` member of a checkpoint, read header first: its ``shape`` and ``dtype``
    are known (and its sizes checked) before any data is read, and :meth:`read` reads
    no more bytes than they describe."""

    def __init__(self, archive: zipfile.ZipFile, info: zipfile.ZipInfo, archive_size: int):
        self.archive, self.info, self.name = archive, info, info.filename[:-len(".npy")]
        self._archive_size = archive_size

    def _damaged(self, what: str) -> ValueError:
        return ValueError(f"damaged or unreadable entry {self.name!r} ({what})")

    @functools.cached_property
    def _header(self) -> tuple:
        """``(shape, dtype, fortran, native, offset)``, the header's, read when first
        asked for: after the member's name was found to be one the model has."""
        info = self.info
        if info.flag_bits & 0x1:
            raise self._damaged("it is encrypted")
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise self._damaged(f"compression method {info.compress_type}; a checkpoint is "
                                f"stored or deflated")
        stored = info.compress_type == zipfile.ZIP_STORED
        most = info.compress_size if stored else _DEFLATE_RATIO * info.compress_size
        if info.header_offset + info.compress_size > self._archive_size or info.file_size > most:
            raise self._damaged(f"the zip directory's sizes, {info.compress_size} bytes "
                                f"holding {info.file_size}, cannot be right")
        try:
            with self.archive.open(info) as f:
                start = io.BytesIO(f.read(_HEADER_BYTES))
            version = np.lib.format.read_magic(start)
            if version not in ((1, 0), (2, 0)):
                raise ValueError(f".npy format version {version}")
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            shape, fortran, dtype = read_header(start)
        except _DAMAGED + (TypeError, SyntaxError) as e:
            raise self._damaged(str(e)) from None
        if dtype.hasobject:
            raise self._damaged("it holds Python objects, and a checkpoint is never unpickled")
        offset = start.tell()
        if info.file_size != offset + math.prod(shape) * dtype.itemsize:
            raise self._damaged(f"its header describes {shape} {dtype}, but it holds "
                                f"{info.file_size - offset} bytes of data")
        return shape, dtype.newbyteorder("="), fortran, dtype.isnative, offset

    @property
    def shape(self) -> tuple:
        return self._header[0]

    @property
    def dtype(self) -> np.dtype:
        """In native byte order: :meth:`read` swaps the bytes of another."""
        return self._header[1]

    def read(self) -> np.ndarray:
        shape, dtype, fortran, native, offset = self._header
        try:
            a = np.empty(shape[::-1] if fortran else shape, dtype)
        except MemoryError:
            raise ValueError(f"the entry {self.name!r}, {shape} {dtype}, does not fit in "
                             f"memory") from None
        data = memoryview(a.reshape(-1).view(np.uint8))
        try:
            with self.archive.open(self.info) as f:
                f.read(offset)
                done = 0
                while done < len(data):  # the last read checks the CRC
                    got = f.readinto(data[done:done + _CHUNK])
                    if not got:
                        raise EOFError("the data ends early")
                    done += got
        except _DAMAGED as e:
            raise self._damaged(str(e)) from None
        if not native:
            a.byteswap(inplace=True)
        return a.T if fortran else a


def _read_meta(member) -> dict:
    if member is None:
        raise ValueError("not a gpu_mlp checkpoint (no 'meta' entry)")
    if member.info.file_size > _META_BYTES:
        raise ValueError(f"the metadata takes {member.info.file_size} bytes, more than the "
                         f"{_META_BYTES} a checkpoint's may")
    meta = None
    if member.dtype.kind == "U" and member.shape == ():
        text = str(member.read())
        try:
            meta = json.loads(text)
        except RecursionError:
            raise ValueError("the metadata is nested too deeply") from None
        except ValueError:  # not JSON, or an integer longer than Python reads
            pass
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"not a gpu_mlp checkpoint (no {FORMAT} metadata)")
    return meta


_META_KEYS = {
    1: ("format", "version", "sizes", "activations", "loss", "memory", "dtype",
        "written_by", "history"),
    2: ("format", "version", "model", "layers", "loss", "memory", "dtype", "written_by",
        "history"),
}


def _check_meta(meta):
    """``(model, layers, dtype)`` from checked metadata of either version."""
    version = meta.get("version")
    if type(version) is not int or version not in _META_KEYS:  # (True is no version 1)
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
    if not _checks.named(meta["model"], MODELS):
        raise ValueError(f"model must be {' or '.join(sorted(MODELS))}, got "
                         f"{meta['model']!r}")
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


def _some(names: list, shown: int = 8) -> str:
    """``names`` for an error message, the first few of a crafted file's thousands."""
    if not names:
        return "none"
    more = f" and {len(names) - shown:,} more" if len(names) > shown else ""
    return f"{names[:shown]}{more}"


def _check_params(arrays, layers, dtype):
    n = len(layers)
    expected = [f"{p}_{k}" for k in range(1, n + 1) for p in ("W", "b")]
    missing = [key for key in expected if key not in arrays]
    extra = sorted(set(arrays) - set(expected))
    if missing or extra:
        raise ValueError(f"the parameter entries do not match the {n} layers: "
                         f"missing {_some(missing)}, unexpected {_some(extra)}")
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


def _check_optimizer(spec, entries, layers, dtype):
    """``(spec, state)``: the optimizer of ``meta["optimizer"]`` (None for a checkpoint
    without one) and its ``opt_*`` entries as ``{name: [(W_k's, b_k's)]}``, unread."""
    if spec is None:
        if entries:
            raise ValueError(f"optimizer state entries {_some(sorted(entries))} but no "
                             f"optimizer in the metadata")
        return None, {}
    if (not isinstance(spec, dict) or not _checks.named(spec.get("type"), _optim.OPTIMIZERS)
            or "state" in spec):
        raise ValueError(f"optimizer must be a dict with a type in "
                         f"{list(_optim.OPTIMIZERS)}, got {spec!r}")
    n = len(layers)
    names = sorted({key[len(_OPT):].rsplit("_", 2)[0] for key in entries})
    expected = {f"{_OPT}{name}_{p}_{k}" for name in names for k in range(1, n + 1)
                for p in ("W", "b")}
    extra = sorted(set(entries) - expected)
    if extra:
        raise ValueError(f"unexpected optimizer entries {_some(extra)}")
    state = {}
    for name in names:
        missing = [f"{_OPT}{name}_{p}_{k}" for k in range(1, n + 1) for p in ("W", "b")
                   if f"{_OPT}{name}_{p}_{k}" not in entries]
        if missing:
            raise ValueError(f"the optimizer state {name!r} lacks {_some(missing)}")
        for k, layer in enumerate(layers, start=1):
            for p, shape in (("W", layer.weight_shape), ("b", layer.bias_shape)):
                a = entries[f"{_OPT}{name}_{p}_{k}"]
                if a.shape != tuple(shape):
                    raise ValueError(f"optimizer: the state {name!r} of {p}_{k} has shape "
                                     f"{a.shape}, but {p}_{k} has {tuple(shape)}")
                if a.dtype != dtype:
                    raise ValueError(f"{_OPT}{name}_{p}_{k} has dtype {a.dtype}, but the "
                                     f"metadata says {dtype}")
        state[name] = [(entries[f"{_OPT}{name}_W_{k}"], entries[f"{_OPT}{name}_b_{k}"])
                       for k in range(1, n + 1)]
    return spec, state


def _optimizer(spec, state):
    try:
        return _optim.from_state_dict({**spec, "state": state})
    except (TypeError, ValueError) as e:
        raise ValueError(f"optimizer: {e}") from None


def _check_data(name):
    if name is not None and not isinstance(name, str):
        raise ValueError(f"data must be the name of a data set, got {name!r}")
    return name


def _check_dp(spec):
    try:
        return _privacy.DP.from_state_dict(spec)
    except (TypeError, ValueError) as e:
        # the field's name, not the class's too ("dp: DP: seed ...")
        raise ValueError(f"dp: {str(e).removeprefix('DP: ')}") from None
