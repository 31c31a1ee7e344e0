"""What tests/test_distributed.py runs under ``mpirun -n P``: one scenario per launch.

    mpirun -n 3 python tests/mpi_worker.py train      # data-parallel == one process
    mpirun -n 2 python tests/mpi_worker.py raise      # rank 1 raises inside guard()
    mpirun -n 2 python tests/mpi_worker.py interrupt  # rank 1 is interrupted inside guard()
    mpirun -n 2 python tests/mpi_worker.py die        # rank 1 dies in the middle of a step
    mpirun -n 3 python tests/mpi_worker.py mismatch   # configurations differ across ranks
    mpirun -n 2 python tests/mpi_worker.py fit_order  # rank 1's rows in another order
    mpirun -n 2 python tests/mpi_worker.py fit_raise  # rank 1's on_epoch raises, unguarded
    mpirun -n 2 python tests/mpi_worker.py fit_raise_handled  # ... and its caller handles it
    mpirun -n 2 python tests/mpi_worker.py fit_checks  # fit's arguments bad, unguarded
    mpirun -n 2 python tests/mpi_worker.py dp_differs  # a DP on rank 1 alone, unguarded
    mpirun -n 2 python tests/mpi_worker.py train_step_raise  # a bad batch on rank 1
    mpirun -n 2 python tests/mpi_worker.py drift      # rank 1's parameters drift apart
    mpirun -n 2 python tests/mpi_worker.py loss       # the losses reported are global

Every rank checks its own results and the job exits non-zero (``guard()`` aborts it)
on the first failure; rank 0 prints one ``OK ...`` line per passed case.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
import warnings

import numpy as np

import gpu_mlp
from gpu_mlp import optim
from gpu_mlp.distributed import Communicator
from gpu_mlp.layers import Conv2d, Dense
from gpu_mlp.training import TrainingWarning

N, BATCH, EPOCHS = 18, 8, 3  # batches of 8, 8, 2: the last gives 3 ranks a share of 0 rows


def dense_net():
    return gpu_mlp.Network([Dense(5, 7, "tanh"), Dense(7, 6, "relu"), Dense(6, 3, "identity")],
                           loss="softmax_cross_entropy", device="cpu", dtype="float64", seed=4)


def conv_net():
    # 3 outputs: on 3 ranks the shares 3, 3, 2 of a batch of 8 lie on both sides of its
    # d_out, where one process would run the Dense in two forms (layers.engine_forms):
    # a data-parallel step runs one on every rank, so gathered factors share one layout
    return gpu_mlp.Network([Conv2d(2, 3, 3, padding=1, activation="tanh"),
                            Dense(3 * 5 * 5, 3, "identity")],
                           loss="softmax_cross_entropy", device="cpu", dtype="float64", seed=4)


NETS = {"dense": (dense_net, (5,), 3), "conv": (conv_net, (2, 5, 5), 3)}
RULES = {
    "sgd": lambda: 0.2,
    "sgd-decay": lambda: optim.SGD(0.2, weight_decay=0.05),  # Apply's keep factor
    "adam": lambda: optim.Adam(0.02),                         # an optimizer's kernels
    "dp": lambda: 0.2,                                        # with DP upstream, below
}


def data(input_shape, classes):
    rng = np.random.default_rng(11)
    return rng.standard_normal((N, *input_shape)), rng.integers(0, classes, N)


def batches(epoch):
    """The global batches of an epoch: a shuffle from (seed, epoch), then runs of BATCH."""
    order = np.random.default_rng([5, epoch]).permutation(N)
    return [order[i:i + BATCH] for i in range(0, N, BATCH)]


def shares(total, size):
    """Contiguous shares of a global batch, as fit splits it: the first ranks one more."""
    counts = [total // size + (r < total % size) for r in range(size)]
    starts = np.concatenate(([0], np.cumsum(counts)))
    return counts, starts


def make_dp():
    from gpu_mlp.privacy import DP

    return DP(max_grad_norm=0.5, noise_multiplier=0.7, seed=9)


def train(net_name, rule_name, comm=None):
    """``EPOCHS`` epochs of train_step on the global batches; with ``comm``, each rank on
    its share. Returns the net and the model's bytes for this rank."""
    make, input_shape, classes = NETS[net_name]
    X, y = data(input_shape, classes)
    net, rule = make(), RULES[rule_name]()
    dp = make_dp() if rule_name == "dp" else None
    expected_bytes = 0
    for epoch in range(EPOCHS):
        for rows in batches(epoch):
            if comm is None:
                net.train_step(X[rows], y[rows], rule, dp=dp)
                continue
            counts, starts = shares(len(rows), comm.size)
            mine = rows[starts[comm.rank]:starts[comm.rank + 1]]
            net.train_step(X[mine], y[mine], rule, dp=dp, comm=comm)
            expected_bytes += model_bytes(net, counts, comm.rank, comm.size, comm.path)
    return net, expected_bytes


