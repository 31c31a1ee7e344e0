"""gpu_mlp.optim: optimizers and schedules against PyTorch's, their memory, state and errors.

1. Parameter trajectories of 20 steps against ``torch.optim.SGD`` (momentum, Nesterov,
   weight decay), ``Adam`` and ``AdamW`` on the same dense and convolutional networks and
   batches, in every memory mode: to 1e-10 in float64, to float32's precision in float32;
2. schedules against ``torch.optim.lr_scheduler`` (StepLR; the cosine with warm-up
   against a LambdaLR of the formula written out here), rates and trajectories;
3. memory, measured with tracemalloc on the NumPy backend: the state and ONE scratch
   (the largest layer's weight), no per-layer gradient buffers, nothing allocated in the
   steady state;
4. state: state_dict round trips, resuming mid-run bit for bit;
5. bad input: clear errors, nothing changed.
"""

import doctest
import math

import numpy as np
import pytest

import gpu_mlp
from gpu_mlp import ops, optim
from gpu_mlp.layers import Conv2d, Dense
from tracing import numpy_data_now, step_peak, tracing

torch = pytest.importorskip("torch")
F = torch.nn.functional

STEPS, BATCH = 20, 8

# (gpu_mlp's optimizer, torch's on a list of tensors): every rule and option, betas on
# both sides of ATen's lerp switch (weight 1 - beta1 below and above 1/2)
OPTIMIZERS = {
    "sgd": (lambda: optim.SGD(0.1), lambda p: torch.optim.SGD(p, lr=0.1)),
    "sgd-wd": (lambda: optim.SGD(0.1, weight_decay=0.05),
               lambda p: torch.optim.SGD(p, lr=0.1, weight_decay=0.05)),
    "momentum": (lambda: optim.SGD(0.05, momentum=0.9),
                 lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9)),
    "nesterov-wd": (lambda: optim.SGD(0.05, momentum=0.8, nesterov=True, weight_decay=0.02),
                    lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.8, nesterov=True,
                                              weight_decay=0.02)),
    "adam": (lambda: optim.Adam(1e-2), lambda p: torch.optim.Adam(p, lr=1e-2)),
    "adam-wd": (lambda: optim.Adam(2e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.05),
                lambda p: torch.optim.Adam(p, lr=2e-2, betas=(0.8, 0.99), eps=1e-6,
                                           weight_decay=0.05)),
    "adam-beta1-0.3": (lambda: optim.Adam(1e-2, betas=(0.3, 0.9)),
                       lambda p: torch.optim.Adam(p, lr=1e-2, betas=(0.3, 0.9))),
    "adamw": (lambda: optim.AdamW(1e-2), lambda p: torch.optim.AdamW(p, lr=1e-2)),
    "adamw-wd": (lambda: optim.AdamW(2e-2, betas=(0.85, 0.995), weight_decay=0.1),
                 lambda p: torch.optim.AdamW(p, lr=2e-2, betas=(0.85, 0.995),
                                             weight_decay=0.1)),
    # decay_bias=False: torch's biases (every second tensor) in a group without decay
    "sgd-wd-weights": (lambda: optim.SGD(0.1, weight_decay=0.05, decay_bias=False),
                       lambda p: torch.optim.SGD(weights_only(p), lr=0.1, weight_decay=0.05)),
    "nesterov-wd-weights": (lambda: optim.SGD(0.05, momentum=0.8, nesterov=True,
                                              weight_decay=0.02, decay_bias=False),
                            lambda p: torch.optim.SGD(weights_only(p), lr=0.05, momentum=0.8,
                                                      nesterov=True, weight_decay=0.02)),
    "adamw-wd-weights": (lambda: optim.AdamW(2e-2, betas=(0.85, 0.995), weight_decay=0.1,
                                             decay_bias=False),
                         lambda p: torch.optim.AdamW(weights_only(p), lr=2e-2,
                                                     betas=(0.85, 0.995), weight_decay=0.1)),
    # eps_placement="uncorrected": scikit-learn's Adam, written out below
    "adam-eps-hat-wd-weights": (
        lambda: optim.Adam(2e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.05,
                           decay_bias=False, eps_placement="uncorrected"),
        lambda p: EpsHatAdam(weights_only(p), lr=2e-2, betas=(0.8, 0.99), eps=1e-6,
                             weight_decay=0.05)),
}


def weights_only(tensors):
    """torch's parameter groups for decay on the weights only: (W_k, b_k) alternate."""
    return [{"params": tensors[0::2]}, {"params": tensors[1::2], "weight_decay": 0.0}]


