"""CUDA stream capture on the host (tests/capture.py): the stand-in's own rules, then what
the engine's steady-state step does under them today.

The stand-in runs on the counting device of tests/device_counts.py with host_cupy's build,
so its kernels and GEMMs compute: a replay can be compared with eager steps bit for bit.
"""

from __future__ import annotations

import contextlib
import sys
import warnings

import numpy as np
import pytest

import gpu_mlp
from gpu_mlp import graph as graph_module
from gpu_mlp import ops, optim
from gpu_mlp.layers import Conv2d, Dense
from gpu_mlp.plan import StepPlan, StepScalars
from gpu_mlp.privacy import DP

from capture import (CUBLAS_REFUSES, D2H_REFUSED, INVALIDATED_STATUS, SYNC_STATUS,
                     Capture, CaptureBroken, CUDARuntimeError, capturable_blas, synchronize)
from device_counts import CountingXp, DeviceArray, counting_device
from test_memory import COUNTED_NETS, counted_net


@pytest.fixture
def device(host_cupy_lib):
    """The counting device, computing, with a small net on it; yields (counts, lib)."""
    net = gpu_mlp.Network([Dense(4, 3, "identity")], loss="squared", device="cpu", seed=0)
    with counting_device(net, host_cupy_lib) as counts:
        yield counts, host_cupy_lib


def _arrays(*values):
    return [np.array(v, dtype=np.float32).view(DeviceArray) for v in values]


def _equal(device_array, expected):
    """Bit for bit, read on the host (outside a capture, so no rule is broken)."""
    np.testing.assert_array_equal(device_array.view(np.ndarray), np.asarray(expected))


# --- the stand-in's rules -----------------------------------------------------------------

def test_a_capture_runs_nothing_and_each_replay_runs_every_launch(device):
    w, g, lr, decay = _arrays([1.0, 2.0, 3.0], [1.0, 1.0, 1.0], 0.5, 1.0)
    with Capture() as capture:
        ops.sgd(w, g, lr, decay)
        np.multiply(w, np.float32(2), out=w)
    assert capture.graph.names == ["sgd", "multiply.__call__"]
    _equal(w, [1.0, 2.0, 3.0])  # captured, not run
    capture.graph.launch()
    _equal(w, [1.0, 3.0, 5.0])
    capture.graph.launch()
    _equal(w, [1.0, 5.0, 9.0])


def test_a_replay_reads_the_arrays_as_they_are_but_the_scalars_as_captured(device):
    """A scalar passed by value is frozen into the graph: a factor changed after the
    capture is not seen by the replay; new contents of an array are -- a learning rate
    the kernel reads by pointer among them."""
    w, g, lr, decay = _arrays([0.0, 0.0], [1.0, 2.0], 0.5, 1.0)
    factor = 2.0
    with Capture() as capture:
        ops.sgd(w, g, lr, decay)
        np.multiply(w, np.float32(factor), out=w)
    assert capture.graph.record[1].scalars == (np.float32(2.0),)
    factor = 3.0  # noqa: F841 -- the graph cannot know
    g[...] = np.float32(4.0)
    lr[...] = np.float32(0.25)
    capture.graph.launch()
    _equal(w, [-2.0, -2.0])  # 2 (0 - 0.25 * 4): the new g and lr, the old factor


@pytest.mark.parametrize("call", ["number", "device"])
def test_a_number_given_to_a_kernel_that_reads_by_pointer_allocates(device, call):
    """ops' kernels read their step scalars by pointer: a number becomes a device array,
    an allocation, which capture refuses; the engine passes device arrays."""
    w, g, lr, decay = _arrays([0.0], [1.0], 0.5, 1.0)
    with Capture() as capture:
        if call == "number":
            with pytest.raises(CaptureBroken, match="allocation during capture"):
                ops.sgd(w, g, 0.5, 1.0)
        else:
            ops.sgd(w, g, lr, decay)
    assert capture.graph.names == ([] if call == "number" else ["sgd"])


def test_a_capturable_gemm_freezes_alpha_and_beta_and_rereads_its_operands(device):
    counts, lib = device
    a, b, out = _arrays([[1.0, 0.0], [0.0, 1.0]], [[1.0, 2.0], [3.0, 4.0]], np.zeros((2, 2)))
    with capturable_blas(lib) as blas:
        alpha = 2.0
        with Capture() as capture:
            ops.gemm("N", "N", a, b, out, alpha=alpha, beta=0.0)
        assert capture.graph.names == ["gemm"] and blas.calls == 1
        _equal(out, 0.0)
        alpha = 3.0  # noqa: F841
        b[...] = b * np.float32(10)
        capture.graph.launch()
    _equal(out, [[20.0, 40.0], [60.0, 80.0]])


@pytest.mark.parametrize("call", ["gemm", "gemv"])
def test_cupy_cublas_refuses_during_capture_as_cupy_does(device, call):
    a, x, out, y = _arrays(np.ones((2, 2)), np.ones(2), np.zeros((2, 2)), np.zeros(2))
    cupy = sys.modules["cupy"]  # CuPy's own wrappers, which gpu_mlp no longer calls
    with Capture() as capture:
        with pytest.raises(NotImplementedError, match=CUBLAS_REFUSES):
            if call == "gemm":
                cupy.cublas.gemm("N", "N", a, a, out)
            else:
                cupy.cublas.gemv("N", 1.0, a, x, 0.0, y)
    assert capture.graph.names == []  # refused before CUDA: the capture is still valid


@pytest.mark.parametrize("read", [float, bool, lambda a: a.item(), lambda a: a.get(),
                                  lambda a: a.tolist()])
def test_a_host_read_is_refused_during_capture(device, read):
    [a] = _arrays(1.0)
    with Capture():
        with pytest.raises(RuntimeError, match=D2H_REFUSED):
            read(a)


def test_a_synchronisation_is_refused_and_invalidates_the_capture(device):
    capture = Capture()
    capture.begin_capture()
    with pytest.raises(CUDARuntimeError, match=SYNC_STATUS):
        synchronize()
    with pytest.raises(CUDARuntimeError, match=INVALIDATED_STATUS):
        capture.end_capture()
    assert not capture.is_capturing()
    synchronize()  # outside a capture: fine


@pytest.mark.parametrize("allocate", [
    lambda xp, a: a + a, lambda xp, a: xp.empty(3, np.float32), lambda xp, a: a.copy(),
    lambda xp, a: a.sum(), lambda xp, a: xp.zeros_like(a)])
def test_an_allocation_during_capture_is_refused(device, allocate):
    """Relaxed capture would let the pool allocate; the graph would then keep an address
    the pool gives away when the array dies."""
    xp = CountingXp()
    [a] = _arrays([1.0, 2.0, 3.0])
    with Capture():
        with pytest.raises(CaptureBroken, match="allocation during capture"):
            allocate(xp, a)


def test_the_default_stream_is_not_captured_and_captures_do_not_nest(device):
    with pytest.raises(RuntimeError, match="default"):
        Capture(null=True).begin_capture()
    with Capture():
        with pytest.raises(CUDARuntimeError, match="cudaErrorIllegalState"):
            Capture().begin_capture()


def test_a_host_array_in_a_device_ufunc_is_refused_even_0_d(device):
    """CuPy's kernels take Python and NumPy scalars, never a NumPy array, even a 0-d one
    (cupy/_core/_scalar.pyx, CScalar: TypeError 'Unsupported type')."""
    [a] = _arrays([1.0, 2.0])
    np.add(a, np.float32(2.0), out=a)  # a NumPy scalar: fine
    for host in (np.array(2.0, np.float32), np.ones(2, np.float32)):
        with pytest.raises(TypeError, match="host array mixed with device arrays"):
            np.add(a, host, out=a)


def test_an_input_overlapping_the_output_is_copied_first_as_cupy_does(device):
    """cupy/_core/_kernel.pyx, _copy_in_args_if_needed: an input that is not the very
    output object but may share its memory is copied before the kernel -- an allocation,
    refused during a capture. The output itself as an input is not copied, nor does a
    setitem that CuPy makes a memcpy (same layout, C-contiguous, same dtype)."""
    counts, _ = device
    a, b = _arrays([1.0, 2.0, 3.0, 4.0], [1.0, 1.0, 1.0, 1.0])
    before = counts.allocations
    np.add(a, b, out=a)
    a[...] = a
    assert counts.allocations == before
    np.add(a[::-1], b, out=a)  # another view of a's memory
    assert counts.allocations == before + 1
    a[:2] = a[2:]  # disjoint: no copy
    a[1:] = a[:3]  # the same layout, C-contiguous: one memcpy, no kernel, no copy
    assert counts.allocations == before + 1
    a[1::2] = a[::2]  # strided, overlapping bounds: the copy kernel copies its input first
    assert counts.allocations == before + 2
    with Capture():
        with pytest.raises(CaptureBroken, match="allocation during capture"):
            np.multiply(a[::-1], 2.0, out=a)


def test_views_and_eager_work_are_untouched(device):
    counts, _ = device
    [a] = _arrays(np.arange(6.0).reshape(2, 3))
    with Capture() as capture:
        v = a.T.reshape(3, 2)[1:]  # views: no kernel, no allocation
    assert capture.graph.names == [] and v.shape == (2, 2)
    assert float(a.sum()) == 15.0 and counts.syncs == 1  # after the capture: eager again


# --- the engine, as it is today -----------------------------------------------------------

KINDS = ["dense", "conv"]


