"""CUDA C sources of gpu_mlp, installed as the package data ``gpu_mlp.kernel_sources``.

See ``gpu_mlp/cuda.py`` for how they are loaded and ``common.cuh`` for how the same
text compiles for the GPU and for the host.
"""
