"""The command line: ``gpu-mlp train`` and ``gpu-mlp info`` (or ``python -m gpu_mlp ...``).

``gpu-mlp train`` with no options trains a 64-128-10 ReLU network on the built-in
digits and prints the test accuracy (about 0.97, in about a second on a CPU). Bad input
ends with one line, ``gpu-mlp: error: ...``, on stderr and exit status 2; Ctrl-C and
SIGTERM end a run with one line that says how to resume it, and status 130 or 143.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import math
import os
import platform
import signal
import sys
import threading
import warnings
from dataclasses import dataclass
from typing import Optional

import numpy as np

from . import _checks, activations, checkpoint, datasets, optim, plotting, privacy, training
from ._version import __version__
from .device import DEVICES, gpu_available, to_numpy
from .layers import Conv2d, Dense
from .mlp import MLP
from .network import MEMORY_MODES, Network
from .plan import StepPlan

# What `train` uses unless told otherwise. On the digits: 0.96-0.98 test accuracy for
# every seed tried with the MLP, in about a second on two CPU cores; 0.98-0.99 with the
# CNN, in about a second of training (0.9-1.2 s measured on two cores).
DEFAULTS = {"model": "mlp", "hidden": [128], "channels": [32, 64], "memory": "output",
            "epochs": 30, "batch_size": 32, "seed": 0, "dtype": "float32",
            "test_fraction": 0.2}
DATA = {  # per data set: the losses it takes (the first is the default) and defaults;
    # "image" is the shape of one sample for --model cnn (None: not images)
    "digits": {"losses": ("softmax_cross_entropy", "squared"), "activation": "relu",
               "lr": 0.1, "momentum_lr": 0.01, "image": (1, 8, 8)},
    "regression": {"losses": ("squared",), "activation": "tanh", "lr": 0.05,
                   "momentum_lr": 0.005, "image": None},
}
MODELS = ("mlp", "cnn")
# --optimizer: the kinds of gpu_mlp.optim (KINDS), each with the options it takes (the
# others are refused); the learning rate unless --lr: sgd's and momentum's per data set
# (above: momentum 0.9 takes a tenth, for the same lr / (1 - momentum)), Adam's 1e-3
OPTIMIZERS = tuple(optim.KINDS)
OPTIMIZER_OPTIONS = {name: kind.options for name, kind in optim.KINDS.items()}
ADAM_LR = 1e-3
OPTIMIZER_DEFAULTS = {"momentum": 0.9, "betas": (0.9, 0.999), "eps": 1e-8, "gamma": 0.1,
                      "warmup": 0, "min_lr": 0.0, "schedule": "constant"}
# which options each schedule takes (total_steps is the run's)
SCHEDULE_OPTIONS = {"constant": (), "step": ("step_size", "gamma"), "cosine": ("warmup", "min_lr")}
DP_DEFAULTS = {"delta": 1e-5, "accountant": "rdp"}
# the scalars of a step (gpu_mlp._checks.step_scalars) by the options that set them
SCALAR_OPTIONS = {"lr": "--lr", "momentum": "--momentum", "weight_decay": "--weight-decay",
                  "eps": "--eps", "beta1": "--betas' first", "beta2": "--betas' second",
                  "lr * weight_decay": "--lr times --weight-decay", "max_grad_norm": "--dp-clip",
                  "noise_multiplier": "--dp-noise",
                  "noise_multiplier * max_grad_norm": "--dp-noise times --dp-clip"}
# 128 + the signal, what a shell reports for a command that a signal ended: SIGINT
# (Ctrl-C), SIGTERM (what timeout, Slurm and Docker send)
EXIT_ERROR, EXIT_INTERRUPTED, EXIT_TERMINATED = 2, 130, 143
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what a shell reports for a command cut off by `head`


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad command line in one line (no usage block)."""

    def error(self, message):
        self.exit(EXIT_ERROR, f"gpu-mlp: error: {message} (see {self.prog} --help)\n")


def _widths(text: str) -> list[int]:
    try:
        widths = [int(w) for w in text.split(",")] if text.strip() else []
    except ValueError:
        widths = None
    if widths is None or any(not 1 <= w < 2**63 for w in widths):  # an array's index range
        raise argparse.ArgumentTypeError(f"expected comma-separated widths in [1, 2^63), "
                                         f"got {text!r}")
    return widths


def _integer(minimum: int, below: Optional[int] = None):
    """An argparse type: an integer >= ``minimum`` (and < ``below``)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum or (below is not None and value >= below):
            interval = _checks.integer_interval(minimum, below)
            raise argparse.ArgumentTypeError(f"expected an integer {interval}, got {text!r}")
        return value
    return parse


def _path(text: str) -> str:
    """An argparse type: a non-empty path ('' would read as "not given" later)."""
    if not text:
        raise argparse.ArgumentTypeError("expected a path, got ''")
    return text


def _number(accept, expected: str):
    """An argparse type: a finite number for which ``accept(value)`` holds."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = float("nan")
        if not (np.isfinite(value) and accept(value)):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value
    return parse


