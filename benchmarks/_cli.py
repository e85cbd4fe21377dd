"""Command-line pieces shared by the benchmark scripts: argument types, run set-up, tables and the JSON output."""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

__all__ = [
    "PLUMBING_NOTE",
    "add_common_options",
    "float_in_range",
    "format_table",
    "int_at_least",
    "prepare_runtime",
    "write_json",
]

PLUMBING_NOTE = (
    "PLUMBING CHECK, NOT A RESULT: --quick runs the protocol end to end on small models built from configs with random "
    "weights, so these accuracies say nothing about the measures."
)


def int_at_least(minimum: int) -> Callable[[str], int]:
    """Return an argparse type that accepts an integer >= ``minimum``; argparse prefixes the option name."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {value}")
        return value

    return parse


def float_in_range(low: float, high: float, include_low: bool = True) -> Callable[[str], float]:
    """Return an argparse type that accepts a float in ``[low, high)`` (or ``(low, high)``)."""
    bracket = "[" if include_low else "("

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number in {bracket}{low}, {high}), got {text!r}") from None
        too_low = value < low if include_low else value <= low
        if not math.isfinite(value) or too_low or value >= high:
            raise argparse.ArgumentTypeError(f"expected a number in {bracket}{low}, {high}), got {value}")
        return value

    return parse


def _json_path(text: str) -> Path:
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"expected a file path, got the folder {text!r}")
    return path


def add_common_options(parser: argparse.ArgumentParser) -> None:
    """Add --quick, --json, --device, --threads and --seed."""
    parser.add_argument(
        "--quick",
        action="store_true",
        help="use small sizes that finish in a few minutes on a CPU; size options given explicitly still apply",
    )
    parser.add_argument(
        "--json",
        type=_json_path,
        metavar="PATH",
        help='write the accuracy of each measure to PATH as {"measure_name": accuracy, ...}',
    )
    parser.add_argument("--device", default="cpu", help="torch device for models and ContraSim encoders (default: cpu)")
    parser.add_argument(
        "--threads",
        type=int_at_least(1),
        help="CPU threads for torch (default: torch's own choice); 1 is often faster on a busy machine",
    )
    parser.add_argument("--seed", type=int_at_least(0), default=0, help="seed of ContraSim encoders and sampling")


def prepare_runtime(args: argparse.Namespace) -> torch.device:
    """Set the thread count, quiet the Hugging Face progress bars, configure logging, and check the device."""
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
    except ImportError:
        pass
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    try:
        device = torch.device(args.device)
    except RuntimeError as error:
        raise SystemExit(f"--device: expected a torch device such as cpu or cuda:0, got {args.device!r}") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device: {args.device!r} was requested, but torch sees no CUDA device here")
    return device


def format_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Format rows as aligned text columns; floats get three decimals and NaN prints as n/a."""

    def cell(value: object) -> str:
        if isinstance(value, float):
            return "n/a" if math.isnan(value) else f"{value:.3f}"
        return str(value)

    cells = [list(map(str, header))] + [[cell(value) for value in row] for row in rows]
    widths = [max(len(row[column]) for row in cells) for column in range(len(header))]
    lines = []
    for row in cells:
        first = row[0].ljust(widths[0])
        rest = [value.rjust(width) for value, width in zip(row[1:], widths[1:])]
        lines.append("  ".join([first, *rest]))
    return "\n".join(lines)


def write_json(path: Path, accuracies: dict[str, float]) -> None:
    """Write ``{"measure_name": accuracy}`` to `path` through a temporary file, creating missing parent folders."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps({name: float(value) for name, value in accuracies.items()}, indent=2) + "\n")
    temporary.replace(path)