def model_bytes(net, counts, rank, size, path):
    """The bytes this rank should have sent for one step, written out independently of
    gpu_mlp.distributed: ring allreduce 2 (P-1)/P of the gradient, all-gather (P-1)
    times this rank's rows of T and X; auto gathers iff N (d_out + K) < 2 d_out (K + 1)."""
    total = 0
    for layer, (W, _) in zip(net.layers, net.params):
        d_out, K = W.shape[0], W.size // W.shape[0]
        fewer = sum(counts) * (d_out + K) < 2 * d_out * (K + 1)
        gather = isinstance(layer, Dense) and (path == "gather" or (path == "auto" and fewer))
        if gather:
            total += (size - 1) * counts[rank] * (d_out + K) * 8
        else:
            total += 2 * (size - 1) * d_out * (K + 1) * 8 // size
    return total


def flat(net):
    return np.concatenate([a.reshape(-1) for pair in net.params for a in pair])


def scenario_train(comm):
    for net_name in NETS:
        for rule_name in RULES:
            if net_name == "conv" and rule_name in ("sgd-decay", "dp"):
                continue  # the dense net covers them; the conv net its own path
            reference, _ = train(net_name, rule_name)
            for path in ("allreduce", "gather", "auto"):
                comm.path, comm.bytes_sent = path, 0
                net, expected_bytes = train(net_name, rule_name, comm)
                case = f"{net_name} {rule_name} {path}"
                ours = flat(net)
                error = np.abs(ours - flat(reference)).max()
                if not error <= 1e-12:
                    raise AssertionError(f"{case}: rank {comm.rank} differs from the "
                                         f"single-process run by {error:.3g}")
                everyone = comm.comm.allgather(ours.tobytes())
                if any(other != everyone[0] for other in everyone):
                    raise AssertionError(f"{case}: the ranks' parameters are not identical")
                if comm.bytes_sent != expected_bytes:
                    raise AssertionError(f"{case}: rank {comm.rank} sent {comm.bytes_sent} "
                                         f"bytes, the model says {expected_bytes}")
                pool = comm._pool(net)
                allocations = pool.allocations
                train_more(net, comm)
                if pool.allocations != allocations:
                    raise AssertionError(f"{case}: the steady state allocated "
                                         f"{pool.allocations - allocations} buffers")
                if comm.is_root:
                    print(f"OK {case}: max error {error:.2g}, {comm.bytes_sent} bytes sent "
                          f"by rank 0", flush=True)
    comm.path = "auto"


def train_more(net, comm):
    """One more epoch of the same batch sizes (the buffers are all there by now)."""
    make, input_shape, classes = NETS["conv" if isinstance(net.layers[0], Conv2d) else "dense"]
    X, y = data(input_shape, classes)
    for rows in batches(EPOCHS):
        counts, starts = shares(len(rows), comm.size)
        mine = rows[starts[comm.rank]:starts[comm.rank + 1]]
        net.train_step(X[mine], y[mine], 0.01, comm=comm)


