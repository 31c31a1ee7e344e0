"""What each optimizer keeps beyond the parameters: gpu_mlp against PyTorch.

gpu_mlp is measured with tracemalloc on the NumPy backend (what a first step leaves
allocated, and the peak of a steady-state step beyond plain SGD's); PyTorch is counted
from the tensors it keeps after a step (every ``.grad`` and the optimizer's state).

    python bench/optim_memory.py         # needs torch
"""

import argparse
import tracemalloc

import numpy as np
import torch

import gpu_mlp
from gpu_mlp import optim

SIZES, BATCH, MB = [784, 1024, 1024, 10], 128, 1e6
OURS = {"SGD": lambda: 0.01, "SGD, momentum": lambda: optim.SGD(0.01, momentum=0.9),
        "Adam": lambda: optim.Adam(), "AdamW": lambda: optim.AdamW()}
THEIRS = {"SGD": lambda p: torch.optim.SGD(p, lr=0.01),
          "SGD, momentum": lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9),
          "Adam": lambda p: torch.optim.Adam(p), "AdamW": lambda p: torch.optim.AdamW(p)}


def peak_beyond(step) -> int:
    base = tracemalloc.get_traced_memory()[0]
    tracemalloc.reset_peak()
    step()
    return tracemalloc.get_traced_memory()[1] - base


def ours(name, X, y):
    net = gpu_mlp.MLP(SIZES, loss="softmax_cross_entropy", device="cpu", dtype="float32")
    net.train_step(X, y, 0.01)  # the workspace exists before tracing
    opt = OURS[name]()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    net.train_step(X, y, opt, check=False)
    held = tracemalloc.get_traced_memory()[0] - base
    sgd = peak_beyond(lambda: net.train_step(X, y, 0.01, check=False))
    steady = peak_beyond(lambda: net.train_step(X, y, opt, check=False))
    tracemalloc.stop()
    return held, max(steady - sgd, 0)


def theirs(name, X, y):
    torch.manual_seed(0)
    layers = [torch.nn.Linear(a, b) for a, b in zip(SIZES, SIZES[1:])]
    model = torch.nn.Sequential(layers[0], torch.nn.ReLU(), layers[1], torch.nn.ReLU(),
                                layers[2])
    opt = THEIRS[name](model.parameters())
    for _ in range(2):
        opt.zero_grad(set_to_none=False)
        torch.nn.functional.cross_entropy(model(torch.from_numpy(X)),
                                          torch.from_numpy(y)).backward()
        opt.step()
    grads = sum(p.grad.nbytes for p in model.parameters())
    state = sum(t.nbytes for s in opt.state.values() for t in s.values()
                if torch.is_tensor(t) and t.dim())
    return grads + state


def main():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((BATCH, SIZES[0])).astype(np.float32)
    y = rng.integers(0, SIZES[-1], BATCH)
    params = sum((a + 1) * b for a, b in zip(SIZES, SIZES[1:])) * 4
    print(f"MLP {SIZES}, float32, batch {BATCH}: parameters {params / MB:.2f} MB")
    print("| optimizer | gpu_mlp keeps | gpu_mlp steady step, beyond SGD | PyTorch keeps |")
    print("| --- | --- | --- | --- |")
    for name in OURS:
        held, steady = ours(name, X, y)
        print(f"| {name} | {held / MB:.2f} MB | {steady / MB:.2f} MB | "
              f"{theirs(name, X, y) / MB:.2f} MB |")


if __name__ == "__main__":
    # (no options: --help says what it does, and runs nothing)
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args()
    main()
