"""What bench/run.py writes: the JSON document, the terminal table, a markdown report
and the plot. Everything here reads the records of bench/harness.py; no figure is
computed anywhere but there.
"""

from __future__ import annotations

import json
import os
import textwrap

import numpy as np

from bench import harness


def document(config: dict, env: dict, records: list[dict]) -> dict:
    """The JSON document: the run's settings, where it ran, and one record per task."""
    return {"schema": harness.SCHEMA, "config": config, "environment": env,
            "records": records}


def write_json(path, doc: dict) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1)
    os.replace(tmp, path)  # a run cut short leaves the last complete file


def _point(r) -> str:
    return str(harness.point_of(r))


def _model(r) -> str:
    return r.get("model", "mlp")  # records written before the conv grid are MLP ones


def _input(r) -> tuple:
    """The input shape as a grouping key: () for an MLP, whose input is its width."""
    return () if _model(r) == "mlp" else tuple(r["input"])


def _sort_key(r):
    order = {impl: i for i, impl in enumerate(harness.IMPLS)}
    return (r["device"], _model(r), _input(r), r["batch"], r["depth"], r["width"],
            order[r["impl"]], r["mode"] or "")


def _width_name(records) -> str:
    """What the ``width`` field means in these records: an MLP's width, a CNN's channels."""
    models = {_model(r) for r in records}
    return "width" if models <= {"mlp"} else "channels" if models == {"conv"} else "width/ch"


def _fmt(value, spec: str, scale: float = 1.0) -> str:
    return "-" if value is None else format(value * scale, spec)


def busy_fraction(r):
    """A record's GPU busy fraction, None where not measured (CPU, older records, or a
    profiler failure, whose reason is in ``r["gpu_busy"]["error"]``)."""
    return (r.get("gpu_busy") or {}).get("fraction")


def format_table(records: list[dict]) -> str:
    """An aligned plain-text table, one row per record; a failed one shows its error.
    Convolution records get a model and an input column, and ``width`` is called what it
    is there (channels). Where the records have them, two more columns: the ratio to the
    graphed PyTorch step (``vs graph``) and the GPU busy fraction (``GPU busy``)."""
    conv = any(_model(r) != "mlp" for r in records)
    graph = any(r["impl"] == "torch.graph" for r in records)
    busy = any(r.get("gpu_busy") for r in records)
    header = (("device",) + (("model", "input") if conv else ())
              + (_width_name(records), "depth", "batch", "implementation", "median ms",
                 "IQR ms", "TFLOP/s", "vs torch", "vs GEMM", "peak MiB", "mem vs torch")
              + (("vs graph",) if graph else ()) + (("GPU busy",) if busy else ()))
    rows, errors = [], {}
    for r in sorted(records, key=_sort_key):
        rows.append((r["device"],)
                    + ((_model(r), "x".join(map(str, r.get("input") or [r["width"]])))
                       if conv else ())
                    + (str(r["width"]), str(r["depth"]), str(r["batch"]), r["label"]))
        if r["status"] != "ok":
            errors[len(rows) - 1] = f"error: {r['error']}"[:100]
            continue
        t = r["time_s"]
        rows[-1] += (
            _fmt(t["median"], ".4g", 1e3), _fmt(t["iqr"], ".2g", 1e3), _fmt(r["tflops"], ".3g"),
            _fmt(r["ratio_to_torch"], ".2f"), _fmt(r["ratio_to_gemm_bound"], ".2f"),
            _fmt(r["peak_bytes"], ".4g", 2.0 ** -20), _fmt(r["memory_ratio_to_torch"], ".2f"))
        if graph:
            rows[-1] += (_fmt(r.get("ratio_to_torch_graph"), ".2f"),)
        if busy:
            rows[-1] += (_fmt(busy_fraction(r), ".0%"),)
    widths = [max([len(header[i])] + [len(row[i]) for row in rows if len(row) > i])
              for i in range(len(header))]
    text_columns = (0, 1, 2, 6) if conv else (0, 4)

    def line(cells):
        return "  ".join(c.ljust(w) if i in text_columns else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths)))

    out = [line(header), "  ".join("-" * w for w in widths)]
    for i, row in enumerate(rows):
        out.append(line(row) + ("  " + errors[i] if i in errors else ""))
    return "\n".join(s.rstrip() for s in out)


