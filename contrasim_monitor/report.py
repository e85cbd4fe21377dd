"""Summarise a monitored run from its snapshot store: when each layer settled, its largest jump, the final matrices.

Definitions, per measure and layer, over the captures that the store kept (retention may have thinned them):

- **Settling step**: the first stored capture step from which on the layer's similarity to its own final
  representation (the newest capture) stays at or above ``1 - tolerance``. The final capture scores 1, so every
  layer settles at the final step at the latest. Sorting layers by this step gives the order in which they settle.
- **Largest drop**: the lowest similarity of the layer to the previous capture, reported as ``1 - similarity``
  with the step at which it happened. It is read from ``contrasim.jsonl`` when the run wrote one for that measure
  (every capture the monitor took), and otherwise computed between consecutive stored snapshots. A drop above
  ``drift_threshold`` raises a drift alarm.
- **Final matrices**: the layer x layer similarity at the newest capture, from ``contrasim.jsonl`` when it has
  them for that step, and otherwise computed from the stored activations.

Cost: linear CKA is closed-form and cheap. ContraSim trains one head per layer and earlier capture for the
settling steps, plus the layer x layer triangle and the drops when ``contrasim.jsonl`` lacks them.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field

import numpy as np

from .compare import contrasim_matrix, contrasim_split, similarity_matrix, usable_layers
from .contrasim import ContraSimConfig, contrasim_pairs
from .heatmap import render_heatmap, short_layer_names
from .outputs import OutputFolder, Progress, to_json_number
from .run_files import InputError, locate_run, read_records

logger = logging.getLogger(__name__)

__all__ = ["REPORT_MEASURES", "ReportOptions", "RunReport", "report_output_names", "run_report"]

#: Measures that ``report`` computes.
REPORT_MEASURES = ("cka", "contrasim")


@dataclass
class ReportOptions:
    """Settings of one report; the command line fills them from its arguments."""

    run: str
    out: str | None = None
    overwrite: bool = False
    measures: tuple[str, ...] = REPORT_MEASURES
    tolerance: float = 0.05
    drift_threshold: float = 0.5
    contrasim: ContraSimConfig = field(default_factory=ContraSimConfig)
    device: str = "auto"


@dataclass
class LayerDrop:
    """The lowest similarity of one layer to the previous capture, and where it happened."""

    value: float
    step: int | None
    previous_step: int | None

    @property
    def drop(self) -> float:
        return 1.0 - self.value


@dataclass
class RunReport:
    """The summary of one run, per measure.

    Attributes:
        store_dir: Folder of the snapshot store.
        records_path: ``contrasim.jsonl`` of the run, or None.
        steps: Steps of the stored captures; the last is the final one.
        layers: Layer names.
        similarity_to_final: ``(L, K)`` per measure: each layer at each stored capture against its final self.
        settling_steps: Per measure, each layer's settling step.
        drops: Per measure, each layer's largest drop.
        drop_sources: Per measure, ``"contrasim.jsonl"`` or ``"snapshots"``.
        final_matrices: ``(L, L)`` per measure at the final step.
        alarms: ``(measure, layer)`` pairs whose largest drop exceeds the threshold.
    """

    store_dir: str
    records_path: str | None
    steps: list[int]
    layers: list[str]
    tolerance: float
    drift_threshold: float
    similarity_to_final: dict[str, np.ndarray]
    settling_steps: dict[str, list[int | None]]
    drops: dict[str, list[LayerDrop]]
    drop_sources: dict[str, str]
    final_matrices: dict[str, np.ndarray]
    final_sources: dict[str, str]
    seconds: float = 0.0
    alarms: list[tuple[str, str]] = field(default_factory=list)

    @property
    def final_step(self) -> int:
        return self.steps[-1]

    def settling_order(self, measure: str) -> list[tuple[str, int | None]]:
        """Return the layers sorted by settling step (layers that never got a score last), ties in layer order."""
        pairs = list(zip(self.layers, self.settling_steps[measure]))
        return sorted(pairs, key=lambda pair: (pair[1] is None, pair[1] if pair[1] is not None else 0))

    def to_json(self) -> dict:
        per_layer = []
        for index, layer in enumerate(self.layers):
            entry = {"layer": layer}
            for measure in self.similarity_to_final:
                drop = self.drops[measure][index]
                entry[measure] = {
                    "settling_step": self.settling_steps[measure][index],
                    "similarity_to_final": [to_json_number(v) for v in self.similarity_to_final[measure][index]],
                    "largest_drop": to_json_number(drop.drop),
                    "largest_drop_step": drop.step,
                    "largest_drop_previous_step": drop.previous_step,
                    "alarm": (measure, layer) in self.alarms,
                }
            per_layer.append(entry)
        return {
            "store": self.store_dir,
            "records": self.records_path,
            "steps": self.steps,
            "final_step": self.final_step,
            "tolerance": self.tolerance,
            "drift_threshold": self.drift_threshold,
            "layers": per_layer,
            "settling_order": {
                measure: [layer for layer, _ in self.settling_order(measure)] for measure in self.similarity_to_final
            },
            "drop_sources": self.drop_sources,
            "final_matrices": {
                measure: [[to_json_number(v) for v in row] for row in matrix]
                for measure, matrix in self.final_matrices.items()
            },
            "final_sources": self.final_sources,
            "alarms": [{"measure": measure, "layer": layer} for measure, layer in self.alarms],
            "seconds": round(self.seconds, 3),
        }


def report_output_names(measures: tuple[str, ...]) -> list[str]:
    """Return the names of the files that ``report`` writes into ``--out``."""
    names = ["report.txt", "report.json"]
    for measure in measures:
        names += [f"report_final_{measure}.png", f"report_settling_{measure}.png"]
    return names


def run_report(options: ReportOptions, progress: Progress) -> RunReport:
    """Build the report of the run at ``options.run`` and write its files into ``options.out``.

    Raises:
        InputError: On a missing or invalid run folder, or invalid options (the command exits with status 2).
    """
    from .compare import resolve_device

    started = time.perf_counter()
    if not 0.0 <= options.tolerance < 1.0:
        raise InputError(f"--tolerance must be in [0, 1), got {options.tolerance}.")
    location = locate_run(options.run, "RUN")
    if location.store_dir is None:
        raise InputError(
            f"RUN: {os.fspath(location.path)!r} is a model folder without a monitored run: report needs the run's "
            "snapshot store (its TensorBoard folder, or a checkpoint with contrasim_monitor.json)."
        )
    output = None
    if options.out is not None:
        output = OutputFolder(options.out, report_output_names(options.measures), options.overwrite)
    store = location.open_store()
    steps = store.steps()
    if not steps:
        raise InputError(f"RUN: the snapshot store {os.fspath(store.root)!r} contains no captures yet.")
    layers = store.layers
    records = [r for r in read_records(location.records_path) if r["step"] <= steps[-1] and r.get("layers") == layers]
    probe = store.read_probe() or {}
    settings = probe.get("settings", {})
    rows_per_example = settings.get("tokens_per_example", 8) if settings.get("pooling") == "sample" else 1
    device = resolve_device(options.device)

    final = store.load(steps[-1])
    final_tensors = list(final.values())
    split = None
    if "contrasim" in options.measures:
        num_examples = len(final_tensors[0]) // rows_per_example
        split = contrasim_split(
            num_examples, rows_per_example, settings.get("held_out_fraction", 0.25), settings.get("seed", 0)
        )

    recorded_drops = {m: _drops_from_records(records, m, len(layers)) for m in options.measures}
    compute_drops = [m for m in options.measures if recorded_drops[m] is None]
    to_final, previous_values = _scan_snapshots(
        store, steps, final_tensors, options, compute_drops, split, device, progress
    )

    report = RunReport(
        store_dir=os.fspath(store.root),
        records_path=None if location.records_path is None else os.fspath(location.records_path),
        steps=steps,
        layers=layers,
        tolerance=options.tolerance,
        drift_threshold=options.drift_threshold,
        similarity_to_final=to_final,
        settling_steps={m: settling_steps(to_final[m], steps, options.tolerance) for m in options.measures},
        drops={},
        drop_sources={},
        final_matrices={},
        final_sources={},
    )
    for measure in options.measures:
        if recorded_drops[measure] is not None:
            report.drops[measure], report.drop_sources[measure] = recorded_drops[measure], "contrasim.jsonl"
        else:
            report.drops[measure] = _lowest(previous_values[measure], steps)
            report.drop_sources[measure] = "snapshots"
        for layer, drop in zip(layers, report.drops[measure]):
            if np.isfinite(drop.value) and drop.drop > options.drift_threshold:
                report.alarms.append((measure, layer))
        matrix = _final_matrix_from_records(records, measure, steps[-1])
        if matrix is not None:
            report.final_matrices[measure], report.final_sources[measure] = matrix, "contrasim.jsonl"
        else:
            report.final_matrices[measure] = _final_matrix(measure, final_tensors, options, split, device, progress)
            report.final_sources[measure] = "snapshots"
    report.seconds = time.perf_counter() - started
    if output is not None:
        write_report_outputs(report, output)
    return report


def settling_steps(similarity: np.ndarray, steps: list[int], tolerance: float) -> list[int | None]:
    """Return, per row of ``similarity`` ``(L, K)``, the first step from which every value is >= 1 - tolerance.

    A NaN counts as below the threshold. The last column is the final capture itself, so a row whose last value
    is NaN (a layer with unusable activations) gives None.
    """
    threshold = 1.0 - tolerance
    result: list[int | None] = []
    for row in similarity:
        settled = None
        for index in range(len(steps) - 1, -1, -1):
            if not (np.isfinite(row[index]) and row[index] >= threshold):
                break
            settled = steps[index]
        result.append(settled)
    return result


def _scan_snapshots(store, steps, final_tensors, options, compute_drops, split, device, progress):
    """Load each stored capture once and compare it with the final capture and, where needed, the previous one.

    Returns:
        ``(to_final, previous)``: per measure, ``(L, K)`` similarities to the final capture, and for the measures
        in ``compute_drops`` ``(L, K)`` similarities to the previous stored capture (NaN in column 0).
    """
    size, count = len(final_tensors), len(steps)
    to_final = {m: np.full((size, count), np.nan) for m in options.measures}
    previous_values = {m: np.full((size, count), np.nan) for m in compute_drops}
    final_usable = usable_layers(final_tensors)
    for measure in options.measures:
        to_final[measure][:, -1] = [1.0 if ok else np.nan for ok in final_usable]
    previous = None
    for index in progress.bar(range(count), total=count, description="Comparing stored captures"):
        current = final_tensors if index == count - 1 else list(store.load(steps[index]).values())
        for measure in options.measures:
            if index < count - 1:
                to_final[measure][:, index] = _same_layer_scores(
                    measure, current, final_tensors, options, split, device
                )
            if measure in compute_drops and previous is not None:
                previous_values[measure][:, index] = _same_layer_scores(
                    measure, current, previous, options, split, device
                )
        previous = current
    return to_final, previous_values


def _same_layer_scores(measure, current, reference, options, split, device) -> np.ndarray:
    """Score each layer of ``current`` against the same layer of ``reference``; NaN where a side is unusable."""
    if measure != "contrasim":
        return np.array([similarity_matrix(measure, [x], [y])[0, 0] for x, y in zip(current, reference)])
    size = len(current)
    features = [tensor.float().to(device) for tensor in (*current, *reference)]
    flags = usable_layers(features)
    pairs = [(i, size + i) for i in range(size) if flags[i] and flags[size + i]]
    scores = np.full(size, np.nan)
    if pairs:
        values = contrasim_pairs(features, pairs, split[0], split[1], config=options.contrasim, device=device)
        for (i, _), value in zip(pairs, values.tolist()):
            scores[i] = value
    return scores


def _drops_from_records(records: list[dict], measure: str, size: int) -> list[LayerDrop] | None:
    """Find each layer's lowest ``vs_previous`` in the records; None when no record has this measure."""
    found = False
    drops = [LayerDrop(np.nan, None, None) for _ in range(size)]
    for record in records:
        values = record.get("vs_previous", {}).get(measure)
        if not values or len(values) != size:
            continue
        found = True
        for index, value in enumerate(values):
            if value is None:
                continue
            if not np.isfinite(drops[index].value) or value < drops[index].value:
                drops[index] = LayerDrop(float(value), record["step"], record.get("previous_step"))
    return drops if found else None


