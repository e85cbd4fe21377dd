"""The ``contrasim-monitor`` command: compare two checkpoints, or report on a monitored run.

``main(argv)`` runs the command in-process and returns its exit status instead of exiting, so that tests and
scripts can call it. The console script passes that status to ``sys.exit``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback

from .contrasim import ContraSimConfig
from .outputs import Progress
from .run_files import InputError

__all__ = ["EXIT_DRIFT", "EXIT_FAILURE", "EXIT_INVALID_INPUT", "EXIT_OK", "build_parser", "main"]

logger = logging.getLogger("contrasim_monitor.cli")

EXIT_OK = 0
#: A runtime failure: an unexpected error while loading, capturing, computing or writing.
EXIT_FAILURE = 1
#: Invalid command-line usage or input: a missing folder, mismatched inputs, an empty probe, an existing output.
EXIT_INVALID_INPUT = 2
#: ``report --fail-on-drift`` found a layer whose largest drop exceeds the threshold.
EXIT_DRIFT = 3
EXIT_INTERRUPTED = 130

EXIT_CODES_HELP = """\
exit status:
  0  success
  1  runtime failure (loading a model, a capture, a computation or writing failed)
  2  invalid usage or input: a missing folder, an empty or unreadable probe file, probe sets that differ from
     the stored fingerprint, architectures that do not match, or an output file that exists (use --overwrite)
  3  report --fail-on-drift: a layer's largest drop exceeds --drift-threshold
  130  interrupted (Ctrl-C)"""

COMPARE_EXAMPLES = """\
A and B are each a snapshot store (or a run folder that contains one, such as the Trainer's runs/<name>), a
Trainer checkpoint, or a saved Hugging Face model folder. Stores are compared at their newest capture unless
--step-a/--step-b says otherwise; model folders are captured on the probe set.

examples:
  # the initial model against the final one, from the run's snapshot store
  contrasim-monitor compare out/runs/RUN out/runs/RUN --step-a 0 --out cmp/

  # a checkpoint against a pretrained model folder, on texts (one per line)
  contrasim-monitor compare out/checkpoint-500 path/to/base-model --probe probe.txt --out cmp/ --measures cka

  # write the result as TensorBoard events as well
  contrasim-monitor compare out/checkpoint-500 out/checkpoint-1000 --out cmp/ --tensorboard cmp/tb

"""

REPORT_EXAMPLES = """\
RUN is the run's TensorBoard folder (which contains snapshots/ and contrasim.jsonl), its snapshot store, a
Trainer output folder with one monitored run, or a checkpoint with contrasim_monitor.json.

examples:
  contrasim-monitor report out/runs/RUN --out report/
  contrasim-monitor report out/runs/RUN --measures cka --tolerance 0.02 --fail-on-drift

"""


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {value}")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number between 0 and 1, got {text!r}") from None
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a number strictly between 0 and 1, got {value}")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 0.0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {value}")
    return value


def _patterns(text: str) -> list[str]:
    patterns = [part.strip() for part in text.split(",") if part.strip()]
    if not patterns:
        raise argparse.ArgumentTypeError("expected comma-separated module names or glob patterns")
    return patterns


def _add_common_arguments(parser: argparse.ArgumentParser, measures_default: str, measures_help: str) -> None:
    parser.add_argument("--out", metavar="DIR", help="Folder for the output files; created if missing.")
    parser.add_argument("--overwrite", action="store_true", help="Replace output files that already exist.")
    parser.add_argument("--measures", metavar="NAMES", default=measures_default, help=measures_help)
    parser.add_argument(
        "--contrasim-epochs",
        metavar="N",
        type=_positive_int,
        default=50,
        help="Training epochs of each ContraSim head (default: 50, as published).",
    )
    parser.add_argument(
        "--device",
        metavar="DEVICE",
        default="auto",
        help="Where models run and heads train: auto (CUDA if available), cpu, cuda:0.",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="No progress bars and no warnings.")
    parser.add_argument("-v", "--verbose", action="store_true", help="Log details, and print tracebacks on failure.")


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser of ``contrasim-monitor`` and its subcommands."""
    from . import __version__
    from .compare import COMPARE_MEASURES
    from .report import REPORT_MEASURES

    parser = argparse.ArgumentParser(
        prog="contrasim-monitor",
        description="Compare checkpoints and summarise runs recorded by the contrasim-monitor callback.",
        epilog="examples:\n  contrasim-monitor compare A B --out cmp/\n  contrasim-monitor report RUN --out report/\n\n"
        + EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{compare,report}")

    compare = commands.add_parser(
        "compare",
        help="Layer x layer similarity between two checkpoints.",
        description="Compute the layer x layer similarity between the layers of A (rows) and of B (columns), "
        "print it as a table, and write a heatmap PNG, a CSV and a JSON file into --out.",
        epilog=COMPARE_EXAMPLES + EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    compare.add_argument(
        "a", metavar="A", help="A snapshot store or run folder, a Trainer checkpoint, or a model folder."
    )
    compare.add_argument("b", metavar="B", help="The same kinds as A.")
    compare.add_argument(
        "--probe",
        metavar="FILE",
        help="Probe set for model folders: text with one example per line, or JSON lines (.jsonl) of strings, "
        '{"text": ...} or {"input_ids": [...]} objects. Default: the probe set stored with the run.',
    )
    _add_common_arguments(
        compare,
        "contrasim,cka",
        f"Comma-separated measures from {', '.join(COMPARE_MEASURES)} (default: contrasim,cka).",
    )
    compare.add_argument(
        "--step-a",
        metavar="STEP",
        type=_non_negative_int,
        help="Capture step of A when A is a store (default: newest).",
    )
    compare.add_argument(
        "--step-b",
        metavar="STEP",
        type=_non_negative_int,
        help="Capture step of B when B is a store (default: newest).",
    )
    compare.add_argument(
        "--layers-a",
        metavar="LAYERS",
        type=_patterns,
        help="Comma-separated module names or glob patterns of A. Default: the stored layers, or for a model "
        "without a run, the embeddings and every transformer block.",
    )
    compare.add_argument("--layers-b", metavar="LAYERS", type=_patterns, help="As --layers-a, for B.")
    compare.add_argument(
        "--pooling",
        choices=("mean", "first", "last", "sample"),
        help="How a model's token activations become one vector per example (default: as the run recorded, else mean).",
    )
    compare.add_argument(
        "--tokens-per-example",
        metavar="N",
        type=_positive_int,
        help="Token positions drawn per example with --pooling sample.",
    )
    compare.add_argument(
        "--max-length",
        metavar="N",
        type=_positive_int,
        default=128,
        help="Tokens kept per text example (default: 128).",
    )
    compare.add_argument(
        "--batch-size", metavar="N", type=_positive_int, default=32, help="Examples per forward pass (default: 32)."
    )
    compare.add_argument(
        "--tokenizer", metavar="DIR", help="Tokenizer folder for a model folder that has none (such as a checkpoint)."
    )
    compare.add_argument(
        "--held-out-fraction",
        metavar="FRACTION",
        type=_fraction,
        help="Probe fraction that scores ContraSim heads (default: the run's, else 0.25).",
    )
    compare.add_argument(
        "--seed",
        metavar="SEED",
        type=_non_negative_int,
        help="Seed of the ContraSim train/held-out split (default: the run's, else 0) and of the heads (default: 0).",
    )
    compare.add_argument(
        "--tensorboard", metavar="DIR", help="Also write the result as TensorBoard events into a new event file in DIR."
    )
    compare.add_argument(
        "--tensorboard-step",
        metavar="STEP",
        type=_non_negative_int,
        help="Step of those events (default: A's step, else 0).",
    )
    compare.set_defaults(handler=_run_compare)

    report = commands.add_parser(
        "report",
        help="When each layer settled, its largest drop, and the final matrices of a monitored run.",
        description="Summarise a monitored run from its snapshot store: for each layer, the step from which it "
        "stays within --tolerance of its final representation (the order in which layers settle), the largest "
        "drop between consecutive captures (a drift alarm), and the final layer x layer matrices.",
        epilog=REPORT_EXAMPLES + EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    report.add_argument("run", metavar="RUN", help="A run folder, its snapshot store, or a checkpoint of the run.")
    _add_common_arguments(
        report,
        "cka,contrasim",
        f"Comma-separated measures from {', '.join(REPORT_MEASURES)} (default: cka,contrasim). ContraSim trains "
        "one head per layer and earlier capture.",
    )
    report.add_argument(
        "--tolerance",
        metavar="TOLERANCE",
        type=_non_negative_float,
        default=0.05,
        help="A layer has settled once its similarity to its final self stays >= 1 - tolerance (default: 0.05).",
    )
    report.add_argument(
        "--drift-threshold",
        metavar="THRESHOLD",
        type=_non_negative_float,
        default=0.5,
        help="Raise a drift alarm when 1 - similarity to the previous capture exceeds this (default: 0.5).",
    )
    report.add_argument(
        "--fail-on-drift", action="store_true", help=f"Exit with status {EXIT_DRIFT} when a drift alarm is raised."
    )
    report.set_defaults(handler=_run_report)
    return parser


def _run_compare(args: argparse.Namespace, progress: Progress) -> int:
    from .compare import CompareOptions, format_compare_table, parse_measures, run_compare

    options = CompareOptions(
        a=args.a,
        b=args.b,
        probe=args.probe,
        out=args.out,
        overwrite=args.overwrite,
        measures=parse_measures(args.measures),
        step_a=args.step_a,
        step_b=args.step_b,
        layers_a=args.layers_a,
        layers_b=args.layers_b,
        pooling=args.pooling,
        tokens_per_example=args.tokens_per_example,
        max_length=args.max_length,
        batch_size=args.batch_size,
        tokenizer=args.tokenizer,
        device=args.device,
        contrasim=ContraSimConfig(epochs=args.contrasim_epochs),
        held_out_fraction=args.held_out_fraction,
        seed=args.seed,
        tensorboard=args.tensorboard,
        tensorboard_step=args.tensorboard_step,
    )
    if options.seed is not None:
        options.contrasim = ContraSimConfig(epochs=args.contrasim_epochs, seed=options.seed)
    result = run_compare(options, progress)
    print(format_compare_table(result))
    if args.out is not None:
        print(f"\nWrote compare.json, compare.csv and {len(result.matrices)} heatmap(s) into {args.out}")
    if args.tensorboard is not None:
        print(f"Wrote TensorBoard events into {args.tensorboard}")
    return EXIT_OK


def _run_report(args: argparse.Namespace, progress: Progress) -> int:
    from .compare import parse_measures
    from .report import REPORT_MEASURES, ReportOptions, format_report, run_report

    options = ReportOptions(
        run=args.run,
        out=args.out,
        overwrite=args.overwrite,
        measures=parse_measures(args.measures, REPORT_MEASURES),
        tolerance=args.tolerance,
        drift_threshold=args.drift_threshold,
        contrasim=ContraSimConfig(epochs=args.contrasim_epochs),
        device=args.device,
    )
    report = run_report(options, progress)
    print(format_report(report))
    if args.out is not None:
        print(f"\nWrote report.txt, report.json and {2 * len(options.measures)} heatmap(s) into {args.out}")
    if args.fail_on_drift and report.alarms:
        return EXIT_DRIFT
    return EXIT_OK


def _configure_logging(verbose: bool, quiet: bool) -> None:
    level = logging.WARNING
    if verbose:
        level = logging.DEBUG
    elif quiet:
        level = logging.ERROR
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("contrasim_monitor").setLevel(level)
    # transformers reports missing classifier weights and similar details that do not matter for a capture.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "info" if verbose else "error")


def main(argv: list[str] | None = None) -> int:
    """Run ``contrasim-monitor`` with ``argv`` (``sys.argv[1:]`` when None) and return the exit status."""
    # Model folders are read from disk only, so no model hub is contacted.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_request:  # --help, --version, or a usage error that argparse has printed
        code = exit_request.code
        if isinstance(code, int):
            return code
        return EXIT_OK if code is None else EXIT_INVALID_INPUT
    _configure_logging(args.verbose, args.quiet)
    progress = Progress(False if args.quiet else None)
    prefix = f"{parser.prog} {args.command}: error:"
    try:
        return args.handler(args, progress)
    except InputError as error:
        print(f"{prefix} {error}", file=sys.stderr)
        return EXIT_INVALID_INPUT
    except BrokenPipeError:
        # The reader of standard output stopped early, as `| head` does. Writes at exit would fail again, so
        # standard output is redirected to /dev/null.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print(f"{parser.prog} {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as error:  # any other failure is reported as a runtime failure with its exit status
        print(f"{prefix} {type(error).__name__}: {error}", file=sys.stderr)
        if args.verbose:
            traceback.print_exc()
        else:
            print("Run again with --verbose for the traceback.", file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
