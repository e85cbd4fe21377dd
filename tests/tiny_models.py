"""Tiny models and token data shared by the Trainer, Accelerate and two-process tests."""

from __future__ import annotations

import numpy as np
import torch
from transformers import BertConfig, BertForSequenceClassification


def tiny_bert(seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
        num_labels=2,
    )
    return BertForSequenceClassification(config)


def token_dataset(size: int, seed: int = 0) -> list[dict]:
    """Build variable-length random sequences, labelled by whether token 5 occurs so there is something to learn."""
    rng = np.random.default_rng(seed)
    examples = []
    for _ in range(size):
        length = int(rng.integers(6, 16))
        ids = rng.integers(1, 64, size=length).tolist()
        examples.append({"input_ids": ids, "attention_mask": [1] * length, "labels": int(5 in ids)})
    return examples


def pad_collate(examples: list[dict]) -> dict[str, torch.Tensor]:
    width = max(len(e["input_ids"]) for e in examples)
    batch = {
        "input_ids": torch.tensor([e["input_ids"] + [0] * (width - len(e["input_ids"])) for e in examples]),
        "attention_mask": torch.tensor(
            [e["attention_mask"] + [0] * (width - len(e["attention_mask"])) for e in examples]
        ),
    }
    if "labels" in examples[0]:
        batch["labels"] = torch.tensor([e["labels"] for e in examples])
    return batch
