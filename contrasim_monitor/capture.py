"""Capture pooled layer activations with forward hooks.

Hooks exist only for the duration of one capture: they are registered when a capture starts and removed in a
``finally`` block, so no handle stays on the model between captures, after training, or after an exception.
"""

from __future__ import annotations

import contextlib
import difflib
import fnmatch
import inspect
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)

__all__ = [
    "EMBEDDINGS",
    "POOLING_METHODS",
    "CaptureError",
    "LayerSpec",
    "capture_activations",
    "pool_tokens",
    "resolve_layers",
    "sample_positions",
    "unwrap_model",
]

#: Name of the pseudo-layer "input of the first transformer block", which is the embeddings output.
EMBEDDINGS = "embeddings"
POOLING_METHODS = ("mean", "first", "last", "sample")


class CaptureError(RuntimeError):
    """A capture collected no activations, or more than one per module and forward pass."""


@dataclass(frozen=True)
class LayerSpec:
    """A hooked layer: the name used in logs, the module, and whether its input or output is captured."""

    name: str
    module: nn.Module
    capture_input: bool = False


def unwrap_model(model: nn.Module, keep_fsdp: bool = False) -> nn.Module:
    """Return the user's module inside DDP, DataParallel, FSDP or ``torch.compile`` wrappers.

    With ``keep_fsdp``, unwrapping stops at an FSDP (version 1) wrapper, which must stay for a forward pass.
    """
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        if hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):  # torch.compile
            model = model._orig_mod
        elif _is_parallel_wrapper(model) and not (keep_fsdp and type(model).__name__ == "FullyShardedDataParallel"):
            model = model.module
    return model


def has_sharded_parameters(model: nn.Module) -> bool:
    """Return True if FSDP shards the model's parameters, so that every forward pass is a collective call.

    Both FSDP versions are matched by class name (``FullyShardedDataParallel`` wrappers, and modules that
    ``fully_shard`` turned into ``FSDPModule`` subclasses), so that torch.distributed.fsdp is not imported where
    it is unused.
    """
    for module in model.modules():
        class_names = {cls.__name__ for cls in type(module).__mro__}
        if "FullyShardedDataParallel" in class_names or "FSDPModule" in class_names:
            return True
    return False


def forward_module(model: nn.Module) -> nn.Module:
    """Return the module to run the probe through: the user's module, but an FSDP (version 1) wrapper stays.

    DDP, DataParallel and ``torch.compile`` wrappers are removed, so that no wrapper synchronises buffers or
    compiles for the probe. The FSDP wrapper gathers the sharded parameters in its forward pass, without which
    the module inside has none.
    """
    return unwrap_model(model, keep_fsdp=True)


def _is_parallel_wrapper(model: nn.Module) -> bool:
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        return True
    # FSDP (version 1) is matched by name so that torch.distributed.fsdp is not imported where it is unused.
    return type(model).__name__ == "FullyShardedDataParallel" and isinstance(getattr(model, "module", None), nn.Module)


def _find_block_list(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """Find the transformer blocks: the longest ModuleList of same-class children that have parameters."""
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) < 2:
            continue
        classes = {type(child) for child in module}
        if len(classes) != 1 or not any(True for _ in module[0].parameters()):
            continue
        if best is None or len(module) > len(best[1]):
            best = (name, module)
    return best


