"""The benchmark harness (bench/) on tiny sizes: what it builds, counts, writes and
compares. No timing is asserted; only that the numbers are there and consistent.

The end-to-end test runs ``bench/run.py`` in a subprocess, as a user would, because the
script sets thread and TF32 environment variables before it imports NumPy and CuPy.
"""

import collections
import contextlib
import dataclasses
import functools
import importlib.util
import json
import math
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

import gpu_mlp
from gpu_mlp import conv, layers, ops
from gpu_mlp.layers import Conv2d
from gpu_mlp.workspace import Workspace
from bench import harness, report, run

ROOT = Path(__file__).resolve().parent.parent
TINY = harness.Point(width=8, depth=2, batch=4)
TINY_CONV = harness.ConvPoint(input=(2, 6, 6), channels=3, depth=2, batch=4)
SETTINGS = harness.Settings(dtype="float64", warmup=1, repeats=5, max_time=0.0)


def test_flops_count_three_gemms_per_layer():
    point = harness.Point(width=3, depth=2, batch=5)
    assert point.sizes == [3, 3, 3]
    # forward A = F W^T, input gradient Delta W, weight gradient Delta^T F: 2 B d_in d_out each
    assert point.flops == 2 * 3 * (2 * 5 * 3 * 3)


def test_conv_point_is_convolutions_then_a_dense_head():
    point = harness.ConvPoint(input=(3, 8, 8), channels=4, depth=3, batch=2)
    layers = point.layers()
    assert [type(layer).__name__ for layer in layers] == ["Conv2d"] * 3 + ["Dense"]
    assert [layer.stride for layer in layers[:3]] == [(1, 1), (2, 2), (1, 1)]
    assert {(layer.kernel_size, layer.padding) for layer in layers[:3]} == {((3, 3), (1, 1))}
    assert [layer.c_in for layer in layers[:3]] == [3, 4, 4]
    # 8x8 -> 8x8 -> 4x4 -> 4x4, flattened into the 10 classes
    assert (layers[-1].d_in, layers[-1].d_out) == (4 * 4 * 4, harness.CLASSES)
    assert str(layers[-1].activation) == "identity" and point.loss == "softmax_cross_entropy"
    # the GEMMs work on im2col rows: one per sample and output position
    assert point.gemm_shapes() == [(2 * 64, 27, 4), (2 * 16, 36, 4), (2 * 16, 36, 4),
                                   (2, 64, 10)]
    assert point.flops == 6 * (128 * 27 * 4 + 2 * 32 * 36 * 4 + 2 * 64 * 10)
    assert str(point) == "3x8x8-c4-d3-B2"
    fields = {"model": "conv", "input": [3, 8, 8], "width": 4, "depth": 3, "batch": 2}
    assert point.fields() == fields
    assert harness.point_of(fields) == point
    # an MLP point has the same fields; records from before the conv grid lack two
    assert TINY.fields() == {"model": "mlp", "input": [8], "width": 8, "depth": 2, "batch": 4}
    assert harness.point_of({"width": 8, "depth": 2, "batch": 4}) == TINY
    assert TINY.gemm_shapes() == [(4, 8, 8), (4, 8, 8)]


def test_cli_lists_match_the_library():
    assert run.IMPLS == harness.IMPLS
    assert run.MODES == gpu_mlp.MEMORY_MODES


def test_tasks_cover_every_mode_with_torch_eager_first():
    points = [harness.Point(64, 2, 64), harness.Point(8, 2, 4)]
    tasks = harness.tasks(["cpu"], None, gpu_mlp.MEMORY_MODES, points)
    assert [t.point for t in tasks[:5]] == [points[1]] * 5  # the cheap point first
    assert [t.label for t in tasks[:5]] == [
        "torch-cpu", "gpu_mlp-numpy[output]", "gpu_mlp-numpy[recompute]",
        "gpu_mlp-numpy[store_both]", "gemm-bound-numpy"]
    cuda = harness.tasks(["cuda"], None, ("output",), [points[1]])
    assert [t.impl for t in cuda] == ["torch", "torch.graph", "gpu_mlp", "torch.compile",
                                      "gemm"]


def test_torch_graph_is_skipped_with_a_reason_off_cuda():
    point = harness.Point(8, 2, 4)
    impls = ["torch.graph", "gpu_mlp", "torch.compile"]
    assert [t.impl for t in harness.tasks(["cpu"], impls, ("output",), [point])] == [
        "gpu_mlp", "torch.compile"]  # torch.compile runs on the CPU when asked for
    assert harness.skipped(["cpu"], impls) == {
        "torch.graph-cpu": "CUDA graphs need a CUDA device"}
    assert set(harness.skipped(["cpu"], None)) == {"torch.graph-cpu", "torch.compile-cpu"}
    assert harness.skipped(["cuda"], None) == {}
    r = harness.measure(harness.Task("cpu", "torch.graph", None, point), SETTINGS)
    assert r["status"] == "error" and "CUDA graphs need a CUDA device" in r["error"]


def test_graph_optimizer_is_capturable_where_it_has_state():
    torch = pytest.importorskip("torch")
    weight = torch.nn.Parameter(torch.zeros(2))
    sgd = harness.graph_optimizer(torch.optim.SGD, [weight], lr=0.1)
    assert "capturable" not in sgd.defaults and sgd.defaults["momentum"] == 0
    adam = harness.graph_optimizer(torch.optim.Adam, [weight], lr=0.1)
    assert adam.defaults["capturable"] is True


class _FakeGraph:
    """Stands in for a captured CUDA graph on the CPU: ``replay`` runs the captured
    function again and writes its result into the static output, as a replay rewrites
    the graph's static tensors (the grads are refilled, not accumulated)."""

    def __init__(self, fn, params, out):
        self.fn, self.params, self.out, self.replays = fn, params, out, 0

    def replay(self):
        import torch

        for p in self.params:
            p.grad = None
        loss = self.fn()
        with torch.no_grad():
            self.out.copy_(loss)
        self.replays += 1


def _rows_merged(calls) -> collections.Counter:
    """GEMM calls ``(transa, transb, a, b, out, beta)`` with the calls that differ only in
    op(a)'s rows (a's first dimension for transa "N", its second for "T") counted as one
    of their summed rows."""
    rows = collections.Counter()
    for ta, tb, a, b, out, beta in calls:
        other = a[1] if ta == "N" else a[0]  # op(a)'s columns
        rows[ta, tb, other, b, out[1:], beta] += a[0] if ta == "N" else a[1]
    return collections.Counter(
        {(ta, tb, (n, other) if ta == "N" else (other, n), b, (n, *o), beta): 1
         for (ta, tb, other, b, o, beta), n in rows.items()})


@pytest.mark.parametrize("point", [harness.Point(width=6, depth=3, batch=5),
                                   harness.ConvPoint(input=(2, 7, 5), channels=3, depth=3,
                                                     batch=5)], ids=str)
def test_torch_graph_recipe_takes_the_same_steps_with_the_capture_mocked(monkeypatch, point):
    """The recipe's host logic on the CPU: warm-up on a side stream, grads to None, one
    capture of forward + loss + backward + SGD, the weights put back, then per step the
    batch copied into the static tensors and a replay -- the same SGD steps as gpu_mlp.
    The CUDA parts (streams, the capture) are fakes; only a GPU runs the real ones."""
    torch = pytest.importorskip("torch")
    events, graphs = [], []

    class Stream:
        def wait_stream(self, other):
            events.append("wait_stream")

    def stream(s):
        events.append("side stream")
        return contextlib.nullcontext()

    def capture(fn):
        events.append("capture")
        out = fn()
        graphs.append(_FakeGraph(fn, captured_params, out))
        return graphs[-1], out

    captured_params = []
    real_module = harness.torch_module

    def module(layers, params, device):
        m = real_module(layers, params, device)
        captured_params.extend(m.parameters())
        return m

    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    # (the cases' one side stream: a fresh one of this test's fakes)
    monkeypatch.setattr(harness, "_side_stream", functools.cache(
        harness._side_stream.__wrapped__))
    monkeypatch.setattr(torch.cuda, "stream", stream)
    monkeypatch.setattr(torch.cuda, "current_stream", Stream)
    monkeypatch.setattr(harness, "_capture", capture)
    monkeypatch.setattr(harness, "torch_module", module)
    params, X, Y = harness.problem(point, "float64")
    theirs = harness._torch_graph_case(harness.Task("cpu", "torch.graph", None, point),
                                       params, X, Y)
    assert events == ["wait_stream", "side stream", "wait_stream", "capture"]
    assert all(p.grad is not None for p in captured_params)  # backward ran in the capture
    # the warm-up and the capture moved the weights; they are back at the common start
    for (W0, b0), (W, b) in zip(params, theirs.weights()):
        np.testing.assert_array_equal(W, W0)
        np.testing.assert_array_equal(b, b0)
    ours = harness.build(harness.Task("cpu", "gpu_mlp", "output", point), "float64")
    for _ in range(2):
        loss_ours, loss_theirs = float(ours.step()), theirs.step().item()
        np.testing.assert_allclose(loss_ours, loss_theirs, rtol=1e-12)
    assert graphs[0].replays == 2 and theirs.memory is None and theirs.capture_peak is None
    _assert_same_updates(params, ours, theirs)


