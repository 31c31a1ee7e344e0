"""Time one gpu_mlp training step against PyTorch over a grid of network sizes.

    python bench/run.py --quick                      # CPU subset, under a minute idle
    PYTHONPATH=. python3 bench/run.py                # full grid on the GPU
    python bench/run.py --grid conv --quick          # convolutions: CPU subset
    PYTHONPATH=. python3 bench/run.py --grid conv    # convolutions: full grid on the GPU

For each grid point and implementation it reports the median step time and its IQR,
the achieved TFLOP/s, the ratios to PyTorch eager and to the GEMM-only bound, and the
peak memory against PyTorch's. It prints a table and writes ``results.json``,
``report.md`` (environment, command, table) and, with matplotlib, ``results.png`` to
``--out``; the JSON after every measurement, so that a run cut short keeps what it
measured and ``--resume`` carries on from there. See bench/harness.py for what is timed
and how.

NumPy and SciPy read their BLAS thread count when they load and CuPy reads ``CUPY_TF32``
once, so this script sets ``OMP_NUM_THREADS``, ``OPENBLAS_NUM_THREADS``,
``MKL_NUM_THREADS`` (``--threads``) and ``CUPY_TF32`` (``--tf32``) before importing them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

FULL = {"widths": [64, 256, 1024, 4096], "depths": [2, 4, 8], "batches": [64, 1024, 8192]}
QUICK = {"widths": [64, 256, 1024], "depths": [2, 4], "batches": [64, 1024]}
# --grid conv: input images (c, h, w), channels of every convolution, convolutions, batches
CONV_FULL = {"inputs": [(1, 28, 28), (3, 32, 32)], "channels": [16, 32, 64],
             "depths": [2, 4], "batches": [64, 256, 1024]}
CONV_QUICK = {"inputs": [(1, 28, 28), (3, 32, 32)], "channels": [16, 32],
              "depths": [2, 4], "batches": [64]}
GRIDS = {"mlp": (FULL, QUICK), "conv": (CONV_FULL, CONV_QUICK)}
# --quick also times fewer steps: (warmup, repeats, max_time)
TIMING = {"full": (3, 100, 1.0), "quick": (1, 20, 0.5)}
# harness.IMPLS and gpu_mlp.MEMORY_MODES, repeated so that parsing the arguments imports
# nothing (see main)
IMPLS = ("gpu_mlp", "torch", "torch.compile", "torch.graph", "gemm")
MODES = ("output", "recompute", "store_both")


def positive_ints(text: str) -> list[int]:
    """An argparse type: comma-separated integers >= 1 (bench/scaling.py's and
    bench/column_memory.py's too)."""
    try:
        values = [int(v) for v in text.split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {text!r}")
    return values


def _shapes(text: str) -> list[tuple[int, int, int]]:
    try:
        values = [tuple(int(n) for n in v.lower().split("x")) for v in text.split(",") if v]
    except ValueError:
        values = []
    if not values or any(len(v) != 3 or min(v) < 1 for v in values):
        raise argparse.ArgumentTypeError(
            f"expected comma-separated image shapes CxHxW such as 3x32x32, got {text!r}")
    return values


def _shape_text(shape) -> str:
    return "x".join(map(str, shape))


def _choices(valid):
    def parse(text: str) -> list[str]:
        values = [v for v in text.split(",") if v]
        bad = [v for v in values if v not in valid]
        if bad or not values:
            raise argparse.ArgumentTypeError(f"{text!r}: choose from {', '.join(valid)}")
        return values
    return parse


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grid", choices=tuple(GRIDS), default="mlp",
                   help="mlp: Dense layers of one width (--widths); conv: 3x3 convolutions "
                        "(padding 1, stride 1, 2, 1, ...) of --channels channels on --inputs "
                        "images, then Dense to 10 classes, softmax cross-entropy "
                        "(default: %(default)s)")
    p.add_argument("--quick", action="store_true",
                   help=f"the CPU subset: widths {QUICK['widths']}, depths {QUICK['depths']}, "
                        f"batches {QUICK['batches']} (--grid conv: inputs "
                        f"{','.join(map(_shape_text, CONV_QUICK['inputs']))}, channels "
                        f"{CONV_QUICK['channels']}, depths {CONV_QUICK['depths']}, batches "
                        f"{CONV_QUICK['batches']}), fewer timed steps")
    p.add_argument("--devices", type=_choices(("cuda", "cpu")),
                   help="comma-separated, from cuda,cpu (default: cuda when gpu_mlp sees a "
                        "GPU, else cpu)")
    p.add_argument("--impls", type=_choices(IMPLS),
                   help=f"comma-separated, from {','.join(IMPLS)} (default: all on cuda; "
                        "gpu_mlp,torch,gemm on cpu; torch.graph, PyTorch's step captured "
                        "as a CUDA graph, runs on cuda only)")
    p.add_argument("--modes", type=_choices(MODES), default=list(MODES),
                   help="gpu_mlp memory modes (default: all)")
    p.add_argument("--widths", type=positive_ints,
                   help=f"--grid mlp: default {FULL['widths']}")
    p.add_argument("--inputs", type=_shapes,
                   help="--grid conv: image shapes CxHxW, default "
                        f"{','.join(map(_shape_text, CONV_FULL['inputs']))}")
    p.add_argument("--channels", type=positive_ints,
                   help=f"--grid conv: default {CONV_FULL['channels']}")
    p.add_argument("--depths", type=positive_ints,
                   help=f"layers (--grid conv: convolutions), default {FULL['depths']} "
                        f"(--grid conv: {CONV_FULL['depths']})")
    p.add_argument("--batches", type=positive_ints,
                   help=f"default {FULL['batches']} (--grid conv: {CONV_FULL['batches']})")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=False,
                   help="TF32 tensor-core GEMMs for float32 in both libraries (default: off)")
    p.add_argument("--threads", type=int, default=os.cpu_count(),
                   help="CPU threads for BLAS and PyTorch (default: all, %(default)s)")
    p.add_argument("--warmup", type=int, help="untimed steps first (default 3; --quick 1; "
                   "on a GPU at least 3)")
    p.add_argument("--repeats", type=int,
                   help="timed steps, at most (default 100; --quick 20)")
    p.add_argument("--max-time", type=float,
                   help="stop timing a case after this many seconds, once it has 5 steps "
                        "(default 1.0; --quick 0.5)")
    p.add_argument("--rounds", type=int, default=1,
                   help="measure each grid point's cases this many times, the order "
                        "alternating (ABBA...), and report the median of the rounds' "
                        "medians: a shared machine's speed can change 2x in minutes, so "
                        "that the ratios of one pass mean little there (default 1)")
    p.add_argument("--settle", type=float, metavar="SECONDS",
                   help="sleep before each CPU case, so that the last case's idle BLAS or "
                        "OpenMP threads stop spinning on the cores it wants (default "
                        "0.3: a PyTorch convolution right after SciPy's GEMMs took 8-9x "
                        "its time, bench/settle.py)")
    p.add_argument("--column-budget", type=float, metavar="MIB",
                   help="gpu_mlp's convolution column buffer at most, MiB "
                        "(gpu_mlp.ops.COLUMN_BUDGET_BYTES; default its 16): what the "
                        "blocks cost against the memory they save")
    p.add_argument("--out", type=Path,
                   help="output folder (default: "
                        "bench/results/DEVICES-DTYPE[-tf32][-conv][-quick], e.g. "
                        "bench/results/cuda-float32)")
    p.add_argument("--resume", action="store_true",
                   help="keep the successful measurements in OUT/results.json, measure the rest")
    p.add_argument("--no-plot", action="store_true",
                   help="skip the PNG plot (skipped anyway, with a note, without matplotlib)")
    args = p.parse_args(argv)
    grid = GRIDS[args.grid][1 if args.quick else 0]
    for other in sorted({"widths", "inputs", "channels"} - set(grid)):
        if getattr(args, other) is not None:
            p.error(f"--{other} is not an option of --grid {args.grid}")
    for name in grid:
        if getattr(args, name) is None:
            setattr(args, name, grid[name])
    timing = TIMING["quick" if args.quick else "full"]
    for name, default in zip(("warmup", "repeats", "max_time"), timing):
        if getattr(args, name) is None:
            setattr(args, name, default)
    if args.settle is None:
        args.settle = 0.3  # (harness.CPU_SETTLE_S: bench.harness imports NumPy)
    if min(args.threads, args.repeats, args.rounds) < 1 or min(args.warmup,
                                                               args.max_time) < 0:
        p.error("--threads, --repeats and --rounds must be >= 1, --warmup and --max-time "
                ">= 0")
    if not 0 <= args.settle < float("inf"):
        p.error("--settle must be a finite number of seconds, 0 or more")
    if args.column_budget is not None and not 0 < args.column_budget < float("inf"):
        p.error("--column-budget must be a positive, finite number of MiB")
    return args


