"""Multilingual benchmark: does a similarity measure match a group of sentences with its translation?

Protocol (Rahamim and Belinkov, "ContraSim", NAACL 2024, and ``multilingual_benchmark.py`` of the authors' reference
code, technion-cs-nlp/ContraSim on GitHub): a multilingual model represents parallel sentences in several languages,
by its first token (``[CLS]``) in every block, the embeddings output left out. For an ordered pair of languages (L1,
L2) and each layer, the held-out sentences are cut into consecutive groups of ``--group-size`` (8). A measure compares
the L2 group with its L1 translation and with ``--distractors`` (10) groups of L1 sentences, chosen at random or as
nearest neighbours of the true L1 sentences in that layer (see ``_groups``). It is right when it scores the
translation strictly above every distractor. Accuracy pools all groups, layers and ordered language pairs. The
distractors of a candidate language and layer are drawn once and shared by every measure and every anchor language.

Measures (JSON keys ``<measure>_random`` and ``<measure>_nearest``):

- ``contrasim``: one ContraSim encoder per pair of languages, shared by both languages and all layers. It trains
  on the training sentences of that pair, one step per layer for each mini-batch with the layers in random order,
  for ``--epochs`` (30, the reference value) with Adam at learning rate 1e-4 and batches of ``--batch-size`` (1024).
  It is scored on the held-out groups of the same pair, in both orders.
- ``contrasim_other_pairs``: the same encoders scored on every ordered pair of other languages. This is what the
  reference code reports: it trains an encoder on one language pair and evaluates it on all the other pairs. Needs
  at least three languages.
- ``linear_cka`` and ``linear_cka_unbiased``: linear CKA with the biased and the unbiased (Song et al. 2012) HSIC
  estimator; the reference code uses the unbiased one here. SVCCA and PWCCA are not run, because a group of 8
  sentences is far fewer examples than the model's width, and the library rejects CCA in that case.

Where this differs from the reference code, by choice:

- One encoder per unordered language pair instead of one per ordered pair, because the loss is symmetric in the two
  languages.
- Random distractors never include the true group's sentences.
- Nearest neighbours are searched among the held-out sentences outside the true group.
- A tie with a distractor counts as wrong.

Data: ``--train-file`` and ``--test-file``, each a TSV with a header row of language codes and one sentence per
column, or a JSONL file of ``{"en": ..., "ar": ..., ...}`` objects; or ``--xnli``, which reads XNLI's premises and
hypotheses through the ``datasets`` package as the reference code does (train split for the encoders, test split
held out). The published setup is multilingual BERT (``bert-base-multilingual-cased``) on XNLI in en, ar, zh, ru
and tr.

``--quick`` is a plumbing check, not a result: a 2-block BERT with random weights on three renderings of
Shakespeare speeches (original, words reversed, lowercased), which stand in for languages.

Examples::

    python benchmarks/multilingual.py --quick --json quick.json
    python benchmarks/multilingual.py --model bert-base-multilingual-cased --xnli --languages en ar zh ru tr
    python benchmarks/multilingual.py --model ./mbert --train-file train.tsv --test-file test.tsv
"""

from __future__ import annotations

import argparse
import csv
import itertools
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

logger = logging.getLogger("multilingual")