def _compare_replay_with_eager(kind, lib, make_rule, blas, dp=None, steps=3):
    """Eager steps on one net, replays of one captured step on its twin: equal?"""
    (eager, X, Y), (captured, _, _) = counted_net(kind, "output"), counted_net(kind, "output")
    losses = {}
    for name, net in (("eager", eager), ("captured", captured)):
        rule, private = make_rule(), (None if dp is None else DP(**dp))

        def step():
            return net.train_step(X, Y, rule, check=False, dp=private)
        with contextlib.ExitStack() as stack:
            stack.enter_context(counting_device(net, lib))
            if blas:  # alpha and beta as 0-d device arrays: read when the GEMM runs
                stack.enter_context(capturable_blas(lib))
            for _ in range(3):
                step()
            if name == "eager":
                for _ in range(steps):
                    J = step()
            else:
                with Capture() as capture:
                    J = step()
                for _ in range(steps):
                    capture.graph.launch()
            losses[name] = float(J)
    for (W, b), (W2, b2) in zip(eager.params, captured.params):
        _equal(W2, W.view(np.ndarray))
        _equal(b2, b.view(np.ndarray))
    assert losses["captured"] == losses["eager"]


@pytest.mark.parametrize("kind", KINDS)
def test_a_replayed_plain_sgd_step_equals_eager_steps_given_a_capturable_gemm(
        host_cupy_lib, kind):
    """With cupy.cublas swapped for a binding that captures (what ctypes' cuBLAS will
    be), a steady-state plain-SGD step at a constant rate captures -- no allocation, no
    host read -- and its replays are the eager steps, bit for bit."""
    _compare_replay_with_eager(kind, host_cupy_lib, lambda: 1e-3, blas=True)


@pytest.mark.parametrize("kind", KINDS)
def test_a_steady_state_step_captures_on_cupy(host_cupy_lib, kind):
    """ops.gemm and ops.gemv call cuBLAS through gpu_mlp.cublas, which captures (cupy.cublas
    refuses: above), with nothing swapped: the step replays as eager steps run."""
    _compare_replay_with_eager(kind, host_cupy_lib, lambda: 1e-3, blas=False)


FROZEN = {
    # what would be frozen into the graph if passed by value, and is read on the device
    # instead (gpu_mlp.plan.StepScalars): a schedule's rate -- plain SGD's GEMM alpha =
    # -lr, optim.SGD's kernel lr -- and Adam's step count and bias corrections
    "sgd-schedule": lambda: optim.SGD(1e-2, schedule=optim.Step(1, 0.5)),
    "momentum-schedule": lambda: optim.SGD(1e-2, momentum=0.9, schedule=optim.Step(1, 0.5)),
    "adam": lambda: optim.Adam(1e-2),
}


@pytest.mark.parametrize("rule", FROZEN)
def test_a_replay_sees_the_rate_and_step_count_of_its_step(host_cupy_lib, rule):
    _compare_replay_with_eager("dense", host_cupy_lib, FROZEN[rule], blas=True)


def test_a_replayed_private_step_draws_fresh_noise(host_cupy_lib):
    _compare_replay_with_eager("dense", host_cupy_lib, lambda: 1e-3, blas=True,
                               dp=dict(max_grad_norm=1.0, noise_multiplier=1.0, seed=0))


# --- train_step and fit capture their own steps (gpu_mlp/graph.py) -----------------------

SCHEDULED = {
    "sgd": lambda: 1e-3,
    "sgd-step": lambda: optim.SGD(1e-2, weight_decay=1e-2, schedule=optim.Step(2, 0.5)),
    "momentum-cosine": lambda: optim.SGD(1e-2, momentum=0.9, nesterov=True,
                                         schedule=optim.Cosine(5, warmup=2)),
    "adam-cosine": lambda: optim.Adam(1e-2, weight_decay=1e-2,
                                      schedule=optim.Cosine(6, warmup=2, min_lr=1e-4)),
    "adamw-uncorrected": lambda: optim.AdamW(1e-2, eps_placement="uncorrected",
                                             decay_bias=False),
}
PRIVATE = dict(max_grad_norm=1.0, noise_multiplier=1.0, seed=3)


def _net(kind, memory="output", dtype="float32"):
    make, shape = COUNTED_NETS[kind]
    net = gpu_mlp.Network(make(), loss="softmax_cross_entropy", memory=memory,
                          device="cpu", dtype=dtype, seed=0)
    rng = np.random.default_rng(0)
    X = rng.standard_normal(shape).astype(dtype).view(DeviceArray)
    Y = rng.integers(0, 5, shape[0]).view(DeviceArray)
    return net, X, Y


def _host(net):
    return [a.view(np.ndarray).copy() for pair in net.params for a in pair]


def _steps(lib, kind="dense", memory="output", dtype="float32", make_rule=lambda: 1e-3,
           dp=None, steps=6, capture=True, between=None):
    """``steps`` train_steps on a fresh net on the stand-in: ``(params, losses, rule, dp,
    net)``; ``capture=False``: every step eager (``Network._step(capture=False)``);
    ``between(i, net, rule)`` runs before step ``i``."""
    net, X, Y = _net(kind, memory, dtype)
    rule, private = make_rule(), (None if dp is None else DP(**dp))
    losses = []
    with counting_device(net, lib), capturable_blas(lib):
        for i in range(steps):
            if between is not None:
                between(i, net, rule)
            if capture:
                J = net.train_step(X, Y, rule, check=False, dp=private)
            else:
                J = net._step(X, Y, StepPlan.of(rule, private), False, global_loss=True,
                              capture=False)
            losses.append(float(J))
    return _host(net), losses, rule, private, net


