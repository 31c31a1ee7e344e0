"""gpu_mlp.torch: the engine as an nn.Module inside PyTorch's autograd.

1. ``torch.autograd.gradcheck`` (float64) on :class:`MLPModule` for every activation and
   memory mode, and on a convolutional :class:`NetworkModule`: gradients of the input and
   of every parameter against finite differences;
2. a model embedding the module (``nn.Linear``, MLPModule, ``nn.ReLU``, ``nn.Linear``)
   trained by ``torch.optim.Adam`` lands on the same parameters, to 1e-10 in float64, as
   the same model of ``nn.Linear`` layers from the same initialisation (and a convolutional
   one against ``nn.Conv2d``, by SGD);
3. the parameters ARE the engine's arrays (same memory), through optimizer steps,
   ``load_state_dict``, ``.to()``/``.double()``/``.float()`` and ``param.data = ...``;
4. tape and buffer hygiene: no_grad forwards keep no tape, a forward whose graph is freed
   without a backward gives its buffers back, and after many steps the workspace holds a
   constant amount of memory with nothing in use;
5. the rest of nn.Module's contract: deepcopy, torch.save/load, input shapes and dtypes,
   retained graphs, clear errors;
6. the engine's CPU BLAS runs on one thread inside a module (gpu_mlp.torch.BLAS_THREADS),
   PyTorch and everything outside the engine keep their threads.
"""

import copy
import io
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
nn = torch.nn
F = torch.nn.functional

import gpu_mlp  # noqa: E402
from gpu_mlp.layers import Conv2d, Dense  # noqa: E402

gm_torch = pytest.importorskip("gpu_mlp.torch")
MLPModule, NetworkModule = gm_torch.MLPModule, gm_torch.NetworkModule

ACTIVATIONS = ["identity", "relu", "relu(alpha=0.5)", "sigmoid", "tanh", "gelu", "softmax"]
MODES = list(gpu_mlp.MEMORY_MODES)
CASES = [(act, mode) for act in ACTIVATIONS for mode in MODES
         if not (act == "gelu" and mode == "output")]


def torch_activation(name):
    return {"identity": nn.Identity(), "relu": nn.ReLU(), "sigmoid": nn.Sigmoid(),
            "tanh": nn.Tanh(), "gelu": nn.GELU(), "softmax": nn.Softmax(dim=1),
            "relu(alpha=0.5)": _Scaled(nn.ReLU(), 0.5)}[name]


class _Scaled(nn.Module):
    def __init__(self, inner, alpha):
        super().__init__()
        self.inner, self.alpha = inner, alpha

    def forward(self, x):
        return self.alpha * self.inner(x)


def shares(t, a):
    return t.data_ptr() == a.ctypes.data and np.shares_memory(t.detach().numpy(), a)


def engine_shares_parameters(module):
    arrays = [a for pair in module.net.params for a in pair]
    return all(shares(t, a) for t, a in zip(module.parameters(), arrays))


# --- 1. gradcheck ---------------------------------------------------------------------

@pytest.mark.parametrize("act,memory", CASES)
def test_gradcheck_mlp_module(act, memory):
    torch.manual_seed(0)
    module = MLPModule([4, 5, 3], activations=act, output=act, memory=memory,
                       dtype=torch.float64)
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, *params: module(x),
                                    (x, *module.parameters()))


def test_gelu_output_mode_is_refused():
    with pytest.raises(ValueError, match="memory='output'"):
        MLPModule([4, 5, 3], activations="gelu", memory="output")


@pytest.mark.parametrize("memory", MODES)
def test_gradcheck_conv_network_module(memory):
    torch.manual_seed(0)
    module = NetworkModule([Conv2d(2, 3, 3, padding=1, activation="tanh"),
                            Conv2d(3, 2, 3, stride=2, activation="relu"),
                            Dense(2 * 2 * 2, 3, activation="identity")],
                           memory=memory, dtype="float64")
    x = torch.randn(2, 2, 6, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, *params: module(x),
                                    (x, *module.parameters()))


# --- 2. training inside a model, against nn.Linear / nn.Conv2d -------------------------------

def linear_stack(sizes, act):
    layers = []
    for k, (d_in, d_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(d_in, d_out, dtype=torch.float64))
        if k < len(sizes) - 2:
            layers.append(torch_activation(act))
    return layers


