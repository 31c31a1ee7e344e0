"""gpu_mlp: multilayer perceptrons trained by hand-written backprop on NVIDIA GPUs.

The engine (:class:`MLP`) runs Algorithm 1 of MATH.md with CuPy -- cuBLAS GEMMs and
fused CUDA kernels from ``kernels/`` -- or, with the same code, on NumPy. The module
:mod:`gpu_mlp.reference` is the plain NumPy definition of correct that every other
piece is checked against.
"""

from . import activations, checkpoint, datasets, layers, losses, reference, training
from .device import gpu_available
from .mlp import MEMORY_MODES, MLP

__version__ = "0.1.0"

__all__ = ["MLP", "MEMORY_MODES", "activations", "checkpoint", "datasets", "layers", "losses",
           "reference", "training", "gpu_available", "__version__"]