def scenario_raise(comm):
    net = dense_net()
    X, y = data((5,), 3)
    if comm.rank == 1:
        raise ValueError("rank 1 fails on purpose")
    net.train_step(X[:4], y[:4], 0.1, comm=comm)  # waits for rank 1, which never comes
    comm.barrier()


def scenario_interrupt(comm):
    net = dense_net()
    X, y = data((5,), 3)
    if comm.rank == 1:
        raise KeyboardInterrupt  # as Ctrl-C or the launcher's SIGTERM (the CLI's) raise it
    net.train_step(X[:4], y[:4], 0.1, comm=comm)
    comm.barrier()


def scenario_die(comm):
    net = dense_net()
    X, y = data((5,), 3)
    net.train_step(X[:4], y[:4], 0.1, comm=comm)
    if comm.rank == 1:
        sys.stderr.write("rank 1 dies now\n")
        sys.stderr.flush()
        os._exit(3)  # no exception, no MPI_Finalize: as a crash or a kill -9
    net.train_step(X[:4], y[:4], 0.1, comm=comm)  # the others wait in a collective
    comm.barrier()


def scenario_mismatch(comm):
    config = {"sizes": [5, 7, 3], "dtype": "float64", "seed": 0, "batch_size": 8}
    if comm.rank == 1:
        config["seed"] = 1
    if comm.rank == comm.size - 1:
        config["dtype"] = "float32"
    try:
        comm.check_same("fit", config)
    except ValueError as e:
        print(f"rank {comm.rank} caught: {e}", flush=True)
    else:
        raise AssertionError(f"rank {comm.rank}: check_same let differing configs pass")
    comm.check_same("fit", {"sizes": [5, 7, 3]})  # alike: passes everywhere
    comm.barrier()


def scenario_fit_mistakes(comm):
    """Ranks that differ where they must not, each refused by fit on every rank before
    the first step: rank 1's rows in another order (integers: every sum the same), its
    communication path (the ranks then ran different collectives: an MPI error or a
    crash), its optimizer's moments (the ranks drifted apart), its validation data (its
    History differed)."""
    X, y = data((5,), 3)
    X = np.round(3 * X)
    other = comm.rank == 1
    mistakes = {
        "data": dict(X=X[::-1] if other else X, y=y[::-1] if other else y),
        "comm_path": dict(path="gather" if other else "allreduce"),
        "optimizer_state": {},
        "validation": dict(validation=(X[:4], y[:4]) if other else (X[4:8], y[4:8])),
    }
    for what, mistake in mistakes.items():
        net, optimizer = dense_net(), optim.Adam(1e-2)
        if what == "optimizer_state":  # a step alone on other rows: the moments differ
            rows = slice(0, BATCH) if other else slice(BATCH, 2 * BATCH)
            net.train_step(X[rows], y[rows], optimizer)
            net.params = dense_net().params  # the parameters alike again
        comm.path = mistake.get("path", "auto")
        try:
            net.fit(mistake.get("X", X), mistake.get("y", y), epochs=1, batch_size=BATCH,
                    verbose=False, comm=comm, optimizer=optimizer,
                    validation=mistake.get("validation"))
        except ValueError as e:
            print(f"rank {comm.rank} caught {what}: {e}", flush=True)
        else:
            raise AssertionError(f"rank {comm.rank}: fit let a difference in {what} pass")
    comm.path = "auto"


def scenario_secret_seed(comm):
    """DP() draws its seed on each rank: the ranks take rank 0's at their first step,
    in fit and in bare train_steps, so every rank adds the same noise and their
    parameters stay alike (fit refused the ranks as configured apart; train_step let
    them drift)."""
    X, y = data((5,), 3)
    for how in ("fit", "train_step"):
        net, dp = dense_net(), gpu_mlp.privacy.DP(1.0, 1.0)
        if how == "fit":
            net.fit(X, y, epochs=2, batch_size=BATCH, verbose=False, comm=comm, dp=dp)
        else:
            mine = slice(comm.rank * 2, comm.rank * 2 + 2)
            for _ in range(3):
                net.train_step(X[mine], y[mine], 0.1, dp=dp, comm=comm)
        digest = gpu_mlp.training._digest(*(a for pair in net.params for a in pair))
        seeds = comm.comm.allgather(dp.seed)
        digests = comm.comm.allgather(digest)
        assert len(set(seeds)) == 1 and len(set(digests)) == 1, (how, seeds, digests)
        if comm.is_root:
            print(f"OK secret seed {how}", flush=True)


