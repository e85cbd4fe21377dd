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

__all__ = ["JsonLinesSink", "SnapshotSink", "TensorBoardSink", "scalar_tags"]

_COMPARISONS = ("vs_init", "vs_previous")


class TensorBoardSink:
    """Write scalars, heatmaps and a text summary of each capture with ``torch.utils.tensorboard``.

    Args:
        log_dir: Folder of a new event file; the Trainer's own run folder places these charts beside its losses.
        measures: Measure names, used for the custom-scalars layout.
        writer: An existing ``SummaryWriter`` (for example Accelerate's TensorBoard tracker) to write through
            instead of a new event file. :meth:`close` flushes it but leaves closing it to its owner.
        write_scalars: Also write the per-layer scalars; False when another sink (such as Accelerate's trackers)
            logs them, so that this one adds only the heatmaps and the text summary.
        purge_step: When resuming, the first step of the resumed run: TensorBoard hides events at this step and
            later from the earlier event files of ``log_dir``, which belong to the abandoned continuation.
    """

    def __init__(
        self,
        log_dir: str | os.PathLike | None,
        measures: tuple[str, ...],
        writer=None,
        write_scalars: bool = True,
        purge_step: int | None = None,
    ) -> None:
        if writer is None:
            if log_dir is None:
                raise ValueError("TensorBoardSink needs `log_dir` or an existing SummaryWriter as `writer`.")
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(log_dir=str(log_dir), filename_suffix=".contrasim", purge_step=purge_step)
            self._owns_writer = True
        else:
            self._owns_writer = False
        self.writer = writer
        self.write_scalars = write_scalars
        self.log_dir = str(log_dir) if log_dir is not None else writer.log_dir
        layout = {
            measure: {comparison: ["Multiline", [rf"^{measure}/{comparison}/"]] for comparison in _COMPARISONS}
            for measure in measures
        }
        self.writer.add_custom_scalars(layout)

    def write(self, result: CaptureResult) -> None:
        step = result.step
        labels = short_layer_names(result.layers)

        if self.write_scalars:
            for tag, value in scalar_tags(result).items():
                self.writer.add_scalar(tag, value, step)

        for measure, matrix in result.cross_layer.items():
            image = render_heatmap(
                matrix,
                labels,
                labels,
                f"{measure}: layer x layer, step {step}",
                row_title="layer",
                column_title="layer",
            )
            self.writer.add_image(f"{measure}/cross_layer", image, step, dataformats="HWC")

        for measure, history in result.vs_init_history.items():
            columns = [str(s) for s in result.history_steps]
            title = f"{measure}: each layer vs initial model, by step"
            image = render_heatmap(history, labels, columns, title, row_title="layer", column_title="capture step")
            self.writer.add_image(f"{measure}/vs_init_history", image, step, dataformats="HWC")

        self.writer.add_text("similarity/summary", _summary_markdown(result), step)
        self.writer.flush()

    def close(self) -> None:
        if self._owns_writer:
            self.writer.close()
        else:
            self.writer.flush()


class SnapshotSink:
    """Store each capture's activations in a :class:`~contrasim_monitor.store.SnapshotStore`.

    Args:
        store: The store; its first write fixes the probe fingerprint and the layers.
        fingerprint: Fingerprint of the probe set, from :meth:`ProbeSet.fingerprint`.
    """

    def __init__(self, store, fingerprint: str) -> None:
        self.store = store
        self.fingerprint = fingerprint

    def write(self, result: CaptureResult) -> None:
        if result.activations is None:
            raise ValueError(f"The capture at step {result.step} carries no activations to store.")
        self.store.write(result.step, result.activations, self.fingerprint)

    def close(self) -> None:
        pass


class JsonLinesSink:
    """Append one JSON object per capture to ``path`` (the format of :meth:`CaptureResult.to_record`)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def truncate_after(self, step: int) -> list[dict]:
        """Drop records later than ``step`` (rewriting the file atomically) and return the records kept."""
        if not self.path.exists():
            return []
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                record = json.loads(line)
                if record["step"] <= step:
                    kept.append(record)
        temporary = self.path.with_name(self.path.name + ".tmp")
        temporary.write_text("".join(json.dumps(record) + "\n" for record in kept), encoding="utf-8")
        os.replace(temporary, self.path)
        return kept

    def write(self, result: CaptureResult) -> None:
        data = (json.dumps(result.to_record()) + "\n").encode("utf-8")
        # Unbuffered, so that a failed write surfaces here and the file can be cut back to whole lines.
        with self.path.open("ab", buffering=0) as handle:
            size = handle.seek(0, os.SEEK_END)
            try:
                remaining = memoryview(data)
                while remaining:
                    remaining = remaining[handle.write(remaining) :]
            except OSError:
                # A full disk can leave part of the line written: cut it off, so the file stays whole lines.
                handle.truncate(size)
                raise

    def close(self) -> None:
        pass


def scalar_tags(result: CaptureResult) -> dict[str, float]:
    """Return the capture's scalars keyed by TensorBoard tag, ``<measure>/<comparison>/<layer>``."""
    tags = {}
    for comparison in _COMPARISONS:
        for measure, values in getattr(result, comparison).items():
            for layer, value in zip(result.layers, values):
                tags[f"{measure}/{comparison}/{layer}"] = float(value)
    return tags


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
