"""Data-parallel scaling: time per step and bytes sent per step against the rank count P.

For each P in ``--ranks`` this script launches itself under ``mpirun -n P`` (the
worker), which times ``net.train_step(X_mine, Y_mine, lr, comm=comm)`` (forward,
backward, the gradient exchange and plain SGD) on an MLP of ``--depth`` layers of each
width in ``--widths``, each rank holding ``b`` rows (``--batches``, per rank: weak
scaling, the global batch is ``P b``), through each communication path of
:mod:`gpu_mlp.distributed`:

* ``allreduce``: each rank forms its gradient share, summed by ``Iallreduce``;
* ``gather``: the factors of every rank are all-gathered and every rank applies the
  global update as one GEMM.

P = 1 also times the plain single-process step (``single``). A step's time is the
slowest rank's (every rank timed from a barrier, the per-step maximum taken over the
ranks), the median over repeats. The bytes are :attr:`Communicator.bytes_sent` per step
on rank 0: the cost model of :mod:`gpu_mlp.distributed` (ring allreduce ``2 (P-1)/P
d_out (K+1)`` values per layer, all-gather ``(P-1) b (d_out + K)``). Auto gathers a layer
iff ``P b (d_out + K) < 2 d_out (K + 1)``; the report shows its pick per point.

Writes ``results.json``, ``report.md`` and, with matplotlib, ``scaling.png`` to
``--out``. On one machine the ranks talk through shared memory, and with more ranks
than cores (``--oversubscribe``) they also share cores: such times measure contention
more than the network; the bytes are what carries over to a cluster.

    python bench/scaling.py --out bench/results/cpu-mpi-scaling          # ~2 minutes, 2 cores
    python bench/scaling.py --ranks 1,2 --widths 1024 --batches 8,256 --out /tmp/scaling
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PATHS = ("allreduce", "gather")
_ALGORITHM = "OMPI_MCA_coll_libnbc_iallreduce_algorithm"
LR = 1e-5  # the weights barely move over the timed steps


def parse(argv=None):
    if ROOT not in sys.path:  # run from a checkout: bench needs no install
        sys.path.insert(0, ROOT)
    from bench.run import positive_ints

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=positive_ints, default=[1, 2, 4],
                        help="rank counts P, each one mpirun (default 1,2,4)")
    parser.add_argument("--widths", type=positive_ints, default=[64, 256, 1024])
    parser.add_argument("--batches", type=positive_ints, default=[8, 128],
                        help="rows per rank")
    parser.add_argument("--depth", type=int, default=2, help="layers of width w")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--threads", type=int, default=1, help="BLAS threads per rank")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--max-time", type=float, default=0.5,
                        help="seconds of timed steps per case, at least 5 steps")
    parser.add_argument("--mpirun", default=None, help="the launcher (default: the one "
                        "beside this Python, else on PATH)")
    parser.add_argument("--out", default=os.path.join(ROOT, "bench", "results",
                                                      "cpu-mpi-scaling"))
    parser.add_argument("--worker", metavar="JSON", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# --- the worker: one mpirun -n P ----------------------------------------------------------

def worker(args) -> None:
    import numpy as np

    import gpu_mlp
    from gpu_mlp.distributed import Communicator, choose_path, path_values

    comm = Communicator()
    P = comm.size
    records = []
    with comm.guard():
        for width in args.widths:
            sizes = [width] * (args.depth + 1)
            for b in args.batches:
                rng = np.random.default_rng([width, b, comm.rank])  # each rank its own rows
                X = rng.standard_normal((b, width)).astype(args.dtype)
                Y = rng.standard_normal((b, width)).astype(args.dtype)
                counts = [b] * P
                layers = gpu_mlp.MLP(sizes, device="cpu", dtype=args.dtype).layers
                auto = [choose_path(layer, counts) for layer in layers]
                values = [path_values(layer.d_out, layer.d_in, counts) for layer in layers]
                for impl in PATHS + (("single",) if P == 1 else ()):
                    net = gpu_mlp.MLP(sizes, device="cpu", dtype=args.dtype, seed=0)
                    comm.path = impl if impl != "single" else "auto"
                    use = comm if impl != "single" else None

                    def step():
                        net.train_step(X, Y, LR, check=False, comm=use)

                    times, sent = measure(step, comm, args)
                    records.append({
                        "ranks": P, "width": width, "depth": args.depth, "batch_per_rank": b,
                        "global_batch": P * b, "path": impl, "dtype": args.dtype,
                        "time_s": {"median": float(np.median(times)),
                                   "q1": float(np.percentile(times, 25)),
                                   "q3": float(np.percentile(times, 75)),
                                   "min": float(times.min()), "steps": len(times)},
                        "bytes_per_step": sent if impl != "single" else 0,
                        "auto_picks": auto,
                        "values_per_rank": {p: sum(v[p] for v in values) for p in PATHS},
                    })
                    if comm.is_root:
                        print(f"P={P} w={width} b={b} {impl:>9}: "
                              f"{np.median(times) * 1e3:8.3f} ms, "
                              f"{records[-1]['bytes_per_step']:>10} bytes/step", flush=True)
        if comm.is_root:
            with open(args.worker, "w") as f:
                json.dump({"records": records, "mpi": _mpi_environment()}, f)


def measure(step, comm, args):
    """Per-step times, each the slowest rank's, and the bytes this rank sent per step."""
    import numpy as np

    for _ in range(args.warmup):
        step()
    comm.barrier()
    t0 = time.perf_counter()
    step()
    probe = comm.comm.allreduce(time.perf_counter() - t0, op=comm.MPI.MAX)
    n = max(5, min(args.repeats, int(args.max_time / max(probe, 1e-9))))  # same everywhere
    times = np.empty(n)
    before = comm.bytes_sent
    for i in range(n):
        comm.barrier()
        t0 = time.perf_counter()
        step()
        times[i] = time.perf_counter() - t0
    sent = (comm.bytes_sent - before) // n
    slowest = np.empty_like(times)
    comm.comm.Allreduce(times, slowest, op=comm.MPI.MAX)
    return slowest, sent