class EpsHatAdam(torch.optim.Optimizer):
    """Adam with Kingma and Ba's epsilon-hat (their section 2; scikit-learn's and
    TensorFlow's Adam) and an L2 term: ``g + wd W`` into the moments, then ``W <- W - lr
    sqrt(1 - b2^t) / (1 - b1^t) m / (sqrt(v) + eps)``."""

    def __init__(self, params, lr, betas, eps, weight_decay):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                state = self.state[p]
                if not state:
                    state.update(t=0, m=torch.zeros_like(p), v=torch.zeros_like(p))
                state["t"] += 1
                t, g = state["t"], p.grad + group["weight_decay"] * p
                state["m"].lerp_(g, 1 - beta1)
                state["v"].mul_(beta2).addcmul_(g, g, value=1 - beta2)
                step_size = group["lr"] * math.sqrt(1 - beta2 ** t) / (1 - beta1 ** t)
                p.addcdiv_(state["m"], state["v"].sqrt() + group["eps"], value=-step_size)


# --- the networks, on both sides ----------------------------------------------------------

def dense_layers():
    return [Dense(6, 12, "tanh"), Dense(12, 9, "relu"), Dense(9, 4, "identity")]


def conv_layers():
    return [Conv2d(2, 3, 3, padding=1, activation="relu"),
            Conv2d(3, 4, 2, stride=2, activation="tanh"), Dense(4 * 3 * 3, 4, "identity")]


NETS = {"dense": (dense_layers, (6,)), "conv": (conv_layers, (2, 6, 6))}
TORCH_ACTS = {"tanh": torch.tanh, "relu": torch.relu, "identity": lambda a: a}


def make_net(kind, memory="output", dtype="float64", seed=0):
    layers, _ = NETS[kind]
    return gpu_mlp.Network(layers(), loss="softmax_cross_entropy", memory=memory,
                           device="cpu", dtype=dtype, seed=seed)


def batches(kind, n=STEPS, seed=1):
    rng = np.random.default_rng(seed)
    shape = NETS[kind][1]
    return [(rng.standard_normal((BATCH, *shape)), rng.integers(0, 4, BATCH))
            for _ in range(n)]


def torch_params(net, dtype=torch.float64):
    return [torch.tensor(np.asarray(a, dtype=np.float64), dtype=dtype, requires_grad=True)
            for pair in net.params for a in pair]


def torch_loss(layers, tensors, X, y):
    out = torch.as_tensor(X, dtype=tensors[0].dtype)
    for layer, W, b in zip(layers, tensors[::2], tensors[1::2]):
        if isinstance(layer, Conv2d):
            a = F.conv2d(out, W, b, stride=layer.stride, padding=layer.padding)
        else:
            a = F.linear(torch.flatten(out, 1), W, b)
        out = TORCH_ACTS[layer.activation.name](a)
    return F.cross_entropy(out, torch.as_tensor(y))


def torch_step(opt, layers, tensors, X, y):
    opt.zero_grad()
    torch_loss(layers, tensors, X, y).backward()
    opt.step()


def flat(net):
    return [np.array(a, dtype=np.float64) for pair in net.params for a in pair]


def assert_trajectory_step(ours, theirs, rtol, where, per_tensor=True):
    """Every tensor within ``rtol`` of its largest entry (``per_tensor``), or of the
    largest parameter of the net."""
    theirs = [t.detach().numpy().astype(np.float64) for t in theirs]
    net_scale = max(np.abs(t).max() for t in theirs)
    for k, (a, t) in enumerate(zip(ours, theirs)):
        scale = max(np.abs(t).max(), 1e-30) if per_tensor else net_scale
        err = np.abs(a - t).max() / scale
        assert err <= rtol, f"{where}, tensor {k}: relative error {err:.3g} > {rtol:g}"


# --- 1. trajectories against torch.optim ------------------------------------------------------

# float32: both sides round differently (BLAS orders, torch's fused multiply-adds), and
# Adam's step g / (|g| + eps) magnifies a gradient's rounding 1/eps-fold where |g| ~ eps:
# about 1e-5 of the weights' scale at worst here; a wrong rule is off by 1e-3 or more
@pytest.mark.parametrize("dtype, rtol", [("float64", 1e-10), ("float32", 1e-4)])
@pytest.mark.parametrize("memory", gpu_mlp.MEMORY_MODES)
@pytest.mark.parametrize("kind", NETS)
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_trajectory_matches_torch(name, kind, memory, dtype, rtol):
    ours_factory, torch_factory = OPTIMIZERS[name]
    net = make_net(kind, memory, dtype)
    opt = ours_factory()
    # the float32 net against torch in float32 from the same (float32) start
    tensors = torch_params(net, torch.float64 if dtype == "float64" else torch.float32)
    reference = torch_factory(tensors)
    for step, (X, y) in enumerate(batches(kind)):
        net.train_step(X, y, opt)
        torch_step(reference, net.layers, tensors, X, y)
        assert_trajectory_step(flat(net), tensors, rtol, f"step {step + 1}",
                               per_tensor=dtype == "float64")
    assert opt.steps == STEPS


