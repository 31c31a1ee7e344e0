"""gpu_mlp.checkpoint: round trips, resuming bit for bit, atomic saves, and bad files."""

import contextlib
import io
import json
import os
import re
import stat
import struct
import subprocess
import sys
import textwrap
import time
import tracemalloc
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest

import gpu_mlp
from gpu_mlp import checkpoint, datasets, optim
from gpu_mlp.checkpoint import CheckpointError

needs_gpu = pytest.mark.skipif(not gpu_mlp.gpu_available(), reason="needs CuPy and a CUDA GPU")


def data(n=90, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, 6))
    return X, np.argmax(X[:, :4], axis=1)


def small_net(**kwargs):
    settings = dict(activations="relu", loss="softmax_cross_entropy", device="cpu", seed=2)
    return gpu_mlp.MLP([6, 12, 4], **{**settings, **kwargs})


def same_params(a, b):
    return all(np.array_equal(x, y) for pa, pb in zip(a, b) for x, y in zip(pa, pb))


def files_in(directory):
    return sorted(os.listdir(directory))


# --- round trips ------------------------------------------------------------------------

@pytest.mark.parametrize("sizes, hidden, loss, memory, dtype", [
    ([3, 5, 4, 2], "relu(alpha=0.5)", "squared", "output", "float32"),
    ([3, 5, 2], "gelu", "softmax_cross_entropy", "recompute", "float64"),
    ([3, 4, 1], "sigmoid", "logistic", "store_both", "float32"),
    ([3, 1], "tanh", "squared", "output", "float64"),
])
def test_round_trip_keeps_parameters_and_architecture(tmp_path, sizes, hidden, loss, memory,
                                                      dtype):
    net = gpu_mlp.MLP(sizes, activations=hidden, loss=loss, memory=memory, device="cpu",
                      dtype=dtype, seed=3)
    path = tmp_path / "net.npz"
    net.save(path)
    copy = gpu_mlp.MLP.load(path, device="cpu")
    assert copy.sizes == net.sizes
    assert [str(a) for a in copy.activations] == [str(a) for a in net.activations]
    assert (copy.loss.name, copy.memory, copy.dtype) == (loss, memory, np.dtype(dtype))
    assert same_params(copy.params, net.params)
    X = np.random.default_rng(0).standard_normal((5, sizes[0]))
    assert np.array_equal(copy.predict(X), net.predict(X))
    assert checkpoint.read(path, device="cpu").history is None


def test_history_round_trip(tmp_path):
    X, y = data()
    net = small_net()
    history = net.fit(X, y, epochs=2, verbose=False, validation=(X[:10], y[:10]))
    net.save(tmp_path / "run.npz", history=history)
    stored = checkpoint.read(tmp_path / "run.npz", device="cpu")
    assert stored.history == history
    assert same_params(stored.net.params, net.params)


def test_save_writes_exactly_the_path_and_nothing_else(tmp_path):
    net = small_net()
    net.save(tmp_path / "model.ckpt")
    small_net(seed=5).save(tmp_path / "model.ckpt")  # overwrites
    assert files_in(tmp_path) == ["model.ckpt"]
    assert same_params(gpu_mlp.MLP.load(tmp_path / "model.ckpt").params, small_net(seed=5).params)
    with np.load(tmp_path / "model.ckpt", allow_pickle=False) as npz:  # plain NumPy can read it
        assert sorted(npz.files) == ["W_1", "W_2", "b_1", "b_2", "meta"]


def test_save_writes_through_a_symlink_and_keeps_it(tmp_path):
    runs, links = tmp_path / "runs", tmp_path / "links"
    runs.mkdir()
    links.mkdir()
    small_net(seed=1).save(runs / "run.npz")
    (links / "latest.npz").symlink_to(runs / "run.npz")
    (links / "next.npz").symlink_to(runs / "next.npz")  # dangling until the save
    small_net(seed=2).save(links / "latest.npz")
    small_net(seed=3).save(links / "next.npz")
    assert os.readlink(links / "latest.npz") == str(runs / "run.npz")
    assert os.readlink(links / "next.npz") == str(runs / "next.npz")
    assert files_in(runs) == ["next.npz", "run.npz"]  # the temporary files were here
    assert same_params(gpu_mlp.MLP.load(runs / "run.npz").params, small_net(seed=2).params)
    assert same_params(gpu_mlp.MLP.load(runs / "next.npz").params, small_net(seed=3).params)


@pytest.mark.parametrize("mode", [0o600, 0o640, 0o664])
def test_save_keeps_the_permission_bits_of_the_file_it_replaces(tmp_path, mode):
    path = tmp_path / "run.npz"
    small_net(seed=1).save(path)
    os.chmod(path, mode)
    small_net(seed=2).save(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == mode
    assert same_params(gpu_mlp.MLP.load(path).params, small_net(seed=2).params)


@pytest.mark.parametrize("name, error", [
    ("missing/run.npz", FileNotFoundError),
    ("folder", IsADirectoryError),
    ("folder/", IsADirectoryError),
])
def test_save_where_no_file_can_go_names_the_path(tmp_path, name, error):
    (tmp_path / "folder").mkdir()
    path = os.path.join(tmp_path, name)
    with pytest.raises(error) as raised:
        small_net().save(path)
    message = str(raised.value)
    assert message.startswith(f"cannot write {path}: ") and ".tmp" not in message
    assert files_in(tmp_path) == ["folder"] and files_in(tmp_path / "folder") == []


def test_save_rejects_a_history_of_another_type(tmp_path):
    with pytest.raises(TypeError, match="History"):
        small_net().save(tmp_path / "x.npz", history={"epochs": 2})
    assert files_in(tmp_path) == []


# --- resuming ---------------------------------------------------------------------------

@pytest.mark.parametrize("stop_after", [1, 3])
def test_resumed_run_ends_bit_for_bit_where_an_uninterrupted_one_does(tmp_path, stop_after):
    X, y = data()
    settings = dict(batch_size=16, lr=0.1, seed=7, verbose=False, validation=(X[:20], y[:20]))
    straight = small_net()
    full = straight.fit(X, y, epochs=4, **settings)

    first = small_net()
    first.fit(X, y, epochs=stop_after, on_epoch=lambda net, h: net.save(tmp_path / "run.npz",
                                                                        history=h), **settings)
    stored = checkpoint.read(tmp_path / "run.npz", device="cpu")
    assert stored.history.epochs == stop_after
    rest = stored.net.fit(X, y, epochs=4, resume=stored.history, **settings)

    assert same_params(stored.net.params, straight.params)
    assert rest.train_loss == full.train_loss and rest.val_accuracy == full.val_accuracy


# --- atomic saves -----------------------------------------------------------------------

def half_write_then_interrupt(f, arrays):
    f.write(b"PK\x03\x04 the first bytes of a zip ...")
    raise KeyboardInterrupt


def failing(error):
    def fail(*args, **kwargs):
        raise error
    return fail


def open_then_interrupt(path, mode="r", *args, **kwargs):
    """``open``, then the interrupt of a signal that lands as it returns (SIGTERM as the
    CLI turns it into a KeyboardInterrupt): the file exists, the caller never gets it."""
    if str(path).endswith(".tmp"):
        open(path, mode, *args, **kwargs).close()
        raise KeyboardInterrupt
    return open(path, mode, *args, **kwargs)


@pytest.mark.parametrize("target, replacement, error", [
    ("_write", half_write_then_interrupt, KeyboardInterrupt),
    ("open", open_then_interrupt, KeyboardInterrupt),
    ("os.fsync", failing(OSError("disk full")), OSError),
    ("os.replace", failing(OSError("rename failed")), OSError),
])
def test_interrupted_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch, target,
                                                        replacement, error):
    old = small_net(seed=1)
    old.save(tmp_path / "run.npz")
    if target in ("_write", "open"):  # checkpoint's own name (open: the builtin it sees)
        monkeypatch.setattr(checkpoint, target, replacement, raising=False)
    else:
        monkeypatch.setattr(target, replacement)
    with pytest.raises(error):
        small_net(seed=2).save(tmp_path / "run.npz")
    monkeypatch.undo()
    assert files_in(tmp_path) == ["run.npz"]  # no temporary file left behind
    assert same_params(gpu_mlp.MLP.load(tmp_path / "run.npz").params, old.params)


