"""Find what a monitored run left on disk: its snapshot store, its ``contrasim.jsonl`` and its model folders.

The command line accepts several kinds of folder wherever it needs a run, and this module distinguishes them:

- a snapshot store (it contains ``index.json``);
- a run's TensorBoard folder, with the store in ``snapshots/`` and ``contrasim.jsonl`` beside it;
- a Trainer output folder whose ``runs/`` contains exactly one such run folder, or whose newest checkpoint
  records where the run's store is;
- a Trainer checkpoint, which is a model folder (``config.json``) that may contain ``contrasim_monitor.json``,
  the file in which the Trainer callback records the run's store and TensorBoard folder;
- any other saved Hugging Face model folder (``config.json``).

Nothing here writes to the folders it reads.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from .store import INDEX_NAME, SnapshotStore

__all__ = [
    "CHECKPOINT_STATE_FILE",
    "RECORDS_NAME",
    "InputError",
    "RunLocation",
    "locate_run",
    "read_records",
]

#: File that ``ContraSimCallback`` writes into each Trainer checkpoint (``integrations.transformers.STATE_FILE``).
CHECKPOINT_STATE_FILE = "contrasim_monitor.json"
#: The JSON lines file of capture results that the monitor writes into the run's TensorBoard folder.
RECORDS_NAME = "contrasim.jsonl"
MODEL_CONFIG_NAME = "config.json"
_CHECKPOINT_NAME = re.compile(r"checkpoint-(\d+)")


class InputError(ValueError):
    """Invalid input from the user: a missing folder, an unusable file, or inputs that do not match.

    The command line exits with status 2 on this error and with 1 on any other failure.
    """


@dataclass
class RunLocation:
    """The kind of one folder given on the command line, and the run files found for it.

    Attributes:
        path: The folder as given.
        kind: ``"store"`` for a snapshot store or a run folder that contains one, ``"model"`` for a model folder
            (a Trainer checkpoint or a ``save_pretrained`` folder).
        store_dir: Folder of the run's snapshot store, or None when none was found.
        records_path: Path of the run's ``contrasim.jsonl``, or None when none was found.
        model_dir: The model folder, for ``kind == "model"``.
        checkpoint_step: Optimizer step of a Trainer checkpoint, or None.
    """

    path: Path
    kind: str
    store_dir: Path | None = None
    records_path: Path | None = None
    model_dir: Path | None = None
    checkpoint_step: int | None = None

    def open_store(self) -> SnapshotStore:
        """Open the run's snapshot store.

        Raises:
            InputError: If the run has no store, or its index is invalid.
        """
        if self.store_dir is None:
            raise InputError(f"{os.fspath(self.path)}: no snapshot store was found for this run.")
        try:
            return SnapshotStore.open(self.store_dir)
        except (FileNotFoundError, ValueError) as error:
            raise InputError(f"{os.fspath(self.store_dir)}: cannot open the snapshot store: {error}") from error


def locate_run(path: str | os.PathLike[str], role: str = "RUN") -> RunLocation:
    """Tell which kind of folder ``path`` is, and find the run's store and ``contrasim.jsonl``.

    Args:
        path: A folder given on the command line.
        role: The argument's name in error messages, such as ``"A"`` or ``"RUN"``.

    Raises:
        InputError: If the folder is missing, is a file, or contains neither a store nor a model.
    """
    folder = Path(path)
    if not folder.exists():
        raise InputError(f"{role}: folder {os.fspath(folder)!r} not found.")
    if not folder.is_dir():
        raise InputError(f"{role}: {os.fspath(folder)!r} is a file; expected a folder (a run, a store or a model).")

    if (folder / MODEL_CONFIG_NAME).is_file():
        return _model_location(folder)
    if (folder / INDEX_NAME).is_file():
        return RunLocation(folder, "store", store_dir=folder, records_path=_records_beside(folder.parent))
    if (folder / "snapshots" / INDEX_NAME).is_file():
        return RunLocation(folder, "store", store_dir=folder / "snapshots", records_path=_records_beside(folder))

    run_folders = sorted(index.parent.parent for index in folder.glob(f"runs/*/snapshots/{INDEX_NAME}"))
    if len(run_folders) == 1:
        run = run_folders[0]
        return RunLocation(folder, "store", store_dir=run / "snapshots", records_path=_records_beside(run))
    if len(run_folders) > 1:
        listed = ", ".join(os.fspath(run) for run in run_folders[:5])
        raise InputError(
            f"{role}: {os.fspath(folder)!r} contains {len(run_folders)} monitored runs ({listed}). Pass one of them."
        )

    checkpoints = sorted(
        (p for p in folder.iterdir() if _CHECKPOINT_NAME.fullmatch(p.name) and p.is_dir()),
        key=lambda p: int(p.name.split("-")[1]),
    )
    if checkpoints:
        # A Trainer output folder whose run folder is elsewhere: its newest checkpoint records where.
        newest = _model_location(checkpoints[-1])
        if newest.store_dir is not None:
            return RunLocation(folder, "store", store_dir=newest.store_dir, records_path=newest.records_path)
    hint = f" It contains Trainer checkpoints such as {os.fspath(checkpoints[-1])!r}." if checkpoints else ""
    raise InputError(
        f"{role}: {os.fspath(folder)!r} is neither a snapshot store ({INDEX_NAME}), a monitored run folder "
        f"(snapshots/{INDEX_NAME}) nor a model folder ({MODEL_CONFIG_NAME}).{hint}"
    )


def read_records(path: Path | None) -> list[dict]:
    """Read the capture records of ``contrasim.jsonl`` in step order; an absent file gives an empty list.

    Raises:
        InputError: If a line is not a JSON object with a ``step``.
    """
    if path is None or not path.is_file():
        return []
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise InputError(f"{os.fspath(path)}, line {number}: invalid JSON ({error}).") from error
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise InputError(f"{os.fspath(path)}, line {number}: expected a capture record with an integer `step`.")
        records.append(record)
    return sorted(records, key=lambda record: record["step"])


def _records_beside(folder: Path) -> Path | None:
    path = folder / RECORDS_NAME
    return path if path.is_file() else None


def _model_location(folder: Path) -> RunLocation:
    """Describe a model folder, and find its run's store through ``contrasim_monitor.json`` when it has one."""
    location = RunLocation(folder, "model", model_dir=folder)
    match = _CHECKPOINT_NAME.fullmatch(folder.resolve().name)
    if match:
        location.checkpoint_step = int(match.group(1))
    state_path = folder / CHECKPOINT_STATE_FILE
    if not state_path.is_file():
        return location
    try:
        state = json.loads(state_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InputError(f"{os.fspath(state_path)}: cannot read the monitor state ({error}).") from error
    if not isinstance(state, dict):
        raise InputError(f"{os.fspath(state_path)}: expected a JSON object, got {type(state).__name__}.")
    if isinstance(state.get("step"), int):
        location.checkpoint_step = state["step"]
    store_dir = _find_recorded_folder(state.get("store_dir"), folder, INDEX_NAME)
    if store_dir is not None:
        location.store_dir = store_dir
    log_dir = _find_recorded_folder(state.get("log_dir"), folder, RECORDS_NAME)
    if log_dir is not None:
        location.records_path = log_dir / RECORDS_NAME
    elif store_dir is not None:
        location.records_path = _records_beside(store_dir.parent)
    return location


def _find_recorded_folder(recorded: object, checkpoint: Path, marker: str) -> Path | None:
    """Find a folder that ``contrasim_monitor.json`` recorded, which must contain ``marker``.

    The path was recorded as the training process saw it, often relative to its working folder. When it does not
    resolve from here, its trailing parts are tried under the checkpoint's parent (the Trainer output folder),
    so that a run folder moved or copied as a whole is still found.
    """
    if not isinstance(recorded, str) or not recorded:
        return None
    recorded_path = Path(recorded)
    if (recorded_path / marker).exists():
        return recorded_path
    parts = recorded_path.parts
    for start in range(len(parts)):
        candidate = checkpoint.parent.joinpath(*parts[start:])
        if (candidate / marker).exists():
            return candidate
    return None