def _assert_same_updates(start, ours, theirs):
    """Both steps moved every parameter from ``start`` by the same update."""
    for (W0, b0), (W, b), (Wt, bt) in zip(start, ours.weights(), theirs.weights()):
        for now, now_theirs, before in ((W, Wt, W0), (b, bt, b0)):
            update = now - before
            assert np.abs(update).max() > 0
            np.testing.assert_allclose(update, now_theirs - before, rtol=1e-7,
                                       atol=1e-9 * np.abs(update).max())


def _torch_cuda():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("this PyTorch build has no CUDA")
    return torch


@pytest.mark.gpu
@pytest.mark.parametrize("point", [harness.Point(width=6, depth=3, batch=5),
                                   harness.ConvPoint(input=(2, 7, 5), channels=3, depth=3,
                                                     batch=5)], ids=str)
def test_torch_graph_takes_the_same_steps_on_cuda(point):
    """The real capture: replays of the graphed step move the weights as gpu_mlp's steps."""
    _torch_cuda()
    ours = harness.build(harness.Task("cuda", "gpu_mlp", "output", point), "float64")
    theirs = harness.build(harness.Task("cuda", "torch.graph", None, point), "float64")
    assert theirs.memory == "torch-cuda-graph" and theirs.capture_peak > 0
    start, _, _ = harness.problem(point, "float64")
    for (W0, _), (W, _) in zip(start, theirs.weights()):
        np.testing.assert_array_equal(W, W0)  # the warm-up's updates were undone
    for _ in range(3):
        loss_ours, loss_theirs = float(ours.step()), theirs.step().item()
        np.testing.assert_allclose(loss_ours, loss_theirs, rtol=1e-12)
    _assert_same_updates(start, ours, theirs)


@pytest.mark.gpu
@pytest.mark.parametrize("impl, mode", [("gpu_mlp", "output"), ("torch", None),
                                        ("torch.graph", None), ("gemm", None)])
def test_measure_records_the_gpu_busy_fraction_on_cuda(impl, mode):
    """torch.profiler's CUDA trace sees CuPy's kernels and the kernels of a graph replay."""
    _torch_cuda()
    point = harness.Point(width=256, depth=2, batch=64)
    r = harness.measure(harness.Task("cuda", impl, mode, point),
                        harness.Settings(dtype="float32", warmup=2, repeats=5, max_time=0.0))
    assert r["status"] == "ok", r["error"]
    busy = r["gpu_busy"]
    assert "error" not in busy, busy
    assert 0 < busy["fraction"] <= 1 and busy["steps"] == harness.MIN_REPEATS
    assert busy["events_per_step"] >= (2 * 3 - 1 if impl == "gemm" else 3)
    assert 0 < busy["gpu_s_per_step"] <= busy["wall_s_per_step"]
    assert r["peak_bytes"] > 0 or impl == "gemm"


def test_busy_seconds_is_the_union_of_the_device_intervals():
    assert harness.busy_seconds([]) == 0
    # two overlapping kernels (streams) count once; a gap does not count
    assert harness.busy_seconds([(10.0, 30.0), (0.0, 5.0), (20.0, 40.0), (40.0, 41.0)]) \
        == pytest.approx((5 + 31) * 1e-6)
    cuda, cpu = (SimpleNamespace(name=n) for n in ("CUDA", "CPU"))
    events = [SimpleNamespace(device_type=cuda, time_range=SimpleNamespace(start=1, end=3)),
              SimpleNamespace(device_type=cpu, time_range=SimpleNamespace(start=0, end=9))]
    assert harness.kernel_intervals(events) == [(1, 3)]  # cudaLaunchKernel & co. are CPU


def test_kernel_intervals_of_a_real_trace_keep_only_device_events():
    """torch.profiler's own events (a CPU trace here) pass through the filter: the CPU
    ops are left out; without CUDA the busy fraction says why it is missing."""
    torch = pytest.importorskip("torch")
    from torch.profiler import ProfilerActivity, profile

    x = torch.ones(32, 32)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        x @ x
    assert len(prof.events()) > 0 and all(e.time_range.end >= e.time_range.start
                                          for e in prof.events())
    if not torch.cuda.is_available():
        assert harness.kernel_intervals(prof.events()) == []
        with pytest.raises(RuntimeError, match="needs PyTorch with CUDA"):
            harness.gpu_busy(lambda: x @ x, lambda: None, 2)


def test_gpu_busy_is_device_time_over_the_window(monkeypatch):
    seen = {}

    def profiled(step, sync, steps):
        seen["steps"] = steps
        return [(0.0, 100.0), (150.0, 250.0)], 400e-6  # 200 us busy in a 400 us window

    monkeypatch.setattr(harness, "_profile_steps", profiled)
    busy = harness.gpu_busy(lambda: None, lambda: None, 4)
    assert busy == pytest.approx({"fraction": 0.5, "gpu_s_per_step": 50e-6,
                                  "wall_s_per_step": 100e-6, "events_per_step": 0.5,
                                  "steps": 4})
    monkeypatch.setattr(harness, "_profile_steps", lambda step, sync, steps: ([], 1.0))
    assert harness.gpu_busy(lambda: None, lambda: None, 4)["error"].startswith("no device")


def test_measure_records_the_gpu_busy_fraction_of_a_cuda_task(monkeypatch):
    """The CUDA path of measure with the GPU mocked: a CPU step stands in for the case,
    the profiler for a trace; a profiler failure leaves the timing standing."""
    calls = []
    case = harness.Case(step=lambda: calls.append("step"), sync=lambda: None, memory=None)
    monkeypatch.setattr(harness, "build", lambda task, dtype: case)
    monkeypatch.setattr(harness, "_release", lambda device: None)
    monkeypatch.setattr(harness, "_profile_steps",
                        lambda step, sync, steps: ([(0.0, 30.0)] * steps, 100e-6 * steps))
    settings = harness.Settings(dtype="float64", warmup=0, repeats=50, max_time=0.0)
    r = harness.measure(harness.Task("cuda", "torch.graph", None, TINY), settings)
    assert r["status"] == "ok", r["error"]
    assert r["gpu_busy"]["steps"] == harness.BUSY_STEPS  # min(repeats, BUSY_STEPS)
    assert r["gpu_busy"]["fraction"] == pytest.approx(0.3 / harness.BUSY_STEPS)

    def broken(step, sync, steps):
        raise RuntimeError("CUPTI_ERROR_NOT_INITIALIZED\ndetails")

    monkeypatch.setattr(harness, "_profile_steps", broken)
    r = harness.measure(harness.Task("cuda", "gpu_mlp", "output", TINY), SETTINGS)
    assert r["status"] == "ok" and r["time_s"]["repeats"] == harness.MIN_REPEATS
    assert r["gpu_busy"] == {"error": "RuntimeError: CUPTI_ERROR_NOT_INITIALIZED",
                             "steps": harness.MIN_REPEATS}
    cpu = harness.measure(harness.Task("cpu", "gemm", None, TINY), SETTINGS)
    assert cpu["gpu_busy"] is None  # nothing to profile on the CPU


@pytest.mark.parametrize("repeats, max_time, expected", [
    (3, 10.0, harness.MIN_REPEATS),     # never fewer than MIN_REPEATS
    (50, 0.0, harness.MIN_REPEATS),     # max_time reached at once
    (7, 1e9, 7),                        # repeats reached first
])
def test_time_steps_counts(repeats, max_time, expected):
    calls = {"step": 0, "sync": 0}

    def step():
        calls["step"] += 1

    def sync():
        calls["sync"] += 1

    times, warmup_seconds = harness.time_steps(step, sync, warmup=2, repeats=repeats,
                                               max_time=max_time)
    assert len(times) == expected
    assert calls == {"step": 2 + expected, "sync": 1 + expected}  # a sync inside every timing
    assert all(t >= 0 for t in times) and warmup_seconds >= 0


@pytest.mark.parametrize("point", [harness.Point(width=6, depth=3, batch=5),
                                   harness.ConvPoint(input=(2, 7, 5), channels=3, depth=3,
                                                     batch=5)], ids=str)
def test_torch_and_gpu_mlp_take_the_same_step(device, point):
    """The comparison is fair only if both compute the same step from the same start."""
    torch = pytest.importorskip("torch")
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("this PyTorch build has no CUDA")
    ours = harness.build(harness.Task(device, "gpu_mlp", "output", point), "float64")
    theirs = harness.build(harness.Task(device, "torch", None, point), "float64")
    for _ in range(2):
        loss_ours, loss_theirs = float(ours.step()), theirs.step().item()
        np.testing.assert_allclose(loss_ours, loss_theirs, rtol=1e-12)
    start, _, _ = harness.problem(point, "float64")
    for (W0, b0), (W, b), (Wt, bt) in zip(start, ours.weights(), theirs.weights()):
        for now, now_theirs, before in ((W, Wt, W0), (b, bt, b0)):
            update = now - before
            assert np.abs(update).max() > 0  # the weights moved, by the same SGD updates
            np.testing.assert_allclose(update, now_theirs - before, rtol=1e-7,
                                       atol=1e-9 * np.abs(update).max())