XNLI_LANGUAGES = ("en", "ar", "zh", "ru", "tr")
DISTRACTOR_KINDS = ("random", "nearest")
CLOSED_FORM = {"linear_cka": False, "linear_cka_unbiased": True}
MEASURES = ("contrasim", "contrasim_other_pairs", *CLOSED_FORM)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=(
            "example: python benchmarks/multilingual.py --model bert-base-multilingual-cased --xnli\n"
            "         python benchmarks/multilingual.py --quick --json quick.json"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    source = parser.add_argument_group("model and data")
    source.add_argument("--model", help="Hugging Face name or folder of the multilingual model")
    source.add_argument("--train-file", type=Path, help="parallel sentences that train the encoders (TSV or JSONL)")
    source.add_argument("--test-file", type=Path, help="held-out parallel sentences (TSV or JSONL)")
    source.add_argument("--xnli", action="store_true", help="read XNLI with the `datasets` package instead of files")
    source.add_argument(
        "--languages",
        nargs="+",
        help=f"language codes to compare (default: {' '.join(XNLI_LANGUAGES)} with --xnli, else every column)",
    )
    source.add_argument(
        "--train-examples", type=int_at_least(2), default=10000, help="training sentences at most (default: 10000)"
    )
    source.add_argument("--test-examples", type=int_at_least(2), help="held-out sentences at most (default: all)")
    source.add_argument("--pooling", choices=TEXT_POOLINGS, default="first", help="token pooling (default: first)")
    source.add_argument("--max-length", type=int_at_least(2), default=128, help="tokens per sentence (default: 128)")
    source.add_argument("--batch-size-model", type=int_at_least(1), default=32, help="sentences per forward pass")

    protocol = parser.add_argument_group("protocol and ContraSim training")
    protocol.add_argument("--group-size", type=int_at_least(4), default=8, help="sentences per group (default: 8)")
    protocol.add_argument("--distractors", type=int_at_least(1), default=10, help="distractor groups (default: 10)")
    protocol.add_argument("--epochs", type=int_at_least(1), default=30, help="encoder epochs (default: 30)")
    protocol.add_argument(
        "--batch-size", type=int_at_least(2), default=1024, help="sentences per encoder mini-batch (default: 1024)"
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
    if args.quick:
        for option in ("model", "train_file", "test_file"):
            if getattr(args, option) is not None:
                parser.error(f"--quick builds its own model and data; leave out --{option.replace('_', '-')}")
        if args.xnli:
            parser.error("--quick builds its own model and data; leave out --xnli")
        return
    if args.model is None:
        parser.error("--model is required (for example bert-base-multilingual-cased), unless --quick is given")
    has_files = args.train_file is not None or args.test_file is not None
    if args.xnli and has_files:
        parser.error("--xnli and --train-file/--test-file are alternatives; pass one of them")
    if not args.xnli and (args.train_file is None or args.test_file is None):
        parser.error("pass both --train-file and --test-file, or --xnli")
    for option in ("train_file", "test_file"):
        path = getattr(args, option)
        if path is not None and not path.is_file():
            parser.error(f"--{option.replace('_', '-')}: file not found: {path}")
    if args.languages is not None and len(set(args.languages)) < 2:
        parser.error(f"--languages: expected at least 2 different language codes, got {args.languages}")


def read_parallel_file(path: Path, languages: list[str] | None) -> dict[str, list[str]]:
    """Read parallel sentences from a TSV with a header row of language codes, or from JSONL objects.

    Returns:
        The sentences of each requested language (every column when `languages` is None), row-aligned.

    Raises:
        ValueError: If a requested language is missing or a sentence is empty, naming the file and line.
    """
    if path.suffix == ".jsonl":
        rows = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if line.strip():
                try:
                    rows.append((number, json.loads(line)))
                except json.JSONDecodeError as error:
                    raise ValueError(f"{path}:{number}: invalid JSON ({error.msg})") from error
        available = list(rows[0][1]) if rows else []
    else:
        with path.open(encoding="utf-8", newline="") as handle:
            reader = csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
            header = next(reader, [])
            available = [code.strip() for code in header]
            rows = [(number, dict(zip(available, row))) for number, row in enumerate(reader, start=2) if row]
    languages = available if languages is None else languages
    missing = [code for code in languages if code not in available]
    if missing:
        raise ValueError(f"{path}: languages {missing} not found; the file has {available}")
    if len(languages) < 2:
        raise ValueError(f"{path}: expected at least 2 languages, found {languages}")
    sentences: dict[str, list[str]] = {code: [] for code in languages}
    for number, row in rows:
        for code in languages:
            text = row.get(code)
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"{path}:{number}: missing or empty sentence for language {code!r}")
            sentences[code].append(text.strip())
    return sentences


def read_xnli(languages: list[str], split: str, limit: int | None) -> dict[str, list[str]]:
    """Read XNLI premises and hypotheses in `languages`, each sentence once, as the reference code does."""
    # NOTE: not run yet. It needs the `datasets` package and the hub (or its cache), and neither was available where
    # it was written.
    try:
        from datasets import load_dataset
    except ImportError as error:
        raise SystemExit("--xnli needs the `datasets` package (pip install datasets); or pass data files") from error
    dataset = load_dataset("xnli", "all_languages", split=split)
    sentences: dict[str, list[str]] = {code: [] for code in languages}
    seen: set[str] = set()
    for example in dataset:
        hypothesis = dict(zip(example["hypothesis"]["language"], example["hypothesis"]["translation"]))
        for texts in (example["premise"], hypothesis):
            key = texts[languages[0]]
            if key in seen:
                continue
            seen.add(key)
            for code in languages:
                sentences[code].append(texts[code])
        if limit is not None and len(seen) >= limit:
            break
    return sentences


def _limit(sentences: dict[str, list[str]], limit: int | None) -> dict[str, list[str]]:
    return sentences if limit is None else {code: texts[:limit] for code, texts in sentences.items()}


def load_sentences(args: argparse.Namespace) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """Return the training and held-out sentences per language."""
    if args.xnli:
        languages = args.languages or list(XNLI_LANGUAGES)
        train = read_xnli(languages, "train", args.train_examples)
        test = read_xnli(languages, "test", args.test_examples)
    else:
        try:
            test = read_parallel_file(args.test_file, args.languages)
            train = read_parallel_file(args.train_file, list(test))
        except ValueError as error:
            raise SystemExit(str(error)) from error
    return _limit(train, args.train_examples), _limit(test, args.test_examples)


def represent(model, tokenizer, sentences: dict[str, list[str]], args: argparse.Namespace) -> dict[str, torch.Tensor]:
    """Return ``(L, N, D)`` pooled hidden states per language."""
    return {
        code: pooled_text_states(model, tokenizer, texts, args.pooling, args.max_length, args.batch_size_model)
        for code, texts in sentences.items()
    }


class Tally:
    """Correct groups per (measure, distractor kind, layer)."""

    def __init__(self, num_layers: int) -> None:
        self.num_layers = num_layers
        self.correct: dict[tuple[str, str, int], int] = {}
        self.total: dict[tuple[str, str, int], int] = {}

    def add(self, measure: str, kind: str, layer: int, hits: torch.Tensor) -> None:
        key = (measure, kind, layer)
        self.correct[key] = self.correct.get(key, 0) + int(hits.sum())
        self.total[key] = self.total.get(key, 0) + hits.numel()

    def has(self, measure: str) -> bool:
        return any(key[0] == measure for key in self.total)

    def accuracy(self, measure: str, kind: str, layer: int | None = None) -> float:
        layers = range(self.num_layers) if layer is None else [layer]
        correct = sum(self.correct.get((measure, kind, index), 0) for index in layers)
        total = sum(self.total.get((measure, kind, index), 0) for index in layers)
        return correct / total if total else float("nan")


def run_protocol(
    train: dict[str, torch.Tensor], test: dict[str, torch.Tensor], args: argparse.Namespace, device: torch.device
) -> tuple[Tally, list[str]]:
    """Score every measure on every ordered language pair and layer, and return the tally and log lines."""
    languages = list(test)
    num_layers, num_test, _ = test[languages[0]].shape
    groups = make_groups(num_test, args.group_size)
    generator = torch.Generator().manual_seed(args.seed)
    distractors = {}
    for code, layer in itertools.product(languages, range(num_layers)):
        distractors[(code, layer, "random")] = random_distractors(groups, num_test, args.distractors, generator)
        distractors[(code, layer, "nearest")] = nearest_distractors(groups, test[code][layer], args.distractors)
    ordered = list(itertools.permutations(languages, 2))
    tally = Tally(num_layers)
    lines = [f"{len(languages)} languages, {num_layers} layers, {len(groups)} groups of {args.group_size} per layer"]

    # Closed-form measures. L1 is the candidate side, whose group is replaced by distractors; L2 is the anchor.
    for (candidate, anchor), layer, kind in itertools.product(ordered, range(num_layers), DISTRACTOR_KINDS):
        chosen = distractors[(candidate, layer, kind)]
        for measure, unbiased in CLOSED_FORM.items():
            scores = cka_group_scores(test[anchor][layer], test[candidate][layer], groups, chosen, unbiased)
            tally.add(measure, kind, layer, correct_groups(scores))

    # ContraSim: one encoder per unordered pair, scored on its own pair and on every other pair.
    num_batches = -(-next(iter(train.values())).shape[1] // args.batch_size)
    rule = StoppingRule(max_steps=args.epochs * num_batches * num_layers)
    config = ContraSimConfig(batch_size=args.batch_size, seed=args.seed)
    for first, second in itertools.combinations(languages, 2):
        pairs = [(train[first][layer], train[second][layer]) for layer in range(num_layers)]
        encoder, log = train_pair_encoder(pairs, config, rule, device)
        lines.append(f"ContraSim encoder {first}-{second}: {log.describe()}")
        encoded = {code: torch.stack([encode(encoder, states) for states in test[code]]) for code in languages}
        for (candidate, anchor), layer, kind in itertools.product(ordered, range(num_layers), DISTRACTOR_KINDS):
            measure = "contrasim" if {candidate, anchor} == {first, second} else "contrasim_other_pairs"
            scores = contrasim_group_scores(
                encoded[anchor][layer], encoded[candidate][layer], groups, distractors[(candidate, layer, kind)]
            )
            tally.add(measure, kind, layer, correct_groups(scores))
    return tally, lines


def quick_inputs(folder: Path) -> argparse.Namespace:
    """Build the plumbing check's model and pseudo-parallel files in `folder` and return the source options."""
    from _quick_inputs import save_tiny_text_model, write_pseudo_parallel_texts

    return argparse.Namespace(
        model=str(save_tiny_text_model(folder / "model", "bert")),
        train_file=write_pseudo_parallel_texts(folder / "train.tsv", 0, 256),
        test_file=write_pseudo_parallel_texts(folder / "test.tsv", 1000, 160),
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = prepare_runtime(args)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="multilingual-quick-") as scratch:
        if args.quick:
            print(PLUMBING_NOTE)
            vars(args).update(vars(quick_inputs(Path(scratch))))
        train_sentences, test_sentences = load_sentences(args)
        model, tokenizer = load_text_model(args.model, device)
        train = represent(model, tokenizer, train_sentences, args)
        test = represent(model, tokenizer, test_sentences, args)
        del model
    represented = time.perf_counter() - started
    tally, lines = run_protocol(train, test, args, device)

    measures = [measure for measure in MEASURES if tally.has(measure)]
    print(f"\nmodel {args.model}, {len(test)} languages: {', '.join(test)}")
    print(
        f"  {next(iter(train.values())).shape[1]} training and {next(iter(test.values())).shape[1]} held-out sentences"
    )
    print(f"  representations in {represented:.1f} s")
    for line in lines:
        print(f"  {line}")
    if "contrasim_other_pairs" not in measures:
        print("  contrasim_other_pairs needs at least three languages and is left out")
    rows = [[measure] + [tally.accuracy(measure, kind) for kind in DISTRACTOR_KINDS] for measure in measures]
    print(format_table(["measure", *DISTRACTOR_KINDS], rows))
    for kind in DISTRACTOR_KINDS:
        print(f"\nper layer, {kind} distractors")
        rows = [
            [f"layer {layer + 1}"] + [tally.accuracy(m, kind, layer) for m in measures]
            for layer in range(tally.num_layers)
        ]
        print(format_table(["layer", *measures], rows))
    if args.quick:
        print(f"\n{PLUMBING_NOTE}")
    print(f"\ntotal time {time.perf_counter() - started:.1f} s")
    if args.json is not None:
        write_json(args.json, {f"{m}_{kind}": tally.accuracy(m, kind) for m in measures for kind in DISTRACTOR_KINDS})
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
