"""ContraSim: a similarity measure between two representations, learned with a contrastive objective.

Rahamim and Belinkov, "ContraSim -- Analyzing Neural Representations Based on Contrastive Learning", NAACL 2024.
An encoder maps both representations of the same examples into a shared unit sphere. It is trained with the
two-view, label-free supervised-contrastive (SupCon) loss: each example's two encodings are the positive pair, and
every other encoded example of the mini-batch, from either representation, is a negative. The score is the mean
cosine similarity between the two encodings of held-out examples, so a score on training examples is not a ContraSim
score.

Details that follow the authors' published code (``deep_sim.py``, ``models.py``, ``utils.py`` and
``multilingual_benchmark.py`` in the ContraSim repository of technion-cs-nlp):

- The encoder is ``Linear -> ReLU -> ... -> Linear`` with hidden widths (512, 256) and output width 128, followed by
  L2 normalisation of each output row. The inputs are not centred or scaled.
- Weights and biases start from ``torch.nn.Linear``'s default, uniform on ``[-1/sqrt(fan_in), 1/sqrt(fan_in)]``.
- The loss is SupCon with temperature 0.07 and base temperature 0.07: the mean over all 2B anchors of
  ``-log(exp(s_pos / T) / sum_{k != anchor} exp(s_k / T))``.
- The optimiser is Adam with learning rate 1e-4 and batches of 1024 examples. The multilingual benchmark's ContraSim
  training uses no weight decay and no schedule, and this module follows it. (The layer-prediction script adds
  ``weight_decay=5e-4`` and a step schedule.)

Where this module differs: the reference code splits the training set into fixed batches of ``batch_size`` and skips
the last, incomplete one, and it does not shuffle examples between epochs. Here, when the training set is larger than
``batch_size``, it is reshuffled every epoch and split into ``ceil(N_train / batch_size)`` mini-batches of near-equal
size, so that no example is dropped and no mini-batch is much smaller than the others.

``contrasim_pairs`` trains one encoder ("head") per pair of representations. Heads whose inputs have the same widths
have their weights stacked along a leading axis and train together through batched matrix products.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import operator
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["ContraSim", "ContraSimConfig", "contrasim_head_config", "contrasim_pairs"]

ENCODERS = ("mlp", "linear")

# Held-out examples encoded at once when scoring, which bounds the (heads, 2 * rows, width) activations.
_SCORE_CHUNK_ROWS = 4096

# Working set per thread of one stack of heads on the CPU; see _heads_per_chunk.
# NOTE: tuned on one 2-core Xeon (Sapphire Rapids) VM, where 2-head chunks of 2000-point batches trained 15 heads about
# 15% faster than one 15-head stack. Elsewhere it is a guess at a per-core share of the last-level cache.
_CPU_BYTES_PER_THREAD = 48 * 2**20

# Largest 1/T for which the loss exponentiates logits in [-1/T, 1/T] without a shift. Float32 exp() stays normal down to
# exp(-87) and finite up to exp(88), so a row sum of up to 1e20 terms of at most exp(40) stays finite.
_MAX_UNSHIFTED_LOGIT = 40.0


@dataclass(frozen=True)
class ContraSimConfig:
    """Hyperparameters of a ContraSim encoder and of its training; the defaults are the published values.

    Attributes:
        encoder: ``"mlp"`` for ``in_dim -> hidden_dims... -> out_dim`` with ReLU between layers, or ``"linear"`` for a
            single ``in_dim -> out_dim`` layer.
        hidden_dims: Widths of the hidden layers of the ``"mlp"`` encoder; ignored by ``"linear"``.
        out_dim: Width of the encoding, before L2 normalisation.
        temperature: Temperature of the contrastive loss.
        lr: Adam learning rate.
        batch_size: Maximum number of examples per mini-batch. A mini-batch of B examples gives 2B encoded points.
        epochs: Passes over the training examples.
        seed: Seed of the initial weights. In ``contrasim_pairs``, head ``h`` uses ``seed + h``.
        shuffle_seed: Seed of the per-epoch permutation of the training examples, used only when there are more
            training examples than ``batch_size``. None means ``seed``.
    """

    encoder: str = "mlp"
    hidden_dims: tuple[int, ...] = (512, 256)
    out_dim: int = 128
    temperature: float = 0.07
    lr: float = 1e-4
    batch_size: int = 1024
    epochs: int = 50
    seed: int = 0
    shuffle_seed: int | None = None

    def __post_init__(self) -> None:
        if self.encoder not in ENCODERS:
            raise ValueError(f"ContraSimConfig.encoder must be one of {ENCODERS}, got {self.encoder!r}")

        if isinstance(self.hidden_dims, list):
            object.__setattr__(self, "hidden_dims", tuple(self.hidden_dims))
        if not isinstance(self.hidden_dims, tuple) or not all(_is_positive_int(d) for d in self.hidden_dims):
            raise ValueError(f"ContraSimConfig.hidden_dims must be a tuple of positive ints, got {self.hidden_dims!r}")
        if self.encoder == "mlp" and not self.hidden_dims:
            raise ValueError(
                "ContraSimConfig.hidden_dims must contain at least one width when encoder='mlp', got (); "
                "use encoder='linear' for an encoder without hidden layers"
            )

        if not _is_positive_int(self.out_dim):
            raise ValueError(f"ContraSimConfig.out_dim must be a positive int, got {self.out_dim!r}")
        for name in ("temperature", "lr"):
            value = getattr(self, name)
            if not _is_real(value) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"ContraSimConfig.{name} must be a finite float > 0, got {value!r}")
        if not _is_int(self.batch_size) or self.batch_size < 2:
            raise ValueError(
                f"ContraSimConfig.batch_size must be an int >= 2 (the loss needs a negative), got {self.batch_size!r}"
            )
        if not _is_positive_int(self.epochs):
            raise ValueError(f"ContraSimConfig.epochs must be a positive int, got {self.epochs!r}")
        if not _is_int(self.seed) or self.seed < 0:
            raise ValueError(f"ContraSimConfig.seed must be an int >= 0, got {self.seed!r}")
        if self.shuffle_seed is not None and (not _is_int(self.shuffle_seed) or self.shuffle_seed < 0):
            raise ValueError(f"ContraSimConfig.shuffle_seed must be None or an int >= 0, got {self.shuffle_seed!r}")

    @property
    def layer_dims(self) -> tuple[int, ...]:
        """Output widths of the encoder's layers, input layer first."""
        if self.encoder == "linear":
            return (self.out_dim,)
        return (*self.hidden_dims, self.out_dim)

    @property
    def resolved_shuffle_seed(self) -> int:
        """Seed of the per-epoch permutation: ``shuffle_seed``, or ``seed`` when that is None."""
        return self.seed if self.shuffle_seed is None else self.shuffle_seed