def test_killed_save_keeps_the_previous_checkpoint(tmp_path):
    # the process dies mid-write (no cleanup runs): the target must still be the old file
    old = small_net(seed=1)
    old.save(tmp_path / "run.npz")
    script = textwrap.dedent(f"""
        import os
        import gpu_mlp
        from gpu_mlp import checkpoint

        def die_midway(f, arrays):
            f.write(b"PK\\x03\\x04 partial")
            f.flush()
            os._exit(9)

        checkpoint._write = die_midway
        gpu_mlp.MLP([6, 12, 4], device="cpu", seed=2).save({str(tmp_path / "run.npz")!r})
    """)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True)
    assert result.returncode == 9, result.stderr.decode()
    leftovers = [name for name in files_in(tmp_path) if name != "run.npz"]
    assert len(leftovers) == 1 and leftovers[0].startswith(".run.npz.")  # hidden, harmless
    assert same_params(gpu_mlp.MLP.load(tmp_path / "run.npz").params, old.params)


# --- bad files --------------------------------------------------------------------------

@pytest.fixture
def entries(tmp_path):
    """The entries of a valid checkpoint with history: meta (a dict) and the arrays."""
    X, y = data()
    net = small_net()
    net.save(tmp_path / "good.npz", history=net.fit(X, y, epochs=1, verbose=False))
    with np.load(tmp_path / "good.npz", allow_pickle=False) as npz:
        found = {key: npz[key] for key in npz.files}
    found["meta"] = json.loads(str(found["meta"]))
    return found


def write_entries(path, entries):
    meta = entries.get("meta")
    if isinstance(meta, dict):
        entries = {**entries, "meta": np.array(json.dumps(meta))}
    np.savez(path, **entries)


def set_meta(key, value):
    return lambda e: e["meta"].__setitem__(key, value)


@pytest.mark.parametrize("change, match", [
    (lambda e: e.pop("meta"), "no 'meta' entry"),
    (lambda e: e.__setitem__("meta", np.array("{not json")), "no gpu_mlp.checkpoint metadata"),
    (lambda e: e.__setitem__("meta", np.zeros(3)), "no gpu_mlp.checkpoint metadata"),
    (set_meta("format", "keras"), "no gpu_mlp.checkpoint metadata"),
    (set_meta("version", 3), "format version 3, but this gpu_mlp reads versions 1, 2"),
    (lambda e: e["meta"].pop("loss"), "metadata lacks loss"),
    (set_meta("layers", []), "layers must be a non-empty list"),
    (set_meta("model", "Transformer"), "model must be MLP or Network"),
    (set_meta("dtype", "float16"), "dtype must be float32 or float64"),
    (set_meta("layers", "relu"), "layers must be a non-empty list"),
    (set_meta("layers", [{"type": "LSTM"}, {"type": "Dense"}]), "layer 1: a layer must be"),
    (lambda e: e["meta"]["layers"][1].pop("d_out"), "layer 2: Dense layer .*d_out"),
    (lambda e: e["meta"]["layers"][0].__setitem__("d_in", 2.5), "layer 1: Dense: d_in must be"),
    (lambda e: e["meta"]["layers"].__setitem__(0, {
        "type": "Conv2d", "c_in": 1, "c_out": 12, "kernel_size": [1, 1], "stride": [1, 1],
        "padding": [0, 0], "activation": "relu"}), "model MLP must have Dense layers only"),
    (lambda e: e.pop("W_2"), "missing \\['W_2'\\], unexpected none"),
    (lambda e: e.__setitem__("W_3", np.zeros((4, 4))), "missing none, unexpected \\['W_3'\\]"),
    (lambda e: e.__setitem__("W_2", np.zeros((4, 11), np.float32)),
     "W_2 has shape \\(4, 11\\), but layer 2, Dense\\(12, 4.*needs \\(4, 12\\)"),
    (lambda e: e.__setitem__("b_1", e["b_1"].astype(np.float64)),
     "b_1 has dtype float64, but the metadata says float32"),
    (lambda e: e.__setitem__("W_1", np.full((12, 6), np.nan, np.float32)), "W_1 contains NaN"),
    (lambda e: e["meta"]["layers"][0].__setitem__("activation", "swish"),
     "unknown activation 'swish'"),
    (set_meta("loss", "hinge"), "unknown loss 'hinge'"),
    (set_meta("memory", "none"), "unknown memory mode 'none'"),
    (lambda e: e["meta"]["history"].pop("seed"), "history must have the entries"),
    (lambda e: e["meta"]["history"].__setitem__("train_loss", [1.0, 2.0]), "one entry per epoch"),
    (lambda e: e.__setitem__("W_1", np.array([print], dtype=object)), "unreadable entry"),
])
def test_bad_checkpoints_say_what_is_wrong(tmp_path, entries, change, match):
    write_entries(tmp_path / "good.npz", entries)
    gpu_mlp.MLP.load(tmp_path / "good.npz")  # the unchanged entries load
    change(entries)
    path = tmp_path / "bad.npz"
    write_entries(path, entries)
    with pytest.raises(CheckpointError, match=match) as error:
        gpu_mlp.MLP.load(path)
    assert str(error.value).startswith(str(path))


@pytest.mark.parametrize("keep", [0.0, 0.001, 0.1, 0.5, 0.999])
def test_truncated_files_are_refused(tmp_path, keep):
    small_net().save(tmp_path / "full.npz")
    content = (tmp_path / "full.npz").read_bytes()
    path = tmp_path / "cut.npz"
    path.write_bytes(content[:int(keep * len(content))])
    with pytest.raises(CheckpointError, match="not a checkpoint|damaged or truncated"):
        gpu_mlp.MLP.load(path)


