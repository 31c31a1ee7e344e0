"""The command line (gpu_mlp.cli) and the plots it writes (gpu_mlp.plotting).

Most tests call ``cli.main(argv)`` in-process with a few epochs; one runs the default
command in a subprocess, exactly as a user would.
"""

import argparse
import errno
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import gpu_mlp
from gpu_mlp import checkpoint, cli, distributed, plotting
from gpu_mlp.training import History

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["--epochs", "2", "--hidden", "16"]


def run(capsys, *argv):
    """``(exit status, stdout lines, stderr)`` of ``gpu-mlp argv``."""
    status = cli.main(list(argv))
    out, err = capsys.readouterr()
    return status, out.splitlines(), err


def stop_after_epoch_2(monkeypatch):
    """Make every checkpoint save raise KeyboardInterrupt once epoch 2 is saved, as a
    user's Ctrl-C would arrive then."""
    save = checkpoint.save

    def save_then_stop(net, path, history, **kwargs):
        save(net, path, history=history, **kwargs)
        if history.epochs == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "save", save_then_stop)


def value(lines, label):
    """The number on the line ``label: number``."""
    [line] = [line for line in lines if line.startswith(label + ":")]
    return float(line.split(":")[1])


def arrays(path):
    with np.load(path, allow_pickle=False) as npz:
        return {key: npz[key] for key in npz.files if key != "meta"}


# --- the main job -----------------------------------------------------------------------

def test_default_run_reaches_95_percent_on_the_digits():
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "gpu_mlp", "train"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    seconds = time.perf_counter() - start
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # not a terminal: no progress bars
    lines = result.stdout.splitlines()
    assert lines[-1].startswith("test accuracy: ")
    assert value(lines, "test accuracy") >= 0.95
    assert "epochs 1-30" in result.stdout and "sizes=[64, 128, 10]" in result.stdout
    assert seconds < 60


def test_cnn_reaches_98_percent_on_the_digits_within_a_minute():
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "gpu_mlp", "train", "--model", "cnn"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    seconds = time.perf_counter() - start
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "1x8x8 features" in lines[0] and "Conv2d(1, 32" in lines[1]
    assert value(lines, "test accuracy") >= 0.98
    assert seconds < 60


def test_cnn_run_resumes_bit_for_bit(capsys, tmp_path):
    command = ["train", "--model", "cnn", "--channels", "4,8", "--epochs", "3", "--quiet"]
    straight = run(capsys, *command)[1]
    stopped = str(tmp_path / "cnn.npz")
    assert run(capsys, *command[:-2], "1", "--save", stopped, "--quiet")[0] == 0
    status, lines, _ = run(capsys, *command, "--save", stopped, "--resume", stopped)
    assert status == 0 and lines == straight
    assert run(capsys, *command, "--resume", stopped, "--channels", "4,16")[2].startswith(
        "gpu-mlp: error: --channels differs from the checkpoint")


def test_short_run_prints_a_summary(capsys):
    status, lines, err = run(capsys, "train", *FAST)
    assert status == 0 and err == ""
    labels = [line.split(":")[0] for line in lines]
    assert labels[:3] == ["data", "model", "training"]
    assert labels[-3:] == ["training loss", "test loss", "test accuracy"]
    assert lines[0] == "data: digits, 1438 training and 359 test samples, 64 features, 10 classes"
    assert lines[2] == "training: 2 epochs, batch size 32, lr 0.1, seed 0"
    assert lines[3].startswith("trained epochs 1-2 in ")
    assert 0.5 < value(lines, "test accuracy") <= 1
    assert value(lines, "test loss") > 0 and value(lines, "training loss") > 0


def test_quiet_prints_only_the_results(capsys):
    status, lines, err = run(capsys, "train", "--quiet", *FAST)
    assert status == 0 and err == ""
    assert [line.split(":")[0] for line in lines] == ["training loss", "test loss",
                                                      "test accuracy"]


def test_regression_run_ends_with_the_test_loss(capsys):
    status, lines, _ = run(capsys, "train", "--data", "regression", "--epochs", "3")
    assert status == 0
    assert "activations=[tanh, identity], loss='squared'" in lines[1]
    assert lines[-1].startswith("test loss: ") and value(lines, "test loss") < 1.0
    assert not any(line.startswith("test accuracy") for line in lines)


def test_options_reach_the_model_and_the_training(capsys, tmp_path):
    path = tmp_path / "run.npz"
    status, lines, _ = run(capsys, "train", "--sizes", "64,20,16,10", "--activation",
                           "relu(alpha=0.5)", "--loss", "squared", "--memory", "store_both",
                           "--dtype", "float64", "--seed", "3", "--batch-size", "50", "--lr",
                           "0.2", "--epochs", "1", "--test-fraction", "0.5", "--device", "cpu",
                           "--save", str(path))
    assert status == 0
    stored = checkpoint.read(path)
    net, history = stored.net, stored.history
    assert net.sizes == [64, 20, 16, 10]
    assert [str(a) for a in net.activations] == ["relu(alpha=0.5)"] * 2 + ["identity"]
    assert (net.loss.name, net.memory, net.dtype.name) == ("squared", "store_both", "float64")
    assert (history.seed, history.batch_size, history.lr, history.samples) == (3, 50, [0.2], 899)
    assert "test accuracy" in lines[-1]  # one-hot targets, still scored by class


def test_no_hidden_layer(capsys):
    status, lines, _ = run(capsys, "train", "--hidden", "", "--epochs", "2")
    assert status == 0 and "sizes=[64, 10]" in lines[1]


# --- checkpoints ------------------------------------------------------------------------

