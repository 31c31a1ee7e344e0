"""gpu_mlp: multilayer perceptrons trained by hand-written backprop on NVIDIA GPUs.

The engine (:class:`MLP`) runs Algorithm 1 of MATH.md with CuPy -- cuBLAS GEMMs and
fused CUDA kernels from ``kernels/`` -- or, with the same code, on NumPy. The module
:mod:`gpu_mlp.reference` is the plain NumPy definition of correct that every other
piece is checked against.
"""

from . import activations, checkpoint, datasets, layers, losses, optim, reference, training
from .device import gpu_available
from .mlp import MLP
from .network import MEMORY_MODES, Network

__version__ = "0.1.0"

__all__ = ["MLP", "Network", "MEMORY_MODES", "activations", "checkpoint", "datasets", "layers", "losses",
           "optim", "reference", "training", "gpu_available", "__version__"]
