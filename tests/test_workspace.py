"""The workspace's two sizes: ``bytes`` (what it asked for) and ``pool_bytes`` (what the
allocator holds for it: on CuPy each buffer rounded up to the pool's 512-byte unit).
test_gpu.py checks ``pool_bytes`` against CuPy's own ``used_bytes()`` on a GPU."""

import types

import numpy as np
import pytest

from gpu_mlp.workspace import CUPY_ALLOCATION_UNIT, Workspace

# a stand-in for the cupy module as the workspace uses it: NumPy's arrays, not NumPy
DEVICE_XP = types.SimpleNamespace(empty=np.empty, ones=np.ones)


def test_the_unit_is_cupys():
    memory = pytest.importorskip("cupy.cuda.memory")  # imports without a GPU
    assert CUPY_ALLOCATION_UNIT == memory._allocation_unit_size
    assert [memory._round_size(n) for n in (1, 512, 513)] == [512, 512, 1024]


def test_pool_bytes_round_each_buffer_up_on_cupy():
    ws = Workspace(DEVICE_XP, np.float32)
    a = ws.take((3, 5))        # 60 bytes -> one 512-byte block
    b = ws.take((3, 200))      # 2400 bytes -> 2560
    ws.ones(3)                 # 12 bytes -> 512
    assert ws.bytes == 60 + 2400 + 12
    assert ws.pool_bytes == 512 + 2560 + 512
    ws.give(a, b)
    c = ws.take((4, 5))        # grows: the 3-row (5,) buffer goes, a 4-row one comes
    assert (ws.bytes, ws.pool_bytes) == (80 + 2400 + 12, 512 + 2560 + 512)
    ws.clear()
    assert (ws.bytes, ws.pool_bytes) == (80, 512)  # c is still out
    ws.give(c)
    ws.clear()
    assert (ws.bytes, ws.pool_bytes) == (0, 0)


def test_pool_bytes_are_bytes_on_numpy():
    ws = Workspace(np, np.float32)
    ws.take((3, 5))
    ws.ones(3)
    assert ws.pool_bytes == ws.bytes == 72


def test_a_buffer_outgrown_while_in_use_is_released_on_return_and_counted():
    ws = Workspace(np, np.float64)
    small = ws.take((3, 4))
    big = ws.take((8, 4))  # grows the (., 4) buffers while `small` is held
    ws.give(big)
    assert ws.outgrown == 0
    ws.give(small)  # too small to keep: released (the next step makes one in its place)
    assert ws.outgrown == 1 and ws.in_use_bytes == 0
    ws.give(ws.take((3, 4)))  # now the grown buffer serves both sizes
    assert ws.outgrown == 1 and ws.allocations == 2


def test_column_buffers_of_every_width_share_one_pool():
    """A convolution's column buffer, (rows, K), comes from one pool whatever K: the
    layers take it one at a time, so the net holds one, sized for the largest."""
    ws = Workspace(np, np.float32)
    a = ws.take_columns(6, 9)                     # 54 values
    assert a.shape == (6, 9) and a.flags.c_contiguous
    ws.give(a)
    b = ws.take_columns(2, 27)                    # 54 values again: the same buffer
    assert np.shares_memory(a, b) and ws.allocations == 1
    ws.give(b)
    c = ws.take_columns(4, 36)                    # 144: it grows, the smaller one goes
    ws.give(c)
    assert (ws.allocations, ws.bytes) == (2, 144 * 4)
    vector = ws.take((54,))                       # a 1-D buffer is not a column buffer
    assert not np.shares_memory(vector, c) and ws.bytes == (144 + 54) * 4
    ws.give(vector)
    d, e = ws.take_columns(3, 9), ws.take_columns(3, 9)  # two at once: two buffers
    assert not np.shares_memory(d, e)
    ws.give(d, e)
    ws.clear()
    assert (ws.bytes, ws.pool_bytes) == (0, 0)


def test_a_buffer_taken_by_another_thread_during_a_clear_breaks_neither():
    """The race of the test below, made certain: another thread takes a buffer of a new
    shape while clear() releases the free ones (free_buffers raised 'dictionary changed
    size during iteration')."""
    ws = Workspace(DEVICE_XP, np.float32)
    ws.give(ws.take((4, 3)), ws.take((2, 5)))
    release, taken = ws._release, []

    def release_while_another_takes(buffers):
        if not taken:
            taken.append(None)
            taken[0] = ws.take((3, 7))  # a new key, as another thread's call adds
        release(buffers)
    ws._release = release_while_another_takes
    ws.clear()
    assert taken[0].shape == (3, 7)
    ws.give(taken[0])  # recognised: its key's buffer is free now, for the next take
    assert ws.take((3, 7)).base is taken[0].base