# (the point; per convolution after the first, how many of its forward and C^dagger run
# shifted)
@pytest.mark.parametrize("point, shifted_ways", [
    (harness.Point(width=6, depth=3, batch=5), []),
    (harness.ConvPoint(input=(2, 6, 6), channels=3, depth=3, batch=5), [2, 1]),
    # sums long enough to be formed transposed on NumPy (ops.sums_transposed): the weight
    # gradients of both convolutions, not the head's
    (harness.ConvPoint(input=(1, 8, 8), channels=2, depth=2, batch=256), [2])], ids=str)
def test_gemm_bound_runs_exactly_the_engines_gemms(monkeypatch, point, shifted_ways):
    # (no columns kept: the shifted paths run where the grid says)
    monkeypatch.setattr(ops, "keeps_columns", lambda *args: False)
    calls = []
    real_gemm = ops.gemm

    def as_blas_runs_it(trans, x):  # an F-ordered operand is its transpose, flipped
        if x.flags.f_contiguous and not x.flags.c_contiguous:
            return "T" if trans == "N" else "N", x.shape[::-1]
        return trans, x.shape

    def recording_gemm(transa, transb, a, b, out, alpha=1.0, beta=0.0):
        (ta, a_shape), (tb, b_shape) = as_blas_runs_it(transa, a), as_blas_runs_it(transb, b)
        calls.append((ta, tb, a_shape, b_shape, out.shape, beta))
        return real_gemm(transa, transb, a, b, out, alpha=alpha, beta=beta)

    monkeypatch.setattr(ops, "gemm", recording_gemm)
    seen = {}
    for impl, mode in (("gemm", None), ("gpu_mlp", "output")):
        calls.clear()
        harness.build(harness.Task("cpu", impl, mode, point), "float64").step()
        seen[impl] = sorted(calls)
    # the engine may run a product in blocks of rows (a convolution's input gradient, in
    # cache-sized blocks of samples): the same GEMM, its rows summed over the blocks; and
    # a convolution's weight gradient into a buffer (beta 0) that the update then adds
    # to W permuted (ops.weight_gradient), where the bound's GEMM adds (beta 1)
    def shapes(calls):
        return [call[:5] + (None,) for call in calls]
    assert _rows_merged(shapes(seen["gemm"])) == _rows_merged(shapes(seen["gpu_mlp"]))
    # 3 GEMMs a layer, no input gradient for layer 1; on the CPU a convolution may run
    # its forward and input gradient as one GEMM per kernel offset over the cells of its
    # phase planes' grid (conv.shifted_taps), which include cells that are no output
    rows, fan_in, d_out = point.gemm_shapes()[0]
    want_gemms = 3 * len(point.layers()) - 1
    want_flops = point.flops - 2 * rows * fan_in * d_out
    shape, shifted = point.input_shape, []
    for k, (layer, (m, K, d)) in enumerate(zip(point.layers(), point.gemm_shapes())):
        if k > 0 and isinstance(layer, Conv2d):
            maps = np.empty((point.batch, *shape[1:], shape[0]))
            taps = conv.shifted_taps(layer, shape)
            n = point.batch * math.prod(taps.grid) - taps.reach
            ws = Workspace(np, np.float64)
            ways = (layer.engine.shifted(maps, ws, layers.SHIFTED_FORWARD_MAX)
                    + layer.engine.shifted(maps, ws, layers.SHIFTED_ADJOINT_MAX))
            want_gemms += ways * (len(taps.taps) - 1)
            want_flops += ways * (2 * n * layer.c_in * d * len(taps.taps) - 2 * m * K * d)
            shifted.append(ways)
        shape = layer.output_shape(shape)
    assert shifted == shifted_ways
    # a convolution's weight gradient of long sums is formed transposed, (K, d) -- the
    # entrance's from its transposed columns too -- the others as (d, K)
    outs = {call[4] for call in seen["gpu_mlp"]}
    for m, K, d in point.gemm_shapes() if point.model == "conv" else ():
        long_sums = m >= ops.SUMS_TRANSPOSED_ROWS
        assert ((K, d) in outs, (d, K) in outs) == (long_sums, not long_sums), (m, K, d)
    assert len(seen["gemm"]) == want_gemms
    flops = sum(2 * out[0] * out[1] * (a[0] if ta == "T" else a[1])
                for ta, _, a, _, out, _ in seen["gemm"])
    assert flops == want_flops


@pytest.mark.parametrize("point", [TINY, TINY_CONV], ids=str)
@pytest.mark.parametrize("impl, mode", [("gpu_mlp", m) for m in gpu_mlp.MEMORY_MODES]
                         + [("torch", None), ("gemm", None)])
def test_measure_fills_a_record(device, impl, mode, point):
    if impl == "torch":
        torch = pytest.importorskip("torch")
        if device == "cuda" and not torch.cuda.is_available():
            pytest.skip("this PyTorch build has no CUDA")
    r = harness.measure(harness.Task(device, impl, mode, point), SETTINGS)
    assert r["status"] == "ok", r["error"]
    assert {k: r[k] for k in point.fields()} == point.fields()
    assert r["flops"] == point.flops
    t = r["time_s"]
    assert t["repeats"] == harness.MIN_REPEATS and t["q1"] <= t["median"] <= t["q3"]
    assert r["tflops"] == pytest.approx(point.flops / t["median"] / 1e12)
    if impl == "gpu_mlp":
        params, X, Y = harness.problem(point, "float64")
        params_and_data = sum(a.nbytes for pair in params for a in pair) + X.nbytes + Y.nbytes
        assert r["peak_bytes"] > params_and_data
        assert 0 < r["workspace_peak_bytes"] < r["peak_bytes"]
    elif impl == "torch" and device == "cuda":
        assert r["peak_bytes"] > 0
    else:
        assert r["peak_bytes"] is None  # torch-cpu: not measurable; gemm: not meaningful


def test_a_failing_implementation_becomes_an_error_record(monkeypatch):
    def broken(task, dtype):
        raise RuntimeError("no compiler\nsecond line")

    monkeypatch.setattr(harness, "build", broken)
    r = harness.measure(harness.Task("cpu", "torch.compile", None, TINY), SETTINGS)
    assert r["status"] == "error"
    assert r["error"] == "RuntimeError: no compiler"
    assert r["time_s"] is None


def _record(impl, median, peak=None, mode=None, status="ok", width=8, conv=None,
            device="cpu", busy=None):
    """A record as measure writes it; ``conv``: the input shape of a conv record (else
    an MLP record written before the conv grid, without ``model`` and ``input``);
    ``busy``: its GPU busy fraction (a CUDA record; a string: the profiler's error)."""
    point = {} if conv is None else {"model": "conv", "input": list(conv)}
    gpu_busy = (None if busy is None else {"error": busy, "steps": 5} if isinstance(busy, str)
                else {"fraction": busy, "gpu_s_per_step": busy * median,
                      "wall_s_per_step": median, "events_per_step": 12.0, "steps": 5})
    return {"device": device, "impl": impl, "mode": mode,
            "label": harness.label(device, impl, mode), "gpu_busy": gpu_busy,
            **point, "width": width, "depth": 2, "batch": 4, "flops": 10**9, "status": status,
            "error": None if status == "ok" else "RuntimeError: boom",
            "time_s": {"median": median, "iqr": 0.0} if status == "ok" else None,
            "tflops": 1e-3 / median if status == "ok" else None, "peak_bytes": peak,
            "ratio_to_torch": None, "ratio_to_gemm_bound": None,
            "memory_ratio_to_torch": None}


def test_ratios_are_against_torch_eager_and_the_gemm_bound_at_the_same_point():
    records = [_record("torch", 4.0, peak=1000), _record("gemm", 1.0),
               _record("gpu_mlp", 2.0, peak=500, mode="output"),
               _record("torch.compile", 3.0, status="error"),
               _record("gpu_mlp", 5.0, peak=800, mode="output", width=16)]  # no torch there
    harness.add_ratios(records)
    torch_r, gemm_r, ours, failed, alone = records
    assert (torch_r["ratio_to_torch"], torch_r["ratio_to_gemm_bound"]) == (1.0, 4.0)
    assert (ours["ratio_to_torch"], ours["ratio_to_gemm_bound"]) == (0.5, 2.0)
    assert ours["memory_ratio_to_torch"] == 0.5
    assert gemm_r["memory_ratio_to_torch"] is None
    assert failed["ratio_to_torch"] is None
    assert (alone["ratio_to_torch"], alone["ratio_to_gemm_bound"]) == (None, None)


def test_conv_ratios_table_and_summary():
    conv = (1, 6, 6)
    records = [_record("torch", 4.0, conv=conv), _record("gemm", 1.0, conv=conv),
               _record("gpu_mlp", 2.0, peak=500, mode="output", conv=conv),
               _record("gpu_mlp", 8.0, peak=500, mode="output", conv=(3, 6, 6)),
               _record("torch", 1.0)]  # an MLP point of the same width: not the baseline
    harness.add_ratios(records)
    ours, other_input = records[2], records[3]
    assert (ours["ratio_to_torch"], ours["ratio_to_gemm_bound"]) == (0.5, 2.0)
    assert (other_input["ratio_to_torch"], other_input["ratio_to_gemm_bound"]) == (None, None)
    header, _, *rows = report.format_table(records[:3]).splitlines()
    assert header.split()[:7] == ["device", "model", "input", "channels", "depth", "batch",
                                  "implementation"]
    assert rows[0].split()[:7] == ["cpu", "conv", "1x6x6", "8", "2", "4",
                                   "gpu_mlp-numpy[output]"]
    assert report.summary(records[:3]) == [
        "gpu_mlp-numpy[output] (conv): faster than torch eager at 1/1 points; worst ratio "
        "0.50 at 1x6x6-c8-d2-B4",
        "gpu_mlp-numpy[output] (conv): ratio to the GEMM-only bound from 2.00 at "
        "1x6x6-c8-d2-B4 to 2.00 at 1x6x6-c8-d2-B4"]


