"""Training curves: loss and accuracy per epoch, written to an image file.

Needs matplotlib (``pip install 'gpu_mlp[plot]'``). It draws on a bare ``Figure`` with
the Agg canvas rather than through pyplot, so it opens no window and leaves the
caller's matplotlib backend alone.
"""

from __future__ import annotations

import os


def require_matplotlib() -> None:
    """Raise an ImportError that says how to install matplotlib, if it is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ImportError("plotting needs matplotlib: pip install 'gpu_mlp[plot]'") from None


def check_format(path) -> None:
    """Raise a ValueError naming ``path`` unless matplotlib writes its suffix's format
    (an ImportError if matplotlib is missing), so that a bad name fails before the
    work whose curves it is to hold."""
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    formats = FigureCanvasAgg.get_supported_filetypes()
    name = os.path.basename(os.fspath(path))
    if name.startswith(".") and "." not in name[1:] and name[1:].lower() in formats:
        # splitext reads ".png" as a name without a suffix
        raise ValueError(f"cannot plot to {path}: the name is only a suffix; name the file, "
                         f"e.g. curves{name}")
    suffix = os.path.splitext(name)[1][1:].lower()
    if suffix not in formats:
        problem = f"unknown image format .{suffix}" if suffix else "no suffix to name the format"
        raise ValueError(f"cannot plot to {path}: {problem}; matplotlib writes "
                         f"{', '.join(sorted(formats))}")


def plot_history(history, path, title: str = "") -> None:
    """Write the loss curves (training and validation) of a
    :class:`~gpu_mlp.training.History` to ``path`` (format from its suffix, e.g. .png),
    with a second panel for the validation accuracy when there is one."""
    check_format(path)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    if history.epochs == 0:
        raise ValueError("the history has no epochs to plot")
    epochs = list(range(1, history.epochs + 1))
    accuracy = _points(epochs, history.val_accuracy)
    fig = Figure(figsize=(10 if accuracy else 5.5, 4), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2 if accuracy else 1, squeeze=False)[0]

    # markers on short runs: one epoch, or one between epochs without a loss, is a point
    # a line alone would not draw
    style = {"marker": "o", "markersize": 3} if history.epochs <= 50 else {}
    loss = axes[0]
    loss.plot(epochs, [float("nan") if v is None else v for v in history.train_loss],
              label="training", **style)
    validation = _points(epochs, history.val_loss)
    if validation:
        loss.plot(*validation, label="validation", **style)
    loss.set(xlabel="epoch", ylabel="loss (log scale)", yscale="log", title="loss")
    loss.legend()
    if accuracy:
        axes[1].plot(*accuracy, color="C1", label="validation", **style)
        axes[1].set(xlabel="epoch", ylabel="accuracy", title="validation accuracy")
        axes[1].grid(alpha=0.3)
    loss.grid(alpha=0.3)
    for panel in axes:
        panel.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole
    if title:
        fig.suptitle(title)
    fig.savefig(path, dpi=100)


def _points(epochs, values):
    """``(epochs, values)`` without the epochs whose value is None, or None if all are."""
    kept = [(e, v) for e, v in zip(epochs, values) if v is not None]
    return tuple(zip(*kept)) if kept else None
