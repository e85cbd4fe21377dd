"""Capture a saved model's layers on a probe set, for comparisons made after training.

A model folder is loaded with transformers from local files only, and only from safetensors weights, so nothing
is downloaded and nothing is unpickled. The probe set comes from a file (plain text with one example per line,
or JSON lines) or from the run's snapshot store (``probe.json``). transformers is imported only here, so that
the rest of the package works without it.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .capture import capture_activations, resolve_layers
from .outputs import Progress
from .probe import LABEL_KEYS, ProbeSet
from .run_files import InputError

logger = logging.getLogger(__name__)

__all__ = [
    "LoadedModel",
    "ProbeInputs",
    "capture_model",
    "describe_probe_difference",
    "load_model",
    "read_probe_file",
    "tokenize_probe",
]

JSON_LINES_SUFFIXES = (".jsonl", ".ndjson")
SAFETENSORS_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "tokenizer.model")


@dataclass
class ProbeInputs:
    """A probe set before tokenization: texts, or examples that are already tokenized.

    Attributes:
        description: Where it came from, for messages and the JSON output.
        texts: One string per example, or None when ``examples`` is set.
        examples: Tokenized examples such as ``{"input_ids": [...], "attention_mask": [...]}``, or None.
        fingerprint: The fingerprint recorded with a stored probe set, or None for a file.
        settings: Capture settings recorded with a stored probe set (``pooling``, ``tokens_per_example``,
            ``seed``, ``held_out_fraction``); empty for a file.
    """

    description: str
    texts: list[str] | None = None
    examples: list[dict[str, Any]] | None = None
    fingerprint: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.texts if self.texts is not None else self.examples)


@dataclass
class LoadedModel:
    """A model loaded from a folder, with its tokenizer when the folder has one."""

    folder: Path
    model: nn.Module
    tokenizer: Any | None

    @property
    def vocabulary_size(self) -> int | None:
        embeddings = self.model.get_input_embeddings() if hasattr(self.model, "get_input_embeddings") else None
        return getattr(embeddings, "num_embeddings", None)


def read_probe_file(path: str | os.PathLike[str]) -> ProbeInputs:
    """Read a probe file: plain text with one example per line, or JSON lines (``.jsonl``, ``.ndjson``).

    Blank lines are skipped. A JSON line is a string, an object with a ``"text"`` string, or an object with
    ``"input_ids"`` (a list of token ids) and optionally ``"attention_mask"`` and ``"token_type_ids"``. Label
    fields are dropped. A file must contain texts or tokenized examples, not both.

    Raises:
        InputError: If the file is missing or unreadable, a line is invalid, or there is no example.
    """
    path = Path(path)
    if not path.is_file():
        problem = "is a folder" if path.is_dir() else "not found"
        raise InputError(f"--probe: file {os.fspath(path)!r} {problem}.")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise InputError(f"--probe: cannot read {os.fspath(path)!r} as UTF-8 text ({error}).") from error

    numbered = [(number, line) for number, line in enumerate(lines, start=1) if line.strip()]
    if not numbered:
        raise InputError(
            f"--probe: {os.fspath(path)!r} contains no examples: the file is empty or has only blank lines."
        )
    if path.suffix.lower() not in JSON_LINES_SUFFIXES:
        return ProbeInputs(f"{os.fspath(path)} (text)", texts=[line for _, line in numbered])

    texts: list[str] = []
    examples: list[dict[str, Any]] = []
    for number, line in numbered:
        where = f"--probe: {os.fspath(path)}, line {number}"
        try:
            value = json.loads(line)
        except json.JSONDecodeError as error:
            raise InputError(f"{where}: invalid JSON ({error}).") from error
        if isinstance(value, str):
            texts.append(value)
        elif isinstance(value, dict) and isinstance(value.get("text"), str):
            texts.append(value["text"])
        elif isinstance(value, dict) and "input_ids" in value:
            examples.append(_tokenized_example(value, where))
        else:
            raise InputError(
                f'{where}: expected a string, {{"text": "..."}} or {{"input_ids": [...]}}, got {line[:80]!r}.'
            )
        if texts and examples:
            raise InputError(f"{where}: the file mixes texts and tokenized examples; use one kind per file.")
    if examples:
        return ProbeInputs(f"{os.fspath(path)} (token ids)", examples=examples)
    return ProbeInputs(f"{os.fspath(path)} (text)", texts=texts)


def _tokenized_example(value: dict, where: str) -> dict[str, Any]:
    example = {key: field_value for key, field_value in value.items() if key not in LABEL_KEYS and key != "text"}
    for key, field_value in example.items():
        if not isinstance(field_value, list) or not field_value:
            raise InputError(f"{where}: `{key}` must be a non-empty list of integers.")
        if not all(isinstance(token, int) and not isinstance(token, bool) for token in field_value):
            raise InputError(f"{where}: `{key}` must be a list of integers.")
        if len(field_value) != len(example["input_ids"]):
            raise InputError(
                f"{where}: `{key}` has {len(field_value)} entries but `input_ids` has {len(example['input_ids'])}."
            )
    return example


def load_model(folder: Path, device: torch.device, role: str) -> LoadedModel:
    """Load the model in ``folder`` with the class its configuration names, and its tokenizer if present.

    The class named in ``config.architectures`` is used when transformers has it, so that module names (such as
    ``bert.encoder.layer.0`` of a sequence classifier) are those the training run captured. Otherwise the base
    model (``AutoModel``) is loaded. Remote code is never run.

    Raises:
        InputError: If the folder has no safetensors weights or transformers cannot load it.
    """
    import transformers
    from transformers import AutoConfig, AutoModel

    if not any((folder / name).is_file() for name in SAFETENSORS_WEIGHTS):
        raise InputError(
            f"{role}: {os.fspath(folder)!r} has no safetensors weights ({' or '.join(SAFETENSORS_WEIGHTS)}). Save "
            "the model with save_pretrained(), which writes safetensors; other weight formats are not loaded "
            "because reading them would unpickle the file."
        )
    try:
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError) as error:
        raise InputError(f"{role}: cannot read the model configuration in {os.fspath(folder)!r}: {error}") from error
    model_class = None
    for name in getattr(config, "architectures", None) or []:
        model_class = getattr(transformers, name, None)
        if model_class is not None:
            break
    # The command line shows its own progress bars; transformers' bar for loading weights would interleave.
    transformers.utils.logging.disable_progress_bar()
    try:
        model = (model_class or AutoModel).from_pretrained(
            folder, config=config, local_files_only=True, use_safetensors=True
        )
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        raise InputError(f"{role}: transformers cannot load the model in {os.fspath(folder)!r}: {error}") from error
    model.to(device)
    model.eval()
    return LoadedModel(folder, model, _load_tokenizer(folder))


def _load_tokenizer(folder: Path):
    """Return the folder's tokenizer, or None when it has none (a Trainer checkpoint saved without one)."""
    from transformers import AutoTokenizer

    # transformers 5 builds an empty tokenizer of the model's type for a folder without tokenizer files.
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        return None
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as error:
        logger.debug("No tokenizer in %s: %s", folder, error)
        return None
    return tokenizer if len(tokenizer) > 0 else None