def test_table_aligns_rows_and_shows_errors():
    records = [_record("torch", 4e-3, peak=2**20), _record("gemm", 1e-3),
               _record("torch.compile", 0, status="error")]
    harness.add_ratios(records)
    lines = report.format_table(records).splitlines()
    header, rule, torch_row, compiled_row, gemm_row = lines
    assert header.split()[:5] == ["device", "width", "depth", "batch", "implementation"]
    assert len(torch_row) == len(rule)  # every column filled and right-aligned
    assert torch_row.split()[4:] == ["torch-cpu", "4", "0", "0.25", "1.00", "4.00", "1",
                                     "1.00"]
    assert compiled_row.endswith("error: RuntimeError: boom")
    assert gemm_row.split()[4:6] == ["gemm-bound-numpy", "1"]


def test_report_renders_torch_graph_rows_and_busy_fractions(tmp_path):
    """A synthetic CUDA results.json with torch.graph rows and GPU busy fractions, as a
    GPU run writes it, through the JSON and into the table, the summary and report.md."""
    conv = (1, 6, 6)
    records = [_record("torch", 4e-3, peak=2**20, device="cuda", busy=0.25),
               _record("torch.graph", 2e-3, peak=2**20, device="cuda", busy=0.9),
               _record("gpu_mlp", 1e-3, peak=2**19, mode="output", device="cuda", busy=0.5),
               _record("gpu_mlp", 6e-3, peak=2**19, mode="output", device="cuda",
                       busy="RuntimeError: CUPTI", width=16),
               _record("torch.graph", 3e-3, device="cuda", width=16, busy=0.75),
               _record("gemm", 5e-4, device="cuda", busy=0.95),
               _record("torch.graph", 8e-3, device="cuda", conv=conv, status="error"),
               _record("gpu_mlp", 4e-3, mode="output", device="cuda", conv=conv, busy=0.3)]
    harness.add_ratios(records)
    ours, ours16, graph16 = records[2], records[3], records[4]
    assert ours["ratio_to_torch_graph"] == 0.5 and ours16["ratio_to_torch_graph"] == 2.0
    assert graph16["ratio_to_torch_graph"] == 1.0 and records[-1]["ratio_to_torch_graph"] is None
    config = {"grid": "mlp", "network": harness.NETWORK, "flops": harness.FLOPS,
              "timing": "perf_counter", "repeats": 5, "max_time_s": 0.0, "warmup": 1,
              "min_repeats": 5, "memory": "peak", "dtype": "float32", "tf32": False,
              "threads": 1, "gpu_busy": "torch.profiler, ProfilerActivity.CUDA",
              "skipped": {}}
    env = {"command": "python bench/run.py --devices cuda", "cwd": ".", "cpu": "cpu",
           "logical_cpus": 1, "platform": "linux", "python": "3.12",
           "versions": {"gpu_mlp": "0", "torch": "2.11"},
           "gpu": {"name": "H200", "compute_capability": "90", "memory_bytes": 2**37,
                   "driver": "580", "cuda_driver_api": 13000, "cuda_runtime": 13000,
                   "cublas_math_mode": 0}}
    report.write_json(tmp_path / "results.json", report.document(config, env, records))
    doc = json.loads((tmp_path / "results.json").read_text())
    table = report.format_table(doc["records"])
    header, rule, *rows = table.splitlines()
    assert header.endswith("mem vs torch  vs graph  GPU busy")  # the last two columns
    # device, model, input, width/ch, depth, batch, implementation, ..., vs graph, GPU busy
    mlp8 = [r.split() for r in rows if r.split()[1:6] == ["mlp", "8", "8", "2", "4"]]
    assert {r[6]: r[-2:] for r in mlp8} == {
        "torch-cuda": ["2.00", "25%"], "torch.graph-cuda": ["1.00", "90%"],
        "gpu_mlp-cupy[output]": ["0.50", "50%"], "gemm-bound-cupy": ["0.25", "95%"]}
    [row16] = [r.split() for r in rows if "gpu_mlp" in r and r.split()[3] == "16"]
    assert row16[-2:] == ["2.00", "-"]  # busy not measured: a dash
    assert any(r.endswith("error: RuntimeError: boom") and "torch.graph" in r for r in rows)
    lines = report.summary(doc["records"])
    assert ("gpu_mlp-cupy[output]: faster than torch.graph at 1/2 points; time / "
            "torch.graph's: w8-d2-B4 0.50, w16-d2-B4 2.00") in lines
    assert "torch.graph-cuda: GPU busy 75%-90% (median 82%) over 2 points" in lines
    assert "gpu_mlp-cupy[output] (conv): GPU busy 30%-30% (median 30%) over 1 points" in lines
    assert "gpu_mlp-cupy[output]: GPU busy not measured: RuntimeError: CUPTI" in lines
    markdown = report.markdown(doc)
    assert table in markdown and "- GPU busy: torch.profiler, ProfilerActivity.CUDA" in markdown
    assert all(f"- {line}" in markdown for line in lines)
    assert "vs graph: to torch.graph" in markdown


def test_report_lists_what_a_cpu_run_skipped():
    doc = {"config": {"grid": "mlp", "network": "n", "flops": "f", "timing": "t",
                      "repeats": 5, "max_time_s": 0.0, "warmup": 1, "min_repeats": 5,
                      "memory": "m", "dtype": "float32", "tf32": False, "threads": 1,
                      "gpu_busy": "profiler",
                      "skipped": harness.skipped(["cpu"], ["torch.graph", "gpu_mlp"])},
           "environment": {"command": "c", "cwd": ".", "cpu": "cpu", "logical_cpus": 1,
                           "platform": "linux", "python": "3.12", "versions": {}},
           "records": [_record("gpu_mlp", 1e-3, mode="output")]}
    markdown = report.markdown(doc)
    assert "- skipped: torch.graph-cpu (CUDA graphs need a CUDA device)" in markdown
    assert "GPU busy" not in markdown and "vs graph " not in report.format_table(doc["records"])


def test_summary_reports_the_targets_as_measured():
    records = [_record("torch", 4.0, peak=1000), _record("gemm", 1.0),
               _record("gpu_mlp", 2.0, peak=500, mode="output")]
    harness.add_ratios(records)
    assert report.summary(records) == [
        "gpu_mlp-numpy[output]: faster than torch eager at 1/1 points; worst ratio 0.50 at "
        "w8-d2-B4",
        "gpu_mlp-numpy[output]: peak memory below torch's at 1/1 points (largest ratio 0.50)"]


# runs a script as `python script args` does, with `import matplotlib` failing
WITHOUT_MATPLOTLIB = ("import runpy, sys; sys.modules['matplotlib'] = None; "
                      "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")


def _run_cli(out, *extra, matplotlib=True):
    """``(stdout, stderr, results.json)`` of a bench/run.py run on tiny sizes."""
    python = [sys.executable] + ([] if matplotlib else ["-c", WITHOUT_MATPLOTLIB])
    cmd = [*python, str(ROOT / "bench" / "run.py"), "--devices", "cpu",
           "--depths", "2", "--batches", "4", "--warmup", "1", "--repeats", "5",
           "--max-time", "0", "--threads", "1", "--dtype", "float64", "--settle", "0",
           "--out", str(out), *extra]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    return done.stdout, done.stderr, json.loads((out / "results.json").read_text())


def test_cli_writes_table_json_and_report_and_resumes(tmp_path):
    pytest.importorskip("torch", reason="the table's ratios are to PyTorch on the CPU")
    stdout, _, doc = _run_cli(tmp_path, "--widths", "8", "--no-plot")
    assert doc["schema"] == harness.SCHEMA
    assert set(doc) == {"schema", "config", "environment", "records"}
    env, config = doc["environment"], doc["config"]
    assert env["threads"]["OPENBLAS_NUM_THREADS"] == "1" and env["threads"]["torch"] == 1
    assert "bench/run.py" in env["command"] and "--widths 8" in env["command"]
    assert {"numpy", "scipy", "torch", "cupy", "gpu_mlp"} <= set(env["versions"])
    assert (config["dtype"], config["tf32"], config["widths"]) == ("float64", False, [8])
    assert config["network"] == harness.NETWORK and config["flops"] == harness.FLOPS

    labels = ["torch-cpu", "gemm-bound-numpy"] + [f"gpu_mlp-numpy[{m}]"
                                                  for m in gpu_mlp.MEMORY_MODES]
    records = {r["label"]: r for r in doc["records"]}
    assert sorted(records) == sorted(labels)
    assert all(r["status"] == "ok" for r in records.values())
    assert records["torch-cpu"]["ratio_to_torch"] == 1.0
    assert records["gemm-bound-numpy"]["ratio_to_gemm_bound"] == 1.0
    for mode in gpu_mlp.MEMORY_MODES:
        r = records[f"gpu_mlp-numpy[{mode}]"]
        assert r["ratio_to_torch"] == pytest.approx(
            r["time_s"]["median"] / records["torch-cpu"]["time_s"]["median"])
        assert r["ratio_to_gemm_bound"] > 0 and r["peak_bytes"] > 0

    table = report.format_table(doc["records"])
    assert table in stdout and all(label in table for label in labels)
    markdown = (tmp_path / "report.md").read_text()
    assert table in markdown and env["command"] in markdown
    assert "results.png" not in markdown and not (tmp_path / "results.png").exists()

    # --resume keeps what was measured and measures only what is missing
    _, _, resumed = _run_cli(tmp_path, "--widths", "8,16", "--impls", "gemm", "--resume",
                             "--no-plot")
    assert resumed["records"][:len(doc["records"])] == doc["records"]
    [new] = resumed["records"][len(doc["records"]):]
    assert (new["label"], new["width"], new["status"]) == ("gemm-bound-numpy", 16, "ok")
    assert new["ratio_to_torch"] is None  # no torch measurement at width 16
    assert resumed["environment"]["previous_commands"] == [env["command"]]
    assert resumed["environment"]["gpu_mlp_source"]["sha256_of_measured_sources"]


