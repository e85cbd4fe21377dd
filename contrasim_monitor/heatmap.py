"""Render similarity matrices as RGB images with matplotlib's Agg canvas.

Figures are built with ``matplotlib.figure.Figure`` directly, never through ``pyplot``, so no figure is
registered in pyplot's global state and nothing leaks between captures.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

__all__ = ["render_heatmap", "short_layer_names"]


def short_layer_names(names: Sequence[str]) -> list[str]:
    """Drop the dotted prefix that the dotted names share, so ``bert.encoder.layer.3`` shows as ``layer.3``.

    Names without a dot (such as ``embeddings``) are kept whole and do not take part in the shared prefix.
    """
    dotted = [name.split(".") for name in names if "." in name]
    if len(dotted) < 2:
        return list(names)
    prefix = os.path.commonprefix(dotted)
    # Keep the last shared part as context ("layer.3" rather than "3").
    keep_from = max(len(prefix) - 1, 0)
    return [".".join(name.split(".")[keep_from:]) if "." in name else name for name in names]


def render_heatmap(
    matrix: np.ndarray,
    row_labels: Sequence[str],
    column_labels: Sequence[str],
    title: str,
    vmin: float = 0.0,
    vmax: float = 1.0,
    annotate: bool | None = None,
    row_title: str | None = None,
    column_title: str | None = None,
) -> np.ndarray:
    """Draw a labelled heatmap with a colour bar.

    Args:
        matrix: Values of shape ``(R, C)``; NaN cells are drawn grey.
        row_labels: R labels for the vertical axis.
        column_labels: C labels for the horizontal axis.
        title: Figure title.
        vmin: Value at the bottom of the colour scale.
        vmax: Value at the top of the colour scale.
        annotate: Write each value in its cell; by default only when both sides have at most 16 cells.
        row_title: Name of the vertical axis, such as ``"layer"``; none by default.
        column_title: Name of the horizontal axis, such as ``"capture step"``; none by default.

    Returns:
        An RGB image of shape ``(H, W, 3)``, dtype uint8.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    matrix = np.asarray(matrix, dtype=np.float64)
    rows, columns = matrix.shape
    if annotate is None:
        annotate = rows <= 16 and columns <= 16

    width = min(3.0 + 0.55 * columns, 16.0)
    height = min(2.5 + 0.45 * rows, 14.0)
    figure = Figure(figsize=(width, height), dpi=100)
    canvas = FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    colormap = _colormap()
    image = axes.imshow(np.ma.masked_invalid(matrix), cmap=colormap, vmin=vmin, vmax=vmax, aspect="auto")
    # At most about 24 tick labels per axis: more are unreadable and slow to draw.
    column_ticks = range(0, columns, max(1, -(-columns // 24)))
    row_ticks = range(0, rows, max(1, -(-rows // 24)))
    axes.set_xticks(column_ticks, labels=[column_labels[i] for i in column_ticks], rotation=60, ha="right", fontsize=8)
    axes.set_yticks(row_ticks, labels=[row_labels[i] for i in row_ticks], fontsize=8)
    axes.set_title(title, fontsize=10)
    if row_title:
        axes.set_ylabel(row_title, fontsize=9)
    if column_title:
        axes.set_xlabel(column_title, fontsize=9)
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04)

    if annotate:
        midpoint = (vmin + vmax) / 2
        for i in range(rows):
            for j in range(columns):
                value = matrix[i, j]
                text = "nan" if not np.isfinite(value) else f"{value:.2f}"
                color = "black" if np.isfinite(value) and value > midpoint else "white"
                axes.text(j, i, text, ha="center", va="center", fontsize=7, color=color)

    figure.tight_layout()
    canvas.draw()
    rgba = np.asarray(canvas.buffer_rgba())
    return rgba[..., :3].copy()


def _colormap():
    import matplotlib

    return matplotlib.colormaps["viridis"].with_extremes(bad="#9e9e9e")