def train_alike(ours, theirs, make_optimizer, X, y, steps, rows):
    """Train both models side by side with torch.optim on the same cycle of batches
    (softmax cross-entropy); their parameters must stay equal to 1e-10."""
    batches = len(X) // rows
    optimizers = [make_optimizer(m.parameters()) for m in (ours, theirs)]
    for step in range(steps):
        batch = slice(rows * (step % batches), rows * (step % batches) + rows)
        for model, opt in zip((ours, theirs), optimizers):
            opt.zero_grad()
            F.cross_entropy(model(X[batch]), y[batch]).backward()
            opt.step()
    for a, b in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("act,memory", [("tanh", "output"), ("relu", "recompute"),
                                        ("sigmoid", "store_both"), ("gelu", "recompute")])
def test_embedded_module_trains_as_linear_layers(act, memory):
    """Same torch seed, same construction order: the same initial numbers (MLPModule
    initialises as nn.Linear does); then 25 Adam steps on cross-entropy."""
    sizes = [8, 16, 16, 4]
    torch.manual_seed(1)
    ours = nn.Sequential(nn.Linear(5, 8, dtype=torch.float64),
                         MLPModule(sizes, activations=act, memory=memory, dtype=torch.float64),
                         nn.ReLU(), nn.Linear(4, 3, dtype=torch.float64))
    torch.manual_seed(1)
    theirs = nn.Sequential(nn.Linear(5, 8, dtype=torch.float64), *linear_stack(sizes, act),
                           nn.ReLU(), nn.Linear(4, 3, dtype=torch.float64))
    for a, b in zip(ours.parameters(), theirs.parameters()):
        assert torch.equal(a, b)
    generator = torch.Generator().manual_seed(2)
    X = torch.randn(40, 5, dtype=torch.float64, generator=generator)
    y = torch.randint(0, 3, (40,), generator=generator)
    train_alike(ours, theirs, lambda p: torch.optim.Adam(p, lr=1e-2), X, y, steps=25, rows=8)
    assert engine_shares_parameters(ours[1])


def test_conv_module_trains_as_conv2d_layers():
    torch.manual_seed(3)
    ours = NetworkModule([Conv2d(1, 4, 3, padding=1), Conv2d(4, 6, 3, stride=2, padding=1),
                          Dense(6 * 4 * 4, 10, activation="identity")],
                         memory="recompute", dtype="float64")
    torch.manual_seed(3)
    theirs = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, dtype=torch.float64), nn.ReLU(),
                           nn.Conv2d(4, 6, 3, stride=2, padding=1, dtype=torch.float64),
                           nn.ReLU(), nn.Flatten(), nn.Linear(96, 10, dtype=torch.float64))
    for a, b in zip(ours.parameters(), theirs.parameters()):
        assert torch.equal(a, b)
    X, y = gpu_mlp.datasets.digits()
    X = torch.from_numpy(X[:64].reshape(-1, 1, 8, 8))
    y = torch.from_numpy(y[:64])
    train_alike(ours, theirs, lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), X, y,
                steps=8, rows=16)


# --- 3. the parameters are the engine's arrays ---------------------------------------------

def test_parameters_are_the_engine_arrays_in_linear_layout():
    module = MLPModule([6, 9, 4], dtype="float64")
    assert [name for name, _ in module.named_parameters()] == ["W_1", "b_1", "W_2", "b_2"]
    assert [tuple(p.shape) for p in module.parameters()] == [(9, 6), (9,), (4, 9), (4,)]
    assert engine_shares_parameters(module)
    conv = NetworkModule([Conv2d(2, 5, 3), Dense(5 * 4 * 4, 3, "identity")])
    assert tuple(conv.W_1.shape) == (5, 2, 3, 3)  # nn.Conv2d's layout
    assert engine_shares_parameters(conv)


def test_optimizer_steps_and_state_dicts_reach_the_engine():
    module = MLPModule([6, 9, 4], dtype="float64")
    net = module.net
    W_before = net.params[0][0].copy()
    opt = torch.optim.Adam(module.parameters(), lr=0.1)
    module(torch.randn(5, 6, dtype=torch.float64)).sum().backward()
    opt.step()
    assert module.net is net and not np.array_equal(net.params[0][0], W_before)
    np.testing.assert_array_equal(net.params[0][0], module.W_1.detach().numpy())
    other = MLPModule([6, 9, 4], dtype="float64", seed=5)
    module.load_state_dict(other.state_dict())
    assert module.net is net and engine_shares_parameters(module)
    np.testing.assert_array_equal(net.params[1][0], other.net.params[1][0])
    with torch.no_grad():
        module.b_2.fill_(0.25)
    assert (net.params[1][1] == 0.25).all()


