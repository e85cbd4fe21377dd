"""The similarity tracker: turns each capture's activations into cross-layer and cross-checkpoint similarities.

It keeps the activations of the initial and the previous capture, and is free of I/O and of any training
framework: the Trainer callback and the Accelerate monitor feed it and hand its results to the sinks.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .contrasim import ContraSimConfig, contrasim_pairs
from .distributed import all_succeeded, gather_rows, shard_bounds, world
from .measures import linear_cka, linear_cka_matrix
from .result import CaptureResult

logger = logging.getLogger(__name__)

__all__ = ["MEASURES", "MIN_HELD_OUT_EXAMPLES", "MIN_TRAIN_EXAMPLES", "SimilarityTracker"]

MEASURES = ("contrasim", "cka")
#: Measures computed in closed form, cheap next to the probe forward pass; the others train heads.
CLOSED_FORM_MEASURES = ("cka",)
#: The smallest ContraSim split that gives a score worth logging: the contrastive loss needs enough
#: negatives, and the held-out mean cosine needs enough examples to be stable to about +-0.02.
MIN_TRAIN_EXAMPLES = 32
MIN_HELD_OUT_EXAMPLES = 16


def validate_measures(measures: Sequence[str]) -> tuple[str, ...]:
    if isinstance(measures, str):
        measures = (measures,)
    measures = tuple(measures)
    if not measures:
        raise ValueError(f"`measures` is empty; choose one or more of {MEASURES}.")
    unknown = [m for m in measures if m not in MEASURES]
    if unknown:
        raise ValueError(f"Unknown measure(s) {unknown} in `measures`; choose from {MEASURES}.")
    if len(set(measures)) != len(measures):
        raise ValueError(f"`measures` names a measure more than once: {list(measures)}.")
    return measures


def split_probe(num_examples: int, held_out_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split probe example indices into ContraSim training and held-out parts, the same at every capture.

    Raises:
        ValueError: If either part is smaller than the minimum ContraSim needs.
    """
    if not 0.0 < held_out_fraction < 1.0:
        raise ValueError(f"`held_out_fraction` must be strictly between 0 and 1, got {held_out_fraction!r}.")
    num_held_out = int(round(num_examples * held_out_fraction))
    num_train = num_examples - num_held_out
    if num_train < MIN_TRAIN_EXAMPLES or num_held_out < MIN_HELD_OUT_EXAMPLES:
        needed = max(
            int(np.ceil(MIN_HELD_OUT_EXAMPLES / held_out_fraction)),
            int(np.ceil(MIN_TRAIN_EXAMPLES / (1.0 - held_out_fraction))),
        )
        raise ValueError(
            f"The probe set has {num_examples} examples, which splits into {num_train} ContraSim training and "
            f"{num_held_out} held-out examples; ContraSim needs at least {MIN_TRAIN_EXAMPLES} and "
            f"{MIN_HELD_OUT_EXAMPLES}. Use a probe set of at least {needed} examples with "
            f"held_out_fraction={held_out_fraction}."
        )
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(num_examples, generator=generator)
    return order[num_held_out:].sort().values, order[:num_held_out].sort().values


def _example_rows(examples: torch.Tensor, rows_per_example: int) -> torch.Tensor:
    """Expand example indices to the indices of their activation rows."""
    offsets = torch.arange(rows_per_example)
    return (examples.unsqueeze(1) * rows_per_example + offsets).flatten()


@dataclass
class _Snapshot:
    """One capture's activations, with a flag per layer: finite and not constant."""

    step: int
    tensors: list[torch.Tensor]
    usable: list[bool]

    def comparable(self, other: _Snapshot) -> list[bool]:
        return [a and b for a, b in zip(self.usable, other.usable)]