def resolve_layers(model: nn.Module, layers: Sequence[str] | None = None) -> list[LayerSpec]:
    """Resolve layer names and glob patterns to modules, or choose the transformer blocks automatically.

    Args:
        model: The model, possibly wrapped (wrappers are removed first).
        layers: Module names as in ``model.named_modules()`` or glob patterns such as ``"bert.encoder.layer.*"``
            (see :func:`match_module_name`). The name ``"embeddings"`` selects the input of the first transformer
            block. ``None`` selects ``"embeddings"`` followed by every transformer block.

    Returns:
        The layers in model order (automatic choice) or in the order the patterns were given.

    Raises:
        ValueError: If a name or pattern matches no module, or no transformer blocks are found for the
            automatic choice.
    """
    model = unwrap_model(model)
    blocks = _find_block_list(model)

    if layers is None:
        if blocks is None:
            raise ValueError(
                f"Could not choose layers automatically: {type(model).__name__} has no nn.ModuleList of "
                "repeated blocks. Pass `layers=` with module names or glob patterns, for example "
                f"{_example_names(model)}."
            )
        prefix, block_list = blocks
        specs = [LayerSpec(EMBEDDINGS, block_list[0], capture_input=True)]
        specs += [LayerSpec(f"{prefix}.{i}", block) for i, block in enumerate(block_list)]
        return specs

    if isinstance(layers, str):
        layers = [layers]
    if len(layers) == 0:
        raise ValueError(
            "`layers` is empty: pass at least one module name or pattern, or None to choose automatically."
        )

    named = dict(model.named_modules())
    named.pop("", None)
    specs: list[LayerSpec] = []
    selected_names: set[str] = set()
    for pattern in layers:
        if not isinstance(pattern, str):
            raise TypeError(f"`layers` must contain module names as strings, got {type(pattern).__name__} {pattern!r}.")
        if pattern == EMBEDDINGS and EMBEDDINGS not in named:
            if blocks is None:
                raise ValueError(
                    f"Layer {EMBEDDINGS!r} means the input of the first transformer block, but "
                    f"{type(model).__name__} has no list of repeated blocks."
                )
            matches = [EMBEDDINGS]
        else:
            matches = [name for name in named if match_module_name(pattern, name)]
        if not matches:
            close = difflib.get_close_matches(pattern, list(named), n=5, cutoff=0.5)
            hint = f" Close matches: {close}." if close else f" Some module names: {_example_names(model)}."
            raise ValueError(f"Layer name or pattern {pattern!r} matches no module of {type(model).__name__}.{hint}")
        for name in matches:
            if name in selected_names:
                continue
            selected_names.add(name)
            if name == EMBEDDINGS and EMBEDDINGS not in named:
                specs.append(LayerSpec(EMBEDDINGS, blocks[1][0], capture_input=True))
            else:
                specs.append(LayerSpec(name, named[name]))
    return specs


def match_module_name(pattern: str, name: str) -> bool:
    """Match a dotted module name against a glob pattern, one dotted part at a time.

    ``*``, ``?`` and ``[...]`` match within one part, as in ``fnmatch``. So ``encoder.layer.*`` matches
    ``encoder.layer.3`` but not ``encoder.layer.3.attention``. A part that is exactly ``**`` matches any number
    of parts, including none.
    """
    return _match_parts(pattern.split("."), name.split("."))


def _match_parts(pattern: list[str], name: list[str]) -> bool:
    if not pattern:
        return not name
    if pattern[0] == "**":
        return any(_match_parts(pattern[1:], name[start:]) for start in range(len(name) + 1))
    return bool(name) and fnmatch.fnmatchcase(name[0], pattern[0]) and _match_parts(pattern[1:], name[1:])