def test_moves_and_replaced_data_rebuild_a_shared_engine():
    torch.manual_seed(0)
    module = MLPModule([6, 9, 4])
    x = torch.randn(5, 6)
    expected = module(x).detach().double()
    module.double()
    assert module.net.dtype == np.float64 and engine_shares_parameters(module)
    torch.testing.assert_close(module(x.double()), expected, rtol=1e-6, atol=1e-6)
    module.to(torch.float32)
    assert module.net.dtype == np.float32 and engine_shares_parameters(module)
    module.W_2.data = torch.zeros(4, 9)
    module.b_2.data = torch.full((4,), 3.0)
    torch.testing.assert_close(module(x), torch.full((5, 4), 3.0))
    assert engine_shares_parameters(module)


def test_half_and_other_devices_are_refused_before_anything_changes():
    module = MLPModule([6, 9, 4])
    with pytest.raises(TypeError, match="float32 or float64"):
        module.half()
    with pytest.raises(RuntimeError, match="CPU tensors .* CUDA tensors"):
        module.to("meta")
    assert module.W_1.dtype == torch.float32 and module.W_1.device.type == "cpu"
    assert engine_shares_parameters(module)


# --- 4. tapes and buffers ---------------------------------------------------------------

def test_no_grad_and_inference_use_predict_and_keep_nothing(monkeypatch):
    module = MLPModule([6, 9, 4], memory="store_both", dtype="float64")
    net, calls = module.net, []
    for name in ("forward", "predict"):
        original = getattr(net, name)
        monkeypatch.setattr(net, name, lambda *a, _f=original, _n=name, **k:
                            calls.append(_n) or _f(*a, **k))
    x = torch.randn(5, 6, dtype=torch.float64)
    with torch.no_grad():
        out = module(x)
    module.eval()
    with torch.inference_mode():
        module(x)
    module.requires_grad_(False)
    module(x)  # nothing needs a gradient
    assert calls == ["predict"] * 3 and not out.requires_grad
    assert net.training_workspace.allocations == 0
    module.requires_grad_(True)
    module(x).sum().backward()  # eval() with gradients: a tape, as it must
    assert calls[-1] == "forward" and module.W_1.grad is not None


def test_workspace_is_bounded_and_freed_graphs_return_their_buffers():
    torch.manual_seed(0)
    module = MLPModule([8, 32, 32, 3], memory="store_both", dtype="float64")
    ws = module.net.training_workspace
    opt = torch.optim.SGD(module.parameters(), lr=0.05)
    x, y = torch.randn(64, 8, dtype=torch.float64), torch.randint(0, 3, (64,))
    held = []
    for step in range(60):
        batch = slice(0, 64 if step % 3 else 40)  # varying batch sizes
        opt.zero_grad()
        F.cross_entropy(module(x[batch]), y[batch]).backward()
        opt.step()
        assert ws.in_use_bytes == 0
        held.append((ws.bytes, ws.allocations))
    assert held[-1] == held[1]  # the steady state allocates nothing
    for _ in range(20):  # forwards whose graphs die without a backward
        out = module(x)
        assert ws.in_use_bytes > 0
        del out
        assert ws.in_use_bytes == 0
    outs = [module(x) for _ in range(3)]  # three alive at once: three tapes' buffers
    sum(o.sum() for o in outs).backward()
    assert ws.in_use_bytes == 0
    peak = ws.bytes
    for _ in range(10):
        outs = [module(x) for _ in range(3)]
        sum(o.sum() for o in outs).backward()
    assert ws.bytes == peak and ws.in_use_bytes == 0


def test_retained_graph_backward_twice_and_double_backward():
    torch.manual_seed(0)
    module = MLPModule([4, 6, 2], activations="tanh", dtype="float64")
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    out = module(x).square().sum()
    first = torch.autograd.grad(out, [x, module.W_1], retain_graph=True)
    second = torch.autograd.grad(out, [x, module.W_1])
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert module.net.training_workspace.in_use_bytes == 0
    out = module(x).square().sum()
    (g,) = torch.autograd.grad(out, [x], create_graph=True)
    with pytest.raises(RuntimeError, match="first derivatives only"):
        g.sum().backward()


