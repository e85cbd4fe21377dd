"""Compare two checkpoints after training: layer x layer similarity between the layers of A and those of B.

Each side is a snapshot store (or a run folder that contains one), whose stored activations are used as they
are, or a model folder (a Trainer checkpoint or a ``save_pretrained`` folder), which is captured on the probe
set here. ``contrasim-monitor compare`` (see :mod:`contrasim_monitor.cli`) is the command-line front end.

What must match, and what is rejected with :class:`~contrasim_monitor.run_files.InputError`:

- Stored activations of two stores must come from the same probe set (equal fingerprints).
- A model compared with a store must see the store's probe set: the probe as tokenized for the model must have
  the store's fingerprint. Without ``--probe``, the store's own ``probe.json`` is used, so this holds when the
  model reads the same token ids. A model whose modules do not include the store's layers is rejected as an
  architecture mismatch unless ``--layers-a``/``--layers-b`` chooses its layers.
- Token ids (a JSON lines probe of ``input_ids``, or a stored probe) are fed to both models only when both
  tokenizers have the same vocabulary and every id is inside both embedding tables. Texts are tokenized by
  each model's own tokenizer, so two models with different tokenizers are compared example by example.
- Widths may differ: each ContraSim head then has one input layer per side, and the closed-form measures
  accept different widths.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .capture import EMBEDDINGS, POOLING_METHODS, match_module_name
from .contrasim import ContraSimConfig, contrasim_pairs
from .heatmap import render_heatmap, short_layer_names
from .measures import linear_cka_matrix, mutual_knn, procrustes, pwcca, svcca
from .model_capture import (
    LoadedModel,
    ProbeInputs,
    capture_model,
    describe_probe_difference,
    load_model,
    read_probe_file,
    same_vocabulary,
    tokenize_probe,
)
from .outputs import OutputFolder, Progress, to_json_number
from .run_files import InputError, RunLocation, locate_run
from .tracker import split_probe

logger = logging.getLogger(__name__)

__all__ = [
    "CLOSED_FORM_MEASURES",
    "COMPARE_MEASURES",
    "CompareOptions",
    "CompareResult",
    "compare_output_names",
    "contrasim_matrix",
    "paired_layers",
    "parse_measures",
    "run_compare",
    "similarity_matrix",
]

#: Closed-form measures that ``compare`` and ``report`` compute, by command-line name.
CLOSED_FORM_MEASURES = ("cka", "cka_unbiased", "svcca", "pwcca", "procrustes", "knn")
COMPARE_MEASURES = ("contrasim", *CLOSED_FORM_MEASURES)


@dataclass
class CompareOptions:
    """Settings of one comparison; the command line fills them from its arguments."""

    a: str
    b: str
    probe: str | None = None
    out: str | None = None
    overwrite: bool = False
    measures: tuple[str, ...] = ("contrasim", "cka")
    step_a: int | None = None
    step_b: int | None = None
    layers_a: list[str] | None = None
    layers_b: list[str] | None = None
    pooling: str | None = None
    tokens_per_example: int | None = None
    max_length: int = 128
    batch_size: int = 32
    tokenizer: str | None = None
    device: str = "auto"
    contrasim: ContraSimConfig = field(default_factory=ContraSimConfig)
    held_out_fraction: float | None = None
    seed: int | None = None
    tensorboard: str | None = None
    tensorboard_step: int | None = None


@dataclass
class Side:
    """One side of a comparison once its activations are known."""

    role: str
    location: RunLocation
    activations: dict[str, torch.Tensor]
    fingerprint: str | None
    step: int | None
    #: The tokenized probe examples a model side was captured on; None for a store.
    probe_examples: list[dict] | None = None

    @property
    def layers(self) -> list[str]:
        return list(self.activations)

    def describe(self) -> str:
        kind = "snapshot store" if self.location.kind == "store" else "model folder"
        step = "" if self.step is None else f", step {self.step}"
        return f"{os.fspath(self.location.path)} ({kind}{step}, {len(self.activations)} layers)"

    def to_json(self) -> dict:
        return {
            "path": os.fspath(self.location.path),
            "kind": self.location.kind,
            "step": self.step,
            "layers": self.layers,
            "fingerprint": self.fingerprint,
        }


@dataclass
class CompareResult:
    """The layer x layer similarities between the layers of A (rows) and of B (columns), per measure."""

    a: Side
    b: Side
    probe_description: str
    num_examples: int
    matrices: dict[str, np.ndarray]
    settings: dict
    seconds: dict[str, float]
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {
            "a": self.a.to_json(),
            "b": self.b.to_json(),
            "probe": {"source": self.probe_description, "examples": self.num_examples},
            "measures": {
                measure: [[to_json_number(v) for v in row] for row in matrix]
                for measure, matrix in self.matrices.items()
            },
            "settings": self.settings,
            "seconds": {name: round(value, 3) for name, value in self.seconds.items()},
            "notes": self.notes,
        }


def parse_measures(text: str, allowed: Sequence[str] = COMPARE_MEASURES) -> tuple[str, ...]:
    """Split a comma-separated list of measure names and check each.

    Raises:
        InputError: If the list is empty or names an unknown measure.
    """
    names = tuple(dict.fromkeys(name.strip() for name in text.split(",") if name.strip()))
    if not names:
        raise InputError(f"--measures is empty; choose from {', '.join(allowed)}.")
    unknown = [name for name in names if name not in allowed]
    if unknown:
        raise InputError(f"--measures: unknown measure(s) {', '.join(unknown)}; choose from {', '.join(allowed)}.")
    return names


def compare_output_names(measures: Sequence[str]) -> list[str]:
    """Return the names of the files that ``compare`` writes into ``--out``."""
    return ["compare.json", "compare.csv", *(f"compare_{measure}.png" for measure in measures)]


def resolve_device(device: str) -> torch.device:
    """Turn ``--device`` into a torch device: ``auto`` is the first CUDA device when there is one, else the CPU.

    Raises:
        InputError: If the device name is invalid or names a CUDA device that is not available.
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, ValueError) as error:
        raise InputError(f"--device: invalid device {device!r} ({error}).") from error
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device: {device!r} was requested but CUDA is not available; use --device cpu.")
    return resolved