def summary(records: list[dict]) -> list[str]:
    """The issue's targets as measured, one line per gpu_mlp row and target (nothing is
    asserted): faster than torch eager, within 1.10x of the GEMM-only bound at width and
    batch >= 1024 (MLP), the range of the ratio to the GEMM-only bound (convolutions:
    what im2col, col2im and the transposes add), peak memory below torch's; against the
    graphed PyTorch step (torch.graph), the points where it is faster and the ratio at
    each point; and the GPU busy fraction of every CUDA implementation."""
    lines = []
    for device, model, label in sorted({(r["device"], _model(r), r["label"]) for r in records
                                        if r["impl"] == "gpu_mlp"}):
        rows = [r for r in records if r["status"] == "ok"
                and (r["device"], _model(r), r["label"]) == (device, model, label)]
        name = label if model == "mlp" else f"{label} ({model})"
        vs_torch = [r for r in rows if r["ratio_to_torch"] is not None]
        if vs_torch:
            worst = max(vs_torch, key=lambda r: r["ratio_to_torch"])
            faster = sum(r["ratio_to_torch"] < 1 for r in vs_torch)
            lines.append(f"{name}: faster than torch eager at {faster}/{len(vs_torch)} points; "
                         f"worst ratio {worst['ratio_to_torch']:.2f} at {_point(worst)}")
        bound = [r for r in rows if r["ratio_to_gemm_bound"] is not None]
        big = [r for r in bound if r["width"] >= 1024 and r["batch"] >= 1024]
        if model == "mlp" and big:
            worst = max(big, key=lambda r: r["ratio_to_gemm_bound"])
            lines.append(f"{name}: at width >= 1024 and batch >= 1024, worst ratio to the "
                         f"GEMM-only bound {worst['ratio_to_gemm_bound']:.2f} at "
                         f"{_point(worst)}")
        elif model != "mlp" and bound:
            lo = min(bound, key=lambda r: r["ratio_to_gemm_bound"])
            hi = max(bound, key=lambda r: r["ratio_to_gemm_bound"])
            lines.append(f"{name}: ratio to the GEMM-only bound from "
                         f"{lo['ratio_to_gemm_bound']:.2f} at {_point(lo)} to "
                         f"{hi['ratio_to_gemm_bound']:.2f} at {_point(hi)}")
        mem = [r for r in rows if r["memory_ratio_to_torch"] is not None]
        if mem:
            below = sum(r["memory_ratio_to_torch"] < 1 for r in mem)
            lines.append(f"{name}: peak memory below torch's at {below}/{len(mem)} points "
                         f"(largest ratio {max(r['memory_ratio_to_torch'] for r in mem):.2f})")
        vs_graph = [r for r in rows if r.get("ratio_to_torch_graph") is not None]
        if vs_graph:
            faster = sum(r["ratio_to_torch_graph"] < 1 for r in vs_graph)
            lines.append(f"{name}: faster than torch.graph at {faster}/{len(vs_graph)} "
                         "points; time / torch.graph's: " + ", ".join(
                             f"{_point(r)} {r['ratio_to_torch_graph']:.2f}"
                             for r in sorted(vs_graph, key=_sort_key)))
    for device, model, label in sorted({(r["device"], _model(r), r["label"]) for r in records
                                        if busy_fraction(r) is not None}):
        fractions = [busy_fraction(r) for r in records if r["status"] == "ok"
                     and (r["device"], _model(r), r["label"]) == (device, model, label)
                     and busy_fraction(r) is not None]
        name = label if model == "mlp" else f"{label} ({model})"
        lines.append(f"{name}: GPU busy {min(fractions):.0%}-{max(fractions):.0%} "
                     f"(median {float(np.median(fractions)):.0%}) over {len(fractions)} "
                     "points")
    unmeasured = sorted({(r["label"], r["gpu_busy"]["error"]) for r in records
                         if (r.get("gpu_busy") or {}).get("error")})
    lines += [f"{label}: GPU busy not measured: {error}" for label, error in unmeasured]
    return lines


