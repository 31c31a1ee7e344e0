"""Data-parallel training over MPI (and NCCL on GPUs): every rank the same update.

Each rank runs the ordinary backward pass on its share of the global batch, its loss
scaled by ``1 / (global batch size)``. A :class:`Communicator` (:func:`communicator`)
is the stage of the backward pass (:mod:`gpu_mlp.updates`) that sums the ranks' shares
of each layer's gradient, by one of two exact paths: ``"allreduce"`` (each rank forms
``[T_r^T X_r | T_r^T 1]`` in a flat buffer, summed in place, applied by
``Apply.gradient``) or ``"gather"`` (every rank all-gathers the factors ``T_r`` and
``X_r`` and applies one GEMM over the global batch straight into ``W_k``). ``path="auto"``
takes the one that sends fewer bytes, per layer and step (:func:`choose_path`,
:func:`path_values`); :func:`bytes_sent` counts them. The sum, the bytes of each path and
the rule are in docs/MATH.md, "Data parallel: which bytes to send". Beyond that page:

* The rule must give the same path on every rank, so it averages over ranks. On a GPU
  NCCL's all-gather takes equal blocks: every rank sends ``max(b_r)`` rows, zero-padded,
  and ``N`` is ``P max(b_r)``. The rule counts bytes only; the gather path also runs the
  weight GEMM over all ``N`` rows on every rank, which on fast links can cost more than
  it saves (bench/scaling.py measures both). Convolutions always allreduce.
* Overlap: each layer's collective starts nonblocking (``Iallreduce``,
  ``Iallgatherv``) as soon as the backward pass hands over its factors;
  :meth:`_Stage.finish` waits for the layers in order and applies them, and only then
  does the engine take the factors back (``keeps_factors``). Buffers are kept per net
  and layer shape, sized for the largest batch seen: the steady state allocates nothing.
* GPUs: one rank per GPU, picked from the node-local rank when the Communicator is made
  (make it before any net). A CuPy net's collectives run on NCCL on the current stream;
  the NCCL communicator is made at the first CuPy step, its id broadcast over MPI.
* Faults, no rank left waiting for another: :meth:`Communicator.check_same` raises the
  same ValueError on every rank when a configuration differs; :meth:`Communicator.settle`
  and :meth:`Communicator.row_counts` tell every rank whether a check failed on any (a
  fit's arguments or callback, a step's input), which then raises on every rank;
  :meth:`Communicator.guard` turns any other exception on one rank into ``MPI_Abort``;
  a dead rank is left to the launcher.
* DP (:mod:`gpu_mlp.privacy`) clips each rank's own samples upstream; its noise, the
  same on every rank, is added once, to the summed gradient.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import traceback
import weakref

import numpy as np

from . import layers as _layers
from . import ops
from .updates import Rule, Stage
from .workspace import Workspace

PATHS = ("auto", "allreduce", "gather")
_MPI_HINT = 'data-parallel training needs mpi4py and an MPI: pip install "gpu_mlp[mpi]"'
_EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports Ctrl-C


# Open MPI's nonblocking allreduce (coll/libnbc) picks its algorithm by size; on 2 ranks
# here its default took 18-48 ms for a 4 MB in-place Iallreduce, the ring 0.6-0.9 ms (the
# bandwidth-optimal algorithm NCCL uses too). It is read when MPI starts, so it is set
# before mpi4py first loads MPI, and only where the user has not set it.
_OPEN_MPI_DEFAULTS = {"OMPI_MCA_coll_libnbc_iallreduce_algorithm": "ring"}


def _mpi():
    if "mpi4py.MPI" not in sys.modules:
        for name, value in _OPEN_MPI_DEFAULTS.items():
            os.environ.setdefault(name, value)
    try:
        from mpi4py import MPI
    except ImportError as e:
        raise ImportError(f"{_MPI_HINT} ({e})") from None
    return MPI


# --- the cost model ----------------------------------------------------------------------

def path_values(d_out: int, K: int, counts, padded: bool = False) -> dict:
    """Values sent per rank, averaged over the ranks, for one layer (d_out, K) and the
    row counts of all ranks: ``{"allreduce": 2 (P-1)/P d_out (K+1), "gather": (P-1)/P
    N (d_out+K)}``; ``padded``: every rank sends ``max(counts)`` rows (NCCL)."""
    P = len(counts)
    N = P * max(counts, default=0) if padded else sum(counts)
    return {"allreduce": 2 * (P - 1) * d_out * (K + 1) / P,
            "gather": (P - 1) * N * (d_out + K) / P}


def choose_path(layer, counts, path: str = "auto", padded: bool = False) -> str:
    """``"allreduce"`` or ``"gather"`` for ``layer`` and the row counts of all ranks.

    Convolutions always allreduce (their im2col rows are larger than the gradient).
    ``path`` forces one for Dense layers; ``"auto"`` gathers iff
    ``N (d_out + K) < 2 d_out (K + 1)`` (``N`` the global batch, ``P max(counts)`` when
    ``padded``). With one rank nothing is sent either way and auto gathers (the stage
    then hands the factors straight to the update: the plain single-process step).
    """
    if path not in PATHS:
        raise ValueError(f"unknown path {path!r}; valid: {', '.join(PATHS)}")
    if not isinstance(layer, _layers.Dense):
        return "allreduce"
    if path != "auto":
        return path
    if len(counts) == 1:
        return "gather"
    d_out, K = layer.d_out, layer.d_in
    N = len(counts) * max(counts) if padded else sum(counts)
    # path_values' two sides times P / (P - 1), in integers: every rank decides alike
    return "gather" if N * (d_out + K) < 2 * d_out * (K + 1) else "allreduce"


def bytes_sent(how: str, d_out: int, K: int, counts, rank: int, itemsize: int,
               padded: bool = False) -> int:
    """Bytes that ``rank`` sends for one layer by path ``how`` (the model above):
    allreduce ``2 (P-1) n / P`` values (rounded down), gather ``(P-1) b_rank (d_out+K)``."""
    P = len(counts)
    if how == "allreduce":
        return 2 * (P - 1) * d_out * (K + 1) * itemsize // P
    rows = max(counts, default=0) if padded else counts[rank]
    return (P - 1) * rows * (d_out + K) * itemsize


# --- the communicator ----------------------------------------------------------------------

class Communicator:
    """The ranks of a data-parallel run, over an mpi4py communicator.

    >>> comm = Communicator()                                    # doctest: +SKIP
    >>> net.train_step(X_mine, Y_mine, 0.1, comm=comm)           # doctest: +SKIP

    Args:
        comm: an mpi4py communicator (default ``MPI.COMM_WORLD``).
        path: ``"auto"`` (per layer, the path that sends fewer bytes: see the module),
            ``"allreduce"`` or ``"gather"`` (forced, for Dense layers; convolutions
            always allreduce).

    Make it before any net: where CuPy sees GPUs it makes GPU ``local_rank % count``
    the current device (one rank per GPU).

    Attributes: ``rank``, ``size``, ``local_rank`` and ``local_size`` (within the node),
    ``is_root``, ``device_id`` (the GPU picked, or None), ``path`` (may be changed
    between steps), ``bytes_sent`` (bytes this rank sent in gradient collectives, by the
    cost model of the module; the tests and benchmarks read it).
    """

    def __init__(self, comm=None, path: str = "auto"):
        MPI = _mpi()
        self.path = path  # (checked first: nothing is made for a bad one)
        self.MPI = MPI
        self.comm = MPI.COMM_WORLD if comm is None else comm
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        node = self.comm.Split_type(MPI.COMM_TYPE_SHARED, key=self.rank)
        self.local_rank, self.local_size = node.Get_rank(), node.Get_size()
        node.Free()
        self.bytes_sent = 0
        self._guards = 0  # guard()s entered and not yet left
        self._count_buffers = (np.zeros(1, np.int64), np.zeros(self.size, np.int64))
        self._pools = weakref.WeakKeyDictionary()  # net -> Workspace of gathered factors
        self._nccl = None
        self.device_id = _pick_gpu(self.local_rank)

    @property
    def path(self) -> str:
        return self._path

    @path.setter
    def path(self, path: str) -> None:  # set by hand too: checked then, not at a step
        if path not in PATHS:
            raise ValueError(f"unknown communication path {path!r}; valid: {', '.join(PATHS)}")
        self._path = path

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    def __repr__(self) -> str:
        return (f"Communicator(rank={self.rank}, size={self.size}, "
                f"local_rank={self.local_rank}, path={self.path!r})")

    # --- small collectives, for the training loop -------------------------------------

    def sum(self, values) -> np.ndarray:
        """The elementwise sum over ranks of a small host array (as float64)."""
        send = np.ascontiguousarray(values, dtype=np.float64)
        out = np.empty_like(send)
        self.comm.Allreduce(send, out, op=self.MPI.SUM)
        return out

    def bcast(self, value, root: int = 0):
        """``value`` of rank ``root`` on every rank (any picklable object)."""
        return self.comm.bcast(value, root=root)

    def allgather(self, value) -> list:
        """Every rank's ``value`` (any picklable object), in rank order, on every rank."""
        return self.comm.allgather(value)

    def barrier(self) -> None:
        self.comm.Barrier()

    def check_same(self, name: str, config: dict) -> None:
        """Raise the same ValueError on every rank unless every rank passed the same
        JSON-able ``config``; the message names each differing key and the ranks' values."""
        mine = json.dumps(config, sort_keys=True, default=str)
        everyone = [json.loads(c) for c in self.comm.allgather(mine)]
        keys = sorted(set().union(*everyone), key=str)
        missing = object()
        problems = []
        for key in keys:
            values = [c.get(key, missing) for c in everyone]
            if any(v != values[0] for v in values[1:]):
                groups = {}
                for r, v in enumerate(values):
                    text = "(missing)" if v is missing else json.dumps(v)
                    groups.setdefault(text, []).append(r)
                problems.append(f"{key}: " + ", ".join(
                    f"{_ranks(rs)} {text}" for text, rs in groups.items()))
        if problems:
            error = ValueError(f"{name}: the {self.size} ranks must be configured alike, "
                               f"but they differ in {'; '.join(problems)}")
            error.every_rank = True  # the same on every rank: guard() lets it through
            raise error

    def settle(self, error: BaseException | None, what: str) -> None:
        """One collective in which every rank says whether ``what`` raised ``error`` on
        it (None: it did not). Returns where no rank raised; else raises on every rank,
        marked ``every_rank`` (so that no guard() aborts the job): a rank its own
        exception, a rank that raised none a RuntimeError naming the ranks that did and
        what they raised. Every rank then leaves together, none waits for another."""
        said = None if error is None else type(error).__name__ + (
            f": {error}" if str(error) else "")  # (sys.exit(): SystemExit, no message)
        everyone = self.comm.allgather(said)
        failed = [(r, text) for r, text in enumerate(everyone) if text is not None]
        if not failed:
            return
        if error is None:
            texts = {}
            for r, text in failed:
                texts.setdefault(text, []).append(r)
            where = "; ".join(f"{_ranks(rs)} ({text})" for text, rs in texts.items())
            error = RuntimeError(f"{what} raised on {where}, so every rank stops here")
        error.every_rank = True
        raise error

    def settled(self, what: str, call, catch=(Exception,)):
        """``call()``, its exception of ``catch`` (if any) then told to every rank by
        :meth:`settle`: every rank returns its result, or every rank raises."""
        error = result = None
        try:
            result = call()
        except catch as e:
            error = e
        self.settle(error, what)
        return result

    @contextlib.contextmanager
    def guard(self):
        """An exception inside ends the whole job: it prints ``rank r: <error>`` to stderr
        and aborts the communicator, so that no other rank waits forever in a collective
        for this one (a KeyboardInterrupt prints ``rank r: interrupted``, no traceback,
        and aborts with status 130). With one rank the exception is simply raised, and
        so is one that every rank raises alike, marked ``every_rank = True``
        (:meth:`check_same`'s, :meth:`settle`'s, :meth:`row_counts`' and fit's check of
        the parameters after each epoch, :class:`gpu_mlp.training.TrainingDiverged`): no
        rank waits for another then.
        Inside another guard() of this communicator (fit's inside the CLI's) the
        exception goes on to the outer one, and to the caller's handling within it."""
        self._guards += 1
        try:
            yield self
        except BaseException as e:
            if self._guards > 1 or self.size == 1 or getattr(e, "every_rank", False) or (
                    isinstance(e, SystemExit) and e.code in (None, 0)):
                raise
            if isinstance(e, KeyboardInterrupt):
                # Ctrl-C, or the launcher's SIGTERM once another rank has aborted (it can
                # land anywhere, an except clause included): a traceback would say nothing
                print(f"rank {self.rank}: interrupted", file=sys.stderr, flush=True)
                self.abort(_EXIT_INTERRUPTED)
            traceback.print_exc(file=sys.stderr)
            print(f"rank {self.rank}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
            self.abort(1)
        finally:
            self._guards -= 1

    def abort(self, code: int = 1) -> None:
        """End every rank of the job now (``MPI_Abort``)."""
        if self._nccl is not None:
            with contextlib.suppress(Exception):
                self._nccl.abort()  # so no GPU kernel waits on a dead peer
        self.comm.Abort(code)

    def close(self) -> None:
        """Release the NCCL communicator, if one was made (the MPI one is the caller's)."""
        if self._nccl is not None:
            self._nccl.destroy()
            self._nccl = None

    # --- the engine's side: the contract with Network._step ---------------------------

    def row_counts(self, rows: int, failed: BaseException | None = None) -> list[int]:
        """Every rank's row count of this step, in rank order (the same list everywhere).
        ``failed``: this rank's step cannot go on (its input failed a check): it says so
        in the same collective, and where any rank did every rank raises, as
        :meth:`settle` raises -- that rank ``failed``, the others a RuntimeError naming
        it and why."""
        send, counts = self._count_buffers
        send[0] = -1 if failed is not None else rows
        self.comm.Allgather(send, counts)
        if (counts < 0).any():  # every rank saw it: a second collective says why
            self.settle(failed, "the step's checks")
        return counts.tolist()

    def stage(self, net, downstream: Rule, counts) -> "_Stage":
        """The sink of one data-parallel step: sums each layer's gradient over the ranks
        and hands it to ``downstream``, the update rule (a :class:`~gpu_mlp.updates.Rule`:
        the allreduce path hands it the summed gradient)."""
        if not isinstance(downstream, Rule):
            raise TypeError(f"the allreduce path hands the update rule a summed gradient, "
                            f"which needs a gpu_mlp.updates.Rule; got {downstream!r}")
        counts = [int(c) for c in counts]
        if len(counts) != self.size:
            raise ValueError(f"counts must hold one row count per rank ({self.size}), "
                             f"got {len(counts)}")
        return _Stage(self, net, downstream, counts)

    def _pool(self, net) -> Workspace:
        """The buffers of ``net``'s gathered factors and gradients, kept between steps."""
        pool = self._pools.get(net)
        if pool is None or pool.xp is not net.xp or pool.dtype != net.dtype:
            pool = self._pools[net] = Workspace(net.xp, net.dtype)
        return pool

    def _nccl_comm(self):
        """The NCCL communicator of these ranks (made by the first CuPy step: every rank
        gets there together)."""
        if self._nccl is None:
            from cupy.cuda import nccl

            if not getattr(nccl, "available", True):
                raise RuntimeError("data-parallel training of a CuPy net needs NCCL, which "
                                   "this CuPy cannot load: pip install nvidia-nccl-cu12 (or "
                                   "-cu13, matching CuPy's CUDA)")
            uid = nccl.get_unique_id() if self.rank == 0 else None
            uid = self.comm.bcast(uid, root=0)
            self._nccl = nccl.NcclCommunicator(self.size, uid, self.rank)
        return self._nccl


def communicator(comm, net) -> Communicator:
    """``comm`` as a :class:`Communicator` for steps of ``net``: itself, or for an mpi4py
    communicator the one made for it (by every rank together) at its first use with
    ``net``, kept with the net so that its buffers last from step to step. On the CPU
    only: a GPU rank must pick its device before any net exists, which only a
    Communicator made first can do."""
    if isinstance(check_communicator(comm), Communicator):
        return comm
    if net.xp is not np:
        raise TypeError("on a GPU pass a gpu_mlp.distributed.Communicator(comm) made before "
                        "the network: it picks each rank's GPU, which must happen first")
    wrapper = _wrappers.get(net)
    if wrapper is None or wrapper.comm is not comm:
        wrapper = _wrappers[net] = Communicator(comm)
    return wrapper


def check_communicator(comm):
    """``comm`` if it is a :class:`Communicator` or an mpi4py communicator, else a
    TypeError naming it."""
    if not (isinstance(comm, Communicator)
            or all(hasattr(comm, name) for name in ("Get_rank", "Get_size", "Allreduce"))):
        raise TypeError(f"comm must be a gpu_mlp.distributed.Communicator or an mpi4py "
                        f"communicator, got {comm!r}")
    return comm


_wrappers = weakref.WeakKeyDictionary()  # net -> the Communicator made for its mpi4py comm


def _ranks(ranks) -> str:
    return f"rank {ranks[0]}" if len(ranks) == 1 else "ranks " + ",".join(map(str, ranks))


def _pick_gpu(local_rank: int):
    """Make GPU ``local_rank % count`` the current one, before anything touches a GPU
    (one rank per GPU of the node); None where there is no usable GPU."""
    try:
        import cupy

        count = cupy.cuda.runtime.getDeviceCount()  # creates no context
    except Exception:
        return None  # no CuPy, no driver or no device: a CPU rank
    if count <= 0:
        return None
    device = local_rank % count
    cupy.cuda.Device(device).use()
    return device


# --- the stage of the backward pass -----------------------------------------------------

class _Stage(Stage):
    """One data-parallel step: starts each layer's collective as its factors arrive,
    and in :meth:`finish` waits for them in order and applies each to ``downstream``."""

    keeps_factors = True  # the collectives read the factors until finish()

    def __init__(self, comm: Communicator, net, downstream: Rule, counts):
        super().__init__(downstream)
        self.comm, self.net, self.down, self.counts = comm, net, downstream, counts
        self.gpu = not ops.is_numpy(net.params[0][0])
        self.pool = comm._pool(net)
        self.pending = []  # (k, how, noise, requests, operands, held), in the order started

    def __call__(self, k, T_rows, X_rows, ones, noise=None):
        comm, layer = self.comm, self.net.layers[k]
        if comm.size == 1 and comm.path == "auto":
            self.down(k, T_rows, X_rows, ones, noise)  # nothing to send: the plain step
            return
        how = choose_path(layer, self.counts, comm.path, padded=self.gpu)
        W, b = self.net.params[k]
        d_out, K = _layers.Layer.weight_matrix(W).shape
        comm.bytes_sent += bytes_sent(how, d_out, K, self.counts, comm.rank,
                                      W.dtype.itemsize, padded=self.gpu)
        start = self._gather if how == "gather" else self._allreduce
        if self.gpu:
            start = self._gather_nccl if how == "gather" else self._allreduce_nccl
        requests, operands, held = start(k, T_rows, X_rows, ones)
        self.pending.append((k, how, noise, requests, operands, held))
        if requests:
            # MPI progresses a nonblocking collective inside MPI calls: a test per layer
            # moves the earlier layers' messages along while this backward pass goes on
            comm.MPI.Request.Testall([r for item in self.pending for r in item[3]])

    # --- starting a layer's collective -------------------------------------------------

    # Each returns (requests, operands, held): the MPI requests to wait for, what to
    # apply once they are done -- (G,) or (T_all, X_all) -- and the buffers to give back.

    def _share(self, k, T_rows, X_rows, ones):
        """This rank's share of layer k's gradient, ``[T^T X | T^T 1]``, in a flat buffer."""
        W, b = self.net.params[k]
        held = self.pool.take((1, W.size + b.size))
        G = held.reshape(-1)
        ops.weight_gradient(T_rows, X_rows, G[:W.size].reshape(W.shape[0], -1), ws=self.pool)
        ops.gemv("T", T_rows, ones, G[W.size:])
        return held, G

    def _allreduce(self, k, T_rows, X_rows, ones):
        held, G = self._share(k, T_rows, X_rows, ones)
        MPI = self.comm.MPI
        request = self.comm.comm.Iallreduce(MPI.IN_PLACE, G, op=MPI.SUM)
        return [request], (G,), (held,)

    def _gather(self, k, T_rows, X_rows, ones):
        counts = self.counts
        N = sum(counts)
        if N == 0:  # no rank has rows: the update rule still runs (weight decay)
            return [], (T_rows, X_rows), ()
        displs = [0]
        for c in counts[:-1]:
            displs.append(displs[-1] + c)
        requests, everyones = [], []
        for mine in (T_rows, X_rows):
            if not mine.flags.c_contiguous:
                raise ValueError("the factors of a data-parallel step must be C-contiguous")
            width = math.prod(mine.shape[1:])  # X_rows may be (rows, kh, kw, c_in): see ops
            everyone = self.pool.take((N, *mine.shape[1:]))
            spec = [everyone, [c * width for c in counts], [d * width for d in displs],
                    _mpi_type(everyone.dtype)]
            # MPI reads ``mine`` until finish(): keeps_factors keeps it ours until then
            requests.append(self.comm.comm.Iallgatherv(mine, spec))
            everyones.append(everyone)
        return requests, tuple(everyones), tuple(everyones)

    def _allreduce_nccl(self, k, T_rows, X_rows, ones):
        held, G = self._share(k, T_rows, X_rows, ones)
        nccl = _nccl_module()
        self.comm._nccl_comm().allReduce(G.data.ptr, G.data.ptr, G.size, _nccl_type(G.dtype),
                                         nccl.NCCL_SUM, _stream())
        return [], (G,), (held,)

    def _gather_nccl(self, k, T_rows, X_rows, ones):
        """NCCL's all-gather takes blocks of one size: every rank sends ``max(counts)``
        rows, its own rows then zero rows (a zero row of T adds exactly nothing to
        ``T^T X`` or ``T^T 1``, and a zero row of X holds no NaN to multiply)."""
        P, r, m = self.comm.size, self.comm.rank, max(self.counts)
        if m == 0:
            return [], (T_rows, X_rows), ()
        b = self.counts[r]
        everyones = []
        for mine in (T_rows, X_rows):
            width = math.prod(mine.shape[1:])
            everyone = self.pool.take((P * m, *mine.shape[1:]))
            block = everyone[r * m:(r + 1) * m]
            block[:b] = mine
            block[b:] = 0
            # in place: this rank's block already sits where the result wants it
            self.comm._nccl_comm().allGather(block.data.ptr, everyone.data.ptr, m * width,
                                             _nccl_type(everyone.dtype), _stream())
            everyones.append(everyone)
        return [], tuple(everyones), tuple(everyones)

    # --- applying the sums -------------------------------------------------------------

    def finish(self):
        """Wait for each layer's collective, in the order started, and apply it; then
        give the buffers back and finish the update rule."""
        pending, self.pending = self.pending, []
        try:
            for k, how, noise, requests, operands, _ in pending:
                if requests:
                    self.comm.MPI.Request.Waitall(requests)
                if how == "gather":
                    T_all, X_all = operands
                    self.down(k, T_all, X_all, self.pool.ones(T_all.shape[0]), noise)
                else:
                    self.down.gradient(k, operands[0], noise)
        finally:
            for *_, held in pending:
                self.pool.give(*held)
        super().finish()


def _mpi_type(dtype):
    from mpi4py.util import dtlib

    return dtlib.from_numpy_dtype(dtype)


def _nccl_module():
    from cupy.cuda import nccl

    return nccl


def _nccl_type(dtype):
    nccl = _nccl_module()
    types = {np.dtype(np.float32): nccl.NCCL_FLOAT32, np.dtype(np.float64): nccl.NCCL_FLOAT64}
    return types[np.dtype(dtype)]


def _stream() -> int:
    import cupy

    return cupy.cuda.get_current_stream().ptr