def test_rounds_alternate_the_order_and_report_the_median_of_round_medians(monkeypatch):
    """bench/run.py --rounds: a point's cases measured in ABBA order -- none always
    first, or always right after one other library, whose idle threads slow the next
    case -- each the median of its rounds' medians; a failed round is the record."""
    point = harness.Point(width=8, depth=2, batch=4)
    tasks = [harness.Task("cpu", impl, None, point) for impl in ("torch", "gemm")]
    order, medians = [], iter([3.0, 5.0, 7.0, 1.0, 2.0, 4.0])

    def fake_measure(task, settings):
        order.append(task.impl)
        return {"status": "ok", "flops": 10, "impl": task.impl,
                "time_s": {"median": next(medians), "repeats": 5}}

    monkeypatch.setattr(harness, "measure", fake_measure)
    seen = []
    torch_record, gemm_record = harness.measure_rounds(
        tasks, SETTINGS, 3, lambda task, r: seen.append((task.impl, r)))
    assert order == ["torch", "gemm", "gemm", "torch", "torch", "gemm"]
    assert seen == [(impl, r) for impl, r in zip(order, (0, 0, 1, 1, 2, 2))]
    # torch measured 3, 1, 2; gemm 5, 7, 4: in task order, each its median round
    assert torch_record["time_s"]["round_medians"] == [3.0, 1.0, 2.0]
    assert (torch_record["time_s"]["median"], torch_record["time_s"]["min"]) == (2.0, 1.0)
    assert gemm_record["time_s"]["median"] == 5.0 and gemm_record["time_s"]["repeats"] == 15
    assert gemm_record["tflops"] == 10 / 5.0 / 1e12
    failed = {"status": "error", "error": "RuntimeError: no"}
    assert harness.merge_rounds([torch_record, failed]) is failed


def test_a_cpu_case_sleeps_before_its_warm_up_so_other_threads_stop_spinning(monkeypatch):
    point = harness.Point(width=8, depth=2, batch=4)
    events = []
    monkeypatch.setattr(harness.time, "sleep", lambda s: events.append(("sleep", s)))
    real_time_steps = harness.time_steps
    monkeypatch.setattr(harness, "time_steps", lambda *a: events.append("timed")
                        or real_time_steps(*a))
    settled = dataclasses.replace(SETTINGS, settle=harness.CPU_SETTLE_S)
    assert harness.measure(harness.Task("cpu", "gemm", None, point), settled)["status"] == "ok"
    assert events == [("sleep", harness.CPU_SETTLE_S), "timed"]
    events.clear()
    harness.measure(harness.Task("cpu", "gemm", None, point), SETTINGS)  # settle 0
    assert events == ["timed"]


def test_cli_resumes_only_records_measured_on_the_same_footing(tmp_path):
    """--resume puts the old records beside new ones as one run's: other thread counts
    (or another machine, library version, gpu_mlp source) would compare unlike with
    unlike. Refused, naming the difference, nothing written."""
    _, _, doc = _run_cli(tmp_path, "--widths", "8", "--impls", "gemm", "--no-plot")
    before = (tmp_path / "results.json").read_text()
    cmd = [sys.executable, str(ROOT / "bench" / "run.py"), "--devices", "cpu", "--depths",
           "2", "--batches", "4", "--widths", "8,16", "--impls", "gemm", "--threads", "2",
           "--dtype", "float64", "--max-time", "0", "--settle", "0", "--out", str(tmp_path),
           "--resume", "--no-plot"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "was measured with threads 1 (now 2); not resuming" in done.stderr
    assert (tmp_path / "results.json").read_text() == before


def test_cli_refuses_an_out_that_is_a_file_before_measuring(tmp_path):
    taken = tmp_path / "results"
    taken.write_text("not a folder")
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "run.py"), "--devices", "cpu",
                           "--widths", "8", "--impls", "gemm", "--out", str(taken)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert f"--out {taken} cannot be the output folder" in done.stderr
    assert taken.read_text() == "not a folder"


def test_cli_writes_the_plot(tmp_path):
    pytest.importorskip("matplotlib", reason="the plot needs matplotlib")
    _run_cli(tmp_path, "--widths", "8", "--impls", "gemm")
    assert "results.png" in (tmp_path / "report.md").read_text()
    assert (tmp_path / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_without_matplotlib_writes_all_but_the_plot(tmp_path):
    stdout, stderr, doc = _run_cli(tmp_path, "--widths", "8", "--impls", "gemm",
                                   matplotlib=False)
    # said once, before the progress bar of the measurements
    note = "skipping the plot (results.png): plotting needs matplotlib"
    first = next(line for line in stderr.splitlines()
                 if "forces OpenBLAS's kernels" not in line)  # (where the machine forces them)
    assert first.startswith(note) and stderr.count(note) == 1
    assert report.format_table(doc["records"]) in stdout
    assert "results.png" not in (tmp_path / "report.md").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.md", "results.json"]


def test_cli_conv_grid_writes_records_without_torch_or_matplotlib(tmp_path):
    """A tiny conv point through the CLI, gpu_mlp and the GEMM bound only: needs neither
    PyTorch nor matplotlib; a column budget of a sample's columns runs it in blocks."""
    stdout, _, doc = _run_cli(tmp_path, "--grid", "conv", "--inputs", "2x6x6",
                              "--channels", "3", "--impls", "gpu_mlp,gemm",
                              "--column-budget", "0.001", matplotlib=False)
    config = doc["config"]
    assert (config["grid"], config["inputs"], config["channels"], config["widths"]) == (
        "conv", [[2, 6, 6]], [3], None)
    assert config["column_budget_bytes"] == int(0.001 * 2**20)
    assert (config["network"], config["flops"]) == (harness.CONV_NETWORK, harness.CONV_FLOPS)
    records = {r["label"]: r for r in doc["records"]}
    assert sorted(records) == sorted(["gemm-bound-numpy"] + [f"gpu_mlp-numpy[{m}]"
                                                             for m in gpu_mlp.MEMORY_MODES])
    for r in records.values():
        assert r["status"] == "ok", r["error"]
        assert {k: r[k] for k in TINY_CONV.fields()} == TINY_CONV.fields()
        assert r["flops"] == TINY_CONV.flops and r["ratio_to_torch"] is None
    for mode in gpu_mlp.MEMORY_MODES:
        r = records[f"gpu_mlp-numpy[{mode}]"]
        assert r["ratio_to_gemm_bound"] > 0 and r["peak_bytes"] > 0
    table = report.format_table(doc["records"])
    assert table in stdout and "2x6x6" in table
    markdown = (tmp_path / "report.md").read_text()
    assert markdown.startswith("# gpu_mlp vs PyTorch: one conv training step")
    assert table in markdown and harness.CONV_NETWORK in markdown


def test_cli_conv_grid_against_torch(tmp_path):
    pytest.importorskip("torch", reason="the ratios are to PyTorch on the CPU")
    _, _, doc = _run_cli(tmp_path, "--grid", "conv", "--inputs", "2x6x6", "--channels", "3",
                         "--impls", "torch,gpu_mlp", "--modes", "output", "--no-plot")
    records = {r["label"]: r for r in doc["records"]}
    assert sorted(records) == ["gpu_mlp-numpy[output]", "torch-cpu"]
    ours, theirs = records["gpu_mlp-numpy[output]"], records["torch-cpu"]
    assert all(r["status"] == "ok" for r in (ours, theirs)), (ours["error"], theirs["error"])
    assert ours["ratio_to_torch"] == pytest.approx(
        ours["time_s"]["median"] / theirs["time_s"]["median"])
    assert set(doc["environment"]["torch_conv"]) == {"cudnn_allow_tf32", "cudnn_benchmark",
                                                     "mkldnn"}


def test_cli_grid_options():
    args = run.parse_args(["--grid", "conv", "--quick"])
    assert (args.inputs, args.channels, args.depths, args.batches) == (
        run.CONV_QUICK["inputs"], run.CONV_QUICK["channels"], run.CONV_QUICK["depths"],
        run.CONV_QUICK["batches"])
    assert args.widths is None
    assert run.default_out(args, ["cpu"]) == ROOT / "bench/results/cpu-float32-conv-quick"
    args = run.parse_args(["--grid", "conv", "--inputs", "1x28x28,3X32x32"])
    assert args.inputs == [(1, 28, 28), (3, 32, 32)]
    assert args.channels == run.CONV_FULL["channels"]
    assert run.default_out(run.parse_args([]), ["cuda"]) == ROOT / "bench/results/cuda-float32"
    assert (args.rounds, args.settle) == (1, harness.CPU_SETTLE_S)  # the defaults
    args = run.parse_args(["--rounds", "3", "--settle", "0"])
    assert (args.rounds, args.settle) == (3, 0.0)
    for bad in (["--grid", "conv", "--widths", "8"], ["--channels", "8"],
                ["--grid", "conv", "--inputs", "28x28"], ["--column-budget", "0"],
                ["--column-budget", "nan"], ["--column-budget", "inf"], ["--rounds", "0"],
                ["--rounds", "two"], ["--settle", "-1"], ["--settle", "nan"],
                ["--settle", "inf"]):
        with pytest.raises(SystemExit):
            run.parse_args(bad)


def test_resume_needs_the_same_footing(tmp_path):
    """Settings, machine, libraries and gpu_mlp sources: records measured otherwise are
    not put beside new ones as one run's."""
    path = tmp_path / "results.json"
    config = {"dtype": "float32", "tf32": False, "column_budget_bytes": 16 << 20,
              "threads": 1}  # an MLP run: no grid recorded
    env = {"command": "bench/run.py", "cpu": "x86", "versions": {"torch": "2.13.0"},
           "gpu_mlp_source": {"sha256_of_measured_sources": "a"}}
    path.write_text(json.dumps({"config": config, "environment": env, "records": []}))
    now = run.footing(config, env)
    assert now["grid"] == "mlp" and now["gpu"] is None
    assert run.previous_run(path, now) == ([], ["bench/run.py"])
    for key, value in [("grid", "conv"), ("column budget", 32 << 20), ("threads", 2),
                       ("cpu", "arm"), ("gpu", "NVIDIA H200"), ("sources", "b"),
                       ("versions", {"torch": "2.14.0"})]:
        with pytest.raises(SystemExit, match=f"{key} .* \\(now .*\\); not resuming"):
            run.previous_run(path, {**now, key: value})


def test_cli_refuses_to_resume_with_other_settings(tmp_path):
    (tmp_path / "results.json").write_text(json.dumps(
        {"config": {"dtype": "float32", "tf32": False}, "records": []}))
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "run.py"), "--devices", "cpu",
                           "--dtype", "float64", "--out", str(tmp_path), "--resume"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 1
    assert "not resuming" in done.stderr


