"""Image-caption benchmark: does a similarity measure match a group of images with their captions?

Protocol (Rahamim and Belinkov, "ContraSim", NAACL 2024, and the image-caption script of the authors' reference code,
technion-cs-nlp/ContraSim on GitHub): a vision model represents each image and a text model its caption, both by their
last layer only. The held-out pairs are cut into consecutive groups of ``--group-size`` (64). A measure compares the
image group with its caption group and with ``--distractors`` (10) caption groups, chosen at random or as nearest
neighbours of the true captions in the text model's representation (see ``_groups``). It is right when it scores the
true captions strictly above every distractor. Accuracy is the fraction of groups it gets right.

Representations follow the reference code. ViT-like models give their first token (``[CLS]``), and ConvNeXt-like
models the mean of their last feature map over its spatial positions. ``--image-pooling auto`` picks between the two
by the shape of ``last_hidden_state``. BERT-like text models give their first token (``[CLS]``) and GPT-2-like models
their last token. ``--text-pooling auto`` picks ``first`` when the tokenizer has a ``[CLS]`` token and ``last``
otherwise.

Measures (JSON keys ``<measure>_random`` and ``<measure>_nearest``):

- ``contrasim``: one ContraSim encoder, shared by images and captions, with an input layer per side when their
  widths differ. It trains on the training pairs for ``--epochs`` (30, the reference value) with Adam at learning
  rate 1e-4 and batches of ``--batch-size`` (1024), and is scored on the held-out groups.
- ``linear_cka`` and ``linear_cka_unbiased``: linear CKA with the biased estimator (the reference code's choice
  here) and the unbiased one. SVCCA and PWCCA are not run, because a group of 64 is fewer examples than the models'
  widths, and the library rejects CCA in that case.

Where this differs from the reference code, by choice:

- Random distractors never include the true group's captions.
- Nearest neighbours are searched among the held-out captions outside the true group. The reference code searches
  the training captions and skips the closest one.
- Images that are not RGB are converted instead of skipped.
- An incomplete last group is dropped.
- A tie with a distractor counts as wrong.

Data: ``--train-file`` and ``--test-file``, each a JSONL file of ``{"image": PATH, "caption": TEXT}`` objects or a
TSV with a header row naming ``image`` and ``caption`` columns. Relative image paths are read from the listing
file's folder. The published setup is ViT (``google/vit-base-patch16-224``) or ConvNeXt
(``facebook/convnext-tiny-224``) with GPT-2 (``gpt2``) or BERT (``bert-base-cased``), on 10,000 training and 5,000
held-out pairs of Conceptual Captions.

``--quick`` is a plumbing check, not a result: a small ViT and a 2-block BERT with random weights, on
scikit-learn's handwritten digits with captions made from their labels.

Examples::

    python benchmarks/image_caption.py --quick --json quick.json
    python benchmarks/image_caption.py --vision-model google/vit-base-patch16-224 --text-model gpt2 \\
        --train-file cc_train.jsonl --test-file cc_test.jsonl
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch
from _cli import PLUMBING_NOTE, add_common_options, format_table, int_at_least, prepare_runtime, write_json
from _contrastive import StoppingRule, encode, train_pair_encoder
from _groups import (
    cka_group_scores,
    contrasim_group_scores,
    correct_groups,
    make_groups,
    nearest_distractors,
    random_distractors,
)
from _text_features import TEXT_POOLINGS, load_text_model, pooled_text_states

from contrasim_monitor.contrasim import ContraSimConfig

logger = logging.getLogger("image_caption")

DISTRACTOR_KINDS = ("random", "nearest")
CLOSED_FORM = {"linear_cka": False, "linear_cka_unbiased": True}
MEASURES = ("contrasim", *CLOSED_FORM)
IMAGE_POOLINGS = ("auto", "first", "mean")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=(
            "example: python benchmarks/image_caption.py --vision-model google/vit-base-patch16-224 "
            "--text-model gpt2 --train-file train.jsonl --test-file test.jsonl\n"
            "         python benchmarks/image_caption.py --quick --json quick.json"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    source = parser.add_argument_group("models and data")
    source.add_argument("--vision-model", help="Hugging Face name or folder of the image model")
    source.add_argument("--text-model", help="Hugging Face name or folder of the caption model")
    source.add_argument("--train-file", type=Path, help="image-caption pairs that train the encoder (JSONL or TSV)")
    source.add_argument("--test-file", type=Path, help="held-out image-caption pairs (JSONL or TSV)")
    source.add_argument(
        "--train-examples", type=int_at_least(2), default=10000, help="training pairs at most (default: 10000)"
    )
    source.add_argument(
        "--test-examples", type=int_at_least(2), default=5000, help="held-out pairs at most (default: 5000)"
    )
    source.add_argument("--image-pooling", choices=IMAGE_POOLINGS, default="auto", help="default: auto")
    source.add_argument("--text-pooling", choices=("auto", *TEXT_POOLINGS), default="auto", help="default: auto")
    source.add_argument("--max-length", type=int_at_least(2), default=128, help="tokens per caption (default: 128)")
    source.add_argument("--batch-size-model", type=int_at_least(1), default=32, help="inputs per forward pass")

    protocol = parser.add_argument_group("protocol and ContraSim training")
    protocol.add_argument("--group-size", type=int_at_least(4), default=64, help="pairs per group (default: 64)")
    protocol.add_argument("--distractors", type=int_at_least(1), default=10, help="distractor groups (default: 10)")
    protocol.add_argument("--epochs", type=int_at_least(1), default=30, help="encoder epochs (default: 30)")
    protocol.add_argument(
        "--batch-size", type=int_at_least(2), default=1024, help="pairs per encoder mini-batch (default: 1024)"
    )
    add_common_options(parser)
    args = parser.parse_args(argv)
    if args.quick:
        # Quick sizes replace the defaults only, so options given on the command line still apply.
        parser.set_defaults(epochs=3, batch_size=128)
        args = parser.parse_args(argv)
    _check_source(parser, args)
    return args


def _check_source(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    options = ("vision_model", "text_model", "train_file", "test_file")
    if args.quick:
        for option in options:
            if getattr(args, option) is not None:
                parser.error(f"--quick builds its own models and data; leave out --{option.replace('_', '-')}")
        return
    missing = [f"--{option.replace('_', '-')}" for option in options if getattr(args, option) is None]
    if missing:
        parser.error(f"missing {', '.join(missing)} (or pass --quick for the plumbing check)")
    for option in ("train_file", "test_file"):
        path = getattr(args, option)
        if not path.is_file():
            parser.error(f"--{option.replace('_', '-')}: file not found: {path}")


def read_pairs(path: Path, limit: int) -> tuple[list[Path], list[str]]:
    """Read up to `limit` image paths and captions from a JSONL or TSV listing, checking that the images exist.

    Raises:
        ValueError: If a line lacks an image or a caption, or an image file does not exist, naming the file and line.
    """
    rows: list[tuple[int, dict]] = []
    if path.suffix == ".jsonl":
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if line.strip():
                try:
                    rows.append((number, json.loads(line)))
                except json.JSONDecodeError as error:
                    raise ValueError(f"{path}:{number}: invalid JSON ({error.msg})") from error
    else:
        with path.open(encoding="utf-8", newline="") as handle:
            reader = csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
            if reader.fieldnames is None or not {"image", "caption"} <= set(reader.fieldnames):
                raise ValueError(
                    f"{path}: the header row must name 'image' and 'caption' columns, got {reader.fieldnames}"
                )
            rows = list(enumerate(reader, start=2))
    images, captions = [], []
    for number, row in rows[:limit]:
        image, caption = row.get("image"), row.get("caption")
        if not isinstance(image, str) or not image or not isinstance(caption, str) or not caption.strip():
            raise ValueError(f"{path}:{number}: expected a non-empty 'image' and 'caption', got {row}")
        image_path = Path(image) if Path(image).is_absolute() else path.parent / image
        if not image_path.is_file():
            raise ValueError(f"{path}:{number}: image file not found: {image_path}")
        images.append(image_path)
        captions.append(caption.strip())
    return images, captions


def load_vision_model(name_or_path: str, device: torch.device):
    """Load an image model (in eval mode) and its image processor with the Auto classes."""
    from transformers import AutoImageProcessor, AutoModel
    from transformers.utils import logging as transformers_logging

    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        processor = AutoImageProcessor.from_pretrained(name_or_path)
        model = AutoModel.from_pretrained(name_or_path)
    finally:
        transformers_logging.set_verbosity(verbosity)
    return model.to(device).eval(), processor


def pool_image_states(states: torch.Tensor, pooling: str) -> torch.Tensor:
    """Pool a ``last_hidden_state``: ``(B, T, D)`` token sequences or ``(B, C, H, W)`` feature maps, into ``(B, D)``.

    ``"auto"`` takes the first token of a sequence (ViT's ``[CLS]``) and the spatial mean of a feature map
    (ConvNeXt).
    """
    if pooling == "auto":
        pooling = "mean" if states.ndim == 4 else "first"
    if states.ndim == 4:
        if pooling != "mean":
            raise ValueError(f"a (B, C, H, W) feature map can only be mean-pooled, got --image-pooling {pooling}")
        return states.mean(dim=(-2, -1))
    if states.ndim != 3:
        raise ValueError(f"expected a (B, T, D) or (B, C, H, W) last_hidden_state, got shape {tuple(states.shape)}")
    return states[:, 0] if pooling == "first" else states.mean(dim=1)


@torch.no_grad()
def image_states(model, processor, paths: list[Path], pooling: str, batch_size: int) -> torch.Tensor:
    """Return ``(N, D)`` pooled last-layer representations of the images."""
    from PIL import Image

    device = next(model.parameters()).device
    pooled = []
    for start in range(0, len(paths), batch_size):
        images = []
        for path in paths[start : start + batch_size]:
            with Image.open(path) as image:
                images.append(image.convert("RGB"))
        inputs = processor(images=images, return_tensors="pt").to(device)
        pooled.append(pool_image_states(model(**inputs).last_hidden_state, pooling).float().cpu())
    return torch.cat(pooled)


def represent(
    args: argparse.Namespace, device: torch.device
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Return the image and caption representations of the training and held-out pairs."""
    try:
        listings = {
            "train": read_pairs(args.train_file, args.train_examples),
            "test": read_pairs(args.test_file, args.test_examples),
        }
    except ValueError as error:
        raise SystemExit(str(error)) from error
    vision_model, processor = load_vision_model(args.vision_model, device)
    images = {
        split: image_states(vision_model, processor, paths, args.image_pooling, args.batch_size_model)
        for split, (paths, _) in listings.items()
    }
    del vision_model
    text_model, tokenizer = load_text_model(args.text_model, device)
    pooling = args.text_pooling
    if pooling == "auto":
        pooling = "first" if tokenizer.cls_token is not None else "last"
    captions = {
        split: pooled_text_states(
            text_model, tokenizer, texts, pooling, args.max_length, args.batch_size_model, last_layer_only=True
        )[0]
        for split, (_, texts) in listings.items()
    }
    return images, captions


def run_protocol(
    images: dict[str, torch.Tensor], captions: dict[str, torch.Tensor], args: argparse.Namespace, device: torch.device
) -> tuple[dict[tuple[str, str], float], list[str]]:
    """Score every measure with both kinds of distractors and return the accuracies and log lines."""
    num_test = images["test"].shape[0]
    groups = make_groups(num_test, args.group_size)
    generator = torch.Generator().manual_seed(args.seed)
    distractors = {
        "random": random_distractors(groups, num_test, args.distractors, generator),
        "nearest": nearest_distractors(groups, captions["test"], args.distractors),
    }
    accuracies: dict[tuple[str, str], float] = {}
    for kind, chosen in distractors.items():
        for measure, unbiased in CLOSED_FORM.items():
            scores = cka_group_scores(images["test"], captions["test"], groups, chosen, unbiased)
            accuracies[(measure, kind)] = float(correct_groups(scores).double().mean())

    num_batches = -(-images["train"].shape[0] // args.batch_size)
    config = ContraSimConfig(batch_size=args.batch_size, seed=args.seed)
    encoder, log = train_pair_encoder(
        [(images["train"], captions["train"])], config, StoppingRule(args.epochs * num_batches), device
    )
    image_encoded, caption_encoded = encode(encoder, images["test"]), encode(encoder, captions["test"])
    for kind, chosen in distractors.items():
        scores = contrasim_group_scores(image_encoded, caption_encoded, groups, chosen)
        accuracies[("contrasim", kind)] = float(correct_groups(scores).double().mean())
    lines = [
        f"{len(groups)} groups of {args.group_size}, {args.distractors} distractor groups each",
        f"ContraSim encoder: {log.describe()}",
    ]
    return accuracies, lines


def quick_inputs(folder: Path) -> dict[str, object]:
    """Build the plumbing check's models and digit-caption listings in `folder` and return the source options."""
    from _quick_inputs import save_tiny_text_model, save_tiny_vision_model, write_digit_captions

    return {
        "vision_model": str(save_tiny_vision_model(folder / "vision", "vit")),
        "text_model": str(save_tiny_text_model(folder / "text", "bert")),
        "train_file": write_digit_captions(folder, "train", range(0, 384)),
        "test_file": write_digit_captions(folder, "test", range(1000, 1384)),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = prepare_runtime(args)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="image-caption-quick-") as scratch:
        if args.quick:
            print(PLUMBING_NOTE)
            vars(args).update(quick_inputs(Path(scratch)))
        images, captions = represent(args, device)
    represented = time.perf_counter() - started
    accuracies, lines = run_protocol(images, captions, args, device)

    print(f"\nvision model {args.vision_model}, text model {args.text_model}")
    print(f"  {images['train'].shape[0]} training and {images['test'].shape[0]} held-out pairs")
    print(f"  widths: images {images['test'].shape[1]}, captions {captions['test'].shape[1]}")
    print(f"  representations in {represented:.1f} s")
    for line in lines:
        print(f"  {line}")
    rows = [[measure] + [accuracies[(measure, kind)] for kind in DISTRACTOR_KINDS] for measure in MEASURES]
    print(format_table(["measure", *DISTRACTOR_KINDS], rows))
    if args.quick:
        print(f"\n{PLUMBING_NOTE}")
    print(f"\ntotal time {time.perf_counter() - started:.1f} s")
    if args.json is not None:
        write_json(args.json, {f"{m}_{kind}": accuracies[(m, kind)] for m in MEASURES for kind in DISTRACTOR_KINDS})
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