def test_flipped_byte_is_caught_by_the_zip_checksum(tmp_path):
    small_net().save(tmp_path / "good.npz")
    content = bytearray((tmp_path / "good.npz").read_bytes())
    content[len(content) // 3] ^= 0xFF  # inside the parameter data
    (tmp_path / "bad.npz").write_bytes(bytes(content))
    with pytest.raises(CheckpointError, match="Bad CRC-32"):
        gpu_mlp.MLP.load(tmp_path / "bad.npz")


def test_broken_deflate_stream_in_a_compressed_checkpoint_is_refused(tmp_path, entries):
    path = tmp_path / "packed.npz"
    np.savez_compressed(path, **{**entries, "meta": np.array(json.dumps(entries["meta"]))})
    gpu_mlp.MLP.load(path)  # intact, a compressed checkpoint loads
    content = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as packed:
        member = packed.getinfo("W_1.npy")
    assert member.compress_type == zipfile.ZIP_DEFLATED
    # the local header: 30 bytes, the name and an extra field whose lengths end it
    name_length, extra_length = struct.unpack_from("<HH", content, member.header_offset + 26)
    stream = member.header_offset + 30 + name_length + extra_length
    content[stream] |= 0b111  # the first block becomes final with the reserved type 3
    path.write_bytes(bytes(content))
    with pytest.raises(CheckpointError, match="damaged or unreadable entry") as error:
        gpu_mlp.MLP.load(path)
    assert str(error.value).startswith(str(path))


@pytest.mark.parametrize("write, match", [
    (lambda p: p.write_text("W_1 = [[1, 2]]\n"), "not an .npz file"),
    (lambda p: np.save(p.open("wb"), np.ones(3)), "a single .npy array"),
])
def test_other_files_are_refused(tmp_path, write, match):
    path = tmp_path / "other.npz"
    write(path)
    with pytest.raises(CheckpointError, match=match):
        gpu_mlp.MLP.load(path)


def test_missing_file_is_an_os_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        gpu_mlp.MLP.load(tmp_path / "nowhere.npz")


@pytest.mark.gpu
@needs_gpu
def test_cpu_checkpoint_loads_onto_the_gpu(tmp_path):
    net = small_net(dtype="float64")
    net.save(tmp_path / "net.npz")
    gpu = gpu_mlp.MLP.load(tmp_path / "net.npz", device="cuda")
    assert gpu.device == "cuda"
    X = data(10)[0]
    np.testing.assert_allclose(gpu.predict(X).get(), net.predict(X), rtol=1e-12)
    gpu.save(tmp_path / "back.npz")
    assert same_params(gpu_mlp.MLP.load(tmp_path / "back.npz", device="cpu").params, net.params)


# --- version 1 files and networks of any layers ------------------------------------------

def as_version_1(entries):
    """The entries rewritten as gpu_mlp 0.1 wrote an MLP (format version 1)."""
    meta = dict(entries["meta"])
    layers = meta.pop("layers")
    del meta["model"]
    meta.update(version=1, sizes=[layers[0]["d_in"]] + [layer["d_out"] for layer in layers],
                activations=[layer["activation"] for layer in layers])
    return {**entries, "meta": meta}


def test_version_1_checkpoints_still_load(tmp_path, entries):
    write_entries(tmp_path / "v2.npz", entries)
    write_entries(tmp_path / "v1.npz", as_version_1(entries))
    new, old = checkpoint.read(tmp_path / "v2.npz"), checkpoint.read(tmp_path / "v1.npz")
    assert type(old.net) is gpu_mlp.MLP and repr(old.net) == repr(new.net)
    assert same_params(old.net.params, new.net.params)
    assert old.history == new.history


@pytest.mark.parametrize("change, match", [
    (lambda meta: meta.__setitem__("sizes", [6]), "sizes must list at least two widths"),
    (lambda meta: meta.__setitem__("activations", "relu"), "activations must be a list"),
    (lambda meta: meta.__setitem__("activations", ["relu"]), "expected 2 activations"),
    (lambda meta: meta.pop("sizes"), "metadata lacks sizes"),
])
def test_bad_version_1_checkpoints_say_what_is_wrong(tmp_path, entries, change, match):
    old = as_version_1(entries)
    change(old["meta"])
    write_entries(tmp_path / "bad.npz", old)
    with pytest.raises(CheckpointError, match=match):
        checkpoint.read(tmp_path / "bad.npz")


def test_a_convolutional_network_round_trips(tmp_path):
    from gpu_mlp.layers import Conv2d, Dense

    layers = [Conv2d(1, 3, (3, 2), stride=(1, 2), padding=1, activation="relu(alpha=0.5)"),
              Conv2d(3, 2, 2, activation="tanh"), Dense(2 * 7 * 3, 4, "identity")]
    net = gpu_mlp.Network(layers, loss="softmax_cross_entropy", memory="recompute",
                          device="cpu", dtype="float64", seed=3)
    X = np.random.default_rng(0).standard_normal((5, 1, 8, 6))
    net.train_step(X, np.arange(5) % 4, 0.1)
    net.save(tmp_path / "cnn.npz")
    copy = gpu_mlp.Network.load(tmp_path / "cnn.npz", device="cpu")
    assert type(copy) is gpu_mlp.Network and copy.layers == net.layers
    assert repr(copy) == repr(net) and same_params(copy.params, net.params)
    assert np.array_equal(copy.predict(X), net.predict(X))


# --- optimizers --------------------------------------------------------------------------

CHECKPOINT_OPTIMIZERS = {
    "sgd-step": lambda: optim.SGD(0.1, weight_decay=1e-3, schedule=optim.Step(3, 0.5)),
    "nesterov": lambda: optim.SGD(0.05, momentum=0.9, nesterov=True),
    "adam-cosine": lambda: optim.Adam(1e-2, betas=(0.8, 0.99), eps=1e-7, weight_decay=0.01,
                                      schedule=optim.Cosine(30, warmup=4, min_lr=1e-5)),
    "adamw": lambda: optim.AdamW(3e-3, weight_decay=0.1),
}


def same_state(a, b):
    """Two state dicts hold the same everything, bit for bit."""
    if {k: v for k, v in a.items() if k != "state"} != {k: v for k, v in b.items()
                                                         if k != "state"}:
        return False
    return a["state"].keys() == b["state"].keys() and all(
        np.array_equal(x, y) and x.dtype == y.dtype for name in a["state"]
        for pa, pb in zip(a["state"][name], b["state"][name]) for x, y in zip(pa, pb))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name", CHECKPOINT_OPTIMIZERS)
def test_optimizer_round_trips(tmp_path, name, dtype):
    X, y = data()
    net, opt = small_net(dtype=dtype), CHECKPOINT_OPTIMIZERS[name]()
    history = net.fit(X, y, epochs=2, batch_size=16, optimizer=opt, verbose=False)
    checkpoint.save(net, tmp_path / "run.npz", history=history, optimizer=opt)
    stored = checkpoint.read(tmp_path / "run.npz", device="cpu")
    assert type(stored.optimizer) is type(opt) and repr(stored.optimizer) == repr(opt)
    assert same_state(stored.optimizer.state_dict(), opt.state_dict())
    assert stored.optimizer.steps == 2 * 6 and stored.history == history
    # bound to the net read with it: it steps that net, and no other
    stored.net.train_step(X[:4], y[:4], stored.optimizer)
    with pytest.raises(ValueError, match="bound to another network"):
        net.train_step(X[:4], y[:4], stored.optimizer)


def test_the_optimizer_entries_of_a_checkpoint(tmp_path):
    net, opt = small_net(), CHECKPOINT_OPTIMIZERS["adam-cosine"]()
    X, y = data()
    net.train_step(X, y, opt)
    checkpoint.save(net, tmp_path / "run.npz", optimizer=opt)
    with np.load(tmp_path / "run.npz", allow_pickle=False) as npz:
        meta = json.loads(str(npz["meta"]))
        names = sorted(npz.files)
        m = npz["opt_exp_avg_W_2"]
    assert meta["version"] == 2 and meta["optimizer"] == {
        "type": "Adam", "hyperparameters": {"lr": 0.01, "betas": [0.8, 0.99], "eps": 1e-7,
                                            "weight_decay": 0.01},
        "schedule": {"type": "cosine", "total_steps": 30, "warmup": 4, "min_lr": 1e-5},
        "steps": 1, "last_lr": 0.0025}
    assert names == sorted(["meta", "W_1", "b_1", "W_2", "b_2"] + [
        f"opt_{s}_{p}_{k}" for s in ("exp_avg", "exp_avg_sq") for p in "Wb" for k in (1, 2)])
    assert m.shape == (4, 12) and m.dtype == np.float32


def test_a_checkpoint_without_an_optimizer_reads_as_plain_sgd(tmp_path, entries):
    write_entries(tmp_path / "plain.npz", entries)
    assert checkpoint.read(tmp_path / "plain.npz").optimizer is None
    write_entries(tmp_path / "v1.npz", as_version_1(entries))
    assert checkpoint.read(tmp_path / "v1.npz").optimizer is None


def test_an_unbound_optimizer_is_saved_as_not_started(tmp_path):
    net, opt = small_net(), optim.Adam(schedule=optim.Step(4))
    checkpoint.save(net, tmp_path / "run.npz", optimizer=opt)
    stored = checkpoint.read(tmp_path / "run.npz").optimizer
    assert repr(stored) == repr(opt) and stored.steps == 0 and stored.state_bytes == 2 * sum(
        a.nbytes for pair in net.params for a in pair)  # bound: zeros on the device


def test_save_refuses_an_optimizer_of_another_net(tmp_path):
    X, y = data()
    net, other, opt = small_net(), small_net(seed=3), optim.Adam()
    other.train_step(X, y, opt)
    with pytest.raises(ValueError, match="bound to another network"):
        checkpoint.save(net, tmp_path / "run.npz", optimizer=opt)
    with pytest.raises(TypeError, match="optimizer must be a gpu_mlp.optim optimizer"):
        checkpoint.save(net, tmp_path / "run.npz", optimizer="adam")
    assert files_in(tmp_path) == []


@pytest.fixture
def optimizer_entries(tmp_path):
    """The entries of a valid checkpoint with an Adam optimizer, meta as a dict."""
    X, y = data()
    net, opt = small_net(), optim.Adam(schedule=optim.Cosine(20))
    history = net.fit(X, y, epochs=1, optimizer=opt, verbose=False)
    checkpoint.save(net, tmp_path / "good.npz", history=history, optimizer=opt)
    with np.load(tmp_path / "good.npz", allow_pickle=False) as npz:
        found = {key: npz[key] for key in npz.files}
    found["meta"] = json.loads(str(found["meta"]))
    return found


def set_optimizer(key, value):
    return lambda e: e["meta"]["optimizer"].__setitem__(key, value)


@pytest.mark.parametrize("change, match", [
    (lambda e: e["meta"].pop("optimizer"), "optimizer state entries .* but no optimizer"),
    (set_optimizer("type", "Lion"), "optimizer must be a dict with a type in"),
    (lambda e: e["meta"].__setitem__("optimizer", "adam"), "optimizer must be a dict"),
    (set_optimizer("steps", -3), "optimizer: optimizer: steps must be an integer >= 0"),
    (set_optimizer("steps", 2.5), "steps must be an integer"),
    (lambda e: e["meta"]["optimizer"].pop("schedule"), "must have the entries"),
    (set_optimizer("schedule", {"type": "cosine", "total_steps": 0}),
     "total_steps must be an integer >= 1"),
    (lambda e: e["meta"]["optimizer"]["hyperparameters"].__setitem__("eps", 0),
     "eps must be a finite number > 0"),
    (lambda e: e["meta"]["optimizer"]["hyperparameters"].__setitem__("betas", [0.9, 1.0]),
     "beta2 must be"),
    (lambda e: e.pop("opt_exp_avg_b_2"),
     "the optimizer state 'exp_avg' lacks \\['opt_exp_avg_b_2'\\]"),
    (lambda e: e.__setitem__("opt_velocity_W_1", np.zeros((12, 6), np.float32)),
     "the optimizer state 'velocity' lacks"),
    (lambda e: e.__setitem__("opt_exp_avg_W_1", np.zeros((12, 5), np.float32)),
     "the state 'exp_avg' of W_1 has shape \\(12, 5\\), but W_1 has \\(12, 6\\)"),
    (lambda e: e.__setitem__("opt_exp_avg_sq_b_1", np.zeros(12)),
     "opt_exp_avg_sq_b_1 has dtype float64, but the metadata says float32"),
    (lambda e: e.__setitem__("opt_exp_avg_W_2", np.full((4, 12), np.inf, np.float32)),
     "contains NaN or Inf"),
    (lambda e: [e.pop(k) for k in list(e) if k.startswith("opt_")], "no state"),
])
def test_bad_optimizer_entries_say_what_is_wrong(tmp_path, optimizer_entries, change, match):
    write_entries(tmp_path / "good.npz", optimizer_entries)
    assert checkpoint.read(tmp_path / "good.npz").optimizer.steps == 3  # 90 rows, 32 a step
    change(optimizer_entries)
    path = tmp_path / "bad.npz"
    write_entries(path, optimizer_entries)
    with pytest.raises(CheckpointError, match=match) as error:
        checkpoint.read(path)
    assert str(error.value).startswith(str(path))


@pytest.mark.parametrize("stop_after", [1, 3])
def test_resumed_adam_cosine_run_ends_bit_for_bit(tmp_path, stop_after):
    X, y = data()
    settings = dict(batch_size=16, seed=7, verbose=False, validation=(X[:20], y[:20]))

    def adam():
        return optim.Adam(1e-2, schedule=optim.Cosine(24, warmup=5, min_lr=1e-4))

    straight, opt = small_net(), adam()
    full = straight.fit(X, y, epochs=4, optimizer=opt, **settings)

    first, first_opt = small_net(), adam()
    first.fit(X, y, epochs=stop_after, optimizer=first_opt, **settings,
              on_epoch=lambda net, h: checkpoint.save(net, tmp_path / "run.npz", history=h,
                                                      optimizer=first_opt))
    stored = checkpoint.read(tmp_path / "run.npz", device="cpu")
    rest = stored.net.fit(X, y, epochs=4, optimizer=stored.optimizer, resume=stored.history,
                          **settings)
    assert same_params(stored.net.params, straight.params)
    assert rest.train_loss == full.train_loss and rest.lr == full.lr
    assert same_state(stored.optimizer.state_dict(), opt.state_dict())


# --- one writer per checkpoint, and the temporaries of dead ones -------------------------

def dead_pid():
    """The pid of a process that has exited."""
    result = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                            capture_output=True, text=True, check=True)
    return int(result.stdout)


