"""DP-SGD (gpu_mlp.privacy): the private step against PyTorch and Opacus, its noise by its
statistics, its state, fit's Poisson sampling and accounting, memory, the CuPy path and
the command line.

The spec: ``train_step(X, Y, lr, dp=DP(C, sigma, ...))`` is

    W <- W - lr / B * (sum_i min(1, C / ||g_i||) g_i + N(0, sigma^2 C^2 I))

with ``g_i`` the gradient of sample i's own loss over every W_k and b_k together and B
the batch's rows (fit divides by the expected batch size of its Poisson sampling). With
an optimizer, the noised, clipped mean gradient is what the optimizer sees.

1. noise 0: the update against per-sample gradients from PyTorch autograd (one sample at
   a time) and from Opacus, in every memory mode, dense and convolutional, some samples
   clipped and some not: to 1e-10 in float64;
2. with optimizers (SGD momentum, Adam, AdamW), noise 0: torch.optim fed the clipped mean
   gradient, over 3 steps;
3. with noise: noised minus noise-free update is N(0, (lr sigma C / B)^2) per entry (a KS
   test and the sample std, which a wrong scale is shown to fail), independent across
   tensors and steps, reproducible from the seed;
4. the bias gets its noise too, and the optimizer's path adds it once;
5. an empty Poisson batch: noise only;
6. the step count, state dicts and checkpoints;
7. fit: Poisson sampling, epsilon per epoch against dp-accounting, resuming bit for bit;
8. bad input: clear errors, nothing changed;
9. memory: no per-sample gradient is ever formed for a dense net (tracemalloc on the
   NumPy backend); a convolution's only where its norm computes them anyway, kept
   within its rows' memory and summed by a GEMV (and otherwise the factors go on);
10. the CuPy path through the host stand-in (tests/host_cupy.py);
11. the command line.
"""

import json
import math
import os
import re
import warnings

import numpy as np
import pytest
from scipy import stats

import gpu_mlp
from gpu_mlp import checkpoint, cli, optim, privacy
from gpu_mlp.layers import Conv2d, Dense
from gpu_mlp.plan import StepPlan
from gpu_mlp.privacy import DP
import test_optim
from tracing import numpy_data_now, step_peak, tracing

torch = pytest.importorskip("torch")
nn = torch.nn
accounting = pytest.importorskip("gpu_mlp.accounting")

LR, BATCH = 0.1, 8
RTOL = 1e-10  # float64, against PyTorch
# The statistics below come from fixed seeds, so each check passes or fails for good;
# the bounds are 5 standard errors and a KS p-value of 1e-4 (as tests/test_noise.py).
SIGMAS, KS_LEVEL = 5, 1e-4


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The tensors here are tiny: one thread is fastest and leaves the cores alone."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- the networks, on both sides -------------------------------------------------------------

# (layers, per-sample input shape, loss). The second convolution's per-sample norm takes
# the Gram path (P (c_out + K) < c_out K: 4 * 43 < 16 * 27), the first the direct one.
NETS = {
    "dense-xent": (lambda: [Dense(6, 12, "tanh"), Dense(12, 9, "relu"),
                            Dense(9, 4, "identity")], (6,), "softmax_cross_entropy"),
    "dense-squared": (lambda: [Dense(6, 10, "sigmoid"), Dense(10, 8, "tanh"),
                               Dense(8, 3, "identity")], (6,), "squared"),
    "dense-gelu": (lambda: [Dense(6, 10, "gelu"), Dense(10, 4, "identity")], (6,),
                   "softmax_cross_entropy"),
    "conv": (lambda: [Conv2d(2, 3, 3, padding=1, activation="relu"),
                      Conv2d(3, 16, 3, stride=2, activation="tanh"),
                      Dense(16 * 2 * 2, 4, "identity")], (2, 6, 6), "softmax_cross_entropy"),
    "conv-squared": (lambda: [Conv2d(1, 4, 3, activation="sigmoid"),
                              Dense(4 * 4 * 4, 2, "identity")], (1, 6, 6), "squared"),
}
# gelu has no sigma' from its output: not in "output" mode
CASES = [(kind, memory) for kind in NETS for memory in gpu_mlp.MEMORY_MODES
         if not (kind == "dense-gelu" and memory == "output")]

TORCH_ACTS = {"identity": nn.Identity, "relu": nn.ReLU, "tanh": nn.Tanh,
              "sigmoid": nn.Sigmoid, "gelu": nn.GELU}


def make_net(kind, memory="output", seed=0):
    """A float64 NumPy net with random weights and random (nonzero) biases."""
    layers, _, loss = NETS[kind]
    net = gpu_mlp.Network(layers(), loss=loss, memory=memory, device="cpu",
                          dtype="float64", seed=seed)
    rng = np.random.default_rng(seed + 100)
    for _, b in net.params:
        b[...] = 0.3 * rng.standard_normal(b.shape)
    return net


def make_batch(kind, batch=BATCH, seed=1):
    _, shape, loss = NETS[kind]
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((batch, *shape))
    d_out = NETS[kind][0]()[-1].d_out
    Y = (rng.integers(0, d_out, batch) if loss == "softmax_cross_entropy"
         else rng.standard_normal((batch, d_out)))
    return X, Y


def torch_model(net):
    """The equivalent torch.nn.Sequential in float64, from net.params (torch's layouts)."""
    modules, after_conv = [], False
    for layer, (W, b) in zip(net.layers, net.params):
        if isinstance(layer, Conv2d):
            module = nn.Conv2d(layer.c_in, layer.c_out, layer.kernel_size, stride=layer.stride,
                               padding=layer.padding, dtype=torch.float64)
            after_conv = True
        else:
            if after_conv:
                modules.append(nn.Flatten())
                after_conv = False
            module = nn.Linear(layer.d_in, layer.d_out, dtype=torch.float64)
        with torch.no_grad():
            module.weight.copy_(torch.from_numpy(np.array(W)))
            module.bias.copy_(torch.from_numpy(np.array(b)))
        assert layer.activation.alpha == 1
        modules += [module, TORCH_ACTS[layer.activation.name]()]
    return nn.Sequential(*modules)


def torch_loss(name, out, Y):
    """The summed loss of the rows: each sample's own loss, not the mean."""
    if name == "softmax_cross_entropy":
        return nn.functional.cross_entropy(out, torch.as_tensor(Y), reduction="sum")
    return ((out - torch.as_tensor(Y)) ** 2).sum()


def per_sample_grads(model, loss, X, Y):
    """[sample][tensor] gradients of each sample's own loss, one backward per sample."""
    grads = []
    for i in range(len(X)):
        model.zero_grad()
        torch_loss(loss, model(torch.as_tensor(X[i:i + 1])), Y[i:i + 1]).backward()
        grads.append([p.grad.detach().numpy().copy() for p in model.parameters()])
    return grads


def norms_of(grads):
    return np.array([math.sqrt(sum(float((g ** 2).sum()) for g in sample)) for sample in grads])


def clipped_sum(grads, C):
    """sum_i min(1, C / ||g_i||) g_i per tensor, and the norms ||g_i||."""
    norms = norms_of(grads)
    factors = np.minimum(1.0, C / norms)
    return [sum(f * sample[t] for f, sample in zip(factors, grads))
            for t in range(len(grads[0]))], norms


def between(norms):
    """A clipping norm with half the samples above it and half below."""
    s = np.sort(norms)
    half = len(s) // 2
    assert s[half - 1] < s[half]
    return math.sqrt(s[half - 1] * s[half])


def flat(net):
    return [np.array(a) for pair in net.params for a in pair]


def assert_update(before, after, expected, where=""):
    """after - before equals ``expected`` per tensor, within RTOL of its largest entry."""
    assert len(before) == len(after) == len(expected)
    for t, (a, b, e) in enumerate(zip(before, after, expected)):
        scale = np.abs(e).max()
        assert scale > 0, f"{where} tensor {t}: no update expected"
        err = np.abs((b - a) - e).max() / scale
        assert err <= RTOL, f"{where} tensor {t}: relative error {err:.3g}"


def both_sides_of(norms, C):
    assert (norms > C * (1 + 1e-6)).any(), "no sample is clipped"
    assert (norms < C * (1 - 1e-6)).any(), "every sample is clipped"


# --- 1. noise 0 against PyTorch autograd and Opacus ------------------------------------------

@pytest.mark.parametrize("kind, memory", CASES)
def test_clipped_update_matches_torch_per_sample_gradients(kind, memory):
    net = make_net(kind, memory)
    X, Y = make_batch(kind)
    grads = per_sample_grads(torch_model(net), net.loss.name, X, Y)
    C = between(norms_of(grads))
    total, norms = clipped_sum(grads, C)
    both_sides_of(norms, C)
    # and the engine's own per-sample norms are torch's
    np.testing.assert_allclose(net.per_sample_grad_norms(X, Y), norms, rtol=1e-12)
    before = flat(net)
    dp = DP(max_grad_norm=C, noise_multiplier=0.0)
    loss = net.train_step(X, Y, LR, dp=dp)
    assert_update(before, flat(net), [-LR / BATCH * g for g in total], f"{kind}/{memory}")
    assert dp.steps == 1
    # the loss returned is the batch mean, as without dp
    plain = make_net(kind, memory)
    assert float(loss) == pytest.approx(float(plain.train_step(X, Y, LR)), rel=1e-13)