def _lowest(previous: np.ndarray, steps: list[int]) -> list[LayerDrop]:
    drops = []
    for row in previous:
        finite = [k for k in range(1, len(steps)) if np.isfinite(row[k])]
        if not finite:
            drops.append(LayerDrop(np.nan, None, None))
            continue
        k = min(finite, key=lambda position: row[position])
        drops.append(LayerDrop(float(row[k]), steps[k], steps[k - 1]))
    return drops


def _final_matrix_from_records(records: list[dict], measure: str, step: int) -> np.ndarray | None:
    for record in records:
        if record["step"] == step and measure in record.get("cross_layer", {}):
            matrix = np.array(
                [[np.nan if v is None else v for v in row] for row in record["cross_layer"][measure]], dtype=float
            )
            if measure == "contrasim" and np.isnan(matrix[np.triu_indices(len(matrix), 1)]).all() and len(matrix) > 1:
                return None  # a capture taken without ContraSim heads
            return matrix
    return None


def _final_matrix(measure, tensors, options, split, device, progress) -> np.ndarray:
    if measure == "contrasim":
        return contrasim_matrix(
            tensors, None, split[0], split[1], options.contrasim, device, progress, "ContraSim heads (final)"
        )
    return similarity_matrix(measure, tensors, tensors)