def test_trajectories_move():
    # the comparisons above compare something: each optimizer moves every tensor
    for name, (factory, _) in OPTIMIZERS.items():
        net = make_net("conv")
        before = flat(net)
        for X, y in batches("conv", 3):
            net.train_step(X, y, factory())
        assert all(not np.array_equal(a, b) for a, b in zip(before, flat(net))), name


@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
def test_sgd_without_momentum_is_the_fused_gemm(weight_decay):
    # no state and no scratch: with wd = 0 the very bits of train_step(X, Y, lr)
    a, b = make_net("conv"), make_net("conv")
    opt = optim.SGD(0.1, weight_decay=weight_decay)
    for X, y in batches("conv", 5):
        a.train_step(X, y, opt)
        b.train_step(X, y, 0.1)
    assert opt.state_bytes == opt.scratch_bytes == 0
    same = all(np.array_equal(x, y) for x, y in zip(flat(a), flat(b)))
    assert same == (weight_decay == 0)


def test_momentum_buffer_is_the_gradient_after_the_first_step():
    # PyTorch's first-step convention: buf = g (not (1 - dampening) g, not mu 0 + g)
    net = make_net("dense")
    X, y = batches("dense", 1)[0]
    _, grads, _ = net.loss_and_gradients(X, y)
    opt = optim.SGD(0.1, momentum=0.9)
    net.train_step(X, y, opt)
    state = opt.state_dict()["state"]["momentum_buffer"]
    for (buf_W, buf_b), (dW, db) in zip(state, grads):
        np.testing.assert_allclose(buf_W, dW, rtol=1e-13, atol=1e-16)
        np.testing.assert_allclose(buf_b, db, rtol=1e-13, atol=1e-16)


# --- 2. schedules against torch.optim.lr_scheduler ---------------------------------------------

def cosine_with_warmup(base, total, warmup, min_lr):
    """The documented formula, written out again for torch's LambdaLR (a factor of base)."""
    def factor(s):
        if s < warmup:
            lr = base * (s + 1) / warmup
        elif s >= total:
            lr = min_lr
        else:
            p = (s - warmup) / (total - warmup)
            lr = min_lr + (base - min_lr) * (1 + math.cos(math.pi * p)) / 2
        return lr / base
    return factor


SCHEDULES = {  # (ours, torch's scheduler on an optimizer), total and min chosen so that
    # 20 steps cover the warm-up, the decay and the steps after it
    "step": (lambda: optim.Step(6, gamma=0.5),
             lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=6, gamma=0.5)),
    "cosine": (lambda: optim.Cosine(15, warmup=4, min_lr=1e-3),
               lambda o: torch.optim.lr_scheduler.LambdaLR(
                   o, cosine_with_warmup(o.defaults["lr"], 15, 4, 1e-3))),
    "cosine-no-warmup": (lambda: optim.Cosine(20),
                         lambda o: torch.optim.lr_scheduler.LambdaLR(
                             o, cosine_with_warmup(o.defaults["lr"], 20, 0, 0.0))),
}


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("name", ["momentum", "adam", "adamw-wd"])
def test_scheduled_trajectory_matches_torch(name, schedule):
    ours_schedule, torch_scheduler = SCHEDULES[schedule]
    ours_factory, torch_factory = OPTIMIZERS[name]
    hyper = ours_factory().hyperparameters()
    hyper.pop("lr")
    if "betas" in hyper:
        hyper["betas"] = tuple(hyper["betas"])
    net = make_net("dense", "recompute")
    opt = type(ours_factory())(lr=0.05, schedule=ours_schedule(), **hyper)
    tensors = torch_params(net)
    reference = torch_factory(tensors)
    for group in reference.param_groups:
        group["lr"] = group["initial_lr"] = 0.05
    reference.defaults["lr"] = 0.05
    scheduler = torch_scheduler(reference)
    for step, (X, y) in enumerate(batches("dense")):
        torch_lr = reference.param_groups[0]["lr"]
        net.train_step(X, y, opt)
        torch_step(reference, net.layers, tensors, X, y)
        scheduler.step()
        assert opt.last_lr == pytest.approx(torch_lr, rel=1e-14, abs=1e-300), step
        assert_trajectory_step(flat(net), tensors, 1e-10, f"step {step + 1}")