def _example_names(model: nn.Module, limit: int = 6) -> list[str]:
    names = [name for name, _ in model.named_modules() if name]
    step = max(1, len(names) // limit)
    return names[::step][:limit]


def _first_tensor(output: Any) -> torch.Tensor:
    """Take the hidden states from a module's output: a tensor, a tuple (element 0) or a ModelOutput."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping):  # transformers' ModelOutput is an OrderedDict
        for value in output.values():
            if isinstance(value, torch.Tensor):
                return value
        raise CaptureError(f"Module output of type {type(output).__name__} contains no tensor.")
    if isinstance(output, (tuple, list)) and output:
        return _first_tensor(output[0])
    raise CaptureError(f"Cannot take activations from a module output of type {type(output).__name__}.")


def _unpack_nested(hidden: torch.Tensor, attention_mask: torch.Tensor | None, name: str) -> torch.Tensor:
    """Scatter a nested tensor of non-padding tokens back to ``(examples, tokens, width)``, zeros at padding.

    In eval mode under no_grad, ``nn.TransformerEncoder`` (with ``enable_nested_tensor=True``, its default) packs
    the non-padding tokens of each example into a nested tensor and passes that between its layers. Its
    components hold the tokens where the padding mask is False, in order, which are the positions where
    ``attention_mask`` is 1 when the model derives its padding mask from it.
    """
    parts = hidden.unbind()
    if attention_mask is None:
        raise CaptureError(
            f"Layer {name!r} output a nested tensor, but the probe batch has no attention_mask to place its tokens."
        )
    valid = attention_mask.bool()
    lengths = valid.sum(dim=1).tolist()
    if len(parts) != valid.shape[0] or [part.shape[0] for part in parts] != lengths:
        raise CaptureError(
            f"Layer {name!r} output a nested tensor with token counts {[part.shape[0] for part in parts]}, but the "
            f"probe batch's attention_mask has {lengths} non-padding tokens per example."
        )
    dense = torch.zeros(*valid.shape, parts[0].shape[-1], dtype=parts[0].dtype, device=parts[0].device)
    dense[valid.to(dense.device)] = torch.cat(parts)
    return dense


def pool_tokens(
    hidden: torch.Tensor,
    attention_mask: torch.Tensor | None,
    method: str = "mean",
    positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pool token activations to vectors, in float32.

    Args:
        hidden: Activations of shape ``(N, T, D)``, or ``(N, D)`` which is returned as it is (in float32).
        attention_mask: ``(N, T)`` with 1 for real tokens and 0 for padding, or None when there is no padding.
        method: ``"mean"`` over non-padding tokens, ``"first"`` or ``"last"`` non-padding token (both work for
            left and right padding), or ``"sample"``: the token positions given in ``positions``.
        positions: ``(N, K)`` token indices for ``"sample"``, from :func:`sample_positions`.

    Returns:
        ``(N, D)``, or ``(N * K, D)`` for ``"sample"`` with the K rows of each example next to each other.
    """
    if hidden.dim() == 2:
        if method == "sample":
            raise CaptureError(
                f"pooling='sample' needs token activations (examples, tokens, width), got {tuple(hidden.shape)}."
            )
        return hidden.float()
    if hidden.dim() != 3:
        raise CaptureError(
            f"Expected activations of shape (examples, tokens, width) or (examples, width), got {tuple(hidden.shape)}."
        )
    if attention_mask is not None and attention_mask.shape != hidden.shape[:2]:
        raise CaptureError(
            f"attention_mask of shape {tuple(attention_mask.shape)} does not match activations of shape "
            f"{tuple(hidden.shape)}; the layer's output is not (examples, tokens, width) for this batch."
        )
    hidden = hidden.float()
    if method == "first" and attention_mask is None:
        return hidden[:, 0]
    if method == "sample":
        if positions is None:
            raise ValueError("pooling='sample' needs `positions`.")
        index = positions.to(hidden.device).unsqueeze(-1).expand(-1, -1, hidden.shape[-1])
        return hidden.gather(1, index).reshape(-1, hidden.shape[-1])
    if attention_mask is None:
        return hidden.mean(dim=1) if method == "mean" else hidden[:, -1]
    mask = attention_mask.to(device=hidden.device, dtype=hidden.dtype)
    if method == "mean":
        counts = mask.sum(dim=1, keepdim=True).clamp_min(1.0)
        return (hidden * mask.unsqueeze(-1)).sum(dim=1) / counts
    if method in ("first", "last"):
        # argmax returns the first maximum, so the weights pick the first or the last non-padding token.
        positions = torch.arange(mask.shape[1], device=hidden.device, dtype=hidden.dtype)
        weights = mask * (mask.shape[1] - positions) if method == "first" else mask * (positions + 1)
        chosen = weights.argmax(dim=1)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), chosen]
    raise ValueError(f"`pooling` must be one of {POOLING_METHODS}, got {method!r}.")