def _cuda_version(v) -> str:
    return "-" if v is None else f"{v // 1000}.{v % 1000 // 10}"


def markdown(doc: dict, plot_name=None) -> str:
    """A report for bench/results/: where and how it ran (from the JSON's environment
    block, nothing typed in), the table and the summary."""
    env, config = doc["environment"], doc["config"]
    versions, gpu = env["versions"], env.get("gpu")
    rows = [("command", f"`{env['command']}` (in `{env['cwd']}`)")]
    rows += [("resumed from", f"`{c}`") for c in env.get("previous_commands", [])]
    if gpu:
        rows += [("GPU", f"{gpu['name']} (compute capability {gpu['compute_capability']}, "
                         f"{gpu['memory_bytes'] / 2 ** 30:.1f} GiB)"),
                 ("driver", f"{gpu['driver'] or '-'} (CUDA driver API "
                            f"{_cuda_version(gpu['cuda_driver_api'])})"),
                 ("CUDA runtime (CuPy)", _cuda_version(gpu["cuda_runtime"])),
                 ("cuBLAS math mode", str(gpu["cublas_math_mode"]))]
    rows += [("CPU", f"{env['cpu']} ({env['logical_cpus']} logical CPUs, "
                     f"{config['threads']} threads)"),
             ("BLAS", harness.describe_blas(env.get("blas"))),
             ("platform", f"{env['platform']}, Python {env['python']}"),
             ("versions", ", ".join(f"{k} {v}" for k, v in versions.items() if v)
              + (f" (torch CUDA {env['torch_cuda']})" if env.get("torch_cuda") else "")),
             ("dtype, TF32", f"{config['dtype']}, {'on' if config['tf32'] else 'off'}")]
    if env.get("torch_conv") and config.get("grid") == "conv":
        conv = env["torch_conv"]
        rows.append(("PyTorch convolutions", f"cuDNN allow_tf32 {conv['cudnn_allow_tf32']}, "
                                             f"benchmark {conv['cudnn_benchmark']}; oneDNN "
                                             f"(mkldnn) available {conv['mkldnn']}"))
    title = gpu["name"] if gpu else env["cpu"]
    what = "one training step" if config.get("grid", "mlp") == "mlp" else \
        f"one {config['grid']} training step"
    lines = [f"# gpu_mlp vs PyTorch: {what} on {title}", "",
             "| | |", "| --- | --- |"] + [f"| {k} | {v} |" for k, v in rows]
    lines += ["", f"- network: {config['network']}", f"- FLOPs: {config['flops']}",
              f"- timing: {config['timing']}; at most {config['repeats']} steps or "
              f"{config['max_time_s']} s per case after {config['warmup']} warm-up steps "
              f"(on a GPU at least 3), "
              f"at least {config['min_repeats']}",
              f"- memory: {config['memory']}"]
    if config.get("gpu_busy") and any(r.get("gpu_busy") for r in doc["records"]):
        lines.append(f"- GPU busy: {config['gpu_busy']}")
    lines += [f"- skipped: {name} ({reason})"
              for name, reason in (config.get("skipped") or {}).items()]
    graph = any(r["impl"] == "torch.graph" for r in doc["records"])
    lines += ["- ratios: time / time at the same point (below 1: faster"
              + ("; vs graph: to torch.graph, PyTorch's step replayed as one CUDA graph"
                 if graph else "") + "); memory: peak / torch's peak", "",
              "```text", format_table(doc["records"]), "```", ""]
    lines += [f"- {line}" for line in summary(doc["records"])]
    if plot_name:
        lines += ["", f"![median step time and peak memory against width]({plot_name})"]
    return "\n".join(lines) + "\n"