def _mpi_environment() -> dict:
    import mpi4py
    from mpi4py import MPI

    return {"mpi4py": mpi4py.__version__,
            "library": MPI.Get_library_version().replace("\0", "").strip().splitlines()[0]}


# --- the driver ------------------------------------------------------------------------------

def launcher(args) -> list[str]:
    mpirun = args.mpirun or os.path.join(os.path.dirname(sys.executable), "mpirun")
    if not os.path.exists(mpirun):
        mpirun = shutil.which("mpirun")
    if mpirun is None:
        raise SystemExit('bench/scaling.py needs mpirun: pip install "gpu_mlp[mpi]"')
    version = subprocess.run([mpirun, "--version"], capture_output=True, text=True).stdout
    if "Open MPI" in version:  # ranks may outnumber cores; containers often run as root
        return [mpirun, "--oversubscribe", "--allow-run-as-root"]
    return [mpirun]


def main(argv=None) -> int:
    args = parse(argv)
    if args.worker:
        worker(args)
        return 0
    threads = str(args.threads)
    env = dict(os.environ, OMP_NUM_THREADS=threads, OPENBLAS_NUM_THREADS=threads,
               MKL_NUM_THREADS=threads)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (env.get("PYTHONPATH"), ROOT) if p)
    prefix = launcher(args)
    records, commands, mpi = [], [], {}
    load = [os.getloadavg()[0]]  # other work on the machine skews the times: say how much
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for P in args.ranks:
            out = os.path.join(tmp, f"P{P}.json")
            command = prefix + ["-n", str(P), sys.executable, os.path.abspath(__file__),
                                "--worker", out] + _grid_arguments(args)
            commands.append(command)
            print(f"$ {shlex.join(command)}", flush=True)
            subprocess.run(command, env=env, check=True)
            with open(out) as f:
                result = json.load(f)
            records += result["records"]
            mpi = result["mpi"]
            load.append(os.getloadavg()[0])
    write(args, records, commands, mpi, time.perf_counter() - started, load)
    return 0


def _grid_arguments(args) -> list[str]:
    return ["--widths", ",".join(map(str, args.widths)),
            "--batches", ",".join(map(str, args.batches)), "--depth", str(args.depth),
            "--dtype", args.dtype, "--warmup", str(args.warmup),
            "--repeats", str(args.repeats), "--max-time", str(args.max_time)]


def write(args, records, commands, mpi, seconds, load) -> None:
    sys.path.insert(0, ROOT)
    from bench import harness

    os.makedirs(args.out, exist_ok=True)
    environment = harness.environment(["cpu"], args.threads, False, out=args.out)
    environment["threads"].update(OMP_NUM_THREADS=str(args.threads),
                                  OPENBLAS_NUM_THREADS=str(args.threads),
                                  MKL_NUM_THREADS=str(args.threads))
    environment["mpi"] = mpi
    environment["mpirun"] = [harness.portable_command(c) for c in commands]
    environment["load_average_1min"] = [round(x, 2) for x in load]  # before, after each P
    environment[_ALGORITHM] = os.environ.get(_ALGORITHM, "ring (gpu_mlp.distributed's default)")
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"environment": environment, "lr": LR, "seconds": round(seconds, 1),
                   "records": records}, f, indent=1)
    with open(os.path.join(args.out, "report.md"), "w") as f:
        f.write(report(args, records, environment))
    try:
        plot(args, records, os.path.join(args.out, "scaling.png"))
    except ImportError:
        print("matplotlib is not installed: no plot", flush=True)
    print(f"wrote {args.out}", flush=True)