def test_save_removes_the_temporaries_of_dead_writers_only(tmp_path):
    """A killed writer's temporary goes once unwritten for STALE_AFTER_S; a fresh one of a
    pid dead here stays (a live writer in another PID namespace or on another host looks
    dead from here), and one unwritten for a day goes whatever its pid (reused since)."""
    dead = dead_pid()
    stale = f".run.npz.{dead}.0badf00d.tmp"  # what a killed run leaves behind
    fresh = f".run.npz.{dead}.1badf00d.tmp"  # a writer we cannot see, at work
    live = f".run.npz.{os.getpid()}.0badf00d.tmp"  # a writer still at work
    abandoned = f".run.npz.{os.getpid()}.2badf00d.tmp"  # a pid taken by another since
    kept = [fresh, live, ".other.npz.1.0badf00d.tmp", "notes.tmp"]
    for name in [stale, abandoned, *kept]:
        (tmp_path / name).write_bytes(b"PK\x03\x04 partial")
    now = time.time()
    os.utime(tmp_path / stale, (now, now - checkpoint.STALE_AFTER_S - 1))
    os.utime(tmp_path / abandoned, (now, now - checkpoint.ABANDONED_AFTER_S - 1))
    small_net().save(tmp_path / "run.npz")
    assert files_in(tmp_path) == sorted(["run.npz", *kept])


