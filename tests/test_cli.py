"""The command line (gpu_mlp.cli) and the plots it writes (gpu_mlp.plotting).

Most tests call ``cli.main(argv)`` in-process with a few epochs; one runs the default
command in a subprocess, exactly as a user would.
"""

import argparse
import os
import re
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

import gpu_mlp
from gpu_mlp import checkpoint, cli, plotting
from gpu_mlp.training import History

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["--epochs", "2", "--hidden", "16"]


def run(capsys, *argv):
    """``(exit status, stdout lines, stderr)`` of ``gpu-mlp argv``."""
    status = cli.main(list(argv))
    out, err = capsys.readouterr()
    return status, out.splitlines(), err


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

    save = checkpoint.save

    def save_then_stop_after_epoch_2(net, path, history):
        save(net, path, history=history)
        if history.epochs == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "save", save_then_stop_after_epoch_2)
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
    (["--batch-size", "8"], "batch_size=32 \\(now 8\\)"),
    (["--seed", "1"], "seed=0 \\(now 1\\)"),
    (["--data", "regression"], "layer sizes 64,16,10 do not fit the regression data"),
    (["--epochs", "1"], "2 epochs are done already"),
])
def test_resume_refuses_a_different_run(capsys, tmp_path, option, match):
    path = str(tmp_path / "run.npz")
    run(capsys, "train", "--epochs", "2", "--hidden", "16", "--activation", "tanh",
        "--save", path)
    status, lines, err = run(capsys, "train", "--quiet", "--resume", path, *option)
    assert status == 2 and lines == []
    assert err.count("\n") == 1 and err.startswith("gpu-mlp: error: ")
    assert re.search(match, err), err


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
    (["--epochs", "0"], "argument --epochs: expected an integer >= 1"),
    (["--batch-size", "2.5"], "argument --batch-size: expected an integer >= 1"),
    (["--seed", "-3"], "argument --seed: expected an integer >= 0"),
    (["--hidden", "16,a"], "argument --hidden: expected comma-separated widths"),
    (["--hidden", "16", "--sizes", "64,16,10"], "not allowed with argument"),
    (["--sizes", "32,128,10"], "layer sizes 32,128,10 do not fit the digits data: the first "
                               "must be 64 \\(features\\) and the last 10 \\(outputs\\)"),
    (["--sizes", "64,128,3"], "layer sizes 64,128,3 do not fit the digits data"),
    (["--loss", "logistic"], "--loss logistic does not fit the digits data, which take "
                             "softmax_cross_entropy or squared"),
    (["--data", "regression", "--loss", "softmax_cross_entropy"], "which take squared"),
    (["--activation", "gelu"], "--memory output needs sigma' as a function of the output, "
                               "which gelu lacks; use --memory recompute or --memory store_both"),
    (["--activation", "gelu", "--memory", "output"], "use --memory recompute or --memory "
                                                     "store_both$"),
    (["--dtype", "float16"], "argument --dtype: invalid choice: 'float16'"),
    (["--memory", "all"], "argument --memory: invalid choice"),
    (["--test-fraction", "1"], "argument --test-fraction: expected a number strictly "
                               "between 0 and 1, got '1'"),
    (["--test-fraction", "x"], "argument --test-fraction: expected a number"),
    (["--data", "regression", "--lr", "5"], "training diverged in epoch 1"),
    (["--resume", "{tmp}/missing.npz"], "No such file or directory"),
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
    (["--plot", "{tmp}/missing/c.png"], "cannot write {tmp}/missing/c.png: no directory "
                                        "{tmp}/missing"),
    (["--plot", "{tmp}/c.xyz"], "cannot plot to {tmp}/c.xyz: unknown image format .xyz; "
                                "matplotlib writes .*png"),
    (["--plot", "{tmp}/c"], "cannot plot to {tmp}/c: no suffix to name the format"),
    (["--plot", "{tmp}"], "cannot write {tmp}: it is a directory"),
    (["--save", "{tmp}/missing/run.npz"], "cannot write {tmp}/missing/run.npz: no directory "
                                          "{tmp}/missing"),
    (["--save", "{tmp}"], "cannot write {tmp}: it is a directory"),
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
