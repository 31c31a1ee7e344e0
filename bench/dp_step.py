"""One differentially private training step: gpu_mlp's DP-SGD against plain SGD and Opacus.

For each net and batch size, the same step -- forward, backward, update, softmax
cross-entropy against integer labels, plain SGD -- is timed side by side, on the same
device, dtype, weights and batch:

* ``gpu_mlp``: ``net.train_step(X, y, lr)``, plain SGD;
* ``gpu_mlp DP``: ``net.train_step(X, y, lr, dp=DP(max_grad_norm=1, noise_multiplier=1))``
  (per-sample norms from the factors, clipping, Gaussian noise; :mod:`gpu_mlp.privacy`);
* ``gpu_mlp DP noise 0``: the same with ``noise_multiplier=0``: clipping alone, so that
  the difference to ``gpu_mlp DP`` is the noise;
* ``torch``: PyTorch eager, ``nn.Sequential`` (bench/harness.py's ``torch_module``),
  ``torch.optim.SGD``, ``zero_grad(set_to_none=True)``;
* ``opacus hooks``: Opacus ``PrivacyEngine.make_private`` (same noise multiplier and
  clipping norm, ``grad_sample_mode="hooks"``: per-sample gradients materialised);
* ``opacus ghost``: ``grad_sample_mode="ghost"`` with the ``DPLossFastGradientClipping``
  criterion it returns (ghost clipping: per-sample norms without per-sample gradients,
  then a second backward pass); where it fails, the record says why.

Both Opacus modes get the batch directly (no data loader in the timed region) and divide
by the batch size (``loss_reduction="mean"``, ``poisson_sampling=False``, so the expected
batch size is the batch), as gpu_mlp does. Before timing, one noise-free private step of
gpu_mlp and of Opacus (hooks) from the same weights (lr 1) are compared, so that the two
compute the same update: the largest difference is in the JSON (``agreement``).

Timing: as bench/harness.py's ``time_steps`` (``time.perf_counter`` around each step,
the device synchronised inside the timed region -- CuPy's device for gpu_mlp,
``torch.cuda.synchronize`` for PyTorch and Opacus --, the garbage collector off), but
interleaved: every implementation of a config is built and warmed up first, then
``--rounds`` rounds each run every implementation in turn for one untimed step and
``--steps`` timed ones (fewer past ``--max-time`` seconds, at least one), so that
another process loading the machine for a while hits all of them alike. ``--settle``
sleeps before each turn (default 0: on the 2-core machine of the results, sleeping 0.3 s
so that the previous library's idle threads stopped spinning made every step slower, not
steadier). The median over all rounds is reported, with the quartiles.

Threads: ``--threads`` sets ``OMP_NUM_THREADS``, ``OPENBLAS_NUM_THREADS`` and
``MKL_NUM_THREADS`` before NumPy, SciPy and PyTorch load (the BLAS behind gpu_mlp's CPU
GEMMs) and ``torch.set_num_threads`` to the same number; threadpoolctl's view of the
pools is recorded where it is installed. gpu_mlp's CPU noise runs on
``gpu_mlp.ops.NOISE_THREADS`` threads of its own (at most the CPU count; one by default),
which ``--threads`` does not set; the JSON records the number.

``--breakdown`` also times, over further interleaved steps of gpu_mlp's three steps,
where each step's time goes: the per-sample squared norms
(``norms.per_sample_squares``; for a convolution whose per-sample gradients DP keeps,
``norms.per_sample_gradients`` and ``norms.row_squares_into``), the noise
(``ops.add_gaussian``), the update GEMMs/GEMVs (``updates.Apply``, its call and its
``gradient``, noise excluded), the clipping factors and the row scaling or, for kept
per-sample gradients, the GEMVs of their clipped sum (the rest of
``privacy._Private.finish``), and the forward/backward remainder; on a GPU each timer
synchronises the device, and the steps run eagerly (a CUDA graph's replay runs none of
the Python timed).

Writes ``results.json`` and ``report.md`` (machine, versions, the command, the table)
to ``--out``.

    python bench/dp_step.py                          # bench/results/cpu-float32-dp
    python bench/dp_step.py --quick --out /tmp/dp    # a small smoke run (the test's)
    PYTHONPATH=. python3 bench/dp_step.py --device cuda --out bench/results/cuda-float32-dp
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import sys
import time
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

LR = 1e-5  # the weights barely move over the timed steps (bench/harness.py's LR)
CLIP, SIGMA = 1.0, 1.0  # DP(max_grad_norm=CLIP, noise_multiplier=SIGMA)
CLASSES = 10
# name: ("mlp", sizes) or ("cnn", (channels, image CxHxW)): gpu_mlp.cli._cnn_layers,
# the CLI's CNN (3x3 convolutions, padding 1, strides 1, 2, 2, ...; ReLU; Dense head)
NETS = {
    "784-1024-1024-10": ("mlp", [784, 1024, 1024, CLASSES]),
    "64-256-256-10": ("mlp", [64, 256, 256, CLASSES]),
    "cnn 1x28x28 c32-64": ("cnn", ((32, 64), (1, 28, 28))),
}
BATCHES = (64, 256)
QUICK_NETS, QUICK_BATCHES = ("64-256-256-10",), (32,)
IMPLS = ("gpu_mlp", "gpu_mlp DP", "gpu_mlp DP noise 0", "torch", "opacus hooks",
         "opacus ghost")
PARTS = ("per-sample norms", "noise", "clip factors + row scaling", "update GEMMs",
         "forward + backward + rest")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--threads", type=int, default=2,
                        help="BLAS/OpenMP threads and torch.set_num_threads (default 2)")
    parser.add_argument("--nets", nargs="+", choices=list(NETS), default=None,
                        help=f"default: all ({', '.join(NETS)})")
    parser.add_argument("--batches", nargs="+", type=int, default=None,
                        help=f"default: {' '.join(map(str, BATCHES))}")
    parser.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS))
    parser.add_argument("--rounds", type=int, default=None,
                        help="interleaved rounds (default 6; --quick: 2)")
    parser.add_argument("--steps", type=int, default=None,
                        help="timed steps per implementation and round (default 8; --quick: 5)")
    parser.add_argument("--max-time", type=float, default=3.0,
                        help="seconds of timed steps per implementation and round, after "
                             "at least 5 (default 3)")
    parser.add_argument("--settle", type=float, default=0.0, metavar="SECONDS",
                        help="sleep before each implementation's turn in a round, so that "
                             "the previous one's idle threads stop spinning (default 0)")
    parser.add_argument("--openblas-thread-timeout", type=int, default=None, metavar="N",
                        help="set OPENBLAS_THREAD_TIMEOUT=N (OpenBLAS threads spin 2^N "
                             "cycles before sleeping; 4..30) before NumPy and SciPy load; "
                             "default: OpenBLAS's own")
    parser.add_argument("--breakdown", action="store_true",
                        help="also time the parts of gpu_mlp's DP step")
    parser.add_argument("--quick", action="store_true",
                        help=f"{QUICK_NETS[0]}, batch {QUICK_BATCHES[0]}, 2 rounds of 5 "
                             "steps: a smoke run")
    parser.add_argument("--out", default=None,
                        help="default: bench/results/<device>-<dtype>-dp (-quick with --quick)")
    args = parser.parse_args(argv)
    if args.quick:
        args.nets = args.nets or list(QUICK_NETS)
        args.batches = args.batches or list(QUICK_BATCHES)
    rounds, steps = (2, 5) if args.quick else (6, 8)  # what is given stands
    args.rounds = rounds if args.rounds is None else args.rounds
    args.steps = steps if args.steps is None else args.steps
    args.nets = args.nets or list(NETS)
    args.batches = args.batches or list(BATCHES)
    for name in ("threads", "rounds", "steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.out is None:  # a smoke run never replaces a full run's results
        args.out = os.path.join(ROOT, "bench", "results",
                                f"{args.device}-{args.dtype}-dp{'-quick' if args.quick else ''}")
    return args


# --- the problem --------------------------------------------------------------------------

def net_layers(name):
    """``(layers, sample shape)`` of the net ``name``."""
    from gpu_mlp.cli import _cnn_layers
    from gpu_mlp.layers import Dense

    kind, spec = NETS[name]
    if kind == "cnn":
        channels, image = spec
        return _cnn_layers(list(channels), "relu", image, CLASSES), tuple(image)
    layers = [Dense(a, b, "relu") for a, b in zip(spec[:-2], spec[1:-1])]
    return layers + [Dense(spec[-2], spec[-1], "identity")], (spec[0],)


def problem(layers, sample_shape, batch, dtype):
    """Host weights (gpu_mlp's initialisation, seed 0) and a batch, shared by all."""
    import numpy as np

    import gpu_mlp

    net = gpu_mlp.Network(layers, loss="softmax_cross_entropy", device="cpu", dtype=dtype,
                          seed=0, input_shape=sample_shape)
    rng = np.random.default_rng(1)
    X = rng.standard_normal((batch, *sample_shape)).astype(dtype)
    y = rng.integers(0, CLASSES, batch)
    return [(np.array(W), np.array(b)) for W, b in net.params], X, y


def _cupy_sync():
    import cupy

    return cupy.cuda.Device().synchronize


def gpu_mlp_case(layers, params, X, y, device, dp):
    """``(step, sync)``: gpu_mlp's training step, private with ``dp`` (None: plain)."""
    import gpu_mlp
    from gpu_mlp.plan import StepPlan

    net = gpu_mlp.Network.from_params(layers, params, loss="softmax_cross_entropy",
                                      device=device)
    X, y = gpu_mlp.device.to_device(X, net.xp), gpu_mlp.device.to_device(y, net.xp)

    def step(capture=True):
        # train_step's step; capture=False: eager, no CUDA graph (a replay runs none of
        # the Python that --breakdown times)
        return net._step(X, y, StepPlan(LR, dp), False, global_loss=True, capture=capture)

    step.net = net
    return step, (_cupy_sync() if device == "cuda" else (lambda: None))


def torch_case(layers, params, X, y, device, opacus_mode=None, sigma=SIGMA, lr=LR):
    """``(step, sync)``: PyTorch's step, plain (``opacus_mode`` None) or Opacus's private
    step in ``"hooks"`` or ``"ghost"`` mode."""
    import torch

    from bench import harness

    model = harness.torch_module(layers, params, device)
    Xt = torch.as_tensor(X, device=device)
    yt = torch.as_tensor(y, device=device)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    criterion = torch.nn.CrossEntropyLoss()
    if opacus_mode is not None:
        from opacus import PrivacyEngine

        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(Xt, yt),
                                             batch_size=len(X))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # secure_mode off, and the like
            made = PrivacyEngine().make_private(
                module=model, optimizer=optimizer, criterion=criterion, data_loader=loader,
                noise_multiplier=sigma, max_grad_norm=CLIP, poisson_sampling=False,
                grad_sample_mode=opacus_mode)
        if opacus_mode == "ghost":
            model, optimizer, criterion, _ = made
        else:
            model, optimizer, _ = made

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = criterion(model(Xt), yt)
        loss.backward()
        optimizer.step()
        return loss

    step.model = model
    return step, (torch.cuda.synchronize if device == "cuda" else (lambda: None))