def test_a_gradient_penalty_through_the_module_raises_not_zero():
    """WGAN-GP: d = D(x), its gradient in x under create_graph (grad_outputs constant),
    then (d + penalty(gradient)).backward(). The gradient depends on the saved x and
    weights, which torch's once_differentiable does not see: it returned the gradient
    detached, so the penalty added nothing to dL/dW -- 3.14 off, silently -- and
    Hessians came back 0. Now differentiating that gradient raises; the gradient itself
    is torch's."""
    module = MLPModule([4, 6, 1], activations="tanh", dtype="float64", seed=0)
    twin = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 1)).double()
    with torch.no_grad():
        twin[0].weight.copy_(module.W_1), twin[0].bias.copy_(module.b_1)
        twin[2].weight.copy_(module.W_2), twin[2].bias.copy_(module.b_2)
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    grads = []
    for model in (module, twin):
        d = model(x)
        (g,) = torch.autograd.grad(d, x, grad_outputs=torch.ones_like(d), create_graph=True)
        grads.append(g)
    torch.testing.assert_close(grads[0].detach(), grads[1].detach())
    penalty = ((grads[0].norm(2, dim=1) - 1) ** 2).mean()
    with pytest.raises(RuntimeError, match="first derivatives only"):
        (module(x).mean() + 10 * penalty).backward()
    with pytest.raises(RuntimeError, match="first derivatives only"):
        torch.autograd.functional.hessian(lambda v: module(v).sum(), x.detach())
    with pytest.raises(RuntimeError, match="first derivatives only"):  # by double backward
        torch.autograd.functional.jvp(module, x.detach(), torch.ones_like(x))


def test_a_compiled_model_runs_the_module_as_it_is():
    """torch.compile traced the engine's arrays and failed ('no attribute net'): the
    module's forward is a graph break, so a model around it compiles and matches eager."""
    module = MLPModule([4, 6, 2], activations="tanh", dtype="float64", seed=0)
    model = nn.Sequential(nn.Linear(3, 4).double(), module, nn.Tanh())
    x = torch.randn(5, 3, dtype=torch.float64)
    compiled = torch.compile(model, backend="eager")
    eager_out = model(x)
    eager_out.sum().backward()
    eager_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    out = compiled(x)
    out.sum().backward()
    torch.testing.assert_close(out, eager_out)
    for p, g in zip(model.parameters(), eager_grads):
        torch.testing.assert_close(p.grad, g)


def test_nan_propagates_with_or_without_grad_and_nan_weights_copy():
    """As in nn.Linear: a NaN input gives NaN outputs in grad mode and under no_grad
    (which scanned X and raised); a diverged module (Inf weights) deep-copies and casts
    (its engine refused them: deepcopy, pickle and .double() raised, the last with the
    parameters half converted)."""
    module = MLPModule([3, 2], dtype="float64", seed=0)
    x = torch.tensor([[float("nan"), 1.0, 2.0]], dtype=torch.float64)
    assert module(x).isnan().all()
    with torch.no_grad():
        assert module(x).isnan().all()
    with torch.no_grad():
        module.W_1[0, 0] = float("inf")
    copied = copy.deepcopy(module)
    assert torch.isinf(copied.W_1[0, 0])
    assert module.float().W_1.dtype == torch.float32 and module(x.float()).isnan().all()


def test_tied_weights_are_one_tensor_to_the_engine_too():
    """W_2 = W_1: the engine took a copy of the second (from_params keeps aliases
    apart) and the module rebuilt it at every call, the copy going stale each step."""
    torch.manual_seed(0)
    module = MLPModule([4, 4, 4], activations="tanh", dtype="float64")
    module.W_2 = module.W_1
    twin = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4)).double()
    with torch.no_grad():
        twin[0].bias.copy_(module.b_1), twin[2].bias.copy_(module.b_2)
    twin[0].weight = twin[2].weight = nn.Parameter(module.W_1.detach().clone())
    rebuilds = []
    rebuild = module._rebuild
    module._rebuild = lambda pairs: rebuilds.append(1) or rebuild(pairs)
    for model in (module, twin):
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for step in range(5):
            opt.zero_grad()
            model(torch.full((3, 4), 0.1 * step, dtype=torch.float64)).sum().backward()
            opt.step()
    torch.testing.assert_close(module.W_1, twin[0].weight)
    assert len(rebuilds) <= 1


def test_a_pruned_module_casts_and_computes_with_its_pruned_weights():
    """prune keeps W_1_orig and a mask, and makes W_1 in a forward pre-hook: .double()
    rebuilt the engine at once, from a stale W_1, and raised (the parameters already
    converted). Now the engine follows at the next call, after the hook."""
    from torch.nn.utils import prune

    module = MLPModule([4, 3], seed=0)
    prune.l1_unstructured(module, "W_1", amount=0.5)
    module.double()
    x = torch.randn(2, 4, dtype=torch.float64)
    out = module(x)
    expected = x @ (module.W_1_orig * module.W_1_mask).T + module.b_1
    torch.testing.assert_close(out, expected)