def run_compare(options: CompareOptions, progress: Progress) -> CompareResult:
    """Load or capture both sides, check that they can be compared, compute the matrices and write the outputs.

    Raises:
        InputError: On invalid or mismatched input (the command exits with status 2).
    """
    started = time.perf_counter()
    location_a = locate_run(options.a, "A")
    location_b = locate_run(options.b, "B")
    if options.step_a is not None and location_a.kind != "store":
        raise InputError("--step-a applies to a snapshot store, but A is a model folder.")
    if options.step_b is not None and location_b.kind != "store":
        raise InputError("--step-b applies to a snapshot store, but B is a model folder.")
    both_stores = location_a.kind == "store" and location_b.kind == "store"
    if options.probe is not None and both_stores:
        raise InputError(
            "--probe is used to capture model folders, but A and B are both snapshot stores, which hold the "
            "activations of their own probe set. Leave out --probe."
        )
    stored_probe = _stored_probe([location_a, location_b])
    settings = _capture_settings(options, stored_probe)
    output = None
    if options.out is not None:
        output = OutputFolder(options.out, compare_output_names(options.measures), options.overwrite)

    # Stores first: their layers and fingerprints decide what a model side must match.
    sides: dict[str, Side | None] = {"A": None, "B": None}
    for role, location, step in (("A", location_a, options.step_a), ("B", location_b, options.step_b)):
        if location.kind == "store":
            patterns = options.layers_a if role == "A" else options.layers_b
            sides[role] = _load_store_side(role, location, step, patterns, progress)
    if both_stores:
        probe_description = f"the stores' own (fingerprint {sides['A'].fingerprint[:12]})"
    else:
        probe_inputs = _probe_inputs(options, stored_probe)
        probe_description = probe_inputs.description
        _capture_model_sides(options, sides, (location_a, location_b), probe_inputs, settings, progress)
    side_a, side_b = sides["A"], sides["B"]
    notes = _check_comparable(side_a, side_b, options, stored_probe)
    capture_seconds = time.perf_counter() - started

    num_rows = len(next(iter(side_a.activations.values())))
    rows_per_example = settings["tokens_per_example"] if settings["pooling"] == "sample" else 1
    num_examples = num_rows // rows_per_example
    xs = list(side_a.activations.values())
    ys = list(side_b.activations.values())
    matrices: dict[str, np.ndarray] = {}
    seconds = {"load_and_capture": capture_seconds}
    for measure in options.measures:
        start = time.perf_counter()
        if measure == "contrasim":
            train_index, test_index = contrasim_split(
                num_examples, rows_per_example, settings["held_out_fraction"], settings["seed"]
            )
            matrices[measure] = contrasim_matrix(
                xs, ys, train_index, test_index, options.contrasim, resolve_device(options.device), progress
            )
        else:
            matrices[measure] = similarity_matrix(measure, xs, ys, notes)
        seconds[measure] = time.perf_counter() - start

    result = CompareResult(
        a=side_a,
        b=side_b,
        probe_description=probe_description,
        num_examples=num_examples,
        matrices=matrices,
        settings={**settings, "contrasim": dataclasses.asdict(options.contrasim)},
        seconds=seconds,
        notes=notes,
    )
    if output is not None:
        write_compare_outputs(result, output)
    if options.tensorboard is not None:
        write_compare_events(result, options.tensorboard, options.tensorboard_step)
    return result