def plot(records: list[dict], path) -> None:
    """Time vs width (channels), one panel per (input, depth) and batch, one line per
    implementation; below, peak memory vs width for the last (input, depth), one panel
    per batch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    ok = [r for r in records if r["status"] == "ok"]
    if not ok:
        raise ValueError("no successful measurement to plot")
    groups = sorted({(_model(r), _input(r), r["depth"]) for r in ok})
    batches = sorted({r["batch"] for r in ok})
    widths = sorted({r["width"] for r in ok})
    width_name = _width_name(ok)
    order = {impl: i for i, impl in enumerate(harness.IMPLS)}
    labels = [dl for _, dl in sorted({((r["device"], order[r["impl"]], r["label"]),
                                        (r["device"], r["label"])) for r in ok})]
    colours = plt.get_cmap("tab10")
    style = {dl: dict(color=colours(i % 10), linestyle="-" if dl[0] == "cuda" else "--",
                      marker="o", markersize=3) for i, dl in enumerate(labels)}
    fig, axes = plt.subplots(len(groups) + 1, len(batches), squeeze=False,
                             figsize=(4.2 * len(batches), 3.2 * (len(groups) + 1)))

    def lines(ax, rows, value):
        for dl in labels:
            pts = sorted((r["width"], value(r)) for r in rows
                         if (r["device"], r["label"]) == dl and value(r) is not None)
            if pts:
                ax.plot(*zip(*pts), label=f"{dl[1]}", **style[dl])
        ax.set_xscale("log", base=2)
        ax.set_xticks(widths, [str(w) for w in widths])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)

    def title(group) -> str:
        model, shape, depth = group
        return ("" if model == "mlp" else f"{model}, input {'x'.join(map(str, shape))}, ") \
            + f"depth {depth}"

    def rows_of(group, batch):
        return [r for r in ok if (_model(r), _input(r), r["depth"], r["batch"])
                == (*group, batch)]

    for i, group in enumerate(groups):
        for j, batch in enumerate(batches):
            ax = axes[i][j]
            lines(ax, rows_of(group, batch), lambda r: r["time_s"]["median"] * 1e3)
            ax.set_title(f"{title(group)}, batch {batch}", fontsize=9)
            ax.set_ylabel("median step time (ms)")
    for j, batch in enumerate(batches):
        ax = axes[-1][j]
        lines(ax, rows_of(groups[-1], batch),
              lambda r: r["peak_bytes"] / 2 ** 20 if r["peak_bytes"] else None)
        ax.set_title(f"peak memory, {title(groups[-1])}, batch {batch}", fontsize=9)
        ax.set_ylabel("peak MiB")
        ax.set_xlabel(width_name)
    handles, names = [], []
    for ax in axes.flat:
        for h, n in zip(*ax.get_legend_handles_labels()):
            if n not in names:
                handles.append(h)
                names.append(n)
    ncol = max(1, min(4, len(names), 2 * len(batches)))  # as many as the figure is wide
    fig.legend(handles, names, loc="lower center", ncol=ncol, fontsize=8)
    network = " / ".join(harness.DESCRIPTION[m][0].split(";")[0]
                         for m in sorted({g[0] for g in groups}))
    fig.suptitle(textwrap.fill(f"one training step (forward + backward + SGD): {network}",
                               int(16 * 4.2 * len(batches))), fontsize=9)
    fig.tight_layout(rect=(0, 0.04 + 0.025 * -(-len(names) // ncol), 1, 0.97))
    fig.savefig(path, dpi=110)
    plt.close(fig)