def test_an_input_with_a_lazy_negation_is_read_with_its_sign():
    """``z.conj().imag`` is a real tensor whose negation is a lazy bit, which DLPack
    drops: the module and train_step read -x."""
    module = MLPModule([3, 2], dtype="float64", seed=0)
    z = torch.randn(4, 3, dtype=torch.complex128)
    x = z.conj().imag
    assert x.is_neg()
    torch.testing.assert_close(module(x), module(x.clone()))
    torch.testing.assert_close(module(x.requires_grad_()).detach(), module(x.clone()).detach())
    nets = [gpu_mlp.MLP([3, 2], device="cpu", dtype="float64", seed=0) for _ in range(2)]
    y = torch.zeros(4, 2, dtype=torch.float64)
    nets[0].train_step(x.detach(), y, 0.1)
    nets[1].train_step(x.detach().clone(), y, 0.1)
    np.testing.assert_array_equal(nets[0].params[0][0], nets[1].params[0][0])


@pytest.mark.parametrize("make, said", [
    (lambda x: x.to_sparse(), r"layout torch.sparse_coo \(give {}.to_dense\(\)\)"),
    (lambda x: x.to(torch.float8_e4m3fn), "dtype torch.float8_e4m3fn"),
    (lambda x: torch.empty_like(x, device="meta"), "meta tensor")],
    ids=["sparse", "float8", "meta"])
@pytest.mark.parametrize("which", ["X", "Y"])
def test_a_tensor_dlpack_cannot_pass_is_refused_naming_the_argument(make, said, which):
    """DLPack's own BufferError, RuntimeError or NotImplementedError named nothing; now a
    TypeError names the argument, with their reason, before anything runs."""
    net = gpu_mlp.MLP([3, 2], device="cpu", dtype="float64", seed=0)
    before = [a.copy() for pair in net.params for a in pair]
    X, Y = torch.ones(2, 3), torch.zeros(2, 2)
    bad = {"X": X, "Y": Y}
    bad[which] = make(bad[which])
    with pytest.raises(TypeError, match=f"^{which} cannot be taken as an array: .*"
                                        f"{said.format(which)}"):
        net.train_step(bad["X"], bad["Y"], 0.1)
    for a, b in zip((a for pair in net.params for a in pair), before):
        np.testing.assert_array_equal(a, b)


def test_the_saved_tensors_are_unpacked_once_for_checkpointing_and_offloading():
    """Non-reentrant torch.utils.checkpoint (PyTorch's recommended mode) and one-shot
    saved-tensor hooks (offloading pops what it unpacks) allow one unpacking: backward
    took them twice, and raised CheckpointError and KeyError. The gradients are nn's."""
    import torch.utils.checkpoint as checkpoint

    torch.manual_seed(0)
    module = MLPModule([4, 5, 3], activations="tanh", dtype="float64")
    x = torch.randn(3, 4, dtype=torch.float64)
    module(x).sum().backward()
    expected = [p.grad.clone() for p in module.parameters()]
    module.zero_grad()
    checkpoint.checkpoint(module, x, use_reentrant=False).sum().backward()
    store = {}

    def pack(t):
        store[len(store)] = t
        return len(store) - 1

    with torch.autograd.graph.saved_tensors_hooks(pack, store.pop):
        out = module(x)
    out.sum().backward()
    for p, g in zip(module.parameters(), expected):
        torch.testing.assert_close(p.grad, 2 * g)


@pytest.mark.parametrize("make", [lambda: MLPModule([4, 3]),
                                  lambda: NetworkModule([Dense(4, 3)])], ids=["mlp", "net"])
def test_the_modules_name_a_sparse_input_or_parameter(make):
    """"the array" was named, MLPModule's reshape raised first, and a sparse parameter
    had no data pointer for the engine to share."""
    x = torch.randn(3, 4)
    with pytest.raises(TypeError, match=r"^x cannot be taken as an array: a tensor of "
                                        r"layout torch.sparse_coo \(give x.to_dense\(\)\)"):
        make()(x.to_sparse())
    module = make()
    module(x)  # an engine made: the sparse parameter replaces a shared one
    module.W_1 = nn.Parameter(module.W_1.detach().to_sparse())
    with pytest.raises(TypeError, match="^W_1 cannot be taken as an array: a tensor of "
                                        "layout torch.sparse_coo"):
        module(x)