@pytest.mark.parametrize("mode", ["train", "predict"])
def test_free_buffers_from_another_thread_never_breaks_a_call(mode):
    """A thread trimming memory (free_buffers) while another trains or predicts with the
    net: each call's buffers stay its own. The workspace read its size table twice and
    raised a KeyError when a clear fell between the two reads."""
    import sys
    import threading

    import gpu_mlp

    net = gpu_mlp.MLP([8, 32, 32, 4], device="cpu", seed=0)
    rng = np.random.default_rng(0)
    X = rng.standard_normal((16, 8)).astype(np.float32)
    Y = rng.standard_normal((16, 4)).astype(np.float32)
    expected = net.predict(X).copy()
    stop, errors = threading.Event(), []

    def use():
        try:
            for _ in range(30000):
                if mode == "predict":
                    np.testing.assert_array_equal(net.predict(X), expected)
                else:
                    net.train_step(X, Y, 1e-6)
        except Exception as e:  # noqa: BLE001 -- reported below
            errors.append(e)
        stop.set()

    def trim():
        while not stop.is_set():
            net.free_buffers()

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as CPython will
    try:
        threads = [threading.Thread(target=use), threading.Thread(target=trim)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    assert errors == []


def test_a_clear_between_a_takes_steps_counts_each_buffer_once():
    """free_buffers() from another thread swaps the free lists out and releases what is
    in them: a buffer that a take() running at the same moment pops from those lists was
    counted as released while in use, and again later -- the byte counts went negative
    for good. Now each buffer is popped by one of them: the interleaving, replayed."""
    import numpy as np

    from gpu_mlp.workspace import Workspace

    ws = Workspace(np, np.float64)
    ws.give(ws.take((4, 3)), ws.take((4, 3)))  # two free buffers of one key
    lists = ws._free

    class Racing(list):  # clear() runs as take() is about to pop from the old list
        def pop(self, *args):
            if not hasattr(self, "raced"):
                self.raced = True
                ws.clear()
            return list.pop(self, *args)

    key = next(iter(lists))
    lists[key] = Racing(lists[key])
    taken = ws.take((4, 3))
    ws.give(taken)
    ws.clear()
    assert (ws.bytes, ws.pool_bytes, ws.in_use_bytes) == (0, 0, 0)


def test_a_clear_during_a_takes_growth_counts_each_buffer_once():
    """take() growing a key releases its smaller free buffers; a clear() by another
    thread at that moment released them too: the counts went negative. The interleaving,
    replayed: clear() has listed the old free lists and is draining one when the other
    thread's take(), which read the free lists before clear() swapped them, grows that
    key; each buffer is now popped, and released, by one of them."""
    import numpy as np

    from gpu_mlp.workspace import Workspace

    ws = Workspace(np, np.float64)
    ws.give(ws.take((2, 3)), ws.take((2, 3)), ws.take((2, 3)))
    old = ws._free
    key = next(iter(old))

    class Racing(list):
        def pop(self, *args):
            if not hasattr(self, "raced"):
                self.raced = True
                new, ws._free = ws._free, old  # the take() that read them before
                grown = ws.take((8, 3))        # the growth: releases the smaller ones
                ws._free = new
                ws.give(grown)
            return list.pop(self, *args)

    old[key] = Racing(old[key])
    ws.clear()
    ws.clear()
    assert (ws.bytes, ws.pool_bytes, ws.in_use_bytes) == (0, 0, 0)


def test_host_batches_are_staged_in_one_kept_buffer_per_shape_and_dtype(monkeypatch):
    """Workspace.staged: the host array's values in the buffer kept for its shape and
    dtype -- the same object every time, counted once -- the STAGED most recently used
    kept (the others released), and all of them by clear()."""
    from gpu_mlp import workspace

    monkeypatch.setattr(workspace, "STAGED", 3)
    ws = Workspace(DEVICE_XP, np.float32)
    X = np.arange(6, dtype=np.float32).reshape(2, 3)
    first = ws.staged(X)
    assert first is not X and np.array_equal(first, X) and ws.is_staged(first)
    again = ws.staged(X + 1)
    assert again is first and np.array_equal(first, X + 1)
    labels = ws.staged(np.array([1, 2]))  # another dtype: its own buffer
    assert labels is not first and labels.dtype == np.int64
    assert (ws.allocations, ws.bytes, ws.pool_bytes) == (2, 24 + 16, 1024)
    ws.staged(X[:1])
    ws.staged(X)       # the (2, 3) float32 one is the newest again
    ws.staged(X[:, :1])  # a fourth: the least recently used, the labels', goes
    assert ws.allocations == 4 and not ws.is_staged(labels) and ws.is_staged(first)
    assert ws.bytes == 24 + 12 + 8
    assert not ws.is_staged(X)  # what was given is never one of them
    ws.clear()
    assert ws.bytes == ws.pool_bytes == 0 and not ws.is_staged(first)