# Output.


def format_report(report: RunReport) -> str:
    """Format the report as the text that the command prints and writes to ``report.txt``."""
    lines = _format_header(report)
    lines.append("")
    lines += _format_layer_table(report)
    lines.append("")
    lines.append("Order in which the layers settle (step):")
    for measure in report.similarity_to_final:
        order = ", ".join(
            f"{layer} ({'-' if step is None else step})" for layer, step in report.settling_order(measure)
        )
        lines.append(f"  {measure}: {order}")
    if report.alarms:
        lines.append("")
        alarmed = ", ".join(f"{layer} ({measure})" for measure, layer in report.alarms)
        lines.append(f"Drift alarm: {alarmed} dropped by more than {report.drift_threshold:g} between two captures.")
    for measure, matrix in report.final_matrices.items():
        lines.append("")
        source = report.final_sources[measure]
        lines.append(f"Final {measure} layer x layer at step {report.final_step} (from {source}):")
        lines += _format_matrix(matrix, short_layer_names(report.layers))
    return "\n".join(lines)


def _format_header(report: RunReport) -> list[str]:
    steps = [str(step) for step in report.steps]
    if len(steps) > 12:
        steps = [*steps[:5], "...", *steps[-3:]]
    sources = ", ".join(f"{measure} from {source}" for measure, source in report.drop_sources.items())
    return [
        f"Run: {report.store_dir}",
        f"{len(report.steps)} stored captures at steps {', '.join(steps)}; final step {report.final_step}.",
        "Settles at: the first capture from which the layer's similarity to its final representation stays >= "
        f"{1 - report.tolerance:.3g} (tolerance {report.tolerance:g}).",
        "Largest drop: 1 - the lowest similarity to the previous capture, at that step; ALARM above "
        f"{report.drift_threshold:g}. Source: {sources}.",
    ]