def test_tracing_is_refused_rather_than_freezing_the_output():
    """torch.jit.trace recorded the engine's output as a constant: the traced module
    gave the trace-time output for every input."""
    import warnings

    module = MLPModule([4, 3])
    with torch.no_grad(), warnings.catch_warnings(), \
            pytest.raises(RuntimeError, match="cannot be traced"):
        warnings.simplefilter("ignore")  # torch.jit's own: deprecated, a tracer's booleans
        torch.jit.trace(module, torch.randn(2, 4))


@pytest.mark.parametrize("transform", ["vmap", "grad", "vmap of grad"])
def test_torch_func_transforms_are_refused_by_name(transform):
    """torch.func's per-sample-gradient recipe (vmap of grad of functional_call) failed
    deep inside, "Cannot access data pointer of Tensor that doesn't have storage"."""
    from torch.func import functional_call, grad, vmap

    module, x = MLPModule([5, 7, 3]), torch.randn(4, 5)
    params = {k: v.detach() for k, v in module.named_parameters()}

    def loss(p, xi):
        return functional_call(module, p, (xi,)).sum()

    run = {"vmap": lambda: vmap(module)(x), "grad": lambda: grad(loss)(params, x),
           "vmap of grad": lambda: vmap(grad(loss), in_dims=(None, 0))(params, x)}[transform]
    with pytest.raises(RuntimeError, match="does not run under torch.func's transforms"):
        run()
    assert functional_call(module, params, (x,)).shape == (4, 3)  # outside them: fine


def test_a_parametrized_weight_is_computed_once_a_forward():
    """The weights were read four times a forward, each read running the
    parametrization (spectral_norm's power iteration advanced four steps a forward), and
    the engine computed with another read than autograd differentiated."""
    from torch.nn.utils import parametrize

    calls = []

    class Counted(nn.Module):
        def forward(self, W):
            calls.append(1)
            return W * 1.0

    torch.manual_seed(0)
    module = MLPModule([4, 3], dtype="float64")
    parametrize.register_parametrization(module, "W_1", Counted())
    calls.clear()  # (registering runs it once)
    x = torch.randn(2, 4, dtype=torch.float64)
    out = module(x)
    assert len(calls) == 1
    out.sum().backward()
    W = module.parametrizations.W_1.original
    torch.testing.assert_close(W.grad, torch.ones(2, 3, dtype=torch.float64).T @ x)


def test_in_place_changes_between_forward_and_backward_are_caught():
    module = MLPModule([4, 6, 2], dtype="float64")
    out = module(torch.randn(3, 4, dtype=torch.float64)).sum()
    with torch.no_grad():
        module.W_1.add_(1.0)  # as an optimizer step before backward would
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.backward()


# --- 5. nn.Module's contract --------------------------------------------------------------