def test_cosine_rates_at_the_boundaries():
    schedule = optim.Cosine(10, warmup=4, min_lr=0.01)
    rates = [schedule.lr(0.1, s) for s in range(12)]
    assert rates[:4] == pytest.approx([0.025, 0.05, 0.075, 0.1])  # up to lr, never 0
    assert rates[4] == 0.1 and rates[4:10] == sorted(rates[4:10], reverse=True)
    assert rates[10:] == [0.01, 0.01]
    assert optim.Cosine(3, warmup=3).lr(1.0, 2) == 1.0 and optim.Cosine(3, 3).lr(1.0, 3) == 0


def test_step_rates():
    assert [optim.Step(2, 0.5).lr(1.0, s) for s in range(5)] == [1, 1, 0.5, 0.5, 0.25]
    assert optim.Constant().lr(0.3, 10**6) == 0.3


def test_schedule_position_is_the_step_count():
    opt = optim.SGD(1.0, schedule=optim.Step(2, 0.5))
    net = make_net("dense")
    seen = []
    for X, y in batches("dense", 5):
        assert opt.lr_at(opt.steps) == [1, 1, 0.5, 0.5, 0.25][len(seen)]
        net.train_step(X, y, opt)
        seen.append(opt.last_lr)
    assert seen == [1, 1, 0.5, 0.5, 0.25] and opt.steps == 5


# --- 3. memory -------------------------------------------------------------------------------

# Weights of 1-2 MiB, activations of a few KiB: a gradient buffer per layer would show.
MEM_SIZES, MEM_BATCH = [256, 512, 512, 512, 8], 4
ITEM = 8
PARAM_BYTES = sum((d_in + 1) * d_out for d_in, d_out in zip(MEM_SIZES, MEM_SIZES[1:])) * ITEM
LARGEST_BYTES = max(d_in * d_out for d_in, d_out in zip(MEM_SIZES, MEM_SIZES[1:])) * ITEM
# the NumPy twins' temporaries: a few row blocks (ops.BLOCK_ELEMENTS), and Python objects
SMALL = 4 * ops.BLOCK_ELEMENTS * ITEM + 64 * 1024
assert SMALL < LARGEST_BYTES < PARAM_BYTES / 2


def memory_problem(memory):
    net = gpu_mlp.MLP(MEM_SIZES, loss="squared", memory=memory, device="cpu", dtype="float64",
                      seed=0)
    rng = np.random.default_rng(0)
    return net, rng.standard_normal((MEM_BATCH, MEM_SIZES[0])), \
        rng.standard_normal((MEM_BATCH, MEM_SIZES[-1]))


MEMORY_OPTIMIZERS = {"momentum": lambda: optim.SGD(1e-3, momentum=0.9),
                     "adam": lambda: optim.Adam(1e-4, weight_decay=0.01),
                     "adamw": lambda: optim.AdamW(1e-4)}
STATE_COPIES = {"momentum": 1, "adam": 2, "adamw": 2}


@pytest.mark.parametrize("memory", gpu_mlp.MEMORY_MODES)
@pytest.mark.parametrize("name", MEMORY_OPTIMIZERS)
def test_first_step_allocates_the_state_and_one_scratch(name, memory):
    net, X, Y = memory_problem(memory)
    net.train_step(X, Y, 1e-4)  # the workspace exists before tracing
    opt = MEMORY_OPTIMIZERS[name]()
    with tracing():
        sgd = step_peak(lambda: net.train_step(X, Y, 1e-4, check=False))
        base = numpy_data_now()
        first = step_peak(lambda: net.train_step(X, Y, opt, check=False))
        retained = numpy_data_now() - base
    state = STATE_COPIES[name] * PARAM_BYTES
    assert opt.state_bytes == state and opt.scratch_bytes == LARGEST_BYTES
    assert retained == state + LARGEST_BYTES  # the state and one scratch: all it keeps
    assert state + LARGEST_BYTES <= first - sgd <= state + LARGEST_BYTES + SMALL
    # PyTorch holds a .grad per parameter besides the same state
    assert retained < state + PARAM_BYTES


@pytest.mark.parametrize("memory", gpu_mlp.MEMORY_MODES)
@pytest.mark.parametrize("name", MEMORY_OPTIMIZERS)
def test_steady_state_step_allocates_at_most_the_scratch_beyond_sgd(name, memory):
    net, X, Y = memory_problem(memory)
    opt = MEMORY_OPTIMIZERS[name]()
    net.train_step(X, Y, 1e-4)
    net.train_step(X, Y, opt)
    with tracing():
        sgd = step_peak(lambda: net.train_step(X, Y, 1e-4, check=False))
        steady = step_peak(lambda: net.train_step(X, Y, opt, check=False))
    # the scratch is held already: a step adds the twins' block temporaries at most,
    # nowhere near a gradient buffer per layer
    assert steady - sgd <= min(SMALL, LARGEST_BYTES)
    assert steady - sgd < PARAM_BYTES - LARGEST_BYTES