def sample_positions(
    attention_mask: torch.Tensor, tokens_per_example: int, seed: int, first_example_index: int
) -> torch.Tensor:
    """Draw ``tokens_per_example`` non-padding token positions per example, the same at every capture.

    Example ``i`` of the batch draws from a generator seeded with ``seed`` and its index in the whole probe set,
    so the positions do not depend on batching or on how the probe set is split across processes. Examples with
    fewer tokens than requested are sampled with replacement.

    Args:
        attention_mask: ``(N, T)``, 1 for real tokens.
        tokens_per_example: K, the positions to draw per example.
        seed: Seed of the draw.
        first_example_index: Index in the probe set of the batch's first example.

    Returns:
        ``(N, K)`` long tensor of sorted token positions.
    """
    mask = attention_mask.detach().cpu()
    rows = []
    for row, example_mask in enumerate(mask):
        valid = torch.nonzero(example_mask, as_tuple=False).flatten()
        if valid.numel() == 0:
            valid = torch.zeros(1, dtype=torch.long)
        generator = torch.Generator().manual_seed(seed * 1_000_003 + first_example_index + row)
        if valid.numel() >= tokens_per_example:
            chosen = valid[torch.randperm(valid.numel(), generator=generator)[:tokens_per_example]]
        else:
            chosen = valid[torch.randint(valid.numel(), (tokens_per_example,), generator=generator)]
        rows.append(chosen.sort().values)
    return torch.stack(rows)