def report(args, records, environment) -> str:
    by = {(r["width"], r["batch_per_rank"], r["ranks"], r["path"]): r for r in records}
    lines = ["| width | rows/rank b | P | global batch | single ms | allreduce ms | gather ms "
             "| allreduce KiB/step | gather KiB/step | auto picks | fewer bytes | faster |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for width in args.widths:
        for b in args.batches:
            for P in args.ranks:
                a, g = by.get((width, b, P, "allreduce")), by.get((width, b, P, "gather"))
                if a is None or g is None:
                    continue
                single = by.get((width, b, P, "single"))
                ms = lambda r: f"{r['time_s']['median'] * 1e3:.2f}"  # noqa: E731
                picks = "/".join(sorted(set(a["auto_picks"]))) if P > 1 else "single"
                fewer = ("-" if P == 1 else "gather" if g["bytes_per_step"] < a["bytes_per_step"]
                         else "allreduce")
                faster = "gather" if g["time_s"]["median"] < a["time_s"]["median"] else "allreduce"
                if P == 1:  # nothing is sent: the paths differ only in their buffers
                    faster = "-"
                lines.append(f"| {width} | {b} | {P} | {P * b} | {ms(single) if single else ''} "
                             f"| {ms(a)} | {ms(g)} | {a['bytes_per_step'] / 1024:.1f} | "
                             f"{g['bytes_per_step'] / 1024:.1f} | {picks} | {fewer} "
                             f"| {faster} |")
    env = environment
    cores = env.get("logical_cpus")
    return (
        f"# Data-parallel scaling on the CPU, {args.dtype}, MLP of {args.depth} layers w x w\n\n"
        f"`{env['command']}`\n\n"
        f"{env.get('cpu', '')}, {cores} logical CPUs, {args.threads} BLAS thread(s) per rank; "
        f"{env['mpi'].get('library', '')}, mpi4py {env['mpi'].get('mpi4py', '')}; "
        f"gpu_mlp {env['versions']['gpu_mlp']}, NumPy {env['versions']['numpy']}, "
        f"SciPy {env['versions']['scipy']}; {env['platform']}; Open MPI's Iallreduce: "
        f"{env[_ALGORITHM]}. 1-minute load average before and after each P: "
        f"{', '.join(map(str, env['load_average_1min']))} (other work on the machine).\n\n"
        "Weak scaling: every rank holds b rows, the global batch is P b. A step is "
        "`train_step(X_mine, Y_mine, lr, comm=comm)`: forward, backward, the gradient "
        "exchange, SGD; its time is the slowest rank's, the median of the repeats. "
        "Bytes are sent per rank and step by the cost model of `gpu_mlp.distributed` "
        "(ring allreduce 2 (P-1)/P d_out (K+1) values per layer, factor all-gather "
        "(P-1) b (d_out + K)). Auto gathers a layer iff P b (d_out + K) < 2 d_out (K + 1), "
        "here P b < w + 1.\n\n"
        f"All ranks run on this one machine, over shared memory; with P above {cores} "
        "the ranks also share cores (oversubscribed), so those times show contention, not "
        "the network. The bytes carry over to a cluster.\n\n"
        "The all-gather path also computes more: every rank runs the weight-gradient GEMM "
        "over all P b rows instead of its own b (one third of a step's GEMM work, now P "
        "times over), where the allreduce only adds the shares. So where the bytes are "
        "close, the links fast (shared memory here) or the ranks share cores, the "
        "allreduce can win although it sends more; auto decides by bytes alone.\n\n"
        + "\n".join(lines) + "\n\n![time and bytes per step against P](scaling.png)\n")


def plot(args, records, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(args.widths), figsize=(4.2 * len(args.widths), 7),
                             squeeze=False)
    styles = {"allreduce": "-o", "gather": "--s"}  # the colour tells the batch
    for column, width in enumerate(args.widths):
        top, bottom = axes[0][column], axes[1][column]
        for color, b in enumerate(args.batches):
            for impl in PATHS:
                rows = sorted((r for r in records if r["width"] == width
                               and r["batch_per_rank"] == b and r["path"] == impl),
                              key=lambda r: r["ranks"])
                label, c = f"{impl}, b={b}", f"C{color}"
                top.plot([r["ranks"] for r in rows],
                         [r["time_s"]["median"] * 1e3 for r in rows], styles[impl],
                         color=c, label=label)
                sent = [r for r in rows if r["ranks"] > 1]  # one rank sends nothing
                bottom.plot([r["ranks"] for r in sent],
                            [r["bytes_per_step"] / 1024 for r in sent], styles[impl],
                            color=c, label=label)
        top.set_title(f"width {width}, {args.depth} layers")
        top.set_ylabel("ms per step (slowest rank)")
        bottom.set_ylabel("KiB sent per rank and step")
        bottom.set_title("allreduce's bytes do not depend on b", fontsize=9)
        bottom.set_yscale("log")
        for ax in (top, bottom):
            ax.set_xlabel("ranks P")
            ax.set_xticks(args.ranks)
            ax.grid(alpha=0.3)
        top.legend(fontsize=8)
    fig.suptitle(f"gpu_mlp data parallel on the CPU ({args.dtype}); rows per rank b, "
                 f"global batch P b")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
