"""Time ContraSim's batched fit against one-pair fits, and the closed-form similarity measures.

The ContraSim part fits one head per pair of the upper triangle of an L x L layer grid, the L (L - 1) / 2 off-diagonal
pairs (i, j) with i < j; diagonal pairs score 1.0 without training and are left out. The layers are the hidden states
of a random residual network. The same heads are then fitted one pair at a time with ``ContraSim`` and the
seeds of ``contrasim_head_config``, so the two sets of scores should agree up to float32 rounding.

The FLOP rate counts the matrix products of training and scoring (see ``contrasim_flops``). It is compared with the
rate of one large float32 matrix product, timed in the same run before and after the fits, and the higher of those
two rates is the reference. Element-wise work (ReLU, normalisation, exp, Adam) is not counted as FLOPs but takes
time, so it lowers the fraction.

Usage::

    python benchmarks/bench_measures.py           # full size: 6 layers, 2000 + 1000 examples, width 384
    python benchmarks/bench_measures.py --quick   # small sizes, for a smoke run

The last line is ``batched_speedup <ratio> efficiency <fraction>``.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import platform
import time
from collections.abc import Callable

import torch

from contrasim_monitor.contrasim import ContraSim, ContraSimConfig, contrasim_head_config, contrasim_pairs


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="use small sizes (overrides the size options)")
    parser.add_argument("--layers", type=int, default=6, help="layers in the grid; pairs = layers * (layers - 1) / 2")
    parser.add_argument("--train", type=int, default=2000, help="training examples per ContraSim head")
    parser.add_argument("--test", type=int, default=1000, help="held-out examples per ContraSim head")
    parser.add_argument("--width", type=int, default=384, help="width of every layer's representation")
    parser.add_argument("--epochs", type=int, default=50, help="ContraSim training epochs")
    parser.add_argument("--batch-size", type=int, default=1024, help="ContraSim maximum mini-batch size, in examples")
    parser.add_argument("--measure-examples", type=int, default=4096, help="examples n for the closed-form measures")
    parser.add_argument("--measure-width", type=int, default=768, help="width d for the closed-form measures")
    parser.add_argument("--matmul-size", type=int, default=4096, help="side of the square float32 reference product")
    parser.add_argument("--skip-loop", action="store_true", help="skip the one-pair-at-a-time fits")
    parser.add_argument(
        "--repeats", type=int, default=2, help="timed runs of each ContraSim variant; the fastest counts"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the data and of the ContraSim heads")
    args = parser.parse_args()
    if args.quick:
        args.layers, args.train, args.test, args.width, args.epochs = 4, 500, 250, 128, 5
        args.batch_size, args.measure_examples, args.measure_width, args.matmul_size = 256, 1024, 128, 2048
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    return args


def residual_network_layers(num_layers: int, num_examples: int, width: int, seed: int) -> list[torch.Tensor]:
    """Return the hidden states ``(num_examples, width)`` of a random residual tanh network, input first."""
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(num_examples, width, generator=generator)
    layers = [hidden]
    for _ in range(num_layers - 1):
        weight = torch.randn(width, width, generator=generator) * (1.5 / math.sqrt(width))
        hidden = hidden + torch.tanh(hidden @ weight)
        hidden = hidden / hidden.std()
        layers.append(hidden)
    return layers


def contrasim_flops(config: ContraSimConfig, width: int, num_train: int, num_test: int, num_heads: int) -> float:
    """Count the multiply-add FLOPs (2 per multiply-add) of the matrix products of fitting and scoring the heads.

    Per mini-batch of B examples, M = 2B encoded points go through each layer: forward ``2 M in out``, and backward
    ``2 M in out`` for the weight gradient plus, for every layer but the first, ``2 M in out`` for the input gradient.
    The loss costs ``2 M^2 d`` for the logits and ``2 M^2 (2 d)`` for their gradient, with d = out_dim. Scoring runs
    the forward layers on 2 * num_test points. Assumes both sides of every pair have the same width.
    """
    dims = (width, *config.layer_dims)
    layer_products = [fan_in * fan_out for fan_in, fan_out in zip(dims[:-1], dims[1:], strict=True)]
    num_batches = math.ceil(num_train / config.batch_size)
    batch_sizes = [len(part) for part in torch.tensor_split(torch.arange(num_train), num_batches)]
    training = 0.0
    for batch in batch_sizes:
        points = 2 * batch
        forward = 2 * points * sum(layer_products)
        backward = 2 * points * (2 * sum(layer_products) - layer_products[0])
        loss = 2 * points**2 * config.out_dim * 3
        training += forward + backward + loss
    scoring = 2 * (2 * num_test) * sum(layer_products)
    return num_heads * (config.epochs * training + scoring)


def matmul_rate(size: int, repeats: int = 5) -> float:
    """Return the best FLOP rate, in FLOP/s, of a ``(size, size) @ (size, size)`` float32 product."""
    a = torch.randn(size, size)
    b = torch.randn(size, size)
    torch.mm(a, b)
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def time_call(function: Callable[[], object], repeats: int = 2) -> float:
    """Return the shortest wall time in seconds of `repeats` calls; the first call also warms up."""
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - start)
    return best


def bench_contrasim(args: argparse.Namespace) -> tuple[float, float]:
    """Print the ContraSim table and return (batched speedup, efficiency); the speedup is NaN with --skip-loop."""
    config = ContraSimConfig(epochs=args.epochs, batch_size=args.batch_size, seed=args.seed)
    layers = residual_network_layers(args.layers, args.train + args.test, args.width, args.seed)
    train_index = torch.arange(args.train)
    test_index = torch.arange(args.train, args.train + args.test)
    pairs = [(i, j) for i in range(args.layers) for j in range(i + 1, args.layers)]
    flops = contrasim_flops(config, args.width, args.train, args.test, len(pairs))

    # Warm up the thread pool and the BLAS kernels on a small fit, so the timed runs start from the same state.
    warm_up = dataclasses.replace(config, epochs=1)
    contrasim_pairs(layers, pairs[:2], train_index[:256], test_index[:64], warm_up)

    def fit_batched() -> torch.Tensor:
        return contrasim_pairs(layers, pairs, train_index, test_index, config)

    def fit_looped() -> torch.Tensor:
        scores = torch.empty(len(pairs), dtype=torch.float64)
        for head, (a, b) in enumerate(pairs):
            measure = ContraSim(contrasim_head_config(config, head)).fit(layers[a][train_index], layers[b][train_index])
            scores[head] = measure.score(layers[a][test_index], layers[b][test_index])
        return scores

    # Alternate the order across repeats and keep each variant's fastest run, so that neither variant gains from
    # running second or from a quieter moment on a shared machine.
    rate_before = matmul_rate(args.matmul_size)
    batched_seconds = looped_seconds = math.inf
    batched = looped = None
    for repeat in range(args.repeats):
        order = ["batched", "looped"] if repeat % 2 == 0 else ["looped", "batched"]
        for variant in order:
            if variant == "looped" and args.skip_loop:
                continue
            start = time.perf_counter()
            if variant == "batched":
                batched = fit_batched()
                batched_seconds = min(batched_seconds, time.perf_counter() - start)
            else:
                looped = fit_looped()
                looped_seconds = min(looped_seconds, time.perf_counter() - start)
    rate_after = matmul_rate(args.matmul_size)
    if looped is None:
        looped_seconds = math.nan
        max_difference = math.nan
    else:
        max_difference = (batched - looped).abs().max().item()

    reference_rate = max(rate_before, rate_after)
    batched_rate = flops / batched_seconds
    efficiency = batched_rate / reference_rate
    speedup = looped_seconds / batched_seconds

    print(
        f"ContraSim: {len(pairs)} heads (pairs i < j of {args.layers} layers), {args.train} train + {args.test} "
        f"held-out examples, width {args.width}, encoder {config.encoder} {config.layer_dims}, epochs {config.epochs}, "
        f"batch size {config.batch_size}"
    )
    print(f"{'quantity':<44} {'value':>14}")
    print(f"{f'batched fit + score, best of {args.repeats} (s)':<44} {batched_seconds:>14.2f}")
    print(f"{f'ContraSim loop over pairs, best of {args.repeats} (s)':<44} {looped_seconds:>14.2f}")
    print(f"{'loop time / batched time':<44} {speedup:>14.2f}")
    print(f"{'max |batched - looped| score':<44} {max_difference:>14.2e}")
    print(f"{'counted matmul FLOPs of the fit':<44} {flops:>14.3e}")
    print(f"{'batched fit rate (GFLOP/s)':<44} {batched_rate / 1e9:>14.1f}")
    print(f"{f'float32 {args.matmul_size}^2 matmul before (GFLOP/s)':<44} {rate_before / 1e9:>14.1f}")
    print(f"{f'float32 {args.matmul_size}^2 matmul after (GFLOP/s)':<44} {rate_after / 1e9:>14.1f}")
    print(f"{'batched rate / best matmul rate':<44} {efficiency:>14.3f}")
    print(
        "scores (i, j): "
        + ", ".join(f"{pair}={value:.3f}" for pair, value in zip(pairs, batched.tolist(), strict=True))
    )
    return speedup, efficiency


def bench_closed_form(args: argparse.Namespace) -> None:
    """Print the time of each closed-form measure on one pair of (n, d) float32 inputs; skip the missing ones."""
    try:
        from contrasim_monitor import measures
    except ImportError as error:
        print(f"closed-form measures skipped: contrasim_monitor.measures failed to import ({error})")
        return
    generator = torch.Generator().manual_seed(args.seed)
    x = torch.randn(args.measure_examples, args.measure_width, generator=generator)
    y = torch.tanh(
        x @ torch.randn(args.measure_width, args.measure_width, generator=generator) / args.measure_width**0.5
    )
    candidates: list[tuple[str, str, dict[str, object]]] = [
        ("linear_cka", "linear_cka", {}),
        ("linear_cka (unbiased)", "linear_cka", {"unbiased": True}),
        ("svcca", "svcca", {}),
        ("pwcca", "pwcca", {}),
        ("procrustes", "procrustes", {}),
        ("mutual_knn", "mutual_knn", {}),
    ]
    print(
        f"closed-form measures on n={args.measure_examples}, d={args.measure_width} float32 inputs "
        "(each computes in float64)"
    )
    print(f"{'measure':<24} {'seconds':>10}")
    for label, name, kwargs in candidates:
        function = getattr(measures, name, None)
        if function is None:
            print(f"{label:<24} {'skipped: not in contrasim_monitor.measures':>10}")
            continue
        seconds = time_call(lambda function=function, kwargs=kwargs: function(x, y, **kwargs))
        print(f"{label:<24} {seconds:>10.3f}")


def main() -> None:
    args = parse_args()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, "
        f"{platform.platform()}"
    )
    bench_closed_form(args)
    speedup, efficiency = bench_contrasim(args)
    print(f"batched_speedup {speedup:.3f} efficiency {efficiency:.3f}")


if __name__ == "__main__":
    main()