def test_hold_refuses_a_second_writer_and_names_it(tmp_path):
    path = tmp_path / "run.npz"
    with checkpoint.hold(path):
        with pytest.raises(checkpoint.CheckpointInUse,
                           match=f"{path}: another run in this process \\(pid {os.getpid()}\\) "
                                 f"writes it"):
            with checkpoint.hold(path):
                pass
        small_net().save(path)  # the holder itself saves as usual
    assert files_in(tmp_path) == ["run.npz"]  # the lock is gone with its holder
    with checkpoint.hold(path):
        pass


def test_a_lock_left_by_a_killed_writer_does_not_block(tmp_path):
    (tmp_path / ".run.npz.lock").write_text(f"{dead_pid()}\n")  # no process holds it
    with checkpoint.hold(tmp_path / "run.npz"):
        small_net().save(tmp_path / "run.npz")
    assert files_in(tmp_path) == ["run.npz"]


needs_fifos = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs os.mkfifo (POSIX)")


@pytest.mark.skipif(not hasattr(os, "symlink") or os.name == "nt", reason="POSIX symlinks")
def test_a_link_planted_as_the_lock_is_refused_and_its_target_untouched(tmp_path):
    """Whoever may write the checkpoint's directory could plant ``.run.npz.lock`` as a
    link: the lock's open followed it and wrote the pid over the target (any file the
    run's user may write)."""
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    os.symlink(victim, tmp_path / ".run.npz.lock")
    os.symlink(tmp_path / "nowhere.txt", tmp_path / ".other.npz.lock")  # dangling
    for name in ("run.npz", "other.npz"):
        with pytest.raises(OSError, match=f"cannot write {tmp_path / name}: too many levels "
                                          f"of symbolic links \\(its lock file"):
            with checkpoint.hold(tmp_path / name):
                pass
    assert victim.read_text() == "precious\n" and not (tmp_path / "nowhere.txt").exists()


def test_a_builder_registered_without_copy_still_loads(tmp_path, monkeypatch):
    """Builders registered before ``copy`` existed are called as before."""
    def build(layers, params, loss, memory, device, dtype):
        return gpu_mlp.MLP.from_params(params, [layer.activation for layer in layers], loss,
                                       memory=memory, device=device, dtype=dtype)
    monkeypatch.setitem(checkpoint.MODELS, "MLP", (gpu_mlp.MLP, build))
    small_net().save(tmp_path / "run.npz")
    assert same_params(checkpoint.read(tmp_path / "run.npz").net.params, small_net().params)


def test_reading_without_nonblocking_opens_as_on_windows(tmp_path, monkeypatch):
    """Windows has no O_NONBLOCK (nor FIFOs): the read opens plainly there."""
    small_net().save(tmp_path / "run.npz")
    monkeypatch.setattr(checkpoint, "_NONBLOCK", 0)
    assert same_params(checkpoint.read(tmp_path / "run.npz").net.params, small_net().params)


@needs_fifos
def test_a_fifo_is_neither_read_nor_replaced(tmp_path):
    """A FIFO given as a checkpoint blocked the read forever; saved onto, it (or a
    device node, /dev/null as root) was replaced by a regular file; planted as the lock,
    it would block its open."""
    fifo = tmp_path / "run.npz"
    os.mkfifo(fifo)
    with pytest.raises(OSError, match="not a regular file"):
        checkpoint.read(fifo)  # at once: nothing writes to it
    with pytest.raises(OSError, match=f"cannot write {fifo}: {fifo} is not a regular file"):
        small_net().save(fifo)
    os.symlink(fifo, tmp_path / "link.npz")
    with pytest.raises(OSError, match="is not a regular file"):
        small_net().save(tmp_path / "link.npz")
    os.mkfifo(tmp_path / ".new.npz.lock")
    with pytest.raises(OSError, match="its lock file .* is not a regular file"):
        with checkpoint.hold(tmp_path / "new.npz"):
            pass
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)


# --- hostile files: the metadata first, then every header, then no more data than that ---

def npy_bytes(a):
    f = io.BytesIO()
    np.save(f, a, allow_pickle=False)
    return f.getvalue()


def handwritten_npy(shape, descr="<f4", data=b""):
    """An .npy file whose header says ``shape`` and ``descr``, whatever ``data`` holds."""
    f = io.BytesIO()
    np.lib.format.write_array_header_1_0(f, {"descr": descr, "fortran_order": False,
                                             "shape": shape})
    return f.getvalue() + data


def write_zip(path, entries, members=None, compression=zipfile.ZIP_STORED):
    """``entries`` (meta a dict) as a zip, raw ``members`` (name: bytes) instead of some."""
    raw = {f"{key}.npy": npy_bytes(np.array(json.dumps(a)) if key == "meta" else a)
           for key, a in entries.items()}
    with zipfile.ZipFile(path, "w", compression) as z:
        for name, content in {**raw, **(members or {})}.items():
            z.writestr(name, content)


@contextlib.contextmanager
def bounded(megabytes=8, seconds=2.0):
    """The block allocates at most ``megabytes`` (NumPy's arrays included) and is quick."""
    tracemalloc.start()
    start = time.perf_counter()
    try:
        yield
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < megabytes * 2**20, f"the reader allocated {peak / 2**20:.0f} MiB"
    assert time.perf_counter() - start < seconds