@pytest.mark.parametrize("name", MEMORY_OPTIMIZERS)
def test_steady_state_allocates_nothing_and_updates_in_place(name):
    net, X, Y = memory_problem("output")
    opt = MEMORY_OPTIMIZERS[name]()
    net.train_step(X, Y, opt)
    ws = net.training_workspace
    counters = (ws.allocations, ws.bytes, opt.state_bytes, opt.scratch_bytes)
    arrays = [a for pairs in opt._state.values() for pair in pairs for a in pair]
    params = [a for pair in net.params for a in pair]
    with tracing():
        J = net.train_step(X, Y, opt)
        base = numpy_data_now()
        for _ in range(10):
            J = net.train_step(X, Y, opt)
        growth = numpy_data_now() - base
    assert growth <= J.nbytes
    assert (ws.allocations, ws.bytes, opt.state_bytes, opt.scratch_bytes) == counters
    assert all(a is b for a, b in zip(arrays, [a for pairs in opt._state.values()
                                               for pair in pairs for a in pair]))
    assert all(a is b for a, b in zip(params, [a for pair in net.params for a in pair]))


def test_one_update_kernel_per_parameter_tensor(monkeypatch):
    calls = []
    for op in ("adam", "sgd_momentum"):
        original = getattr(ops, op)
        monkeypatch.setattr(ops, op, lambda w, *args, op=op, original=original:
                            (calls.append((op, w.size)), original(w, *args)))
    net = make_net("conv")
    X, y = batches("conv", 1)[0]
    for opt, op in ((optim.Adam(), "adam"), (optim.SGD(0.1, momentum=0.5), "sgd_momentum")):
        calls.clear()
        net.train_step(X, y, opt)
        sizes = [a.size for W, b in reversed(net.params) for a in (W, b)]
        assert calls == [(op, size) for size in sizes]  # W_n, b_n, ..., W_1, b_1


# --- 4. state: round trips, resuming ----------------------------------------------------------

RESUMABLE = {
    "adam-cosine": lambda: optim.Adam(1e-2, weight_decay=0.01,
                                      schedule=optim.Cosine(12, warmup=3, min_lr=1e-4)),
    "adamw-step": lambda: optim.AdamW(1e-2, schedule=optim.Step(4, 0.5)),
    "nesterov-cosine": lambda: optim.SGD(0.05, momentum=0.9, nesterov=True,
                                         schedule=optim.Cosine(12, warmup=2)),
    "sgd-step": lambda: optim.SGD(0.05, weight_decay=0.01, schedule=optim.Step(5)),
    "adam-sklearn": lambda: optim.Adam(1e-2, weight_decay=0.01, decay_bias=False,
                                       eps_placement="uncorrected"),
    "momentum-weights": lambda: optim.SGD(0.05, momentum=0.9, weight_decay=0.01,
                                          decay_bias=False),
}


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name", RESUMABLE)
def test_resume_mid_run_from_the_state_dict_is_bit_for_bit(name, dtype):
    data = batches("conv", 12)
    straight, opt = make_net("conv", dtype=dtype), RESUMABLE[name]()
    for X, y in data:
        straight.train_step(X, y, opt)

    first, opt_first = make_net("conv", dtype=dtype), RESUMABLE[name]()
    for X, y in data[:5]:
        first.train_step(X, y, opt_first)
    saved = opt_first.state_dict()
    resumed = gpu_mlp.Network.from_params(first.layers, first.params, first.loss.name,
                                          dtype=dtype, device="cpu")
    opt_resumed = optim.from_state_dict(saved)
    for X, y in data[5:]:
        resumed.train_step(X, y, opt_resumed)

    assert all(np.array_equal(a, b) for a, b in zip(flat(straight), flat(resumed)))
    a, b = opt.state_dict(), opt_resumed.state_dict()
    assert {k: v for k, v in a.items() if k != "state"} == \
        {k: v for k, v in b.items() if k != "state"}
    assert all(np.array_equal(x, y) for name_ in a["state"]
               for pa, pb in zip(a["state"][name_], b["state"][name_]) for x, y in zip(pa, pb))


