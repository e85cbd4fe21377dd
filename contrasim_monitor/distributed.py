"""Collective helpers for runs with several processes, over the run's own ``torch.distributed`` process group.

The monitor starts no process group of its own. Without an initialised group (a single process), every helper
here is the identity, so a single-process run takes the same code path with a world of one.
"""

from __future__ import annotations

import hashlib

import torch
import torch.distributed as dist

__all__ = ["all_succeeded", "gather_rows", "shard_bounds", "world"]


def world() -> tuple[int, int]:
    """Return ``(rank, world_size)`` of the default process group, or ``(0, 1)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard_bounds(num_examples: int, rank: int, world_size: int) -> tuple[int, int]:
    """Return the ``[start, stop)`` rows of ``rank``'s contiguous share; shares differ in size by at most one."""
    if world_size > num_examples:
        raise ValueError(
            f"The probe set has {num_examples} examples, fewer than the {world_size} processes that share it. "
            "Use a probe set with at least one example per process."
        )
    base, extra = divmod(num_examples, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def _collective_device(reference: torch.Tensor | None = None) -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu") if reference is None else reference.device


def all_succeeded(succeeded: bool) -> bool:
    """Return True on every process when ``succeeded`` is True on every process.

    Each process calls this whether or not its own part of a capture failed, so that no process waits alone
    in a later collective.
    """
    _, world_size = world()
    if world_size == 1:
        return succeeded
    flag = torch.tensor([1 if succeeded else 0], dtype=torch.int32, device=_collective_device())
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def agree_on_minimum(value: int) -> int:
    """Return the minimum of ``value`` over all processes, on every process."""
    _, world_size = world()
    if world_size == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.int64, device=_collective_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return int(tensor.item())


def same_on_all_processes(text: str) -> bool:
    """Return True on every process when ``text`` is the same on every process (compared by a 63-bit hash)."""
    _, world_size = world()
    if world_size == 1:
        return True
    value = int(hashlib.sha256(text.encode("utf-8")).hexdigest()[:15], 16)
    low = torch.tensor([value], dtype=torch.int64, device=_collective_device())
    high = low.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    return bool(low.item() == high.item())


def gather_rows(
    local: dict[str, torch.Tensor], num_examples: int, rows_per_example: int = 1
) -> dict[str, torch.Tensor]:
    """Concatenate every process's share of rows in rank order, so each example appears exactly once.

    Args:
        local: Layer name to this process's rows ``(N_rank * rows_per_example, D)``, for the share of examples
            from :func:`shard_bounds`.
        num_examples: Total examples over all processes.
        rows_per_example: Activation rows per example.

    Returns:
        Layer name to all rows ``(N, D)``, identical on every process, on the device of the local rows.
    """
    _, world_size = world()
    if world_size == 1:
        return dict(local)
    sizes = [shard_bounds(num_examples, r, world_size) for r in range(world_size)]
    counts = [(stop - start) * rows_per_example for start, stop in sizes]
    largest = max(counts)
    gathered = {}
    for name, rows in local.items():
        device = _collective_device(rows)
        # all_gather needs equal shapes: pad each share to the largest, then drop the padding.
        padded = torch.zeros(largest, rows.shape[1], dtype=rows.dtype, device=device)
        padded[: rows.shape[0]] = rows.to(device)
        parts = [torch.empty_like(padded) for _ in range(world_size)]
        dist.all_gather(parts, padded)
        gathered[name] = torch.cat([part[:count] for part, count in zip(parts, counts)]).to(rows.device)
    return gathered