def _same(a, b):
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("rule", SCHEDULED)
@pytest.mark.parametrize("private", [False, True], ids=["", "dp"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("memory", gpu_mlp.MEMORY_MODES)
@pytest.mark.parametrize("kind", KINDS)
def test_train_step_replays_its_captured_step_as_eager_steps_run(host_cupy_lib, kind, memory,
                                                                   dtype, rule, private):
    """Step 1 eager (the warm-up), step 2 captured and launched, steps 3-6 replayed: the
    parameters and losses of eager steps, bit for bit, with the schedule's rate, Adam's
    bias corrections and the DP noise's step moving on in every replay."""
    dp = PRIVATE if private else None
    args = dict(kind=kind, memory=memory, dtype=dtype, make_rule=SCHEDULED[rule], dp=dp)
    params, losses, opt, dp_, net = _steps(host_cupy_lib, **args)
    eager, eager_losses, eager_opt, eager_dp, _ = _steps(host_cupy_lib, capture=False, **args)
    _same(params, eager)
    assert losses == eager_losses
    assert (net.step_graphs.captures, net.step_graphs.replays) == (1, 4)
    if not isinstance(opt, float):  # the host's side of each replayed step: counted
        assert (opt.steps, opt.last_lr) == (eager_opt.steps, eager_opt.last_lr) == \
            (6, opt.lr_at(5))
    if private:
        assert dp_.steps == eager_dp.steps == 6


@pytest.mark.parametrize("private", [False, True], ids=["", "dp"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("memory", gpu_mlp.MEMORY_MODES)
def test_a_step_with_wide_softmax_rows_is_captured_and_replayed(host_cupy_lib, memory, dtype,
                                                                 private):
    """Rows wider than ops.ROW_KERNEL_MAX (their kernels' scratch from the workspace):
    captured like any step, and replayed as eager steps run, bit for bit."""
    args = dict(kind="wide", memory=memory, dtype=dtype, make_rule=SCHEDULED["adam-cosine"],
                dp=PRIVATE if private else None)
    params, losses, _, _, net = _steps(host_cupy_lib, **args)
    eager, eager_losses, _, _, _ = _steps(host_cupy_lib, capture=False, **args)
    _same(params, eager)
    assert losses == eager_losses
    assert (net.step_graphs.captures, net.step_graphs.replays) == (1, 4)


def test_a_warm_up_that_outgrew_a_buffer_in_use_is_repeated(host_cupy_lib, monkeypatch):
    """The workspace replaces a buffer it outgrew while the step held it only at the next
    step, an allocation a capture could not make: that configuration warms up once more,
    then is captured, and its replays are still the eager steps."""
    run, first = graph_module._run, []

    def outgrowing(net, *args, **kwargs):
        if not first:  # as if the first step had outgrown a buffer it held
            first.append(True)
            net.training_workspace.outgrown += 1
        return run(net, *args, **kwargs)
    monkeypatch.setattr(graph_module, "_run", outgrowing)
    params, losses, _, _, net = _steps(host_cupy_lib)
    monkeypatch.setattr(graph_module, "_run", run)
    eager, eager_losses, _, _, _ = _steps(host_cupy_lib, capture=False)
    _same(params, eager)
    assert losses == eager_losses
    assert (net.step_graphs.captures, net.step_graphs.replays) == (1, 3)


def test_a_replay_reads_the_scalars_of_its_own_step(host_cupy_lib):
    """The device scalars after each replayed step are the host's numbers of the next
    step, though the graph was captured once."""
    seen = []

    def look(i, net, rule):
        if i >= 3:  # two replays done: what the last replay's step read
            scalars = net.step_graphs._latest[3]  # the one pair: its StepScalars
            seen.append((i, scalars.values.view(np.ndarray).copy()))
    _, _, opt, _, net = _steps(host_cupy_lib, make_rule=SCHEDULED["adam-cosine"], between=look)
    plan = StepPlan(opt)
    assert net.step_graphs.captures == 1
    for i, values in seen:  # step i - 1 (0-based) ran last
        want = plan.step_values(i - 1)
        for name, value in zip(StepScalars.COLUMNS, values):
            if name in want:
                assert value == np.float32(want[name]), (i, name)
    assert len({v.tobytes() for _, v in seen}) == len(seen)  # the rate moved every step


def test_a_window_of_scalars_is_refilled_on_the_way(host_cupy_lib, monkeypatch):
    monkeypatch.setattr(StepScalars, "WINDOW", 2)
    params, losses, *_ = _steps(host_cupy_lib, make_rule=SCHEDULED["adam-cosine"], steps=7)
    eager, eager_losses, *_ = _steps(host_cupy_lib, make_rule=SCHEDULED["adam-cosine"],
                                     steps=7, capture=False)
    _same(params, eager)
    assert losses == eager_losses


def test_a_replayed_step_allocates_nothing_and_never_waits(host_cupy_lib):
    for make_rule in SCHEDULED.values():
        for dp in (None, PRIVATE):
            net, X, Y = _net("conv")
            rule, private = make_rule(), (None if dp is None else DP(**dp))
            with counting_device(net, host_cupy_lib) as counts, capturable_blas(host_cupy_lib):
                for _ in range(3):
                    net.train_step(X, Y, rule, check=False, dp=private)
                counts.reset()
                for _ in range(3):
                    net.train_step(X, Y, rule, check=False, dp=private)
                assert (counts.allocations, counts.syncs, counts.where) == (0, 0, [])
            assert net.step_graphs.replays == 4


def _host_batches(kind, steps, dtype="float32"):
    """``steps`` different batches for ``_net(kind)``, as NumPy arrays (host data)."""
    _, shape = COUNTED_NETS[kind]
    rng = np.random.default_rng(7)
    return [(rng.standard_normal(shape).astype(dtype), rng.integers(0, 5, shape[0]))
            for _ in range(steps)]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("kind", KINDS + ["wide"])
def test_a_host_batch_goes_straight_into_the_buffers_the_graph_reads(host_cupy_lib, kind,
                                                                     dtype):
    """train_step given NumPy arrays on a GPU: cast and checked on the host (check=True
    reads nothing from the device), then copied into the workspace's kept buffers for
    its shape (cupy.ndarray.set: no allocation), which the captured graph reads as its
    static input -- a replayed step launches those two copies, its graph and the loss's
    copy. A new batch each step; the parameters and losses of eager steps on the same
    batches as device arrays, bit for bit."""
    batches = _host_batches(kind, 6, dtype)
    runs = {}
    for way in ("host", "device"):
        net, _, _ = _net(kind, dtype=dtype)
        rule = optim.Adam(1e-2)
        with counting_device(net, host_cupy_lib) as counts, capturable_blas(host_cupy_lib):
            losses = []
            for i, (X, Y) in enumerate(batches):
                if i == 3:
                    counts.reset()
                if way == "host":
                    J = net.train_step(X, Y, rule)
                else:
                    J = net._step(X.view(DeviceArray), Y.view(DeviceArray), StepPlan.of(rule),
                                  True, global_loss=True, capture=False)
                losses.append(float(J))
            got = (counts.allocations, counts.syncs, counts.launches, counts.graph_launches)
        runs[way] = (_host(net), losses, got, net)
    (params, losses, got, net), (eager, eager_losses, _, _) = runs["host"], runs["device"]
    _same(params, eager)
    assert losses == eager_losses
    # steps 4-6: each copies X and Y in and the loss out, launches its graph; the 3 syncs
    # are the test's own float(J)
    assert got == (0, 3, 9, 3)
    assert (net.step_graphs.captures, net.step_graphs.replays) == (1, 4)
    ws = net.training_workspace
    assert sum(ws.is_staged(a) for a in ws._staged.values()) == 2
    net.free_buffers()
    assert ws.bytes == 0 and not ws._staged


def test_a_bad_host_batch_is_refused_on_the_host_before_anything_runs(host_cupy_lib):
    """A host batch is checked where it is: NaN, a label out of range or a ragged list
    raise before anything reaches the device -- no read of it, no copy, no graph -- and
    the parameters and the optimizer stay as they were."""
    (X, Y), = _host_batches("dense", 1)
    net, _, _ = _net("dense")
    opt = optim.Adam(1e-2)
    with counting_device(net, host_cupy_lib) as counts, capturable_blas(host_cupy_lib):
        for _ in range(3):  # warm-up, capture, replay
            net.train_step(X, Y, opt)
        before, replays = _host(net), net.step_graphs.replays
        staged = {key: b.view(np.ndarray).copy() for key, b in
                  net.training_workspace._staged.items()}
        counts.reset()
        nan, high = X.copy(), Y.copy()
        nan[2, 1], high[0] = np.nan, 5
        with pytest.raises(ValueError, match="X contains NaN or Inf"):
            net.train_step(nan, Y, opt)
        with pytest.raises(ValueError, match=r"labels must lie in \[0, 5\), got values in "
                                             r"\[0, 5\]"):
            net.train_step(X, high, opt)
        with pytest.raises(ValueError, match="X cannot be made an array"):
            net.train_step([[1.0, 2.0], [3.0]], Y, opt)
        with pytest.raises(ValueError, match="shape"):
            net.train_step(X[:, :-1], Y, opt)
        assert (counts.allocations, counts.syncs, counts.launches) == (0, 0, 0)
        _same(_host(net), before)
        assert (net.step_graphs.replays, opt.steps) == (replays, 3)
        for key, values in staged.items():  # the last good batch, untouched
            _equal(net.training_workspace._staged[key], values)


def test_host_batches_of_each_shape_have_their_own_kept_buffers(host_cupy_lib):
    """A full batch and the remainder, one sample, lists: each shape and dtype its own
    buffer, the graphs of the two batch sizes replayed in turn; device arrays are taken
    as they are, never staged."""
    (X, Y), = _host_batches("dense", 1)
    net, Xd, Yd = _net("dense")
    with counting_device(net, host_cupy_lib) as counts, capturable_blas(host_cupy_lib):
        for _ in range(3):
            net.train_step(X, Y, 1e-3)
            net.train_step(X[:5], Y[:5], 1e-3)
        counts.reset()
        net.train_step(X, Y, 1e-3)
        net.train_step(X[:5], Y[:5], 1e-3)
        assert (counts.allocations, counts.graph_launches) == (0, 2)
        ws = net.training_workspace
        shapes = sorted(key[0] for key in ws._staged)
        assert shapes == [(5,), (5, 12), (8,), (8, 12)]
        net.train_step(X[0], Y[0], 1e-3)  # one sample: a batch of one
        net.train_step(X[:2].tolist(), Y[:2].tolist(), 1e-3)
        assert {(1, 12), (2, 12)} <= {key[0] for key in ws._staged}
        staged = len(ws._staged)
        net.train_step(Xd, Yd, 1e-3)  # a device batch: as it is
        assert len(ws._staged) == staged
    assert net.step_graphs.captures == 2


def test_fit_reads_a_replays_loss_in_its_graph_and_train_step_a_lasting_copy(
        host_cupy_lib):
    """fit reads each step's loss at once (into its epoch's vector), so a replay hands it
    the graph's own loss buffer: one copy kernel a step less. train_step's loss keeps its
    value through the next step, so it gets a copy, as before."""
    net, X, Y = _net("dense")
    plan = StepPlan(1e-3)
    with counting_device(net, host_cupy_lib), capturable_blas(host_cupy_lib):
        for _ in range(3):  # warm-up, capture, replay
            net._step(X, Y, plan, False, lasting=False)
        first = net._step(X, Y, plan, False, lasting=False)
        value = float(first)
        second = net._step(X, Y, plan, False, lasting=False)
        assert second is first  # the graph's buffer, overwritten by each replay
        kept = net.train_step(X, Y, 1e-3, check=False)
        held = float(kept)
        net.train_step(X, Y, 1e-3, check=False)
        assert kept is not first and float(kept) == held  # a lasting copy
    assert net.step_graphs.replays == 5 and value > 0


@pytest.mark.parametrize("layers, shape", [
    # layer 2: P = 9 output positions, 16 channels: the Gram form of its norms
    (lambda: [Conv2d(1, 3, 3, padding=1), Conv2d(3, 16, 3, stride=2, padding=1),
              Dense(16 * 3 * 3, 5, "identity")], (8, 1, 6, 6)),
    # layer 1: P = 4, 8 channels from K = 4: each G_i formed for its norm, not kept
    (lambda: [Conv2d(1, 8, 2, stride=2), Dense(8 * 2 * 2, 5, "identity")], (8, 1, 4, 4))],
    ids=["gram", "direct"])
def test_a_private_step_of_a_conv_net_with_more_channels_than_positions_is_captured(
        host_cupy_lib, layers, shape):
    """Its norms came from CuPy's sum, einsum and matmul, which make their results: the
    capture failed, and the step ran eagerly for good, with a warning. Now from workspace
    buffers: captured, replayed, the eager steps bit for bit, nothing allocated."""
    rng = np.random.default_rng(0)
    X = rng.standard_normal(shape).astype(np.float32).view(DeviceArray)
    Y = rng.integers(0, 5, shape[0]).view(DeviceArray)
    results = []
    for capture in (True, False):
        net = gpu_mlp.Network(layers(), loss="softmax_cross_entropy", device="cpu", seed=0)
        dp = DP(**PRIVATE)
        with warnings.catch_warnings(), counting_device(net, host_cupy_lib) as counts, \
                capturable_blas(host_cupy_lib):
            warnings.simplefilter("error")
            for step in range(6):
                if step == 3:
                    counts.reset()
                net._step(X, Y, StepPlan(1e-2, dp), False, global_loss=True,
                          capture=capture)
            if capture:
                assert (counts.allocations, counts.syncs, counts.where) == (0, 0, [])
        results.append(_host(net))
        if capture:
            assert (net.step_graphs.captures, net.step_graphs.replays) == (1, 4)
    _same(*results)


def test_nets_share_a_capture_stream_and_its_cublas_handle(host_cupy_lib):
    """The capture stream, its cuBLAS handle and the handle's 32 MiB workspace are made
    once per thread and device, however many nets are trained and freed: one per net
    (as before) left a handle and its workspace behind with each."""
    import capture as capture_module
    from device_counts import to_device

    made = capture_module.Stream.made
    net, X, Y = _net("dense")
    with counting_device(net, host_cupy_lib) as counts, \
            capturable_blas(host_cupy_lib) as blas:
        handles = len(blas.handles)  # the default stream's
        for k in range(4):
            other = _net("dense")[0] if k else net
            to_device(other, net.xp)
            for _ in range(3):
                other.train_step(X, Y, 1e-2, check=False)
            assert other.step_graphs.replays == 1
            other.free_buffers()
        assert capture_module.Stream.made - made <= 1  # 0: an earlier test made it
        assert len(blas.handles) == handles + 1
        counts.reset()
        net.train_step(X, Y, 1e-2, check=False)  # after free_buffers: eager, no new handle
        assert "cuBLAS workspace" not in counts.where


def test_a_graph_keeps_the_cublas_workspace_of_the_thread_that_captured_it(host_cupy_lib):
    """A thread's capture handle and its workspace live in thread-local storage, freed
    when the thread ends; its graphs keep the workspace's address. Captured in a worker
    and replayed after it ended, a graph must still hold that workspace: it went back to
    CuPy's pool, for the next array, under the GEMMs that write it."""
    import gc
    import threading
    import weakref

    from gpu_mlp import cublas as binding_module

    net, X, Y = _net("dense")
    with counting_device(net, host_cupy_lib), capturable_blas(host_cupy_lib):
        workspaces = []

        def train():
            for _ in range(3):  # warm-up, capture, replay
                net.train_step(X, Y, 1e-2, check=False)
            handles = binding_module._binding.local.__dict__["handles"].values()
            workspaces.extend(weakref.ref(h.workspace) for h in handles)

        worker = threading.Thread(target=train)
        worker.start()
        worker.join()
        del worker
        gc.collect()
        assert net.step_graphs.graphs == 1 and len(workspaces) == 2
        assert sum(w() is not None for w in workspaces) == 1  # the capture stream's
        replays = net.step_graphs.replays
        net.train_step(X, Y, 1e-2, check=False)
        assert net.step_graphs.replays == replays + 1
        net.free_buffers()  # the graph goes, and with it the workspace
        gc.collect()
        assert all(w() is None for w in workspaces)


def test_a_graph_keeps_its_workspace_when_its_capture_handle_is_evicted(host_cupy_lib):
    """A thread keeps MAX_HANDLES cuBLAS handles; replays never ask for the capture
    stream's, so it is soon the least recently used and destroyed, and the next capture
    makes another. The graphs captured before must keep the workspace they write."""
    import gc
    import weakref

    import capture as capture_module
    from device_counts import to_device
    from gpu_mlp import cublas as binding_module

    (a, X, Y), (b, Xb, Yb) = _net("dense"), _net("dense")
    with counting_device(a, host_cupy_lib), capturable_blas(host_cupy_lib):
        to_device(b, a.xp)
        for _ in range(3):
            a.train_step(X, Y, 1e-2, check=False)
        side = graph_module._capture_stream(sys.modules["cupy"].cuda)
        workspace = weakref.ref(side.handle.workspace)
        for _ in range(binding_module.MAX_HANDLES):  # eager work on as many new streams
            with capture_module.Stream():
                a.predict(X)
        b.train_step(Xb, Yb, 1e-2, check=False)  # a warm-up: the capture side's new handle
        gc.collect()
        assert a.step_graphs.graphs == 1 and workspace() is not None
        a.train_step(X, Y, 1e-2, check=False)
        assert a.step_graphs.replays == 2


def test_a_capture_warms_up_again_each_time_the_workspace_outgrew_it(host_cupy_lib):
    """The re-warm after an allocating capture was once per configuration: captured,
    evicted by two others, recaptured after the workspace grew again, it failed for
    good, with a warning."""
    import warnings

    net, X, Y = _net("dense")
    opt, dp = optim.Adam(1e-2), DP(1.0, 1.0, seed=1)

    def grow(k):
        net.per_sample_grad_norms(np.concatenate([X] * k).view(DeviceArray),
                                  np.concatenate([Y] * k).view(DeviceArray))
    with counting_device(net, host_cupy_lib), capturable_blas(host_cupy_lib), \
            warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        net.train_step(X, Y, opt, check=False, dp=dp)
        grow(2)
        for _ in range(4):
            net.train_step(X, Y, opt, check=False, dp=dp)
        for k in (2, 3):  # two other configurations captured: the first evicted
            for _ in range(3):
                net.train_step(X[:k], Y[:k], opt, check=False, dp=dp)
        grow(8)
        for _ in range(4):
            net.train_step(X, Y, opt, check=False, dp=dp)
    assert not any(entry.failed for entry in net.step_graphs._entries.values())


def test_graphs_launched_on_another_stream_wait_for_the_last_launch(host_cupy_lib):
    """The graphs captured on one thread share its capture handle's workspace: two nets'
    replays on two streams at once would write into it together (silently wrong
    gradients). Every launch first waits for the event recorded after the last one (on
    the stream that recorded it, for nothing more)."""
    import capture as capture_module
    from device_counts import to_device

    nets = [_net("dense") for _ in range(2)]
    one, two = capture_module.Stream(), capture_module.Stream()
    with counting_device(nets[0][0], host_cupy_lib), capturable_blas(host_cupy_lib):
        to_device(nets[1][0], nets[0][0].xp)
        with one:
            for net, X, Y in nets:
                for _ in range(3):  # warm-up, capture (and its launch), replay
                    net.train_step(X, Y, 1e-2, check=False)
        capture_module.Event.waits.clear()
        net, X, Y = nets[1]
        with two:
            net.train_step(X, Y, 1e-2, check=False)
            net.train_step(X, Y, 1e-2, check=False)
        with one:
            nets[0][0].train_step(*nets[0][1:], 1e-2, check=False)
        assert capture_module.Event.waits == [(two.ptr, one.ptr), (two.ptr, two.ptr),
                                              (one.ptr, two.ptr)]
        assert [n.step_graphs.replays for n, _, _ in nets] == [2, 3]


def _changed_midway(change):
    def between(i, net, rule):
        if i == 4:
            change(net, rule)
    return between


def _replace_params(net, rule):
    net.params = [(W.copy(), b.copy()) for W, b in net.params]


def _decay_more(net, rule):
    rule.weight_decay = 0.05


def _free(net, rule):
    net.free_buffers()


@pytest.mark.parametrize("change", [_replace_params, _decay_more, _free],
                         ids=["params-replaced", "optimizer-changed", "free-buffers"])
def test_a_graph_is_captured_again_after_what_it_froze_changes(host_cupy_lib, change):
    """New parameter arrays, another weight decay (a kernel argument), free_buffers(): the
    next step runs eagerly, the one after is captured again, and every step is the eager
    step."""
    make = lambda: optim.SGD(1e-2, momentum=0.9, weight_decay=1e-3)  # noqa: E731
    args = dict(make_rule=make, steps=8, between=_changed_midway(change))
    params, losses, opt, _, net = _steps(host_cupy_lib, **args)
    eager, eager_losses, *_ = _steps(host_cupy_lib, capture=False, **args)
    _same(params, eager)
    assert losses == eager_losses
    assert (net.step_graphs.captures, net.step_graphs.replays) == (2, 4)
    assert opt.steps == 8


def _lr_lowered(net, rule):
    rule.lr = rule.lr / 3


def _rescheduled(net, rule):  # another rate and schedule, the same kernels
    state = rule.state_dict()
    state["hyperparameters"]["lr"] = 0.02
    state["schedule"] = optim.Cosine(20, warmup=2).spec()
    rule.load_state_dict(state)


@pytest.mark.parametrize("make", [lambda: optim.SGD(1e-2, momentum=0.9, weight_decay=1e-3),
                                  lambda: optim.AdamW(1e-2, schedule=optim.Step(2, 0.5))],
                         ids=["momentum", "adamw-step"])
@pytest.mark.parametrize("change", [_lr_lowered, _rescheduled], ids=["lr", "schedule"])
def test_a_new_rate_or_schedule_is_read_by_the_replays_without_a_capture(host_cupy_lib,
                                                                         make, change):
    """The rates reach the kernels as the step's scalars: an lr set between steps (as a
    plateau schedule does) or a schedule loaded is replayed, not captured again, and
    every step is the eager step."""
    args = dict(make_rule=make, steps=8, between=_changed_midway(change))
    params, losses, opt, _, net = _steps(host_cupy_lib, **args)
    eager, eager_losses, eager_opt, _, _ = _steps(host_cupy_lib, capture=False, **args)
    _same(params, eager)
    assert losses == eager_losses
    assert (net.step_graphs.captures, net.step_graphs.replays) == (1, 6)
    assert (opt.steps, opt.last_lr) == (eager_opt.steps, eager_opt.last_lr)


@pytest.mark.parametrize("kind", KINDS)
def test_a_step_while_a_forward_tape_is_pending_leaves_the_tape_intact(host_cupy_lib, kind):
    """Network.forward lends workspace buffers to its tape until backward. A replay
    writes into the buffers it was captured with, which may be those: the step runs
    eagerly, is captured again with the buffers free then, and the steps are the eager
    run's, bit for bit. (The tape's own backward is refused after those steps -- its
    activations are of the weights before them -- and gives its buffers back; a new
    forward's backward is the eager run's.)"""
    def run(capture):
        net, X, Y = _net(kind, dtype="float64")
        plan = StepPlan.of(1e-2, None)
        with counting_device(net, host_cupy_lib), capturable_blas(host_cupy_lib):
            def steps(n):
                for _ in range(n):
                    if capture:
                        net.train_step(X, Y, 1e-2, check=False)
                    else:
                        net._step(X, Y, plan, False, global_loss=True, capture=False)
            steps(3)  # warm-up, capture, replay
            F, tape = net.forward(X)
            steps(3)
            with pytest.raises(ValueError, match="parameters changed since this tape"):
                net.backward(tape, np.ones(F.shape).view(DeviceArray))
            F, tape = net.forward(X)
            grads, _ = net.backward(tape, np.ones(F.shape).view(DeviceArray))
            steps(3)
        grads = [g.view(np.ndarray).copy() for pair in grads for g in pair]
        return _host(net) + grads, net.step_graphs

    got, graphs = run(capture=True)
    eager, _ = run(capture=False)
    _same(got, eager)
    # step 4 eager (the graph dropped), 5 captured again, then replays
    assert (graphs.captures, graphs.replays) == (2, 5)


def test_a_capture_that_allocates_after_the_workspace_grew_warms_up_again(host_cupy_lib):
    """A larger call between a configuration's warm-up and its capture grows the
    workspace, which lets go of the smaller buffers: the capture allocates and fails.
    The step then warms up again and is captured -- not run eagerly for good, after a
    warning that blamed the step."""
    import warnings

    net, X, Y = _net("dense")
    X16 = np.concatenate([X, X]).view(DeviceArray)
    Y16 = np.concatenate([Y, Y]).view(DeviceArray)
    opt, dp = optim.Adam(1e-2), DP(1.0, 1.0, seed=1)
    with counting_device(net, host_cupy_lib), capturable_blas(host_cupy_lib), \
            warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        net.train_step(X, Y, opt, check=False, dp=dp)  # the warm-up
        net.per_sample_grad_norms(X16, Y16)            # the workspace grows
        for _ in range(6):
            net.train_step(X, Y, opt, check=False, dp=dp)
    # the failed capture ran eagerly, then a warm-up, a capture and three replays
    assert (net.step_graphs.captures, net.step_graphs.replays) == (1, 3)
    assert opt.steps == dp.steps == 7


def test_bad_input_raises_before_any_graph_runs(host_cupy_lib):
    net, X, Y = _net("dense")
    opt = optim.Adam(1e-2)
    with counting_device(net, host_cupy_lib), capturable_blas(host_cupy_lib):
        for _ in range(3):
            net.train_step(X, Y, opt)  # check=True: one read of the verdict per step
        before, replays = _host(net), net.step_graphs.replays
        bad = X.copy()
        bad[0, 0] = np.nan
        with pytest.raises(ValueError, match="NaN"):
            net.train_step(bad, Y, opt)
        with pytest.raises(ValueError):
            net.train_step(X, Y[:-1], opt)
        _same(_host(net), before)
        assert (net.step_graphs.replays, opt.steps) == (replays, 3)


@pytest.mark.parametrize("where", ["begin", "during"])
def test_a_step_that_cannot_be_captured_runs_eagerly_after_one_warning(host_cupy_lib,
                                                                        monkeypatch, where):
    """A capture refused at its start, or broken by a host read in the middle of the step:
    one warning, the step (and every later one) eager, the optimizer and DP counted once."""
    import capture as capture_module
    from gpu_mlp import plan as plan_module

    if where == "begin":
        def refuse(self, mode=None):
            raise CUDARuntimeError("cudaErrorStreamCaptureUnsupported", "no capture here")
        monkeypatch.setattr(capture_module.Stream, "begin_capture", refuse)
    else:
        select = plan_module.StepScalars.select

        def reads(self):
            float(self.values[0, ...])  # a host read: refused while capturing
            select(self)
        monkeypatch.setattr(plan_module.StepScalars, "select", reads)
    args = dict(make_rule=SCHEDULED["adam-cosine"], dp=PRIVATE)
    with pytest.warns(RuntimeWarning, match="could not be captured") as warned:
        params, losses, opt, dp, net = _steps(host_cupy_lib, **args)
    assert len(warned) == 1
    eager, eager_losses, *_ = _steps(host_cupy_lib, capture=False, **args)
    _same(params, eager)
    assert losses == eager_losses
    assert (net.step_graphs.captures, opt.steps, dp.steps) == (0, 6, 6)


def test_an_optimizer_resumed_after_replays_continues_bit_for_bit(host_cupy_lib):
    make = SCHEDULED["adam-cosine"]
    whole, *_ = _steps(host_cupy_lib, make_rule=make, steps=8)
    net, X, Y = _net("dense")
    opt = make()
    with counting_device(net, host_cupy_lib), capturable_blas(host_cupy_lib):
        for _ in range(5):
            net.train_step(X, Y, opt, check=False)
        resumed = optim.from_state_dict(opt.state_dict())  # host copies, as a checkpoint
        net.params = [(W.copy(), b.copy()) for W, b in net.params]  # as a loaded net
        opt2 = resumed
        for _ in range(3):
            net.train_step(X, Y, opt2, check=False)
    _same(_host(net), whole)
    assert opt2.steps == 8


def test_fit_replays_two_graphs_the_full_batch_and_the_remainder(host_cupy_lib, monkeypatch):
    make, shape = COUNTED_NETS["dense"]
    rng = np.random.default_rng(1)
    X = rng.standard_normal((28, shape[1])).astype(np.float32).view(DeviceArray)
    y = rng.integers(0, 5, 28).view(DeviceArray)
    results = []
    for capture in (True, False):
        if not capture:
            monkeypatch.setattr(graph_module, "_cuda", lambda: None)
        net = gpu_mlp.Network(make(), loss="softmax_cross_entropy", device="cpu", seed=0)
        held = []
        original = graph_module.StepGraphs._capture

        def counted(self, *args, **kwargs):
            done = original(self, *args, **kwargs)
            held.append(self.graphs)
            return done
        monkeypatch.setattr(graph_module.StepGraphs, "_capture", counted)
        opt = optim.Adam(1e-2, schedule=optim.Cosine(12, warmup=3))
        with counting_device(net, host_cupy_lib), capturable_blas(host_cupy_lib):
            history = net.fit(X, y, epochs=3, batch_size=8, optimizer=opt, verbose=False)
        results.append((_host(net), history.train_loss, net.step_graphs))
        if capture:
            assert net.step_graphs.captures == 2 and max(held) == 2
            assert net.step_graphs.replays == 12 - 4  # 4 steps an epoch: 2 warm-ups, 2 captures
    _same(results[0][0], results[1][0])
    assert results[0][1] == results[1][1]


def _watch_graphs(monkeypatch):
    """``(copies, names)``, filled as steps run: the dtype kind of each batch copied into
    a graph's static inputs, and the launches of each graph captured, by name."""
    copies, names = [], []
    into, capture_step = graph_module._into, graph_module.StepGraphs._capture
    monkeypatch.setattr(graph_module, "_into", lambda static, batch: (
        copies.append(batch.dtype.kind), into(static, batch))[1])

    def capture_and_look(self, cuda, entry, *args):
        captured = capture_step(self, cuda, entry, *args)
        names.append(entry.graph.names)
        return captured

    monkeypatch.setattr(graph_module.StepGraphs, "_capture", capture_and_look)
    return copies, names


def test_a_graph_gathers_into_the_gathers_buffers_with_no_copy_of_its_own(host_cupy_lib,
                                                                            monkeypatch):
    """A gathered batch's graph gathers into the buffers the step was given (fit's
    BatchGather's, one pair for every batch size), not into a copy of its own: under DP
    a net holds up to POISSON_GRAPHS graphs, which would each have held a batch."""
    captured, capture_step = [], graph_module.StepGraphs._capture

    def look(self, cuda, entry, net, X, Y, *args):
        done = capture_step(self, cuda, entry, net, X, Y, *args)
        captured.append((entry.X is X and entry.Y is Y, entry.rows))
        return done

    monkeypatch.setattr(graph_module.StepGraphs, "_capture", look)
    rng = np.random.default_rng(6)
    X = rng.standard_normal((60, *_net("dense")[1].shape[1:])).astype(np.float32)
    Y = rng.integers(0, 5, 60)
    net = _net("dense")[0]
    with counting_device(net, host_cupy_lib), capturable_blas(host_cupy_lib), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore", gpu_mlp.training.TrainingWarning)
        net.fit(X.view(DeviceArray), Y.view(DeviceArray), epochs=4, batch_size=6, lr=1e-2,
                dp=DP(**PRIVATE), verbose=False)
    assert len(captured) > 3 and captured == [(True, None)] * len(captured)


def _count_replays(net, counts):
    """A list that ``net``'s steps fill, on the counting device, with the (allocations,
    host reads, launches besides the graph) of each step that replayed a graph."""
    replayed, step = [], net._step

    def counted_step(*args, **kwargs):
        before = (counts.allocations, counts.syncs, counts.launches, net.step_graphs.replays)
        J = step(*args, **kwargs)
        if net.step_graphs.replays > before[3]:
            replayed.append((counts.allocations - before[0], counts.syncs - before[1],
                             counts.launches - before[2]))
        return J

    net._step = counted_step
    return replayed


@pytest.mark.parametrize("kind", KINDS)
def test_fit_gathers_its_shuffled_batches_inside_the_graph(host_cupy_lib, monkeypatch, kind):
    """A replay of fit's step launches its graph and nothing else: the graph finds its
    rows through the cursor on the device (the epoch's order, and the position it moves
    on) and gathers them from the data, where a batch gathered outside took two gathers
    and two copies, and its row indices copied in one. The same parameters as eager
    steps (the stand-in records the gathers as kernels: a gather run at capture would
    leave every replay on the captured batch); at fit's end the graphs that read the
    data are let go."""
    from gpu_mlp import training

    net, X, Y = _net(kind)
    rng = np.random.default_rng(1)
    X = rng.standard_normal((28, *X.shape[1:])).astype(np.float32).view(DeviceArray)
    Y = rng.integers(0, 5, 28).view(DeviceArray)  # (the nets' 5 classes)
    gathers, take = [], training.BatchGather._take
    copies, names = _watch_graphs(monkeypatch)
    monkeypatch.setattr(training.BatchGather, "_take", lambda self, *args: (
        gathers.append(1), take(self, *args))[1])
    params = []
    for capture in (True, False):
        if not capture:
            monkeypatch.setattr(graph_module, "_cuda", lambda: None)
        net = _net(kind)[0]
        with counting_device(net, host_cupy_lib) as counts, capturable_blas(host_cupy_lib):
            replayed = _count_replays(net, counts)
            net.fit(X, Y, epochs=3, batch_size=8, lr=1e-2, verbose=False)
        params.append(_host(net))
        if capture:
            # 4 steps an epoch, 12 in all: each batch size warmed up and captured once
            steps = net.step_graphs
            assert (steps.captures, steps.replays) == (2, 8)
            assert replayed == [(0, 0, 0)] * 8  # no allocation, host read or launch
            assert gathers == []  # no take by row indices: the cursor's kernels gather
            assert copies == []  # nothing copied into a graph
            # the rows at the cursor gathered (X, then the labels), the cursor moved on
            assert [graph[:3] for graph in names] == [
                ["gather", "gather_labels", "advance"]] * 2
            assert steps.graphs == 0 and not steps._entries  # forgotten at fit's end
    _same(*params)


def test_a_net_keeps_the_graphs_and_scalars_of_its_latest_rule_only(host_cupy_lib):
    """Each (rule, DP) pair's device scalars and graphs held its optimizer (moments and
    all) alive, up to 8 of them: a learning-rate sweep on one net kept every dropped
    Adam until free_buffers(). Now a new pair lets the others go."""
    import gc
    import weakref

    net, X, Y = _net("dense")
    alive = []
    with counting_device(net, host_cupy_lib), capturable_blas(host_cupy_lib):
        for lr in (1e-3, 3e-4, 1e-4):
            opt = optim.Adam(lr)
            alive.append(weakref.ref(opt))
            for _ in range(3):  # warm-up, capture, replay
                net.train_step(X, Y, opt, check=False)
            del opt
            gc.collect()
    assert [ref() is not None for ref in alive] == [False, False, True]
    assert net.step_graphs.captures == 3 and net.step_graphs.graphs == 1


def test_a_configuration_seen_once_holds_no_copy_of_its_batch(host_cupy_lib):
    """The graph's static input is made at its capture (a configuration's second use),
    and goes with its graph: nine batch sizes seen once each held eight copies."""
    net, X, Y = _net("dense")
    with counting_device(net, host_cupy_lib), capturable_blas(host_cupy_lib):
        for rows in range(len(X), len(X) - 6, -1):
            net.train_step(X[:rows], Y[:rows], 1e-3, check=False)
    entries = list(net.step_graphs._entries.values())
    assert entries and all(e.X is None and e.Y is None and e.loss is None for e in entries)


@pytest.mark.parametrize("kind", KINDS)
def test_fit_under_dp_replays_a_graph_per_poisson_sample_size(host_cupy_lib, kind,
                                                              monkeypatch):
    """Poisson samples vary in size: fit keeps a graph per size (the most recently used
    POISSON_GRAPHS), each gathering its rows from the epoch's indices on the device. The
    replays give the eager steps' parameters and noise bit for bit; a replayed step
    allocates nothing and reads nothing on the host."""
    rng = np.random.default_rng(4)
    X = rng.standard_normal((60, *_net(kind)[1].shape[1:])).astype(np.float32)
    Y = rng.integers(0, 5, 60)
    results = []
    for capture in (True, False):
        if not capture:
            monkeypatch.setattr(graph_module, "_cuda", lambda: None)
        net, dp = _net(kind)[0], DP(**PRIVATE)
        with counting_device(net, host_cupy_lib) as counts, capturable_blas(host_cupy_lib), \
                warnings.catch_warnings():
            # (noise on random labels: the loss may well rise, which fit would say)
            warnings.simplefilter("ignore", gpu_mlp.training.TrainingWarning)
            replayed = _count_replays(net, counts)
            history = net.fit(X.view(DeviceArray), Y.view(DeviceArray), epochs=12,
                              batch_size=6, lr=1e-2, dp=dp, verbose=False)
        results.append((_host(net), history.train_loss, dp.steps))
        if capture:
            steps = net.step_graphs
            # 120 steps of about 6 rows: a size seen twice is captured, replayed after
            # (a capture again after each new largest sample, which grows the buffers)
            assert steps.replays > 60 and steps.captures <= 30
            assert replayed == [(0, 0, 0)] * steps.replays
            assert steps.graphs == 0  # let go at fit's end, with the data they read
    assert results[0][2] == results[1][2] == 120
    assert results[0][1] == results[1][1]
    _same(results[0][0], results[1][0])


def test_a_step_inside_a_capture_of_its_caller_runs_eagerly_into_it(host_cupy_lib):
    net, X, Y = _net("dense")
    with counting_device(net, host_cupy_lib), capturable_blas(host_cupy_lib):
        for _ in range(2):
            net.train_step(X, Y, 1e-3, check=False)
        with Capture() as capture:
            net.train_step(X, Y, 1e-3, check=False)
    assert "gemm" in capture.graph.names and "graph" not in capture.graph.names
    assert net.step_graphs.replays == 0


# --- on a real GPU: CUDA's stream capture, cuBLAS, CuPy ------------------------------------

def _gpu_steps(kind, rule, private, capture, steps=6):
    """``steps`` train_steps of a fresh net on the GPU (the first warms up, the second is
    captured, the rest replay; ``capture=False``: all eager): host copies of the
    parameters, the losses, the net."""
    import cupy

    make, shape = COUNTED_NETS[kind]
    net = gpu_mlp.Network(make(), loss="softmax_cross_entropy", device="cuda",
                          dtype="float32", seed=0)
    rng = np.random.default_rng(0)
    X = cupy.asarray(rng.standard_normal(shape).astype(np.float32))
    Y = cupy.asarray(rng.integers(0, 5, shape[0]))
    rule, dp = SCHEDULED[rule](), (DP(**PRIVATE) if private else None)
    losses = []
    for _ in range(steps):
        if capture:
            J = net.train_step(X, Y, rule, check=False, dp=dp)
        else:
            J = net._step(X, Y, StepPlan.of(rule, dp), False, global_loss=True, capture=False)
        losses.append(float(J))
    return [cupy.asnumpy(a) for pair in net.params for a in pair], losses, net


@pytest.mark.gpu
@pytest.mark.parametrize("private", [False, True], ids=["", "dp"])
@pytest.mark.parametrize("rule", ["sgd", "adam-cosine"])
@pytest.mark.parametrize("kind", ["dense", "conv", "wide"])
def test_on_a_gpu_replays_are_the_eager_steps(kind, rule, private):
    """What the stand-in shows above, on CUDA itself: one capture, four replays, and the
    parameters and losses of eager steps, bit for bit (the same kernels and cuBLAS
    calls in the same order, the scalars read on the device)."""
    params, losses, net = _gpu_steps(kind, rule, private, capture=True)
    eager, eager_losses, _ = _gpu_steps(kind, rule, private, capture=False)
    assert (net.step_graphs.captures, net.step_graphs.replays) == (1, 4)
    _same(params, eager)
    assert losses == eager_losses


def test_an_allocation_from_cupys_pool_during_a_capture_is_refused_before_it_is_made():
    """CuPy captures in relaxed mode and its pool checks nothing: the engine's guard, a
    CuPy MemoryHook, refuses each pool allocation where SingleDeviceMemoryPool.malloc
    calls the hooks, before it looks for a block (real CuPy's hook registry, no GPU)."""
    cupy = pytest.importorskip("cupy")
    guard = graph_module._no_allocation(cupy.cuda)
    assert isinstance(guard, cupy.cuda.MemoryHook)
    with guard:
        hooks = cupy.cuda.memory_hook.get_memory_hooks()
        assert hooks[guard.name] is guard
        with pytest.raises(graph_module.CaptureAllocation, match="512 bytes"):
            for hook in hooks.values():  # as SingleDeviceMemoryPool.malloc calls them
                hook.malloc_preprocess(device_id=0, size=512, mem_size=512)
    assert guard.name not in cupy.cuda.memory_hook.get_memory_hooks()


@pytest.mark.parametrize("allocator", ["cudaMalloc", "another"])
def test_no_capture_where_cupys_allocator_calls_no_memory_hook(allocator):
    """Only a MemoryPool calls the hooks (memory.pyx, SingleDeviceMemoryPool.malloc):
    after cupy.cuda.set_allocator(None) (plain cudaMalloc, which a relaxed capture lets
    through), or with an allocator of another kind, an allocation inside a capture would
    go unseen, and the graph write into memory freed after it. Refused: such a step is
    not captured (it runs eagerly, warned once). Real CuPy's allocator API, no GPU."""
    cupy = pytest.importorskip("cupy")
    others = {"cudaMalloc": None,  # (a MemoryAsyncPool, another library's: a function)
              "another": lambda size: None}
    before = cupy.cuda.get_allocator()
    assert isinstance(before.__self__, cupy.cuda.MemoryPool)  # CuPy's default
    cupy.cuda.set_allocator(others[allocator])
    try:
        with pytest.raises(RuntimeError, match="CuPy's allocator is not its memory pool"):
            graph_module._no_allocation(cupy.cuda)
    finally:
        cupy.cuda.set_allocator(before)
    graph_module._no_allocation(cupy.cuda)  # the pool again: guarded


@pytest.mark.gpu
def test_on_a_gpu_an_allocation_during_a_capture_is_refused():
    import cupy

    stream = cupy.cuda.Stream(non_blocking=True)
    with stream, graph_module._no_allocation(cupy.cuda):
        stream.begin_capture()
        try:
            with pytest.raises(graph_module.CaptureAllocation):
                cupy.empty(1000, dtype=np.float32)
        finally:
            stream.end_capture()


def test_a_capture_stream_of_another_cupy_is_never_reused(host_cupy_lib):
    """Streams are kept per thread, device and stream class: a real CuPy's stream left by
    a GPU test is never handed to the stand-in (nor the stand-in's to real CuPy), which
    would capture host work on a real stream or launch a real graph on a fake one."""
    import types

    import capture as capture_module

    class RealStream:  # a real cupy.cuda.Stream, as far as the cache can tell
        def __init__(self, non_blocking=False):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            pass

    real_cuda = types.SimpleNamespace(Stream=RealStream, Event=capture_module.Event,
                                      runtime=types.SimpleNamespace(getDevice=lambda: 0))
    net, X, Y = _net("dense")
    with counting_device(net, host_cupy_lib), capturable_blas(host_cupy_lib):
        assert isinstance(graph_module._capture_stream(real_cuda).stream, RealStream)
        stream = graph_module._capture_stream(sys.modules["cupy"].cuda).stream
        assert isinstance(stream, capture_module.Stream)
        assert isinstance(graph_module._capture_stream(real_cuda).stream, RealStream)
        for _ in range(3):
            net.train_step(X, Y, 1e-2, check=False)
    assert net.step_graphs.replays == 1


def test_free_buffers_from_another_thread_mid_lookup_is_no_error(host_cupy_lib):
    """free_buffers() from another thread clears the graphs at any point of a step's
    bookkeeping: cleared between the entry's insertion and its move to the end, the step
    died with a KeyError. The interleaving, replayed: the step goes on, eagerly."""
    from collections import OrderedDict

    class Cleared(OrderedDict):
        def __setitem__(self, key, value):
            super().__setitem__(key, value)
            self.clear()  # what the other thread's free_buffers() does, just then

    net, X, Y = _net("dense")
    with counting_device(net, host_cupy_lib), capturable_blas(host_cupy_lib):
        net.step_graphs._entries = Cleared()
        for _ in range(3):
            J = net.train_step(X, Y, 1e-3, check=False)
        assert np.isfinite(float(J))


@pytest.mark.parametrize("alpha", [0.0, 1e-2], ids=["no-l2", "l2"])
@pytest.mark.parametrize("solver", ["sgd", "adam"])
def test_the_estimators_steps_gather_and_tally_inside_their_graphs(host_cupy_lib, monkeypatch,
                                                                    solver, alpha):
    """scikit-learn's estimators step as fit does: a shuffled batch gathered by the
    graph (its rows read through the cursor), and the epoch's loss -- with the L2 term
    of the weights each forward used -- summed by the graph into a LossTally: a replayed
    step launches nothing but its graph, allocates nothing and reads nothing on the
    host. Parameters and loss curve bit for bit those of eager steps; the graphs that
    read the rows let go at the fit's end."""
    pytest.importorskip("sklearn")
    from gpu_mlp.sklearn import MLPClassifier

    rng = np.random.default_rng(2)
    X = rng.standard_normal((28, 6)).astype(np.float32)
    y = rng.integers(0, 3, 28)
    copies, names = _watch_graphs(monkeypatch)
    results = []
    for capture in (True, False):
        if not capture:
            monkeypatch.setattr(graph_module, "_cuda", lambda: None)
        clf = MLPClassifier((8,), solver=solver, alpha=alpha, batch_size=8, max_iter=1,
                            learning_rate_init=1e-2, random_state=0, device="cpu")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # (max_iter reached)
            clf.fit(X, y)  # on the host: the net, its initial parameters
            clf.set_params(warm_start=True, max_iter=3, tol=0.0)
            net = clf.net_
            with counting_device(net, host_cupy_lib) as counts, \
                    capturable_blas(host_cupy_lib):
                replayed = _count_replays(net, counts)
                clf.fit(X, y)
        results.append((_host(net), list(clf.loss_curve_), net.step_graphs))
        if capture:
            steps = net.step_graphs
            # 4 steps an epoch (3 of 8 rows, 1 of 4), 12 in all: each size warmed up and
            # captured once
            assert (steps.captures, steps.replays) == (2, 8)
            assert [r[:2] for r in replayed] == [(0, 0)] * 8  # no allocation, host read
            # nor a launch -- but with an L2 term, after a step of the other batch size:
            # the rule's weight decay (alpha / rows) changed, and its scalars (SGD's
            # keep = 1 - lr decay) are written anew, the table and the counters
            assert all(r[2] == 0 or (alpha and r[2] == 2) for r in replayed), replayed
            assert copies == []  # the rows read by the graph through its cursor
            # the rows found and gathered first; the loss tallied last (before the step
            # counted)
            assert [(graph[:3], graph[-2]) for graph in names] == [(
                ["gather", "gather_labels", "advance"], "tally")] * 2
            assert steps.graphs == 0 and not steps._entries  # forgotten at the fit's end
    assert results[0][1] == results[1][1] and len(results[0][1]) == 1 + 3
    _same(results[0][0], results[1][0])


def test_partial_fit_on_new_rows_each_call_replays_one_graph_across_calls(host_cupy_lib,
                                                                           monkeypatch):
    """partial_fit streams: each call brings new rows, used once, so they stay on the
    host and each batch is copied into the buffers the graph reads (a graph gathering
    from one call's rows would serve that call alone), and a one-step call replays the
    graph the calls before it captured: the batch's two copies, the loss tally's reset,
    the graph, and one read, of ``loss_``; no allocation."""
    pytest.importorskip("sklearn")
    from gpu_mlp.sklearn import MLPClassifier

    rng = np.random.default_rng(3)
    chunks = [(rng.standard_normal((8, 6)).astype(np.float32), rng.integers(0, 3, 8))
              for _ in range(6)]
    results = []
    for capture in (True, False):
        if not capture:
            monkeypatch.setattr(graph_module, "_cuda", lambda: None)
        clf = MLPClassifier((8,), batch_size=8, learning_rate_init=1e-2, random_state=0,
                            device="cpu")
        clf.partial_fit(*chunks[0], classes=[0, 1, 2])  # on the host: the net
        net, clf._optimizer = clf.net_, None  # (Adam's moments made anew on the device)
        with counting_device(net, host_cupy_lib) as counts, capturable_blas(host_cupy_lib):
            for i, (X, y) in enumerate(chunks[1:]):
                if i == 3:
                    counts.reset()
                clf.partial_fit(X, y)
            got = (counts.launches, counts.graph_launches, counts.allocations, counts.syncs)
        results.append((_host(net), list(clf.loss_curve_)))
        if capture:  # the first call on the device warms up, the second captures
            assert (net.step_graphs.captures, net.step_graphs.replays) == (1, 3)
            assert got == (3 * 2, 2, 0, 2)  # the last two calls
    assert results[0][1] == results[1][1]
    _same(results[0][0], results[1][0])


@pytest.mark.parametrize("streaming", [False, True], ids=["fit", "partial_fit"])
def test_sparse_rows_reach_the_graphs_buffers_as_dense_rows_would_their_steps(
        host_cupy_lib, monkeypatch, streaming):
    """A sparse matrix stays on the host, each batch densified there and copied into
    the buffers the graph reads -- from one step's start to the next, nothing allocated
    on the device and nothing launched but those two copies and the graph -- and trains
    to the numbers of the same rows given dense (gathered on the device by fit, kept on
    the host by partial_fit), bit for bit."""
    pytest.importorskip("sklearn")
    sparse = pytest.importorskip("scipy.sparse")
    from gpu_mlp.sklearn import MLPClassifier

    rng = np.random.default_rng(4)
    X = rng.standard_normal((28, 6)).astype(np.float32)
    X[X < 0.3] = 0
    y = rng.integers(0, 3, 28)
    results = []
    for given in (sparse.csr_matrix(X), X):
        clf = MLPClassifier((8,), solver="sgd", alpha=0.0, batch_size=8, max_iter=1,
                            learning_rate_init=1e-2, random_state=0, device="cpu")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # (max_iter reached)
            clf.fit(given, y)  # on the host: the net, its initial parameters
            clf.set_params(warm_start=True, max_iter=3, tol=0.0)
            net, clf._optimizer = clf.net_, None  # (momentum made anew on the device)
            with counting_device(net, host_cupy_lib) as counts, \
                    capturable_blas(host_cupy_lib):
                starts, step = [], net._step

                def watched(*args, **kwargs):
                    starts.append((counts.allocations, counts.launches,
                                   counts.graph_launches))
                    return step(*args, **kwargs)
                net._step = watched
                for _ in range(3) if streaming else range(1):
                    if streaming:
                        clf.partial_fit(given, y)
                    else:
                        clf.fit(given, y)
        results.append((_host(net), list(clf.loss_curve_)))
        if given is not X:  # 4 steps an epoch (3 of 8 rows, 1 of 4): a graph a size
            assert net.step_graphs.captures == 2
            within = [starts[i:i + 2] for i in range(4, 11) if i % 4 != 3]  # an epoch's
            assert [tuple(b - a for a, b in zip(*pair)) for pair in within] == \
                [(0, 2, 1)] * len(within)
    assert results[0][1] == results[1][1]
    _same(results[0][0], results[1][0])


def test_fit_under_dp_holds_at_most_its_budget_of_graphs(host_cupy_lib, monkeypatch):
    """More sample sizes than POISSON_GRAPHS: the least recently used graph goes (and is
    captured again when its size comes back); the numbers are the eager steps'."""
    from gpu_mlp import training

    monkeypatch.setattr(training, "POISSON_GRAPHS", 3)
    rng = np.random.default_rng(5)
    X = rng.standard_normal((60, *_net("dense")[1].shape[1:])).astype(np.float32)
    Y = rng.integers(0, 5, 60)
    results, held = [], []
    for capture in (True, False):
        if not capture:
            monkeypatch.setattr(graph_module, "_cuda", lambda: None)
        net, dp = _net("dense")[0], DP(**PRIVATE)
        step = net._step

        def counted(*args, **kwargs):
            J = step(*args, **kwargs)
            held.append(net.step_graphs.graphs)
            return J

        net._step = counted
        with counting_device(net, host_cupy_lib), capturable_blas(host_cupy_lib):
            net.fit(X.view(DeviceArray), Y.view(DeviceArray), epochs=8, batch_size=6,
                    lr=1e-2, dp=dp, verbose=False)
        results.append(_host(net))
        if capture:
            assert max(held) == 3 and net.step_graphs.replays > 0
            assert net.step_graphs.captures > 10  # sizes evicted and captured again
    _same(*results)


def test_fit_unshuffled_reads_its_rows_in_order_through_the_cursor(host_cupy_lib,
                                                                   monkeypatch):
    """shuffle=False on a GPU: the batches are the data's rows in order, gathered by the
    graph through the cursor over 0..n-1 (where a batch, a view of the data, was copied
    into the graph each step): the eager steps' parameters, a replay launching nothing
    but its graph."""
    rng = np.random.default_rng(7)
    X = rng.standard_normal((28, *_net("dense")[1].shape[1:])).astype(np.float32)
    Y = rng.integers(0, 5, 28)
    results = []
    for capture in (True, False):
        if not capture:
            monkeypatch.setattr(graph_module, "_cuda", lambda: None)
        net = _net("dense")[0]
        with counting_device(net, host_cupy_lib) as counts, capturable_blas(host_cupy_lib):
            replayed = _count_replays(net, counts)
            net.fit(X.view(DeviceArray), Y.view(DeviceArray), epochs=3, batch_size=8,
                    lr=1e-2, shuffle=False, verbose=False)
        results.append(_host(net))
        if capture:
            assert replayed == [(0, 0, 0)] * 8
    _same(*results)
    host = _net("dense")[0]  # and the NumPy engine's, to rounding
    host.fit(X, Y, epochs=3, batch_size=8, lr=1e-2, shuffle=False, verbose=False)
    for a, b in zip(results[0], _host(host)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_a_regressor_with_early_stopping_replays_as_its_eager_steps(host_cupy_lib,
                                                                    monkeypatch):
    """MLPRegressor (float targets, the squared loss) with early stopping: its validation
    split, scores and best parameters around replayed steps, all as with eager steps."""
    pytest.importorskip("sklearn")
    from gpu_mlp.sklearn import MLPRegressor

    rng = np.random.default_rng(8)
    X = rng.standard_normal((40, 5)).astype(np.float32)
    y = (X @ rng.standard_normal((5, 2)) + 0.1 * rng.standard_normal((40, 2))).astype(
        np.float32)
    results = []
    for capture in (True, False):
        if not capture:
            monkeypatch.setattr(graph_module, "_cuda", lambda: None)
        reg = MLPRegressor(hidden_layer_sizes=(8,), batch_size=8, max_iter=1, early_stopping=True,
                           validation_fraction=0.2, random_state=0, device="cpu")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # (max_iter reached)
            reg.fit(X, y)
            reg.set_params(warm_start=True, max_iter=4, tol=0.0, n_iter_no_change=10)
            net = reg.net_
            with counting_device(net, host_cupy_lib), capturable_blas(host_cupy_lib):
                reg.fit(X, y)
        results.append((_host(net), list(reg.loss_curve_), list(reg.validation_scores_)))
        if capture:
            assert net.step_graphs.replays > 0
    assert results[0][1:] == results[1][1:]
    _same(results[0][0], results[1][0])


@pytest.mark.parametrize("targets", ["labels", "rows"])
def test_the_main_jobs_path_compiles_none_of_cupys_own_kernels(host_cupy_lib, targets):
    """A first run on a GPU compiles with NVRTC each CuPy kernel it meets, one
    compilation apiece, besides gpu_mlp's one module: the main job -- fit with its data
    checked and a validation set every epoch, the test loss, the predictions -- meets
    none (the stand-in lists what a path would compile: CuPy's ufuncs, its reductions
    but CUB's, take, arange, argmax, fills, casts; 17 on this path before). What it
    computes instead -- the checks' scan, the cursor's gathers, the accuracy's hits --
    gives the NumPy engine's History."""
    from gpu_mlp import training

    rng = np.random.default_rng(12)
    X = rng.standard_normal((40, 12)).astype(np.float32)
    y = rng.integers(0, 5, 40)
    Y = y if targets == "labels" else np.eye(5, dtype=np.float32)[y]
    histories = []
    for on_device in (False, True):
        net = _net("dense")[0]
        with contextlib.ExitStack() as stack, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # (a rising loss on random labels)
            if on_device:
                counts = stack.enter_context(counting_device(net, host_cupy_lib))
                stack.enter_context(capturable_blas(host_cupy_lib))
            histories.append(net.fit(X[:32], Y[:32], epochs=3, batch_size=8, lr=1e-2,
                                     seed=0, validation=(X[32:], Y[32:]), verbose=False))
            training.evaluate(net, X[32:], Y[32:])
            net.predict(X[32:])
            if on_device:
                assert counts.compiled == set()
                assert net.step_graphs.replays > 0
    cpu, gpu = histories
    assert gpu.val_accuracy == cpu.val_accuracy and len(set(cpu.val_accuracy)) > 1
    np.testing.assert_allclose(gpu.val_loss, cpu.val_loss, rtol=1e-5)
    np.testing.assert_allclose(gpu.train_loss, cpu.train_loss, rtol=1e-5)


@pytest.mark.parametrize("loss", ["logistic", "probabilities"])
def test_float_targets_are_checked_by_the_modules_kernels_or_on_the_host(host_cupy_lib, loss):
    """A logistic net's +-1 labels and a softmax net's probability rows: checked by a
    kernel of the module when on the device (no CuPy kernel to compile), on the host
    when a host batch is (before it is copied in); bad ones -- a label of 0.5, a row
    summing to 1.1 -- refused either way, the parameters untouched."""
    rng = np.random.default_rng(13)
    X = rng.standard_normal((8, 6)).astype(np.float32)
    if loss == "logistic":
        net = gpu_mlp.MLP([6, 8, 2], loss="logistic", device="cpu", seed=0)
        Y = np.sign(rng.standard_normal((8, 2))).astype(np.float32)
        bad, message = Y.copy(), "labels in Y must be -1 or \\+1"
        bad[3, 1] = 0.5
    else:
        net = gpu_mlp.MLP([6, 8, 3], loss="softmax_cross_entropy", device="cpu", seed=0)
        Y = np.eye(3, dtype=np.float32)[rng.integers(0, 3, 8)]
        bad, message = Y.copy(), "target rows must be probabilities"
        bad[2] *= 1.1
    with counting_device(net, host_cupy_lib) as counts, capturable_blas(host_cupy_lib):
        for batch in ((X, Y), (X.view(DeviceArray), Y.view(DeviceArray))):
            net.train_step(*batch, 1e-2)
        before = _host(net)
        for given in (bad, bad.view(DeviceArray)):
            with pytest.raises(ValueError, match=message):
                net.train_step(X, given, 1e-2)
        _same(_host(net), before)
        assert counts.compiled == set()
