"""gpu_mlp: multilayer perceptrons trained by hand-written backprop on NVIDIA GPUs.

The engine (:class:`Network`, :class:`MLP`) runs the backprop of docs/MATH.md with CuPy
-- cuBLAS GEMMs and fused CUDA kernels from ``kernels/`` -- or, with the same code, on
NumPy; what happens to each layer's gradient is a chain of sinks (:mod:`gpu_mlp.updates`),
which a step plan (:mod:`gpu_mlp.plan`) builds for each training step: optimizers (:mod:`gpu_mlp.optim`), DP-SGD (:mod:`gpu_mlp.privacy`, accounted by
:mod:`gpu_mlp.accounting`) and data parallelism over MPI (:mod:`gpu_mlp.distributed`). The
module :mod:`gpu_mlp.reference` is the plain NumPy definition of correct that every
other piece is checked against.
"""

from . import (accounting, activations, checkpoint, datasets, distributed, layers, losses, optim,
               plan, privacy, reference, training, updates)
from ._version import __version__
from .device import gpu_available
from .mlp import MLP
from .network import MEMORY_MODES, Network

__all__ = ["MLP", "Network", "MEMORY_MODES", "accounting", "activations", "checkpoint",
           "datasets", "distributed", "layers", "losses", "optim", "plan", "privacy",
           "reference", "training", "updates", "gpu_available", "__version__"]