def test_scale_momentum_keeps_a_velocity_across_a_change_of_lr():
    # v <- mu v - lr g, W <- W + v (scikit-learn's SGD) written out, the rate halved
    # after 4 steps: SGD follows it when its buffers are scaled by old / new
    net, reference = make_net("dense"), make_net("dense")
    opt = optim.SGD(0.1, momentum=0.9)
    velocity = [tuple(np.zeros_like(a) for a in pair) for pair in reference.params]
    for step, (X, y) in enumerate(batches("dense", 8)):
        if step == 4:
            opt.lr = 0.05
            opt.scale_momentum(0.1 / 0.05)
        net.train_step(X, y, opt)
        _, grads, _ = reference.loss_and_gradients(X, y)
        for pair, v_pair, g_pair in zip(reference.params, velocity, grads):
            for a, v, g in zip(pair, v_pair, g_pair):
                v *= 0.9
                v -= opt.lr * g
                a += v
    for a, b in zip(flat(net), flat(reference)):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)
    # before binding it scales the loaded state, not the caller's arrays
    saved = opt.state_dict()
    loaded = optim.from_state_dict(saved)
    loaded.scale_momentum(2.0)
    for (W, b), (W2, b2) in zip(saved["state"]["momentum_buffer"],
                                loaded.state_dict()["state"]["momentum_buffer"]):
        np.testing.assert_array_equal(W2, 2 * W)
        np.testing.assert_array_equal(b2, 2 * b)


def test_state_dict_round_trips_into_a_bound_optimizer():
    net = make_net("dense")
    opt = optim.Adam(1e-2, schedule=optim.Cosine(10))
    data = batches("dense", 6)
    for X, y in data[:3]:
        net.train_step(X, y, opt)
    saved = opt.state_dict()
    after_3 = flat(net)
    for X, y in data[3:]:
        net.train_step(X, y, opt)
    end = flat(net)
    # back to step 3 (parameters and optimizer) and again: the same end
    for (W, b), (W3, b3) in zip(net.params, zip(after_3[::2], after_3[1::2])):
        W[...], b[...] = W3, b3
    opt.load_state_dict(saved)
    assert opt.steps == 3
    for X, y in data[3:]:
        net.train_step(X, y, opt)
    assert all(np.array_equal(a, b) for a, b in zip(end, flat(net)))


def test_state_dict_is_a_copy():
    net, opt = make_net("dense"), optim.Adam()
    X, y = batches("dense", 1)[0]
    net.train_step(X, y, opt)
    saved = opt.state_dict()
    saved["state"]["exp_avg"][0][0][...] = 7
    assert not np.any(opt.state_dict()["state"]["exp_avg"][0][0] == 7)


def test_repr_and_hyperparameters():
    assert repr(optim.SGD(0.1)) == "SGD(lr=0.1, momentum=0.0, nesterov=False, weight_decay=0.0)"
    assert repr(optim.AdamW(schedule=optim.Step(5))) == (
        "AdamW(lr=0.001, betas=(0.9, 0.999), eps=1e-08, weight_decay=0.01, "
        "schedule=Step(step_size=5, gamma=0.1))")
    assert optim.Adam().weight_decay == 0.0 and optim.AdamW().weight_decay == 0.01
    spec = optim.Cosine(100, warmup=10, min_lr=1e-5).spec()
    assert spec == {"type": "cosine", "total_steps": 100, "warmup": 10, "min_lr": 1e-5}
    assert optim.schedule_from_spec(spec) == optim.Cosine(100, 10, 1e-5)


# --- 5. bad input ----------------------------------------------------------------------------