def test_interrupted_run_resumes_bit_for_bit(capsys, tmp_path, monkeypatch):
    command = ["train", "--epochs", "4", "--hidden", "16", "--batch-size", "64", "--seed", "5"]
    assert run(capsys, *command, "--save", str(tmp_path / "straight.npz"))[0] == 0

    stop_after_epoch_2(monkeypatch)
    stopped = str(tmp_path / "stopped.npz")
    status, _, err = run(capsys, *command, "--save", stopped)
    assert status == 130 and err == f"gpu-mlp: interrupted; continue with --resume {stopped}\n"
    monkeypatch.undo()

    status, lines, _ = run(capsys, *command, "--save", stopped, "--resume", stopped)
    assert status == 0
    assert f"resuming {stopped} after epoch 2" in lines
    assert lines[-3:] == run(capsys, *command, "--quiet")[1]  # same results as straight
    a, b = arrays(tmp_path / "straight.npz"), arrays(stopped)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_resume_takes_the_settings_from_the_checkpoint(capsys, tmp_path):
    path = str(tmp_path / "run.npz")
    run(capsys, "train", "--epochs", "1", "--hidden", "16", "--batch-size", "100", "--lr",
        "0.3", "--seed", "2", "--activation", "tanh", "--save", path)
    status, lines, _ = run(capsys, "train", "--epochs", "2", "--resume", path, "--save", path)
    assert status == 0
    assert "training: 2 epochs, batch size 100, lr 0.3, seed 2" in lines
    assert "activations=[tanh, identity]" in lines[1]
    assert checkpoint.read(path).history.epochs == 2


@pytest.mark.parametrize("option, match", [
    (["--hidden", "32"], "--hidden differs from the checkpoint .* which has \\[16\\]"),
    (["--activation", "relu"], "--activation differs"),
    (["--dtype", "float64"], "--dtype differs"),
    # (fit refused these in its own argument names, after the run was announced)
    (["--batch-size", "8"], "--batch-size differs from the checkpoint .* which has 32"),
    (["--seed", "1"], "--seed differs from the checkpoint .* which has 0"),
    (["--data", "regression"], "--data differs from the checkpoint .* which has digits"),
    (["--epochs", "1"], r"--epochs 1: the checkpoint .* has trained 2 epochs already; "
                        r"--epochs counts them all \(give 2 or more\)"),
])
def test_resume_refuses_a_different_run(capsys, tmp_path, option, match):
    path = str(tmp_path / "run.npz")
    run(capsys, "train", "--epochs", "2", "--hidden", "16", "--activation", "tanh",
        "--save", path)
    status, lines, err = run(capsys, "train", "--quiet", "--resume", path, *option)
    assert status == 2 and lines == []
    assert err.count("\n") == 1 and err.startswith("gpu-mlp: error: ")
    assert re.search(match, err), err


def test_resume_holds_out_what_the_checkpoints_run_held_out(capsys, tmp_path):
    """--test-fraction is not in the checkpoint, but its History has the samples trained
    on: a resumed run splits the same way without it (it failed, naming samples=, not the
    option), and refuses one that would split otherwise."""
    path, straight = str(tmp_path / "run.npz"), str(tmp_path / "straight.npz")
    common = ["train", "--quiet", "--hidden", "8", "--test-fraction", "0.3"]
    run(capsys, *common, "--epochs", "2", "--save", straight)
    run(capsys, *common, "--epochs", "1", "--save", path)
    status, lines, _ = run(capsys, "train", "--quiet", "--epochs", "2", "--resume", path,
                           "--save", path)
    assert status == 0
    a, b = checkpoint.read(straight).net.params, checkpoint.read(path).net.params
    assert all(np.array_equal(x, y) for pa, pb in zip(a, b) for x, y in zip(pa, pb))
    status, _, err = run(capsys, "train", "--quiet", "--epochs", "3", "--resume", path,
                         "--test-fraction", "0.2")
    assert status == 2 and "--test-fraction 0.2 would train on 1438 samples, but the " \
                           f"checkpoint {path} trained on 1258; leave it out" in err


def test_resume_refuses_a_private_run_saved_without_its_dp(capsys, tmp_path):
    """A checkpoint whose History records epsilon but that holds no DP (saved again
    without it, or edited): resumed, it went on without privacy, saying nothing."""
    path, bare = str(tmp_path / "run.npz"), str(tmp_path / "bare.npz")
    run(capsys, "train", "--quiet", "--epochs", "1", "--hidden", "8", "--dp-clip", "1",
        "--dp-noise", "1", "--save", path)
    saved = checkpoint.read(path)
    checkpoint.save(saved.net, bare, history=saved.history, data=saved.data)
    status, lines, err = run(capsys, "train", "--quiet", "--epochs", "2", "--resume", bare)
    assert status == 2 and lines == []
    assert err == (f"gpu-mlp: error: --resume {bare}: its History records the privacy spent "
                   f"(epsilon), but it holds no DP settings to go on with\n")


# --- bad input --------------------------------------------------------------------------

def checkpoint_without_history(tmp_path):
    path = tmp_path / "bare.npz"
    gpu_mlp.MLP([64, 16, 10], device="cpu").save(path)
    return str(path)