# Sides.


def _load_store_side(
    role: str, location: RunLocation, step: int | None, patterns: list[str] | None, progress: Progress
) -> Side:
    store = location.open_store()
    steps = store.steps()
    if not steps:
        raise InputError(f"{role}: the snapshot store {os.fspath(store.root)!r} contains no captures yet.")
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise InputError(
            f"--step-{role.lower()}: the store {os.fspath(store.root)!r} has no capture at step {step}. "
            f"Stored steps: {steps}."
        )
    with progress.bar(total=1, description=f"{role}: loading step {step}") as bar:
        try:
            activations = store.load(step)
        except (FileNotFoundError, ValueError) as error:
            raise InputError(f"{role}: {error}") from error
        bar.update(1)
    if patterns:
        selected = _select_stored_layers(role, list(activations), patterns)
        activations = {name: activations[name] for name in selected}
    return Side(role, location, activations, store.fingerprint, step)


def _select_stored_layers(role: str, stored: list[str], patterns: list[str]) -> list[str]:
    selected: list[str] = []
    for pattern in patterns:
        matches = [name for name in stored if name == pattern or match_module_name(pattern, name)]
        if not matches:
            raise InputError(f"--layers-{role.lower()}: {pattern!r} matches none of the stored layers {stored}.")
        selected += [name for name in matches if name not in selected]
    return selected


def _stored_probe(locations: Sequence[RunLocation]) -> dict | None:
    """Return the probe set stored with either run (``probe.json`` in its store), A's first.

    Raises:
        InputError: If both runs stored probe sets and they differ.
    """
    found: list[tuple[RunLocation, dict]] = []
    for location in locations:
        if location.store_dir is None:
            continue
        probe = location.open_store().read_probe()
        if probe is not None:
            probe["store_dir"] = location.store_dir
            found.append((location, probe))
    if len(found) == 2 and found[0][1]["fingerprint"] != found[1][1]["fingerprint"]:
        raise InputError(
            f"The probe sets differ: the runs of A and B stored different probe sets (fingerprints "
            f"{found[0][1]['fingerprint'][:12]} and {found[1][1]['fingerprint'][:12]}). Pass one with --probe."
        )
    return found[0][1] if found else None


def _capture_settings(options: CompareOptions, stored_probe: dict | None) -> dict:
    """Combine the command-line settings with those recorded with the run; a conflict with a store is an error."""
    recorded = dict(stored_probe["settings"]) if stored_probe else {}
    defaults = {"pooling": "mean", "tokens_per_example": 8, "seed": 0, "held_out_fraction": 0.25}
    chosen = {
        "pooling": options.pooling,
        "tokens_per_example": options.tokens_per_example,
        "seed": options.seed,
        "held_out_fraction": options.held_out_fraction,
    }
    settings = {}
    for name, default in defaults.items():
        value = chosen[name]
        stored = recorded.get(name)
        if value is not None and stored is not None and value != stored and name in ("pooling", "tokens_per_example"):
            raise InputError(
                f"--{name.replace('_', '-')} {value} differs from the run's {name} {stored}; the stored activations "
                "were pooled that way. Leave out the option."
            )
        if value is None:
            value = default if stored is None else stored
        settings[name] = value
    if settings["pooling"] not in POOLING_METHODS:
        raise InputError(f"pooling {settings['pooling']!r} is not one of {', '.join(POOLING_METHODS)}.")
    return settings


