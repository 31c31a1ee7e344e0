"""CUDA stream capture on the host (tests/capture.py): the stand-in's own rules, then what
the engine's steady-state step does under them today.

The stand-in runs on the counting device of tests/device_counts.py with host_cupy's build,
so its kernels and GEMMs compute: a replay can be compared with eager steps bit for bit.
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest

import gpu_mlp
from gpu_mlp import ops, optim
from gpu_mlp.layers import Dense
from gpu_mlp.privacy import DP

from capture import (CUBLAS_REFUSES, D2H_REFUSED, INVALIDATED_STATUS, SYNC_STATUS,
                     Capture, CaptureBroken, CUDARuntimeError, capturable_blas, synchronize)
from device_counts import CountingXp, DeviceArray, counting_device
from test_memory import counted_net


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
    w, g = _arrays([1.0, 2.0, 3.0], [1.0, 1.0, 1.0])
    with Capture() as capture:
        ops.sgd(w, g, 0.5)
        np.multiply(w, np.float32(2), out=w)
    assert capture.graph.names == ["sgd", "multiply.__call__"]
    _equal(w, [1.0, 2.0, 3.0])  # captured, not run
    capture.graph.launch()
    _equal(w, [1.0, 3.0, 5.0])
    capture.graph.launch()
    _equal(w, [1.0, 5.0, 9.0])


def test_a_replay_reads_the_arrays_as_they_are_but_the_scalars_as_captured(device):
    """A scalar passed by value is frozen into the graph: a learning rate changed after
    the capture is not seen by the replay, new contents of an array are."""
    w, g = _arrays([0.0, 0.0], [1.0, 2.0])
    lr = 0.5
    with Capture() as capture:
        ops.sgd(w, g, lr)
    assert capture.graph.record[0].scalars == (np.float32(0.5), np.float32(1.0))
    lr = 0.25  # noqa: F841 -- the schedule moves on: the graph cannot know
    g[...] = np.float32(4.0)
    capture.graph.launch()
    _equal(w, [-2.0, -2.0])  # 0.5 * the new g, not 0.25 * g


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
    with Capture() as capture:
        with pytest.raises(NotImplementedError, match=CUBLAS_REFUSES):
            if call == "gemm":
                ops.gemm("N", "N", a, a, out)
            else:
                ops.gemv("N", a, x, y)
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
            if blas:
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


@pytest.mark.xfail(strict=True, raises=NotImplementedError, reason=(
    "ops.gemm and ops.gemv call cupy.cublas, whose every wrapper sets the cuBLAS handle's "
    "stream first, and setStream raises NotImplementedError during stream capture "
    "(cupy_backends/cuda/libs/cublas.pyx, setStream): a direct cuBLAS binding (ctypes, "
    "as ../shared/gpu/graph_capture_probe.py) is needed"))
@pytest.mark.parametrize("kind", KINDS)
def test_a_steady_state_step_captures_on_cupy(host_cupy_lib, kind):
    _compare_replay_with_eager(kind, host_cupy_lib, lambda: 1e-3, blas=False)


FROZEN = {
    # a schedule's rate: plain SGD's GEMM alpha = -lr (host pointer mode) and optim.SGD's
    # kernel lr, both host scalars read at capture
    "sgd-schedule": lambda: optim.SGD(1e-2, schedule=optim.Step(1, 0.5)),
    "momentum-schedule": lambda: optim.SGD(1e-2, momentum=0.9, schedule=optim.Step(1, 0.5)),
    # Adam at a constant rate: the step count t on the host, its bias corrections passed
    # to the kernel by value
    "adam": lambda: optim.Adam(1e-2),
}


@pytest.mark.xfail(strict=True, raises=AssertionError, reason=(
    "host scalars are frozen into the graph: a schedule's learning rate (the GEMM's "
    "alpha = -lr, the sgd/sgd_momentum kernels' lr) and Adam's step count and bias "
    "corrections (1 - beta**t, computed in Python per step) are passed by value, so every "
    "replay repeats the captured step's values: they must live on the device"))
@pytest.mark.parametrize("rule", FROZEN)
def test_a_replay_sees_the_rate_and_step_count_of_its_step(host_cupy_lib, rule):
    _compare_replay_with_eager("dense", host_cupy_lib, FROZEN[rule], blas=True)


@pytest.mark.xfail(strict=True, raises=AssertionError, reason=(
    "DP's Gaussian noise takes its Philox counter (seed, stream, step) as host scalars "
    "(ops.add_gaussian), frozen at capture: every replay adds the same noise"))
def test_a_replayed_private_step_draws_fresh_noise(host_cupy_lib):
    _compare_replay_with_eager("dense", host_cupy_lib, lambda: 1e-3, blas=True,
                               dp=dict(max_grad_norm=1.0, noise_multiplier=1.0, seed=0))
