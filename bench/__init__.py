"""Benchmarks of one gpu_mlp training step against PyTorch: see bench/README.md."""