def test_the_environment_names_no_path_of_the_machine(monkeypatch, tmp_path):
    """Results are committed: the command, the folder it ran in and the output folder are
    recorded relative to the repository, the interpreter by its name."""
    monkeypatch.chdir(ROOT / "bench")
    monkeypatch.setattr(sys, "orig_argv", [
        sys.executable, "-X", "utf8", str(ROOT / "bench" / "run.py"), "--widths", "8",
        "--out", str(ROOT / "bench" / "results" / "x"), f"--log={ROOT / 'a b.log'}",
        "--cache", str(tmp_path / "cache"), "results/y"])
    env = harness.environment(["cpu"], 1, False, out=ROOT / "bench" / "results" / "x")
    python = Path(sys.executable).name
    assert env["command"] == (f"{python} -X utf8 bench/run.py --widths 8 --out "
                              f"bench/results/x '--log=a b.log' --cache cache results/y")
    assert (env["cwd"], env["out"]) == ("bench", "bench/results/x")
    assert str(ROOT) not in json.dumps(env) and str(tmp_path) not in json.dumps(env)
    monkeypatch.chdir(ROOT)
    assert harness.environment(["cpu"], 1, False)["cwd"] == "."
    monkeypatch.chdir(tmp_path)
    assert harness.environment(["cpu"], 1, False)["cwd"] == "outside the repository"


def test_the_environment_says_which_blas_kernels_ran_and_what_forced_them(monkeypatch,
                                                                          capsys):
    """A machine may force OpenBLAS's kernels (OPENBLAS_CORETYPE): the numbers are then
    not those of a user's NumPy, so the record, the report and stderr say so."""
    import bench

    monkeypatch.setenv("OPENBLAS_CORETYPE", "Haswell")
    monkeypatch.delenv("OPENBLAS_L2_SIZE", raising=False)
    blas = harness.environment(["cpu"], 1, False)["blas"]
    assert blas["forced_by"] == {"OPENBLAS_CORETYPE": "Haswell", "OPENBLAS_L2_SIZE": None}
    line = harness.describe_blas(blas)
    assert line.endswith("; forced by OPENBLAS_CORETYPE=Haswell")
    if blas["libraries"] is not None:  # threadpoolctl: NumPy's BLAS is loaded, by name
        assert blas["libraries"] and all(lib["architecture"] in line
                                         for lib in blas["libraries"])
    bench.warn_forced_blas()
    err = capsys.readouterr().err
    assert "OPENBLAS_CORETYPE=Haswell forces OpenBLAS's kernels" in err
    assert "env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE" in err
    monkeypatch.delenv("OPENBLAS_CORETYPE")
    bench.warn_forced_blas()
    assert capsys.readouterr().err == ""
    assert harness.describe_blas(harness.blas_kernels()).endswith("; as detected")
    assert harness.describe_blas(None) == "not recorded"


def test_scaling_records_its_mpirun_lines_without_machine_paths():
    command = ["/opt/mpi/bin/mpirun", "--oversubscribe", "-n", "2", sys.executable,
               str(ROOT / "bench" / "scaling.py"), "--worker", "/tmp/tmpab12/P2.json"]
    assert harness.portable_command(command) == (
        f"mpirun --oversubscribe -n 2 {Path(sys.executable).name} bench/scaling.py "
        "--worker P2.json")


def test_rows_bench_times_both_row_paths_through_the_engines_calls(host_cupy_lib):
    """bench/rows.py's calls, on the CuPy stand-in (its kernels run on the host): every
    op on both paths, the thread-a-row kernels and the wide-row ones, at a narrow and a
    wide point; ROW_KERNEL_MAX restored. Its events are stubs: no time is asserted."""
    from bench import rows
    from host_cupy import cupy_path

    class Event:
        def record(self):
            pass

        def synchronize(self):
            pass

    captured = []

    class Stream:  # its captures run the calls (on the host), its graphs nothing
        def __init__(self, non_blocking=False):
            assert non_blocking  # (the legacy default stream cannot capture)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            pass

        def begin_capture(self):
            captured.append(1)

        def end_capture(self):
            return SimpleNamespace(launch=lambda: None)

    cuda = SimpleNamespace(Event=Event, Stream=Stream,
                           get_elapsed_time=lambda start, stop: 1.0,
                           Device=lambda: SimpleNamespace(synchronize=lambda: None))
    cp = SimpleNamespace(asarray=np.asarray, empty_like=np.empty_like, empty=np.empty,
                         cuda=cuda)
    limit = ops.ROW_KERNEL_MAX
    with cupy_path(host_cupy_lib) as device:
        records = rows.measure(cp, np.dtype(np.float32), repeat=1, batches=(3,),
                               classes=(5, 40))
    assert ops.ROW_KERNEL_MAX == limit
    assert [(r["batch"], r["classes"]) for r in records] == [(3, 5), (3, 40)]
    assert all(len(r) == 2 + 3 * len(rows.PATHS) for r in records)
    assert len(captured) == 2 * 2 * 4  # points x paths x (3 ops and the copy alone)
    launched = {name.split("<")[0] for name in device.launches}
    assert {"gm_softmax_forward", "gm_softmax_backward", "gm_softmax_xent_labels",
            "gm_wide_max", "gm_wide_exp", "gm_wide_normalize", "gm_wide_dot",
            "gm_wide_softmax_backward", "gm_wide_xent_labels"} <= launched
    if not gpu_mlp.gpu_available():
        run = subprocess.run([sys.executable, str(ROOT / "bench" / "rows.py")],
                             capture_output=True, text=True, cwd=ROOT)
        assert run.returncode == 2 and "needs CuPy and a CUDA GPU" in run.stderr
    bad = subprocess.run([sys.executable, str(ROOT / "bench" / "rows.py"), "--repeat", "0"],
                         capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 2 and "--repeat must be at least 1, got 0" in bad.stderr


def test_cold_start_bench_names_the_kernels_of_the_cached_sources(tmp_path):
    from bench import cold_start

    (tmp_path / "a.cu").write_text(
        'extern "C" __global__ void cupy_isfinite__float32_bool(const float* x, bool* y)\n'
        "{ }\n__global__ void __launch_bounds__(128) gm_wide_max(float* p) { }\n")
    (tmp_path / "b.cu").write_text("template <typename T>\n__global__ void "
                                   "gpu_mlp_bias_act_relu(long long n) { }\n")
    (tmp_path / "c.cubin").write_bytes(b"\x7fELF")
    names = cold_start.kernels_in(tmp_path)
    assert names == ["cupy_isfinite__float32_bool", "gm_wide_max", "gpu_mlp_bias_act_relu"]
    assert [n for n in names if not n.startswith(cold_start.OURS)] == \
        ["cupy_isfinite__float32_bool"]
    if not gpu_mlp.gpu_available():
        run = subprocess.run([sys.executable, str(ROOT / "bench" / "cold_start.py")],
                             capture_output=True, text=True, cwd=ROOT)
        assert run.returncode == 2 and "needs CuPy and a CUDA GPU" in run.stderr


def test_job_bench_refuses_what_the_twin_cannot_reproduce(capsys):
    from bench import job

    for options in (["--optimizer", "adam"], ["--dp-clip=1"], ["--device", "cpu"]):
        with pytest.raises(SystemExit) as exit:
            job.main(["--", *options])
        assert exit.value.code == 2
        name = options[0].split("=")[0]
        assert f"{name} is not a job option the PyTorch twin reproduces" in \
            capsys.readouterr().err
    with pytest.raises(SystemExit):
        job.main(["--rounds", "0"])
    assert "--threads and --rounds must be at least 1" in capsys.readouterr().err


@pytest.mark.parametrize("model", ["mlp", "cnn"])
def test_job_bench_runs_the_job_and_a_twin_that_learns(tmp_path, model):
    pytest.importorskip("torch", reason="the twin is PyTorch's")
    out = tmp_path / "job" / "job.json"
    options = ["--model", model, "--epochs", "3", "--channels", "4"][:6 if model == "cnn"
                                                                   else 4]
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "job.py"), "--rounds", "1",
                          "--threads", "1", "--out", str(out), "--", *options],
                         capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    result = json.loads(out.read_text())
    assert result["options"] == options and result["device"] == "cpu"
    for impl in ("gpu_mlp", "torch"):
        (record,) = result["rounds"][impl]
        assert record["train_s"] > 0 and record["wall_s"] >= record["train_s"]
        assert record["test_accuracy"] > 0.8  # both trained the digits, 3 epochs
    summary = result["summary"]
    assert summary["ratio_train_s"] == pytest.approx(  # rounded to 3 decimals
        summary["gpu_mlp"]["median_train_s"] / summary["torch"]["median_train_s"], abs=5e-4)
    assert result["source"]["commit"] is None or len(result["source"]["commit"]) == 40
    assert str(tmp_path) not in out.read_text() and str(ROOT) not in out.read_text()


