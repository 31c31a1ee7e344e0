"""Data-parallel training (gpu_mlp.distributed): the same training as one process.

The cost model and the path choice are plain functions, tested here without MPI. A
Communicator over one process (``MPI.COMM_SELF``) must give exactly the plain step.
The real thing runs ``tests/mpi_worker.py`` under ``mpirun -n 2`` and ``-n 3`` (an
uneven split, with a rank holding no rows of the last batch): a few epochs through the
allreduce, factor all-gather and auto paths, plain SGD, SGD with weight decay, Adam
and DP, give the single-process parameters to 1e-12, bit-identical on every rank, and
the bytes of the cost model; faults end the job instead of hanging it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

import gpu_mlp
from gpu_mlp import distributed, optim
from gpu_mlp.layers import Conv2d, Dense

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "mpi_worker.py")
TIMEOUT = 120  # seconds for one mpirun; a hang fails the test instead of the suite


# --- the cost model, no MPI ---------------------------------------------------------

def test_auto_gathers_below_the_formula_and_allreduces_above():
    # N (d_out + K) < 2 d_out (K + 1): for 1024 x 1024, gather iff N < 1025
    layer = Dense(1024, 1024)
    assert distributed.choose_path(layer, [512, 512]) == "gather"
    assert distributed.choose_path(layer, [1024, 0]) == "gather"  # only N counts
    assert distributed.choose_path(layer, [513, 512]) == "allreduce"  # N = 1025: a tie
    assert distributed.choose_path(layer, [513, 513]) == "allreduce"
    # wide and short: 2 * 10 * 4097 / 4106 = 19.96, so N = 19 gathers and 20 does not
    assert distributed.choose_path(Dense(4096, 10), [10, 9]) == "gather"
    assert distributed.choose_path(Dense(4096, 10), [10, 10]) == "allreduce"
    # NCCL pads every rank's block to the largest: N is P max(counts)
    assert distributed.choose_path(layer, [600, 424]) == "gather"
    assert distributed.choose_path(layer, [600, 424], padded=True) == "allreduce"


def test_the_choice_agrees_with_the_values_sent_on_a_grid():
    for d_in in (1, 7, 64, 300):
        for d_out in (1, 5, 64, 1000):
            for counts in ([1, 1], [3, 0, 2], [64] * 4, [500, 499], [1] * 16):
                values = distributed.path_values(d_out, d_in, counts)
                N = sum(counts)
                assert values["gather"] == pytest.approx(
                    (len(counts) - 1) * N * (d_in + d_out) / len(counts))
                assert values["allreduce"] == pytest.approx(
                    2 * (len(counts) - 1) * d_out * (d_in + 1) / len(counts))
                want = "gather" if N * (d_in + d_out) < 2 * d_out * (d_in + 1) else "allreduce"
                assert distributed.choose_path(Dense(d_in, d_out), counts) == want


def test_forced_paths_one_rank_and_convolutions():
    layer, conv = Dense(8, 8), Conv2d(3, 4, 3)
    assert distributed.choose_path(layer, [1000, 1000], "gather") == "gather"
    assert distributed.choose_path(layer, [1, 1], "allreduce") == "allreduce"
    assert distributed.choose_path(layer, [1000]) == "gather"  # one rank: nothing to send
    for path in distributed.PATHS:  # im2col rows are larger than the gradient: never sent
        assert distributed.choose_path(conv, [1, 1], path) == "allreduce"
        assert distributed.choose_path(conv, [1], path) == "allreduce"
    with pytest.raises(ValueError, match="unknown path 'ring'"):
        distributed.choose_path(layer, [1, 1], "ring")


def test_bytes_per_rank():
    # a layer (d_out, K) = (3, 5) in float64, ranks holding 4, 3 and 0 rows
    counts = [4, 3, 0]
    assert distributed.bytes_sent("allreduce", 3, 5, counts, 0, 8) == 2 * 2 * 18 * 8 // 3
    assert distributed.bytes_sent("gather", 3, 5, counts, 0, 8) == 2 * 4 * 8 * 8
    assert distributed.bytes_sent("gather", 3, 5, counts, 1, 8) == 2 * 3 * 8 * 8
    assert distributed.bytes_sent("gather", 3, 5, counts, 2, 8) == 0
    assert distributed.bytes_sent("gather", 3, 5, counts, 2, 4, padded=True) == 2 * 4 * 8 * 4
    assert distributed.bytes_sent("allreduce", 3, 5, [7], 0, 8) == 0


# --- one process: the plain step ----------------------------------------------------

def _mpi():
    pytest.importorskip("mpi4py", reason='needs mpi4py: pip install "gpu_mlp[mpi]"')
    from mpi4py import MPI

    return MPI


def _nets(device="cpu", dtype="float64"):
    return {
        "dense": (lambda: gpu_mlp.Network(
            [Dense(6, 9, "tanh"), Dense(9, 4, "identity")], loss="softmax_cross_entropy",
            device=device, dtype=dtype, seed=2), (6,), 4),
        "conv": (lambda: gpu_mlp.Network(
            [Conv2d(2, 3, 3, padding=1), Dense(3 * 4 * 4, 4, "identity")],
            loss="softmax_cross_entropy", device=device, dtype=dtype, seed=2), (2, 4, 4), 4),
    }


@pytest.mark.parametrize("path", distributed.PATHS)
@pytest.mark.parametrize("rule", ["sgd", "adam"])
@pytest.mark.parametrize("kind", ["dense", "conv"])
def test_one_rank_is_the_plain_step(kind, rule, path):
    MPI = _mpi()
    make, shape, classes = _nets()[kind]
    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((7, *shape)), rng.integers(0, classes, 7)
    plain, ranked = make(), make()
    rules = [optim.Adam(0.01) if rule == "adam" else 0.1 for _ in range(2)]
    comm = distributed.Communicator(MPI.COMM_SELF, path=path)
    for _ in range(3):
        J = plain.train_step(X, y, rules[0])
        J_ranked = ranked.train_step(X, y, rules[1], comm=comm)
        assert float(J_ranked) == pytest.approx(float(J), rel=1e-14)
    for (W, b), (W_r, b_r) in zip(plain.params, ranked.params):
        np.testing.assert_allclose(W_r, W, rtol=0, atol=1e-15)
        np.testing.assert_allclose(b_r, b, rtol=0, atol=1e-15)
    if path == "auto" or (path == "gather" and kind == "dense"):  # the same GEMMs
        assert all(np.array_equal(a, c) for p, q in zip(plain.params, ranked.params)
                   for a, c in zip(p, q))
    assert comm.bytes_sent == 0  # nobody to send to


def test_one_rank_steady_state_and_small_collectives():
    MPI = _mpi()
    comm = distributed.Communicator(MPI.COMM_SELF, path="allreduce")
    assert (comm.rank, comm.size, comm.local_rank, comm.is_root) == (0, 1, 0, True)
    assert comm.row_counts(5) == [5]
    np.testing.assert_array_equal(comm.sum([1.5, 2.0]), [1.5, 2.0])
    assert comm.bcast({"a": 1}) == {"a": 1}
    comm.barrier()
    comm.check_same("fit", {"seed": 0, "sizes": [1, 2]})
    make, shape, classes = _nets()["dense"]
    net = make()
    rng = np.random.default_rng(1)
    X, y = rng.standard_normal((8, *shape)), rng.integers(0, classes, 8)
    for rows in (8, 3, 8):  # the largest batch first: then nothing more is allocated
        net.train_step(X[:rows], y[:rows], 0.1, comm=comm)
    pool = comm._pool(net)
    allocations = pool.allocations
    for rows in (8, 5, 1, 8):
        net.train_step(X[:rows], y[:rows], 0.1, comm=comm)
    assert pool.allocations == allocations
    assert pool.in_use_bytes == 0  # every buffer given back by finish()


def test_train_step_takes_mpi4pys_communicator_as_fit_does():
    """Wrapped once per net and communicator, so its buffers last from step to step."""
    MPI = _mpi()
    make, shape, classes = _nets()["dense"]
    rng = np.random.default_rng(2)
    X, y = rng.standard_normal((8, *shape)), rng.integers(0, classes, 8)
    plain, ranked = make(), make()
    for _ in range(3):
        J = plain.train_step(X, y, 0.1)
        assert float(ranked.train_step(X, y, 0.1, comm=MPI.COMM_SELF)) == float(J)
    assert distributed.communicator(MPI.COMM_SELF, ranked) is \
        distributed.communicator(MPI.COMM_SELF, ranked)
    for (W, b), (W_r, b_r) in zip(plain.params, ranked.params):
        assert np.array_equal(W_r, W) and np.array_equal(b_r, b)
    with pytest.raises(TypeError, match="or an mpi4py communicator, got 'world'"):
        ranked.train_step(X, y, 0.1, comm="world")


def test_one_rank_guard_raises_and_bad_path():
    MPI = _mpi()
    comm = distributed.Communicator(MPI.COMM_SELF)
    with pytest.raises(KeyError):  # nobody else to hang: the exception itself
        with comm.guard():
            raise KeyError("x")
    with pytest.raises(ValueError, match="unknown communication path 'ring'"):
        distributed.Communicator(MPI.COMM_SELF, path="ring")
    # set by hand (it may be changed between runs): refused then, not at a first step
    with pytest.raises(ValueError, match="unknown communication path 'ring'"):
        comm.path = "ring"
    assert comm.path == "auto"


def test_no_mpi4py_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "mpi4py", None)  # import mpi4py now fails
    with pytest.raises(ImportError, match=r'pip install "gpu_mlp\[mpi\]"'):
        distributed.Communicator()


@pytest.mark.gpu
@pytest.mark.parametrize("path", distributed.PATHS)
def test_one_rank_nccl_is_the_plain_step(path):
    """The NCCL path (made with one rank) against the plain step, on the GPU."""
    MPI = _mpi()
    comm = distributed.Communicator(MPI.COMM_SELF, path=path)
    make, shape, classes = _nets("cuda", "float64")["dense"]
    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((7, *shape)), rng.integers(0, classes, 7)
    plain, ranked = make(), make()
    for _ in range(3):
        plain.train_step(X, y, 0.1)
        ranked.train_step(X, y, 0.1, comm=comm)
    for p, q in zip(plain.params, ranked.params):
        for a, c in zip(p, q):
            np.testing.assert_allclose(c.get(), a.get(), rtol=0, atol=1e-14)
    if path != "auto":  # forced paths run NCCL with one rank; auto needs none
        assert comm._nccl is not None and comm._nccl.size() == 1
    comm.close()


@pytest.mark.parametrize("dp", [False, True])
def test_fit_on_one_rank_is_the_plain_fit(dp):
    """fit(comm=) on one rank, given a Communicator or mpi4py's own communicator, is the
    plain fit: same History, same parameters."""
    MPI = _mpi()
    make, shape, classes = _nets()["dense"]
    rng = np.random.default_rng(3)
    X, y = rng.standard_normal((37, *shape)), rng.integers(0, classes, 37)
    privacy = pytest.importorskip("gpu_mlp.privacy") if dp else None
    runs = []
    for comm in (None, MPI.COMM_SELF, distributed.Communicator(MPI.COMM_SELF, "gather")):
        net = make()
        history = net.fit(X, y, epochs=3, batch_size=8, lr=0.1, verbose=False, comm=comm,
                          dp=privacy.DP(1.0, 0.5, seed=4) if dp else None)
        runs.append((history, net.params))
    (plain, want), others = runs[0], runs[1:]
    for history, params in others:
        assert history.train_loss == pytest.approx(plain.train_loss, rel=1e-12)
        assert history.epsilon == plain.epsilon
        for (W, b), (W0, b0) in zip(params, want):
            np.testing.assert_allclose(W, W0, rtol=0, atol=1e-12)
            np.testing.assert_allclose(b, b0, rtol=0, atol=1e-12)


def test_fit_refuses_what_is_not_a_communicator():
    make, shape, classes = _nets()["dense"]
    with pytest.raises(TypeError, match="mpi4py communicator"):
        make().fit(np.zeros((4, *shape)), np.zeros(4, int), comm="world", verbose=False)


# --- mpirun -n P ----------------------------------------------------------------------

def _mpirun():
    """The mpirun command prefix, or a skip saying what is missing."""
    _mpi()
    launcher = os.path.join(os.path.dirname(sys.executable), "mpirun")
    if not os.path.exists(launcher):
        launcher = shutil.which("mpirun")
    if launcher is None:
        pytest.skip('needs mpirun: pip install "gpu_mlp[mpi]" (Open MPI\'s wheel) or a '
                    'system MPI')
    version = subprocess.run([launcher, "--version"], capture_output=True, text=True).stdout
    if "Open MPI" in version or "OpenRTE" in version:  # 2 cores, as root in a container
        return [launcher, "--allow-run-as-root", "--oversubscribe"]
    return [launcher]


def _launch(P, scenario, timeout=TIMEOUT):
    env = dict(os.environ, OMPI_MCA_rmaps_base_oversubscribe="1", OMP_NUM_THREADS="1",
               OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    root = os.path.dirname(HERE)  # gpu_mlp importable without an install too
    env["PYTHONPATH"] = os.pathsep.join(p for p in (env.get("PYTHONPATH"), root) if p)
    command = _mpirun() + ["-n", str(P), sys.executable, WORKER, scenario]
    start = time.perf_counter()
    try:
        run = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                             env=env)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{' '.join(command)} hung for {timeout} s:\n{e.stdout}\n{e.stderr}")
    return run, time.perf_counter() - start


@pytest.mark.parametrize("P", [2, 3])
def test_mpirun_trains_as_one_process(P):
    run, _ = _launch(P, "train")
    assert run.returncode == 0, run.stdout + run.stderr
    passed = [line for line in run.stdout.splitlines() if line.startswith("OK ")]
    # dense: SGD, SGD with decay, Adam, DP; conv: SGD, Adam -- each by 3 paths
    assert len(passed) == 18, run.stdout
    assert f"DONE train on {P} ranks" in run.stdout


@pytest.mark.parametrize("scenario, message", [
    ("raise", "rank 1: ValueError: rank 1 fails on purpose"),  # guard() aborts the job
    ("die", "rank 1 dies now"),  # the launcher sees the process end and ends the job
    ("interrupt", "rank 1: interrupted"),  # one line, no traceback
])
def test_mpirun_a_rank_that_fails_ends_the_job(scenario, message):
    run, seconds = _launch(2, scenario)
    assert run.returncode != 0
    assert message in run.stderr
    if scenario == "interrupt":
        assert "Traceback" not in run.stderr, run.stderr
    assert "DONE" not in run.stdout
    assert seconds < 60


def test_mpirun_mismatched_configurations_fail_on_every_rank():
    run, _ = _launch(3, "mismatch")
    assert run.returncode == 0, run.stdout + run.stderr
    caught = sorted(line for line in run.stdout.splitlines() if " caught: " in line)
    assert [line.split()[1] for line in caught] == ["0", "1", "2"]
    for line in caught:
        assert 'dtype: ranks 0,1 "float64", rank 2 "float32"' in line
        assert "seed: ranks 0,2 0, rank 1 1" in line


def test_mpirun_ranks_share_a_dp_seed_drawn_on_each():
    run, _ = _launch(2, "secret_seed")
    assert run.returncode == 0, run.stdout + run.stderr
    assert "OK secret seed fit" in run.stdout and "OK secret seed train_step" in run.stdout


def test_mpirun_fit_refuses_ranks_that_differ_where_they_must_not():
    """The ranks' data are compared by a digest of their bytes, not by a sum: rows in
    another order (same sum) are refused on every rank before the first step; so are a
    communication path, an optimizer state and validation data that differ."""
    run, _ = _launch(2, "fit_mistakes")
    assert run.returncode == 0, run.stdout + run.stderr
    for what in ("data", "comm_path", "optimizer_state", "validation"):
        caught = sorted(line for line in run.stdout.splitlines()
                        if f" caught {what}: " in line)
        assert [line.split()[1] for line in caught] == ["0", "1"], run.stdout
        assert all(f"they differ in {what}:" in line for line in caught), caught


def test_mpirun_losses_are_the_global_batchs():
    """train_step(comm=mpi4py's communicator) returns the global batch's loss, and fit's
    TrainingWarning quotes the global first step's, as one process does, from the root
    rank alone (the others' copies would repeat it on the job's stderr)."""
    run, _ = _launch(2, "loss")
    assert run.returncode == 0, run.stdout + run.stderr
    assert "OK loss the training loss rose from" in run.stdout


def test_mpirun_an_on_epoch_that_raises_on_one_rank_is_raised_on_every_rank():
    """fit is a collective: an on_epoch that raised on one rank left the others waiting
    in the next epoch (guard() ended the job; a sys.exit() there, which guard() lets
    through, hung it). Now every rank raises -- its own exception, or a RuntimeError
    naming it -- where the caller can catch it, and the job goes on."""
    run, seconds = _launch(2, "fit_raise", timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
    lines = run.stdout.splitlines()
    for what, times in (("on_epoch", 2), ("exit", 1)):
        got = sorted(line for line in lines if f" caught {what}: " in line)
        assert [line.split()[1] for line in got] == ["0"] * times + ["1"] * times, run.stdout
    assert lines.count("rank 1 caught on_epoch: RuntimeError: rank 1 fails inside fit") == 2
    assert lines.count("rank 0 caught on_epoch: RuntimeError: on_epoch raised on rank 1 "
                       "(RuntimeError: rank 1 fails inside fit), so every rank stops "
                       "here") == 2
    assert "rank 0 caught exit: SystemExit: " in lines  # (its message: the code, None)
    assert ("rank 1 caught exit: RuntimeError: on_epoch raised on rank 0 (SystemExit), so "
            "every rank stops here") in lines
    assert seconds < 30
    # inside a guard() of the caller's, the caller's own handling has the say (the CLI's)
    run, seconds = _launch(2, "fit_raise_handled", timeout=60)
    assert run.returncode == 5, run.stdout + run.stderr
    assert "handles it: " in run.stderr and "rank 1 fails inside fit" in run.stderr
    assert "Traceback" not in run.stderr and seconds < 30


def test_mpirun_fits_bad_arguments_are_raised_on_every_rank():
    """fit's checks ran inside its guard(), so a mistake every rank made alike (the same
    program: epochs=0) aborted the job rather than raise where the caller catches it."""
    run, _ = _launch(2, "fit_checks", timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
    lines = run.stdout.splitlines()
    for r in (0, 1):
        assert f"rank {r} caught everywhere: ValueError: epochs must be" in run.stdout
    assert any(line.startswith("rank 1 caught alone: ValueError: batch_size must be")
               for line in lines), run.stdout
    assert any(line.startswith("rank 0 caught alone: RuntimeError: fit's checks raised on "
                               "rank 1 (ValueError: batch_size must be") for line in lines)


def test_mpirun_ranks_whose_dp_differs_are_told_so_not_left_waiting():
    """fit agreed on drawn DP seeds (a broadcast) only on the ranks that drew one, before
    it compared the ranks' settings: a rank with a given seed, or no DP, was in another
    collective, and the job hung."""
    run, seconds = _launch(2, "dp_differs", timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
    for what in ("given seed", "no DP"):
        got = [line for line in run.stdout.splitlines() if f" caught {what}: " in line]
        assert len(got) == 2 and all("they differ in dp" in line for line in got), got
    assert seconds < 30


def test_mpirun_ranks_whose_parameters_drift_apart_are_stopped_on_every_rank():
    """On the gather path each rank forms the update with its own BLAS: ranks on other
    CPU models drifted apart silently (1e-7 after 30 epochs of the main job), and would
    decide apart (a divergence on one alone). fit compares them after every epoch; the
    History's seconds are rank 0's on every rank."""
    run, seconds = _launch(2, "drift", timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
    got = [line for line in run.stdout.splitlines() if " caught drift: " in line]
    assert len(got) == 2 and all("after epoch 2 the 2 ranks' parameters differ: where a "
                                 "layer's factors are gathered" in line for line in got)
    got = [line for line in run.stdout.splitlines() if " caught changed: " in line]
    assert len(got) == 2 and all("differ: something changed them on some rank alone"
                                 in line for line in got), run.stdout  # (allreduce)
    assert seconds < 30


def test_mpirun_train_step_raises_a_bad_batch_on_every_rank_and_a_fault_ends_the_job():
    """train_step(comm=) in a loop of the caller's: the rank whose labels were out of
    range raised, and the other waited in the step's collective forever. Now a batch that
    fails its checks, on any rank, is raised on every rank (told in the step's first
    collective, the row counts); a fault inside the step on one rank ends the job."""
    run, seconds = _launch(2, "train_step_raise", timeout=60)
    assert run.returncode != 0
    lines = run.stdout.splitlines()
    for r in (0, 1):
        assert any(line.startswith(f"rank {r} caught everywhere: ValueError: X must have")
                   for line in lines), run.stdout
    assert any(line.startswith("rank 1 caught alone: ValueError: softmax_cross_entropy: "
                               "labels must lie in [0, 3)") for line in lines), run.stdout
    assert ("rank 0 caught alone: RuntimeError: the step's checks raised on rank 1 "
            "(ValueError: softmax_cross_entropy: labels must lie in [0, 3), got values in "
            "[0, 7]), so every rank stops here") in lines
    assert any(line.startswith("rank 1 caught lr: ValueError: lr must be") for line in lines)
    assert any(line.startswith("rank 0 caught lr: RuntimeError: the step's checks raised on "
                               "rank 1 (ValueError: lr must be") for line in lines), run.stdout
    assert "rank 1: ZeroDivisionError: division by zero" in run.stderr
    assert seconds < 30


# --- the command line under mpirun: fit(comm=...) ---------------------------------------

def _cli_env():
    env = dict(os.environ, OMPI_MCA_rmaps_base_oversubscribe="1", OMP_NUM_THREADS="1",
               OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (env.get("PYTHONPATH"), os.path.dirname(HERE))
                                        if p)
    for name in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SLURM_STEP_NUM_TASKS"):
        env.pop(name, None)  # the single-process run must not think it is a rank
    return env


def _cli(command, launcher=(), cwd=None):
    full = list(launcher) + [sys.executable, "-m", "gpu_mlp", "train", *command]
    try:
        return subprocess.run(full, capture_output=True, text=True, timeout=TIMEOUT,
                              env=_cli_env(), cwd=cwd)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{' '.join(full)} hung for {TIMEOUT} s:\n{e.stdout}\n{e.stderr}")


def _params(path):
    with np.load(path) as data:
        return {key: data[key] for key in data.files if key != "meta"}


@pytest.mark.parametrize("P, extra", [(2, []), (3, ["--dp-clip", "1", "--dp-noise", "1",
                                                  "--dp-seed", "5"])])
def test_mpirun_cli_trains_as_one_process(tmp_path, P, extra):
    """`mpirun -n P gpu-mlp train` is `gpu-mlp train`: same output, same parameters
    (float64, to 1e-12), and only rank 0 prints and writes the checkpoint."""
    command = ["--dtype", "float64", "--epochs", "4", "--quiet", *extra]
    one = _cli([*command, "--save", str(tmp_path / "one.npz")])
    assert one.returncode == 0, one.stderr
    many = _cli([*command, "--save", str(tmp_path / "many.npz")],
                launcher=_mpirun() + ["-n", str(P)])
    assert many.returncode == 0, many.stdout + many.stderr
    assert many.stdout == one.stdout  # rank 0 alone prints: each line once
    assert "test accuracy" in many.stdout and many.stderr == ""
    a, b = _params(tmp_path / "one.npz"), _params(tmp_path / "many.npz")
    assert sorted(a) == sorted(b)
    for key in a:
        np.testing.assert_allclose(b[key], a[key], rtol=0, atol=1e-12, err_msg=key)


def test_mpirun_cli_ranks_share_one_secret_dp_seed(tmp_path):
    """Without --dp-seed the noise's seed is drawn from the operating system: by rank 0,
    for every rank (each drawing its own, fit refused the ranks as configured apart)."""
    path = tmp_path / "run.npz"
    command = ["--epochs", "1", "--quiet", "--dp-clip", "1", "--dp-noise", "1", "--save",
               str(path)]
    run = _cli(command, launcher=_mpirun() + ["-n", "2"])
    assert run.returncode == 0, run.stdout + run.stderr
    seed = gpu_mlp.checkpoint.read(path).dp.seed
    again = _cli([*command, "--overwrite"], launcher=_mpirun() + ["-n", "2"])
    assert again.returncode == 0 and gpu_mlp.checkpoint.read(path).dp.seed != seed


def test_mpirun_cli_resumes_a_data_parallel_run(tmp_path):
    command = ["--dtype", "float64", "--quiet", "--optimizer", "adam"]
    straight = _cli([*command, "--epochs", "4", "--save", str(tmp_path / "straight.npz")])
    assert straight.returncode == 0, straight.stderr
    mpirun = _mpirun() + ["-n", "2"]
    path = str(tmp_path / "run.npz")
    first = _cli([*command, "--epochs", "2", "--save", path], launcher=mpirun)
    assert first.returncode == 0, first.stdout + first.stderr
    resumed = _cli([*command, "--epochs", "4", "--save", path, "--resume", path],
                   launcher=mpirun)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert resumed.stdout.splitlines()[-1] == straight.stdout.splitlines()[-1]
    a, b = _params(tmp_path / "straight.npz"), _params(path)
    for key in a:
        np.testing.assert_allclose(b[key], a[key], rtol=0, atol=1e-12, err_msg=key)


@pytest.mark.parametrize("bad", ["every rank", "rank 0's --save"])
def test_mpirun_cli_bad_input_ends_the_run_with_one_line(tmp_path, bad):
    """A bad option every rank meets alike, or the existing --save that rank 0 alone
    checks: the ranks settle the run's setup before training, so rank 0 alone says why,
    status 2, no MPI_Abort (each rank aborted the job with its own line before)."""
    taken = tmp_path / "taken.npz"
    taken.write_bytes(b"")
    argv = (["--activation", "swish"] if bad == "every rank" else ["--save", str(taken)])
    run = _cli(["--epochs", "2", *argv], launcher=_mpirun() + ["-n", "2"])
    assert run.returncode == 2
    said = [line for line in run.stderr.splitlines() if line.startswith("gpu-mlp:")]
    want = "unknown activation 'swish'" if bad == "every rank" else "the file exists"
    assert len(said) == 1 and want in said[0] and "rank " not in said[0], run.stderr
    assert "Traceback" not in run.stderr and "MPI_ABORT" not in run.stderr


def test_mpirun_cli_an_error_every_rank_raises_is_said_once():
    """A divergence reaches every rank alike (the epoch loss is global): each rank ends
    itself with status 2 and rank 0 alone says why. Each aborting printed its own line,
    and a rank the launcher's SIGTERM reached first said "interrupted" instead."""
    run = _cli(["--data", "regression", "--activation", "relu", "--epochs", "3", "--lr", "5",
                "--quiet"], launcher=_mpirun() + ["-n", "3"])
    assert run.returncode == 2, run.stdout + run.stderr
    said = [line for line in run.stderr.splitlines() if line.startswith("gpu-mlp:")]
    assert len(said) == 1 and said[0].startswith("gpu-mlp: error: training diverged"), said
    assert "Traceback" not in run.stderr and "interrupted" not in run.stderr


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_mpirun_cli_stopped_by_a_signal_ends_without_a_traceback(tmp_path, sig):
    # mpirun hands the signal on to the ranks as SIGTERM; the first rank to stop aborts
    # the job, and the launcher's SIGTERM reaches the other one anywhere (in the data
    # loading of the bad-input job above too): no rank prints a traceback, the last
    # checkpoint is whole and free to take
    import signal

    path = tmp_path / "run.npz"
    command = [sys.executable, "-m", "gpu_mlp", "train", "--epochs", "100000", "--quiet",
               "--save", str(path)]
    job = subprocess.Popen(_mpirun() + ["-n", "2"] + command, env=_cli_env(),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + TIMEOUT
    while not path.exists():
        assert job.poll() is None, job.communicate()
        assert time.monotonic() < deadline, f"no checkpoint after {TIMEOUT} s"
        time.sleep(0.05)
    job.send_signal(getattr(signal, sig))
    _, err = job.communicate(timeout=TIMEOUT)
    assert job.returncode != 0
    assert "Traceback" not in err, err
    # a rank killed by the abort may leave its lock file, which blocks nothing once that
    # process is gone (mpirun may return while it is still being reaped), and, killed
    # mid-save, its temporary (.run.npz.PID.RANDOM.tmp), which the next save removes
    left = set(os.listdir(tmp_path)) - {"run.npz", ".run.npz.lock"}
    assert all(re.fullmatch(r"\.run\.npz\.\d+\.[0-9a-f]+\.tmp", f) for f in left), left
    deadline = time.monotonic() + TIMEOUT
    while True:
        try:
            with gpu_mlp.checkpoint.hold(str(path)):
                saved = gpu_mlp.checkpoint.read(str(path))
                assert saved.history.epochs >= 1
                gpu_mlp.checkpoint.save(saved.net, str(path), history=saved.history)
            break
        except gpu_mlp.checkpoint.CheckpointInUse:
            assert time.monotonic() < deadline, f"the lock outlived the job by {TIMEOUT} s"
            time.sleep(0.05)
    assert os.listdir(tmp_path) == ["run.npz"]


def test_comm_path_needs_a_launcher():
    run = _cli(["--epochs", "1", "--comm-path", "gather"])
    assert run.returncode == 2 and "--comm-path applies to data-parallel runs" in run.stderr
