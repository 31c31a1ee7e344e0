"""Built-in data sets (see gpu_mlp/datasets.py)."""
