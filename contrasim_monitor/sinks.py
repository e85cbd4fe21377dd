"""Sinks for capture results: TensorBoard event files and a JSON lines file.

TensorBoard tags are grouped so that TensorBoard folds them: ``<measure>/vs_init/<layer>`` and
``<measure>/vs_previous/<layer>`` for scalars, ``<measure>/cross_layer`` and ``<measure>/vs_init_history`` for
heatmap images, and a custom-scalars layout that shows all layers of one comparison in one chart.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np

from .heatmap import render_heatmap, short_layer_names
from .result import CaptureResult

logger = logging.getLogger(__name__)

__all__ = ["JsonLinesSink", "TensorBoardSink"]

_COMPARISONS = ("vs_init", "vs_previous")


class TensorBoardSink:
    """Write scalars, heatmaps and a text summary of each capture with ``torch.utils.tensorboard``.

    Args:
        log_dir: Folder of the event file; the Trainer's own run folder places these charts beside its losses.
        measures: Measure names, used for the custom-scalars layout.
    """

    def __init__(self, log_dir: str | os.PathLike, measures: tuple[str, ...]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = str(log_dir)
        self.writer = SummaryWriter(log_dir=self.log_dir, filename_suffix=".contrasim")
        layout = {
            measure: {comparison: ["Multiline", [rf"^{measure}/{comparison}/"]] for comparison in _COMPARISONS}
            for measure in measures
        }
        self.writer.add_custom_scalars(layout)

    def write(self, result: CaptureResult) -> None:
        step = result.step
        labels = short_layer_names(result.layers)

        for comparison in _COMPARISONS:
            values_by_measure = getattr(result, comparison)
            for measure, values in values_by_measure.items():
                for layer, value in zip(result.layers, values):
                    self.writer.add_scalar(f"{measure}/{comparison}/{layer}", float(value), step)

        for measure, matrix in result.cross_layer.items():
            image = render_heatmap(matrix, labels, labels, f"{measure}: layer x layer, step {step}")
            self.writer.add_image(f"{measure}/cross_layer", image, step, dataformats="HWC")

        for measure, history in result.vs_init_history.items():
            columns = [str(s) for s in result.history_steps]
            image = render_heatmap(history, labels, columns, f"{measure}: each layer vs initial model, by step")
            self.writer.add_image(f"{measure}/vs_init_history", image, step, dataformats="HWC")

        self.writer.add_text("contrasim/summary", _summary_markdown(result), step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class JsonLinesSink:
    """Append one JSON object per capture to ``path`` (the format of :meth:`CaptureResult.to_record`)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, result: CaptureResult) -> None:
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(result.to_record()) + "\n")

    def close(self) -> None:
        pass


def _summary_markdown(result: CaptureResult) -> str:
    measures = list(result.vs_init)
    header = "| layer | " + " | ".join(f"{m} vs init" for m in measures)
    if result.vs_previous:
        header += " | " + " | ".join(f"{m} vs step {result.previous_step}" for m in result.vs_previous)
    lines = [header + " |", "|" + "---|" * (header.count("|"))]
    for index, layer in enumerate(result.layers):
        cells = [_format(result.vs_init[m][index]) for m in measures]
        cells += [_format(values[index]) for values in result.vs_previous.values()]
        lines.append(f"| {layer} | " + " | ".join(cells) + " |")
    if result.unusable_layers:
        lines.append("")
        lines.append(f"Not compared (non-finite or constant activations): {', '.join(result.unusable_layers)}.")
    return "\n".join(lines)


def _format(value: float) -> str:
    return f"{value:.3f}" if np.isfinite(value) else "nan"