def _betas(text: str) -> tuple[float, float]:
    """An argparse type: two numbers in [0, 1), comma-separated."""
    try:
        betas = tuple(float(b) for b in text.split(","))
    except ValueError:
        betas = ()
    if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
        raise argparse.ArgumentTypeError(f"expected two numbers in [0, 1), comma-separated, "
                                         f"got {text!r}")
    return betas


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="gpu-mlp", description="Train multilayer perceptrons and "
                     "convolutional networks with hand-written backprop on an NVIDIA GPU "
                     "(CuPy) or the CPU (NumPy).")
    parser.add_argument("--version", action="version", version=f"gpu_mlp {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser("info", help="show the version and what gpu_mlp can run on")

    train = commands.add_parser(
        "train", help="train on built-in data and print the test accuracy (or loss)",
        description="Train an MLP or a CNN on built-in data (minibatch SGD, SGD with "
                    "momentum, Adam or AdamW, with a learning-rate schedule), evaluate it on a "
                    "held-out test split (which also gives the validation curves) and "
                    "print the result; the last line is 'test accuracy: ...' for the "
                    "digits, 'test loss: ...' for the regression set.")
    D = DEFAULTS
    data = train.add_argument_group("data")
    data.add_argument("--data", choices=sorted(DATA),
                      help="digits: the 8x8 handwritten digits shipped with gpu_mlp (1797 "
                           "images, 10 classes); regression: a synthetic set (2000 samples, "
                           "8 features, 1 target) for the squared loss (default: digits; "
                           "with --resume the checkpoint's)")
    fraction = _number(lambda v: 0 < v < 1, "a number strictly between 0 and 1")
    data.add_argument("--test-fraction", type=fraction, metavar="F",
                      help="share of the samples held out for testing (default: 0.2; with "
                           "--resume the checkpoint's run's)")

    model = train.add_argument_group("model (with --resume: taken from the checkpoint)")
    model.add_argument("--model", choices=MODELS,
                       help="mlp: dense layers (--hidden, --sizes); cnn: 3x3 convolutions "
                            "(--channels; the first with stride 1, the others stride 2, "
                            "padding 1), then a dense output layer, for image data "
                            f"(default: {D['model']})")
    model.add_argument("--channels", type=_widths, metavar="WIDTHS",
                       help=f"--model cnn: channels of each convolution, comma-separated "
                            f"(default: {','.join(map(str, D['channels']))})")
    widths = model.add_mutually_exclusive_group()
    widths.add_argument("--hidden", type=_widths, metavar="WIDTHS",
                        help=f"hidden layer widths, comma-separated, e.g. 256,128; '' for "
                             f"none (default: {','.join(map(str, D['hidden']))})")
    widths.add_argument("--sizes", type=_widths, metavar="WIDTHS",
                        help="every layer width, input and output included, e.g. "
                             "64,128,10; must fit the data")
    model.add_argument("--activation", metavar="NAME",
                       help="hidden-layer activation: identity, relu, 'relu(alpha=A)', "
                            "sigmoid, tanh, gelu or softmax; the output layer is identity "
                            "(default: relu for the digits, tanh for the regression set)")
    model.add_argument("--loss", metavar="NAME",
                       help="softmax_cross_entropy or squared (one-hot targets) for the "
                            "digits, squared for the regression set (default: the first)")
    model.add_argument("--memory", choices=MEMORY_MODES,
                       help="what the forward pass keeps for backward: the outputs, the "
                            f"pre-activations, or both (default: {D['memory']}, or "
                            f"recompute for an activation whose derivative needs its "
                            f"input, as gelu's)")
    model.add_argument("--dtype", choices=("float32", "float64"),
                       help=f"floating-point type (default: {D['dtype']})")

    run = train.add_argument_group("training (with --resume: taken from the checkpoint)")
    run.add_argument("--epochs", type=_integer(1, 2**64), default=D["epochs"], metavar="N",
                     help=f"passes over the training data; with --resume the total, done "
                          f"epochs included (default: {D['epochs']})")
    run.add_argument("--batch-size", type=_integer(1, 2**64), metavar="B",
                     help=f"samples per SGD step (default: {D['batch_size']})")
    run.add_argument("--optimizer", choices=OPTIMIZERS,
                     help="sgd: plain SGD, fused into the gradient GEMM (no state); "
                          "momentum: SGD with momentum (--momentum, --nesterov); adam: Adam, "
                          "weight decay added to the gradient; adamw: AdamW, decoupled weight "
                          "decay (--betas, --eps); PyTorch's update rules (default: sgd)")
    run.add_argument("--lr", type=_number(lambda v: v > 0, "a number > 0"), metavar="LR",
                     help="(base) learning rate (default: with sgd 0.1 for the digits, 0.05 "
                          "for the regression set; with momentum a tenth of that; with adam "
                          f"and adamw {ADAM_LR})")
    run.add_argument("--momentum", type=_number(lambda v: 0 <= v < 1, "a number in [0, 1)"),
                     metavar="M", help="--optimizer momentum: the momentum (default: "
                                       f"{OPTIMIZER_DEFAULTS['momentum']})")
    run.add_argument("--nesterov", action="store_true", default=None,
                     help="--optimizer momentum: Nesterov momentum")
    run.add_argument("--weight-decay", type=_number(lambda v: v >= 0, "a number >= 0"),
                     metavar="WD", help="weight decay, on weights and biases: added to the "
                                        "gradient as WD * W (sgd, momentum, adam) or decoupled, "
                                        "W <- W (1 - lr WD) (adamw) (default: 0; 0.01 for adamw)")
    run.add_argument("--betas", type=_betas, metavar="B1,B2",
                     help="--optimizer adam or adamw: the decay rates of the moments, each in "
                          "[0, 1) (default: 0.9,0.999)")
    run.add_argument("--eps", type=_number(lambda v: v > 0, "a number > 0"), metavar="EPS",
                     help="--optimizer adam or adamw: added to the denominator (default: "
                          f"{OPTIMIZER_DEFAULTS['eps']})")
    run.add_argument("--schedule", choices=tuple(optim.SCHEDULES),
                     help="the learning rate per step (one step per batch): constant; step: "
                          "times --gamma every --step-size steps; cosine: --warmup steps of "
                          "linear warm-up to --lr, then a cosine decay to --min-lr at the "
                          "run's last step (default: constant)")
    run.add_argument("--warmup", type=_integer(0, 2**64), metavar="STEPS",
                     help="--schedule cosine: steps of linear warm-up (default: 0)")
    run.add_argument("--min-lr", type=_number(lambda v: v >= 0, "a number >= 0"),
                     metavar="LR", help="--schedule cosine: the learning rate it decays to "
                                        "(default: 0)")
    run.add_argument("--step-size", type=_integer(1, 2**64), metavar="STEPS",
                     help="--schedule step: steps between two decays (default: a third of the "
                          "run's steps, rounded up)")
    run.add_argument("--gamma", type=_number(lambda v: 0 < v <= 1, "a number in (0, 1]"),
                     metavar="G", help="--schedule step: the factor of each decay (default: "
                                       f"{OPTIMIZER_DEFAULTS['gamma']})")
    run.add_argument("--seed", type=_integer(0, 2**64), metavar="S",
                     help="seeds the test split, the initial weights and the order of "
                          f"the batches (default: {D['seed']})")
    run.add_argument("--device", choices=DEVICES, default="auto",
                     help="cuda (CuPy), cpu (NumPy), or auto: cuda if CuPy sees a GPU "
                          "(default: auto)")

    private = train.add_argument_group(
        "differential privacy (DP-SGD; with --resume: taken from the checkpoint)")
    private.add_argument("--dp-clip", type=_number(lambda v: v > 0, "a number > 0"),
                         metavar="C", help="train privately: clip each sample's gradient "
                                           "to norm C; needs --dp-noise or --dp-epsilon")
    noise = private.add_mutually_exclusive_group()
    noise.add_argument("--dp-noise", type=_number(lambda v: v >= 0, "a number >= 0"),
                       metavar="SIGMA", help="the noise multiplier: Gaussian noise of "
                                             "standard deviation SIGMA * C on the summed "
                                             "gradient")
    noise.add_argument("--dp-epsilon", type=_number(lambda v: v > 0, "a number > 0"),
                       metavar="EPS", help="the epsilon to reach after all epochs: the "
                                           "noise multiplier is solved for it")
    private.add_argument("--dp-delta", type=_number(lambda v: 0 < v < 1, "a number in (0, 1)"),
                         metavar="DELTA", help=f"the delta of the (epsilon, delta) guarantee "
                                               f"(default: {DP_DEFAULTS['delta']})")
    private.add_argument("--dp-accountant", choices=("rdp", "pld"),
                         help=f"the dp-accounting accountant (default: "
                              f"{DP_DEFAULTS['accountant']})")
    private.add_argument("--dp-seed", type=_integer(0, 2**64), metavar="S",
                         help="the seed of the noise and of the Poisson sampling (default: "
                              "64 secret bits from the operating system, kept in --save's "
                              "checkpoint; a seed others know makes the noise predictable: "
                              "for reproductions, not for privacy)")

    parallel = train.add_argument_group(
        "data parallel (under mpirun or srun: one process per rank, found by itself)")
    parallel.add_argument("--comm-path", choices=("auto", "allreduce", "gather"),
                          default="auto",
                          help="how ranks sum a layer's gradient: allreduce it, all-gather "
                               "its factors, or auto: per layer, whichever sends fewer "
                               "bytes (default: auto)")

    output = train.add_argument_group("output")
    output.add_argument("--save", type=_path, metavar="PATH",
                        help="write a checkpoint (.npz) after every epoch, atomically; "
                             "refused if PATH exists, unless --resume names it or "
                             "--overwrite is given")
    output.add_argument("--overwrite", action="store_true",
                        help="let --save replace an existing file (a checkpoint of "
                             "another run is lost)")
    output.add_argument("--resume", type=_path, metavar="PATH",
                        help="continue the run saved in this checkpoint, batch for batch "
                             "as if it had not stopped")
    output.add_argument("--plot", type=_path, metavar="PATH",
                        help="write loss and accuracy curves to this image (e.g. "
                             "curves.png); needs matplotlib: pip install 'gpu_mlp[plot]'. "
                             "A plot that cannot be written at the end is a warning: the "
                             "results are printed and the exit status stays 0")
    output.add_argument("--quiet", action="store_true",
                        help="print only the results: no progress bars, no header")
    return parser


def main(argv=None) -> int:
    """Run the command line; returns the exit status."""
    parser = build_parser()
    try:
        # under a launcher every rank parses the line: rank 0 alone prints help and errors
        with _silenced() if _launcher_rank() > 0 else contextlib.nullcontext():
            args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version and bad command lines
        return e.code
    try:
        with _sigterm_as_interrupt():
            status = info() if args.command == "info" else train(args)
            sys.stdout.flush()  # a closed pipe shows here, not at the interpreter's exit
        return status
    except BrokenPipeError:
        # the reader went away (`gpu-mlp train | head`): stop quietly. Python's docs
        # advise pointing stdout at devnull, so that its flush at exit cannot fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except KeyboardInterrupt as e:
        return _interrupted(args, e)
    except USER_ERRORS as e:
        print(f"gpu-mlp: error: {_one_line(e)}", file=sys.stderr)
        return EXIT_ERROR


@contextlib.contextmanager
def _silenced():
    """Within: what is printed goes nowhere."""
    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull), \
            contextlib.redirect_stderr(devnull):
        yield