def contrasim_head_config(config: ContraSimConfig, head_index: int) -> ContraSimConfig:
    """Return the config with which ``ContraSim`` alone reproduces head ``head_index`` of ``contrasim_pairs``.

    Head ``h`` (the position of its pair in ``pairs``) draws its initial weights with seed ``config.seed + h``, and
    all heads share the mini-batch permutation seeded by ``config.resolved_shuffle_seed``. Fitting
    ``ContraSim(contrasim_head_config(config, h))`` on the same training rows gives the same score as the batched fit,
    up to float32 rounding.
    """
    if not _is_int(head_index) or head_index < 0:
        raise ValueError(f"head_index must be an int >= 0, got {head_index!r}")
    return dataclasses.replace(config, seed=config.seed + head_index, shuffle_seed=config.resolved_shuffle_seed)


def contrasim_pairs(
    features: Sequence[torch.Tensor],
    pairs: Sequence[tuple[int, int]],
    train_index: torch.Tensor,
    test_index: torch.Tensor,
    config: ContraSimConfig | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Train one ContraSim encoder per pair of representations, all in one batched fit, and score each.

    Heads are grouped by the widths ``(D_a, D_b)`` of their two inputs. Each group's weights are stacked into
    ``(H, in, out)`` tensors and trained with batched matrix products, and one Adam optimiser updates all groups. All
    heads see the same mini-batches. Because Adam is elementwise and the heads' losses are summed, each head trains
    exactly as it would alone. On the CPU a large group is split into cache-sized chunks of heads (see
    ``_heads_per_chunk``), which changes speed only. A pair whose two inputs have the same width uses one input layer
    for both. Otherwise each side has its own input layer, and the layers after it are shared. A pair ``(i, i)``
    scores 1.0 without training. For the seeding rule see ``contrasim_head_config``.

    Args:
        features: Representations of the same N examples in the same order, each ``(N, D_i)``. Any floating dtype;
            computation is in float32. Features that no pair refers to are not read, so they may contain NaN.
        pairs: ``(a, b)`` indices into ``features``; ``a`` is encoded as the first view and ``b`` as the second.
        train_index: ``(N_train,)`` integer indices of the examples that train the encoders, N_train >= 2.
        test_index: ``(N_test,)`` integer indices of the held-out examples that are scored, disjoint from
            ``train_index``.
        config: Hyperparameters; the published values when None.
        device: Where to train. None means the device of ``features[0]``.

    Returns:
        ``(len(pairs),)`` float64 CPU tensor of held-out ContraSim scores, in the order of ``pairs``.

    Raises:
        ValueError: If an input has the wrong shape or dtype, or the features disagree on N. Also if an index is out
            of range or repeated, or the splits overlap or are too small. Also if a feature that a pair uses contains
            NaN or inf in the selected rows, so filter out non-finite layers before calling.
    """
    config = ContraSimConfig() if config is None else config
    if not isinstance(config, ContraSimConfig):
        raise TypeError(f"config must be a ContraSimConfig or None, got {type(config).__name__}")
    if isinstance(features, torch.Tensor) or len(features) == 0:
        raise ValueError("features must be a non-empty sequence of (N, D) tensors")
    for position, tensor in enumerate(features):
        _validate_matrix(tensor, f"features[{position}]")
    num_examples = features[0].shape[0]
    for position, tensor in enumerate(features):
        if tensor.shape[0] != num_examples:
            raise ValueError(
                f"All features must have the same number of examples: features[0] has {num_examples} rows "
                f"but features[{position}] has {tensor.shape[0]}"
            )
    pairs = _validate_pairs(pairs, len(features))
    train_index, test_index = _validate_split(train_index, test_index, num_examples)
    device = features[0].device if device is None else torch.device(device)

    scores = torch.ones(len(pairs), dtype=torch.float64)
    trained_heads = [h for h, (a, b) in enumerate(pairs) if a != b]
    used_features = sorted({i for h in trained_heads for i in pairs[h]})
    # Diagonal pairs skip training but must still refer to finite features.
    diagonal_only = sorted({i for pair in pairs for i in pair} - set(used_features))
    _stack_by_width(features, diagonal_only, torch.cat([train_index, test_index]), torch.device("cpu"))
    if not trained_heads:
        return scores

    train_stacks, slots = _stack_by_width(features, used_features, train_index, device)
    test_stacks, _ = _stack_by_width(features, used_features, test_index, device)

    by_widths: dict[tuple[int, int], list[int]] = {}
    for h in trained_heads:
        a, b = pairs[h]
        by_widths.setdefault((features[a].shape[1], features[b].shape[1]), []).append(h)
    batch_rows = math.ceil(len(train_index) / math.ceil(len(train_index) / config.batch_size))
    chunks: list[list[int]] = []
    head_groups: list[_HeadGroup] = []
    for (left_dim, right_dim), heads in by_widths.items():
        chunk_size = _heads_per_chunk(batch_rows, left_dim, right_dim, config, device, len(heads))
        for start in range(0, len(heads), chunk_size):
            chunk = heads[start : start + chunk_size]
            chunks.append(chunk)
            head_groups.append(
                _HeadGroup(
                    left_dim=left_dim,
                    right_dim=right_dim,
                    left_slots=[slots[pairs[h][0]] for h in chunk],
                    right_slots=[slots[pairs[h][1]] for h in chunk],
                    seeds=[config.seed + h for h in chunk],
                    config=config,
                    device=device,
                )
            )

    _train(head_groups, train_stacks, config)
    for chunk, group in zip(chunks, head_groups, strict=True):
        scores[chunk] = group.score(test_stacks).cpu()
    return scores


class ContraSim:
    """ContraSim for one pair of representations, with a scikit-learn-like ``fit`` / ``score`` interface.

    Example::

        measure = ContraSim(epochs=30).fit(x[train], y[train])
        similarity = measure.score(x[test], y[test])

    Args:
        config: Hyperparameters; the published values when None.
        device: Where to train. None means the device of ``x`` passed to ``fit``.
        **overrides: ``ContraSimConfig`` fields that replace those of ``config``, for example ``epochs=30``.
    """

    def __init__(
        self, config: ContraSimConfig | None = None, device: torch.device | str | None = None, **overrides: object
    ) -> None:
        config = ContraSimConfig() if config is None else config
        if not isinstance(config, ContraSimConfig):
            raise TypeError(f"config must be a ContraSimConfig or None, got {type(config).__name__}")
        field_names = {field.name for field in dataclasses.fields(ContraSimConfig)}
        unknown = sorted(set(overrides) - field_names)
        if unknown:
            raise TypeError(f"Unknown ContraSimConfig field(s) {unknown}; valid fields are {sorted(field_names)}")
        self.config = dataclasses.replace(config, **overrides)
        self.device = None if device is None else torch.device(device)
        self._group: _HeadGroup | None = None

    def fit(self, x: torch.Tensor, y: torch.Tensor) -> ContraSim:
        """Train the encoder on paired training examples.

        Args:
            x: ``(N, Dx)`` first representation of the training examples, N >= 2.
            y: ``(N, Dy)`` second representation of the same examples in the same order.

        Returns:
            self, fitted.

        Raises:
            ValueError: If the inputs are not 2-D floating tensors with the same N >= 2, or contain NaN or inf.
        """
        _validate_matrix(x, "x")
        _validate_matrix(y, "y")
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"x and y must have the same number of examples, got {x.shape[0]} and {y.shape[0]}")
        if x.shape[0] < 2:
            raise ValueError(f"fit needs at least 2 examples because the loss needs a negative, got {x.shape[0]}")
        device = x.device if self.device is None else self.device
        rows = torch.arange(x.shape[0])
        stacks, slots = _stack_by_width([x, y], [0, 1], rows, device)
        group = _HeadGroup(
            left_dim=x.shape[1],
            right_dim=y.shape[1],
            left_slots=[slots[0]],
            right_slots=[slots[1]],
            seeds=[self.config.seed],
            config=self.config,
            device=device,
        )
        _train([group], stacks, self.config)
        self._group = group
        return self

    def score(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """Return the mean cosine similarity of the encoded views of held-out examples.

        Args:
            x: ``(N, Dx)`` first representation of held-out examples, with the width seen by ``fit``.
            y: ``(N, Dy)`` second representation of the same examples.

        Raises:
            RuntimeError: If ``fit`` has not been called.
            ValueError: If the inputs are invalid or their widths differ from those seen by ``fit``.
        """
        group = self._group
        if group is None:
            raise RuntimeError("This ContraSim instance is not fitted; call fit(x_train, y_train) before score()")
        _validate_matrix(x, "x")
        _validate_matrix(y, "y")
        if (x.shape[1], y.shape[1]) != (group.left_dim, group.right_dim):
            raise ValueError(
                f"score got widths ({x.shape[1]}, {y.shape[1]}) but fit saw ({group.left_dim}, {group.right_dim})"
            )
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"x and y must have the same number of examples, got {x.shape[0]} and {y.shape[0]}")
        rows = torch.arange(x.shape[0])
        stacks, _ = _stack_by_width([x, y], [0, 1], rows, group.device)
        return float(group.score(stacks)[0])


class _HeadGroup:
    """H ContraSim encoders whose inputs have the same widths, with weights stacked along a leading head axis.

    Inputs come from per-width stacks ``(F, N, D)`` of representations. Head ``h`` reads slot ``left_slots[h]`` of
    the ``left_dim`` stack as its first view, and slot ``right_slots[h]`` of the ``right_dim`` stack as its second.
    """

    def __init__(
        self,
        left_dim: int,
        right_dim: int,
        left_slots: list[int],
        right_slots: list[int],
        seeds: list[int],
        config: ContraSimConfig,
        device: torch.device,
    ) -> None:
        self.left_dim = left_dim
        self.right_dim = right_dim
        self.device = device
        self.temperature = config.temperature
        self.left_slots = torch.tensor(left_slots, dtype=torch.long, device=device)
        self.right_slots = torch.tensor(right_slots, dtype=torch.long, device=device)
        self.shared_input = left_dim == right_dim
        # Flat (H * M * M,) storage for the loss's exponentials, reused every step and grown when M grows.
        self._exponentials: torch.Tensor | None = None

        # Draw each head's weights on the CPU from its own generator, so a head's initial weights depend only on its
        # seed, not on the device or on the other heads in the group.
        per_head = [_init_head_weights(left_dim, right_dim, config.layer_dims, seed) for seed in seeds]
        stacked = [torch.stack(tensors).to(device).requires_grad_() for tensors in zip(*per_head, strict=True)]
        self.weights = stacked[0::2]
        self.biases = stacked[1::2]

    def parameters(self) -> list[torch.Tensor]:
        return self.weights + self.biases

    def release_buffers(self) -> None:
        """Free the training-only buffer, which is the largest allocation of a fit."""
        self._exponentials = None

    def encode(self, stacks: dict[int, torch.Tensor], rows: torch.Tensor | None) -> torch.Tensor:
        """Encode both views of the given rows.

        Args:
            stacks: Per-width ``(F, N, D)`` float32 stacks of representations.
            rows: ``(B,)`` row indices into the stacks, or None for all N rows.

        Returns:
            ``(H, 2B, out_dim)`` unit-norm encodings: rows ``[:B]`` are the first view, ``[B:]`` the second.
        """
        if self.shared_input:
            # Both views go through the same input layer, so gather them as one (H, 2B, D) batch.
            slots = torch.stack([self.left_slots, self.right_slots], dim=1).view(-1)
            views = _gather(stacks[self.left_dim], slots, rows)
            views = views.view(len(self.left_slots), -1, self.left_dim)
            hidden = torch.bmm(views, self.weights[0]).add_(self.biases[0])
            first_shared_layer = 1
        else:
            left = _gather(stacks[self.left_dim], self.left_slots, rows)
            right = _gather(stacks[self.right_dim], self.right_slots, rows)
            hidden = torch.cat(
                [
                    torch.bmm(left, self.weights[0]).add_(self.biases[0]),
                    torch.bmm(right, self.weights[1]).add_(self.biases[1]),
                ],
                dim=1,
            )
            first_shared_layer = 2
        for weight, bias in zip(self.weights[first_shared_layer:], self.biases[first_shared_layer:], strict=True):
            hidden = torch.bmm(torch.relu_(hidden), weight).add_(bias)
        return F.normalize(hidden, dim=-1)

    def loss(self, stacks: dict[int, torch.Tensor], rows: torch.Tensor | None) -> torch.Tensor:
        """Return the ``(H,)`` SupCon losses of the heads on one mini-batch."""
        encoded = self.encode(stacks, rows)
        batch = encoded.shape[1] // 2
        inverse_temperature = 1.0 / self.temperature
        needed = encoded.shape[0] * encoded.shape[1] ** 2
        if self._exponentials is None or self._exponentials.numel() < needed:
            self._exponentials = encoded.new_empty(needed)
        log_denominator = _OffDiagonalLogSumExp.apply(encoded, inverse_temperature, self._exponentials)  # (H, 2B)
        positive_logit = (encoded[:, :batch] * encoded[:, batch:]).sum(dim=-1) * inverse_temperature  # (H, B)
        # Each positive logit belongs to two anchors, one per view, so its mean over B equals its mean over 2B anchors.
        return log_denominator.mean(dim=1) - positive_logit.mean(dim=1)

    @torch.no_grad()
    def score(self, stacks: dict[int, torch.Tensor]) -> torch.Tensor:
        """Return the ``(H,)`` float64 mean cosine similarities of the two encoded views over all rows of `stacks`."""
        num_rows = stacks[self.left_dim].shape[1]
        total = torch.zeros(len(self.left_slots), dtype=torch.float64, device=self.device)
        for start in range(0, num_rows, _SCORE_CHUNK_ROWS):
            rows = torch.arange(start, min(start + _SCORE_CHUNK_ROWS, num_rows), device=self.device)
            encoded = self.encode(stacks, rows)
            batch = rows.numel()
            total += (encoded[:, :batch] * encoded[:, batch:]).sum(dim=-1).sum(dim=1, dtype=torch.float64)
        # Unit vectors in float32 can give a cosine a few 1e-9 above 1; a similarity stays within [-1, 1].
        return (total / num_rows).clamp(-1.0, 1.0)


class _OffDiagonalLogSumExp(torch.autograd.Function):
    """``log sum_{k != i} exp(z_i . z_k / T)`` for every row i of every head, with a memory-lean backward.

    Input ``z`` is ``(H, M, d)`` with unit-norm rows and the output is ``(H, M)``. Autograd through the plain
    expression would allocate several ``(H, M, M)`` intermediates per step. This writes the one matrix it keeps, the
    exponentials ``P``, into a caller-owned buffer that is reused every step. While ``P`` is symmetric, the gradient
    ``(1/T) (diag(w) P z + P diag(w) z)``, with ``w = grad / rowsum(P)``, is one batched product ``P @ [z, w * z]``.
    """

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx, z: torch.Tensor, inverse_temperature: float, buffer: torch.Tensor
    ) -> torch.Tensor:
        heads, rows, _ = z.shape
        exponentials = buffer[: heads * rows * rows].view(heads, rows, rows)
        ctx.inverse_temperature = inverse_temperature
        if inverse_temperature <= _MAX_UNSHIFTED_LOGIT:
            # Logits lie in [-1/T, 1/T], so exp() needs no shift to stay finite and normal in float32.
            torch.bmm(z * inverse_temperature, z.transpose(1, 2), out=exponentials).exp_()
            exponentials.diagonal(dim1=1, dim2=2).zero_()
            row_sums = exponentials.sum(dim=2)
            ctx.save_for_backward(z, exponentials, row_sums)
            ctx.symmetric = True
            return row_sums.log()

        # At small temperatures exp() of an unshifted logit can overflow or underflow, so shift each row by its own
        # maximum. P is then not symmetric, and the backward pass needs two products.
        logits = torch.bmm(z * inverse_temperature, z.transpose(1, 2), out=exponentials)
        logits.diagonal(dim1=1, dim2=2).fill_(-math.inf)
        row_max = logits.amax(dim=2, keepdim=True)
        logits.sub_(row_max).exp_()
        row_sums = exponentials.sum(dim=2)
        ctx.save_for_backward(z, exponentials, row_sums)
        ctx.symmetric = False
        return row_sums.log() + row_max.squeeze(2)

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad_output: torch.Tensor
    ) -> tuple[torch.Tensor, None, None]:
        z, exponentials, row_sums = ctx.saved_tensors
        weights = (grad_output / row_sums).unsqueeze(2)  # (H, M, 1)
        if ctx.symmetric:
            products = torch.bmm(exponentials, torch.cat([z, weights * z], dim=2))  # (H, M, 2d)
            dim = z.shape[2]
            grad_z = products[:, :, :dim].mul(weights).add_(products[:, :, dim:])
        else:
            softmax_grad = exponentials * weights  # row i scaled by grad_i / rowsum_i
            grad_z = torch.baddbmm(torch.bmm(softmax_grad, z), softmax_grad.transpose(1, 2), z)
        return grad_z.mul_(ctx.inverse_temperature), None, None


def _heads_per_chunk(
    batch_rows: int, left_dim: int, right_dim: int, config: ContraSimConfig, device: torch.device, num_heads: int
) -> int:
    """Choose how many heads of one width group to stack into each batched forward and backward pass.

    On CUDA all heads go into one stack. On the CPU, ``torch.bmm`` gives each thread whole matrices, and a stack whose
    ``(H, M, M)`` logits and ``(H, M, width)`` activations outgrow the cache makes every element-wise pass stream from
    memory. So each thread gets as many heads as fit in ``_CPU_BYTES_PER_THREAD``, and the chunk is a multiple of the
    thread count. A head too large for that budget goes alone, and the BLAS library splits its products across
    threads. Every head trains exactly as it would alone, so the chunking changes speed only.
    """
    if device.type != "cpu":
        return num_heads
    points = 2 * batch_rows
    bytes_per_head = 4 * points * (points + left_dim + right_dim + 3 * sum(config.layer_dims))
    heads_per_thread = _CPU_BYTES_PER_THREAD // bytes_per_head
    if heads_per_thread == 0:
        return 1
    return min(heads_per_thread * torch.get_num_threads(), num_heads)


def _train(groups: list[_HeadGroup], stacks: dict[int, torch.Tensor], config: ContraSimConfig) -> None:
    """Train every head of every group together on the same mini-batches."""
    parameters = [parameter for group in groups for parameter in group.parameters()]
    optimizer = _make_adam(parameters, config.lr)
    num_train = next(iter(stacks.values())).shape[1]
    device = parameters[0].device
    shuffle_generator = torch.Generator().manual_seed(config.resolved_shuffle_seed)
    num_batches = math.ceil(num_train / config.batch_size)

    for _ in range(config.epochs):
        if num_batches == 1:
            batches: Sequence[torch.Tensor | None] = [None]
        else:
            order = torch.randperm(num_train, generator=shuffle_generator).to(device)
            batches = torch.tensor_split(order, num_batches)
        for rows in batches:
            optimizer.zero_grad(set_to_none=True)
            # One backward per group frees that group's activations before the next group's forward pass. The
            # gradients are the same as those of the summed loss because no parameter is shared between groups.
            for group in groups:
                group.loss(stacks, rows).sum().backward()
            optimizer.step()
    for group in groups:
        group.release_buffers()


def _make_adam(parameters: list[torch.Tensor], lr: float) -> torch.optim.Adam:
    """Create Adam with the fused kernel, which updates each parameter in one pass, where this torch supports it.

    torch added the fused kernel for CPU tensors in 2.4 and raises a RuntimeError at construction on older versions,
    so the foreach implementation, which computes the same update up to float rounding, is the fallback.
    """
    try:
        return torch.optim.Adam(parameters, lr=lr, fused=True)
    except RuntimeError:
        return torch.optim.Adam(parameters, lr=lr, foreach=True)


def _init_head_weights(left_dim: int, right_dim: int, layer_dims: tuple[int, ...], seed: int) -> list[torch.Tensor]:
    """Draw one head's weights as ``[W, b, W, b, ...]`` with ``torch.nn.Linear``'s default distribution.

    The input layer comes first, then a second input layer for the second view when ``right_dim != left_dim``, then
    the shared layers. Weights are ``(in, out)`` and biases ``(1, out)``.
    """
    generator = torch.Generator().manual_seed(seed)
    shapes = [(left_dim, layer_dims[0])]
    if right_dim != left_dim:
        shapes.append((right_dim, layer_dims[0]))
    shapes += list(zip(layer_dims[:-1], layer_dims[1:], strict=False))
    tensors = []
    for fan_in, fan_out in shapes:
        bound = 1.0 / math.sqrt(fan_in)
        tensors.append(torch.empty(fan_in, fan_out).uniform_(-bound, bound, generator=generator))
        tensors.append(torch.empty(1, fan_out).uniform_(-bound, bound, generator=generator))
    return tensors


def _gather(stack: torch.Tensor, slots: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    """Select ``(S, B, D)`` inputs: representation ``slots[s]`` at ``rows`` for each s."""
    if rows is None:
        return stack.index_select(0, slots)
    num_rows, width = stack.shape[1], stack.shape[2]
    # One index_select over flattened (slot, row) positions copies whole rows, faster than 2-D advanced indexing.
    flat_positions = (slots.unsqueeze(1) * num_rows + rows.unsqueeze(0)).view(-1)
    return stack.view(-1, width).index_select(0, flat_positions).view(len(slots), len(rows), width)


def _stack_by_width(
    features: Sequence[torch.Tensor], used: Sequence[int], rows: torch.Tensor, device: torch.device
) -> tuple[dict[int, torch.Tensor], dict[int, int]]:
    """Copy the selected rows of the used features to `device` as float32, one ``(F, len(rows), D)`` stack per width.

    Returns:
        The stacks keyed by width, and each used feature's slot in the stack of its width.

    Raises:
        ValueError: If a selected row of a used feature contains NaN or inf.
    """
    by_width: dict[int, list[int]] = {}
    for i in used:
        by_width.setdefault(features[i].shape[1], []).append(i)
    stacks = {}
    slots = {}
    for width, members in by_width.items():
        selected = []
        for slot, i in enumerate(members):
            tensor = features[i].detach()
            part = tensor.index_select(0, rows.to(tensor.device)).to(device=device, dtype=torch.float32)
            _check_finite(part, f"features[{i}]")
            selected.append(part)
            slots[i] = slot
        stacks[width] = torch.stack(selected)
    return stacks, slots


def _check_finite(tensor: torch.Tensor, name: str) -> None:
    if not bool(torch.isfinite(tensor).all()):
        raise ValueError(
            f"{name} contains NaN or inf values (after conversion to float32, in the selected rows); "
            "ContraSim cannot train on it, so leave that representation out of `pairs`"
        )


def _validate_matrix(tensor: object, name: str) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.ndim != 2:
        raise ValueError(
            f"{name} must be a 2-D (examples, features) tensor, got shape {tuple(tensor.shape)}; "
            "flatten or pool the other dimensions first"
        )
    if tensor.shape[0] == 0 or tensor.shape[1] == 0:
        raise ValueError(f"{name} must have at least one example and one feature, got shape {tuple(tensor.shape)}")
    if not tensor.is_floating_point():
        raise ValueError(f"{name} must have a floating dtype, got {tensor.dtype}")


def _validate_pairs(pairs: Sequence[tuple[int, int]], num_features: int) -> list[tuple[int, int]]:
    validated = []
    for position, pair in enumerate(pairs):
        try:
            a, b = (operator.index(i) for i in pair)
        except (TypeError, ValueError) as error:
            raise ValueError(f"pairs[{position}] must be a pair of ints, got {pair!r}") from error
        for i in (a, b):
            if not 0 <= i < num_features:
                raise ValueError(
                    f"pairs[{position}] = {pair!r} refers to features[{i}], but there are {num_features} features"
                )
        validated.append((a, b))
    return validated


def _validate_split(
    train_index: torch.Tensor, test_index: torch.Tensor, num_examples: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Check the training and held-out indices and return them as CPU long tensors."""
    checked = []
    for name, index, minimum in (("train_index", train_index, 2), ("test_index", test_index, 1)):
        if not isinstance(index, torch.Tensor):
            raise ValueError(f"{name} must be a 1-D integer torch.Tensor, got {type(index).__name__}")
        if index.ndim != 1 or index.dtype == torch.bool or index.is_floating_point() or index.is_complex():
            raise ValueError(f"{name} must be a 1-D integer tensor, got shape {tuple(index.shape)} and {index.dtype}")
        if index.numel() < minimum:
            raise ValueError(f"{name} must contain at least {minimum} example(s), got {index.numel()}")
        index = index.detach().to(device="cpu", dtype=torch.long)
        if int(index.min()) < 0 or int(index.max()) >= num_examples:
            raise ValueError(
                f"{name} must lie in [0, {num_examples}), got values from {int(index.min())} to {int(index.max())}"
            )
        if index.unique().numel() != index.numel():
            raise ValueError(f"{name} contains repeated examples; each example may appear once")
        checked.append(index)
    overlap = torch.isin(checked[0], checked[1])
    if bool(overlap.any()):
        raise ValueError(
            f"train_index and test_index share {int(overlap.sum())} example(s), for example "
            f"{int(checked[0][overlap][0])}; ContraSim scores must come from held-out examples"
        )
    return checked[0], checked[1]


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_positive_int(value: object) -> bool:
    return _is_int(value) and value > 0


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)