def text_file(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("not a checkpoint")
    return str(path)


BAD_INPUT = [
    (["--activation", "swish"], "unknown activation 'swish'"),
    (["--lr", "-1"], "argument --lr: expected a number > 0, got '-1'"),
    (["--lr", "0"], "argument --lr: expected a number > 0"),
    (["--lr", "fast"], "argument --lr: expected a number > 0"),
    (["--epochs", "0"], r"argument --epochs: expected an integer in \[1, 2\^64\)"),
    # past any float (an OverflowError and a traceback from the schedule, the accountant
    # or the model's size)
    (["--epochs", "9" * 400], r"argument --epochs: expected an integer in \[1, 2\^64\)"),
    (["--schedule", "cosine", "--warmup", "9" * 400], "argument --warmup: expected"),
    (["--hidden", "9" * 400], r"argument --hidden: .* widths in \[1, 2\^63\)"),
    (["--model", "cnn", "--channels", str(2**62)], "the model needs .* out of memory"),
    # empty: the default net was trained, silently
    (["--sizes", ""], "--sizes must give at least two widths, the input's and the output's, "
                      "got none"),
    (["--activation", ""], "unknown activation ''"),
    (["--batch-size", "2.5"], r"argument --batch-size: expected an integer in \[1, 2\^64\)"),
    (["--seed", "-3"], r"argument --seed: expected an integer in \[0, 2\^64\)"),
    (["--seed", str(2**64)], r"argument --seed: expected an integer in \[0, 2\^64\)"),
    (["--hidden", "16,a"], "argument --hidden: expected comma-separated widths"),
    (["--model", "rnn"], "argument --model: invalid choice: 'rnn'"),
    (["--model", "cnn", "--data", "regression"], "--model cnn needs images"),
    (["--model", "cnn", "--hidden", "16"], "--hidden and --sizes shape an MLP"),
    (["--channels", "8"], "--channels shapes a CNN: give --model cnn"),
    (["--model", "cnn", "--channels", ""], "--channels must give at least one convolution"),
    (["--model", "cnn", "--activation", "softmax"], "Conv2d: activation 'softmax'"),
    (["--hidden", "16", "--sizes", "64,16,10"], "not allowed with argument"),
    (["--sizes", "32,128,10"], "layer sizes 32,128,10 do not fit the digits data: the first "
                               "must be 64 \\(features\\) and the last 10 \\(outputs\\)"),
    (["--sizes", "64,128,3"], "layer sizes 64,128,3 do not fit the digits data"),
    (["--loss", "logistic"], "--loss logistic does not fit the digits data, which take "
                             "softmax_cross_entropy or squared"),
    (["--data", "regression", "--loss", "softmax_cross_entropy"], "which take squared"),
    (["--activation", "gelu", "--memory", "output"], "--memory output needs sigma' as a "
                                                     "function of the output, which gelu "
                                                     "lacks; use --memory recompute or "
                                                     "--memory store_both$"),
    (["--dtype", "float16"], "argument --dtype: invalid choice: 'float16'"),
    (["--memory", "all"], "argument --memory: invalid choice"),
    (["--test-fraction", "1"], "argument --test-fraction: expected a number strictly "
                               "between 0 and 1, got '1'"),
    (["--test-fraction", "x"], "argument --test-fraction: expected a number"),
    (["--data", "regression", "--lr", "5"], "training diverged in epoch 1"),
    (["--resume", "{tmp}/missing.npz"], "error: --resume \\S*missing.npz: no such file or "
                                        "directory$"),
    (["--dp-noise", "1"], "error: --dp-noise needs --dp-clip"),
    (["--dp-noise", "1", "--dp-delta", "1e-6"], "error: --dp-noise, --dp-delta need --dp-clip"),
    (["--resume", text_file], "notes.txt: not a checkpoint \\(not an .npz file\\)"),
    (["--resume", checkpoint_without_history], "holds no training history"),
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["--save", ""], "argument --save: expected a path, got ''"),
    (["--plot", ""], "argument --plot: expected a path, got ''"),
    (["--resume", ""], "argument --resume: expected a path, got ''"),
]


@pytest.mark.parametrize("argv, match", BAD_INPUT)
def test_bad_input_ends_with_one_line_and_status_2(capsys, tmp_path, argv, match):
    argv = [a(tmp_path) if callable(a) else a.format(tmp=tmp_path) for a in argv]
    status, lines, err = run(capsys, "train", "--quiet", "--epochs", "2", *argv)
    assert status == 2 and lines == []
    assert err.count("\n") == 1 and err.startswith("gpu-mlp: error: ")
    assert "Traceback" not in err
    assert re.search(match, err), err


