"""The probe set: a fixed list of examples that is run through the model at every capture."""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = ["LABEL_KEYS", "ProbeSet", "draw_examples", "forward_argument_names"]

#: Keys that hold training targets; the probe forward pass needs none of them.
LABEL_KEYS = ("labels", "label", "label_ids", "start_positions", "end_positions")


def forward_argument_names(model: nn.Module) -> set[str] | None:
    """Return the named arguments of ``model.forward``, or None when its signature cannot be read.

    Extra ``**kwargs`` are not counted, as in the Trainer's own column filtering: many transformers 5 models
    take ``**kwargs``, and raw dataset columns such as ``text`` must still be dropped.
    """
    try:
        signature = inspect.signature(model.forward)
    except (TypeError, ValueError):
        return None
    return {
        name
        for name, parameter in signature.parameters.items()
        if parameter.kind not in (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)
    }


def draw_examples(dataset: Any, num_examples: int, seed: int) -> list[Any]:
    """Draw ``num_examples`` distinct examples from an indexable dataset with a seeded permutation.

    Raises:
        ValueError: If the dataset has fewer examples than requested.
    """
    size = len(dataset)
    if num_examples > size:
        raise ValueError(
            f"The probe set asks for {num_examples} examples but the dataset it is drawn from has only {size}. "
            "Pass a smaller `probe=` or a larger evaluation set."
        )
    order = np.random.default_rng(seed).permutation(size)[:num_examples]
    return [dataset[int(i)] for i in sorted(order)]


class ProbeSet:
    """Tokenized examples, collated into fixed batches, with a fingerprint of their content.

    Args:
        examples: Tokenized examples, each a mapping such as ``{"input_ids": [...], "attention_mask": [...]}``.
            Keys that ``model.forward`` does not name are dropped by :meth:`restrict_to_model`. Label keys reach
            the collator (some need them to pad) but are removed from the collated batches.
        collate_fn: Turns a list of examples into a batch dict (for example the Trainer's data collator, which
            pads). Defaults to padding ``input_ids`` and ``attention_mask`` with 0 when lengths differ.
        batch_size: Examples per probe forward pass.
    """

    def __init__(
        self,
        examples: Sequence[Mapping[str, Any]],
        collate_fn: Callable[[list[dict[str, Any]]], Mapping[str, Any]] | None = None,
        batch_size: int = 32,
    ) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
            raise ValueError(f"`batch_size` must be a positive integer, got {batch_size!r}.")
        examples = list(examples)
        for index, example in enumerate(examples):
            if not isinstance(example, Mapping):
                raise TypeError(
                    f"Probe example {index} is a {type(example).__name__}; expected a mapping of tokenized fields "
                    "such as {'input_ids': [...], 'attention_mask': [...]}."
                )
        self.examples = [dict(example) for example in examples]
        self.collate_fn = collate_fn or _pad_collate
        self.batch_size = batch_size
        self._batches: list[dict[str, Any]] | None = None

    def __len__(self) -> int:
        return len(self.examples)

    def restrict_to_model(self, model: nn.Module) -> None:
        """Drop fields that ``model.forward`` does not name, such as raw text columns; labels stay for the collator."""
        names = forward_argument_names(model)
        if names is not None:
            keep = names | set(LABEL_KEYS)
            self.examples = [{k: v for k, v in example.items() if k in keep} for example in self.examples]
        self._batches = None

    def shard(self, start: int, stop: int) -> ProbeSet:
        """Return the probe set of examples ``[start, stop)``, batched with the same collator and batch size."""
        return ProbeSet(self.examples[start:stop], collate_fn=self.collate_fn, batch_size=self.batch_size)

    def batches(self) -> Iterator[dict[str, Any]]:
        """Yield the collated batches; they are built once and reused at every capture."""
        if self._batches is None:
            self._batches = [
                dict(self.collate_fn(self.examples[start : start + self.batch_size]))
                for start in range(0, len(self.examples), self.batch_size)
            ]
            for batch in self._batches:
                for label_key in LABEL_KEYS:
                    batch.pop(label_key, None)
        yield from self._batches

    def fingerprint(self) -> str:
        """Return a SHA-256 of the examples' model inputs (labels excluded), the same wherever it is built."""
        digest = hashlib.sha256()
        for example in self.examples:
            for key in sorted(k for k in example if k not in LABEL_KEYS):
                digest.update(key.encode())
                value = example[key]
                array = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
                if array.dtype.kind in "iub":
                    array = array.astype(np.int64)
                digest.update(array.tobytes() if array.dtype.kind != "O" else repr(value).encode())
        return digest.hexdigest()


def _pad_collate(examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack examples, right-padding sequence fields with 0 (``attention_mask`` marks the padding)."""
    batch: dict[str, torch.Tensor] = {}
    for key in examples[0]:
        values = [torch.as_tensor(example[key]) for example in examples]
        if values[0].dim() == 0 or all(v.shape == values[0].shape for v in values):
            batch[key] = torch.stack(values)
        else:
            batch[key] = nn.utils.rnn.pad_sequence(values, batch_first=True, padding_value=0)
    if "input_ids" in batch and "attention_mask" not in batch:
        lengths = torch.tensor([len(example["input_ids"]) for example in examples])
        positions = torch.arange(batch["input_ids"].shape[1])
        batch["attention_mask"] = (positions.unsqueeze(0) < lengths.unsqueeze(1)).long()
    return batch