def fit_failing_on_rank_1(comm, through, stop=None):
    """fit over ``through`` (a Communicator or mpi4py's own), whose on_epoch raises on
    rank 1 (or runs ``stop`` on rank 0): the other ranks would wait in the next epoch
    forever."""
    def on_epoch(net, history):
        if stop is not None and comm.rank == 0:
            stop()
        if stop is None and comm.rank == 1:
            raise RuntimeError("rank 1 fails inside fit")

    X, y = data((5,), 3)
    dense_net().fit(X, y, epochs=3, batch_size=BATCH, verbose=False, on_epoch=on_epoch,
                    comm=through)


def caught(comm, what, run, expected=Exception):
    """``run()`` must raise ``expected`` on this rank: print what it raised."""
    try:
        run()
    except expected as e:
        print(f"rank {comm.rank} caught {what}: {type(e).__name__}: {e}", flush=True)
    else:
        raise AssertionError(f"rank {comm.rank}: {what} raised nothing")


def scenario_fit_raise(comm):
    """Nothing outside fit guards it: an on_epoch that raises (or exits) on one rank is
    raised on every rank -- its own exception there, a RuntimeError naming it elsewhere
    -- and the job goes on, no rank left waiting."""
    for through in (comm.comm, comm):
        caught(comm, "on_epoch", lambda: fit_failing_on_rank_1(comm, through))
    caught(comm, "exit", lambda: fit_failing_on_rank_1(comm, comm, stop=sys.exit),
           (RuntimeError, SystemExit))


def scenario_fit_raise_handled(comm):
    """Inside the caller's guard, with the caller's own handling (as the CLI's one-line
    errors): fit's guard leaves the error to it."""
    try:
        fit_failing_on_rank_1(comm, comm)
    except RuntimeError as e:
        print(f"rank {comm.rank} handles it: {e}", file=sys.stderr, flush=True)
        comm.abort(5)


def scenario_fit_checks(comm):
    """fit's argument checks fail alike on every rank (the same program): raised on every
    rank, where the caller catches it; on one rank alone: there, and a RuntimeError
    naming it on the others. No rank waits, nothing aborts."""
    X, y = data((5,), 3)
    caught(comm, "everywhere", lambda: dense_net().fit(X, y, epochs=0, verbose=False,
                                                       comm=comm))
    caught(comm, "alone", lambda: dense_net().fit(
        X, y, epochs=1, batch_size=0 if comm.rank == 1 else BATCH, verbose=False, comm=comm))


def scenario_dp_differs(comm):
    """Ranks whose DP differs -- a drawn seed against a given one, or against no DP --
    are refused on every rank by fit's comparison, which names it (they waited for each
    other in different collectives before it)."""
    from gpu_mlp.privacy import DP

    X, y = data((5,), 3)
    for what, other in (("given seed", DP(1.0, 1.0, seed=5)), ("no DP", None)):
        dp = DP(1.0, 1.0) if comm.rank == 1 else other
        caught(comm, what, lambda: dense_net().fit(X, y, epochs=1, batch_size=BATCH, lr=0.1,
                                                    dp=dp, verbose=False, comm=comm),
               ValueError)