def _interrupted(args, error: KeyboardInterrupt, say: bool = True) -> int:
    """Say that Ctrl-C or SIGTERM stopped the run (and how to go on from its last
    checkpoint); returns the exit status."""
    if say:
        saved = getattr(args, "save", None)
        hint = f"; continue with --resume {saved}" if saved and _holds_this_run(args) else ""
        print(f"gpu-mlp: interrupted{hint}", file=sys.stderr, flush=True)
    return EXIT_TERMINATED if isinstance(error, _Terminated) else EXIT_INTERRUPTED


def _holds_this_run(args) -> bool:
    """Whether --save holds this run's checkpoint: one it saved, or the one it resumed
    (not another run's file that --overwrite was to replace at its first epoch)."""
    if not os.path.exists(args.save):
        return False
    return bool(getattr(args, "saved_epochs", 0)) or _saves_over_its_resume(args)


def _saves_over_its_resume(args) -> bool:
    """Whether --save names the (existing) file that --resume continues."""
    resume = getattr(args, "resume", None)
    return bool(resume and os.path.exists(resume) and os.path.exists(args.save)
                and os.path.samefile(args.save, resume))


# what ends a run with one line of error rather than a traceback: bad input and what
# the system refused (memory for a model too large included)
USER_ERRORS = (ValueError, TypeError, OSError, RuntimeError, ImportError, MemoryError,
               OverflowError)