def default_out(args, devices) -> Path:
    """bench/results/DEVICES-DTYPE[-tf32][-conv][-quick]"""
    name = ["+".join(devices), args.dtype] + (["tf32"] if args.tf32 else []) \
        + (["conv"] if args.grid == "conv" else []) + (["quick"] if args.quick else [])
    return ROOT / "bench" / "results" / "-".join(name)


def footing(config: dict, env: dict) -> dict:
    """What records compared side by side must share: the settings, and the machine,
    libraries and sources (gpu_mlp's, its kernels, the bench's) they were measured with."""
    return {"dtype": config["dtype"], "tf32": config["tf32"],
            "grid": config.get("grid", "mlp"),
            "column budget": config.get("column_budget_bytes"),
            "threads": config.get("threads"), "cpu": env.get("cpu"),
            # (runs from before these options: one round, no sleep)
            "rounds": config.get("rounds", 1), "settle": config.get("settle_s", 0.0),
            "gpu": (env.get("gpu") or {}).get("name"), "versions": env.get("versions"),
            "sources": (env.get("gpu_mlp_source") or {}).get("sha256_of_measured_sources")}


def previous_run(path: Path, now: dict) -> tuple[list[dict], list[str]]:
    """The successful records of an earlier run on the same :func:`footing` as ``now``,
    and the commands that measured them."""
    old = json.loads(path.read_text())
    env = old.get("environment", {})
    then = footing(old["config"], env)
    differ = [f"{key} {then[key]!r} (now {now[key]!r})" for key in now if then[key] != now[key]]
    if differ:
        raise SystemExit(f"error: {path} was measured with {'; '.join(differ)}; not resuming: "
                         f"its records would be compared with these as if from one run")
    commands = env.get("previous_commands", []) + [env["command"]]
    return [r for r in old["records"] if r["status"] == "ok"], commands