def test_deepcopy_and_torch_save_give_independent_modules():
    torch.manual_seed(0)
    module = MLPModule([4, 6, 2], activations="tanh")
    x = torch.randn(3, 4)
    twin = copy.deepcopy(module)
    buffer = io.BytesIO()
    torch.save(module, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    for other in (twin, loaded):
        assert other.W_1.data_ptr() != module.W_1.data_ptr()
        torch.testing.assert_close(other(x), module(x))
        assert engine_shares_parameters(other)
    with torch.no_grad():
        twin.b_2.add_(1.0)
    assert not torch.allclose(twin(x), module(x))
    fresh = copy.deepcopy(module)
    with torch.inference_mode():  # the engine is rebuilt here, the parameters stay normal
        fresh(x)
    fresh(x).sum().backward()
    assert fresh.W_1.grad is not None and engine_shares_parameters(fresh)


def test_input_shapes_dtypes_and_empty_batches():
    torch.manual_seed(0)
    module = MLPModule([4, 6, 2], dtype="float64")
    assert module(torch.randn(2, 5, 4, dtype=torch.float64)).shape == (2, 5, 2)
    assert module(torch.randn(4, dtype=torch.float64)).shape == (2,)
    x = torch.randn(3, 4, requires_grad=True)  # float32 into a float64 module
    out = module(x)
    assert out.dtype == torch.float64
    out.sum().backward()
    assert x.grad.dtype == torch.float32
    module.zero_grad()
    empty = module(torch.zeros(0, 4, dtype=torch.float64))
    assert empty.shape == (0, 2)
    empty.sum().backward()
    assert torch.equal(module.W_1.grad, torch.zeros_like(module.W_1))
    with pytest.raises(ValueError, match=r"\(\*, 4\)"):
        module(torch.zeros(3, 5, dtype=torch.float64))
    conv = NetworkModule([Conv2d(1, 2, 3, padding=1), Dense(2 * 4 * 4, 3, "identity")])
    assert conv(torch.randn(1, 4, 4)).shape == (3,)  # one image without a batch axis


def test_integer_seed_uses_gpu_mlp_initialisation():
    module = MLPModule([4, 6, 2], activations="tanh", seed=7, dtype="float64")
    net = gpu_mlp.MLP([4, 6, 2], activations="tanh", seed=7, dtype="float64", device="cpu")
    for t, a in zip(module.parameters(), [a for pair in net.params for a in pair]):
        np.testing.assert_array_equal(t.detach().numpy(), a)


def test_the_module_imports_pytorch_itself():
    assert gm_torch.torch is torch  # `import torch` in gpu_mlp/torch.py is absolute
    with torch.no_grad():
        assert math.isfinite(float(MLPModule([2, 2])(torch.ones(1, 2)).sum()))


@pytest.mark.gpu
def test_cuda_module_matches_cpu_and_shares_memory():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA build of PyTorch")
    torch.manual_seed(0)
    cpu = MLPModule([6, 16, 3], activations="tanh", dtype="float64")
    gpu = copy.deepcopy(cpu).cuda()
    arrays = [a for pair in gpu.net.params for a in pair]
    assert all(t.data_ptr() == a.data.ptr for t, a in zip(gpu.parameters(), arrays))
    x = torch.randn(10, 6, dtype=torch.float64)
    for model, data in ((cpu, x), (gpu, x.cuda())):
        model(data).square().sum().backward()
    torch.testing.assert_close(gpu(x.cuda()).cpu(), cpu(x), rtol=1e-10, atol=1e-12)
    for a, b in zip(gpu.parameters(), cpu.parameters()):
        torch.testing.assert_close(a.grad.cpu(), b.grad, rtol=1e-10, atol=1e-12)
    with pytest.raises(RuntimeError, match="same device"):
        gpu(x)


def test_module_docstring_example_runs():
    import doctest

    result = doctest.testmod(gm_torch)
    assert result.attempted > 0 and result.failed == 0


# --- 6. threads ------------------------------------------------------------------------------

def test_the_engines_blas_runs_on_one_thread_inside_a_module(monkeypatch):
    """BLAS threads idling (spinning) after the engine's GEMMs took the cores PyTorch's
    own threads needed: the README's example ran 14x slower on 2 cores."""
    threadpoolctl = pytest.importorskip("threadpoolctl")
    blas = threadpoolctl.ThreadpoolController().select(user_api="blas")
    if not blas.lib_controllers:
        pytest.skip("threadpoolctl finds no BLAS library to control")
    ops, seen = gpu_mlp.ops, []
    gemm = ops.gemm

    def counted(*args, **kwargs):
        seen.append({lib.get_num_threads() for lib in blas.lib_controllers})
        return gemm(*args, **kwargs)

    monkeypatch.setattr(ops, "gemm", counted)
    torch_threads = torch.get_num_threads()
    with blas.limit(limits=2):  # the machine's setting, as on a 2-core machine
        model = nn.Sequential(nn.Linear(3, 4), MLPModule([4, 8, 2]))
        model(torch.randn(5, 3)).square().sum().backward()  # forward, backward
        with torch.no_grad():
            model(torch.randn(5, 3))                         # predict
        assert {lib.get_num_threads() for lib in blas.lib_controllers} == {2}
    assert len(seen) >= 7 and all(threads == {1} for threads in seen), seen
    assert torch.get_num_threads() == torch_threads

    monkeypatch.setattr(gm_torch, "BLAS_THREADS", None)  # BLAS's own setting
    seen.clear()
    with blas.limit(limits=2):
        MLPModule([4, 8, 2])(torch.randn(5, 4))
    assert seen and all(threads == {2} for threads in seen)


def test_complex_input_is_refused_not_cast_to_its_real_part():
    module = gm_torch.MLPModule([3, 2], device="cpu", seed=0)
    with pytest.raises(TypeError, match="takes real numbers, got dtype torch.complex64"):
        module(torch.ones(2, 3, dtype=torch.complex64))


def _hogwild_worker(model):
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    X = torch.ones(4, 3)
    for _ in range(3):
        opt.zero_grad()
        model(X).pow(2).mean().backward()
        opt.step()


def test_share_memory_lets_worker_processes_train_the_module_in_place():
    """PyTorch's Hogwild recipe: after share_memory() a worker process's steps reach the
    parent's parameters. The engine was rebuilt over a private copy, so they did not."""
    import multiprocessing

    if "fork" not in multiprocessing.get_all_start_methods():
        pytest.skip("needs the fork start method")
    model = gm_torch.MLPModule([3, 4, 2], device="cpu", seed=0)
    model.share_memory()
    assert all(p.is_shared() for p in model.parameters())
    before = [p.detach().clone() for p in model.parameters()]
    worker = torch.multiprocessing.get_context("fork").Process(target=_hogwild_worker,
                                                               args=(model,))
    worker.start()
    worker.join(timeout=120)
    assert worker.exitcode == 0
    assert all(p.is_shared() for p in model.parameters())
    assert not any(torch.equal(a, p.detach()) for a, p in zip(before, model.parameters()))
    net = model.net  # the engine computes in that memory
    assert all(gm_torch._shares(t, a) for pair, arrays in zip(model._pairs(), net.params)
               for t, a in zip(pair, arrays))


def test_the_engine_takes_the_parameters_without_a_copy():
    """Building the engine over a module's parameters allocates no copy of them: it held
    a second set, for a moment, on every rebuild (the peak of a large model)."""
    import tracemalloc

    model = gm_torch.MLPModule([1000, 1000, 10], device="cpu", dtype=torch.float64, seed=0)
    size = sum(p.numel() * p.element_size() for p in model.parameters())  # 8 MB
    tracemalloc.start()
    try:
        model._rebuild(model._pairs())  # what a forward does after the parameters were replaced
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # the finite check's boolean temporary is an eighth of a float64 W; a copy is all of it
    assert peak < size / 2, f"{peak} bytes traced for {size} bytes of parameters"
    assert all(gm_torch._shares(t, a) for pair, arrays in zip(model._pairs(), model.net.params)
               for t, a in zip(pair, arrays))


def test_modules_made_and_used_in_worker_threads_limit_blas_and_restore_it():
    """threadpoolctl lets one Python thread set a pthreads OpenBLAS's limit (the first
    that does, until it lets go): modules used in workers left the process at 1 BLAS
    thread for good (9 of 10 runs), and a module made in the main thread first kept the
    limit from ever reaching the workers. Now the limit is set and restored whichever
    thread comes first and leaves last; inside a call the BLAS runs at BLAS_THREADS."""
    threadpoolctl = pytest.importorskip("threadpoolctl")
    import threading

    def blas_threads():
        return sorted({i["num_threads"] for i in threadpoolctl.threadpool_info()
                       if i["user_api"] == "blas"})

    before, seen = blas_threads(), []
    if before == [1]:
        pytest.skip("one BLAS thread already: no limit to see")
    X = torch.randn(32, 64)
    gemm = gpu_mlp.ops.gemm

    def spying_gemm(*args, **kwargs):
        seen.append(tuple(blas_threads()))
        return gemm(*args, **kwargs)

    def work(seed):
        model = gm_torch.MLPModule([64, 32, 10], device="cpu", seed=seed)
        with torch.no_grad():
            for _ in range(50):
                model(X)

    gm_torch.MLPModule([64, 8, 10], device="cpu", seed=9)  # the main thread's, first
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gpu_mlp.ops, "gemm", spying_gemm)
        threads = [threading.Thread(target=work, args=(k,)) for k in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert blas_threads() == before
    assert seen and all(s == (gm_torch.BLAS_THREADS,) for s in seen), set(seen)


def test_modules_in_several_threads_leave_blas_as_they_found_it():
    """The BLAS limit is the process's: the first call in sets it, the last out restores
    it. Each restoring what it saw on entry left another thread's limit of 1 for good."""
    threadpoolctl = pytest.importorskip("threadpoolctl")
    import threading

    def blas_threads():
        return sorted({i["num_threads"] for i in threadpoolctl.threadpool_info()
                       if i["user_api"] == "blas"})

    models = [gm_torch.MLPModule([64, 128, 10], device="cpu", seed=k) for k in range(2)]
    X = torch.randn(64, 64)
    before = blas_threads()

    def work(model):
        for _ in range(300):
            model(X).sum().backward()

    threads = [threading.Thread(target=work, args=(m,)) for m in models]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert blas_threads() == before
    models[0](X).sum().backward()
    assert blas_threads() == before