class _Recorder:
    """Per-capture hook state: the pooled activations of each layer and the call count for the current batch."""

    def __init__(self, specs: Sequence[LayerSpec], pooling: str) -> None:
        self.specs = specs
        self.pooling = pooling
        self.attention_mask: torch.Tensor | None = None
        self.positions: torch.Tensor | None = None
        self.pooled: dict[str, list[torch.Tensor]] = {spec.name: [] for spec in specs}
        self.calls: dict[str, int] = {spec.name: 0 for spec in specs}

    def output_hook(self, name: str):
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            self._record(name, output)

        return hook

    def input_hook(self, name: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if args:
                self._record(name, args[0])
            else:
                self._record(name, next(iter(kwargs.values())))

        return hook

    def _record(self, name: str, output: Any) -> None:
        self.calls[name] += 1
        hidden = _first_tensor(output).detach()
        if hidden.is_nested:
            hidden = _unpack_nested(hidden, self.attention_mask, name)
        self.pooled[name].append(pool_tokens(hidden, self.attention_mask, self.pooling, self.positions))

    def check_batch(self, batch_index: int) -> None:
        for name, count in self.calls.items():
            if count == 0:
                raise CaptureError(
                    f"Layer {name!r} produced no activations in probe batch {batch_index}: its forward hook did "
                    "not run. This happens when the module is not used in forward, when a compiled or fused fast "
                    "path skips Python hooks, or when the hook was registered on a copy of the module."
                )
            if count > 1:
                raise CaptureError(
                    f"Layer {name!r} ran {count} times in one forward pass of probe batch {batch_index}; a module "
                    "that is called several times per forward has no single representation to compare. Hook a "
                    "module that runs once."
                )
            self.calls[name] = 0


def model_device(model: nn.Module) -> torch.device:
    for parameter in model.parameters():
        return parameter.device
    return torch.device("cpu")


def _to_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    return {key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in batch.items()}


@contextlib.contextmanager
def _eval_no_grad(model: nn.Module):
    """Put the model in eval mode under no_grad, restoring every submodule's mode and the RNG state afterwards."""
    modes = [(module, module.training) for module in model.modules()]
    devices = [device.index for device in {p.device for p in model.parameters()} if device.type == "cuda"]
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        model.eval()
        try:
            yield
        finally:
            for module, training in modes:
                module.training = training


def capture_activations(
    model: nn.Module,
    batches: Iterable[Mapping[str, Any]],
    layers: Sequence[LayerSpec],
    pooling: str = "mean",
    tokens_per_example: int = 8,
    seed: int = 0,
    first_example_index: int = 0,
) -> dict[str, torch.Tensor]:
    """Run the probe batches through the model and return each layer's pooled activations.

    The model runs in eval mode under ``torch.no_grad()``. Its previous mode and the RNG state of the training
    run are restored afterwards, and every hook is removed, also when the forward pass raises.

    Args:
        model: The model, possibly wrapped; the forward pass goes through the unwrapped module so that no
            wrapper synchronises across processes, except that an FSDP wrapper is kept (see
            :func:`forward_module`). With FSDP every process must run the same batches.
        batches: Keyword-argument dicts for ``model(**batch)``; an ``attention_mask`` entry marks padding.
        layers: The layers to hook, from :func:`resolve_layers`.
        pooling: One of :data:`POOLING_METHODS`.
        tokens_per_example: Token positions drawn per example with ``pooling="sample"``.
        seed: Seed of the positions drawn with ``pooling="sample"``.
        first_example_index: Index in the whole probe set of the first example in ``batches``.

    Returns:
        A dict from layer name to pooled activations in float32 on the model's device: ``(N, D)``, or
        ``(N * tokens_per_example, D)`` with ``pooling="sample"``.

    Raises:
        CaptureError: If a layer collected nothing or ran more than once in one forward pass.
    """
    if pooling not in POOLING_METHODS:
        raise ValueError(f"`pooling` must be one of {POOLING_METHODS}, got {pooling!r}.")
    module = forward_module(model)
    device = model_device(unwrap_model(model))
    recorder = _Recorder(layers, pooling)
    handles = []
    example_index = first_example_index
    try:
        for spec in layers:
            if spec.capture_input:
                handles.append(spec.module.register_forward_pre_hook(recorder.input_hook(spec.name), with_kwargs=True))
            else:
                handles.append(spec.module.register_forward_hook(recorder.output_hook(spec.name)))
        with _eval_no_grad(module):
            for batch_index, batch in enumerate(batches):
                batch = _to_device(batch, device)
                recorder.attention_mask = batch.get("attention_mask")
                batch_size = _batch_size(batch)
                if pooling == "sample":
                    mask = recorder.attention_mask
                    if mask is None:
                        mask = torch.ones(batch_size, _sequence_length(batch), dtype=torch.long)
                    recorder.positions = sample_positions(mask, tokens_per_example, seed, example_index)
                module(**_forward_inputs(module, batch))
                recorder.check_batch(batch_index)
                example_index += batch_size
    finally:
        for handle in handles:
            handle.remove()
    if not any(recorder.pooled.values()):
        raise CaptureError("The probe set produced no batches, so no activations were captured.")
    return {name: torch.cat(chunks) for name, chunks in recorder.pooled.items()}


def _forward_inputs(module: nn.Module, batch: Mapping[str, Any]) -> Mapping[str, Any]:
    """Drop the batch fields that ``module.forward`` does not take, such as an ``attention_mask`` kept for pooling.

    A forward pass that takes ``**kwargs``, or whose signature cannot be read, gets every field.
    """
    try:
        parameters = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return batch
    if any(parameter.kind == inspect.Parameter.VAR_KEYWORD for parameter in parameters.values()):
        return batch
    return {key: value for key, value in batch.items() if key in parameters}


def _batch_size(batch: Mapping[str, Any]) -> int:
    for value in batch.values():
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return value.shape[0]
    raise CaptureError(f"Cannot tell the batch size: no tensor among the probe batch's keys {list(batch)}.")


def _sequence_length(batch: Mapping[str, Any]) -> int:
    for value in batch.values():
        if isinstance(value, torch.Tensor) and value.dim() >= 2:
            return value.shape[1]
    raise CaptureError("pooling='sample' needs a batch with a (examples, tokens) tensor such as input_ids.")