def test_job_twin_starts_from_the_jobs_net(monkeypatch, capsys):
    """The twin's network holds the job's initial weights and, after steps of a
    negligible rate, predicts as the job's net does."""
    torch = pytest.importorskip("torch")
    from bench import job

    captured = {}
    real = harness.torch_module

    def keep(layers, params, device):
        captured["module"] = real(layers, params, device)
        captured["params"] = params
        return captured["module"]

    monkeypatch.setattr(harness, "torch_module", keep)
    job.twin(["--model", "cnn", "--epochs", "1", "--channels", "4", "--lr", "1e-12"], "cpu",
             1)
    assert "trained epochs 1-1 in" in capsys.readouterr().out
    from gpu_mlp import cli

    args = cli.build_parser().parse_args(["train", "--model", "cnn", "--channels", "4"])
    resumed = cli._resume(args)
    settings = cli._settings(args, resumed)
    data = cli._data(args, resumed, settings)
    net = cli._model(args, resumed, data, settings)
    for (W, b), (W2, b2) in zip(net.params, captured["params"]):
        np.testing.assert_array_equal(W, W2)
        np.testing.assert_array_equal(b, b2)
    with torch.no_grad():
        out = captured["module"](torch.as_tensor(data.X_test[:8], dtype=torch.float32))
    np.testing.assert_allclose(out.numpy(), net.predict(data.X_test[:8]), rtol=1e-4,
                               atol=1e-5)


def test_dp_step_quick_has_a_folder_of_its_own_and_keeps_what_is_given(capsys):
    """A smoke run (--quick) replaced the committed full run's results; it also
    overrode --rounds and --steps given with it, and --threads 0 ended in a traceback."""
    from bench import dp_step

    full, quick = dp_step.parse_args([]), dp_step.parse_args(["--quick", "--rounds", "3"])
    assert full.out.endswith("cpu-float32-dp") and quick.out.endswith("cpu-float32-dp-quick")
    assert (full.rounds, full.steps, quick.rounds, quick.steps) == (6, 8, 3, 5)
    for option in ("--threads", "--rounds", "--steps"):
        with pytest.raises(SystemExit):
            dp_step.parse_args([option, "0"])
        assert f"{option} must be at least 1, got 0" in capsys.readouterr().err


@pytest.mark.parametrize("options, refused", [
    (["--optim", "adam"], "--optimizer"), (["--dp-c=1"], "--dp-clip"),
    (["--dp-n", "1"], "--dp-noise"), (["--sav", "x.npz"], "--save"),
    (["--de", "cpu"], "--device")])
def test_job_bench_refuses_abbreviations_of_what_the_twin_cannot_reproduce(options, refused):
    """The job's parser takes unique prefixes: '--optim adam' trained Adam against the
    twin's plain SGD, and the ratio was printed all the same."""
    from bench import job

    with pytest.raises(ValueError, match=f"{refused} is not a job option"):
        job.check_options(options)
    job.check_options(["--epochs", "3", "--batch-size", "16", "--model", "cnn"])


def test_the_gpu_gemm_bound_is_replayed_as_a_graph(monkeypatch):
    """On a GPU gpu_mlp replays its step as a CUDA graph: the GEMM-only floor is replayed
    too (eager, its launches made it no floor at small sizes). Its host logic, with a
    CuPy of fakes: on gpu_mlp's own capture stream of the thread (its cuBLAS handle made
    before: no other handle and workspace left behind), one warm step, one captured,
    then each step one launch on the current stream; the step's arrays (its closure)
    and the handle kept alive with the replay."""
    import types

    from gpu_mlp import graph as graph_module

    events = []

    class Stream:
        def __enter__(self):
            events.append("enter")

        def __exit__(self, *exc):
            events.append("exit")

        def synchronize(self):
            events.append("sync")

        def begin_capture(self):
            events.append("begin")

        def end_capture(self):
            events.append("end")
            return types.SimpleNamespace(launch=lambda stream: events.append(
                f"launch on {stream}"))

    side = types.SimpleNamespace(stream=Stream(), handle="handle")
    cuda = types.SimpleNamespace(get_current_stream=lambda: "current")
    monkeypatch.setitem(sys.modules, "cupy", types.SimpleNamespace(cuda=cuda))
    monkeypatch.setattr(graph_module, "_capture_stream",
                        lambda c: events.append("capture stream") or side)
    step = lambda: events.append("step")  # noqa: E731
    replay = harness._replayed(step)
    assert events == ["capture stream", "enter", "step", "sync", "begin", "step", "end",
                      "exit"]
    assert replay.keeps == (step, "handle")
    events.clear()
    replay()
    replay()
    assert events == ["launch on current"] * 2


def test_side_by_side_times_a_commits_package_against_the_checkouts(capsys):
    """bench/side_by_side.py: the base commit's gpu_mlp imported beside the checkout's,
    the same nets built in both, alternating rounds; bad cases and commits refused."""
    import shutil

    from bench import side_by_side

    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs the git checkout")
    assert side_by_side.main(["--base", "HEAD", "--rounds", "1", "--steps", "1",
                              "1x6x6-2-2", "digits"]) == 0
    assert side_by_side.main(["--base", "HEAD", "--rounds", "1", "--steps", "1", "--layers",
                              "--batch", "3", "6-2-3-2"]) == 0
    out = capsys.readouterr().out
    for case in ("1x6x6-2-2 B64", "digits B32", "6-2-3-2 forward", "6-2-3-2 input gradient",
                 "6-2-3-2 weight gradient"):
        assert re.search(rf"{case} +base .* checkout .* checkout / base \(medians\) [0-9.]+",
                         out), (case, out)
    with pytest.raises(SystemExit, match="a network is CxHxW-channels-depth or digits"):
        side_by_side.main(["--base", "HEAD", "--rounds", "1", "nope"])
    with pytest.raises(SystemExit):
        side_by_side.main(["--base", "no-such-commit", "digits"])
    assert "git archive failed" in capsys.readouterr().err


def test_side_by_side_times_convolutions_against_pytorchs_own(capsys, monkeypatch):
    """--base torch --layers: the checkout's forward, input and weight gradient of a
    convolution against F.conv2d and aten.convolution_backward, each turn after a sleep
    (the other library's threads); whole steps against PyTorch are refused."""
    pytest.importorskip("torch")
    from bench import side_by_side

    slept = []
    monkeypatch.setattr(harness, "CPU_SETTLE_S", 0.001)
    real_sleep = side_by_side.time.sleep
    monkeypatch.setattr(side_by_side.time, "sleep", lambda s: (slept.append(s),
                                                              real_sleep(s))[1])
    assert side_by_side.main(["--base", "torch", "--layers", "--rounds", "2", "--steps", "1",
                              "--batch", "3", "6-2-3-2", "5-3-2-1"]) == 0
    out = capsys.readouterr().out
    for layer in ("6-2-3-2", "5-3-2-1"):
        for what in ("forward", "input gradient", "weight gradient"):
            assert re.search(rf"{layer} {what} +base .* checkout .* \(medians\) [0-9.]+",
                             out), (layer, what, out)
    assert slept == [0.001] * (2 * 3 * 2 * 2)  # layers x ops x rounds x turns
    with pytest.raises(SystemExit):
        side_by_side.main(["--base", "torch", "digits"])
    assert "--base torch times single convolutions: give --layers" in capsys.readouterr().err


