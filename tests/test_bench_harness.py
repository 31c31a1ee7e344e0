"""The benchmark harness (bench/) on tiny sizes: what it builds, counts, writes and
compares. No timing is asserted; only that the numbers are there and consistent.

The end-to-end test runs ``bench/run.py`` in a subprocess, as a user would, because the
script sets thread and TF32 environment variables before it imports NumPy and CuPy.
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import gpu_mlp
from gpu_mlp import ops
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
    assert [t.impl for t in cuda] == ["torch", "gpu_mlp", "torch.compile", "gemm"]


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


@pytest.mark.parametrize("point", [harness.Point(width=6, depth=3, batch=5),
                                   harness.ConvPoint(input=(2, 7, 5), channels=3, depth=3,
                                                     batch=5)], ids=str)
def test_gemm_bound_runs_exactly_the_engines_gemms(monkeypatch, point):
    calls = []
    real_gemm = ops.gemm

    def recording_gemm(transa, transb, a, b, out, alpha=1.0, beta=0.0):
        calls.append((transa, transb, a.shape, b.shape, out.shape, beta))
        return real_gemm(transa, transb, a, b, out, alpha=alpha, beta=beta)

    monkeypatch.setattr(ops, "gemm", recording_gemm)
    seen = {}
    for impl, mode in (("gemm", None), ("gpu_mlp", "output")):
        calls.clear()
        harness.build(harness.Task("cpu", impl, mode, point), "float64").step()
        seen[impl] = sorted(calls)
    assert seen["gemm"] == seen["gpu_mlp"]
    assert len(seen["gemm"]) == 3 * len(point.layers()) - 1  # no input gradient for layer 1
    flops = sum(2 * out[0] * out[1] * (a[0] if ta == "T" else a[1])
                for ta, _, a, _, out, _ in seen["gemm"])
    rows, fan_in, d_out = point.gemm_shapes()[0]
    assert flops == point.flops - 2 * rows * fan_in * d_out  # layer 1's input gradient


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


def _record(impl, median, peak=None, mode=None, status="ok", width=8, conv=None):
    """A record as measure writes it; ``conv``: the input shape of a conv record (else
    an MLP record written before the conv grid, without ``model`` and ``input``)."""
    point = {} if conv is None else {"model": "conv", "input": list(conv)}
    return {"device": "cpu", "impl": impl, "mode": mode, "label": harness.label("cpu", impl, mode),
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
           "--max-time", "0", "--threads", "1", "--dtype", "float64", "--out", str(out),
           *extra]
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
    assert stderr.startswith(note) and stderr.count(note) == 1
    assert report.format_table(doc["records"]) in stdout
    assert "results.png" not in (tmp_path / "report.md").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.md", "results.json"]


def test_cli_conv_grid_writes_records_without_torch_or_matplotlib(tmp_path):
    """A tiny conv point through the CLI, gpu_mlp and the GEMM bound only: needs neither
    PyTorch nor matplotlib."""
    stdout, _, doc = _run_cli(tmp_path, "--grid", "conv", "--inputs", "2x6x6",
                              "--channels", "3", "--impls", "gpu_mlp,gemm", matplotlib=False)
    config = doc["config"]
    assert (config["grid"], config["inputs"], config["channels"], config["widths"]) == (
        "conv", [[2, 6, 6]], [3], None)
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
    for bad in (["--grid", "conv", "--widths", "8"], ["--channels", "8"],
                ["--grid", "conv", "--inputs", "28x28"]):
        with pytest.raises(SystemExit):
            run.parse_args(bad)


def test_resume_needs_the_same_grid(tmp_path):
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"config": {"dtype": "float32", "tf32": False},  # an MLP run
                                "environment": {"command": "bench/run.py"}, "records": []}))
    with pytest.raises(SystemExit, match="not resuming"):
        run.previous_run(path, run.parse_args(["--grid", "conv"]))
    assert run.previous_run(path, run.parse_args([])) == ([], ["bench/run.py"])


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


def test_scaling_records_its_mpirun_lines_without_machine_paths():
    command = ["/opt/mpi/bin/mpirun", "--oversubscribe", "-n", "2", sys.executable,
               str(ROOT / "bench" / "scaling.py"), "--worker", "/tmp/tmpab12/P2.json"]
    assert harness.portable_command(command) == (
        f"mpirun --oversubscribe -n 2 {Path(sys.executable).name} bench/scaling.py "
        "--worker P2.json")