def _one_line(error) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def _reason(error) -> str:
    """What went wrong, for a message that names the file itself: an OSError's text
    without its errno and file name ("no space left on device")."""
    text = getattr(error, "strerror", None) or _one_line(error)
    return text[0].lower() + text[1:]


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C raises KeyboardInterrupt."""


def _terminate(signum, frame):
    raise _Terminated


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """Stop on SIGTERM as on Ctrl-C: the checkpoints saved are complete, no temporary
    file is left behind and the last line says how to resume (Python's default for
    SIGTERM is to die on the spot)."""
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread may set handlers (and only it gets the signals)
        return
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def info() -> int:
    import scipy

    print(f"gpu_mlp {__version__}")
    print(f"python {platform.python_version()}, numpy {np.__version__}, scipy {scipy.__version__}")
    for module, missing in (("cupy", "pip install 'gpu_mlp[cuda12]' or 'gpu_mlp[cuda13]'"),
                            ("matplotlib", "--plot needs pip install 'gpu_mlp[plot]'")):
        try:
            print(f"{module} {importlib.import_module(module).__version__}")
        except ImportError:
            print(f"{module}: not installed ({missing})")
    if gpu_available():
        import cupy

        name = cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
        print(f"gpu: {name} (device 'auto' uses it)")
    else:
        print("gpu: none found (device 'auto' uses the CPU)")
    return 0


def train(args) -> int:
    comm = _communicator(args)  # first: a GPU rank picks its device before any array
    if comm is None:
        return _train(args, None, print)
    # An error on one rank must end them all, or the others wait for it forever in the
    # next collective: bad input in one line, then MPI_Abort; anything else with its
    # traceback (comm.guard)
    with comm.guard():
        try:
            return _train(args, comm, print if comm.is_root else _silent)
        except USER_ERRORS as e:
            if getattr(e, "every_rank", False):
                # raised alike by every rank (a divergence, configurations that differ):
                # no rank waits in a collective, so each ends itself; rank 0 says why
                if comm.is_root:
                    print(f"gpu-mlp: error: {_one_line(e)}", file=sys.stderr, flush=True)
                return EXIT_ERROR
            print(f"gpu-mlp: error: rank {comm.rank}: {_one_line(e)}", file=sys.stderr,
                  flush=True)
            comm.abort(EXIT_ERROR)
        except KeyboardInterrupt as e:
            # Ctrl-C reaches every rank, and the launcher SIGTERMs the others when one
            # rank aborts: one line from rank 0 (it holds --save), no traceback
            comm.abort(_interrupted(args, e, say=comm.is_root))


def _silent(*args, **kwargs) -> None:
    """Where a data-parallel rank other than 0 prints: only rank 0 speaks."""


def _train(args, comm, out) -> int:
    """The run, holding --save for it (on the rank that saves): a second run given the
    same file fails at its start instead of saving over this one's checkpoints."""
    with contextlib.ExitStack() as held:
        def hold():
            if args.save and out is not _silent:
                try:
                    held.enter_context(checkpoint.hold(args.save))
                except (checkpoint.CheckpointInUse, OSError) as e:
                    raise type(e)(f"--save {_one_line(e)}") from None
        return _run(args, comm, out, hold)


def _run(args, comm, out, hold) -> int:
    """One run, step by step: what it resumes and its settings, the data, the model, the
    plan of its steps, then the training and the report. ``hold()``: hold --save."""
    root = out is not _silent
    quiet = args.quiet or not root

    def say(line):
        if not quiet:
            out(line, flush=True)  # seen now, not when the training is over

    def prepare():
        hold()
        if root:
            _check_outputs(args)
        resumed = _resume(args)
        settings = _settings(args, resumed)
        data = _data(args, resumed, settings)
        net = _model(args, resumed, data, settings)
        return resumed, settings, data, net, _plan(args, resumed, data, settings, comm, net)

    resumed, settings, data, net, plan = _agreed(comm, prepare)
    _announce(args, say, root, resumed, data, net, plan, settings)
    done = resumed.history.epochs if resumed else 0
    history = _fit(args, root, quiet, resumed, data, net, plan, settings)
    _report(args, out, say, root, data, net, plan, history, done)
    return 0


def _agreed(comm, prepare):
    """``prepare()``; under mpirun every rank then hears whether it failed on any
    (:meth:`~gpu_mlp.distributed.Communicator.settle`), so that a bad option, which every
    rank meets alike, or rank 0's --save that exists, ends the run with one line from
    rank 0 and no MPI_Abort."""
    if comm is None:
        return prepare()
    return comm.settled("the run's setup", prepare, catch=USER_ERRORS)


@dataclass
class _Settings:
    """The training settings of a run: the command line's, else the checkpoint's, else
    the defaults."""

    seed: int
    batch_size: int
    kind: str  # of optimizer: a name of optim.KINDS
    lr: float  # the (base) learning rate
    stored_loss: Optional[str]  # the checkpoint's loss (None for a new run)


