"""What bench/run.py writes: the JSON document, the terminal table, a markdown report
and the plot. Everything here reads the records of bench/harness.py; no figure is
computed anywhere but there.
"""

from __future__ import annotations

import json
import os

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
    return str(harness.Point(r["width"], r["depth"], r["batch"]))


def _sort_key(r):
    order = {impl: i for i, impl in enumerate(harness.IMPLS)}
    return (r["device"], r["batch"], r["depth"], r["width"], order[r["impl"]], r["mode"] or "")


def _fmt(value, spec: str, scale: float = 1.0) -> str:
    return "-" if value is None else format(value * scale, spec)


def format_table(records: list[dict]) -> str:
    """An aligned plain-text table, one row per record; a failed one shows its error."""
    header = ("device", "width", "depth", "batch", "implementation", "median ms", "IQR ms",
              "TFLOP/s", "vs torch", "vs GEMM", "peak MiB", "mem vs torch")
    rows, errors = [], {}
    for r in sorted(records, key=_sort_key):
        rows.append((r["device"], str(r["width"]), str(r["depth"]), str(r["batch"]),
                     r["label"]))
        if r["status"] != "ok":
            errors[len(rows) - 1] = f"error: {r['error']}"[:100]
            continue
        t = r["time_s"]
        rows[-1] += (
            _fmt(t["median"], ".4g", 1e3), _fmt(t["iqr"], ".2g", 1e3), _fmt(r["tflops"], ".3g"),
            _fmt(r["ratio_to_torch"], ".2f"), _fmt(r["ratio_to_gemm_bound"], ".2f"),
            _fmt(r["peak_bytes"], ".4g", 2.0 ** -20), _fmt(r["memory_ratio_to_torch"], ".2f"))
    widths = [max([len(header[i])] + [len(row[i]) for row in rows if len(row) > i])
              for i in range(len(header))]
    text_columns = (0, 4)

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
    batch >= 1024, peak memory below torch's."""
    lines = []
    for device, name in sorted({(r["device"], r["label"]) for r in records
                                if r["impl"] == "gpu_mlp"}):
        rows = [r for r in records
                if (r["device"], r["label"]) == (device, name) and r["status"] == "ok"]
        vs_torch = [r for r in rows if r["ratio_to_torch"] is not None]
        if vs_torch:
            worst = max(vs_torch, key=lambda r: r["ratio_to_torch"])
            faster = sum(r["ratio_to_torch"] < 1 for r in vs_torch)
            lines.append(f"{name}: faster than torch eager at {faster}/{len(vs_torch)} points; "
                         f"worst ratio {worst['ratio_to_torch']:.2f} at {_point(worst)}")
        big = [r for r in rows if r["width"] >= 1024 and r["batch"] >= 1024
               and r["ratio_to_gemm_bound"] is not None]
        if big:
            worst = max(big, key=lambda r: r["ratio_to_gemm_bound"])
            lines.append(f"{name}: at width >= 1024 and batch >= 1024, worst ratio to the "
                         f"GEMM-only bound {worst['ratio_to_gemm_bound']:.2f} at "
                         f"{_point(worst)}")
        mem = [r for r in rows if r["memory_ratio_to_torch"] is not None]
        if mem:
            below = sum(r["memory_ratio_to_torch"] < 1 for r in mem)
            lines.append(f"{name}: peak memory below torch's at {below}/{len(mem)} points "
                         f"(largest ratio {max(r['memory_ratio_to_torch'] for r in mem):.2f})")
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
             ("platform", f"{env['platform']}, Python {env['python']}"),
             ("versions", ", ".join(f"{k} {v}" for k, v in versions.items() if v)
              + (f" (torch CUDA {env['torch_cuda']})" if env.get("torch_cuda") else "")),
             ("dtype, TF32", f"{config['dtype']}, {'on' if config['tf32'] else 'off'}")]
    title = gpu["name"] if gpu else env["cpu"]
    lines = [f"# gpu_mlp vs PyTorch: one training step on {title}", "",
             "| | |", "| --- | --- |"] + [f"| {k} | {v} |" for k, v in rows]
    lines += ["", f"- network: {config['network']}", f"- FLOPs: {config['flops']}",
              f"- timing: {config['timing']}; at most {config['repeats']} steps or "
              f"{config['max_time_s']} s per case after {config['warmup']} warm-up steps, "
              f"at least {config['min_repeats']}",
              f"- memory: {config['memory']}",
              "- ratios: time / time at the same point (below 1: faster); memory: peak / "
              "torch's peak", "",
              "```text", format_table(doc["records"]), "```", ""]
    lines += [f"- {line}" for line in summary(doc["records"])]
    if plot_name:
        lines += ["", f"![median step time and peak memory against width]({plot_name})"]
    return "\n".join(lines) + "\n"


def plot(records: list[dict], path) -> None:
    """Time vs width, one panel per (depth, batch) and one line per implementation; below,
    peak memory vs width at the largest depth, one panel per batch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    ok = [r for r in records if r["status"] == "ok"]
    if not ok:
        raise ValueError("no successful measurement to plot")
    depths = sorted({r["depth"] for r in ok})
    batches = sorted({r["batch"] for r in ok})
    widths = sorted({r["width"] for r in ok})
    order = {impl: i for i, impl in enumerate(harness.IMPLS)}
    labels = [dl for _, dl in sorted({((r["device"], order[r["impl"]], r["label"]),
                                        (r["device"], r["label"])) for r in ok})]
    colours = plt.get_cmap("tab10")
    style = {dl: dict(color=colours(i % 10), linestyle="-" if dl[0] == "cuda" else "--",
                      marker="o", markersize=3) for i, dl in enumerate(labels)}
    fig, axes = plt.subplots(len(depths) + 1, len(batches), squeeze=False,
                             figsize=(4.2 * len(batches), 3.2 * (len(depths) + 1)))

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

    for i, depth in enumerate(depths):
        for j, batch in enumerate(batches):
            ax = axes[i][j]
            lines(ax, [r for r in ok if (r["depth"], r["batch"]) == (depth, batch)],
                  lambda r: r["time_s"]["median"] * 1e3)
            ax.set_title(f"depth {depth}, batch {batch}", fontsize=9)
            ax.set_ylabel("median step time (ms)")
    for j, batch in enumerate(batches):
        ax = axes[-1][j]
        lines(ax, [r for r in ok if (r["depth"], r["batch"]) == (depths[-1], batch)],
              lambda r: r["peak_bytes"] / 2 ** 20 if r["peak_bytes"] else None)
        ax.set_title(f"peak memory, depth {depths[-1]}, batch {batch}", fontsize=9)
        ax.set_ylabel("peak MiB")
        ax.set_xlabel("width")
    handles, names = [], []
    for ax in axes.flat:
        for h, n in zip(*ax.get_legend_handles_labels()):
            if n not in names:
                handles.append(h)
                names.append(n)
    fig.legend(handles, names, loc="lower center", ncol=min(4, len(names)), fontsize=8)
    fig.suptitle("one training step (forward + backward + SGD): "
                 + harness.NETWORK.split(";")[0],
                 fontsize=9)
    fig.tight_layout(rect=(0, 0.04 + 0.025 * ((len(names) + 3) // 4), 1, 0.97))
    fig.savefig(path, dpi=110)
    plt.close(fig)