def _format_layer_table(report: RunReport) -> list[str]:
    """Format one row per layer: its settling step and its largest drop, per measure."""
    measures = list(report.similarity_to_final)
    width = max(5, *(len(layer) for layer in report.layers))
    header = f"{'layer':<{width}}"
    header += "".join(f"  {measure + ' settles at':>20}" for measure in measures)
    header += "".join(f"  {measure + ' largest drop':>26}" for measure in measures)
    lines = [header]
    for index, layer in enumerate(report.layers):
        row = f"{layer:<{width}}"
        for measure in measures:
            step = report.settling_steps[measure][index]
            row += f"  {'-' if step is None else f'step {step}':>20}"
        for measure in measures:
            drop = report.drops[measure][index]
            text = "-"
            if np.isfinite(drop.value):
                flag = " ALARM" if (measure, layer) in report.alarms else ""
                text = f"{drop.drop:.3f} at step {drop.step}{flag}"
            row += f"  {text:>26}"
        lines.append(row)
    return lines


def _format_matrix(matrix: np.ndarray, labels: list[str]) -> list[str]:
    cell = max(7, *(len(label) + 1 for label in labels))
    label_width = max(len(label) for label in labels)
    lines = [" " * label_width + "".join(f"{label:>{cell}}" for label in labels)]
    for label, row in zip(labels, matrix):
        cells = [f"{value:>{cell}.3f}" if np.isfinite(value) else f"{'nan':>{cell}}" for value in row]
        lines.append(f"{label:<{label_width}}" + "".join(cells))
    return lines


def write_report_outputs(report: RunReport, output: OutputFolder) -> None:
    """Write ``report.txt``, ``report.json`` and, per measure, the final matrix and the settling heatmap."""
    output.write_text("report.txt", format_report(report) + "\n")
    output.write_json("report.json", report.to_json())
    labels = short_layer_names(report.layers)
    columns = [str(step) for step in report.steps]
    for measure in report.similarity_to_final:
        title = f"{measure}: layer x layer at step {report.final_step}"
        matrix = report.final_matrices[measure]
        image = render_heatmap(matrix, labels, labels, title, row_title="layer", column_title="layer")
        output.write_png(f"report_final_{measure}.png", image)
        title = f"{measure}: each layer vs its final self, by capture step"
        matrix = report.similarity_to_final[measure]
        image = render_heatmap(matrix, labels, columns, title, row_title="layer", column_title="capture step")
        output.write_png(f"report_settling_{measure}.png", image)