def _probe_inputs(options: CompareOptions, stored_probe: dict | None) -> ProbeInputs:
    if options.probe is not None:
        return read_probe_file(options.probe)
    if stored_probe is None:
        raise InputError(
            "No probe set: pass --probe FILE (text, one example per line, or JSON lines). Neither A nor B has a "
            "probe set stored with its run (probe.json in the snapshot store)."
        )
    if not stored_probe["examples"]:
        raise InputError(f"The probe set stored in {os.fspath(stored_probe['store_dir'])!r} is empty.")
    return ProbeInputs(
        f"stored with the run in {os.fspath(stored_probe['store_dir'])}",
        examples=stored_probe["examples"],
        fingerprint=stored_probe["fingerprint"],
        settings=stored_probe["settings"],
    )


def _capture_model_sides(
    options: CompareOptions,
    sides: dict[str, Side | None],
    locations: tuple[RunLocation, RunLocation],
    probe: ProbeInputs,
    settings: dict,
    progress: Progress,
) -> None:
    device = resolve_device(options.device)
    extra_tokenizer = _load_extra_tokenizer(options.tokenizer)
    loaded: dict[str, LoadedModel] = {}
    for role, location in zip(("A", "B"), locations):
        if location.kind == "model":
            loaded[role] = load_model(location.model_dir, device, role)

    # The same token ids mean the same text only under the same vocabulary.
    if (
        probe.texts is None
        and len(loaded) == 2
        and same_vocabulary(loaded["A"].tokenizer, loaded["B"].tokenizer) is False
    ):
        raise InputError(
            "Architectures do not match: the probe set is token ids, but A and B have different tokenizers, "
            "so the same ids are different text for each. Pass the probe as text with --probe."
        )

    for role, location in zip(("A", "B"), locations):
        if role not in loaded:
            continue
        other = sides["B" if role == "A" else "A"]
        patterns = options.layers_a if role == "A" else options.layers_b
        if patterns is None:
            patterns = _default_model_layers(role, loaded[role], location, other)
        tokenizer = loaded[role].tokenizer or extra_tokenizer
        examples = tokenize_probe(probe, loaded[role], tokenizer, options.max_length, role)
        activations, probe_set = capture_model(
            loaded[role],
            examples,
            patterns,
            settings["pooling"],
            settings["tokens_per_example"],
            settings["seed"],
            options.batch_size,
            progress,
            role,
        )
        step = location.checkpoint_step
        sides[role] = Side(role, location, activations, probe_set.fingerprint(), step, probe_set.examples)


def _load_extra_tokenizer(folder: str | None):
    if folder is None:
        return None
    from transformers import AutoTokenizer

    if not Path(folder).is_dir():
        raise InputError(f"--tokenizer: folder {folder!r} not found.")
    try:
        return AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise InputError(f"--tokenizer: cannot load a tokenizer from {folder!r}: {error}") from error


def _default_model_layers(role: str, loaded: LoadedModel, location: RunLocation, other: Side | None) -> list | None:
    """Choose a model side's layers: those of the store it is compared with or of its own run, else automatic.

    Raises:
        InputError: If the model has no module of a stored layer's name (an architecture mismatch).
    """
    stored_layers = None
    source = None
    if other is not None and other.location.kind == "store":
        stored_layers, source = other.layers, f"the store of {other.role}"
    elif location.store_dir is not None:
        store = location.open_store()
        stored_layers, source = store.layers, f"its run's store {os.fspath(store.root)!r}"
    if not stored_layers:
        return None
    names = {name for name, _ in loaded.model.named_modules() if name}
    missing = [name for name in stored_layers if name != EMBEDDINGS and name not in names]
    if missing:
        raise InputError(
            f"Architectures do not match: the model in {os.fspath(loaded.folder)!r} ({role}) has no modules named "
            f"{missing[:4]}{' ...' if len(missing) > 4 else ''}, which {source} holds. Pass "
            f"--layers-{role.lower()} to choose the layers of {role}."
        )
    return list(stored_layers)


