"""``python -m gpu_mlp``: the command line of :mod:`gpu_mlp.cli`."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
