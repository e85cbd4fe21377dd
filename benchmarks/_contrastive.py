"""ContraSim encoders for the benchmark protocols, where one encoder is shared by many representations.

The library's ``contrasim_pairs`` trains one encoder per pair of representations and returns only held-out scores.
The benchmark protocols need two things it does not offer. Layer prediction needs one encoder shared by every layer
of several models. The multilingual and image-caption protocols need the encodings themselves, so that thousands of
candidate groups can be scored without retraining. This module builds that encoder from the library's
``ContraSimConfig``, so the widths, temperature, learning rate and batch size default to the published values that
the library uses:

- The encoder is ``in_dim -> hidden_dims -> out_dim`` with ReLU between layers and L2-normalised output rows, with
  ``torch.nn.Linear``'s default initialisation. Inputs of different widths get their own input layer, and every layer
  after it is shared, as in the library.
- The loss is SupCon (Khosla et al. 2020) with temperature and base temperature equal, in its multi-view form:
  ``supcon_loss`` takes ``(views, samples, features)`` and treats the views of one sample as positives of each other.
  With two views of B examples this is the library's two-view loss. The layer-prediction variant of Rahamim and
  Belinkov's reference code makes each sample one layer index and each view one model. The features of a
  (model, layer) sample are then the encodings of a whole mini-batch of examples, flattened and divided by
  ``sqrt(batch)``. The cosine between two such samples is the mean cosine between the encodings of the same
  examples, which is the ContraSim score.
- Training uses Adam. It stops at ``StoppingRule.max_steps`` or, when a patience is set, once the mean training loss
  over windows of steps has stopped falling (see ``StoppingRule``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from contrasim_monitor.contrasim import ContraSimConfig

__all__ = [
    "SharedEncoder",
    "StoppingRule",
    "TrainingLog",
    "encode",
    "supcon_loss",
    "train_layer_encoder",
    "train_pair_encoder",
]

# Rows encoded at once by `encode`, which bounds the memory of scoring.
_ENCODE_CHUNK_ROWS = 8192


@dataclass(frozen=True)
class StoppingRule:
    """When encoder training stops.

    The mean training loss is taken over consecutive windows of ``check_every`` steps. With ``patience`` set,
    training stops after ``patience`` windows in a row whose mean loss is not at least ``min_decrease`` below the
    lowest window mean seen before them. The decrease is absolute, not relative, because a loss that falls towards 0
    (two views that the encoder has memorised) would otherwise keep improving by a constant fraction. Training always
    stops at ``max_steps``.

    Attributes:
        max_steps: Optimizer steps at most.
        check_every: Steps per loss window.
        patience: Windows without enough improvement before stopping; None trains for ``max_steps``.
        min_decrease: Decrease of the window mean loss that counts as an improvement.
    """

    max_steps: int
    check_every: int = 25
    patience: int | None = None
    min_decrease: float = 0.01

    def __post_init__(self) -> None:
        if self.max_steps < 1:
            raise ValueError(f"StoppingRule.max_steps must be at least 1, got {self.max_steps}")
        if self.check_every < 1:
            raise ValueError(f"StoppingRule.check_every must be at least 1, got {self.check_every}")
        if self.patience is not None and self.patience < 1:
            raise ValueError(f"StoppingRule.patience must be None or at least 1, got {self.patience}")
        if not self.min_decrease >= 0.0:
            raise ValueError(f"StoppingRule.min_decrease must be a number >= 0, got {self.min_decrease}")


@dataclass
class TrainingLog:
    """Record of one encoder's training.

    Attributes:
        steps: Optimizer steps taken.
        window_losses: Mean training loss of each complete window of ``check_every`` steps.
        plateaued: True when the plateau rule stopped training, False when ``max_steps`` did.
        fixed_length: True when the rule had no patience, so training ran for ``max_steps`` by design.
        seconds: Wall time of the training loop.
    """

    steps: int = 0
    window_losses: list[float] = field(default_factory=list)
    plateaued: bool = False
    fixed_length: bool = False
    seconds: float = 0.0

    def describe(self) -> str:
        """Return one line with the steps, the reason training stopped and the first and last window losses."""
        if self.plateaued:
            reason = "loss stopped falling"
        elif self.fixed_length:
            reason = "fixed number of steps"
        else:
            reason = "step limit reached, loss may still be falling"
        if self.window_losses:
            losses = f", window loss {self.window_losses[0]:.4f} -> {self.window_losses[-1]:.4f}"
        else:
            losses = ""
        return f"{self.steps} steps ({reason}{losses}, {self.seconds:.1f} s)"


class _PlateauTracker:
    """Apply a StoppingRule to a stream of per-step losses."""

    def __init__(self, rule: StoppingRule, log: TrainingLog) -> None:
        self.rule = rule
        self.log = log
        log.fixed_length = rule.patience is None
        self._window: list[float] = []
        self._best = math.inf
        self._stale_windows = 0

    def record(self, loss: float) -> bool:
        """Record one step's loss and return whether training should stop."""
        self.log.steps += 1
        self._window.append(loss)
        if len(self._window) == self.rule.check_every:
            mean = sum(self._window) / len(self._window)
            self._window.clear()
            self.log.window_losses.append(mean)
            if mean < self._best - self.rule.min_decrease:
                self._stale_windows = 0
            else:
                self._stale_windows += 1
            self._best = min(self._best, mean)
            if self.rule.patience is not None and self._stale_windows >= self.rule.patience:
                self.log.plateaued = True
                return True
        return self.log.steps >= self.rule.max_steps