@pytest.fixture
def no_training(monkeypatch):
    """Makes any training fail the test: what is checked must be checked before it."""
    def fit(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(gpu_mlp.MLP, "fit", fit)


@pytest.mark.parametrize("argv, message", [
    (["--plot", "{tmp}/missing/c.png"], "--plot cannot write {tmp}/missing/c.png: no "
                                        "directory {tmp}/missing"),
    (["--plot", "{tmp}/c.xyz"], "cannot plot to {tmp}/c.xyz: unknown image format .xyz; "
                                "matplotlib writes .*png"),
    (["--plot", "{tmp}/c"], "cannot plot to {tmp}/c: no suffix to name the format"),
    (["--plot", "{tmp}"], "--plot cannot write {tmp}: it is a directory"),
    (["--plot", "{tmp}/.png"], "cannot plot to {tmp}/.png: the name is only a suffix; name "
                               "the file, e.g. curves.png"),
    (["--save", "{tmp}/missing/run.npz"], "--save cannot write {tmp}/missing/run.npz: no "
                                          "directory {tmp}/missing"),
    (["--save", "{tmp}"], "--save cannot write {tmp}: it is a directory"),
    # a directory that refuses new files though access() allows them: the lock file's
    # error, named, not "[Errno 2] ... /proc/.run.npz.lock"
    pytest.param(["--save", "/proc/run.npz"], "--save cannot write /proc/run.npz: no such "
                 "file or directory \\(its lock file /proc/.run.npz.lock\\)",
                 marks=pytest.mark.skipif(not os.access("/proc", os.W_OK | os.X_OK),
                                          reason="needs Linux's /proc, writable to access() "
                                                 "(as root)")),
])
def test_bad_output_path_fails_before_training(capsys, tmp_path, no_training, argv, message):
    if "--plot" in argv:
        pytest.importorskip("matplotlib", reason="without matplotlib --plot fails earlier")
    argv = [a.format(tmp=tmp_path) for a in argv]
    status, lines, err = run(capsys, "train", *argv)
    assert status == 2 and lines == [] and err.count("\n") == 1
    assert re.match("gpu-mlp: error: " + message.format(tmp=re.escape(str(tmp_path))), err), err
    assert ".tmp" not in err


def test_save_refuses_to_replace_the_checkpoint_of_another_run(capsys, tmp_path):
    path = str(tmp_path / "keep.npz")
    assert run(capsys, "train", "--epochs", "2", "--save", path)[0] == 0
    kept = (tmp_path / "keep.npz").read_bytes()

    status, lines, err = run(capsys, "train", "--epochs", "1", "--hidden", "16", "--save", path)
    assert status == 2 and lines == []  # not even the header: refused before anything
    assert err == (f"gpu-mlp: error: --save {path}: the file exists; give --overwrite to "
                   f"replace it, or --resume {path} to continue its run\n")
    assert (tmp_path / "keep.npz").read_bytes() == kept

    # continuing the run it holds is fine, even under another name for the file
    same_file = os.path.join(tmp_path, ".", "keep.npz")
    assert run(capsys, "train", "--epochs", "3", "--resume", same_file, "--save", path)[0] == 0
    assert checkpoint.read(path).history.epochs == 3
    # and --overwrite says the old run may go
    status, _, _ = run(capsys, "train", "--epochs", "1", "--hidden", "16", "--save", path,
                       "--overwrite")
    assert status == 0 and checkpoint.read(path).net.sizes == [64, 16, 10]


def test_closed_stdout_pipe_ends_quietly_with_status_141():
    # as in `gpu-mlp train | head -n 1`: the reader leaves while the training runs
    process = subprocess.Popen([sys.executable, "-m", "gpu_mlp", "train", "--epochs", "10"],
                               cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = process.stdout.readline()
    process.stdout.close()
    err = process.stderr.read()
    process.stderr.close()
    assert process.wait(timeout=120) == 141  # 128 + SIGPIPE, as a shell reports it
    assert first.startswith(b"data: digits") and err == b""


def test_missing_command_is_an_error(capsys):
    status, _, err = run(capsys)
    assert status == 2 and err.startswith("gpu-mlp: error: ") and "COMMAND" in err


@pytest.mark.skipif(gpu_mlp.gpu_available(), reason="tests the message on a machine without GPU")
def test_cuda_without_a_gpu_is_a_clear_error(capsys):
    status, _, err = run(capsys, "train", "--device", "cuda")
    assert status == 2 and "device='cuda' needs CuPy and a CUDA GPU" in err


# --- help, info, entry points -----------------------------------------------------------

def test_help_documents_every_option(capsys):
    status, lines, _ = run(capsys, "train", "--help")
    text = "\n".join(lines)
    assert status == 0
    [commands] = [action for action in cli.build_parser()._actions
                  if isinstance(action, argparse._SubParsersAction)]
    for action in commands.choices["train"]._actions:
        assert action.help, action.option_strings
        assert all(option in text for option in action.option_strings)


def test_info_reports_the_environment(capsys):
    status, lines, _ = run(capsys, "info")
    assert status == 0
    assert lines[0] == f"gpu_mlp {gpu_mlp.__version__}"
    assert lines[1].startswith("python ") and f"numpy {np.__version__}" in lines[1]
    assert any(line.startswith("gpu: ") for line in lines)
    assert any(line.startswith("cupy") for line in lines)


def test_version(capsys):
    assert run(capsys, "--version")[:2] == (0, [f"gpu_mlp {gpu_mlp.__version__}"])


def test_console_script():
    script = shutil.which("gpu-mlp")
    if script is None:
        pytest.skip("the gpu-mlp script is not installed (pip install .)")
    result = subprocess.run([script, "info"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.startswith("gpu_mlp ")


# --- plots ------------------------------------------------------------------------------

def png_size(path):
    content = path.read_bytes()
    assert content[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(content[16:20], "big"), int.from_bytes(content[20:24], "big")


@pytest.mark.parametrize("data, panels", [("digits", 2), ("regression", 1)])
def test_plot_writes_loss_and_accuracy_panels(capsys, tmp_path, data, panels):
    pytest.importorskip("matplotlib")
    path = tmp_path / "curves.png"
    status, lines, _ = run(capsys, "train", "--data", data, "--epochs", "3", "--plot", str(path))
    assert status == 0 and f"plot: {path}" in lines
    width, height = png_size(path)
    assert (width, height) == ((1000, 400) if panels == 2 else (550, 400))


def test_plot_without_matplotlib_fails_before_training(capsys, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib fails
    status, lines, err = run(capsys, "train", "--plot", str(tmp_path / "x.png"))
    assert status == 2 and lines == []
    assert err == "gpu-mlp: error: plotting needs matplotlib: pip install 'gpu_mlp[plot]'\n"
    with pytest.raises(ImportError, match="gpu_mlp\\[plot\\]"):
        plotting.plot_history(History(seed=0, batch_size=1, shuffle=True, samples=1),
                              tmp_path / "y.png")


def test_plot_of_an_empty_history_is_refused(tmp_path):
    pytest.importorskip("matplotlib")
    with pytest.raises(ValueError, match="no epochs"):
        plotting.plot_history(History(seed=0, batch_size=1, shuffle=True, samples=1),
                              tmp_path / "y.png")


def test_a_rising_loss_is_one_warning_line(capsys):
    status, lines, err = run(capsys, "train", "--quiet", "--epochs", "3", "--lr", "1e5")
    assert status == 0 and lines[-1].startswith("test accuracy:")
    warnings = err.strip().splitlines()
    assert len(warnings) == 1
    assert warnings[0].startswith("gpu-mlp: warning: the training loss rose from ")
    assert "learning rate 100000.0 may be too large" in warnings[0]


def test_divergence_is_one_error_line(capsys):
    status, _, err = run(capsys, "train", "--quiet", "--data", "regression", "--lr", "1e4",
                         "--activation", "relu")
    assert status == 2
    assert err.startswith("gpu-mlp: error: training diverged in epoch 1")
    assert len(err.strip().splitlines()) == 1


# --- optimizers and schedules --------------------------------------------------------------

def test_adam_reaches_the_sgd_default_accuracy_on_the_digits(capsys):
    # the default run (SGD, lr 0.1) gets 0.969: Adam at its default lr must do as well
    status, lines, err = run(capsys, "train", "--optimizer", "adam", "--lr", "1e-3")
    assert status == 0 and err == ""
    assert ("training: 30 epochs, batch size 32, Adam(lr=0.001, betas=(0.9, 0.999), "
            "eps=1e-08, weight_decay=0.0), seed 0") in lines
    assert value(lines, "test accuracy") >= 0.969


def test_adam_default_lr_is_1e_3(capsys, tmp_path):
    path = tmp_path / "run.npz"
    assert run(capsys, "train", *FAST, "--optimizer", "adam", "--save", str(path))[0] == 0
    assert checkpoint.read(path).optimizer.lr == 1e-3


@pytest.mark.parametrize("argv, expected", [
    (["--optimizer", "momentum"], "SGD(lr=0.01, momentum=0.9, nesterov=False, weight_decay=0.0)"),
    (["--optimizer", "momentum", "--momentum", "0.5", "--nesterov", "--lr", "0.02",
      "--weight-decay", "1e-4"],
     "SGD(lr=0.02, momentum=0.5, nesterov=True, weight_decay=0.0001)"),
    (["--weight-decay", "0.001"], "SGD(lr=0.1, momentum=0.0, nesterov=False, weight_decay=0.001)"),
    (["--schedule", "step"], "SGD(lr=0.1, momentum=0.0, nesterov=False, weight_decay=0.0, "
                             "schedule=Step(step_size=30, gamma=0.1))"),
    (["--optimizer", "adamw", "--betas", "0.8,0.99", "--eps", "1e-6", "--schedule", "cosine",
      "--warmup", "10", "--min-lr", "1e-5"],
     "AdamW(lr=0.001, betas=(0.8, 0.99), eps=1e-06, weight_decay=0.01, "
     "schedule=Cosine(total_steps=90, warmup=10, min_lr=1e-05))"),
    (["--optimizer", "adam", "--schedule", "step", "--step-size", "7", "--gamma", "0.5"],
     "Adam(lr=0.001, betas=(0.9, 0.999), eps=1e-08, weight_decay=0.0, "
     "schedule=Step(step_size=7, gamma=0.5))"),
])
def test_optimizer_options_reach_the_optimizer(capsys, tmp_path, argv, expected):
    # 2 epochs of 45 steps: cosine over 90, step every 30 by default
    path = tmp_path / "run.npz"
    status, lines, _ = run(capsys, "train", *FAST, *argv, "--save", str(path))
    assert status == 0
    assert lines[2] == f"training: 2 epochs, batch size 32, {expected}, seed 0"
    stored = checkpoint.read(path)
    assert repr(stored.optimizer) == expected and stored.optimizer.steps == 90


def test_plain_sgd_saves_no_optimizer(capsys, tmp_path):
    path = tmp_path / "run.npz"
    assert run(capsys, "train", *FAST, "--optimizer", "sgd", "--save", str(path))[0] == 0
    assert checkpoint.read(path).optimizer is None
    assert not any(key.startswith("opt_") for key in arrays(path))


@pytest.mark.parametrize("extra", [
    ["--optimizer", "adam", "--schedule", "cosine", "--warmup", "20"],
    ["--optimizer", "momentum", "--nesterov", "--schedule", "step", "--step-size", "20"],
])
def test_interrupted_optimizer_run_resumes_bit_for_bit(capsys, tmp_path, monkeypatch, extra):
    command = ["train", "--epochs", "4", "--hidden", "16", "--batch-size", "64", "--seed", "5",
               *extra]
    assert run(capsys, *command, "--save", str(tmp_path / "straight.npz"))[0] == 0

    stop_after_epoch_2(monkeypatch)
    stopped = str(tmp_path / "stopped.npz")
    assert run(capsys, *command, "--save", stopped)[0] == 130
    monkeypatch.undo()

    # the optimizer and its schedule come from the checkpoint; repeating them is fine
    status, lines, err = run(capsys, *command, "--save", stopped, "--resume", stopped)
    assert status == 0 and err == ""
    assert lines[-3:] == run(capsys, *command, "--quiet")[1]
    a, b = arrays(tmp_path / "straight.npz"), arrays(stopped)
    assert any(key.startswith("opt_") for key in a)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    status, lines, _ = run(capsys, "train", "--quiet", "--epochs", "5", "--resume", stopped,
                           "--save", stopped)
    assert status == 0 and checkpoint.read(stopped).optimizer.steps == 5 * 23


def test_extending_a_cosine_run_warns_that_its_schedule_is_over(capsys, tmp_path):
    path = str(tmp_path / "run.npz")
    run(capsys, "train", *FAST, "--optimizer", "adam", "--schedule", "cosine", "--save", path)
    status, _, err = run(capsys, "train", "--quiet", "--epochs", "3", "--resume", path,
                         "--save", path)
    assert status == 0
    assert err == ("gpu-mlp: warning: the cosine schedule ends at step 90 of 135: the steps "
                   "after it run at its min_lr 0.0\n")


@pytest.mark.parametrize("option, match", [
    (["--optimizer", "adamw"], "--optimizer differs from the checkpoint .* which has adam"),
    (["--lr", "0.01"], "--lr differs from the checkpoint .* which has 0.001"),
    (["--betas", "0.9,0.99"], "--betas differs from the checkpoint"),
    (["--schedule", "constant"], "--schedule differs .* which has cosine"),
    (["--warmup", "5"], "--warmup differs .* which has 0"),
    (["--momentum", "0.9"], "--momentum does not apply to the checkpoint .* which trains "
                            "with Adam"),
])
def test_resume_refuses_other_optimizer_settings(capsys, tmp_path, option, match):
    path = str(tmp_path / "run.npz")
    run(capsys, "train", *FAST, "--optimizer", "adam", "--schedule", "cosine", "--save", path)
    status, lines, err = run(capsys, "train", "--quiet", "--epochs", "3", "--resume", path,
                             *option)
    assert status == 2 and lines == []
    assert err.count("\n") == 1 and re.search(match, err), err


@pytest.mark.parametrize("model, option, match", [
    ("cnn", ["--hidden", "999"], "--hidden does not apply to the checkpoint .*, a CNN"),
    ("cnn", ["--sizes", "64,3,10"], "--sizes does not apply to the checkpoint .*, a CNN"),
    ("mlp", ["--channels", "7"], "--channels does not apply to the checkpoint .*, an MLP"),
], ids=["cnn-hidden", "cnn-sizes", "mlp-channels"])
def test_resume_refuses_the_other_models_shape(capsys, tmp_path, model, option, match):
    """The other model's shape options were ignored (a new run refuses them)."""
    path = str(tmp_path / "run.npz")
    shape = ["--channels", "4"] if model == "cnn" else ["--hidden", "16"]
    run(capsys, "train", "--epochs", "2", "--model", model, *shape, "--save", path)
    status, lines, err = run(capsys, "train", "--quiet", "--epochs", "3", "--resume", path,
                             *option)
    assert status == 2 and lines == []
    assert err.count("\n") == 1 and re.search(match, err), err


def test_a_private_regression_run_ends_with_its_test_loss(capsys):
    """--help promises the test's line last: the privacy line came after it."""
    status, lines, _ = run(capsys, "train", "--quiet", "--data", "regression", "--epochs",
                           "1", "--dp-clip", "1", "--dp-noise", "1", "--dp-seed", "0")
    assert status == 0 and lines[-1].startswith("test loss: ")
    assert [line.split(":")[0] for line in lines] == ["privacy", "training loss", "test loss"]


def test_resume_of_a_plain_sgd_run_refuses_an_optimizer(capsys, tmp_path):
    path = str(tmp_path / "run.npz")
    run(capsys, "train", *FAST, "--save", path)
    status, _, err = run(capsys, "train", "--quiet", "--epochs", "3", "--resume", path,
                         "--optimizer", "adam")
    assert status == 2
    assert "--optimizer differs from the checkpoint" in err and "which has sgd" in err


OPTIMIZER_BAD_INPUT = [
    (["--optimizer", "rmsprop"], "argument --optimizer: invalid choice: 'rmsprop'"),
    (["--momentum", "0.9"], "--momentum applies to --optimizer momentum"),
    (["--optimizer", "momentum", "--momentum", "1"],
     "argument --momentum: expected a number in \\[0, 1\\), got '1'"),
    (["--optimizer", "momentum", "--momentum", "-0.1"], "argument --momentum: expected"),
    (["--optimizer", "adam", "--nesterov"], "--nesterov applies to --optimizer momentum"),
    (["--betas", "0.9,0.999"], "--betas applies to --optimizer adam or --optimizer adamw"),
    (["--optimizer", "adam", "--betas", "0.9"], "argument --betas: expected two numbers"),
    (["--optimizer", "adam", "--betas", "0.9,1.0"], "argument --betas: expected two numbers "
                                                    "in \\[0, 1\\)"),
    (["--optimizer", "adam", "--eps", "0"], "argument --eps: expected a number > 0"),
    (["--weight-decay", "-1"], "argument --weight-decay: expected a number >= 0"),
    (["--weight-decay", "nan"], "argument --weight-decay: expected a number >= 0"),
    (["--schedule", "linear"], "argument --schedule: invalid choice: 'linear'"),
    (["--warmup", "10"], "--warmup applies to --schedule cosine"),
    (["--schedule", "step", "--warmup", "10"], "--warmup applies to --schedule cosine"),
    (["--min-lr", "0.01"], "--min-lr applies to --schedule cosine"),
    (["--step-size", "10"], "--step-size applies to --schedule step"),
    (["--schedule", "cosine", "--gamma", "0.5"], "--gamma applies to --schedule step"),
    (["--schedule", "step", "--gamma", "0"], "argument --gamma: expected a number in \\(0, 1\\]"),
    (["--schedule", "step", "--step-size", "0"],
     r"argument --step-size: expected an integer in \[1, 2\^64\)"),
    (["--schedule", "cosine", "--warmup", "-1"],
     r"argument --warmup: expected an integer in \[0, 2\^64\)"),
    # the errors name the options, not the library's arguments
    (["--schedule", "cosine", "--warmup", "1000"], "--warmup 1000 exceeds the run's 90 steps"),
    (["--schedule", "cosine", "--min-lr", "0.5"], "--min-lr 0.5 exceeds the learning rate it "
                                                  "decays from \\(--lr 0.1\\)"),
    (["--lr", "1e39"], "--lr 1e\\+39 must be a finite number > 0 in float32, the net's dtype "
                       "\\(--dtype\\)$"),
    (["--optimizer", "adam", "--eps", "1e-50"], "--eps 1e-50 must be a finite number > 0 in "
                                                "float32"),
    (["--optimizer", "adamw", "--weight-decay", "1e39"], "--weight-decay 1e\\+39 must be"),
    (["--optimizer", "adamw", "--lr", "1e20", "--weight-decay", "1e20"],
     "--lr times --weight-decay 1e\\+40 must be a finite number in float32"),
    (["--dp-clip", "1e39", "--dp-noise", "1"], "--dp-clip 1e\\+39 must be a finite number > 0"),
    (["--dp-clip", "1e20", "--dp-noise", "1e20"], "--dp-noise times --dp-clip 1e\\+40 must"),
    (["--dp-clip", "1", "--dp-noise", "1e-300"], "--dp-noise 1e-300: noise_multiplier 1e-300 "
                                                 "is beyond what the rdp accountant"),
    (["--dp-clip", "1", "--dp-epsilon", "1e-9"], "--dp-epsilon 1e-09: target_epsilon=1e-09 "
                                                 "cannot be met"),
]


@pytest.mark.parametrize("argv, match", OPTIMIZER_BAD_INPUT)
def test_bad_optimizer_input_ends_with_one_line_and_status_2(capsys, argv, match):
    status, lines, err = run(capsys, "train", "--quiet", "--epochs", "2", *argv)
    assert status == 2 and lines == []
    assert err.count("\n") == 1 and err.startswith("gpu-mlp: error: ")
    assert re.search(match, err), err


# --- a run among others: signals, shared files, full disks, big models --------------------

LONG = ["--epochs", "1000", "--hidden", "16"]  # minutes: ended by the test


def start(*argv):
    """``gpu-mlp train argv`` in a new process, its output in pipes."""
    return subprocess.Popen([sys.executable, "-m", "gpu_mlp", "train", *argv], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(path, process, timeout=60):
    """Wait until ``path`` exists: the process has written its first checkpoint."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, f"no {path} after {timeout} s"
        time.sleep(0.05)


def test_sigterm_ends_a_run_as_ctrl_c_does(tmp_path):
    # what timeout, Slurm and Docker send: the run stops at once, resumable, no litter
    path = str(tmp_path / "run.npz")
    process = start(*LONG, "--save", path)
    wait_for(path, process)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 143  # 128 + SIGTERM, as a shell reports it
    assert err == f"gpu-mlp: interrupted; continue with --resume {path}\n"
    assert os.listdir(tmp_path) == ["run.npz"]
    assert checkpoint.read(path).history.epochs >= 1


def test_a_second_run_cannot_save_over_a_running_one(tmp_path):
    path = str(tmp_path / "run.npz")
    first = start(*LONG, "--save", path)
    wait_for(path, first)
    second = start("--epochs", "1", "--save", path, "--overwrite")
    _, err = second.communicate(timeout=60)
    assert second.returncode == 2
    assert err == f"gpu-mlp: error: --save {path}: another run (pid {first.pid}) writes it\n"
    first.send_signal(signal.SIGTERM)
    first.communicate(timeout=60)
    assert first.returncode == 143 and checkpoint.read(path).net.sizes == [64, 16, 10]


def test_a_save_path_held_by_another_run_fails_before_training(capsys, tmp_path, no_training):
    # two runs started together: neither file exists yet, the first to start holds it
    path = str(tmp_path / "run.npz")
    with checkpoint.hold(path):
        status, lines, err = run(capsys, "train", "--save", path)
    assert status == 2 and lines == []
    assert err == (f"gpu-mlp: error: --save {path}: another run in this process (pid "
                   f"{os.getpid()}) writes it\n")


def test_a_full_disk_names_the_checkpoint_and_keeps_the_last_one(capsys, tmp_path, monkeypatch):
    path = str(tmp_path / "run.npz")
    write = checkpoint._write

    def full_after_epoch_1(f, arrays):
        if os.path.exists(path):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        write(f, arrays)

    monkeypatch.setattr(checkpoint, "_write", full_after_epoch_1)
    status, lines, err = run(capsys, "train", *FAST, "--quiet", "--save", path)
    assert status == 2 and lines == []
    assert err == (f"gpu-mlp: error: --save {path}: epoch 2 not saved (no space left on "
                   f"device); the file holds the last checkpoint, intact\n")
    assert os.listdir(tmp_path) == ["run.npz"]
    assert checkpoint.read(path).history.epochs == 1


def test_a_plot_that_fails_at_the_end_is_a_warning_after_the_results(capsys, tmp_path,
                                                                      monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(plotting, "check_format", lambda path: None)
    monkeypatch.setattr(plotting, "plot_history", full)
    path = str(tmp_path / "curves.png")
    status, lines, err = run(capsys, "train", *FAST, "--plot", path)
    assert status == 0 and lines[-1].startswith("test accuracy: ")
    assert not any(line.startswith("plot:") for line in lines)
    assert err == f"gpu-mlp: warning: --plot {path}: not written (no space left on device)\n"


def test_the_plot_counts_epochs_in_whole_numbers(capsys, tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    figures = []
    monkeypatch.setattr(Figure, "savefig", lambda fig, *args, **kwargs: figures.append(fig))
    assert run(capsys, "train", *FAST, "--plot", str(tmp_path / "c.png"))[0] == 0
    [fig] = figures
    for axes in fig.axes:
        ticks = axes.get_xticks()
        assert len(ticks) and all(t == int(t) for t in ticks), ticks


def test_a_model_too_big_for_memory_is_one_error_line(capsys):
    status, lines, err = run(capsys, "train", "--quiet", "--hidden", "1000000000000",
                             "--device", "cpu")
    assert status == 2 and lines == []
    assert err == ("gpu-mlp: error: the model needs 300 TB for its 75,000,000,000,010 "
                   "parameters (float32): out of memory\n")


def test_gelu_picks_the_memory_mode_it_needs(capsys):
    status, lines, err = run(capsys, "train", *FAST, "--activation", "gelu")
    assert status == 0 and err == ""
    assert "memory='recompute'" in lines[1]
    assert lines[2] == "note: --memory recompute, as gelu's derivative needs its input"


def test_resume_takes_the_data_set_from_the_checkpoint(capsys, tmp_path):
    path = str(tmp_path / "run.npz")
    run(capsys, "train", "--data", "regression", "--epochs", "1", "--save", path)
    assert checkpoint.read(path).data == "regression"
    status, lines, _ = run(capsys, "train", "--epochs", "2", "--resume", path, "--save", path)
    assert status == 0 and lines[0].startswith("data: regression, ")
    assert run(capsys, "train", "--epochs", "3", "--resume", path, "--data", "regression")[0] == 0


def test_a_run_for_a_target_epsilon_resumes_with_the_same_command(capsys, tmp_path,
                                                                   monkeypatch):
    command = ["train", "--quiet", "--hidden", "16", "--epochs", "3", "--dp-clip", "1",
               "--dp-epsilon", "8"]
    path = str(tmp_path / "run.npz")
    stop_after_epoch_2(monkeypatch)
    assert run(capsys, *command, "--save", path)[0] == 130
    monkeypatch.undo()
    status, lines, err = run(capsys, *command, "--save", path, "--resume", path)
    assert status == 0 and err == ""
    [reached] = [line for line in lines if line.startswith("privacy: epsilon")]
    assert 7 < float(reached.split()[2]) <= 8.0005, reached
    status, _, err = run(capsys, *command[:-1], "4", "--resume", path)
    assert status == 2 and f"--dp-epsilon differs from the checkpoint {path}, which has 8" in err
    # more epochs than planned spend more than the target: allowed, with a warning
    status, lines, err = run(capsys, "train", "--quiet", "--epochs", "4", "--resume", path)
    assert status == 0
    [reached] = [line for line in lines if line.startswith("privacy: epsilon")]
    assert err == (f"gpu-mlp: warning: the noise was set for epsilon 8; 4 epochs spend "
                   f"{reached.split()[2]} at delta 1e-05\n")


def test_huge_noise_brings_no_accountant_log_lines(capsys, caplog):
    status, _, _ = run(capsys, "train", "--quiet", "--epochs", "1", "--hidden", "16",
                       "--dp-clip", "1", "--dp-noise", "1e9")
    assert status == 0
    assert [r.getMessage() for r in caplog.records if r.name == "absl"] == []


def test_a_stray_launcher_variable_makes_no_parallel_run(capsys, monkeypatch):
    # as inside an salloc shell: Slurm's step size is set, but srun started no ranks
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "4")
    monkeypatch.delenv("SLURM_PROCID", raising=False)
    status, lines, _ = run(capsys, "train", *FAST)
    assert status == 0 and not any("data parallel" in line for line in lines)


def test_one_rank_is_no_data_parallel_run(capsys, monkeypatch):
    class OneRank:
        rank, size, is_root = 0, 1, True

    monkeypatch.setattr(distributed, "Communicator", lambda path: OneRank())
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "2")
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "0")
    status, lines, _ = run(capsys, "train", *FAST)
    assert status == 0 and not any("data parallel" in line for line in lines)


@pytest.mark.parametrize("argv", [["train", "--bogus"], ["train", "--help"], ["--version"]])
def test_under_a_launcher_rank_0_alone_prints_help_and_usage_errors(capsys, monkeypatch,
                                                                   argv):
    """Every rank parses the command line: `mpirun -n 4 gpu-mlp train --help` printed
    the help four times, and a bad option's error once a rank."""
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "2")
    said = {}
    for rank in ("0", "1"):
        monkeypatch.setenv("OMPI_COMM_WORLD_RANK", rank)
        status = cli.main(argv)
        said[rank] = capsys.readouterr()
        assert status == (2 if "--bogus" in argv else 0)
    assert said["0"].out + said["0"].err and not said["1"].out + said["1"].err


def test_save_and_plot_naming_one_file_is_refused_before_training(capsys, tmp_path):
    """The plot, written after the last checkpoint, replaced it."""
    pytest.importorskip("matplotlib")
    path = tmp_path / "run.png"
    for plot in (str(path), str(tmp_path / "." / "run.png")):
        status, lines, err = run(capsys, "train", *FAST, "--save", str(path), "--plot", plot)
        assert status == 2 and lines == []
        assert "name the same file: the plot would replace the checkpoint" in err
    assert not path.exists()


def test_one_epoch_and_lone_losses_are_plotted_as_points(capsys, tmp_path, monkeypatch):
    """A line alone draws nothing for a single point: one epoch's plot was empty."""
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    figures = []
    monkeypatch.setattr(Figure, "savefig", lambda fig, *args, **kwargs: figures.append(fig))
    assert run(capsys, "train", "--epochs", "1", "--hidden", "16", "--plot",
               str(tmp_path / "one.png"))[0] == 0
    [fig] = figures
    for axes in fig.axes:
        assert axes.lines and all(line.get_marker() == "o" for line in axes.lines)


def test_the_memory_mode_follows_the_layers_there_are(capsys):
    """No hidden layer: the activation is no layer's, and 'output' mode stands."""
    status, lines, err = run(capsys, "train", "--epochs", "1", "--hidden", "",
                             "--activation", "gelu")
    assert status == 0 and err == ""
    assert "memory='output'" in lines[1] and not any(l.startswith("note:") for l in lines)


def test_an_interrupt_before_the_first_save_points_at_no_other_runs_file(capsys, tmp_path,
                                                                        monkeypatch):
    """--save other.npz --overwrite stopped before its first epoch was saved: the file is
    still another run's, and --resume of it would continue that run."""
    other = str(tmp_path / "other.npz")
    assert run(capsys, "train", *FAST, "--save", other)[0] == 0

    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "save", stop)
    status, _, err = run(capsys, "train", *FAST, "--save", other, "--overwrite")
    assert status == 130 and err == "gpu-mlp: interrupted\n"
    # resuming that file and stopped before a save: it is this run's to continue
    status, _, err = run(capsys, "train", "--epochs", "3", "--resume", other, "--save", other)
    assert status == 130 and err == f"gpu-mlp: interrupted; continue with --resume {other}\n"


def _resaved(path, **history_changes):
    """Rewrite the checkpoint at ``path`` with its History changed (a library run, or a
    hand-edited file)."""
    import dataclasses

    stored = checkpoint.read(path)
    history = dataclasses.replace(stored.history, **history_changes)
    checkpoint.save(stored.net, path, history=history, optimizer=stored.optimizer,
                    dp=stored.dp, data=stored.data)


def test_a_resume_with_nothing_left_to_train_reports_the_nets_test_loss(capsys, tmp_path):
    """With --epochs the epochs done, the report printed the History's last validation
    loss, which a library run without validation data records as none: a crash on
    formatting it. The test loss is the net's, evaluated as the accuracy is."""
    path = str(tmp_path / "run.npz")
    status, trained, _ = run(capsys, "train", "--epochs", "2", "--quiet", "--save", path)
    assert status == 0
    _resaved(path, val_loss=[None, None], val_accuracy=[None, None])
    status, out, err = run(capsys, "train", "--epochs", "2", "--quiet", "--resume", path)
    assert status == 0, err
    assert out[-2:] == trained[-2:]  # test loss and accuracy: the same net's


@pytest.mark.parametrize("lr, match", [
    (0.0, "lr must be a finite number > 0, got 0.0"),
    (1e300, "lr 1e\\+300 must be a finite number > 0 in float32")])
def test_a_bad_rate_in_a_resumed_history_is_named_as_the_files(capsys, tmp_path, lr, match):
    """Plain SGD resumes at its History's last rate: a bad one was blamed on --lr, which
    the user never gave, or named nothing."""
    path = str(tmp_path / "run.npz")
    assert run(capsys, "train", "--epochs", "2", "--quiet", "--save", path)[0] == 0
    _resaved(path, lr=[0.1, lr])
    status, _, err = run(capsys, "train", "--epochs", "3", "--quiet", "--resume", path)
    assert status == 2
    assert re.search(f"--resume {re.escape(path)}: its history's last {match}", err), err