def refused(path, match):
    with bounded(), pytest.raises(CheckpointError) as error:
        checkpoint.read(path, device="cpu")
    assert str(error.value).startswith(f"{path}: ") and re.search(match, str(error.value))


@pytest.mark.parametrize("name, header", [
    ("W_1", handwritten_npy((10**6, 10**6), data=bytes(90_000))),
    ("W_1", handwritten_npy((12, 6), data=bytes(90_000))),
    ("b_2", handwritten_npy((4,), data=bytes(8))),  # short
    ("meta", handwritten_npy((), descr="<U100000000", data=bytes(90_000))),
])
def test_a_header_that_does_not_match_its_data_is_refused_before_reading(tmp_path, entries,
                                                                         name, header):
    write_zip(tmp_path / "bad.npz", entries, {f"{name}.npy": header})
    refused(tmp_path / "bad.npz", f"damaged or unreadable entry '{name}' .*bytes of data")


def _deflated_zeros(path, entries, shape, mib):
    """``entries`` deflated, W_1 an .npy header of ``shape`` and ``mib`` MiB of zeros."""
    write_zip(path, {k: v for k, v in entries.items() if k != "W_1"},
              compression=zipfile.ZIP_DEFLATED)
    with zipfile.ZipFile(path, "a", zipfile.ZIP_DEFLATED) as z, z.open("W_1.npy", "w") as f:
        f.write(handwritten_npy(shape))
        for _ in range(mib):  # a KiB deflated a MiB
            f.write(bytes(2**20))
    assert path.stat().st_size < mib * 2**11


@pytest.mark.parametrize("shape, match", [
    ((2**22,), "W_1 has shape \\(4194304,\\), but layer 1"),
    ((12, 6), "'W_1' .*holds 16777216 bytes of data"),
])
def test_a_deflate_bomb_is_refused_without_inflating_it(tmp_path, entries, shape, match):
    _deflated_zeros(tmp_path / "bomb.npz", entries, shape, 16)
    refused(tmp_path / "bomb.npz", match)


def test_deflated_entries_inflating_past_the_budget_are_refused_unread(tmp_path, entries):
    """A model honestly described, honestly deflated: 128 MiB of zeros in a 128 KiB file
    (a 1 MiB file made a 2.3 GiB model and 12 s). Deflated entries may grow to 64 MiB or
    20 times the file, together; gpu_mlp writes its checkpoints uncompressed."""
    entries["meta"]["layers"] = [{"type": "Dense", "d_in": 2**13, "d_out": 2**12,
                                  "activation": "identity"}]
    entries["meta"]["history"] = entries["meta"]["optimizer"] = None
    entries = {k: v for k, v in entries.items() if not k.startswith("opt_")}
    _deflated_zeros(tmp_path / "bomb.npz", entries, (2**12, 2**13), 128)
    refused(tmp_path / "bomb.npz", "its deflated entries would inflate [0-9,]+ bytes into "
                                   "134,2[0-9,]+, more than 20x")


def test_a_zip_directory_claiming_more_than_deflate_can_hold_is_refused(tmp_path, entries):
    # a model of 28 MiB, honestly described, in a file of 2 KiB: the directory says its
    # members inflate to 28 MiB, which no deflate stream of their size can
    entries["meta"]["layers"] = [{"type": "Dense", "d_in": 6, "d_out": 2**20,
                                  "activation": "identity"}]
    entries["meta"]["history"] = None
    path = tmp_path / "liar.npz"
    headers = {"W_1.npy": handwritten_npy((2**20, 6)), "b_1.npy": handwritten_npy((2**20,))}
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("meta.npy", npy_bytes(np.array(json.dumps(entries["meta"]))))
        for name, header in headers.items():
            z.writestr(name, header + bytes(1000))
    content = bytearray(path.read_bytes())
    for name, header in headers.items():  # the uncompressed size in the directory entry
        entry = content.rindex(name.encode()) - 46  # the last mention: the directory's
        assert content[entry:entry + 4] == b"PK\x01\x02"
        size = len(header) + 4 * (6 if name == "W_1.npy" else 1) * 2**20
        struct.pack_into("<I", content, entry + 24, size)
    path.write_bytes(bytes(content))
    refused(path, "'W_1' .*sizes.*cannot be right")


def test_a_deflate_stream_longer_than_its_directory_says_is_read_no_further(tmp_path, entries):
    # W_1's stream goes on with 64 MiB of zeros, but the directory's size and CRC are
    # those of the array: the reader reads what the model needs and stops
    path = tmp_path / "long.npz"
    write_zip(path, {k: v for k, v in entries.items() if k != "W_1"},
              compression=zipfile.ZIP_DEFLATED)
    array = npy_bytes(entries["W_1"])
    with zipfile.ZipFile(path, "a", zipfile.ZIP_DEFLATED) as z, z.open("W_1.npy", "w") as f:
        f.write(array)
        for _ in range(64):
            f.write(bytes(2**20))
    content = bytearray(path.read_bytes())
    entry = content.rindex(b"W_1.npy") - 46
    struct.pack_into("<I", content, entry + 16, zlib.crc32(array))
    struct.pack_into("<I", content, entry + 24, len(array))
    path.write_bytes(bytes(content))
    with bounded():
        stored = checkpoint.read(path, device="cpu")
    assert np.array_equal(stored.net.params[0][0], entries["W_1"])


def test_a_model_too_large_for_memory_is_a_checkpoint_error(tmp_path, entries, monkeypatch):
    write_entries(tmp_path / "run.npz", entries)

    def no_memory(shape, dtype, empty=np.empty):  # for the parameters; the metadata fits
        if np.dtype(dtype).kind == "f":
            raise MemoryError
        return empty(shape, dtype)
    monkeypatch.setattr(np, "empty", no_memory)
    with pytest.raises(CheckpointError, match="the entry 'W_1', \\(12, 6\\) float32, does "
                                              "not fit in memory"):
        checkpoint.read(tmp_path / "run.npz", device="cpu")


def test_metadata_larger_than_any_checkpoint_needs_is_refused_unread(tmp_path, entries):
    entries["meta"]["padding"] = "x" * (9 * 2**20)  # 36 MiB as UTF-32, 40 KiB deflated
    write_zip(tmp_path / "big.npz", entries, compression=zipfile.ZIP_DEFLATED)
    refused(tmp_path / "big.npz", "the metadata takes 3775\\d{4} bytes, more than")


@pytest.mark.parametrize("meta, match", [
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ('{"format": "gpu_mlp.checkpoint", "version": 1' + "0" * 5000 + "}",
     "no gpu_mlp.checkpoint metadata"),
])
def test_metadata_that_json_cannot_take_is_refused(tmp_path, entries, meta, match):
    write_zip(tmp_path / "bad.npz", entries, {"meta.npy": npy_bytes(np.array(meta))})
    refused(tmp_path / "bad.npz", match)