def main(argv=None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, str(ROOT))  # run from a checkout: gpu_mlp and bench need no install
    from bench import pin_environment  # (imports nothing that reads the environment)

    pin_environment(args.threads, args.tf32)

    # only now, with the environment set: these import NumPy, SciPy, CuPy and PyTorch
    from tqdm import tqdm

    import gpu_mlp
    from bench import harness, report
    from gpu_mlp.plotting import require_matplotlib

    plot = not args.no_plot
    if plot:
        try:
            require_matplotlib()
        except ImportError as e:  # say so now, not after the measurements
            print(f"skipping the plot (results.png): {e}", file=sys.stderr)
            plot = False

    if args.column_budget is not None:
        gpu_mlp.ops.COLUMN_BUDGET_BYTES = int(args.column_budget * 2**20)
    column_budget = gpu_mlp.ops.COLUMN_BUDGET_BYTES
    devices = args.devices or (["cuda"] if gpu_mlp.gpu_available() else ["cpu"])
    if "cuda" in devices and not gpu_mlp.gpu_available():
        raise SystemExit("error: --devices cuda needs CuPy and a CUDA GPU, and gpu_mlp sees none")
    out = args.out or default_out(args, devices)
    try:  # now, not after the measurements
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SystemExit(f"error: --out {out} cannot be the output folder: {e.strerror}")
    json_path = out / "results.json"
    if args.grid == "conv":
        points = [harness.ConvPoint(i, c, d, b) for i in args.inputs for c in args.channels
                  for d in args.depths for b in args.batches]
    else:
        points = [harness.Point(w, d, b) for w in args.widths for d in args.depths
                  for b in args.batches]
    for point in points:
        try:
            point.layers()
        except ValueError as e:  # say so now, not in every record
            raise SystemExit(f"error: grid point {point}: {e}") from None
    harness.configure(args.threads, args.tf32)
    todo = harness.tasks(devices, args.impls, args.modes, points)
    skipped = harness.skipped(devices, args.impls)
    for name, reason in skipped.items():
        print(f"skipping {name}: {reason}", file=sys.stderr)
    settings = harness.Settings(args.dtype, args.warmup, args.repeats, args.max_time,
                                args.settle)
    network, flops = harness.DESCRIPTION[args.grid]
    config = {
        "grid": args.grid, "devices": devices, "impls": args.impls, "modes": args.modes,
        "widths": args.widths, "inputs": args.inputs, "channels": args.channels,
        "depths": args.depths, "batches": args.batches,
        "dtype": args.dtype, "tf32": args.tf32, "threads": args.threads,
        "warmup": args.warmup, "repeats": args.repeats, "max_time_s": args.max_time,
        "min_repeats": harness.MIN_REPEATS, "lr": harness.LR, "quick": args.quick,
        "column_budget_bytes": column_budget,
        "network": network, "flops": flops,
        "rounds": args.rounds, "settle_s": args.settle,
        "timing": "time.perf_counter around each step, device synchronised inside the "
                  "timed region; median and quartiles of the repeats after the warm-up"
                  + (f"; each CPU case after {args.settle:g} s of sleep (the last case's "
                     f"idle BLAS and OpenMP threads stop spinning)" if args.settle else "")
                  + ("" if args.rounds == 1 else
                     f"; {args.rounds} rounds of each point's cases, in alternating order "
                     f"(ABBA...): the median of the rounds' medians, quartiles and "
                     f"fastest of the round medians"),
        "memory": "peak bytes held during one steady-state step, weights and data included: "
                  "CuPy pool total_bytes after free_all_blocks; "
                  "torch.cuda.max_memory_allocated; tracemalloc peak for NumPy; "
                  "torch on the CPU not measured; torch.graph: max_memory_allocated over "
                  "the capture",
        "gpu_busy": f"CUDA only: {harness.BUSY_STEPS} (at most --repeats) further steps, each "
                    "synchronised as when timed, under torch.profiler with "
                    "ProfilerActivity.CUDA; union of the device intervals (kernels, memcpy, "
                    "memset; CuPy's too) / wall time of those steps",
        "skipped": skipped,
    }
    env = harness.environment(devices, args.threads, args.tf32, out=out)
    env["gpu_mlp_source"] = harness.source_state()
    records, previous_commands = (previous_run(json_path, footing(config, env))
                                  if args.resume and json_path.exists() else ([], []))
    done = {harness.key(r) for r in records}
    todo = [t for t in todo if t.key not in done]
    if previous_commands:
        env["previous_commands"] = previous_commands  # what measured the resumed records

    bar = tqdm(total=len(todo) * args.rounds, unit="case", dynamic_ncols=True)

    def measured(task, r):
        bar.set_postfix_str(f"{task.label} {task.point}"
                            + (f" round {r + 1}" if args.rounds > 1 else ""))
        bar.update()

    for point_tasks in harness.by_point(todo):
        records.extend(harness.measure_rounds(point_tasks, settings, args.rounds, measured))
        harness.add_ratios(records)
        report.write_json(json_path, report.document(config, env, records))
    bar.close()
    harness.add_ratios(records)
    doc = report.document(config, env, records)
    report.write_json(json_path, doc)

    print(f"network: {network}\nFLOPs: {flops}\n"
          f"dtype {args.dtype}, TF32 {'on' if args.tf32 else 'off'}, {args.threads} CPU "
          "threads; ratios are time / time (below 1: faster), memory is peak / torch's\n")
    print(report.format_table(records) + "\n")
    print("\n".join(report.summary(records)))
    written = [json_path]
    plot_name = None
    if plot and any(r["status"] == "ok" for r in records):
        plot_name = "results.png"
        report.plot(records, out / plot_name)
        written.append(out / plot_name)
    (out / "report.md").write_text(report.markdown(doc, plot_name))
    written.append(out / "report.md")
    print("\nwrote " + ", ".join(map(str, written)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