def _check_comparable(a: Side, b: Side, options: CompareOptions, stored_probe: dict | None) -> list[str]:
    """Check that both sides hold activations of the same probe examples; return notes for the output.

    Raises:
        InputError: If the probe sets differ or the row counts do not match.
    """
    notes: list[str] = []
    stores = [side for side in (a, b) if side.location.kind == "store"]
    models = [side for side in (a, b) if side.location.kind == "model"]
    references = [(side.role, f"the snapshot store of {side.role}", side.fingerprint) for side in stores]
    if stored_probe is not None and options.probe is None and not stores:
        references.append(("stored", "the probe set stored with the run", stored_probe["fingerprint"]))
    for role, reference_name, fingerprint in references:
        for side in [*stores, *models]:
            if side.role == role or side.fingerprint == fingerprint:
                continue
            tokenized_note = "" if side.location.kind == "store" else " as tokenized for that model"
            detail = ""
            if stored_probe is not None and stored_probe["fingerprint"] == fingerprint and side.probe_examples:
                detail = " " + describe_probe_difference(stored_probe["examples"], side.probe_examples)
            if options.probe is not None:
                hint = " Give the run's own probe set, or leave out --probe to use the one stored with the run."
            elif side.location.kind == "model":
                hint = " The model reads the stored probe set with other input fields than the run's model did."
            else:
                hint = " The two runs used different probe sets."
            raise InputError(
                f"The probe sets differ: {reference_name} has fingerprint {fingerprint[:12]}, but the probe set of "
                f"{side.role}{tokenized_note} has fingerprint {side.fingerprint[:12]}.{detail.rstrip()}{hint}"
            )
    if len(models) == 2 and a.fingerprint != b.fingerprint:
        notes.append("A and B tokenize the probe texts differently; examples are matched by line.")

    rows_a = len(next(iter(a.activations.values())))
    rows_b = len(next(iter(b.activations.values())))
    if rows_a != rows_b:
        raise InputError(
            f"A has {rows_a} activation rows per layer but B has {rows_b}; both must hold one row per probe example "
            "(or per sampled token, with the same --tokens-per-example)."
        )
    return notes


# Measures.