def test_settle_times_each_library_after_the_other(capsys):
    """bench/settle.py: a PyTorch convolution after SciPy's GEMMs and a GEMM after
    PyTorch, at each delay; bad delays and counts refused by name."""
    pytest.importorskip("torch")
    from bench import settle

    results = settle.measure([0, 1], repeats=1, threads=1, size=4, burst=1)
    assert set(results) == {"torch after BLAS", "BLAS after torch"}
    assert all(set(by_delay) == {0, 1} and min(by_delay.values()) > 0
               for by_delay in results.values())
    for bad in (["--delays", "x"], ["--delays", "-5"], ["--delays", ""], ["--repeats", "0"]):
        with pytest.raises(SystemExit):
            settle.parse_args(bad)
    assert "--delays" in capsys.readouterr().err


def test_blas_shapes_runs_its_parts_and_refuses_unknown_ones(capsys, monkeypatch):
    from bench import blas_shapes

    monkeypatch.setattr(blas_shapes, "SHAPES", ((64, 8, 3), (600, 9, 4)))
    monkeypatch.setattr(blas_shapes, "ENTRANCES", ((9, 300, 2),))
    monkeypatch.setattr(harness, "CPU_SETTLE_S", 0.0)
    assert blas_shapes.main(["orientation", "libraries", "pools", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"rows +600 K +9 d_out +4: T\^T X .* X\^T T .* ratio [0-9.]+", out)
    assert re.search(r"entrance K +9 rows +300 d_out +2: .* ratio [0-9.]+", out)
    assert re.search(r"libraries:\n  (X\^T T rows .*ratio [0-9.]+|libraries: skipped)", out)
    assert re.search(r"alternating NumPy's matmul and SciPy's .* ratio [0-9.]+", out)
    for bad in (["nope"], ["--repeats", "0"]):
        with pytest.raises(SystemExit):
            blas_shapes.parse_args(bad)
    assert "unknown part 'nope'" in capsys.readouterr().err


def test_side_by_side_rounds_alternate_which_version_runs_first():
    """Whichever version runs second in a round measured 1-2% slower in an A/A
    comparison: the rounds alternate the order (ABBA...), each version's times its own."""
    from bench import side_by_side

    order = []
    times = side_by_side._rounds([lambda: order.append("base"),
                                  lambda: order.append("checkout")], rounds=4, steps=2)
    assert order == ["base"] * 2 + ["checkout"] * 4 + ["base"] * 4 + ["checkout"] * 4 \
        + ["base"] * 2
    assert [len(t) for t in times] == [4, 4]


def test_host_work_counts_what_the_host_does_for_each_front_ends_step(host_cupy_lib,
                                                                      monkeypatch):
    """bench/host_work.py: a replayed step of every front end is one graph, with no
    allocation or host read, and no other launch but train_step's copies in and out --
    fit's and the estimators' graphs read their rows through a cursor on the device;
    partial_fit's calls, one step each, copy their rows in, reset their loss tally and
    read their loss; every step eager launches far more; and none meets a kernel of
    CuPy's own, which a first run would compile."""
    from bench import host_work
    from gpu_mlp import graph

    cases, rows = host_work.cases(), {}
    assert ("MLPClassifier.fit" in cases) == (importlib.util.find_spec("sklearn") is not None)
    for name, count in cases.items():
        row = rows[name] = count(host_cupy_lib)
        streaming = name.endswith("partial_fit")
        assert row["graphs"] == 1, name
        assert row["launches"] == (3 if name.startswith("train_step") or streaming
                                   else 0), (name, row)
        assert row["allocations"] == 0, (name, row)
        assert row["host reads"] == streaming, (name, row)
        # nothing of CuPy's own for a first run to compile: only gpu_mlp's module
        assert row["compiled"] == [], (name, row)
        with monkeypatch.context() as m:
            m.setattr(graph, "_cuda", lambda: None)
            eager = count(host_cupy_lib)
        assert eager["graphs"] == 0 and eager["launches"] > 3 * row["launches"], (name, eager)
        assert eager["nodes"] is None and row["nodes"] > 0
    # a private step's graph: its per-sample norms and clipping factors fused (it had 3x
    # the plain step's nodes)
    assert rows["train_step, SGD, DP"]["nodes"] < 2 * rows["train_step, SGD"]["nodes"]


def test_host_work_refuses_a_package_directory_without_gpu_mlp(tmp_path, capsys):
    from bench import host_work

    with pytest.raises(SystemExit) as stop:
        host_work.main(["--package", str(tmp_path)])
    assert stop.value.code == 2 and "no gpu_mlp package in" in capsys.readouterr().err


class _Parsed(Exception):
    """Raised in place of running a command whose arguments parsed."""


def _parses(argv: list[str], monkeypatch) -> None:
    """That ``python3 ...`` argv's arguments parse as its script or module parses them,
    running nothing: the script's own ``parse_args`` (checks after argparse's included)
    where it has one, else its ``main`` with argparse stopped right after parsing."""
    import argparse
    import importlib

    from gpu_mlp import cli

    assert argv[0] == "python3", argv
    parse = argparse.ArgumentParser.parse_args

    def parsed(self, args=None, namespace=None):
        parse(self, args, namespace)
        raise _Parsed

    if argv[1] == "-m":
        module, args = argv[2], argv[3:]
        if module == "pytest":
            assert args[:2] == ["-m", "gpu"] and (ROOT / args[-1]).is_dir(), args
            assert any(m.startswith("gpu:") for m in _pyproject_markers())
            return
        assert module == "gpu_mlp", argv
        with monkeypatch.context() as m, pytest.raises(_Parsed):
            m.setattr(argparse.ArgumentParser, "parse_args", parsed)
            cli.main(args)
        return
    script, args = Path(argv[1]), argv[2:]
    if script.parts[0] != "bench":  # the GPU kit's busy.py, brought by --prepare
        assert script.name == "busy.py", argv
        return
    bench_module = importlib.import_module(f"bench.{script.stem}")
    if hasattr(bench_module, "parse_args"):
        bench_module.parse_args(args)
        return
    with monkeypatch.context() as m, pytest.raises(_Parsed):
        m.setattr(argparse.ArgumentParser, "parse_args", parsed)
        bench_module.main(args)


def _pyproject_markers() -> list[str]:
    import tomllib

    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["tool"]["pytest"]["ini_options"]["markers"]


def _gpu_check(*args, env=None, timeout=120):
    import os
    import shutil

    if shutil.which("bash") is None or shutil.which("timeout") is None:
        pytest.skip("needs bash and coreutils' timeout")
    # python3 is this interpreter, as on the GPU machine it is the one with CuPy
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), *args],
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PATH": path, **(env or {})})


def test_gpu_check_lists_commands_that_parse(monkeypatch, tmp_path):
    """bench/gpu_check.sh --list: every section's commands, each of which parses as its
    script parses it (so that a scarce GPU session does not end on a typo); the
    results go under $OUT; an unknown section is refused by name."""
    import shlex

    listed = _gpu_check("--list", env={"OUT": str(tmp_path)})
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    sections = {line.split(":", 1)[0] for line in lines}
    assert sections == {"info", "tests", "jobs", "busy", "job", "mlp", "conv", "dp", "cold",
                        "cublas", "rows", "optim", "budget"}
    for line in lines:
        argv = shlex.split(line.split(":", 1)[1])
        if argv[0] == "nvidia-smi":
            continue
        outs = [a for a in argv if a.startswith(str(tmp_path))]
        assert all(a.startswith(str(tmp_path)) for a in argv if "out" in a.lower()
                   and a.startswith("/")), line
        assert outs or "--out" not in argv, line
        _parses(argv, monkeypatch)
    some = _gpu_check("--list", "dp", "info", env={"OUT": str(tmp_path)})
    assert [line.split(":")[0] for line in some.stdout.splitlines()] == ["dp", "info", "info"]
    bad = _gpu_check("--list", "info", "nope")
    assert bad.returncode == 2 and "unknown section 'nope'" in bad.stderr
    assert bad.stdout == ""


def test_gpu_check_runs_within_its_budget_and_keeps_no_machine_path(tmp_path):
    """A run: each section's command with its exit status and seconds in MANIFEST.md,
    its output in check.log; a section the budget cannot hold is skipped and said so;
    the machine's paths are gone from what comes back. (On this machine: no GPU, so
    nvidia-smi fails, and says so in the manifest.)"""
    out = tmp_path / "gpu-out"
    done = _gpu_check("info", "tests", env={"OUT": str(out), "BUDGET_S": "25"})
    assert done.returncode == 0, done.stderr
    manifest = (out / "MANIFEST.md").read_text()
    log = (out / "check.log").read_text()
    assert "| info | `nvidia-smi` |" in manifest
    assert re.search(r"\| info \| `python3 -m gpu_mlp info` \| 0 \| \d+ \|", manifest), manifest
    assert "| tests | (skipped: the budget) | - | 0 |" in manifest  # 60 s expected > 25
    assert "tests: skipped" in log and "gpu_mlp" in log
    for text in (manifest, log):
        assert str(ROOT) not in text and str(out) not in text
    assert not (out / "gpu-tests.log").exists()