@pytest.mark.parametrize("name, match", [
    ("W_1.npy", "the entry 'W_1' appears twice"),  # which one would count?
    ("notes.txt", "unexpected entry 'notes.txt' \\(not an .npy array\\)"),
])
@pytest.mark.filterwarnings("ignore:Duplicate name")
def test_ambiguous_or_foreign_members_are_refused(tmp_path, entries, name, match):
    write_zip(tmp_path / "bad.npz", entries)
    with zipfile.ZipFile(tmp_path / "bad.npz", "a") as z:
        z.writestr(name, npy_bytes(np.zeros((12, 6), np.float32)))
    refused(tmp_path / "bad.npz", match)


def test_members_of_another_compression_are_refused(tmp_path, entries):
    write_zip(tmp_path / "bz.npz", entries, compression=zipfile.ZIP_BZIP2)
    refused(tmp_path / "bz.npz", "compression method 12; a checkpoint is stored or deflated")


def test_an_encrypted_member_is_refused(tmp_path, entries):
    write_zip(tmp_path / "locked.npz", entries)
    content = bytearray((tmp_path / "locked.npz").read_bytes())
    entry = content.rindex(b"W_1.npy") - 46  # its directory entry: set "encrypted"
    content[entry + 8] |= 1
    (tmp_path / "locked.npz").write_bytes(bytes(content))
    refused(tmp_path / "locked.npz", "'W_1' \\(it is encrypted\\)")


@pytest.mark.parametrize("layout", ["big-endian", "fortran", "deflated"])
def test_other_layouts_of_the_same_numbers_load(tmp_path, entries, layout):
    write_entries(tmp_path / "good.npz", entries)
    good = checkpoint.read(tmp_path / "good.npz", device="cpu")
    convert = {"big-endian": lambda a: a.astype(a.dtype.newbyteorder(">")),
               "fortran": np.asfortranarray, "deflated": lambda a: a}[layout]
    changed = {k: v if k == "meta" else convert(v) for k, v in entries.items()}
    write_zip(tmp_path / "other.npz", changed,
              compression=zipfile.ZIP_DEFLATED if layout == "deflated" else zipfile.ZIP_STORED)
    other = checkpoint.read(tmp_path / "other.npz", device="cpu")
    assert same_params(other.net.params, good.net.params) and other.history == good.history
    assert all(a.dtype == np.float32 for pair in other.net.params for a in pair)


# --- hostile metadata: every field is checked where it is read -------------------------------

NAN, INF = float("nan"), float("inf")  # json.dumps writes NaN and Infinity, and loads them
FROM_1 = "in \\[1, 2\\^64\\)"


def set_history(key, value):
    return lambda e: e["meta"]["history"].__setitem__(key, value)


def set_dp(key, value):
    def change(e):
        e["meta"]["dp"] = {"max_grad_norm": 1.0, "noise_multiplier": 1.1, "delta": 1e-5,
                           "seed": 3, "accountant": "rdp", "steps": 3, key: value}
    return change


@pytest.mark.parametrize("change, match", [
    (set_history("batch_size", 0), f"history: batch_size must be an integer {FROM_1}, got 0"),
    (set_history("samples", 0), f"history: samples must be an integer {FROM_1}, got 0"),
    (set_history("batch_size", 32.0), f"history: batch_size must be an integer {FROM_1}, "
                                      f"got 32.0"),
    (set_history("seed", True), "history: seed must be an integer in \\[0, 2\\^64\\), got True"),
    (set_history("shuffle", 1), "history: shuffle must be true or false"),
    (set_history("train_loss", [NAN]), "history: train_loss must hold numbers in"),
    (set_history("train_loss", [INF]), "history: train_loss must hold numbers in"),
    (set_history("lr", [-0.1]), "history: lr must hold numbers in"),
    (set_history("lr", [INF]), "history: lr must hold numbers in"),
    (set_history("lr", [True]), "history: lr must hold numbers in"),
    (set_history("seconds", [-1.0]), "history: seconds must hold numbers in"),
    (set_history("val_accuracy", [1.5]), "history: val_accuracy must hold numbers in"),
    (set_history("epsilon", [-1.0]), "history: epsilon must hold numbers in"),
    (set_history("epsilon", [NAN]), "history: epsilon must hold numbers in"),
    (set_history("lr", [None]), "history: lr must hold numbers in"),
    (set_dp("seed", 2**64), "dp: seed must be in \\[0, 2\\^64\\), got "
                            "18446744073709551616"),
    (set_dp("steps", 2**64), "dp: steps must be in \\[0, 2\\^64\\)"),
    (set_dp("steps", True), "dp: steps must be an integer in \\[0, 2\\^64\\)"),
    (set_dp("noise_multiplier", NAN), "dp: noise_multiplier must be a finite number"),
    (set_dp("accountant", ["rdp"]), "dp: unknown accountant"),
    # integers past any float (json reads 10**400 as an int): named, not an OverflowError
    (set_history("batch_size", 10**400), f"history: batch_size must be an integer {FROM_1}"),
    (set_dp("max_grad_norm", 10**400), "dp: max_grad_norm must be a finite number, got "
                                       "an integer of 401 digits"),
    (set_history("epsilon", [10**400]), "history: epsilon must hold numbers"),
    (set_history("val_loss", [10**400]), "history: val_loss must hold numbers"),
    # a seed of null drew a new secret one: not the run's noise, nor its Poisson batches
    (set_dp("seed", None), "dp: seed must be an integer in \\[0, 2\\^64\\), got None"),
    # a list or dict where a name goes: named, not "unhashable type"
    (lambda e: e["meta"].__setitem__("version", [2]), "format version \\[2\\]"),
    (lambda e: e["meta"].__setitem__("version", True), "format version True"),
    (lambda e: e["meta"].__setitem__("model", ["MLP"]), "model must be"),
    (lambda e: e["meta"]["layers"][0].__setitem__("type", ["Dense"]),
     "a layer must be a dict with a type in"),
])
def test_hostile_metadata_is_refused_where_it_is_read(tmp_path, entries, change, match):
    change(entries)
    write_entries(tmp_path / "bad.npz", entries)
    refused(tmp_path / "bad.npz", match)


def test_a_crafted_file_of_many_entries_gets_a_short_message(tmp_path, entries):
    for k in range(3, 1003):
        entries[f"W_{k}"] = np.zeros(1, np.float32)
    write_entries(tmp_path / "bad.npz", entries)
    with pytest.raises(checkpoint.CheckpointError, match="unexpected \\['W_10', 'W_100', "
                                                         ".*\\] and 992 more") as e:
        checkpoint.read(tmp_path / "bad.npz")
    assert len(str(e.value)) < 500


def test_what_fit_can_record_still_loads(tmp_path, entries):
    # an overflowing validation loss and the epsilon of a run without noise are infinite
    history = entries["meta"]["history"]
    history.update(val_loss=[INF], val_accuracy=[1.0], epsilon=[INF], lr=[0.0])
    write_entries(tmp_path / "run.npz", entries)
    stored = checkpoint.read(tmp_path / "run.npz").history
    assert (stored.val_loss, stored.epsilon, stored.lr) == ([INF], [INF], [0.0])


