"""Hidden states of Hugging Face text models, pooled per word or per text, for the benchmark scripts.

Models and tokenizers are loaded with ``AutoModel`` and ``AutoTokenizer`` from a hub name or a local folder, so a
name works only where the hub or its cache can be reached.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

__all__ = ["TEXT_POOLINGS", "load_text_model", "pooled_text_states", "word_states"]

logger = logging.getLogger(__name__)

TEXT_POOLINGS = ("first", "last", "mean")


def load_text_model(name_or_path: str, device: torch.device | str = "cpu"):
    """Load a model (in eval mode, on `device`) and its tokenizer with the Auto classes.

    Returns:
        ``(model, tokenizer)``. The tokenizer pads on the right, and one without a padding token uses its end-of-text
        token for padding, as GPT-2's does.
    """
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as transformers_logging

    # Checkpoints saved from a task model (a masked-LM head, a pooler) report unused or new weights, which do not
    # matter for hidden states.
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        model = AutoModel.from_pretrained(name_or_path)
    finally:
        transformers_logging.set_verbosity(verbosity)
    tokenizer.padding_side = "right"
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"The tokenizer of {name_or_path!r} has neither a padding token nor an end-of-text token")
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(device).eval(), tokenizer


def _max_length(model, requested: int) -> int:
    positions = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    return requested if positions is None else min(requested, int(positions))


def _layer_states(model, encoded: dict[str, torch.Tensor], last_layer_only: bool = False) -> torch.Tensor:
    """Run the model and return ``(L, B, T, D)`` hidden states of every block, without the embeddings output.

    With ``last_layer_only`` the result is ``(1, B, T, D)``: the model's ``last_hidden_state``.
    """
    if last_layer_only:
        return model(**encoded).last_hidden_state[None]
    output = model(**encoded, output_hidden_states=True)
    if output.hidden_states is None:
        raise ValueError(f"{type(model).__name__} returned no hidden_states; the benchmarks need a model that does")
    return torch.stack(output.hidden_states[1:])


@torch.no_grad()
def word_states(
    model,
    tokenizer,
    texts: Sequence[str],
    num_words: int,
    max_length: int = 128,
    batch_size: int = 32,
) -> tuple[torch.Tensor, list[str]]:
    """Represent each word in context by the mean of its tokens' hidden states, in every block.

    Texts are split into words at whitespace and tokenized with ``is_split_into_words=True``, so every model that
    reads the same texts yields the same words, whatever its tokenizer. Words cut off by ``max_length`` are dropped.
    Words are taken in text order until ``num_words`` are collected.

    Returns:
        ``(L, num_words, D)`` float32 CPU tensor, and the words.

    Raises:
        ValueError: If the texts hold fewer than ``num_words`` words within ``max_length`` tokens.
    """
    device = next(model.parameters()).device
    max_length = _max_length(model, max_length)
    collected: list[torch.Tensor] = []
    words_out: list[str] = []
    for start in range(0, len(texts), batch_size):
        batch_words = [text.split() for text in texts[start : start + batch_size]]
        batch_words = [words for words in batch_words if words]
        if not batch_words:
            continue
        encoded = _tokenize_words(tokenizer, batch_words, max_length)
        states = _layer_states(model, {key: value.to(device) for key, value in encoded.items()})
        num_layers, _, _, width = states.shape

        # Give every (text, word) in the batch one slot, and average the tokens of each slot.
        slot_of_token = torch.full(encoded["input_ids"].shape, -1, dtype=torch.long)
        batch_slot_words: list[str] = []
        for row, words in enumerate(batch_words):
            word_ids = encoded.word_ids(row)
            first_slot = len(batch_slot_words)
            words_in_text = sorted({word_id for word_id in word_ids if word_id is not None})
            for position, word_id in enumerate(word_ids):
                if word_id is not None:
                    slot_of_token[row, position] = first_slot + words_in_text.index(word_id)
            batch_slot_words += [words[word_id] for word_id in words_in_text]
        valid = slot_of_token.view(-1) >= 0
        slots = slot_of_token.view(-1)[valid].to(device)
        token_states = states.reshape(num_layers, -1, width)[:, valid.to(device)]
        sums = torch.zeros(num_layers, len(batch_slot_words), width, device=device, dtype=torch.float32)
        sums.index_add_(1, slots, token_states.float())
        counts = torch.bincount(slots, minlength=len(batch_slot_words)).clamp(min=1)
        collected.append((sums / counts[None, :, None]).cpu())
        words_out += batch_slot_words
        if len(words_out) >= num_words:
            break
    if len(words_out) < num_words:
        raise ValueError(
            f"The texts contain {len(words_out)} words within {max_length} tokens per text, fewer than the "
            f"{num_words} requested; pass more text or request fewer examples"
        )
    return torch.cat(collected, dim=1)[:, :num_words], words_out[:num_words]


def _tokenize_words(tokenizer, batch_words: list[list[str]], max_length: int):
    try:
        return tokenizer(
            batch_words,
            is_split_into_words=True,
            truncation=True,
            max_length=max_length,
            padding=True,
            return_tensors="pt",
        )
    except (AssertionError, ValueError) as error:
        # Byte-level BPE tokenizers (GPT-2, RoBERTa) accept pre-split words only with add_prefix_space=True.
        raise ValueError(
            "The tokenizer rejected pre-split words; for byte-level BPE tokenizers such as GPT-2's, save the "
            "tokenizer with add_prefix_space=True and pass that folder"
        ) from error


@torch.no_grad()
def pooled_text_states(
    model,
    tokenizer,
    texts: Sequence[str],
    pooling: str,
    max_length: int = 128,
    batch_size: int = 32,
    last_layer_only: bool = False,
) -> torch.Tensor:
    """Pool each text's hidden states in every block into one vector.

    Args:
        pooling: ``"first"`` takes the first token (``[CLS]`` for BERT), ``"last"`` the last non-padding token (the
            summary position of a left-to-right model such as GPT-2), ``"mean"`` the mean over non-padding tokens.
        last_layer_only: Pool only the model's ``last_hidden_state``.

    Returns:
        ``(L, len(texts), D)`` float32 CPU tensor, with ``L = 1`` when ``last_layer_only``.
    """
    if pooling not in TEXT_POOLINGS:
        raise ValueError(f"pooling must be one of {TEXT_POOLINGS}, got {pooling!r}")
    device = next(model.parameters()).device
    max_length = _max_length(model, max_length)
    pooled = []
    for start in range(0, len(texts), batch_size):
        encoded = tokenizer(
            list(texts[start : start + batch_size]),
            truncation=True,
            max_length=max_length,
            padding=True,
            return_tensors="pt",
        ).to(device)
        states = _layer_states(model, encoded, last_layer_only)
        mask = encoded["attention_mask"]
        if pooling == "first":
            pooled.append(states[:, :, 0].float().cpu())
        elif pooling == "last":
            last = mask.sum(dim=1) - 1
            rows = torch.arange(mask.shape[0], device=device)
            pooled.append(states[:, rows, last].float().cpu())
        else:
            weights = mask.to(states.dtype)[None, :, :, None]
            pooled.append(((states * weights).sum(dim=2) / weights.sum(dim=2)).float().cpu())
    return torch.cat(pooled, dim=1)