class SharedEncoder(nn.Module):
    """The ContraSim encoder with one input layer per input width and every later layer shared.

    Args:
        input_dims: Widths of the representations that the encoder will see.
        config: Layer widths come from ``config.layer_dims``.
        seed: Seed of the initial weights.
    """

    def __init__(self, input_dims: Sequence[int], config: ContraSimConfig, seed: int) -> None:
        super().__init__()
        widths = config.layer_dims
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.inputs = nn.ModuleDict({str(dim): nn.Linear(dim, widths[0]) for dim in sorted(set(input_dims))})
            self.shared = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Encode ``(N, D)`` rows into ``(N, out_dim)`` unit vectors."""
        key = str(x.shape[-1])
        if key not in self.inputs:
            raise ValueError(f"This encoder has input layers for widths {sorted(self.inputs)}, got width {key}")
        hidden = self.inputs[key](x)
        for layer in self.shared:
            hidden = layer(torch.relu(hidden))
        return F.normalize(hidden, dim=-1)


def supcon_loss(features: torch.Tensor, temperature: float) -> torch.Tensor:
    """Compute the multi-view SupCon loss, with temperature and base temperature equal.

    Args:
        features: ``(V, S, F)`` unit-norm features: V views of S samples. The V - 1 other views of a sample are its
            positives, and all other ``V S - 1`` points are in the denominator.
        temperature: Softmax temperature.

    Returns:
        0-dim loss, the mean over all ``V S`` anchors of minus the mean log-probability of their positives.
    """
    num_views, num_samples, _ = features.shape
    if num_views < 2:
        raise ValueError(f"supcon_loss needs at least 2 views per sample, got {num_views}")
    points = features.reshape(num_views * num_samples, -1)
    logits = points @ points.T / temperature
    self_mask = torch.eye(len(points), dtype=torch.bool, device=points.device)
    logits = logits.masked_fill(self_mask, -math.inf)
    log_probabilities = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    sample_of_point = torch.arange(num_samples, device=points.device).repeat(num_views)
    positive_mask = (sample_of_point[:, None] == sample_of_point[None, :]) & ~self_mask
    positive_log_probabilities = log_probabilities.masked_fill(~positive_mask, 0.0).sum(dim=1)
    return -(positive_log_probabilities / (num_views - 1)).mean()


@torch.no_grad()
def encode(encoder: SharedEncoder, x: torch.Tensor) -> torch.Tensor:
    """Encode ``(N, D)`` rows in chunks, returning ``(N, out_dim)`` float32 unit vectors on the CPU."""
    device = next(encoder.parameters()).device
    chunks = [
        encoder(x[start : start + _ENCODE_CHUNK_ROWS].to(device=device, dtype=torch.float32)).cpu()
        for start in range(0, x.shape[0], _ENCODE_CHUNK_ROWS)
    ]
    return torch.cat(chunks)


def _epoch_batches(num_examples: int, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    """Shuffle the examples and split them into near-equal mini-batches of at most ``batch_size``."""
    order = torch.randperm(num_examples, generator=generator)
    return list(torch.tensor_split(order, math.ceil(num_examples / batch_size)))


def train_layer_encoder(
    representations: torch.Tensor,
    config: ContraSimConfig,
    rule: StoppingRule,
    weight_decay: float = 0.0,
    device: torch.device | str = "cpu",
) -> tuple[SharedEncoder, TrainingLog]:
    """Train one encoder on every layer of several models, the layer-prediction variant of ContraSim.

    Each step draws a mini-batch of examples and encodes them in every (model, layer). A (model, layer) is one
    sample whose features are its flattened mini-batch encodings, the same layer in the other models is its positive,
    and every other (model, layer) is a negative.

    Args:
        representations: ``(M, L, N, D)`` representations of the same N training examples in L layers of M >= 2
            models.
        config: Encoder widths, temperature, learning rate, batch size and seed.
        rule: When to stop.
        weight_decay: Adam's L2 penalty.
        device: Where to train.

    Returns:
        The trained encoder (in eval mode) and its training log.
    """
    num_models, num_layers, num_examples, width = representations.shape
    if num_models < 2:
        raise ValueError(f"train_layer_encoder needs at least 2 models, got {num_models}")
    if num_examples < 2:
        raise ValueError(f"train_layer_encoder needs at least 2 training examples, got {num_examples}")
    encoder = SharedEncoder([width], config, config.seed).to(device)
    optimizer = torch.optim.Adam(encoder.parameters(), lr=config.lr, weight_decay=weight_decay)
    generator = torch.Generator().manual_seed(config.resolved_shuffle_seed)
    log = TrainingLog()
    tracker = _PlateauTracker(rule, log)
    start = time.perf_counter()

    done = False
    while not done:
        for rows in _epoch_batches(num_examples, config.batch_size, generator):
            batch = representations[:, :, rows].to(device=device, dtype=torch.float32)
            encoded = encoder(batch.reshape(-1, width)).reshape(num_models, num_layers, -1)
            loss = supcon_loss(encoded / math.sqrt(len(rows)), config.temperature)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if tracker.record(loss.item()):
                done = True
                break
    log.seconds = time.perf_counter() - start
    return encoder.eval(), log


def train_pair_encoder(
    pairs: Sequence[tuple[torch.Tensor, torch.Tensor]],
    config: ContraSimConfig,
    rule: StoppingRule,
    device: torch.device | str = "cpu",
) -> tuple[SharedEncoder, TrainingLog]:
    """Train one two-view ContraSim encoder on one or more pairs of representations of the same examples.

    Each epoch shuffles the examples into mini-batches. For each mini-batch the pairs take one step each, in a random
    order, as the multilingual reference code does with the layers of a language pair.

    Args:
        pairs: ``(X, Y)`` pairs, ``X`` of shape ``(N, D_x)`` and ``Y`` of shape ``(N, D_y)``, all with the same N
            training examples in the same order. Row i of X and row i of Y are a positive pair.
        config: Encoder widths, temperature, learning rate, batch size and seed.
        rule: When to stop.
        device: Where to train.

    Returns:
        The trained encoder (in eval mode) and its training log.
    """
    if not pairs:
        raise ValueError("train_pair_encoder needs at least one pair of representations")
    num_examples = pairs[0][0].shape[0]
    for index, (x, y) in enumerate(pairs):
        if x.shape[0] != num_examples or y.shape[0] != num_examples:
            raise ValueError(
                f"pairs[{index}] has {x.shape[0]} and {y.shape[0]} examples, but pairs[0] has {num_examples}"
            )
    if num_examples < 2:
        raise ValueError(f"train_pair_encoder needs at least 2 training examples, got {num_examples}")
    widths = sorted({x.shape[1] for x, _ in pairs} | {y.shape[1] for _, y in pairs})
    encoder = SharedEncoder(widths, config, config.seed).to(device)
    optimizer = torch.optim.Adam(encoder.parameters(), lr=config.lr)
    generator = torch.Generator().manual_seed(config.resolved_shuffle_seed)
    log = TrainingLog()
    tracker = _PlateauTracker(rule, log)
    start = time.perf_counter()

    done = False
    while not done:
        for rows in _epoch_batches(num_examples, config.batch_size, generator):
            for pair_index in torch.randperm(len(pairs), generator=generator).tolist():
                x, y = pairs[pair_index]
                left = encoder(x[rows].to(device=device, dtype=torch.float32))
                right = encoder(y[rows].to(device=device, dtype=torch.float32))
                loss = supcon_loss(torch.stack([left, right]), config.temperature)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                if tracker.record(loss.item()):
                    done = True
                    break
            if done:
                break
    log.seconds = time.perf_counter() - start
    return encoder.eval(), log