def tokenize_probe(probe: ProbeInputs, loaded: LoadedModel, tokenizer, max_length: int, role: str) -> list[dict]:
    """Turn the probe set into token ids for ``loaded``'s model, and check that they fit its vocabulary.

    Args:
        probe: Texts or tokenized examples.
        loaded: The model; its input embedding size bounds the token ids.
        tokenizer: Tokenizer for texts: the model folder's own, or the one given with ``--tokenizer``.
        max_length: Tokens kept per text example.
        role: ``"A"`` or ``"B"``, for error messages.

    Raises:
        InputError: If texts need a tokenizer and there is none, or a token id is beyond the vocabulary.
    """
    if probe.texts is not None:
        if tokenizer is None:
            raise InputError(
                f"{role}: {os.fspath(loaded.folder)!r} has no tokenizer, so the text probe cannot be tokenized. "
                "Pass --tokenizer FOLDER, or a probe file of token ids (JSON lines with input_ids)."
            )
        limit = getattr(tokenizer, "model_max_length", None)
        if isinstance(limit, int) and 0 < limit < max_length:
            max_length = limit
        encoded = tokenizer(probe.texts, truncation=True, max_length=max_length)
        keys = [key for key in encoded if key not in LABEL_KEYS]
        examples = [{key: encoded[key][index] for key in keys} for index in range(len(probe.texts))]
    else:
        examples = [dict(example) for example in probe.examples]

    size = loaded.vocabulary_size
    largest = max(max(example["input_ids"]) for example in examples)
    if size is not None and largest >= size:
        raise InputError(
            f"Architectures do not match: the probe has token id {largest}, but the model in "
            f"{os.fspath(loaded.folder)!r} ({role}) has a vocabulary of {size}. The probe was tokenized for another "
            "model; give it as text with --probe."
        )
    return examples