@pytest.mark.parametrize("memory", gpu_mlp.MEMORY_MODES)
def test_fit_steps_divide_by_the_expected_batch(memory):
    # fit's steps: the clipped sum over the Poisson sample's rows over the expected batch
    # size, whatever the sample's own size
    net = make_net("conv", memory)
    X, Y = make_batch("conv", batch=5)
    total, norms = clipped_sum(per_sample_grads(torch_model(net), net.loss.name, X, Y), 0.5)
    before = flat(net)
    net._step(X, Y, StepPlan(LR, DP(0.5, 0.0)), True, expected_batch=7)
    assert_update(before, flat(net), [-LR / 7 * g for g in total], memory)


def test_float32_step_is_the_float64_step_rounded():
    X, Y = make_batch("conv")
    C = between(make_net("conv").per_sample_grad_norms(X, Y))
    wide = make_net("conv")
    narrow = gpu_mlp.Network.from_params(NETS["conv"][0](), wide.params, wide.loss.name,
                                         device="cpu", dtype="float32")
    before = flat(wide)
    for net in (wide, narrow):
        net.train_step(X, Y, LR, dp=DP(C, 0.0))
    for a, w, n in zip(before, flat(wide), flat(narrow)):
        update = w - a
        err = np.abs((n.astype(np.float64) - a) - update).max() / np.abs(update).max()
        assert err < 1e-3, err


def test_clipping_changes_the_update():
    # the comparison above compares something: without clipping the update differs
    net, plain = make_net("dense-xent"), make_net("dense-xent")
    X, Y = make_batch("dense-xent")
    C = between(net.per_sample_grad_norms(X, Y))
    net.train_step(X, Y, LR, dp=DP(C, 0.0))
    plain.train_step(X, Y, LR)
    assert not any(np.allclose(a, b, rtol=1e-6, atol=0) for a, b in zip(flat(net), flat(plain)))
    # and a clipping norm above every sample's is the plain step (sum / B = mean)
    big, plain = make_net("dense-xent"), make_net("dense-xent")
    C = 2 * float(big.per_sample_grad_norms(X, Y).max())
    big.train_step(X, Y, LR, dp=DP(C, 0.0))
    plain.train_step(X, Y, LR)
    for a, b in zip(flat(big), flat(plain)):
        np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-15)


# Opacus' hooks warn that the input needs no gradient: it does not here
@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
@pytest.mark.parametrize("kind", ["dense-xent", "dense-squared", "conv"])
def test_clipped_update_matches_opacus(kind):
    opacus = pytest.importorskip("opacus", reason="needs opacus for its per-sample gradients")
    net = make_net(kind)
    X, Y = make_batch(kind)
    model = opacus.GradSampleModule(torch_model(net), loss_reduction="sum")
    torch_loss(net.loss.name, model(torch.as_tensor(X)), Y).backward()
    params = list(model.parameters())
    grads = [[p.grad_sample[i].detach().numpy() for p in params] for i in range(BATCH)]
    C = between(norms_of(grads))
    total, norms = clipped_sum(grads, C)
    both_sides_of(norms, C)
    before = flat(net)
    net.train_step(X, Y, LR, dp=DP(C, 0.0))
    assert_update(before, flat(net), [-LR / BATCH * g for g in total], kind)


# --- 2. optimizers see the clipped mean gradient ---------------------------------------------

OPTIMIZERS = {name: test_optim.OPTIMIZERS[name]  # (ours, torch's), as the optimizer tests
              for name in ("momentum", "nesterov-wd", "adam", "adamw")}


@pytest.mark.parametrize("kind", ["dense-xent", "conv"])
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_optimizer_sees_the_clipped_mean_gradient(name, kind):
    ours, theirs = OPTIMIZERS[name]
    net = make_net(kind)
    model = torch_model(net)
    reference = theirs(list(model.parameters()))
    opt, dp = ours(), None
    clipped = unclipped = 0
    for step in range(3):
        X, Y = make_batch(kind, seed=10 + step)
        grads = per_sample_grads(model, net.loss.name, X, Y)
        if dp is None:
            dp = DP(between(norms_of(grads)), 0.0)
        total, norms = clipped_sum(grads, dp.max_grad_norm)
        clipped += int((norms > dp.max_grad_norm).sum())
        unclipped += int((norms < dp.max_grad_norm).sum())
        reference.zero_grad()
        for p, g in zip(model.parameters(), total):
            p.grad = torch.from_numpy(g / BATCH)
        reference.step()
        net.train_step(X, Y, opt, dp=dp)
        for t, (a, p) in enumerate(zip(flat(net), model.parameters())):
            p = p.detach().numpy()
            err = np.abs(a - p).max() / np.abs(p).max()
            assert err <= RTOL, f"step {step + 1}, tensor {t}: relative error {err:.3g}"
    assert clipped and unclipped
    assert opt.steps == dp.steps == 3


@pytest.mark.parametrize("kind", ["dense-xent", "conv"])
@pytest.mark.parametrize("name", ["momentum", "adam"])
def test_optimizer_sees_the_noised_clipped_mean_gradient(name, kind):
    # The noise of a step is a function of (seed, step) alone: read it off an empty step
    # of plain SGD (pure noise), then feed torch.optim (clipped sum + sigma C z) / B.
    ours, theirs = OPTIMIZERS[name]
    sigma, seed = 0.7, 5
    noises = [step_noise(make_net(kind), seed, step) for step in range(3)]
    net = make_net(kind)
    model = torch_model(net)
    reference = theirs(list(model.parameters()))
    opt = ours()
    dp = None
    for step in range(3):
        X, Y = make_batch(kind, seed=10 + step)
        grads = per_sample_grads(model, net.loss.name, X, Y)
        if dp is None:
            dp = DP(between(norms_of(grads)), sigma, seed=seed)
        total, _ = clipped_sum(grads, dp.max_grad_norm)
        reference.zero_grad()
        for p, g, z in zip(model.parameters(), total, noises[step]):
            p.grad = torch.from_numpy((g + sigma * dp.max_grad_norm * z) / BATCH)
        reference.step()
        net.train_step(X, Y, opt, dp=dp)
        for t, (a, p) in enumerate(zip(flat(net), model.parameters())):
            p = p.detach().numpy()
            err = np.abs(a - p).max() / np.abs(p).max()
            assert err <= 1e-9, f"step {step + 1}, tensor {t}: relative error {err:.3g}"


def step_noise(net, seed, step, expected_batch=4, lr=1.0):
    """[per tensor] the standard normals z of step ``step`` of DP(1, 1, seed): an empty
    step of plain SGD moves W by -lr (sigma C / expected_batch) z."""
    before = flat(net)
    dp = DP(1.0, 1.0, seed=seed)
    dp.steps = step
    first = net.layers[0]
    shape = (0, first.c_in, 6, 6) if isinstance(first, Conv2d) else (0, first.d_in)
    net._step(np.empty(shape), np.empty(0, dtype=np.int64), StepPlan(lr, dp), True,
              expected_batch=expected_batch)
    std = lr / expected_batch
    return [(b - a) / -std for a, b in zip(before, flat(net))]


# --- 3. and 4. the noise ---------------------------------------------------------------------

# over 10^4 parameters: 100*96 + 96 + 96*32 + 32 = 12800
NOISY_SIZES, NOISY_BATCH = [100, 96, 32], 16
CLIP, SIGMA, SEED = 0.5, 1.3, 7


def noisy_net(seed=0):
    return gpu_mlp.MLP(NOISY_SIZES, activations=["tanh", "identity"],
                       loss="softmax_cross_entropy", device="cpu", dtype="float64", seed=seed)


def noisy_batch(seed=3, batch=NOISY_BATCH):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((batch, NOISY_SIZES[0])), rng.integers(0, NOISY_SIZES[-1], batch)


def noise_of(rule=lambda: LR, sigma=SIGMA, seed=SEED, steps=0, batch=None):
    """[per tensor] noised update minus noise-free update of one step from the same
    parameters on the same batch, divided by the documented std lr sigma C / B."""
    X, Y = noisy_batch() if batch is None else batch
    updated = []
    for s in (0.0, sigma):
        net = noisy_net()
        dp = DP(CLIP, s, seed=seed)
        dp.steps = steps
        net.train_step(X, Y, rule(), dp=dp)
        updated.append(flat(net))
    std = LR * sigma * CLIP / len(X)
    return [(noised - clean) / -std for clean, noised in zip(*updated)]


def standard_normal_verdict(z):
    """None if z looks N(0, 1) -- mean and std within 5 standard errors, KS p > 1e-4 --
    else what does not."""
    z = np.asarray(z, dtype=np.float64).reshape(-1)
    n = z.size
    if abs(z.mean()) > SIGMAS / math.sqrt(n):
        return f"mean {z.mean():.4g}"
    if abs(z.std() - 1) > SIGMAS / math.sqrt(2 * n):
        return f"std {z.std():.4g}"
    p = stats.kstest(z, "norm").pvalue
    if p < KS_LEVEL:
        return f"KS p-value {p:.3g}"
    return None