def build(impl, layers, params, X, y, device):
    from gpu_mlp.privacy import DP

    if impl == "gpu_mlp":
        return gpu_mlp_case(layers, params, X, y, device, None)
    if impl == "gpu_mlp DP":
        return gpu_mlp_case(layers, params, X, y, device, DP(CLIP, SIGMA, seed=0))
    if impl == "gpu_mlp DP noise 0":
        return gpu_mlp_case(layers, params, X, y, device, DP(CLIP, 0.0, seed=0))
    if impl == "torch":
        return torch_case(layers, params, X, y, device)
    if impl in ("opacus hooks", "opacus ghost"):
        return torch_case(layers, params, X, y, device, opacus_mode=impl.split()[1])
    raise ValueError(impl)


def _error(exc) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"[:500]


def agreement(layers, params, X, y, device):
    """The largest absolute difference of the weights after one noise-free private step
    (lr 1) of gpu_mlp and of Opacus (hooks), and the largest weight change, or an error."""
    import numpy as np

    from gpu_mlp import device as _device
    from gpu_mlp.privacy import DP

    try:
        import torch

        net = gpu_mlp_case(layers, params, X, y, device, None)[0].net
        xp = net.xp
        net.train_step(_device.to_device(X, xp), _device.to_device(y, xp), 1.0, check=False,
                       dp=DP(CLIP, 0.0))
        ours = [_device.to_numpy(W) for W, _ in net.params]
        step, _ = torch_case(layers, params, X, y, device, opacus_mode="hooks", sigma=0.0,
                             lr=1.0)
        step()
        theirs = [m.weight.detach().cpu().numpy() for m in step.model.modules()
                  if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
        diff = max(float(np.abs(a - b).max()) for a, b in zip(ours, theirs))
        change = max(float(np.abs(a - W).max()) for a, (W, _) in zip(ours, params))
        return {"max_abs_weight_diff": diff, "max_abs_weight_change": change}
    except Exception as exc:
        return {"error": _error(exc)}


# --- timing -------------------------------------------------------------------------------

def time_round(step, sync, steps, max_time):
    """One untimed step (this implementation's steady state after the others ran), then
    seconds per step for up to ``steps`` steps or ``max_time`` seconds, at least one:
    bench/harness.py's ``time_steps`` without its floor of 5 steps, so that a case of
    seconds per step (Opacus's per-sample gradients of a big layer) takes few."""
    step()
    sync()
    times = []
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        while len(times) < steps:
            t0 = time.perf_counter()
            step()
            sync()
            times.append(time.perf_counter() - t0)
            if sum(times) >= max_time:
                break
    finally:
        if gc_was_enabled:
            gc.enable()
    return times


def interleaved(cases, rounds, steps, max_time, settle):
    """Seconds per step of each case, over ``rounds`` rounds of all cases in turn, with
    ``settle`` seconds of sleep before each case's turn."""
    times = {impl: [] for impl in cases}
    for _ in range(rounds):
        for impl, (step, sync) in cases.items():
            if settle:
                time.sleep(settle)  # the last case's idle BLAS/OpenMP threads stop spinning
            times[impl] += time_round(step, sync, steps, max_time)
    return times


def summary(times):
    import numpy as np

    q1, median, q3 = (float(q) for q in np.percentile(times, [25, 50, 75]))
    return {"median": median, "q1": q1, "q3": q3, "min": float(min(times)),
            "repeats": len(times)}


def ratios(t):
    """The ratios of the medians (None where a side is missing)."""
    def r(a, b):
        return t[a] / t[b] if a in t and b in t else None

    opacus = [k for k in ("opacus hooks", "opacus ghost") if k in t]
    best = min(opacus, key=t.get) if opacus else None
    return {
        "dp_over_plain": r("gpu_mlp DP", "gpu_mlp"),
        "dp_noise0_over_plain": r("gpu_mlp DP noise 0", "gpu_mlp"),
        "dp_over_opacus_hooks": r("gpu_mlp DP", "opacus hooks"),
        "dp_over_opacus_ghost": r("gpu_mlp DP", "opacus ghost"),
        "dp_over_best_opacus": r("gpu_mlp DP", best) if best else None,
        "plain_over_torch": r("gpu_mlp", "torch"),
        "opacus_hooks_over_torch": r("opacus hooks", "torch"),
        "opacus_ghost_over_torch": r("opacus ghost", "torch"),
    }


@contextlib.contextmanager
def _timers(sync):
    """Wrap the parts of gpu_mlp's step in timers; yields the seconds per part."""
    from gpu_mlp import norms, ops, privacy, updates

    spent = {"squares": 0.0, "noise": 0.0, "finish": 0.0, "apply": 0.0,
             "apply in finish": 0.0}
    # privacy looks the norm functions up in gpu_mlp.norms at each call: patched there
    saved = (norms.per_sample_squares, norms.per_sample_gradients, norms.row_squares_into,
             ops.add_gaussian, privacy._Private.finish, updates.Apply.__call__,
             updates.Apply.gradient)

    def timed(name, f):
        def wrapper(*args, **kwargs):
            applied = spent["apply"]
            sync()
            t0 = time.perf_counter()
            try:
                return f(*args, **kwargs)
            finally:
                sync()
                spent[name] += time.perf_counter() - t0
                if name == "finish":  # a private step's updates run inside its finish
                    spent["apply in finish"] += spent["apply"] - applied
        return wrapper

    norms.per_sample_squares = timed("squares", saved[0])
    norms.per_sample_gradients = timed("squares", saved[1])
    norms.row_squares_into = timed("squares", saved[2])
    ops.add_gaussian = timed("noise", saved[3])
    privacy._Private.finish = timed("finish", saved[4])
    updates.Apply.__call__ = timed("apply", saved[5])
    updates.Apply.gradient = timed("apply", saved[6])
    try:
        yield spent
    finally:
        (norms.per_sample_squares, norms.per_sample_gradients, norms.row_squares_into,
         ops.add_gaussian, privacy._Private.finish, updates.Apply.__call__,
         updates.Apply.gradient) = saved


def _parts(spent, total):
    """Seconds per part of one step from its timers (the noise is added inside Apply,
    a private step's Apply calls run inside its finish)."""
    return {"per-sample norms": spent["squares"], "noise": spent["noise"],
            "clip factors + row scaling": spent["finish"] - spent["apply in finish"],
            "update GEMMs": spent["apply"] - spent["noise"],
            "forward + backward + rest": (total - spent["squares"] - spent["finish"]
                                          - (spent["apply"] - spent["apply in finish"])),
            "total": total}


def breakdown(cases, rounds, steps, settle):
    """Median milliseconds per part of each of gpu_mlp's steps in ``cases``, over
    ``rounds`` interleaved rounds of one untimed and ``steps`` timed steps each."""
    import numpy as np

    per_step = {impl: {part: [] for part in PARTS + ("total",)} for impl in cases}
    for _ in range(rounds):
        for impl, (step, sync) in cases.items():
            if settle:
                time.sleep(settle)
            step(capture=False)
            sync()
            for _ in range(steps):
                with _timers(sync) as spent:
                    sync()
                    t0 = time.perf_counter()
                    step(capture=False)
                    sync()
                    total = time.perf_counter() - t0
                for part, seconds in _parts(spent, total).items():
                    per_step[impl][part].append(seconds)
    return {impl: {part: float(np.median(v)) * 1e3 for part, v in parts.items()}
            for impl, parts in per_step.items()}


# --- the report ---------------------------------------------------------------------------

def _ms(t, impl):
    return f"{t[impl] * 1e3:.2f}" if impl in t else "n/a"


def _source(env) -> str:
    src = env.get("gpu_mlp_source") or {}
    if not src.get("commit"):
        return ""
    return (f"; gpu_mlp at {src['commit'][:12]}"
            + (f" with uncommitted changes (sources sha256 {src['sha256_of_gpu_mlp_py'][:12]})"
               if src.get("dirty") else ""))


def _load(values):
    return "/".join(f"{v:.2f}" for v in values) if values else "n/a"


def _x(value):
    return f"{value:.2f}" if value is not None else "n/a"


def report(result) -> str:
    from bench import harness

    env, cfg = result["environment"], result["config"]
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v)
    where = env.get("gpu", {}).get("name") if cfg["device"] == "cuda" else env.get("cpu")
    lines = [f"# One DP-SGD step: gpu_mlp against plain SGD, PyTorch and Opacus, "
             f"{cfg['device']}, {cfg['dtype']}",
             "", f"`{env['command']}`", "",
             f"{where}; {env['logical_cpus']} logical CPUs; threads: BLAS/OpenMP "
             f"{env['threads']['OMP_NUM_THREADS']}, torch {env['threads'].get('torch')}, "
             f"gpu_mlp's CPU noise {env['threads'].get('gpu_mlp_noise')}; "
             f"{env['platform']}; Python {env['python']}; load average at the start "
             f"{_load(env.get('loadavg_at_start'))}; OPENBLAS_THREAD_TIMEOUT "
             f"{env.get('OPENBLAS_THREAD_TIMEOUT') or 'unset'}; BLAS: "
             f"{harness.describe_blas(env.get('blas'))}", "", versions + _source(env),
             "",
             f"DP: max_grad_norm {CLIP}, noise_multiplier {SIGMA}; SGD lr {LR}; softmax "
             f"cross-entropy, mean over the batch. Median ms per step over "
             f"{cfg['rounds']} interleaved rounds of {cfg['steps']} steps (or "
             f"{cfg['max_time']} s) per implementation; spread: the largest ratio of the "
             f"third to the first quartile among the row's implementations (near 1: a quiet "
             f"machine); load after: the 1-minute load average after the row, this run's own "
             f"threads included.", "",
             "| net | batch | gpu_mlp | gpu_mlp DP | DP noise 0 | torch | opacus hooks | "
             "opacus ghost | DP / plain | DP noise 0 / plain | DP / best opacus | "
             "plain / torch | spread | load after |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | "
             "---: | ---: | ---: |"]
    for r in result["records"]:
        t = {impl: s["median"] for impl, s in r["time_s"].items()}
        q = r["ratios"]
        lines.append(f"| {r['net']} | {r['batch']} | " + " | ".join(_ms(t, i) for i in IMPLS)
                     + f" | {_x(q['dp_over_plain'])} | {_x(q['dp_noise0_over_plain'])} | "
                     f"{_x(q['dp_over_best_opacus'])} | {_x(q['plain_over_torch'])} | "
                     f"{_x(max((s['q3'] / s['q1'] for s in r['time_s'].values()), default=None))}"
                     f" | {_load(r.get('loadavg', [])[:1])} |")
    notes = [f"- {r['net']}, batch {r['batch']}, {impl}: {msg}"
             for r in result["records"] for impl, msg in r["errors"].items()]
    if notes:
        lines += ["", "Failed:", ""] + notes
    checks = [f"- {r['net']}, batch {r['batch']}: " + (
        r["agreement"]["error"] if "error" in r["agreement"] else
        f"max |W_gpu_mlp - W_opacus| {r['agreement']['max_abs_weight_diff']:.2e} "
        f"(largest weight change {r['agreement']['max_abs_weight_change']:.2e})")
        for r in result["records"] if r.get("agreement")]
    if checks:
        lines += ["", "One noise-free private step at lr 1, gpu_mlp against Opacus (hooks), "
                      "from the same weights:", ""] + checks
    rows = [r for r in result["records"] if r.get("breakdown_ms")]
    if rows:
        lines += ["", "Where gpu_mlp's steps go (`--breakdown`: median ms per part over "
                      "further interleaved steps, a timer around each part; each column's "
                      "median on its own, so the parts need not add up to the total):", "",
                  "| net | batch | step | " + " | ".join(PARTS) + " | total |",
                  "| --- | ---: | --- |" + " ---: |" * (len(PARTS) + 1)]
        for r in rows:
            for impl, b in r["breakdown_ms"].items():
                lines.append(f"| {r['net']} | {r['batch']} | {impl} | "
                             + " | ".join(f"{b[p]:.2f}" for p in PARTS + ("total",)) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, ROOT)  # run from a checkout: gpu_mlp and bench need no install
    from bench import pin_environment  # (imports nothing that reads the environment)

    pin_environment(args.threads, tf32=False)
    if args.openblas_thread_timeout is not None:
        os.environ["OPENBLAS_THREAD_TIMEOUT"] = str(args.openblas_thread_timeout)

    # only now, with the environment set: these load NumPy, SciPy and PyTorch
    from bench import harness

    harness.configure(args.threads, tf32=False)
    # Opacus's hooks on a first layer whose input needs no gradient: PyTorch says so once
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    env = harness.environment([args.device], args.threads, False, out=args.out)
    try:
        import threadpoolctl

        env["threadpools"] = [{k: p.get(k) for k in ("user_api", "internal_api",
                                                      "num_threads", "version")}
                              for p in threadpoolctl.threadpool_info()]
    except ImportError:
        pass
    try:
        import opacus

        env["versions"]["opacus"] = opacus.__version__
    except ImportError:
        env["versions"]["opacus"] = None
    config = {"device": args.device, "dtype": args.dtype, "threads": args.threads,
              "nets": {n: NETS[n] for n in args.nets}, "batches": args.batches,
              "impls": args.impls, "rounds": args.rounds, "steps": args.steps,
              "max_time": args.max_time, "settle": args.settle, "lr": LR,
              "max_grad_norm": CLIP, "noise_multiplier": SIGMA, "quick": args.quick}
    env["OPENBLAS_THREAD_TIMEOUT"] = os.environ.get("OPENBLAS_THREAD_TIMEOUT")
    from gpu_mlp import ops

    noise_threads = getattr(ops, "NOISE_THREADS", None)  # the CPU noise's own pool
    env["threads"]["gpu_mlp_noise"] = (min(noise_threads, os.cpu_count() or 1)
                                       if noise_threads else None)
    env["gpu_mlp_source"] = harness.source_state()
    # other processes on the machine show here: a busy CPU slows threaded BLAS badly
    env["loadavg_at_start"] = list(os.getloadavg())
    result = {"environment": env, "config": config, "records": []}
    os.makedirs(args.out, exist_ok=True)
    for net_name in args.nets:
        layers, sample_shape = net_layers(net_name)
        for batch in args.batches:
            params, X, y = problem(layers, sample_shape, batch, args.dtype)
            cases, errors = {}, {}
            for impl in args.impls:
                try:
                    step, sync = build(impl, layers, params, X, y, args.device)
                    for _ in range(2):  # warm-up: first-call allocations and caches
                        step()
                    sync()
                    cases[impl] = (step, sync)
                except Exception as exc:  # one implementation failing must not stop the run
                    errors[impl] = _error(exc)
            times = interleaved(cases, args.rounds, args.steps, args.max_time, args.settle)
            record = {"net": net_name, "model": NETS[net_name][0], "batch": batch,
                      "time_s": {impl: summary(v) for impl, v in times.items()},
                      "errors": errors,
                      "agreement": agreement(layers, params, X, y, args.device)}
            record["ratios"] = ratios({i: s["median"] for i, s in record["time_s"].items()})
            ours = {impl: cases[impl] for impl in IMPLS[:3] if impl in cases}
            if args.breakdown and ours:
                record["breakdown_ms"] = breakdown(ours, max(1, args.rounds // 2), args.steps,
                                                   args.settle)
            cases = None
            record["loadavg"] = list(os.getloadavg())  # 1, 5 and 15 minutes, after it
            result["records"].append(record)
            t, q = record["time_s"], record["ratios"]
            print(f"{net_name:>20} B={batch:<5} " + ", ".join(
                f"{impl} {s['median'] * 1e3:.2f} ms" for impl, s in t.items())
                + f"; DP/plain {_x(q['dp_over_plain'])}, DP/best opacus "
                f"{_x(q['dp_over_best_opacus'])}, plain/torch {_x(q['plain_over_torch'])}"
                + "".join(f"; {impl} failed: {msg}" for impl, msg in errors.items()),
                flush=True)
            for impl, parts in record.get("breakdown_ms", {}).items():
                print(f"{'':>28}{impl:>19}: " + ", ".join(
                    f"{k} {v:.2f}" for k, v in parts.items()), flush=True)
            with open(os.path.join(args.out, "results.json"), "w") as f:
                json.dump(result, f, indent=1)  # after every config: a cut run keeps them
    with open(os.path.join(args.out, "report.md"), "w") as f:
        f.write(report(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