def contrasim_split(
    num_examples: int, rows_per_example: int, held_out_fraction: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split the probe examples as the monitor does, expanded to activation rows; too few examples is an error."""
    try:
        train, test = split_probe(num_examples, held_out_fraction, seed)
    except ValueError as error:
        raise InputError(f"{error} Or leave ContraSim out with --measures cka.") from error
    offsets = torch.arange(rows_per_example)
    return (
        (train.unsqueeze(1) * rows_per_example + offsets).flatten(),
        (test.unsqueeze(1) * rows_per_example + offsets).flatten(),
    )


def usable_layers(tensors: Sequence[torch.Tensor]) -> list[bool]:
    """Flag layers whose activations are finite and not the same for every example; others get NaN scores."""
    flags = []
    for tensor in tensors:
        finite = bool(torch.isfinite(tensor).all())
        flags.append(finite and not bool((tensor == tensor[:1]).all()))
    return flags


def contrasim_matrix(
    xs: Sequence[torch.Tensor],
    ys: Sequence[torch.Tensor] | None,
    train_index: torch.Tensor,
    test_index: torch.Tensor,
    config: ContraSimConfig,
    device: torch.device,
    progress: Progress,
    description: str = "ContraSim heads",
) -> np.ndarray:
    """Train one ContraSim head per pair (x_i, y_j) and return the ``(len(xs), len(ys))`` held-out scores.

    With ``ys`` None, the layers of ``xs`` are compared with each other: only the upper triangle is trained, the
    result is mirrored, and the diagonal is 1. The heads are trained by :func:`contrasim_pairs` in chunks, so that
    a progress bar can advance. Head ``h`` is seeded with ``config.seed + h`` and all heads share one mini-batch
    order, as in a single call, so the chunking changes no score. Pairs with a non-finite or constant side are NaN.
    """
    symmetric = ys is None
    features = [tensor.float() for tensor in (xs if symmetric else (*xs, *ys))]
    flags = usable_layers(features)
    offset = 0 if symmetric else len(xs)
    columns = len(xs) if symmetric else len(ys)
    if symmetric:
        candidates = [(i, j) for i in range(len(xs)) for j in range(i + 1, len(xs))]
    else:
        candidates = [(i, offset + j) for i in range(len(xs)) for j in range(columns)]
    pairs = [(i, j) for i, j in candidates if flags[i] and flags[j]]
    matrix = np.full((len(xs), columns), np.nan)
    if symmetric:
        for i, ok in enumerate(flags):
            if ok:
                matrix[i, i] = 1.0
    if not pairs:
        return matrix
    # Fewer, larger chunks on a GPU, where heads in one batched fit cost little more than one head.
    chunks = 4 if device.type == "cuda" else 16
    chunk_size = max(1, math.ceil(len(pairs) / chunks))
    features = [tensor.to(device) for tensor in features]
    with progress.bar(total=len(pairs), description=description) as bar:
        for start in range(0, len(pairs), chunk_size):
            chunk = pairs[start : start + chunk_size]
            chunk_config = dataclasses.replace(
                config, seed=config.seed + start, shuffle_seed=config.resolved_shuffle_seed
            )
            scores = contrasim_pairs(features, chunk, train_index, test_index, config=chunk_config, device=device)
            for (i, j), score in zip(chunk, scores.tolist()):
                matrix[i, j - offset] = score
                if symmetric:
                    matrix[j, i] = score
            bar.update(len(chunk))
    return matrix


def similarity_matrix(
    measure: str, xs: Sequence[torch.Tensor], ys: Sequence[torch.Tensor], notes: list[str] | None = None
) -> np.ndarray:
    """Compute a closed-form measure between every x and every y, as an ``(len(xs), len(ys))`` float64 array.

    Pairs that the measure cannot score (a constant or non-finite side, or more kept CCA dimensions than
    examples) are NaN, and the reason is appended to ``notes`` once per measure.
    """
    xs = [tensor.double() for tensor in xs]
    ys = [tensor.double() for tensor in ys]
    flags_x, flags_y = usable_layers(xs), usable_layers(ys)
    matrix = np.full((len(xs), len(ys)), np.nan)
    rows = [i for i, ok in enumerate(flags_x) if ok]
    columns = [j for j, ok in enumerate(flags_y) if ok]
    if not rows or not columns:
        return matrix
    if measure in ("cka", "cka_unbiased"):
        values = linear_cka_matrix([xs[i] for i in rows], [ys[j] for j in columns], unbiased=measure == "cka_unbiased")
        matrix[np.ix_(rows, columns)] = values.cpu().numpy()
        return matrix

    functions = {
        "svcca": lambda x, y: svcca(x, y),
        "pwcca": lambda x, y: pwcca(x, y),
        "procrustes": lambda x, y: procrustes(x, y).similarity,
        "knn": lambda x, y: mutual_knn(x, y, k=min(10, x.shape[0] - 1)),
    }
    if measure not in functions:
        raise ValueError(f"Unknown closed-form measure {measure!r}; expected one of {CLOSED_FORM_MEASURES}.")
    reported = False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # constant inputs were filtered out above
        for i in rows:
            for j in columns:
                try:
                    matrix[i, j] = float(functions[measure](xs[i], ys[j]))
                except ValueError as error:
                    if notes is not None and not reported:
                        notes.append(f"{measure}: some pairs are NaN: {error}")
                        reported = True
    return matrix


# Outputs.


def _axis_labels(a: Side, b: Side) -> tuple[list[str], list[str]]:
    return short_layer_names(a.layers), short_layer_names(b.layers)


def paired_layers(a_layers: Sequence[str], b_layers: Sequence[str]) -> tuple[str, list[tuple[int, int]]]:
    """Pair each layer of A with its counterpart in B, for the per-layer table and the TensorBoard scalars.

    Layers pair by name when every layer of A is in B. Otherwise they pair by position when both sides have as
    many layers, as ``encoder.layer.3`` of a base model and ``bert.encoder.layer.3`` of a classifier built on it
    do. Otherwise only the names both sides share are paired.

    Returns:
        ``("name" or "position", [(index in A, index in B), ...])``.
    """
    if all(name in b_layers for name in a_layers):
        return "name", [(i, list(b_layers).index(name)) for i, name in enumerate(a_layers)]
    if len(a_layers) == len(b_layers):
        return "position", [(i, i) for i in range(len(a_layers))]
    return "name", [(i, list(b_layers).index(name)) for i, name in enumerate(a_layers) if name in b_layers]


def format_compare_table(result: CompareResult) -> str:
    """Format the per-layer table of paired layers, then each matrix (rows: layers of A, columns: layers of B)."""
    rows, columns = _axis_labels(result.a, result.b)
    lines = [
        f"A: {result.a.describe()}",
        f"B: {result.b.describe()}",
        f"Probe set: {result.probe_description}, {result.num_examples} examples.",
    ]
    lines += [f"Note: {note}" for note in result.notes]
    pairing, pairs = paired_layers(result.a.layers, result.b.layers)
    if pairs:
        names = [
            result.a.layers[i] if pairing == "name" else f"{result.a.layers[i]} / {result.b.layers[j]}"
            for i, j in pairs
        ]
        lines.append("")
        lines.append(f"Each layer of A against the layer of B with the same {pairing}:")
        width = max(5, *(len(name) for name in names))
        lines.append(f"{'layer':<{width}}  " + "  ".join(f"{m:>12}" for m in result.matrices))
        for name, (i, j) in zip(names, pairs):
            cells = [_cell(matrix[i, j], 12) for matrix in result.matrices.values()]
            lines.append(f"{name:<{width}}  " + "  ".join(cells))
    width = max(len(label) for label in rows)
    cell = max(7, *(len(label) + 1 for label in columns))
    for measure, matrix in result.matrices.items():
        lines.append("")
        lines.append(f"{measure}: rows are layers of A, columns layers of B")
        lines.append(" " * width + "".join(f"{label:>{cell}}" for label in columns))
        for label, values in zip(rows, matrix):
            lines.append(f"{label:<{width}}" + "".join(_cell(value, cell) for value in values))
    return "\n".join(lines)


def _cell(value: float, width: int) -> str:
    return f"{value:>{width}.3f}" if np.isfinite(value) else f"{'nan':>{width}}"


def write_compare_outputs(result: CompareResult, output: OutputFolder) -> None:
    """Write ``compare.json``, ``compare.csv`` (one row per measure and pair of layers) and a heatmap per measure."""
    output.write_json("compare.json", result.to_json())
    csv_rows = [
        (measure, layer_a, layer_b, "" if not np.isfinite(value) else f"{value:.6f}")
        for measure, matrix in result.matrices.items()
        for layer_a, row in zip(result.a.layers, matrix)
        for layer_b, value in zip(result.b.layers, row)
    ]
    output.write_csv("compare.csv", ("measure", "layer_a", "layer_b", "value"), csv_rows)
    rows, columns = _axis_labels(result.a, result.b)
    for measure, matrix in result.matrices.items():
        title = f"{measure}: {_short_title(result.a)} (rows) vs {_short_title(result.b)} (columns)"
        image = render_heatmap(matrix, rows, columns, title, row_title="layer of A", column_title="layer of B")
        output.write_png(f"compare_{measure}.png", image)


def _short_title(side: Side) -> str:
    name = side.location.path.resolve().name or os.fspath(side.location.path)
    return name if side.step is None else f"{name} step {side.step}"


def write_compare_events(result: CompareResult, log_dir: str, step: int | None) -> str:
    """Write the comparison as TensorBoard events into a new event file in ``log_dir``; return the folder.

    Heatmaps go to ``compare/<measure>`` and a text summary to ``compare/summary``. For each layer of A that
    :func:`paired_layers` pairs with a layer of B, ``compare/<measure>/<layer of A>`` is their score at
    ``step`` (by default A's step, else 0), with a custom-scalars chart per measure. Earlier event files are left
    as they are.
    """
    from torch.utils.tensorboard import SummaryWriter

    if step is None:
        step = result.a.step if result.a.step is not None else 0
    rows, columns = _axis_labels(result.a, result.b)
    writer = SummaryWriter(log_dir=log_dir, filename_suffix=".contrasim-compare")
    try:
        _, pairs = paired_layers(result.a.layers, result.b.layers)
        if pairs:
            writer.add_custom_scalars(
                {"compare": {measure: ["Multiline", [rf"^compare/{measure}/"]] for measure in result.matrices}}
            )
        for measure, matrix in result.matrices.items():
            for i, j in pairs:
                writer.add_scalar(f"compare/{measure}/{result.a.layers[i]}", float(matrix[i, j]), step)
            title = f"{measure}: A (rows) vs B (columns)"
            image = render_heatmap(matrix, rows, columns, title, row_title="layer of A", column_title="layer of B")
            writer.add_image(f"compare/{measure}", image, step, dataformats="HWC")
        summary = format_compare_table(result)
        writer.add_text("compare/summary", "```\n" + summary + "\n```", step)
    finally:
        writer.close()
    return log_dir