def assert_uncorrelated(a, b, what):
    n = min(a.size, b.size)
    r = np.corrcoef(a.reshape(-1)[:n], b.reshape(-1)[:n])[0, 1]
    assert abs(r) < SIGMAS / math.sqrt(n), f"{what}: correlation {r:.3g}"


RULES = {"sgd": lambda: LR, "sgd-optimizer": lambda: optim.SGD(LR),
         "momentum": lambda: optim.SGD(LR, momentum=0.9)}  # first step: W -= lr g


@pytest.mark.parametrize("rule", RULES)
def test_noise_is_gaussian_with_std_lr_sigma_c_over_b(rule):
    z = noise_of(RULES[rule])
    everything = np.concatenate([t.reshape(-1) for t in z])
    assert everything.size >= 10 ** 4
    assert standard_normal_verdict(everything) is None, standard_normal_verdict(everything)
    assert abs(everything.std() - 1) < 0.03  # within a few percent
    # the test can fail: a wrong scale does -- twice or half the std, or the std of the
    # sum, not divided by B (noise_of divided by the right one)
    for wrong in (2.0, 0.5, NOISY_BATCH, 1 / NOISY_BATCH, 1.1):
        assert standard_normal_verdict(everything * wrong) is not None, wrong
    # every tensor, the biases too, has its noise, of the same std: added once
    for t, part in enumerate(z):
        assert standard_normal_verdict(part) is None, (t, standard_normal_verdict(part))
    biases = np.concatenate([z[1], z[3]])
    assert np.all(biases != 0)
    assert abs(biases.std() - 1) < SIGMAS / math.sqrt(2 * biases.size)


def test_noise_is_independent_across_tensors_and_entries():
    W1, b1, W2, b2 = noise_of()
    assert_uncorrelated(W1, W2, "W_1 and W_2")
    assert_uncorrelated(W1, b1, "W_1 and b_1")
    assert_uncorrelated(W2, b2, "W_2 and b_2")
    assert_uncorrelated(b1, b2, "b_1 and b_2")
    flat_W1 = W1.reshape(-1)
    assert_uncorrelated(flat_W1[:-1], flat_W1[1:], "neighbours in W_1")
    assert_uncorrelated(W1[:, :-1], W1[:, 1:], "neighbouring columns of W_1")
    half = flat_W1.size // 2
    assert_uncorrelated(flat_W1[:half], flat_W1[half:], "the halves of W_1")


def test_noise_differs_from_step_to_step():
    first = np.concatenate([t.reshape(-1) for t in noise_of(steps=0)])
    second = np.concatenate([t.reshape(-1) for t in noise_of(steps=1)])
    assert standard_normal_verdict(second) is None
    assert np.mean(first == second) < 1e-3
    assert_uncorrelated(first, second, "steps 0 and 1")


def test_noise_is_reproducible_from_the_seed():
    def run(seed, steps=3):
        net, dp = noisy_net(), DP(CLIP, SIGMA, seed=seed)
        for step in range(steps):
            net.train_step(*noisy_batch(seed=20 + step), LR, dp=dp)
        return flat(net)

    a, b, c = run(SEED), run(SEED), run(SEED + 1)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not any(np.allclose(x, y) for x, y in zip(a, c))
    # the seed's noise is another seed's independent noise
    other = np.concatenate([t.reshape(-1) for t in noise_of(seed=SEED + 1)])
    ours = np.concatenate([t.reshape(-1) for t in noise_of(seed=SEED)])
    assert_uncorrelated(ours, other, "seeds 7 and 8")


def test_noise_scales_with_c_and_sigma():
    # noise_of divides by lr sigma C / B with another sigma: still N(0, 1)
    z = np.concatenate([t.reshape(-1) for t in noise_of(sigma=0.4)])
    assert standard_normal_verdict(z) is None, standard_normal_verdict(z)


# --- 5. an empty batch: noise only -----------------------------------------------------------

EXPECTED_BATCH = 10


def test_empty_poisson_batch_applies_noise_only():
    # what fit does with an empty Poisson sample: the step divides by the expected batch
    net = noisy_net()
    before = flat(net)
    dp = DP(CLIP, SIGMA, seed=SEED)
    X, Y = np.empty((0, NOISY_SIZES[0])), np.empty(0, dtype=np.int64)
    J = net._step(X, Y, StepPlan(LR, dp), True, expected_batch=EXPECTED_BATCH)
    assert float(J) == 0.0
    assert dp.steps == 1
    std = LR * SIGMA * CLIP / EXPECTED_BATCH
    z = np.concatenate([((b - a) / -std).reshape(-1) for a, b in zip(before, flat(net))])
    assert standard_normal_verdict(z) is None, standard_normal_verdict(z)
    assert standard_normal_verdict(z * 2) is not None
    # without noise, nothing moves
    net = noisy_net()
    dp = DP(CLIP, 0.0)
    assert float(net._step(X, Y, StepPlan(LR, dp), True, expected_batch=EXPECTED_BATCH)) == 0.0
    assert all(np.array_equal(a, b) for a, b in zip(before, flat(net))) and dp.steps == 1


@pytest.mark.parametrize("rule", ["sgd", "momentum"])
def test_empty_batch_noise_is_the_noise_of_that_step(rule):
    # the noise of an empty step is the very noise a full step of that position adds
    net = noisy_net()
    before = flat(net)
    dp = DP(CLIP, SIGMA, seed=SEED)
    X, Y = noisy_batch(batch=EXPECTED_BATCH)
    net._step(X[:0], Y[:0], StepPlan(RULES[rule](), dp), True, expected_batch=EXPECTED_BATCH)
    empty = [b - a for a, b in zip(before, flat(net))]
    full = noise_of(RULES[rule], batch=(X, Y))
    std = LR * SIGMA * CLIP / EXPECTED_BATCH
    for e, f in zip(empty, full):
        np.testing.assert_allclose(e / -std, f, rtol=1e-6, atol=1e-6)


def test_train_step_with_an_empty_batch_and_dp_is_refused_cleanly():
    # train_step divides by the batch's rows: with none there is no step to take. A clear
    # ValueError, nothing changed -- not a ZeroDivisionError from inside the step.
    net = noisy_net()
    before = flat(net)
    dp = DP(CLIP, SIGMA)
    with pytest.raises(ValueError, match="empty|no rows|0 rows"):
        net.train_step(np.empty((0, NOISY_SIZES[0])), np.empty(0, dtype=np.int64), LR, dp=dp)
    assert all(np.array_equal(a, b) for a, b in zip(before, flat(net))) and dp.steps == 0


# --- 6. the step count, state and checkpoints ------------------------------------------------

def test_steps_count_and_the_state_dict_round_trips():
    net, dp = noisy_net(), DP(CLIP, SIGMA, delta=1e-6, seed=11, accountant="pld")
    for step in range(3):
        net.train_step(*noisy_batch(seed=step), LR, dp=dp)
        assert dp.steps == step + 1
    state = dp.state_dict()
    assert json.loads(json.dumps(state)) == state  # JSON-ready, as checkpoints store it
    assert state == {"max_grad_norm": CLIP, "noise_multiplier": SIGMA, "delta": 1e-6,
                     "seed": 11, "accountant": "pld", "steps": 3}
    copy = DP.from_state_dict(state)
    assert copy.state_dict() == state and repr(copy) == repr(dp)
    # the copy continues the noise stream where the original is
    other = gpu_mlp.MLP.from_params(net.params, net.activations, net.loss.name, device="cpu")
    X, Y = noisy_batch(seed=9)
    net.train_step(X, Y, LR, dp=dp)
    other.train_step(X, Y, LR, dp=copy)
    assert all(np.array_equal(a, b) for a, b in zip(flat(net), flat(other)))


def test_a_secret_seed_stays_secret_through_states_and_checkpoints(tmp_path):
    """A drawn seed is not shown (repr says <secret>); a state dict, a checkpoint or
    a --dp-seed that differs from it on --resume showed it."""
    dp = DP(CLIP, SIGMA)
    assert dp.drawn and str(dp.seed) not in repr(dp) and "seed=<secret>" in repr(dp)
    copy = DP.from_state_dict(dp.state_dict())
    assert copy.seed == dp.seed and repr(copy) == repr(dp)
    assert not DP.from_state_dict(DP(CLIP, SIGMA, seed=3).state_dict()).drawn
    net = noisy_net()
    net.save(tmp_path / "private.npz", dp=dp)
    assert repr(checkpoint.read(tmp_path / "private.npz").dp) == repr(dp)


