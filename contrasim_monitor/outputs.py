"""Output files and progress bars of the command line.

:class:`OutputFolder` writes the files of one command into the folder given by ``--out``. It checks every
file name before the command starts its work, so that an existing file is never replaced without
``--overwrite`` and no time is spent on a result that cannot be written.
"""

from __future__ import annotations

import csv
import io
import json
import os
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from .run_files import InputError

__all__ = ["OutputFolder", "Progress", "to_json_number"]


class Progress:
    """Make tqdm progress bars on standard error, or silent ones with ``--quiet`` or when it is not a terminal.

    Args:
        enabled: Show bars; None shows them only when standard error is a terminal.
    """

    def __init__(self, enabled: bool | None = None) -> None:
        self.enabled = sys.stderr.isatty() if enabled is None else enabled

    def bar(self, iterable: Iterable | None = None, total: int | None = None, description: str = ""):
        """Return a ``tqdm`` bar over ``iterable``, or one updated by hand when ``iterable`` is None."""
        from tqdm.auto import tqdm

        return tqdm(
            iterable,
            total=total,
            desc=description,
            disable=not self.enabled,
            file=sys.stderr,
            leave=False,
            dynamic_ncols=True,
        )


class OutputFolder:
    """The folder given by ``--out``, and the files a command will write into it.

    Args:
        folder: The folder; it is created (with its parents) at the first write.
        names: Names of every file the command may write, checked at once.
        overwrite: Replace existing files of those names.

    Raises:
        InputError: If ``folder`` is a file, or one of ``names`` exists and ``overwrite`` is False.
    """

    def __init__(self, folder: str | os.PathLike[str], names: Sequence[str], overwrite: bool) -> None:
        self.folder = Path(folder)
        if self.folder.exists() and not self.folder.is_dir():
            raise InputError(f"--out: {os.fspath(self.folder)!r} is a file; expected a folder.")
        existing = [name for name in names if (self.folder / name).exists()]
        if existing and not overwrite:
            listed = ", ".join(existing[:4]) + (", ..." if len(existing) > 4 else "")
            raise InputError(
                f"--out: {os.fspath(self.folder)!r} already contains {listed}. Pass --overwrite to replace them, "
                "or choose another folder."
            )
        self.names = set(names)
        self.written: list[Path] = []

    def path(self, name: str) -> Path:
        """Return the path of output file ``name``, which must be one of the names checked at construction."""
        if name not in self.names:
            raise KeyError(f"{name!r} was not among the output files checked for overwriting.")
        return self.folder / name

    def write_text(self, name: str, text: str) -> Path:
        return self._write_bytes(name, text.encode("utf-8"))

    def write_json(self, name: str, document: object) -> Path:
        return self.write_text(name, json.dumps(document, indent=1, allow_nan=False) + "\n")

    def write_csv(self, name: str, header: Sequence[str], rows: Iterable[Sequence[object]]) -> Path:
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)
        return self.write_text(name, buffer.getvalue())

    def write_png(self, name: str, image: np.ndarray) -> Path:
        """Write an RGB image of shape ``(H, W, 3)``, dtype uint8, as PNG."""
        from PIL import Image

        buffer = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8)).save(buffer, format="PNG")
        return self._write_bytes(name, buffer.getvalue())

    def _write_bytes(self, name: str, payload: bytes) -> Path:
        """Write through a temporary file and a rename, so an interrupted run leaves no half-written output."""
        path = self.path(name)
        self.folder.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            temporary.write_bytes(payload)
            os.replace(temporary, path)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
        self.written.append(path)
        return path


def to_json_number(value: float) -> float | None:
    """Return ``value`` as a float for JSON, or None for NaN and infinity, which JSON cannot hold."""
    value = float(value)
    return value if np.isfinite(value) else None