@pytest.mark.parametrize("change, match", [
    (lambda e: e.__setitem__("opt_exp_avg_sq_W_1", np.full((12, 6), -1e-3, np.float32)),
     "the state 'exp_avg_sq' of W_1 must be >= 0"),
    (set_optimizer("steps", 2**64), "optimizer: optimizer: steps must be < 2\\^64"),
    (set_optimizer("steps", True), "optimizer: optimizer: steps must be an integer >= 0"),
    (set_optimizer("last_lr", NAN), "last_lr must be a finite number"),
    (lambda e: e["meta"]["optimizer"]["hyperparameters"].__setitem__("lr", INF),
     "lr must be a finite number > 0"),
    (lambda e: e["meta"]["optimizer"]["hyperparameters"].__setitem__("betas", [True, 0.9]),
     "beta1 must be a number"),
    (lambda e: e["meta"]["optimizer"].__setitem__("state", {}), "optimizer must be a dict"),
    (set_optimizer("type", ["Adam"]), "optimizer must be a dict with a type in"),
    (lambda e: e["meta"]["optimizer"]["hyperparameters"].__setitem__("lr", 10**400),
     "lr must be a finite number, got an integer of 401 digits"),
    # gpu_mlp writes every hyperparameter: one missing is damage, not its default
    (lambda e: e["meta"]["optimizer"]["hyperparameters"].pop("lr"), "hyperparameters .* lack lr"),
])
def test_hostile_optimizer_state_is_refused(tmp_path, optimizer_entries, change, match):
    change(optimizer_entries)
    write_entries(tmp_path / "bad.npz", optimizer_entries)
    refused(tmp_path / "bad.npz", match)


# --- what MLP.load returns, and paths as bytes --------------------------------------------

def test_mlp_load_refuses_a_network_that_is_not_an_mlp(tmp_path):
    from gpu_mlp.layers import Conv2d, Dense

    cnn = gpu_mlp.Network([Conv2d(1, 2, 3), Dense(8, 3)], device="cpu")
    cnn.save(tmp_path / "cnn.npz")
    with pytest.raises(CheckpointError, match="holds a Network, which MLP.load does not "
                                              "return; load it with gpu_mlp.Network.load"):
        gpu_mlp.MLP.load(tmp_path / "cnn.npz")
    assert type(gpu_mlp.Network.load(tmp_path / "cnn.npz")) is gpu_mlp.Network
    small_net().save(tmp_path / "mlp.npz")
    assert type(gpu_mlp.Network.load(tmp_path / "mlp.npz")) is gpu_mlp.MLP


def test_a_path_as_bytes_reads_as_os_fspath_gives_it(tmp_path):
    small_net().save(os.fsencode(tmp_path / "net.npz"))  # written as open() would
    assert (tmp_path / "net.npz").exists()
    copy = gpu_mlp.MLP.load(os.fsencode(tmp_path / "net.npz"))
    assert same_params(copy.params, small_net().params)
    (tmp_path / "bad.npz").write_text("W_1 = [[1, 2]]\n")
    with pytest.raises(CheckpointError) as error:
        checkpoint.read(os.fsencode(tmp_path / "bad.npz"))
    assert str(error.value).startswith(f"{tmp_path / 'bad.npz'}: not a checkpoint")


# --- files written by an earlier gpu_mlp ---------------------------------------------------
# tests/data/*-v0.1.0.npz were written by gpu_mlp at commit 915310e (before the step plan,
# the hardened reader and the device-independent noise), with the predictions that code
# made: what it saved must load bit for bit, and predict and resume the same to the
# rounding of the machine's BLAS -- OpenBLAS picks its kernels, and so the order of a
# sum, by the CPU (an MLP's float32 outputs differ by 3 ulps between an AVX-512 and an
# AVX2 machine); a CNN's convolutions also sum in another order now.

OLD = Path(__file__).resolve().parent / "data"


def test_an_mlp_saved_by_an_earlier_version_loads_predicts_and_resumes_the_same():
    X, y = datasets.digits()
    expected = np.load(OLD / "predictions-v0.1.0.npz")
    run = checkpoint.read(OLD / "mlp-adam-v0.1.0.npz", device="cpu")
    assert isinstance(run.net, gpu_mlp.MLP) and isinstance(run.optimizer, gpu_mlp.optim.Adam)
    assert run.optimizer.steps == 20 and run.history.epochs == 2
    with np.load(OLD / "mlp-adam-v0.1.0.npz") as saved:
        for k, (W, b) in enumerate(run.net.params, start=1):
            np.testing.assert_array_equal(W, saved[f"W_{k}"])
            np.testing.assert_array_equal(b, saved[f"b_{k}"])
    float32 = {"rtol": 1e-6, "atol": 1e-6}  # a few ulps of outputs of about 1
    np.testing.assert_allclose(run.net.predict(X[:50]), expected["mlp"], **float32)
    history = run.net.fit(X[:200], y[:200], epochs=3, batch_size=20, optimizer=run.optimizer,
                          seed=3, verbose=False, validation=(X[200:260], y[200:260]),
                          resume=run.history)
    np.testing.assert_allclose(history.train_loss, expected["mlp_resumed_loss"], **float32)
    np.testing.assert_allclose(run.net.predict(X[:50]), expected["mlp_resumed"], **float32)


def test_a_private_cnn_saved_by_an_earlier_version_loads_and_predicts_the_same():
    X, _ = datasets.digits()
    expected = np.load(OLD / "predictions-v0.1.0.npz")
    run = checkpoint.read(OLD / "cnn-dp-momentum-v0.1.0.npz", device="cpu")
    assert type(run.net) is gpu_mlp.Network and run.net.dtype == np.float64
    assert run.optimizer.momentum == 0.9 and run.optimizer.steps == 16
    assert (run.dp.max_grad_norm, run.dp.noise_multiplier, run.dp.seed, run.dp.steps) == \
        (1.0, 0.5, 7, 16)
    # the same to rounding: on the CPU the engine now adds a window's terms in the
    # window's NHWC order (layers.ChannelsLast), the old engine in W's (c, i, j)
    predicted = run.net.predict(X[:50].reshape(-1, 1, 8, 8))
    np.testing.assert_allclose(predicted, expected["cnn"], rtol=1e-12, atol=1e-15)
    np.testing.assert_array_equal(predicted.argmax(axis=1), expected["cnn"].argmax(axis=1))


def test_a_path_through_a_missing_directory_is_no_way_around_overwrite(tmp_path,
                                                                       monkeypatch):
    """open() refuses "missing/../run.npz"; realpath's lexical ".." made it run.npz, so
    the CLI's exists() check passed and a save replaced run.npz without --overwrite."""
    monkeypatch.chdir(tmp_path)
    small_net().save("run.npz")
    before = (tmp_path / "run.npz").read_bytes()
    with pytest.raises(FileNotFoundError, match="cannot write missing/../run.npz: no "
                                                "directory missing/.."):
        checkpoint.writable_target("missing/../run.npz")
    with pytest.raises(FileNotFoundError, match="no directory missing/.."):
        small_net().save("missing/../run.npz")
    assert (tmp_path / "run.npz").read_bytes() == before