def test_checkpoint_keeps_the_dp(tmp_path):
    net, dp = noisy_net(), DP(CLIP, SIGMA, delta=1e-6, seed=11)
    for step in range(2):
        net.train_step(*noisy_batch(seed=step), LR, dp=dp)
    path = tmp_path / "private.npz"
    checkpoint.save(net, path, dp=dp)
    read = checkpoint.read(path, device="cpu")
    assert read.dp is not dp and read.dp.state_dict() == dp.state_dict()
    net.save(tmp_path / "method.npz", dp=dp)
    assert checkpoint.read(tmp_path / "method.npz").dp.state_dict() == dp.state_dict()
    net.save(tmp_path / "plain.npz")
    assert checkpoint.read(tmp_path / "plain.npz").dp is None
    # and continues the stream
    X, Y = noisy_batch(seed=9)
    net.train_step(X, Y, LR, dp=dp)
    read.net.train_step(X, Y, LR, dp=read.dp)
    assert all(np.array_equal(a, b) for a, b in zip(flat(net), flat(read.net)))
    with pytest.raises(TypeError, match="dp must be a gpu_mlp.privacy.DP"):
        checkpoint.save(net, tmp_path / "bad.npz", dp=dp.state_dict())


BAD_STATES = {
    "missing steps": lambda s: {k: v for k, v in s.items() if k != "steps"},
    "extra entry": lambda s: {**s, "epsilon": 1.0},
    "negative steps": lambda s: {**s, "steps": -1},
    "bad clip": lambda s: {**s, "max_grad_norm": 0.0},
    "bad delta": lambda s: {**s, "delta": 1.5},
    "bad accountant": lambda s: {**s, "accountant": "moments"},
    "not a dict": lambda s: list(s.items()),
    "drawn not a flag": lambda s: {**s, "drawn": 1},
}


@pytest.mark.parametrize("change", BAD_STATES)
def test_bad_state_dicts_are_refused(change):
    with pytest.raises(ValueError):
        DP.from_state_dict(BAD_STATES[change](DP(1.0, 1.0).state_dict()))


# --- 7. fit: Poisson sampling, epsilon, resuming ---------------------------------------------

FIT_N, FIT_BATCH, FIT_SIGMA, FIT_DELTA = 200, 20, 1.1, 1e-5
FIT_STEPS = FIT_N // FIT_BATCH  # per epoch
Q = FIT_BATCH / FIT_N


def fit_data(seed=0):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((FIT_N, 6))
    return X, np.argmax(X[:, :4], axis=1)


def fit_net():
    return make_net("dense-xent")


