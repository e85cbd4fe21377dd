"""Input validation and float64 conversion shared by every similarity measure."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import torch

MatrixLike = torch.Tensor | np.ndarray


class NonFiniteError(ValueError):
    """Error raised when an input to a similarity measure contains NaN or inf values."""


class ConstantInputWarning(RuntimeWarning):
    """Warning that an input is constant across examples, so the measure is 0/0 and returns NaN."""


def resolve_device(values: Sequence[object]) -> torch.device:
    """Return the device of the first torch tensor in `values`, or the CPU if there is none."""
    for value in values:
        if isinstance(value, torch.Tensor):
            return value.device
    return torch.device("cpu")


def as_float64_matrix(value: MatrixLike, name: str, device: torch.device) -> torch.Tensor:
    """Convert an (N, D) tensor or array to a detached float64 tensor on `device`.

    The upcast happens before any arithmetic, so float16 and bfloat16 inputs with large values cannot overflow in
    later products. No gradient flows through the measures.

    NOTE: no test has run on a CUDA device yet, because the CUDA tests skip on CPU-only machines. Devices without
    float64 support, such as Apple MPS, fail at this conversion.

    Args:
        value: (N, D) activations, N examples by D features, as a torch tensor or numpy array of a real dtype.
        name: Argument name used in error messages, for example ``"x"`` or ``"xs[3]"``.
        device: Device that the returned tensor lives on.

    Returns:
        (N, D) float64 tensor.

    Raises:
        ValueError: If `value` is not 2-D or has no examples or no features.
        TypeError: If `value` is complex or boolean.
        NonFiniteError: If `value` contains NaN or inf.
    """
    tensor = value.detach() if isinstance(value, torch.Tensor) else torch.as_tensor(np.asarray(value))
    if tensor.ndim != 2:
        raise ValueError(
            f"{name} must be a 2-D (examples, features) array, got {tensor.ndim}-D input of shape "
            f"{tuple(tensor.shape)}; flatten or pool the other dimensions first"
        )
    if tensor.shape[0] == 0 or tensor.shape[1] == 0:
        raise ValueError(f"{name} must have at least one example and one feature, got shape {tuple(tensor.shape)}")
    if tensor.is_complex() or tensor.dtype == torch.bool:
        raise TypeError(f"{name} must have a real numeric dtype, got {tensor.dtype}")

    tensor = tensor.to(device=device, dtype=torch.float64)
    # A NaN or inf anywhere makes the sum non-finite, so one reduction screens the common all-finite case. The exact
    # count below also covers finite values whose float64 sum overflows, for which it returns 0.
    if torch.isfinite(tensor.sum()):
        return tensor
    num_non_finite = int((~torch.isfinite(tensor)).sum())
    if num_non_finite:
        raise NonFiniteError(
            f"{name} contains {num_non_finite} non-finite values (NaN or inf) out of {tensor.numel()} "
            f"in shape {tuple(tensor.shape)}"
        )
    return tensor


def check_same_examples(reference: torch.Tensor, reference_name: str, other: torch.Tensor, other_name: str) -> None:
    """Raise ValueError unless `other` has as many examples (rows) as `reference`."""
    if other.shape[0] != reference.shape[0]:
        raise ValueError(
            f"{other_name} must have the same number of examples (rows) as {reference_name}: expected shape "
            f"({reference.shape[0]}, D), got {tuple(other.shape)}"
        )


def is_constant(x: torch.Tensor) -> bool:
    """Return whether every row of the (N, D) tensor `x` equals the first row (an all-zero layer included)."""
    return bool((x == x[:1]).all())


def centre(x: torch.Tensor, constant: bool) -> torch.Tensor:
    """Subtract the column means of the (N, D) tensor `x`.

    A constant input becomes exactly zero. Subtracting a float mean would leave rounding noise of order 1e-17 that
    the ratio-based measures would turn into an arbitrary score.
    """
    if constant:
        return torch.zeros_like(x)
    return x - x.mean(dim=0, keepdim=True)


def warn_constant(measure: str, names: Sequence[str], stacklevel: int) -> None:
    """Emit a ConstantInputWarning saying that the named inputs make `measure` 0/0.

    Args:
        measure: Public function name, for example ``"linear_cka"``.
        names: Names of the constant inputs.
        stacklevel: Passed to `warnings.warn`. Use 3 when calling from a public function, so that the warning points
            at the user's call.
    """
    listed = ", ".join(names)
    verb = "is" if len(names) == 1 else "are"
    warnings.warn(
        f"{measure}: {listed} {verb} constant across examples (for example an all-zero layer), so the similarity is "
        "0/0; returning NaN",
        ConstantInputWarning,
        stacklevel=stacklevel,
    )