@dataclass
class _Data:
    """The data of a run, split, and what the model must fit."""

    X_train: np.ndarray
    X_test: np.ndarray
    Y_train: np.ndarray
    Y_test: np.ndarray
    classes: int  # 0 for regression
    outputs: int
    model: str  # "mlp" or "cnn"
    loss: str

    def steps(self, epochs: int, batch_size: int) -> int:
        """The steps of a run of ``epochs`` epochs, in all."""
        return epochs * -(-len(self.X_train) // batch_size)

    def sample_rate(self, batch_size: int) -> float:
        return privacy.sample_rate(batch_size, len(self.X_train))


def _resume(args):
    """The checkpoint of --resume (None for a new run); sets the run's data set."""
    resumed = _read_resumed(args) if args.resume else None
    if resumed is not None and resumed.history is None:
        raise ValueError(f"{args.resume} holds no training history to resume from")
    args.data = _data_set(args, resumed)  # from here on, the run's
    return resumed


def _settings(args, resumed) -> _Settings:
    stored = _stored_settings(resumed)
    seed = _setting(args.seed, stored.get("seed"), DEFAULTS["seed"])
    batch_size = _setting(args.batch_size, stored.get("batch_size"), DEFAULTS["batch_size"])
    if resumed:
        _check_matches(args, {"--seed": (args.seed, stored["seed"]),
                              "--batch-size": (args.batch_size, stored["batch_size"])})
        done = resumed.history.epochs
        if args.epochs < done:
            default = " (the default)" if args.epochs == DEFAULTS["epochs"] else ""
            raise ValueError(f"--epochs {args.epochs}{default}: the checkpoint {args.resume} "
                             f"has trained {done} epochs already; --epochs counts them all "
                             f"(give {done} or more)")
        _check_same_optimizer(args, resumed.optimizer)
        kind = _optimizer_name(resumed.optimizer)
    else:
        kind = _check_optimizer_options(args)
    lr = _setting(args.lr, stored.get("lr"), _default_lr(kind, args.data))
    return _Settings(seed, batch_size, kind, lr, stored.get("loss"))


def _data(args, resumed, settings: _Settings) -> _Data:
    """The data set, shaped for the model and checked against it, split for testing."""
    X, Y, classes = _load_data(args.data)
    outputs = classes or Y.shape[1]
    model = _model_of(resumed.net) if resumed else args.model or DEFAULTS["model"]
    if model == "cnn":
        image = DATA[args.data]["image"]
        if image is None:
            raise ValueError(f"--model cnn needs images; the {args.data} data are not "
                             f"(use --data digits)")
        X = X.reshape(-1, *image)
    if resumed and model == "mlp":
        _check_fits_data(resumed.net.sizes, args.data, X.shape[1], outputs)
    losses = DATA[args.data]["losses"]
    loss = _setting(args.loss, settings.stored_loss, losses[0])
    if loss not in losses:
        source = "--loss" if args.loss else "the checkpoint's loss"
        raise ValueError(f"{source} {loss} does not fit the {args.data} data, which take "
                         f"{' or '.join(losses)}")
    if classes and loss == "squared":
        Y = np.eye(classes)[Y]  # one-hot rows to regress on
    X_train, X_test, Y_train, Y_test = datasets.train_test_split(
        X, Y, _test_fraction(args, resumed, len(X)), settings.seed)
    return _Data(X_train, X_test, Y_train, Y_test, classes, outputs, model, loss)


def _test_fraction(args, resumed, n: int) -> float:
    """--test-fraction, else for a resumed run the share that leaves the training samples
    it trained on (its History's), else the default."""
    trained = resumed.history.samples if resumed else None
    if trained is not None and not 0 < n - trained < n:
        raise ValueError(f"--resume {args.resume}: its run trained on {trained} samples, "
                         f"which the {args.data} data's {n} cannot give with a test split")
    if args.test_fraction is None:
        return DEFAULTS["test_fraction"] if trained is None else (n - trained) / n
    train = n - datasets.held_out_rows(n, args.test_fraction)
    if trained is not None and train != trained:
        raise ValueError(f"--test-fraction {args.test_fraction:g} would train on {train} "
                         f"samples, but the checkpoint {args.resume} trained on {trained}; "
                         f"leave it out to resume")
    return args.test_fraction


def _model(args, resumed, data: _Data, settings: _Settings) -> Network:
    """The checkpoint's net, checked against the options, or a new one. The model is
    checked against the data before it is built: the engine's errors would speak of its
    arguments, not of the data."""
    if not resumed:
        return _new_net(args, data.model, data.X_train.shape[1:], data.outputs, data.loss,
                        settings.seed)
    _check_same_model(args, resumed.net, data.model, data.loss)
    return resumed.net


def _plan(args, resumed, data: _Data, settings: _Settings, comm, net) -> StepPlan:
    """What each step does: the optimizer (or plain SGD), DP and the communication,
    checked against the net (its dtype must carry the step's scalars)."""
    steps = data.steps(args.epochs, settings.batch_size)
    optimizer = (resumed.optimizer if resumed
                 else _new_optimizer(args, settings.kind, settings.lr, steps))
    dp = _private(args, resumed, data.sample_rate(settings.batch_size), steps)
    # plain SGD's rate, when neither --lr nor an optimizer gives it, is the checkpoint's
    # last (its History's): named so, not as an option the user never gave
    from_file = resumed is not None and optimizer is None and args.lr is None
    try:
        plan = StepPlan(settings.lr if optimizer is None else optimizer, dp, comm)
        return plan.check(net)
    except _checks.ScalarOutOfRange as e:  # named as the command line spells it
        name = (f"--resume {args.resume}: its history's last lr" if from_file
                and e.name == "lr" else SCALAR_OPTIONS.get(e.name, e.name))
        raise ValueError(f"{name} {e.value:g} {e.requirement} (--dtype)") from None
    except ValueError as e:
        if from_file and str(e).startswith("lr "):
            raise ValueError(f"--resume {args.resume}: its history's last {e}") from None
        raise


def _announce(args, say, root, resumed, data: _Data, net, plan: StepPlan,
              settings: _Settings) -> None:
    """What the run is about to do, and warnings about its settings."""
    classes, outputs = data.classes, data.outputs
    kind = f"{classes} classes" if classes else f"{outputs} target(s)"
    features = "x".join(map(str, data.X_train.shape[1:]))
    say(f"data: {args.data}, {len(data.X_train)} training and {len(data.X_test)} test "
        f"samples, {features} features, {kind}")
    say(f"model: {net}")
    if not resumed and args.memory is None and net.memory != DEFAULTS["memory"]:
        say(f"note: --memory {net.memory}, as {net.activations[0]}'s derivative needs its "
            f"input")
    if resumed:
        say(f"resuming {args.resume} after epoch {resumed.history.epochs}")
    how = f"lr {plan.lr}" if plan.plain else repr(plan.rule)
    say(f"training: {args.epochs} epochs, batch size {settings.batch_size}, {how}, seed "
        f"{settings.seed}")
    dp, comm = plan.dp, plan.comm
    if dp is not None:
        say(f"privacy: DP-SGD, Poisson sampling, clip {dp.max_grad_norm:g}, noise multiplier "
            f"{dp.noise_multiplier:.4g}, delta {dp.delta:g} ({dp.accountant} accountant)")
    if comm is not None:
        convs = ", the convolutions' by allreduce" if args.comm_path == "gather" and any(
            not isinstance(layer, Dense) for layer in net.layers) else ""
        say(f"data parallel: {comm.size} ranks, gradients summed by {args.comm_path}"
            f"{convs} (each global batch of {settings.batch_size} split across them)")
    steps = data.steps(args.epochs, settings.batch_size)
    schedule = plan.rule.schedule
    if not plan.plain and isinstance(schedule, optim.Cosine) and schedule.total_steps < steps \
            and root:
        print(f"gpu-mlp: warning: the cosine schedule ends at step {schedule.total_steps} "
              f"of {steps}: the steps after it run at its min_lr {schedule.min_lr}",
              file=sys.stderr)
    if resumed and dp is not None and dp.target_epsilon is not None and root:
        spent = dp.epsilon(data.sample_rate(settings.batch_size), steps)
        if spent > dp.target_epsilon * (1 + 1e-3):  # more epochs than it was solved for
            print(f"gpu-mlp: warning: the noise was set for epsilon {dp.target_epsilon:g}; "
                  f"{args.epochs} epochs spend {spent:.4g} at delta {dp.delta:g}",
                  file=sys.stderr)


def _fit(args, root, quiet, resumed, data: _Data, net, plan: StepPlan, settings: _Settings):
    """Train by ``plan``, saving a checkpoint after every epoch with --save; the History."""

    def save(net, history):
        try:
            checkpoint.save(net, args.save, history=history, plan=plan, data=args.data)
            args.saved_epochs = history.epochs  # the file is this run's now
        except OSError as e:  # a full disk, say: the atomic save kept the last one
            kept = ("the file holds the last checkpoint, intact" if os.path.exists(args.save)
                    else "no checkpoint was written")
            raise OSError(f"--save {args.save}: epoch {history.epochs} not saved "
                          f"({_reason(e)}); {kept}") from None

    with np.errstate(over="ignore", invalid="ignore"), \
            warnings.catch_warnings(record=True) as caught:  # fit reports a divergence
        warnings.simplefilter("always", training.TrainingWarning)
        history = net.fit(data.X_train, data.Y_train, epochs=args.epochs,
                          batch_size=settings.batch_size, plan=plan, seed=settings.seed,
                          validation=(data.X_test, data.Y_test), verbose=not quiet,
                          on_epoch=save if args.save and root else None,
                          resume=resumed.history if resumed else None)
    for warning in caught:  # one line each, as the errors
        if root:
            print(f"gpu-mlp: warning: {warning.message}", file=sys.stderr)
    return history


def _report(args, out, say, root, data: _Data, net, plan: StepPlan, history, done) -> None:
    """The epochs' speed, the files written and the results (the last line: the test
    accuracy for the digits, the test loss for the regression set)."""
    seconds = sum(history.seconds[done:])
    if seconds > 0:
        rate = (history.epochs - done) * len(data.X_train) / seconds
        say(f"trained epochs {done + 1}-{history.epochs} in {seconds:.2f} s "
            f"({rate:,.0f} samples/s)")
    if args.save:
        say(f"checkpoint: {args.save}")
    if args.plot and root:
        title = f"{args.data}: {_architecture(net)}, {net.activations[0]}, {net.loss.name}"
        try:
            plotting.plot_history(history, args.plot, title=title)
            say(f"plot: {args.plot}")
        except USER_ERRORS as e:  # a full disk, say: the results below still count
            print(f"gpu-mlp: warning: --plot {args.plot}: not written ({_reason(e)})",
                  file=sys.stderr)
    if plan.dp is not None:  # (first: the last line is the test's, as --help says)
        out(f"privacy: epsilon {history.epsilon[-1]:.4g} at delta {plan.dp.delta:g}")
    last = history.train_loss[-1]
    out("training loss: none (the last epoch sampled no rows)" if last is None
        else f"training loss: {last:.4f}")
    # of the net as it is (a resumed run with nothing left to train has only its file's)
    out(f"test loss: {training.evaluate(net, data.X_test, data.Y_test)[0]:.4f}")
    if data.classes:  # (by class, whatever the loss: the squared one on one-hot rows too)
        predicted = to_numpy(net.predict(data.X_test)).argmax(axis=1)
        labels = data.Y_test if data.Y_test.ndim == 1 else data.Y_test.argmax(axis=1)
        out(f"test accuracy: {np.mean(predicted == labels):.3f}")


# Set by the launchers for every process of a parallel job, size and rank: Open MPI's
# mpirun, MPICH's and Intel MPI's hydra (PMI), Slurm's srun (per job step). A size alone
# may be a stray (an salloc shell keeps Slurm's): it counts only with its rank.
_LAUNCHERS = (("OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK"), ("PMI_SIZE", "PMI_RANK"),
              ("SLURM_STEP_NUM_TASKS", "SLURM_PROCID"))


def _launcher_rank() -> int:
    """This process's rank when a launcher started it among several (its environment
    says so), else -1."""
    for size, rank in _LAUNCHERS:
        if os.environ.get(size, "").isdigit() and int(os.environ[size]) > 1 \
                and os.environ.get(rank, "").isdigit():
            return int(os.environ[rank])
    return -1


def _communicator(args):
    """The data-parallel communicator when this process is one of several that a
    launcher started, else None."""
    comm = None
    if _launcher_rank() >= 0:
        from . import distributed

        comm = distributed.Communicator(path=args.comm_path)
        if comm.size == 1:  # MPI found no other rank: a plain run after all
            comm = None
    if comm is None and args.comm_path != "auto":
        raise ValueError("--comm-path applies to data-parallel runs, of 2 ranks or more: "
                         "launch gpu-mlp under mpirun or srun with -n 2 or more")
    return comm


DP_OPTIONS = ("dp_clip", "dp_noise", "dp_epsilon", "dp_delta", "dp_accountant", "dp_seed")


def _private(args, resumed, sample_rate: float, steps: int):
    """The DP of the run (None: not private): from the options, or the checkpoint's. Its
    seed is --dp-seed, else drawn secretly."""
    given = {name: getattr(args, name) for name in DP_OPTIONS if getattr(args, name) is not None}
    if resumed is not None:
        dp = resumed.dp
        if dp is None:
            if any(e is not None for e in resumed.history.epsilon):
                raise ValueError(f"--resume {args.resume}: its History records the privacy "
                                 f"spent (epsilon), but it holds no DP settings to go on "
                                 f"with")
            if given:
                raise ValueError(f"{_option(next(iter(given)))}: the checkpoint "
                                 f"{args.resume} trained without differential privacy; "
                                 f"leave the --dp options out to resume it")
            return None
        stored = {"dp_clip": dp.max_grad_norm, "dp_noise": dp.noise_multiplier,
                  "dp_epsilon": dp.target_epsilon, "dp_delta": dp.delta,
                  "dp_accountant": dp.accountant, "dp_seed": dp.seed}
        for name, value in given.items():
            if value != stored[name]:
                has = f"noise multiplier {dp.noise_multiplier}" if stored[name] is None \
                    else "another seed" if name == "dp_seed" else stored[name]  # secret
                raise _differs(args, _option(name), has)
        return dp
    if not given:
        return None
    if "dp_clip" not in given:
        raise ValueError(f"{', '.join(_option(n) for n in given)} "
                         f"{'needs' if len(given) == 1 else 'need'} --dp-clip, the "
                         f"clipping norm that turns DP-SGD on")
    if "dp_noise" not in given and "dp_epsilon" not in given:
        raise ValueError("--dp-clip needs --dp-noise SIGMA or --dp-epsilon EPS")
    delta = given.get("dp_delta", DP_DEFAULTS["delta"])
    accountant = given.get("dp_accountant", DP_DEFAULTS["accountant"])
    noise = "dp_epsilon" if "dp_epsilon" in given else "dp_noise"
    seed = given.get("dp_seed")  # None: drawn, secret (rank 0's on every rank: DP.agree)
    try:  # the accountant's errors name the option that asked it
        if noise == "dp_epsilon":
            return privacy.DP.for_epsilon(given["dp_epsilon"], delta, sample_rate, steps,
                                          given["dp_clip"], seed=seed, accountant=accountant)
        dp = privacy.DP(given["dp_clip"], given["dp_noise"], delta=delta, seed=seed,
                        accountant=accountant)
        dp.epsilon(sample_rate, 1)  # an accountant that cannot count this noise says so now
        return dp
    except ValueError as e:
        raise ValueError(f"{_option(noise)} {given[noise]:g}: {e}") from None


def _check_outputs(args) -> None:
    """Refuse, before any training, output paths that cannot be written, and a --save
    that would replace a checkpoint of another run."""
    targets = {}
    for name, path in (("--save", args.save), ("--plot", args.plot)):
        if path:
            try:
                targets[name] = checkpoint.writable_target(path)
            except OSError as e:
                raise type(e)(f"{name} {_one_line(e)}") from None
    if len(set(targets.values())) < len(targets):  # the plot, written last, would win
        raise ValueError(f"--save {args.save} and --plot {args.plot} name the same file: "
                         f"the plot would replace the checkpoint")
    if args.plot:
        plotting.check_format(args.plot)
    if args.save and os.path.exists(args.save) and not args.overwrite:
        if not _saves_over_its_resume(args):
            raise ValueError(f"--save {args.save}: the file exists; give --overwrite to "
                             f"replace it, or --resume {args.save} to continue its run")


def _read_resumed(args):
    """The checkpoint of --resume; an error that names the option if it cannot be read."""
    try:
        return checkpoint.read(args.resume, device=args.device)
    except OSError as e:
        raise OSError(f"--resume {args.resume}: {_reason(e)}") from None


def _data_set(args, resumed) -> str:
    """The data set of the run: --data, else the checkpoint's, else the digits."""
    stored = resumed.data if resumed else None
    if stored is not None and args.data not in (None, stored):
        raise _differs(args, "--data", stored)
    name = args.data or stored or "digits"
    if name not in DATA:
        raise ValueError(f"the checkpoint {args.resume} trained on {name!r}, a data set "
                         f"this gpu_mlp lacks (it has {', '.join(sorted(DATA))})")
    return name


def _stored_settings(resumed) -> dict:
    """The training settings and loss of the checkpoint to resume; {} for a new run."""
    if resumed is None:
        return {}
    history = resumed.history
    lr = (resumed.optimizer.lr if resumed.optimizer is not None
          else history.lr[-1] if history.lr else None)
    return {"seed": history.seed, "batch_size": history.batch_size, "lr": lr,
            "loss": resumed.net.loss.name}


def _setting(given, stored, default):
    """The command line's value, else the checkpoint's, else the default."""
    for value in (given, stored):
        if value is not None:
            return value
    return default


def _load_data(name):
    """``(X, Y, classes)``: classes is the number of classes, 0 for regression."""
    if name == "digits":
        X, y = datasets.digits()
        return X, y, datasets.DIGITS_CLASSES
    X, Y = datasets.regression()
    return X, Y, 0


def _model_of(net) -> str:
    return "mlp" if isinstance(net, MLP) else "cnn"


def _architecture(net) -> str:
    if isinstance(net, MLP):
        return f"sizes {'-'.join(map(str, net.sizes))}"
    return f"channels {'-'.join(str(layer.c_out) for layer in _convolutions(net))}"


def _convolutions(net) -> list:
    return [layer for layer in net.layers if isinstance(layer, Conv2d)]


def _new_net(args, model, sample_shape, outputs, loss, seed) -> Network:
    activation = DATA[args.data]["activation"] if args.activation is None else args.activation
    hidden_act = activations.get(activation)
    if model == "cnn":
        if args.hidden is not None or args.sizes is not None:
            raise ValueError("--hidden and --sizes shape an MLP; with --model cnn use "
                             "--channels")
        channels = DEFAULTS["channels"] if args.channels is None else args.channels
        layers = _cnn_layers(channels, hidden_act,
                             sample_shape, outputs)
    else:
        if args.channels is not None:
            raise ValueError("--channels shapes a CNN: give --model cnn")
        hidden = DEFAULTS["hidden"] if args.hidden is None else args.hidden
        sizes = [sample_shape[0], *hidden, outputs] if args.sizes is None else args.sizes
        if len(sizes) < 2:
            raise ValueError(f"--sizes must give at least two widths, the input's and the "
                             f"output's, got {','.join(map(str, sizes)) or 'none'}")
        _check_fits_data(sizes, args.data, sample_shape[0], outputs)
        layers = [Dense(d_in, d_out, hidden_act) for d_in, d_out in zip(sizes, sizes[1:-1])]
        layers.append(Dense(sizes[-2], sizes[-1], "identity"))
    supported = all(layer.activation.has_grad_from_output for layer in layers)
    memory = args.memory or (DEFAULTS["memory"] if supported else "recompute")  # _run says
    options = dict(loss=loss, memory=memory, device=args.device,
                   dtype=args.dtype or DEFAULTS["dtype"], seed=seed)
    if memory == "output" and not supported:
        # the engine would refuse too, but in Python's terms (memory='recompute')
        raise ValueError(f"--memory output needs sigma' as a function of the output, "
                         f"which {activation} lacks; use --memory recompute or --memory "
                         f"store_both")
    if model == "cnn":
        return Network(layers, input_shape=sample_shape, **options)
    return MLP([layers[0].d_in] + [layer.d_out for layer in layers],
               activations=[layer.activation for layer in layers], **options)


def _cnn_layers(channels, activation, image, outputs) -> list:
    """3x3 convolutions, padding 1, the first with stride 1 and the others 2, then a
    dense output layer of the flattened feature maps."""
    if not channels:
        raise ValueError("--channels must give at least one convolution")
    layers, shape = [], tuple(image)
    for k, c_out in enumerate(channels):
        layer = Conv2d(shape[0], c_out, 3, stride=1 if k == 0 else 2, padding=1,
                       activation=activation)
        shape = layer.output_shape(shape)
        layers.append(layer)
    return layers + [Dense(math.prod(shape), outputs, "identity")]


def _check_fits_data(sizes, data, features, outputs) -> None:
    if sizes[0] != features or sizes[-1] != outputs:
        raise ValueError(f"layer sizes {','.join(map(str, sizes))} do not fit the {data} "
                         f"data: the first must be {features} (features) and the last "
                         f"{outputs} (outputs)")


def _differs(args, option: str, has) -> ValueError:
    """The error for ``option``, given with --resume, where the checkpoint ``has`` another
    value."""
    return ValueError(f"{option} differs from the checkpoint {args.resume}, which has "
                      f"{has}; leave it out to resume")


def _check_matches(args, stored: dict) -> None:
    """With --resume: each option of ``stored`` (``{option: (given, the checkpoint's)}``)
    given (not None) must be the checkpoint's."""
    for option, (given, theirs) in stored.items():
        if given is not None and given != theirs:
            raise _differs(args, option, theirs)


def _check_same_model(args, net, model, loss) -> None:
    """With --resume, model options may be repeated but must match the checkpoint."""
    stored = {
        "--model": (args.model, model),
        "--loss": (loss, net.loss.name),
        "--memory": (args.memory, net.memory),
        "--dtype": (args.dtype, net.dtype.name),
    }
    if model == "mlp":
        stored["--sizes"] = (args.sizes, net.sizes)
        stored["--hidden"] = (args.hidden, net.sizes[1:-1])
    else:
        stored["--channels"] = (args.channels, [layer.c_out for layer in _convolutions(net)])
    foreign = ("--channels",) if model == "mlp" else ("--hidden", "--sizes")
    for option in foreign:  # the other model's shape: as a new run refuses it
        if getattr(args, option[2:]) is not None:
            raise ValueError(f"{option} does not apply to the checkpoint {args.resume}, "
                             f"{'a CNN' if model == 'cnn' else 'an MLP'}; leave it out to "
                             f"resume")
    if args.activation is not None and len(net.layers) > 1:  # hidden layers to compare
        stored["--activation"] = (activations.get(args.activation), net.activations[0])
    _check_matches(args, stored)


# --- the optimizer ------------------------------------------------------------------------

def _default_lr(kind: str, data: str) -> float:
    if issubclass(optim.KINDS[kind].cls, optim.Adam):
        return ADAM_LR
    return DATA[data]["momentum_lr" if kind == "momentum" else "lr"]


def _option(name: str) -> str:
    return "--" + name.replace("_", "-")


def _check_optimizer_options(args) -> str:
    """The optimizer a new run trains with; an error for an option it does not take."""
    kind = args.optimizer or "sgd"
    schedule = args.schedule or OPTIMIZER_DEFAULTS["schedule"]
    takes = set(OPTIMIZER_OPTIONS[kind]) | set(SCHEDULE_OPTIONS[schedule])
    for name in _rule_options(args):
        if getattr(args, name) is not None and name not in takes:
            owners = ([f"--optimizer {o}" for o, names in OPTIMIZER_OPTIONS.items()
                       if name in names] +
                      [f"--schedule {s}" for s, names in SCHEDULE_OPTIONS.items()
                       if name in names])
            raise ValueError(f"{_option(name)} applies to {' or '.join(owners)}")
    return kind


def _rule_options(args, also=()) -> list:
    """The names of the optimizers' and schedules' options (and ``also``), in the
    command line's order."""
    names = {name for options in (*OPTIMIZER_OPTIONS.values(), *SCHEDULE_OPTIONS.values())
             for name in options}
    return [name for name in vars(args) if name in names or name in also]


def _new_optimizer(args, kind: str, lr: float, steps: int):
    """The optimizer of a new run, or None for plain SGD at a constant rate without weight
    decay (the fused SGD of train_step, no optimizer state to save)."""
    D = OPTIMIZER_DEFAULTS
    name = args.schedule or D["schedule"]
    if name == "step":
        step_size = args.step_size if args.step_size is not None else max(1, -(-steps // 3))
        schedule = optim.Step(step_size, D["gamma"] if args.gamma is None else args.gamma)
    elif name == "cosine":
        warmup = D["warmup"] if args.warmup is None else args.warmup
        min_lr = D["min_lr"] if args.min_lr is None else args.min_lr
        if warmup > steps:
            raise ValueError(f"--warmup {warmup} exceeds the run's {steps} steps "
                             f"(--epochs times the batches of an epoch)")
        if min_lr > lr:
            raise ValueError(f"--min-lr {min_lr:g} exceeds the learning rate it decays "
                             f"from (--lr {lr:g})")
        schedule = optim.Cosine(steps, warmup, min_lr)
    else:
        schedule = optim.Constant()
    cls, names = optim.KINDS[kind]
    # the options given, else the command line's defaults, else the class's
    options = {name: getattr(args, name) if getattr(args, name) is not None else D[name]
               for name in names if getattr(args, name) is not None or name in D}
    if kind == "sgd" and name == "constant" and not options.get("weight_decay"):
        return None
    return cls(lr, schedule=schedule, **options)


def _optimizer_name(optimizer) -> str:
    return "sgd" if optimizer is None else optimizer.kind


def _optimizer_settings(optimizer) -> dict:
    """The options that describe ``optimizer`` (None: plain SGD), as the command line
    spells them, with their values."""
    if optimizer is None:
        return {"optimizer": "sgd", "weight_decay": 0.0, "schedule": "constant"}
    spec = optimizer.schedule.spec()
    return {"optimizer": optimizer.kind, **optimizer.settings(), "schedule": spec["type"],
            **{name: spec[name] for name in SCHEDULE_OPTIONS[spec["type"]]}}


def _check_same_optimizer(args, optimizer) -> None:
    """With --resume, optimizer options may be repeated but must match the checkpoint's."""
    stored = _optimizer_settings(optimizer)
    what = "plain SGD" if optimizer is None else repr(optimizer)
    for name in _rule_options(args, also=("optimizer", "lr", "schedule")):
        given = getattr(args, name)
        if given is None or (name == "lr" and optimizer is None):
            continue  # plain SGD's --lr may change on resume, as it always could
        if name not in stored:
            raise ValueError(f"{_option(name)} does not apply to the checkpoint "
                             f"{args.resume}, which trains with {what}; leave it out to "
                             f"resume")
        if given != stored[name]:
            raise _differs(args, _option(name), stored[name])