def test_poisson_batches():
    sizes, taken = [], np.zeros(FIT_N)
    for epoch in range(20):
        batches = list(privacy.poisson_batches(FIT_N, FIT_BATCH, seed=3, epoch=epoch))
        assert len(batches) == FIT_STEPS
        again = list(privacy.poisson_batches(FIT_N, FIT_BATCH, seed=3, epoch=epoch))
        assert all(np.array_equal(a, b) for a, b in zip(batches, again))
        for rows in batches:
            assert np.all(np.diff(rows) > 0)  # distinct rows, in order
            assert rows.size == 0 or 0 <= rows[0] <= rows[-1] < FIT_N
            sizes.append(rows.size)
            taken[rows] += 1
    sizes = np.array(sizes)
    # Binomial(n, q) sizes: mean n q = batch_size, variance n q (1 - q)
    se = math.sqrt(FIT_N * Q * (1 - Q) / sizes.size)
    assert abs(sizes.mean() - FIT_BATCH) < SIGMAS * se
    assert sizes.var() == pytest.approx(FIT_N * Q * (1 - Q), rel=0.25)
    assert len(set(sizes.tolist())) > 5  # sizes vary
    # every row taken with probability q at each step, apart from the others: its count
    # over the steps Binomial(steps, q), whichever the row
    steps = sizes.size
    assert taken.var() == pytest.approx(steps * Q * (1 - Q), rel=0.25)
    assert abs(taken[:FIT_N // 2].mean() - taken[FIT_N // 2:].mean()) < \
        SIGMAS * math.sqrt(2 * steps * Q * (1 - Q) / (FIT_N // 2))
    other = list(privacy.poisson_batches(FIT_N, FIT_BATCH, seed=3, epoch=99))
    assert not all(np.array_equal(a, b) for a, b in zip(batches, other))
    # a batch past the data: one step of every row (n / batch_size underflowed to 0 steps)
    [every] = privacy.poisson_batches(FIT_N, 10**400, seed=3, epoch=0)
    np.testing.assert_array_equal(every, np.arange(FIT_N))


def test_fit_samples_poisson_batches_and_divides_by_the_batch_size(monkeypatch):
    net = fit_net()
    X, Y = fit_data()
    seen = []
    step = net._step

    def record(X_batch, Y_batch, *args, **kwargs):
        J = step(X_batch, Y_batch, *args, **kwargs)  # (which gathers the batch into X_batch)
        seen.append((np.array(X_batch), kwargs.get("expected_batch")))
        return J

    monkeypatch.setattr(net, "_step", record)
    dp = DP(1.0, FIT_SIGMA)  # a secret seed, which keys the sampling too
    with warnings.catch_warnings():  # (its noise, unseeded, may make the loss rise: warned)
        warnings.simplefilter("ignore", gpu_mlp.training.TrainingWarning)
        net.fit(X, Y, epochs=2, batch_size=FIT_BATCH, lr=LR, seed=4, dp=dp, verbose=False)
    expected = [rows for epoch in range(2)
                for rows in privacy.poisson_batches(FIT_N, FIT_BATCH, 4, epoch, dp.seed)]
    public = [rows for epoch in range(2)
              for rows in privacy.poisson_batches(FIT_N, FIT_BATCH, 4, epoch)]
    assert not all(len(a) == len(b) and (a == b).all() for a, b in zip(expected, public))
    assert len(seen) == len(expected) == 2 * FIT_STEPS
    for (X_batch, divisor), rows in zip(seen, expected):
        np.testing.assert_array_equal(X_batch, X[rows])
        assert divisor == FIT_BATCH
    assert len({len(x) for x, _ in seen}) > 1


def test_a_batch_size_past_the_data_divides_by_the_data_not_the_batch_size():
    """batch_size > n: the sample rate is 1, every step takes every row, and the expected
    batch is n (MATH.md: q N; Opacus's too). Dividing by batch_size made the step (and
    the noise) smaller than that of batch_size = n, which samples the very same rows."""
    X, Y = fit_data()
    n = len(X)
    updates = []
    for batch_size in (n, 2 * n):
        net = fit_net()
        before = [W.copy() for W, _ in net.params]
        net.fit(X, Y, epochs=1, batch_size=batch_size, lr=LR, seed=4, dp=DP(1.0, 0.0),
                verbose=False)
        updates.append([W - W0 for (W, _), W0 in zip(net.params, before)])
    for a, b in zip(*updates):
        np.testing.assert_array_equal(a, b)
    assert any(np.abs(a).max() > 0 for a in updates[0])


def test_resuming_a_private_run_takes_the_dp_that_trained_it():
    """A private run's History records the privacy spent: resumed without a DP it went
    on without privacy, and with a DP whose noise was raised (in a checkpoint, say) it
    counted less privacy than was spent. Both are refused before any step; its own DP
    goes on."""
    net, (X, Y) = fit_net(), fit_data()
    dp = DP(1.0, FIT_SIGMA, delta=FIT_DELTA)
    history = net.fit(X, Y, epochs=1, batch_size=FIT_BATCH, lr=LR, dp=dp, verbose=False)
    before = [a.copy() for pair in net.params for a in pair]
    louder = DP.from_state_dict({**dp.state_dict(), "noise_multiplier": 10 * FIT_SIGMA})
    for given, match in [(None, "was trained with DP \\(its History records epsilon\\)"),
                         (louder, "spend epsilon .*, but the History of the run to continue "
                                  "records .*: the DP is not the one that trained it")]:
        with pytest.raises(ValueError, match=match):
            net.fit(X, Y, epochs=2, batch_size=FIT_BATCH, lr=LR, dp=given, resume=history,
                    verbose=False)
        assert all(np.array_equal(a, b) for a, b in zip(before, (a for pair in net.params
                                                                 for a in pair)))
    resumed = net.fit(X, Y, epochs=2, batch_size=FIT_BATCH, lr=LR, dp=dp, resume=history,
                      verbose=False)
    assert resumed.epsilon[1] > resumed.epsilon[0] == history.epsilon[0]


@pytest.mark.parametrize("recorded", [[None], []])
def test_a_private_resume_whose_history_lacks_an_epsilon_is_refused(recorded):
    """The check that the DP is the one that spent the History's privacy compared its
    last epsilon; a History without one (null, or none: "written before DP existed")
    skipped it, so a noise raised in the file was taken, and every step counted at it
    (a hand-edited checkpoint resumed to report 0.22 where 1.95 was spent)."""
    import dataclasses

    net, (X, Y) = fit_net(), fit_data()
    dp = DP(1.0, FIT_SIGMA, delta=FIT_DELTA)
    history = net.fit(X, Y, epochs=1, batch_size=FIT_BATCH, lr=LR, dp=dp, verbose=False)
    edited = gpu_mlp.training.History.from_dict(
        {**dataclasses.asdict(history), "epsilon": recorded} if recorded else
        {k: v for k, v in dataclasses.asdict(history).items() if k != "epsilon"})
    louder = DP.from_state_dict({**dp.state_dict(), "noise_multiplier": 5 * FIT_SIGMA})
    before = flat(net)
    with pytest.raises(ValueError, match="records no epsilon for some of its epochs, but a "
                                         "DP is given"):
        net.fit(X, Y, epochs=2, batch_size=FIT_BATCH, lr=LR, dp=louder, resume=edited,
                verbose=False)
    assert_untouched(net, before, louder, steps=FIT_STEPS)


@pytest.mark.parametrize("before", ["fit", "train_step"])
def test_a_dp_that_has_stepped_is_refused_by_a_new_run(before):
    """A new fit's epsilon counts the DP's every step at its own sample rate and noise,
    and its Poisson samples are keyed by (seed, epoch): a DP that stepped before (another
    fit, train_step) would be reported as spending far less than it did (a second fit
    at batch 1 after five full-batch epochs: 1.2 for 12.3) and sample the same rows
    again. Refused before any step; its own run goes on with resume=."""
    net, (X, Y) = fit_net(), fit_data()
    dp = DP(1.0, FIT_SIGMA, delta=FIT_DELTA)
    if before == "fit":
        history = net.fit(X, Y, epochs=1, batch_size=FIT_BATCH, lr=LR, dp=dp, verbose=False)
    else:
        net.train_step(X[:FIT_BATCH], Y[:FIT_BATCH], LR, dp=dp)
    taken, params = dp.steps, flat(net)
    for batch_size in (FIT_BATCH, 1):
        with pytest.raises(ValueError, match=f"dp has taken {taken} steps already .*give a "
                                             f"new DP, or continue the run"):
            net.fit(X, Y, epochs=2, batch_size=batch_size, lr=LR, dp=dp, verbose=False)
        assert_untouched(net, params, dp, steps=taken)
    if before == "fit":
        net.fit(X, Y, epochs=2, batch_size=FIT_BATCH, lr=LR, dp=dp, resume=history,
                verbose=False)
        assert dp.steps == 2 * FIT_STEPS


def test_a_delta_of_one_over_n_or_more_is_warned_about():
    """delta >= 1/n is met by publishing a random sample in the clear: no privacy."""
    X, Y = fit_data()
    for delta, warned in [(1 / FIT_N, True), (0.5, True), (0.99 / FIT_N, False)]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fit_net().fit(X, Y, epochs=1, batch_size=FIT_BATCH, lr=LR,
                          dp=DP(1.0, FIT_SIGMA, delta=delta), verbose=False)
        messages = [str(w.message) for w in caught
                    if issubclass(w.category, gpu_mlp.training.TrainingWarning)]
        assert bool(messages) == warned
        if warned:
            assert f"at least 1/n for these n = {FIT_N} samples" in messages[0]
            assert caught[0].filename == __file__  # the caller's line


def test_a_dp_for_no_steps_is_refused():
    """The noise for 0 steps is 0: such a DP would spend infinite epsilon at its first."""
    with pytest.raises(ValueError, match="steps must be an integer >= 1, got 0: a DP for no "
                                         "steps would add no noise"):
        DP.for_epsilon(1.0, 1e-5, sample_rate=0.5, steps=0, max_grad_norm=1.0)


def direct_epsilon(sigma, q, steps, delta):
    import dp_accounting
    from dp_accounting import rdp

    accountant = rdp.RdpAccountant()
    accountant.compose(dp_accounting.PoissonSampledDpEvent(
        q, dp_accounting.GaussianDpEvent(sigma)), steps)
    return accountant.get_epsilon(delta)


def test_fit_reports_epsilon_per_epoch():
    net = fit_net()
    X, Y = fit_data()
    dp = DP(1.0, FIT_SIGMA, delta=FIT_DELTA)
    history = net.fit(X, Y, epochs=3, batch_size=FIT_BATCH, lr=LR, dp=dp, verbose=False)
    assert dp.steps == 3 * FIT_STEPS
    assert len(history.epsilon) == history.epochs == 3
    assert all(a < b for a, b in zip(history.epsilon, history.epsilon[1:]))
    for epoch, eps in enumerate(history.epsilon, start=1):
        steps = epoch * FIT_STEPS
        assert eps == accounting.epsilon(FIT_SIGMA, Q, steps, FIT_DELTA, accountant="rdp")
        assert eps == pytest.approx(direct_epsilon(FIT_SIGMA, Q, steps, FIT_DELTA), rel=1e-9)
        assert eps == dp.epsilon(Q, steps=steps)
    assert dp.epsilon(Q) == history.epsilon[-1]
    # without dp, no epsilon
    plain = fit_net().fit(X, Y, epochs=1, batch_size=FIT_BATCH, lr=LR, verbose=False)
    assert plain.epsilon == [None]


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the overflow that diverges
def test_divergence_puts_the_dp_back_with_the_parameters():
    rng = np.random.default_rng(0)
    X, Y = rng.standard_normal((FIT_N, 6)), rng.standard_normal((FIT_N, 2))
    net = gpu_mlp.MLP([6, 8, 2], activations="tanh", loss="squared", device="cpu",
                      dtype="float64", seed=0)
    before, dp = flat(net), DP(1.0, 1.0)
    with pytest.raises(gpu_mlp.training.TrainingDiverged, match="diverged in epoch 1"):
        net.fit(X, Y, epochs=2, batch_size=FIT_BATCH, lr=1e200, dp=dp, verbose=False)
    assert_untouched(net, before, dp, steps=0)


def test_accounting_matches_dp_accounting():
    for sigma, q, steps in [(1.1, 0.01, 1000), (0.8, 0.1, 30), (2.0, 0.5, 1)]:
        assert accounting.epsilon(sigma, q, steps, 1e-5, accountant="rdp") == \
            pytest.approx(direct_epsilon(sigma, q, steps, 1e-5), rel=1e-9)
    # the pld accountant: another bound on the same mechanism, tighter than rdp's
    rdp_eps = accounting.epsilon(1.1, 0.01, 1000, 1e-5, accountant="rdp")
    pld_eps = accounting.epsilon(1.1, 0.01, 1000, 1e-5, accountant="pld")
    assert 0.5 * rdp_eps < pld_eps <= rdp_eps * 1.01
    # noise_multiplier inverts epsilon
    sigma = accounting.noise_multiplier(2.0, 1e-5, 0.01, 1000, accountant="rdp")
    assert accounting.epsilon(sigma, 0.01, 1000, 1e-5, accountant="rdp") == \
        pytest.approx(2.0, rel=1e-2)
    assert accounting.epsilon(sigma, 0.01, 1000, 1e-5, accountant="rdp") <= 2.0 * (1 + 1e-9)
    dp = DP.for_epsilon(2.0, 1e-5, 0.01, 1000, max_grad_norm=0.7, seed=5)
    assert (dp.noise_multiplier, dp.max_grad_norm, dp.delta, dp.seed, dp.steps) == \
        (sigma, 0.7, 1e-5, 5, 0)


@pytest.mark.parametrize("with_optimizer", [False, True], ids=["sgd", "adam"])
def test_fit_resumes_from_a_checkpoint_bit_for_bit(tmp_path, with_optimizer):
    X, Y = fit_data()
    settings = dict(batch_size=FIT_BATCH, seed=2, verbose=False)

    def rule():
        return dict(optimizer=optim.Adam(1e-2)) if with_optimizer else dict(lr=LR)

    straight = fit_net()
    straight_dp = DP(1.0, FIT_SIGMA, seed=9)
    whole = straight.fit(X, Y, epochs=4, dp=straight_dp, **rule(), **settings)

    first = fit_net()
    dp, chosen = DP(1.0, FIT_SIGMA, seed=9), rule()
    history = first.fit(X, Y, epochs=2, dp=dp, **chosen, **settings)
    path = tmp_path / "half.npz"
    checkpoint.save(first, path, history=history, optimizer=chosen.get("optimizer"), dp=dp)
    del first, dp

    read = checkpoint.read(path, device="cpu")
    resumed = dict(optimizer=read.optimizer) if with_optimizer else dict(lr=LR)
    rest = read.net.fit(X, Y, epochs=4, resume=read.history, dp=read.dp, **resumed, **settings)
    assert all(np.array_equal(a, b) for a, b in zip(flat(straight), flat(read.net)))
    assert read.dp.steps == straight_dp.steps == 4 * FIT_STEPS
    assert rest.epsilon == whole.epsilon and rest.train_loss == whole.train_loss

    # a fresh DP (steps 0) would restart the noise stream: refused, nothing changed
    read = checkpoint.read(path, device="cpu")
    before, fresh = flat(read.net), DP(1.0, FIT_SIGMA, seed=9)
    resumed = dict(optimizer=read.optimizer) if with_optimizer else dict(lr=LR)
    with pytest.raises(ValueError, match="dp has taken 0 steps"):
        read.net.fit(X, Y, epochs=4, resume=read.history, dp=fresh, **resumed, **settings)
    assert all(np.array_equal(a, b) for a, b in zip(before, flat(read.net)))
    assert fresh.steps == 0


# --- 8. bad input ----------------------------------------------------------------------------

BAD_DPS = [
    (dict(max_grad_norm=0.0), ValueError, "max_grad_norm must be a finite number > 0"),
    (dict(max_grad_norm=-1.0), ValueError, "max_grad_norm"),
    (dict(max_grad_norm=float("nan")), ValueError, "max_grad_norm"),
    (dict(max_grad_norm=float("inf")), ValueError, "max_grad_norm"),
    (dict(max_grad_norm="1"), TypeError, "max_grad_norm must be a number"),
    (dict(noise_multiplier=-0.1), ValueError, "noise_multiplier must be a finite number >= 0"),
    (dict(noise_multiplier=float("nan")), ValueError, "noise_multiplier"),
    (dict(delta=0.0), ValueError, "delta must be a finite number in \\(0, 1\\)"),
    (dict(delta=1.0), ValueError, "delta"),
    (dict(delta=2.0), ValueError, "delta"),
    (dict(accountant="moments"), ValueError, "unknown accountant 'moments'; valid: rdp, pld"),
    (dict(seed=-1), ValueError, "seed"),
    (dict(seed=1.5), TypeError, "seed"),
]


@pytest.mark.parametrize("change, error, message", BAD_DPS)
def test_bad_dp_settings_are_refused(change, error, message):
    with pytest.raises(error, match=message) as info:
        DP(**{**dict(max_grad_norm=1.0, noise_multiplier=1.0), **change})
    assert str(info.value).startswith("DP: ") or "seed" in change


def test_unreachable_epsilon_is_refused():
    with pytest.raises(ValueError, match="epsilon"):
        DP.for_epsilon(1e-4, 1e-5, 0.5, 10 ** 4, max_grad_norm=1.0)


def test_unknown_accountant_for_epsilon_is_refused():
    with pytest.raises(ValueError, match="accountant"):
        DP.for_epsilon(2.0, 1e-5, 0.01, 100, max_grad_norm=1.0, accountant="moments")


def assert_untouched(net, before, dp, steps=0):
    assert all(np.array_equal(a, b) for a, b in zip(before, flat(net)))
    assert dp is None or dp.steps == steps


def test_dp_of_the_wrong_type_is_refused():
    net = make_net("dense-xent")
    X, Y = make_batch("dense-xent")
    before = flat(net)
    with pytest.raises(TypeError, match="dp must be a gpu_mlp.privacy.DP, got 'x'"):
        net.train_step(X, Y, LR, dp="x")
    with pytest.raises(TypeError, match="dp must be a gpu_mlp.privacy.DP"):
        net.train_step(X, Y, LR, dp={"max_grad_norm": 1.0})
    with pytest.raises(TypeError, match="dp must be a gpu_mlp.privacy.DP"):
        net.fit(X, Y, epochs=1, dp="x", verbose=False)
    assert_untouched(net, before, None)


def nan_in_X(X, Y):
    X = X.copy()
    X[2, 1] = np.nan
    return X, Y


def label_out_of_range(X, Y):
    Y = Y.copy()
    Y[3] = 4
    return X, Y


def negative_label(X, Y):
    Y = Y.copy()
    Y[0] = -1
    return X, Y


def wrong_width(X, Y):
    return X[:, :5], Y


BAD_BATCHES = {"nan-in-X": nan_in_X, "label-out-of-range": label_out_of_range,
               "negative-label": negative_label, "wrong-width": wrong_width}


@pytest.mark.parametrize("rule", ["sgd", "adam"])
@pytest.mark.parametrize("bad", BAD_BATCHES)
def test_bad_batches_give_the_error_they_give_without_dp(bad, rule):
    X, Y = BAD_BATCHES[bad](*make_batch("dense-xent"))
    net = make_net("dense-xent")
    before = flat(net)
    make_rule = (lambda: LR) if rule == "sgd" else (lambda: optim.Adam(1e-2))
    with pytest.raises(Exception) as without:
        net.train_step(X, Y, make_rule())
    dp, opt = DP(1.0, 1.0), make_rule()
    with pytest.raises(type(without.value)) as with_dp:
        net.train_step(X, Y, opt, dp=dp)
    assert str(with_dp.value) == str(without.value)
    assert isinstance(with_dp.value, (ValueError, TypeError))
    assert_untouched(net, before, dp)
    if rule == "adam":
        assert opt.steps == 0


def test_bad_lr_with_dp_changes_nothing():
    net = make_net("dense-xent")
    X, Y = make_batch("dense-xent")
    before, dp = flat(net), DP(1.0, 1.0)
    for lr, error in ((-0.1, ValueError), (float("nan"), ValueError), ("0.1", TypeError)):
        with pytest.raises(error, match="lr"):
            net.train_step(X, Y, lr, dp=dp)
    assert_untouched(net, before, dp)


# --- 9. memory: no per-sample gradient -------------------------------------------------------

MEM_SIZES, MEM_BATCH = [784, 256, 256, 10], 64


def test_dp_step_allocates_no_per_sample_gradient():
    rng = np.random.default_rng(0)
    X, Y = rng.standard_normal((MEM_BATCH, MEM_SIZES[0])), rng.integers(0, 10, MEM_BATCH)
    peaks, workspace = {}, {}
    for name, dp in (("plain", None), ("dp", DP(1.0, 1.0, seed=1))):
        net = gpu_mlp.MLP(MEM_SIZES, loss="softmax_cross_entropy", device="cpu",
                          dtype="float64", seed=0)
        n_params = sum(W.size + b.size for W, b in net.params)
        step = (lambda: net.train_step(X, Y, LR)) if dp is None else \
            (lambda: net.train_step(X, Y, LR, dp=dp))
        with tracing():
            peaks[f"first {name}"] = step_peak(step)  # the workspace's buffers included
        step()  # warm: the workspace is full
        with tracing():
            held = numpy_data_now()
            peaks[name] = max(step_peak(step) for _ in range(2))
            assert numpy_data_now() - held < 64 * 1024  # nothing kept from step to step
        workspace[name] = net.training_workspace.peak_in_use_bytes
    per_sample_gradients = MEM_BATCH * n_params * 8  # what Opacus would build: 138 MB
    assert peaks["dp"] < per_sample_gradients / 20, (peaks, per_sample_gradients)
    assert peaks["first dp"] < per_sample_gradients / 20, (peaks, per_sample_gradients)
    # the DP step keeps every layer's factors until the clipping factors are known:
    # within a small factor of the plain step's workspace
    assert workspace["dp"] <= 3 * workspace["plain"], workspace
    # and its transient memory beyond the workspace stays small: scratch of the noise
    # and (B,)-vectors, a few blocks, not a parameter-sized array
    assert peaks["dp"] < n_params * 8, (peaks, n_params * 8)


def test_a_dense_dp_steps_memory_does_not_grow_with_the_batch():
    """Beyond the workspace a dense DP step held a (B, d_out) sum per layer (its bias
    gradients' norms from T summed over P = 1 positions: T itself, copied): 8 MB at
    B = 4096, where the plain step holds 0.2. Now (B,) vectors."""
    rng = np.random.default_rng(0)
    peaks = {}
    for B in (256, 4096):
        X, Y = rng.standard_normal((B, 64)), rng.integers(0, 10, B)
        net = gpu_mlp.MLP([64, 256, 256, 10], loss="softmax_cross_entropy", device="cpu",
                          dtype="float64", seed=0)
        dp = DP(1.0, 1.0, seed=1)
        net.train_step(X, Y, LR, check=False, dp=dp)  # warm: the workspace is full
        with tracing():
            peaks[B] = step_peak(lambda: net.train_step(X, Y, LR, check=False, dp=dp))
    assert peaks[4096] - peaks[256] < (4096 - 256) * 8 * 16, peaks  # ~ (B,) vectors only


# A convolution of each kind the DP step tells apart, on (2, 6, 6) inputs: (P, c_out, K)
# = (36, 3, 18) direct form, c_out <= P: its per-sample gradients are kept; (9, 12, 12)
# direct form but c_out > P: more than its rows, so its factors go on; (4, 16, 48): the
# Gram form (P (c_out + K) < c_out K); then a dense layer (the product of the norms).
PATHS_NET = (lambda: [Conv2d(2, 3, 3, padding=1, activation="relu"),
                      Conv2d(3, 12, 2, stride=2, activation="tanh"),
                      Conv2d(12, 16, 2, activation="sigmoid"),
                      Dense(16 * 2 * 2, 4, "identity")], (2, 6, 6), "softmax_cross_entropy")


def paths_problem(memory="output"):
    net = gpu_mlp.Network(PATHS_NET[0](), loss=PATHS_NET[2], memory=memory, device="cpu",
                          dtype="float64", seed=0)
    rng = np.random.default_rng(7)
    for _, b in net.params:
        b[...] = 0.3 * rng.standard_normal(b.shape)
    X, Y = rng.standard_normal((BATCH, *PATHS_NET[1])), rng.integers(0, 4, BATCH)
    return net, X, Y


def spy_on_paths(monkeypatch):
    """Record the layers whose per-sample gradients are formed and kept, whose norms
    come from the factors, and which layers' gradients reach the rule formed."""
    from gpu_mlp import norms, updates

    seen = {"formed": [], "factors": [], "gradient": []}
    formed, squares = norms.per_sample_gradients, norms.per_sample_squares
    gradient = updates.Apply.gradient

    def record_formed(xp, T, X, G, g, ws):
        seen["formed"].append(T.shape[1:] + X.shape[2:])
        return formed(xp, T, X, G, g, ws)

    def record_factors(T, X):
        seen["factors"].append(T.shape[1:] + X.shape[2:])
        return squares(T, X)

    def record_gradient(self, k, G, noise=None):
        seen["gradient"].append(k)
        return gradient(self, k, G, noise)

    monkeypatch.setattr(norms, "per_sample_gradients", record_formed)
    monkeypatch.setattr(norms, "per_sample_squares", record_factors)
    monkeypatch.setattr(updates.Apply, "gradient", record_gradient)
    return seen


def test_forms_gradients_only_in_the_direct_form_and_within_the_rows():
    from gpu_mlp import norms

    assert norms.forms_gradients(36, 3, 18)          # direct, c_out <= P
    assert norms.forms_gradients(9, 9, 12)           # c_out = P: as large as the rows
    assert not norms.forms_gradients(9, 12, 12)      # direct, but larger than the rows
    assert norms.gram_form(4, 16, 48) and not norms.forms_gradients(4, 16, 48)
    assert not norms.forms_gradients(1, 4, 64)       # dense: the product of the norms
    # the FLOP model: P^2 (c_out + K) against P c_out K a sample
    assert norms.gram_form(4, 8, 9) and not norms.gram_form(4, 8, 8)  # 68 < 72, 64 = 64


@pytest.mark.parametrize("memory", gpu_mlp.MEMORY_MODES)
def test_conv_step_keeps_per_sample_gradients_where_cheaper_and_matches_torch(memory,
                                                                             monkeypatch):
    net, X, Y = paths_problem(memory)
    grads = per_sample_grads(torch_model(net), net.loss.name, X, Y)
    C = between(norms_of(grads))
    total, norms = clipped_sum(grads, C)
    both_sides_of(norms, C)
    seen = spy_on_paths(monkeypatch)
    before = flat(net)
    net.train_step(X, Y, LR, dp=DP(C, 0.0))
    assert seen["formed"] == [(36, 3, 18)]
    assert seen["factors"] == [(1, 4, 64), (4, 16, 48), (9, 12, 12)]  # last layer first
    assert seen["gradient"] == [0]  # the first convolution's clipped sum arrives formed
    assert_update(before, flat(net), [-LR / BATCH * g for g in total], memory)


def test_conv_step_with_an_optimizer_from_kept_per_sample_gradients():
    # the formed gradient goes through the optimizer's kernels (Rule.gradient), noised
    net, X, Y = paths_problem()
    torch_net = torch_model(net)
    C = between(norms_of(per_sample_grads(torch_net, net.loss.name, X, Y)))
    opt = optim.Adam(1e-2)
    reference = torch.optim.Adam(torch_net.parameters(), lr=1e-2)
    for _ in range(2):
        total, _ = clipped_sum(per_sample_grads(torch_net, net.loss.name, X, Y), C)
        for p, g in zip(torch_net.parameters(), total):
            p.grad = torch.from_numpy(g / BATCH)
        reference.step()
        net.train_step(X, Y, opt, dp=DP(C, 0.0))
    for a, b in zip(flat(net), [p.detach().numpy() for p in torch_net.parameters()]):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)


def test_a_stage_that_takes_factors_only_gets_factors(monkeypatch):
    # as the communication's stage, which sums factors over ranks: DP hands it the scaled
    # factors of every layer, none formed, and the update is the same
    from gpu_mlp.updates import Stage

    class FactorsOnly(Stage):
        def __call__(self, k, T_rows, X_rows, ones, noise=None):
            self.downstream(k, T_rows, X_rows, ones, noise)

    stage = DP.stage
    monkeypatch.setattr(DP, "stage", lambda self, net, downstream, *args, **kwargs:
                        stage(self, net, FactorsOnly(downstream), *args, **kwargs))
    net, X, Y = paths_problem()
    grads = per_sample_grads(torch_model(net), net.loss.name, X, Y)
    C = between(norms_of(grads))
    total, _ = clipped_sum(grads, C)
    seen = spy_on_paths(monkeypatch)
    before = flat(net)
    net.train_step(X, Y, LR, dp=DP(C, 0.0))
    assert seen["formed"] == [] and seen["gradient"] == [] and len(seen["factors"]) == 4
    assert_update(before, flat(net), [-LR / BATCH * g for g in total], "factors only")


def test_kept_per_sample_gradients_stay_within_the_rows():
    # a CNN's private step holds, beyond the plain step's workspace, its per-sample
    # gradients (no more than the rows) and the factors until finish: a small factor
    layers = lambda: [Conv2d(1, 8, 3, padding=1), Conv2d(8, 16, 3, stride=2, padding=1),
                      Dense(16 * 4 * 4, 10, "identity")]
    rng = np.random.default_rng(0)
    X, Y = rng.standard_normal((32, 1, 8, 8)), rng.integers(0, 10, 32)
    peak = {}
    for name, dp in (("plain", None), ("dp", DP(1.0, 1.0, seed=1))):
        net = gpu_mlp.Network(layers(), loss="softmax_cross_entropy", device="cpu",
                              dtype="float64", seed=0)
        for _ in range(2):
            net.train_step(X, Y, LR, dp=dp)
        peak[name] = net.training_workspace.peak_in_use_bytes
    assert peak["dp"] <= 3 * peak["plain"], peak


# --- 10. the CuPy path through the host stand-in ---------------------------------------------

@pytest.mark.parametrize("kind, rule", [("dense-xent", "sgd"), ("conv", "sgd"),
                                        ("dense-squared", "adam")])
def test_cupy_path_clipped_step_equals_numpy(host_cupy_lib, kind, rule):
    import host_cupy

    X, Y = make_batch(kind)
    C = between(make_net(kind).per_sample_grad_norms(X, Y))
    results = []
    for path in ("numpy", "cupy"):
        net, dp = make_net(kind), DP(C, 0.0)
        make_rule = (lambda: LR) if rule == "sgd" else (lambda: optim.Adam(1e-2))
        opt = make_rule()
        if path == "cupy":
            with host_cupy.cupy_path(host_cupy_lib) as device:
                for step in range(2):
                    net.train_step(X, Y, opt, dp=dp)
            assert device.launches  # the CUDA bodies ran
        else:
            for step in range(2):
                net.train_step(X, Y, opt, dp=dp)
        results.append(flat(net))
    for a, b in zip(*results):
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-12 * np.abs(a).max())


def test_gpu_per_sample_gradients_and_row_squares_match_the_cpu_ones():
    # the GPU's branches of the squares (squares and a GEMV), on the host through the
    # counting stand-in: allocating nothing (gemm_batched's GPU branch: test_cublas.py)
    from device_counts import CountingXp, DeviceArray
    from gpu_mlp import norms
    from gpu_mlp.workspace import Workspace

    rng = np.random.default_rng(4)
    B, P, d, K = 5, 7, 3, 4
    T, X = rng.standard_normal((B, P, d)), rng.standard_normal((B, P, K))
    results = []
    for xp in (np, CountingXp()):
        dev = (lambda a: a) if xp is np else (lambda a: a.view(DeviceArray))
        ws = Workspace(xp, np.float64)
        G, g, out = dev(np.empty((B, d, K))), dev(np.empty((B, d))), dev(np.empty(B))
        allocations = []
        for _ in range(2):  # the second time on the workspace's buffers alone
            out[...] = np.nan  # written, not read
            norms.per_sample_gradients(xp, dev(T), dev(X), G, g, ws)
            norms.row_squares_into(xp, G.reshape(B, -1), out, ws)
            norms.row_squares_into(xp, g, out, ws, add=True)
            norms.row_squares_into(xp, g, out, ws, add=True)
            allocations.append(ws.allocations)
        assert allocations[0] == allocations[1] and ws.in_use_bytes == 0
        results.append([np.array(a) for a in (G, g, out)])
    expected_G, expected_g = np.einsum("bpo,bpk->bok", T, X), T.sum(axis=1)
    expected = (expected_G ** 2).sum(axis=(1, 2)) + 2 * (expected_g ** 2).sum(axis=1)
    for G, g, out in results:
        np.testing.assert_allclose(G, expected_G, rtol=1e-13)
        np.testing.assert_allclose(g, expected_g, rtol=1e-13)
        np.testing.assert_allclose(out, expected, rtol=1e-13)


def test_cupy_path_noise_has_the_right_std(host_cupy_lib):
    import host_cupy

    X, Y = noisy_batch()
    updated = []
    with host_cupy.cupy_path(host_cupy_lib) as device:
        for sigma in (0.0, SIGMA):
            net = noisy_net()
            net.train_step(X, Y, LR, dp=DP(CLIP, sigma, seed=SEED))
            updated.append(flat(net))
    assert device.launches[("gpu_mlp_gaussian_noise", "float64")] == 4  # W and b, 2 layers
    std = LR * SIGMA * CLIP / NOISY_BATCH
    z = np.concatenate([((n - c) / -std).reshape(-1) for c, n in zip(*updated)])
    assert standard_normal_verdict(z) is None, standard_normal_verdict(z)
    assert standard_normal_verdict(2 * z) is not None
    assert standard_normal_verdict(z * NOISY_BATCH) is not None
    # the NumPy backend's very noise (the same stream, bit for bit: tests/test_noise.py),
    # seen through updates that agree as the noise-free ones do
    numpy_z = np.concatenate([t.reshape(-1) for t in noise_of()])
    np.testing.assert_allclose(z, numpy_z, rtol=0, atol=1e-9)


# --- 11. the command line --------------------------------------------------------------------

def run_cli(capsys, *argv):
    status = cli.main(list(argv))
    out, err = capsys.readouterr()
    return status, out.splitlines(), err


def test_cli_trains_privately(capsys):
    status, lines, err = run_cli(capsys, "train", "--dp-clip", "1.0", "--dp-noise", "1.0",
                                 "--quiet", "--epochs", "3")
    assert status == 0 and err == ""
    [privacy_line] = [line for line in lines if line.startswith("privacy:")]
    words = privacy_line.split()
    assert words[:2] == ["privacy:", "epsilon"] and words[3:5] == ["at", "delta"]
    eps = float(words[2])
    assert float(words[5]) == 1e-5
    # the digits: 1438 training rows, batch 32, 45 steps an epoch
    q, steps = 32 / 1438, 3 * 45
    assert eps == pytest.approx(accounting.epsilon(1.0, q, steps, 1e-5, accountant="rdp"),
                                rel=1e-3)
    assert lines[-1].startswith("test accuracy: ")
    assert 0 < float(lines[-1].split(":")[1]) <= 1


def test_cli_solves_the_noise_for_a_target_epsilon():
    # run as a user runs it: the header names the noise solved for, the result line the
    # epsilon reached, and stderr stays empty as for every run without a problem
    # (dp-accounting logs through absl while it calibrates: not the user's business)
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "-m", "gpu_mlp", "train", "--dp-clip", "1",
                             "--dp-epsilon", "8", "--epochs", "3"], cwd=root,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    q, steps = 32 / 1438, 3 * 45
    sigma = accounting.noise_multiplier(8.0, 1e-5, q, steps, accountant="rdp")
    header = [line for line in lines if line.startswith("privacy: DP-SGD")]
    assert len(header) == 1 and f"noise multiplier {sigma:.4g}" in header[0], lines
    assert "clip 1" in header[0] and "delta 1e-05" in header[0]
    [reached] = [line for line in lines if line.startswith("privacy: epsilon")]
    assert 7 < float(reached.split()[2]) <= 8.0005, reached
    assert lines[-1].startswith("test accuracy: ")
    noise = result.stderr.splitlines()
    assert not noise, f"{len(noise)} lines on stderr, the first: {noise[0]}"


@pytest.mark.parametrize("argv, match", [
    (["--dp-noise", "1"], "--dp-noise needs --dp-clip"),
    (["--dp-epsilon", "8"], "--dp-epsilon needs --dp-clip"),
    (["--dp-delta", "1e-6"], "--dp-delta needs --dp-clip"),
    (["--dp-clip", "1"], "--dp-clip needs --dp-noise SIGMA or --dp-epsilon EPS"),
    (["--dp-clip", "1", "--dp-noise", "1", "--dp-epsilon", "8"], "not allowed with argument"),
    (["--dp-clip", "-1", "--dp-noise", "1"], "argument --dp-clip: expected a number > 0"),
    (["--dp-clip", "0", "--dp-noise", "1"], "argument --dp-clip: expected a number > 0"),
    (["--dp-clip", "1", "--dp-noise", "-1"], "argument --dp-noise: expected a number >= 0"),
    (["--dp-clip", "1", "--dp-epsilon", "-8"], "argument --dp-epsilon: expected a number > 0"),
    (["--dp-clip", "1", "--dp-noise", "1", "--dp-delta", "2"], "argument --dp-delta"),
    (["--dp-clip", "1", "--dp-noise", "1", "--dp-delta", "0"], "argument --dp-delta"),
    (["--dp-clip", "1", "--dp-noise", "1", "--dp-accountant", "moments"],
     "argument --dp-accountant: invalid choice"),
    (["--dp-clip", "1", "--dp-epsilon", "1e-4"], "epsilon"),
])
def test_cli_bad_dp_options_end_with_one_line_and_status_2(capsys, argv, match):
    status, lines, err = run_cli(capsys, "train", "--quiet", "--epochs", "2", *argv)
    assert status == 2 and lines == []
    assert err.count("\n") == 1 and err.startswith("gpu-mlp: error: "), err
    assert "Traceback" not in err
    assert re.search(match, err), err


def test_cli_resumes_a_private_run(capsys, tmp_path):
    command = ["train", "--hidden", "16", "--epochs", "3", "--dp-clip", "1.0", "--dp-noise",
               "1.0", "--seed", "3", "--dp-seed", "7", "--quiet"]
    straight = tmp_path / "straight.npz"
    status, straight_lines, _ = run_cli(capsys, *command, "--save", str(straight))
    assert status == 0
    stopped = str(tmp_path / "stopped.npz")
    assert run_cli(capsys, *command[:4], "1", *command[5:], "--save", stopped)[0] == 0
    assert checkpoint.read(stopped).dp.steps == 45
    # the DP settings come from the checkpoint; repeating them is fine, leaving them too
    status, lines, err = run_cli(capsys, "train", "--epochs", "3", "--quiet", "--resume",
                                 stopped, "--save", stopped)
    assert status == 0 and err == ""
    assert lines == straight_lines
    read = checkpoint.read(stopped)
    assert read.dp.steps == 3 * 45 and read.dp.state_dict() == \
        checkpoint.read(straight).dp.state_dict()
    a, b = read.net.params, checkpoint.read(straight).net.params
    assert all(np.array_equal(x, y) for pa, pb in zip(a, b) for x, y in zip(pa, pb))
    # other DP settings than the checkpoint's are refused
    status, _, err = run_cli(capsys, "train", "--epochs", "4", "--quiet", "--resume", stopped,
                             "--dp-noise", "2.0")
    assert status == 2 and "--dp-noise differs from the checkpoint" in err
    status, _, err = run_cli(capsys, "train", "--epochs", "4", "--quiet", "--resume", stopped,
                             "--dp-seed", "8")
    assert status == 2 and "--dp-seed differs from the checkpoint" in err
    assert "which has another seed" in err and " 7" not in err  # not echoed: secret


def _params(net):
    return [a.copy() for pair in net.params for a in pair]


@pytest.mark.parametrize("name, value, error, match", [
    ("seed", -1, ValueError, r"seed must be in \[0, 2\^64\)"),
    ("seed", 2**64, ValueError, r"seed must be in \[0, 2\^64\)"),
    ("steps", -1, ValueError, r"steps must be in \[0, 2\^64\)"),
    ("steps", 2**64, ValueError, r"steps must be in \[0, 2\^64\)"),
    ("noise_multiplier", -1.0, ValueError, "noise_multiplier"),
    ("max_grad_norm", "1", TypeError, "max_grad_norm"),
    ("delta", 2.0, ValueError, "delta"),
    ("accountant", "moments", ValueError, "unknown accountant 'moments'"),
    ("target_epsilon", 0.0, ValueError, "target_epsilon")])
def test_a_setting_set_by_hand_is_checked_as_it_is_set(name, value, error, match):
    """The Philox key and counter are 64-bit (a value outside was once refused inside the
    backward pass, after the last layer's update), and a noise, clip, delta or accountant
    set between runs is what the next one uses: each is refused as it is set, naming it,
    and the DP keeps its value -- no step can read a bad one."""
    dp = DP(1.0, 1.0, seed=3)
    kept = getattr(dp, name)
    with pytest.raises(error, match="DP: " + match):
        setattr(dp, name, value)
    assert getattr(dp, name) == kept
    net = gpu_mlp.MLP([4, 5, 3], device="cpu", seed=0)
    net.train_step(np.ones((3, 4)), np.ones((3, 3)), 0.1, dp=dp)
    assert dp.steps == 1


def test_a_dp_epoch_whose_poisson_batches_are_all_empty_is_no_divergence():
    """Two samples, batches of one: an epoch samples none with probability 1/16 (seed 1's
    second, DP seed 0). Its loss is None (no sample), not NaN taken for a divergence that
    threw the run's noisy steps away; the history saves and loads."""
    net = gpu_mlp.MLP([3, 2], device="cpu", seed=0)
    X, Y = np.ones((2, 3)), np.zeros((2, 2))
    history = net.fit(X, Y, epochs=2, batch_size=1, lr=0.1, seed=1, dp=DP(1.0, 0.0, seed=0),
                      verbose=False)
    assert history.train_loss[0] is not None and history.train_loss[1] is None
    assert gpu_mlp.training.History.from_dict(
        json.loads(json.dumps(history.as_dict()))).train_loss == history.train_loss