@pytest.mark.parametrize("make, error, match", [
    (lambda: optim.SGD(-0.1), ValueError, "SGD: lr must be a finite number > 0, got -0.1"),
    (lambda: optim.SGD(float("nan")), ValueError, "lr must be a finite number > 0"),
    (lambda: optim.Adam(float("inf")), ValueError, "Adam: lr must be a finite number > 0"),
    (lambda: optim.Adam(0.0), ValueError, "lr must be a finite number > 0"),
    (lambda: optim.SGD("0.1"), TypeError, "lr must be a number"),
    (lambda: optim.SGD(True), TypeError, "lr must be a number"),
    (lambda: optim.SGD(0.1, momentum=1.0), ValueError,
     r"momentum must be a finite number in \[0, 1\)"),
    (lambda: optim.SGD(0.1, momentum=-0.5), ValueError, "momentum must be"),
    (lambda: optim.SGD(0.1, momentum=float("nan")), ValueError, "momentum must be"),
    (lambda: optim.SGD(0.1, nesterov=True), ValueError, "nesterov needs a momentum > 0"),
    (lambda: optim.SGD(0.1, momentum=0.9, nesterov=1), TypeError,
     "nesterov must be True or False"),
    (lambda: optim.SGD(0.1, weight_decay=-1e-4), ValueError,
     "weight_decay must be a finite number >= 0"),
    (lambda: optim.AdamW(weight_decay=float("nan")), ValueError, "weight_decay must be"),
    (lambda: optim.Adam(betas=(1.0, 0.999)), ValueError,
     r"beta1 must be a finite number in \[0, 1\)"),
    (lambda: optim.Adam(betas=(0.9, -0.1)), ValueError, "beta2 must be"),
    (lambda: optim.Adam(betas=(0.9, float("nan"))), ValueError, "beta2 must be"),
    (lambda: optim.Adam(betas=0.9), TypeError, r"betas must be a pair \(beta1, beta2\)"),
    (lambda: optim.Adam(betas=(0.9,)), TypeError, "betas must be a pair"),
    (lambda: optim.Adam(eps=0.0), ValueError, "eps must be a finite number > 0"),
    (lambda: optim.AdamW(eps=-1e-8), ValueError, "eps must be"),
    (lambda: optim.Adam(eps_placement="sklearn"), ValueError,
     "Adam: eps_placement must be one of 'corrected', 'uncorrected', got 'sklearn'"),
    (lambda: optim.SGD(0.1, decay_bias=0), TypeError, "SGD: decay_bias must be True or False"),
    (lambda: optim.AdamW(decay_bias="no"), TypeError, "decay_bias must be True or False"),
    (lambda: optim.SGD(0.1, momentum=0.9).scale_momentum(0.0), ValueError,
     "SGD.scale_momentum: factor must be a finite number > 0"),
    (lambda: optim.Adam(schedule="cosine"), TypeError, "schedule must be a gpu_mlp.optim schedule"),
    (lambda: optim.Step(0), ValueError, "Step: step_size must be an integer >= 1"),
    (lambda: optim.Step(2.5), TypeError, "step_size must be an integer"),
    (lambda: optim.Step(2, gamma=0.0), ValueError, r"gamma must be a finite number in \(0, 1\]"),
    (lambda: optim.Step(2, gamma=1.5), ValueError, "gamma must be"),
    (lambda: optim.Cosine(0), ValueError, "total_steps must be an integer >= 1"),
    (lambda: optim.Cosine(10, warmup=-1), ValueError, "warmup must be an integer >= 0"),
    (lambda: optim.Cosine(10, warmup=11), ValueError, "warmup \\(11 steps\\) must not exceed"),
    (lambda: optim.Cosine(10, min_lr=-1.0), ValueError, "min_lr must be"),
    (lambda: optim.Adam(1e-3, schedule=optim.Cosine(10, min_lr=0.1)), ValueError,
     r"min_lr \(0.1\) must not exceed the optimizer's lr \(0.001\)"),
])
def test_bad_hyperparameters_are_refused(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_lr_can_be_changed_only_to_a_valid_value():
    opt = optim.Adam(1e-3, schedule=optim.Cosine(10, min_lr=1e-4))
    opt.lr = 2e-3
    assert opt.lr == 2e-3 and opt.lr_at(0) == 2e-3
    for bad in (-1.0, float("nan"), 1e-5):  # the last is below the schedule's min_lr
        with pytest.raises(ValueError):
            opt.lr = bad
    assert opt.lr == 2e-3


def test_hyperparameters_are_read_only_but_lr_and_weight_decay():
    # the state a bound optimizer keeps depends on them: a changed momentum could not step
    sgd, adam = optim.SGD(0.1, momentum=0.9), optim.Adam()
    for opt, name, value in ((sgd, "momentum", 0.0), (sgd, "nesterov", True),
                             (sgd, "decay_bias", False), (sgd, "schedule", optim.Constant()),
                             (adam, "betas", (0.5, 0.5)), (adam, "eps", 1.0),
                             (adam, "eps_placement", "uncorrected")):
        with pytest.raises(AttributeError):
            setattr(opt, name, value)
    # the state does not depend on lr and weight_decay: settable between steps, checked
    sgd.weight_decay = 0.5
    assert sgd.weight_decay == 0.5 and sgd.hyperparameters()["weight_decay"] == 0.5
    with pytest.raises(ValueError, match="SGD: weight_decay must be a finite number >= 0"):
        sgd.weight_decay = -1.0
    assert sgd.weight_decay == 0.5


def snapshot(net, opt):
    return flat(net), opt.state_dict()


def assert_unchanged(before, net, opt):
    params, state = before
    assert all(np.array_equal(a, b) for a, b in zip(params, flat(net)))
    now = opt.state_dict()
    assert {k: v for k, v in now.items() if k != "state"} == \
        {k: v for k, v in state.items() if k != "state"}
    assert all(np.array_equal(x, y) for name in state["state"]
               for pa, pb in zip(state["state"][name], now["state"][name])
               for x, y in zip(pa, pb))


def test_an_optimizer_bound_to_another_net_is_refused():
    a, b = make_net("dense"), make_net("dense", seed=5)
    opt = optim.Adam()
    X, y = batches("dense", 1)[0]
    a.train_step(X, y, opt)  # binds to a
    before_a, before_b = snapshot(a, opt), flat(b)
    with pytest.raises(ValueError, match="this Adam is bound to another network"):
        b.train_step(X, y, opt)
    with pytest.raises(ValueError, match="bound to another network"):
        b.fit(X, y, epochs=1, optimizer=opt, verbose=False)
    assert_unchanged(before_a, a, opt)
    assert all(np.array_equal(x, y) for x, y in zip(before_b, flat(b)))


def test_state_of_mismatched_shapes_is_refused():
    net, opt = make_net("dense"), optim.SGD(0.1, momentum=0.9)
    X, y = batches("dense", 1)[0]
    net.train_step(X, y, opt)
    other = gpu_mlp.MLP([6, 11, 9, 4], loss="softmax_cross_entropy", device="cpu",
                        dtype="float64")
    other_opt = optim.SGD(0.1, momentum=0.9)
    other.train_step(X, y, other_opt)
    wrong = other_opt.state_dict()
    before = snapshot(net, opt)
    with pytest.raises(ValueError, match=r"momentum_buffer' of W_1 has shape \(11, 6\), "
                                         r"but W_1 has \(12, 6\)"):
        opt.load_state_dict(wrong)
    assert_unchanged(before, net, opt)
    # loaded into a fresh optimizer, it is refused at the first step, before anything
    fresh = optim.from_state_dict(wrong)
    with pytest.raises(ValueError, match="has shape"):
        net.train_step(X, y, fresh)
    assert all(np.array_equal(a, b) for a, b in zip(before[0], flat(net)))
    assert fresh.steps == 1


@pytest.mark.parametrize("change, error, match", [
    (lambda d: d.update(type="RMSprop"), ValueError, "unknown optimizer 'RMSprop'"),
    (lambda d: d.pop("steps"), ValueError, "must have the entries"),
    (lambda d: d.update(steps=-1), ValueError, "steps must be an integer >= 0"),
    (lambda d: d["hyperparameters"].update(lr=-1.0), ValueError, "lr must be a finite"),
    (lambda d: d["hyperparameters"].update(rho=0.9), ValueError, "rho"),
    (lambda d: d.update(schedule={"type": "exponential"}), ValueError, "a schedule must be"),
    (lambda d: d["state"].pop("exp_avg"), ValueError, r"the state must hold \['exp_avg', "),
    (lambda d: d.update(state={}), ValueError, "3 steps taken, but no state"),
    (lambda d: d["state"]["exp_avg_sq"][0][1].fill(np.nan), ValueError, "contains NaN"),
    (lambda d: d["state"]["exp_avg"].pop(), ValueError, "one number of layers"),
])
def test_bad_state_dicts_are_refused(change, error, match):
    net, opt = make_net("dense"), optim.Adam()
    for X, y in batches("dense", 3):
        net.train_step(X, y, opt)
    state = opt.state_dict()
    before = snapshot(net, opt)
    change(state)
    with pytest.raises(error, match=match):
        optim.from_state_dict(state)
    with pytest.raises(error, match=match):
        opt.load_state_dict(state)
    assert_unchanged(before, net, opt)


def test_a_state_of_another_optimizer_type_is_refused():
    net, opt = make_net("dense"), optim.Adam()
    net.train_step(*batches("dense", 1)[0], opt)
    with pytest.raises(ValueError, match="this AdamW cannot load a state dict of type Adam"):
        optim.AdamW().load_state_dict(opt.state_dict())


def test_train_step_refuses_what_is_not_an_optimizer():
    net = make_net("dense")
    with pytest.raises(TypeError, match="lr must be a number or a gpu_mlp.optim optimizer"):
        net.train_step(*batches("dense", 1)[0], "adam")


def test_docstring_examples_run():
    assert doctest.testmod(optim, raise_on_error=True).attempted > 0


def test_scale_momentum_refuses_a_factor_that_would_overflow_the_buffers():
    net = gpu_mlp.MLP([4, 5, 3], device="cpu", dtype="float32", seed=0)
    opt = optim.SGD(0.1, momentum=0.9)
    X, Y = np.ones((2, 4)), np.ones((2, 3))
    net.train_step(X, Y, opt)
    buffers = [b.copy() for pair in opt._state["momentum_buffer"] for b in pair]
    largest = max(float(abs(b).max()) for b in buffers)
    for factor in (1e39, 2 * float(np.finfo(np.float32).max) / largest):
        with pytest.raises(ValueError, match="SGD.scale_momentum: factor"):
            opt.scale_momentum(factor)
    for a, b in zip((b for pair in opt._state["momentum_buffer"] for b in pair), buffers):
        np.testing.assert_array_equal(a, b)
    opt.scale_momentum(2.0)  # a fair one still scales
    np.testing.assert_array_equal(opt._state["momentum_buffer"][0][0], 2 * buffers[0])