def same_vocabulary(first, second) -> bool | None:
    """Tell whether two tokenizers map the same strings to the same ids; None when either is missing."""
    if first is None or second is None:
        return None
    return first.get_vocab() == second.get_vocab()


def capture_model(
    loaded: LoadedModel,
    examples: list[dict],
    layers: list[str] | None,
    pooling: str,
    tokens_per_example: int,
    seed: int,
    batch_size: int,
    progress: Progress,
    role: str,
) -> tuple[dict[str, torch.Tensor], ProbeSet]:
    """Run the probe examples through the model and return the pooled activations and the probe set.

    The probe set keeps only the fields that the model's ``forward`` names, as the monitor's does, so its
    fingerprint is comparable with a stored one.

    Returns:
        ``(activations, probe)``, activations being a dict from layer name to ``(N, D)`` float32 tensors on the
        CPU, in layer order.

    Raises:
        InputError: If a layer name or pattern matches no module of the model.
    """
    probe = ProbeSet(examples, batch_size=batch_size)
    probe.restrict_to_model(loaded.model)
    try:
        specs = resolve_layers(loaded.model, layers)
    except ValueError as error:
        raise InputError(f"Architectures do not match: {role} ({os.fspath(loaded.folder)}): {error}") from error
    batches = progress.bar(
        probe.batches(), total=math.ceil(len(probe) / batch_size), description=f"{role}: probe forward passes"
    )
    activations = capture_activations(
        loaded.model, batches, specs, pooling, tokens_per_example=tokens_per_example, seed=seed
    )
    return {name: tensor.float().cpu() for name, tensor in activations.items()}, probe


def describe_probe_difference(expected: list[dict], actual: list[dict]) -> str:
    """Say how two tokenized probe sets first differ (count, fields or token ids); empty when they are equal."""
    if len(expected) != len(actual):
        return f"The stored probe set has {len(expected)} examples, this one {len(actual)}."
    fields_expected = sorted(key for key in expected[0] if key not in LABEL_KEYS) if expected else []
    fields_actual = sorted(key for key in actual[0] if key not in LABEL_KEYS) if actual else []
    if fields_expected != fields_actual:
        return f"The stored examples have the fields {fields_expected}, these {fields_actual}."
    for index, (first, second) in enumerate(zip(expected, actual)):
        for key in fields_expected:
            if _as_list(first[key]) != _as_list(second[key]):
                return f"Example {index} differs in `{key}` (for example through another tokenizer or --max-length)."
    return ""


def _as_list(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, tuple):
        return list(value)
    return value
