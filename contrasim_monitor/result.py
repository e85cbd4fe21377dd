"""The numbers one capture produces, handed to every sink."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

__all__ = ["CaptureResult"]


@dataclass
class CaptureResult:
    """Similarities computed at one capture.

    Attributes:
        step: Optimizer step the capture belongs to (0 for the initial model).
        layers: Layer names, in the order of every row and column below.
        cross_layer: Per measure, an ``(L, L)`` matrix of similarity between the layers at this step.
        vs_init: Per measure, an ``(L,)`` vector: each layer against the same layer of the initial capture.
        vs_previous: Per measure, an ``(L,)`` vector against the previous capture; empty at the first capture.
        previous_step: Step of the previous capture, or None at the first capture.
        history_steps: Steps of every capture so far, this one last.
        vs_init_history: Per measure, an ``(L, K)`` matrix: column k is ``vs_init`` at ``history_steps[k]``. The
            monitor keeps it in its newest result only.
        unusable_layers: Layers whose activations contained NaN or inf or were the same for every example;
            their entries are NaN.
        timings: Seconds spent in each phase of the capture.
        activations: Layer name to the gathered activations ``(N, D)``, for sinks that store them. The monitor
            drops them once every sink has written, so that its list of results stays small.
    """

    step: int
    layers: list[str]
    cross_layer: dict[str, np.ndarray]
    vs_init: dict[str, np.ndarray]
    vs_previous: dict[str, np.ndarray]
    previous_step: int | None
    history_steps: list[int]
    vs_init_history: dict[str, np.ndarray]
    unusable_layers: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    activations: dict[str, torch.Tensor] | None = field(default=None, repr=False)

    def to_record(self) -> dict:
        """Return a JSON-serialisable dict (NaN becomes None)."""

        def clean(array: np.ndarray):
            return [None if not np.isfinite(v) else float(v) for v in np.asarray(array).ravel()]

        def clean_matrix(matrix: np.ndarray):
            return [clean(row) for row in np.asarray(matrix)]

        return {
            "step": self.step,
            "layers": self.layers,
            "previous_step": self.previous_step,
            "cross_layer": {m: clean_matrix(v) for m, v in self.cross_layer.items()},
            "vs_init": {m: clean(v) for m, v in self.vs_init.items()},
            "vs_previous": {m: clean(v) for m, v in self.vs_previous.items()},
            "unusable_layers": self.unusable_layers,
            "timings": {k: round(v, 4) for k, v in self.timings.items()},
        }