def scenario_drift(comm):
    """Ranks whose parameters drift apart (gathered factors, each rank's own BLAS: another
    CPU model rounds otherwise; here rank 1's W_1 is nudged by hand after epoch 1) are
    stopped after the next epoch, on every rank, before they could decide apart."""
    X, y = data((5,), 3)

    def nudge(net, history):
        if comm.rank == 1 and history.epochs == 1:
            net.params[0][0][0, 0] += 1e-12

    caught(comm, "drift", lambda: dense_net().fit(X, y, epochs=3, batch_size=BATCH, lr=0.1,
                                                  verbose=False, comm=comm, on_epoch=nudge),
           RuntimeError)
    comm.path = "allreduce"  # (no BLAS to blame: the message says so)
    caught(comm, "changed", lambda: dense_net().fit(X, y, epochs=3, batch_size=BATCH,
                                                    lr=0.1, verbose=False, comm=comm,
                                                    on_epoch=nudge), RuntimeError)
    comm.path = "auto"
    history = dense_net().fit(X, y, epochs=2, batch_size=BATCH, lr=0.1, verbose=False,
                              comm=comm)
    if len(set(comm.allgather(tuple(history.seconds)))) != 1:
        raise AssertionError(f"rank {comm.rank}: the ranks' Histories differ in seconds")


def scenario_train_step_raise(comm):
    """train_step(comm=) in a loop of the caller's own (no guard, no fit): a batch every
    rank gets wrong is raised on every rank; a bad batch on rank 1 alone there, and a
    RuntimeError naming it on rank 0 (which waited in the step's collective forever);
    an error inside the step on one rank alone (its guard) ends the job."""
    X, y = data((5,), 3)
    X, y = X[:BATCH], y[:BATCH].copy()
    net = dense_net()
    caught(comm, "everywhere", lambda: net.train_step(X[:, :4], y, 0.1, comm=comm.comm),
           ValueError)
    bad = y.copy()
    if comm.rank == 1:
        bad[0] = 7  # out of range: 3 classes
    caught(comm, "alone", lambda: net.train_step(X, bad, 0.1, comm=comm.comm))
    lr = -0.1 if comm.rank == 1 else 0.1  # refused before the step's plan is made
    caught(comm, "lr", lambda: net.train_step(X, y, lr, comm=comm.comm))
    net.train_step(X, y, 0.1, comm=comm.comm)  # the ranks go on together
    if comm.rank == 1:  # past the checks: inside the step, on rank 1 alone
        net.step_graphs.step = lambda *args, **kwargs: 1 / 0
    net.train_step(X, y, 0.1, comm=comm.comm)


def scenario_loss(comm):
    """train_step(comm=) -- given mpi4py's own communicator -- returns the global batch's
    loss, and fit's TrainingWarning, from the root rank, quotes the global first step's:
    as one process."""
    X, y = data((5,), 3)
    counts, starts = shares(BATCH, comm.size)
    mine = slice(starts[comm.rank], starts[comm.rank + 1])
    alone = float(dense_net().train_step(X[:BATCH], y[:BATCH], 0.1))
    together = float(dense_net().train_step(X[mine], y[mine], 0.1, comm=comm.comm))
    if not abs(together - alone) <= 1e-12 * abs(alone):
        raise AssertionError(f"rank {comm.rank}: train_step returned {together}, the global "
                             f"batch's loss is {alone}")

    def warned(comm):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            dense_net().fit(X, y, epochs=3, batch_size=BATCH, lr=1e4, verbose=False,
                            comm=comm)
        return [str(w.message) for w in caught if w.category is TrainingWarning]

    alone, together = warned(None), warned(comm)  # from the root alone: one copy a job
    if not alone or together != (alone if comm.is_root else []):
        raise AssertionError(f"rank {comm.rank}: warned {together}, one process {alone}")
    if comm.is_root:
        print(f"OK loss {alone[0]}", flush=True)


UNGUARDED = ("fit_raise", "fit_checks", "dp_differs", "train_step_raise", "drift")  # on their own


def main():
    scenario = sys.argv[1]
    comm = Communicator()
    with contextlib.nullcontext() if scenario in UNGUARDED else comm.guard():
        start = time.perf_counter()
        globals()[f"scenario_{scenario}"](comm)
        if comm.is_root:
            print(f"DONE {scenario} on {comm.size} ranks in {time.perf_counter() - start:.1f} s",
                  flush=True)


if __name__ == "__main__":
    main()
