"""The command line: ``gpu-mlp train`` and ``gpu-mlp info`` (or ``python -m gpu_mlp ...``).

``gpu-mlp train`` with no options trains a 64-128-10 ReLU network on the built-in
digits and prints the test accuracy (about 0.97, in about a second on a CPU). Bad input
ends with one line, ``gpu-mlp: error: ...``, on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import sys
import warnings

import numpy as np

from . import __version__, activations, checkpoint, datasets, plotting, training
from .device import DEVICES, gpu_available, to_numpy
from .mlp import MEMORY_MODES, MLP

# What `train` uses unless told otherwise. On the digits: 0.96-0.98 test accuracy for
# every seed tried, in about a second on two CPU cores.
DEFAULTS = {"hidden": [128], "memory": "output", "epochs": 30, "batch_size": 32, "seed": 0,
            "dtype": "float32"}
DATA = {  # per data set: the losses it takes (the first is the default) and defaults
    "digits": {"losses": ("softmax_cross_entropy", "squared"), "activation": "relu",
               "lr": 0.1},
    "regression": {"losses": ("squared",), "activation": "tanh", "lr": 0.05},
}
EXIT_ERROR, EXIT_INTERRUPTED = 2, 130
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
    if widths is None or any(w < 1 for w in widths):
        raise argparse.ArgumentTypeError(f"expected comma-separated widths >= 1, got {text!r}")
    return widths


def _integer(minimum: int):
    """An argparse type: an integer >= ``minimum``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}")
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


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="gpu-mlp", description="Train multilayer perceptrons with "
                     "hand-written backprop on an NVIDIA GPU (CuPy) or the CPU (NumPy).")
    parser.add_argument("--version", action="version", version=f"gpu_mlp {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser("info", help="show the version and what gpu_mlp can run on")

    train = commands.add_parser(
        "train", help="train on built-in data and print the test accuracy",
        description="Train an MLP by minibatch SGD on built-in data, evaluate it on a "
                    "held-out test split (which also gives the validation curves) and "
                    "print the result; the last line is 'test accuracy: ...' for the "
                    "digits, 'test loss: ...' for the regression set.")
    D = DEFAULTS
    data = train.add_argument_group("data")
    data.add_argument("--data", choices=sorted(DATA), default="digits",
                      help="digits: the 8x8 handwritten digits shipped with gpu_mlp (1797 "
                           "images, 10 classes); regression: a synthetic set (2000 samples, "
                           "8 features, 1 target) for the squared loss (default: digits)")
    fraction = _number(lambda v: 0 < v < 1, "a number strictly between 0 and 1")
    data.add_argument("--test-fraction", type=fraction, default=0.2, metavar="F",
                      help="share of the samples held out for testing (default: 0.2)")

    model = train.add_argument_group("model (with --resume: taken from the checkpoint)")
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
                            f"pre-activations, or both (default: {D['memory']})")
    model.add_argument("--dtype", choices=("float32", "float64"),
                       help=f"floating-point type (default: {D['dtype']})")

    run = train.add_argument_group("training (with --resume: taken from the checkpoint)")
    run.add_argument("--epochs", type=_integer(1), default=D["epochs"], metavar="N",
                     help=f"passes over the training data; with --resume the total, done "
                          f"epochs included (default: {D['epochs']})")
    run.add_argument("--batch-size", type=_integer(1), metavar="B",
                     help=f"samples per SGD step (default: {D['batch_size']})")
    run.add_argument("--lr", type=_number(lambda v: v > 0, "a number > 0"), metavar="LR",
                     help="learning rate (default: 0.1 for the digits, 0.05 for the "
                          "regression set)")
    run.add_argument("--seed", type=_integer(0), metavar="S",
                     help="seeds the test split, the initial weights and the order of "
                          f"the batches (default: {D['seed']})")
    run.add_argument("--device", choices=DEVICES, default="auto",
                     help="cuda (CuPy), cpu (NumPy), or auto: cuda if CuPy sees a GPU "
                          "(default: auto)")

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
                             "curves.png); needs matplotlib: pip install 'gpu_mlp[plot]'")
    output.add_argument("--quiet", action="store_true",
                        help="print only the results: no progress bars, no header")
    return parser