class SimilarityTracker:
    """Compute similarities at each capture against the initial and the previous capture.

    Args:
        measures: Any of ``"contrasim"`` and ``"cka"`` (linear CKA, biased estimator).
        contrasim: ContraSim hyperparameters; the published values by default.
        held_out_fraction: Fraction of the probe examples held out to score ContraSim heads; the rest trains them.
        seed: Seed of the probe split.
    """

    def __init__(
        self,
        measures: Sequence[str] = MEASURES,
        contrasim: ContraSimConfig | None = None,
        held_out_fraction: float = 0.25,
        seed: int = 0,
    ) -> None:
        self.measures = validate_measures(measures)
        if contrasim is not None and not isinstance(contrasim, ContraSimConfig):
            raise TypeError(f"`contrasim` must be a ContraSimConfig or None, got {type(contrasim).__name__}.")
        self.contrasim_config = contrasim or ContraSimConfig()
        if not isinstance(held_out_fraction, float) or not 0.0 < held_out_fraction < 1.0:
            raise ValueError(
                f"`held_out_fraction` must be a float strictly between 0 and 1, got {held_out_fraction!r}."
            )
        self.held_out_fraction = held_out_fraction
        self.seed = seed
        #: Activation rows per probe example: 1, or the tokens drawn per example with pooling="sample".
        self.rows_per_example = 1
        self.reset()

    def reset(self) -> None:
        """Forget every capture, so that the next one becomes the initial capture."""
        self.layers: list[str] | None = None
        self.initial: _Snapshot | None = None
        self.previous: _Snapshot | None = None
        self.history_steps: list[int] = []
        self.vs_init_history: dict[str, list[np.ndarray]] = {m: [] for m in self.measures}
        self._train_index: torch.Tensor | None = None
        self._test_index: torch.Tensor | None = None
        self._reported_unusable: set[str] = set()
        #: Wall seconds per ContraSim head trained by this process at the last capture with heads, or None.
        self.seconds_per_head: float | None = None

    def restore(
        self,
        initial: tuple[int, Mapping[str, torch.Tensor]],
        previous: tuple[int, Mapping[str, torch.Tensor]],
        history: Sequence[tuple[int, Mapping[str, Sequence[float]]]] = (),
    ) -> None:
        """Continue a series from stored captures, as when a run resumes from a checkpoint.

        Args:
            initial: Step and activations of the initial capture.
            previous: Step and activations of the last capture before the resume point.
            history: ``(step, {measure: vs_init values})`` of earlier captures, for the history heatmap; measures
                missing from an entry are filled with NaN.
        """
        self.reset()
        initial_step, initial_activations = initial
        layers = list(initial_activations)
        num_rows = len(next(iter(initial_activations.values())))
        if "contrasim" in self.measures:
            train, test = split_probe(num_rows // self.rows_per_example, self.held_out_fraction, self.seed)
            self._train_index = _example_rows(train, self.rows_per_example)
            self._test_index = _example_rows(test, self.rows_per_example)
        self.layers = layers

        def snapshot(step: int, activations: Mapping[str, torch.Tensor]) -> _Snapshot:
            if list(activations) != layers:
                raise ValueError(f"Stored capture at step {step} has layers {list(activations)}, expected {layers}.")
            tensors = [activations[name].detach().float() for name in layers]
            return _Snapshot(step, tensors, self._usable_layers(tensors))

        self.initial = snapshot(initial_step, initial_activations)
        previous_step, previous_activations = previous
        self.previous = self.initial if previous_step == initial_step else snapshot(previous_step, previous_activations)
        for step, values in history:
            if step > previous_step:
                continue
            self.history_steps.append(step)
            for measure in self.measures:
                row = values.get(measure)
                self.vs_init_history[measure].append(
                    np.full(len(layers), np.nan) if row is None else np.asarray(row, dtype=float)
                )
        if not self.history_steps or self.history_steps[-1] != previous_step:
            self.history_steps.append(previous_step)
            for measure in self.measures:
                self.vs_init_history[measure].append(np.full(len(layers), np.nan))

    def check_probe_size(self, num_examples: int) -> None:
        """Raise a ValueError now if ``num_examples`` is too few for the ContraSim split."""
        if "contrasim" in self.measures:
            split_probe(num_examples, self.held_out_fraction, self.seed)

    def update(
        self, step: int, activations: Mapping[str, torch.Tensor], measures: Sequence[str] | None = None
    ) -> CaptureResult:
        """Compare this capture's activations with the initial and previous ones, then remember them.

        Args:
            step: The optimizer step of this capture; must increase from call to call.
            activations: Layer name to pooled activations ``(N, D)``, the same layers and probe examples at
                every call.
            measures: The subset of this tracker's measures to compute at this capture, None for all. The
                others are absent from the result, and their ``vs_init_history`` column for this step is NaN.
        """
        measures = self.measures if measures is None else tuple(m for m in self.measures if m in measures)
        layers = list(activations)
        if self.layers is None:
            num_rows = len(next(iter(activations.values())))
            if num_rows % self.rows_per_example:
                raise ValueError(
                    f"{num_rows} activation rows is not a multiple of {self.rows_per_example} per example."
                )
            if "contrasim" in self.measures:
                # Split by example, so that rows sampled from one example never fall on both sides of the split.
                train, test = split_probe(num_rows // self.rows_per_example, self.held_out_fraction, self.seed)
                self._train_index = _example_rows(train, self.rows_per_example)
                self._test_index = _example_rows(test, self.rows_per_example)
            self.layers = layers
        elif layers != self.layers:
            raise ValueError(f"Capture at step {step} has layers {layers}, but earlier captures had {self.layers}.")
        if self.history_steps and step <= self.history_steps[-1]:
            raise ValueError(f"Capture steps must increase: got step {step} after step {self.history_steps[-1]}.")

        tensors = [activations[name].detach().float() for name in layers]
        current = _Snapshot(step, tensors, self._usable_layers(tensors))
        initial = self.initial or current
        timings: dict[str, float] = {}
        cross_layer: dict[str, np.ndarray] = {}
        vs_init: dict[str, np.ndarray] = {}
        vs_previous: dict[str, np.ndarray] = {}
        for measure in measures:
            start = time.perf_counter()
            compute = self._cka if measure == "cka" else self._contrasim
            cross_layer[measure], vs_init[measure], previous_values = compute(current, initial, self.previous)
            if previous_values is not None:
                vs_previous[measure] = previous_values
            timings[measure] = time.perf_counter() - start

        self.history_steps.append(step)
        for measure in self.measures:
            self.vs_init_history[measure].append(vs_init.get(measure, np.full(len(layers), np.nan)))
        result = CaptureResult(
            step=step,
            layers=layers,
            cross_layer=cross_layer,
            vs_init=vs_init,
            vs_previous=vs_previous,
            previous_step=None if self.previous is None else self.previous.step,
            history_steps=list(self.history_steps),
            vs_init_history={m: np.stack(self.vs_init_history[m], axis=1) for m in self.measures},
            unusable_layers=[name for name, ok in zip(layers, current.usable) if not ok],
            timings=timings,
        )
        if self.initial is None:
            self.initial = current
        self.previous = current
        return result

    def _usable_layers(self, tensors: list[torch.Tensor]) -> list[bool]:
        """Flag layers with finite, non-constant activations; report each other layer once.

        A constant layer (every probe example maps to the same vector) has no similarity structure: CKA is 0/0
        there, and a ContraSim head would only see one input. Its entries are NaN.
        """
        usable = []
        for name, tensor in zip(self.layers, tensors):
            finite = bool(torch.isfinite(tensor).all())
            constant = finite and bool((tensor == tensor[:1]).all())
            usable.append(finite and not constant)
            if usable[-1] or name in self._reported_unusable:
                continue
            self._reported_unusable.add(name)
            problem = "non-finite activations (NaN or inf)" if not finite else "the same activations for every example"
            logger.warning(
                "Layer %r has %s on the probe set; its similarities are logged as NaN. Reported once per layer.",
                name,
                problem,
            )
        return usable

    def _cka(self, current: _Snapshot, initial: _Snapshot, previous: _Snapshot | None):
        size = len(current.tensors)
        cross = np.full((size, size), np.nan)
        index = [i for i in range(size) if current.usable[i]]
        if index:
            matrix = linear_cka_matrix([current.tensors[i] for i in index])
            cross[np.ix_(index, index)] = matrix.cpu().numpy()

        def against(reference: _Snapshot) -> np.ndarray:
            values = np.full(size, np.nan)
            for i, ok in enumerate(current.comparable(reference)):
                if ok:
                    values[i] = float(linear_cka(current.tensors[i], reference.tensors[i]))
            return values

        return cross, against(initial), None if previous is None else against(previous)

    def _contrasim(self, current: _Snapshot, initial: _Snapshot, previous: _Snapshot | None):
        size = len(current.tensors)
        first_capture = current is initial
        previous_is_initial = previous is None or previous is initial

        # One batched fit for every head of this capture. Feature k is layer k % size of, in order, the current,
        # the initial and (when it differs from the initial) the previous capture.
        features = list(current.tensors) + list(initial.tensors)
        pairs: list[tuple[int, int]] = []
        slots: list[tuple[str, int, int]] = []
        for i in range(size):
            for j in range(i + 1, size):
                if current.usable[i] and current.usable[j]:
                    pairs.append((i, j))
                    slots.append(("cross", i, j))
        if not first_capture:
            for i, ok in enumerate(current.comparable(initial)):
                if ok:
                    pairs.append((i, size + i))
                    slots.append(("init", i, i))
        if not previous_is_initial:
            features += list(previous.tensors)
            for i, ok in enumerate(current.comparable(previous)):
                if ok:
                    pairs.append((i, 2 * size + i))
                    slots.append(("previous", i, i))

        scores: list[float] = []
        if pairs:
            start = time.perf_counter()
            scores = self._fit_heads(features, pairs).tolist()
            local_heads = _local_head_count(len(pairs))
            if local_heads:
                self.seconds_per_head = (time.perf_counter() - start) / local_heads

        cross = np.full((size, size), np.nan)
        vs_init = np.full(size, np.nan)
        vs_previous = np.full(size, np.nan)
        for i in range(size):
            if current.usable[i]:
                cross[i, i] = 1.0
                if first_capture:
                    vs_init[i] = 1.0  # the initial capture against itself
        for (kind, i, j), value in zip(slots, scores):
            if kind == "cross":
                cross[i, j] = cross[j, i] = value
            elif kind == "init":
                vs_init[i] = value
            else:
                vs_previous[i] = value
        if previous is None:
            return cross, vs_init, None
        if previous_is_initial:
            vs_previous = vs_init.copy()
        return cross, vs_init, vs_previous

    def _fit_heads(self, features: list[torch.Tensor], pairs: list[tuple[int, int]]) -> torch.Tensor:
        """Train and score the ContraSim heads of ``pairs``, split over the processes when there are several.

        Each process trains a contiguous share of the heads with the seeds those heads have in a single-process
        fit (``seed + head index``), and the scores are gathered in head order, so every process returns the
        same scores as one process would, up to float32 rounding.
        """
        config = self.contrasim_config
        rank, world_size = world()
        if world_size == 1 or len(pairs) < world_size:
            # With fewer heads than processes every process trains all of them, with the same seeds and results.
            return contrasim_pairs(features, pairs, self._train_index, self._test_index, config=config)
        start, stop = shard_bounds(len(pairs), rank, world_size)
        local = torch.empty(0, dtype=torch.float64)
        error: Exception | None = None
        if stop > start:
            share_config = dataclasses.replace(
                config, seed=config.seed + start, shuffle_seed=config.resolved_shuffle_seed
            )
            try:
                local = contrasim_pairs(
                    features, pairs[start:stop], self._train_index, self._test_index, config=share_config
                )
            except Exception as caught:  # joins the collective below, so that no process waits alone
                error = caught
        if not all_succeeded(error is None):
            raise error or RuntimeError("Training the ContraSim heads failed on another process.")
        device = features[0].device
        gathered = gather_rows({"scores": local.to(device).unsqueeze(1)}, len(pairs))["scores"]
        return gathered.squeeze(1).cpu()

    def estimate_contrasim_seconds(self) -> float | None:
        """Estimate the wall seconds of the next capture's ContraSim heads on this process; None if unknown.

        The estimate scales the cost per head of the last capture with heads to the number of heads the next
        capture trains (the layer x layer triangle and one head per layer against the initial and the previous
        capture), of which this process trains its share.
        """
        if "contrasim" not in self.measures or self.layers is None or self.seconds_per_head is None:
            return None
        size = len(self.layers)
        heads = size * (size - 1) // 2 + 2 * size
        return self.seconds_per_head * _local_head_count(heads)

    def calibrate_contrasim(self, activations: Mapping[str, torch.Tensor], epochs: int = 2) -> None:
        """Time the heads of a full capture for a few epochs on ``activations`` to set ``seconds_per_head``.

        It fits this process's share of the heads a full capture trains (the layer x layer triangle and two heads
        per layer), with every view taken from ``activations``, for ``epochs`` epochs, and scales the time to the
        configured epochs. The fixed cost of a fit is scaled too, so the estimate errs on the high side. Does
        nothing when ContraSim is not measured or fewer than two layers are finite.
        """
        if "contrasim" not in self.measures or self._train_index is None:
            return
        usable = [tensor.float() for tensor in activations.values() if bool(torch.isfinite(tensor).all())]
        size = len(usable)
        if size < 2:
            return
        pairs = [(i, j) for i in range(size) for j in range(i + 1, size)]
        pairs += [(i, size + i) for i in range(size)] + [(i, 2 * size + i) for i in range(size)]
        rank, world_size = world()
        start, stop = (0, len(pairs)) if len(pairs) < world_size else shard_bounds(len(pairs), rank, world_size)
        epochs = min(epochs, self.contrasim_config.epochs)
        config = dataclasses.replace(self.contrasim_config, epochs=epochs)
        started = time.perf_counter()
        contrasim_pairs(usable * 3, pairs[start:stop], self._train_index, self._test_index, config=config)
        seconds = time.perf_counter() - started
        self.seconds_per_head = seconds * self.contrasim_config.epochs / epochs / max(stop - start, 1)


def _local_head_count(num_heads: int) -> int:
    """Return how many of ``num_heads`` heads this process trains."""
    rank, world_size = world()
    if num_heads < world_size:
        return num_heads
    start, stop = shard_bounds(num_heads, rank, world_size)
    return stop - start