def main(argv=None) -> int:
    """Run the command line; returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version and bad command lines
        return e.code
    try:
        status = info() if args.command == "info" else train(args)
        sys.stdout.flush()  # a closed pipe shows here, not at the interpreter's exit
        return status
    except BrokenPipeError:
        # the reader went away (`gpu-mlp train | head`): stop quietly. Python's docs
        # advise pointing stdout at devnull, so that its flush at exit cannot fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except KeyboardInterrupt:
        saved = getattr(args, "save", None)
        hint = f"; continue with --resume {saved}" if saved and os.path.exists(saved) else ""
        print(f"gpu-mlp: interrupted{hint}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (ValueError, TypeError, OSError, RuntimeError, ImportError) as e:
        print(f"gpu-mlp: error: {' '.join(str(e).split())}", file=sys.stderr)
        return EXIT_ERROR


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
    def say(line):
        if not args.quiet:
            print(line, flush=True)  # seen now, not when the training is over

    def save(net, history):
        net.save(args.save, history=history)

    _check_outputs(args)
    resumed = checkpoint.read(args.resume, device=args.device) if args.resume else None
    if resumed is not None and resumed.history is None:
        raise ValueError(f"{args.resume} holds no training history to resume from")
    history = resumed.history if resumed else None
    stored = _stored_settings(resumed)
    seed = _setting(args.seed, stored.get("seed"), DEFAULTS["seed"])
    batch_size = _setting(args.batch_size, stored.get("batch_size"), DEFAULTS["batch_size"])
    lr = _setting(args.lr, stored.get("lr"), DATA[args.data]["lr"])

    X, Y, classes = _load_data(args.data)
    outputs = classes or Y.shape[1]
    losses = DATA[args.data]["losses"]
    loss = _setting(args.loss, stored.get("loss"), losses[0])
    # check the model against the data before building it: the engine's errors would
    # speak of its arguments, not of the data
    hidden = DEFAULTS["hidden"] if args.hidden is None else args.hidden
    sizes = resumed.net.sizes if resumed else args.sizes or [X.shape[1], *hidden, outputs]
    _check_fits_data(sizes, args.data, X.shape[1], outputs)
    if loss not in losses:
        source = "--loss" if args.loss else "the checkpoint's loss"
        raise ValueError(f"{source} {loss} does not fit the {args.data} data, which take "
                         f"{' or '.join(losses)}")
    net = resumed.net if resumed else _new_net(args, sizes, loss, seed)
    if resumed:
        _check_same_model(args, net, loss)
    if classes and loss == "squared":
        Y = np.eye(classes)[Y]  # one-hot rows to regress on
    X_train, X_test, Y_train, Y_test = datasets.train_test_split(
        X, Y, args.test_fraction, seed)

    kind = f"{classes} classes" if classes else f"{outputs} target(s)"
    say(f"data: {args.data}, {len(X_train)} training and {len(X_test)} test samples, "
        f"{X.shape[1]} features, {kind}")
    say(f"model: {net}")
    if resumed:
        say(f"resuming {args.resume} after epoch {history.epochs}")
    say(f"training: {args.epochs} epochs, batch size {batch_size}, lr {lr}, seed {seed}")

    done = history.epochs if history else 0
    with np.errstate(over="ignore", invalid="ignore"), \
            warnings.catch_warnings(record=True) as caught:  # fit reports a divergence
        warnings.simplefilter("always", training.TrainingWarning)
        history = net.fit(X_train, Y_train, epochs=args.epochs, batch_size=batch_size, lr=lr,
                          seed=seed, validation=(X_test, Y_test), verbose=not args.quiet,
                          on_epoch=save if args.save else None, resume=history)
    for warning in caught:  # one line each, as the errors
        print(f"gpu-mlp: warning: {warning.message}", file=sys.stderr)

    seconds = sum(history.seconds[done:])
    if seconds > 0:
        rate = (history.epochs - done) * len(X_train) / seconds
        say(f"trained epochs {done + 1}-{history.epochs} in {seconds:.2f} s "
            f"({rate:,.0f} samples/s)")
    if args.save:
        say(f"checkpoint: {args.save}")
    if args.plot:
        title = (f"{args.data}: sizes {'-'.join(map(str, net.sizes))}, "
                 f"{net.activations[0]}, {net.loss.name}")
        plotting.plot_history(history, args.plot, title=title)
        say(f"plot: {args.plot}")
    print(f"training loss: {history.train_loss[-1]:.4f}")
    print(f"test loss: {history.val_loss[-1]:.4f}")
    if classes:
        predicted = to_numpy(net.predict(X_test)).argmax(axis=1)
        labels = Y_test if Y_test.ndim == 1 else Y_test.argmax(axis=1)
        print(f"test accuracy: {np.mean(predicted == labels):.3f}")
    return 0


def _check_outputs(args) -> None:
    """Refuse, before any training, output paths that cannot be written, and a --save
    that would replace a checkpoint of another run."""
    for path in (args.save, args.plot):
        if path:
            checkpoint.writable_target(path)
    if args.plot:
        plotting.check_format(args.plot)
    if args.save and os.path.exists(args.save) and not args.overwrite:
        resuming_it = (args.resume and os.path.exists(args.resume)
                       and os.path.samefile(args.save, args.resume))
        if not resuming_it:
            raise ValueError(f"--save {args.save}: the file exists; give --overwrite to "
                             f"replace it, or --resume {args.save} to continue its run")


def _stored_settings(resumed) -> dict:
    """The training settings and loss of the checkpoint to resume; {} for a new run."""
    if resumed is None:
        return {}
    history = resumed.history
    return {"seed": history.seed, "batch_size": history.batch_size,
            "lr": history.lr[-1] if history.lr else None, "loss": resumed.net.loss.name}


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


def _new_net(args, sizes, loss, seed) -> MLP:
    activation = args.activation or DATA[args.data]["activation"]
    memory = args.memory or DEFAULTS["memory"]
    hidden_act = activations.get(activation)
    if memory == "output" and len(sizes) > 2 and not hidden_act.has_grad_from_output:
        # the engine would refuse too, but in Python's terms (memory='recompute')
        raise ValueError(f"--memory output needs sigma' as a function of the output, "
                         f"which {activation} lacks; use --memory recompute or --memory "
                         f"store_both")
    return MLP(sizes, activations=activation, loss=loss, memory=memory, device=args.device,
               dtype=args.dtype or DEFAULTS["dtype"], seed=seed)


def _check_fits_data(sizes, data, features, outputs) -> None:
    if sizes[0] != features or sizes[-1] != outputs:
        raise ValueError(f"layer sizes {','.join(map(str, sizes))} do not fit the {data} "
                         f"data: the first must be {features} (features) and the last "
                         f"{outputs} (outputs)")


def _check_same_model(args, net, loss) -> None:
    """With --resume, model options may be repeated but must match the checkpoint."""
    stored = {
        "--sizes": (args.sizes, net.sizes),
        "--hidden": (args.hidden, net.sizes[1:-1]),
        "--loss": (loss, net.loss.name),
        "--memory": (args.memory, net.memory),
        "--dtype": (args.dtype, net.dtype.name),
    }
    if args.activation is not None and len(net.sizes) > 2:  # hidden layers to compare
        stored["--activation"] = (activations.get(args.activation), net.activations[0])
    for option, (given, theirs) in stored.items():
        if given is not None and given != theirs:
            raise ValueError(f"{option} differs from the checkpoint {args.resume}, which "
                             f"has {theirs}; leave it out to resume")
