"""A snapshot store on disk that keeps every capture of a run, so that any two checkpoints can be compared later.

Layout of a store folder::

    index.json                  format version, probe fingerprint, layer names, dtype, one entry per snapshot
    probe.json                  the probe set's model inputs and capture settings, when the writer stored them
    step_00001200.safetensors   one capture: a tensor per layer, keyed by layer name, plus string metadata
    .lock                       locked with flock(2) while a process changes the store (POSIX only)

Crash safety: every file is written to a temporary name in the same folder, flushed, fsynced and renamed with
``os.replace``. A snapshot file is renamed into place before the index that lists it is written, and files that
retention drops are deleted only after the index without them is written. So a process killed at any point
leaves an ``index.json`` that lists only complete snapshot files. A leftover temporary file is removed when the
store is next opened, and a snapshot file that the index does not list is ignored.

Snapshot files are read with safetensors only, so loading a store never unpickles anything.
"""

from __future__ import annotations

import contextlib
import json
import logging
import operator
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as serialize_safetensors

try:
    import fcntl
except ImportError:  # Windows has no flock, so concurrent processes are not serialized there.
    fcntl = None

logger = logging.getLogger(__name__)

__all__ = ["FORMAT_VERSION", "INDEX_NAME", "PROBE_NAME", "STORE_DTYPES", "SnapshotStore"]

#: Version of the index and snapshot layout. Opening a store with a higher version raises a ValueError.
FORMAT_VERSION = 1
INDEX_NAME = "index.json"
#: The probe set's model inputs, so that a model folder can later be captured on the same examples.
PROBE_NAME = "probe.json"
LOCK_NAME = ".lock"
#: Storage dtypes by name. Activations are converted from float32 at write time.
STORE_DTYPES: dict[str, torch.dtype] = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
}
# Reserved by the safetensors header format for the metadata dict, so it cannot be a tensor name.
_SAFETENSORS_METADATA_KEY = "__metadata__"
_SNAPSHOT_NAME = re.compile(r"step_(\d{8,})\.safetensors")
# Temporary files written by `_write_atomic`: "." + final name + "." + writer's pid + ".tmp".
_TEMP_NAME = re.compile(r"\.(step_\d{8,}\.safetensors|index\.json|probe\.json)\.\d+\.tmp")


def snapshot_file_name(step: int) -> str:
    """Return the file name of the snapshot at ``step``, zero-padded to at least 8 digits."""
    return f"step_{step:08d}.safetensors"


@dataclass(frozen=True)
class SnapshotEntry:
    """One snapshot as listed in the index: its step, file name, size in bytes and per-layer storage dtype."""

    step: int
    file: str
    bytes: int
    layer_dtypes: dict[str, str]

    def to_json(self) -> dict:
        return {"step": self.step, "file": self.file, "bytes": self.bytes, "layer_dtypes": dict(self.layer_dtypes)}


class SnapshotStore:
    """Keep every capture of a run on disk, one safetensors file per step, listed in ``index.json``.

    Constructing a store on a folder that already contains one reopens it, so a resumed run continues the same
    series. :meth:`open` reopens an existing store and takes the dtype from its index.

    Retention always keeps the first and the newest snapshot. When ``max_snapshots`` or ``max_bytes`` is
    exceeded after a write, it repeatedly removes the interior snapshot whose neighbours are closest together in
    step (ties go to the older one), so that what remains covers the run evenly on the step axis. The limits are
    applied at each write, not when a store is opened.

    NOTE: One process should write a store at a time. Writes from several processes are serialized by a file
    lock where flock(2) exists, but each store object keeps its own copy of the index, so a second writer would
    overwrite the first one's entries.

    Args:
        root: Folder of the store. It is created, with its parents, if missing.
        dtype: Storage dtype, one of ``"float16"``, ``"bfloat16"`` and ``"float32"`` (or the matching torch
            dtype). A layer whose finite values overflow the storage dtype is stored in float32 instead, and
            the index records that layer's dtype.
        max_snapshots: Maximum number of snapshots kept, at least 2 (the first and the newest), or None for no
            limit.
        max_bytes: Maximum total size in bytes of the snapshot files (``index.json`` not counted), or None for
            no limit. The first and newest snapshots are kept even when they alone exceed it.

    Raises:
        TypeError: If an argument has the wrong type.
        ValueError: If an argument is out of range, ``root`` is not a folder, or the folder contains a store
            with another dtype or an invalid index.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        dtype: str | torch.dtype = "float16",
        max_snapshots: int | None = None,
        max_bytes: int | None = None,
    ) -> None:
        self._root = _validate_root(root)
        self._dtype = _validate_dtype(dtype)
        self._max_snapshots = _validate_limit("max_snapshots", max_snapshots, minimum=2)
        self._max_bytes = _validate_limit("max_bytes", max_bytes, minimum=1)
        self._fingerprint: str | None = None
        self._layers: list[str] | None = None
        self._entries: list[SnapshotEntry] = []
        self._warned_overflow: set[str] = set()
        self._warned_byte_limit = False

        self._root.mkdir(parents=True, exist_ok=True)
        index_exists = self.index_path.is_file()
        # An existing store may sit on a read-only file system, where it can still be read without the lock.
        with self._exclusive_lock(optional=index_exists) as locked:
            if index_exists:
                self._read_index()
                if locked:
                    self._remove_temp_files()
            else:
                self._write_index(self._entries, self._fingerprint, self._layers)
        self._report_unlisted_snapshots()

    @classmethod
    def open(
        cls,
        root: str | os.PathLike[str],
        *,
        max_snapshots: int | None = None,
        max_bytes: int | None = None,
    ) -> SnapshotStore:
        """Open an existing store with the dtype recorded in its index.

        Raises:
            FileNotFoundError: If ``root`` contains no ``index.json``.
        """
        index_path = _validate_root(root) / INDEX_NAME
        if not index_path.is_file():
            raise FileNotFoundError(
                f"No snapshot store at {os.fspath(root)!r}: {INDEX_NAME} is missing. Pass the folder a "
                "SnapshotStore was created in, or construct SnapshotStore(root, dtype=...) to start a new one."
            )
        dtype = _read_index_file(index_path)["dtype"]
        return cls(root, dtype=dtype, max_snapshots=max_snapshots, max_bytes=max_bytes)

    # Properties and queries.

    @property
    def root(self) -> Path:
        """Folder of the store."""
        return self._root

    @property
    def index_path(self) -> Path:
        """Path of ``index.json``."""
        return self._root / INDEX_NAME

    @property
    def dtype(self) -> str:
        """Name of the storage dtype of new snapshots."""
        return self._dtype

    @property
    def max_snapshots(self) -> int | None:
        """Maximum number of snapshots that retention keeps, or None."""
        return self._max_snapshots

    @property
    def max_bytes(self) -> int | None:
        """Maximum total size in bytes of the snapshot files that retention keeps, or None."""
        return self._max_bytes

    @property
    def fingerprint(self) -> str | None:
        """Fingerprint of the probe set, fixed by the first write, or None before it."""
        return self._fingerprint

    @property
    def layers(self) -> list[str] | None:
        """Layer names in the order of the first write, or None before it."""
        return None if self._layers is None else list(self._layers)

    def steps(self) -> list[int]:
        """Return the steps of the stored snapshots in increasing order."""
        return [entry.step for entry in self._entries]

    def latest_step(self) -> int | None:
        """Return the step of the newest snapshot, or None if the store is empty."""
        return self._entries[-1].step if self._entries else None

    def total_bytes(self) -> int:
        """Return the total size in bytes of the snapshot files listed in the index."""
        return sum(entry.bytes for entry in self._entries)

    def entries(self) -> list[SnapshotEntry]:
        """Return the index entries of the stored snapshots in increasing step order."""
        return list(self._entries)

    def layer_dtypes(self, step: int) -> dict[str, str]:
        """Return the storage dtype name of each layer in the snapshot at ``step``."""
        return dict(self._find_entry(step).layer_dtypes)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"SnapshotStore({os.fspath(self._root)!r}, dtype={self._dtype!r}, snapshots={len(self._entries)})"

    def check_fingerprint(self, fingerprint: str) -> None:
        """Raise if ``fingerprint`` differs from the probe fingerprint of the store. An empty store accepts any.

        Raises:
            ValueError: If the probe sets differ.
        """
        _validate_fingerprint(fingerprint)
        if self._fingerprint is None or fingerprint == self._fingerprint:
            return
        raise ValueError(
            f"The probe sets differ: the snapshot store at {os.fspath(self._root)!r} contains captures of the probe "
            f"set with fingerprint {self._fingerprint[:12]}..., but this probe set has fingerprint "
            f"{fingerprint[:12]}.... Build the probe set from the same examples, or use a new store folder."
        )

    # Writing.

    def write(self, step: int, activations: Mapping[str, torch.Tensor], fingerprint: str) -> None:
        """Store one capture, then apply retention.

        Args:
            step: Optimizer step of the capture. It must be greater than every stored step.
            activations: Layer name to pooled activations of shape ``(N, D)``, on any device. They are moved
                to the CPU and converted to the storage dtype.
            fingerprint: Fingerprint of the probe set (:meth:`ProbeSet.fingerprint`). The first write fixes it,
                and the layer names, for the life of the store.

        Raises:
            TypeError: If an argument has the wrong type.
            ValueError: If the step does not increase, the activations are not floating-point ``(N, D)``
                tensors with one N, or the fingerprint or layer names differ from the stored ones.
        """
        step = _validate_step("step", step)
        _validate_fingerprint(fingerprint)
        _validate_activations(activations)
        latest = self.latest_step()
        if latest is not None and step <= latest:
            raise ValueError(
                f"Snapshot steps must increase: got step {step}, but the store already contains step {latest}. "
                "To continue from an earlier checkpoint, call truncate_after(checkpoint_step) first."
            )
        self.check_fingerprint(fingerprint)
        layers = self._check_layers(step, activations)

        tensors: dict[str, torch.Tensor] = {}
        layer_dtypes: dict[str, str] = {}
        for name in layers:
            tensors[name], layer_dtypes[name] = self._convert(name, step, activations[name])
        metadata = {
            "format_version": str(FORMAT_VERSION),
            "step": str(step),
            "dtype": self._dtype,
            "fingerprint": fingerprint,
        }
        payload = serialize_safetensors(tensors, metadata=metadata)
        entry = SnapshotEntry(step, snapshot_file_name(step), len(payload), layer_dtypes)

        with self._exclusive_lock():
            _write_atomic(self._root / entry.file, payload)
            kept, removed = self._apply_retention([*self._entries, entry])
            self._write_index(kept, fingerprint, layers)
            self._fingerprint, self._layers, self._entries = fingerprint, layers, kept
            self._delete_files(removed)
        if removed:
            logger.debug("Retention removed snapshots at steps %s from %s.", [e.step for e in removed], self._root)

    def truncate_after(self, step: int) -> list[int]:
        """Drop every snapshot later than ``step``, for a run that resumes from the checkpoint at ``step``.

        The probe fingerprint and layer names stay fixed even if no snapshot remains.

        Returns:
            The steps that were dropped.
        """
        step = _validate_step("step", step, allow_negative=True)
        with self._exclusive_lock():
            kept = [entry for entry in self._entries if entry.step <= step]
            removed = self._entries[len(kept) :]
            if removed:
                self._write_index(kept, self._fingerprint, self._layers)
                self._entries = kept
                self._delete_files(removed)
        dropped = [entry.step for entry in removed]
        if dropped:
            logger.info(
                "Dropped snapshots at steps %s from %s: they are later than step %d.", dropped, self._root, step
            )
        return dropped

    def write_probe(
        self,
        examples: Sequence[Mapping[str, Any]],
        fingerprint: str,
        settings: Mapping[str, Any] | None = None,
    ) -> None:
        """Keep the probe set's model inputs in ``probe.json``, replacing an earlier copy.

        With the inputs stored, a saved model can later be captured on the same examples, as
        ``contrasim-monitor compare`` does when it is given a model folder and no ``--probe``.

        Args:
            examples: Tokenized examples (``ProbeSet.examples``). Label keys are dropped, and tensors and arrays
                are stored as nested lists.
            fingerprint: ``ProbeSet.fingerprint()`` of the examples. It must equal the store's fingerprint once
                a snapshot fixed it.
            settings: JSON-serialisable capture settings stored as they are, such as ``{"pooling": "mean",
                "tokens_per_example": 8, "seed": 0, "held_out_fraction": 0.25}``.

        Raises:
            ValueError: If the fingerprint differs from the store's or a value cannot be stored as JSON.
        """
        from .probe import LABEL_KEYS

        _validate_fingerprint(fingerprint)
        self.check_fingerprint(fingerprint)
        rows = []
        for example in examples:
            rows.append({key: _json_value(value) for key, value in example.items() if key not in LABEL_KEYS})
        document = {
            "format_version": FORMAT_VERSION,
            "fingerprint": fingerprint,
            "settings": dict(settings or {}),
            "examples": rows,
        }
        try:
            payload = json.dumps(document, separators=(",", ":")).encode()
        except TypeError as err:
            raise ValueError(f"The probe set cannot be stored as JSON: {err}.") from err
        with self._exclusive_lock():
            _write_atomic(self._root / PROBE_NAME, payload + b"\n")

    # Reading.

    def read_probe(self) -> dict | None:
        """Read ``probe.json``: a dict with ``fingerprint``, ``settings`` and ``examples``, or None when absent.

        Raises:
            ValueError: If the file is not valid JSON or lacks a field.
        """
        path = self._root / PROBE_NAME
        if not path.is_file():
            return None
        try:
            document = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"{os.fspath(path)!r} is not a valid probe file: {err}.") from err
        if not isinstance(document, dict) or not isinstance(document.get("examples"), list):
            raise ValueError(f"{os.fspath(path)!r} is not a valid probe file: it has no list of `examples`.")
        if not isinstance(document.get("fingerprint"), str) or not isinstance(document.get("settings", {}), dict):
            raise ValueError(f"{os.fspath(path)!r} is not a valid probe file: `fingerprint` or `settings` is invalid.")
        return {
            "fingerprint": document["fingerprint"],
            "settings": document.get("settings", {}),
            "examples": document["examples"],
        }

    def load(
        self,
        step: int,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = torch.float32,
    ) -> dict[str, torch.Tensor]:
        """Load the snapshot at ``step`` as a dict from layer name to ``(N, D)`` tensor, in layer order.

        Args:
            step: A step listed by :meth:`steps`.
            device: Device of the returned tensors.
            dtype: Floating-point dtype of the returned tensors, or None to keep each layer's storage dtype.

        Raises:
            KeyError: If the store contains no snapshot at ``step``.
            FileNotFoundError: If the snapshot file is missing.
            ValueError: If the file is not a valid safetensors file or does not match its index entry.
            TypeError: If ``dtype`` is not a floating-point torch.dtype or None.
        """
        if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
            raise TypeError(f"`dtype` must be a floating-point torch.dtype or None, got {dtype!r}.")
        device = torch.device(device)
        entry = self._find_entry(step)
        path = self._root / entry.file
        if not path.is_file():
            raise FileNotFoundError(
                f"Snapshot file {os.fspath(path)!r} for step {entry.step} is listed in {INDEX_NAME} but missing. "
                "Another process may have removed it. Reopen the store with SnapshotStore.open to reread the index."
            )
        try:
            with safe_open(os.fspath(path), framework="pt", device="cpu") as snapshot:
                self._check_snapshot_file(entry, path, snapshot.metadata() or {}, set(snapshot.keys()))
                tensors = {name: snapshot.get_tensor(name) for name in self._layers}
        except SafetensorError as err:
            raise ValueError(
                f"Snapshot file {os.fspath(path)!r} for step {entry.step} is not a valid safetensors file ({err}). "
                "It is damaged or was replaced. The store reads only safetensors and never unpickles."
            ) from err
        return {
            name: tensor.to(device=device, dtype=tensor.dtype if dtype is None else dtype)
            for name, tensor in tensors.items()
        }

    # Internals.

    def _find_entry(self, step: int) -> SnapshotEntry:
        step = _validate_step("step", step, allow_negative=True)
        for entry in self._entries:
            if entry.step == step:
                return entry
        available = self.steps()
        shown = available if len(available) <= 10 else [*available[:5], "...", *available[-5:]]
        raise KeyError(f"No snapshot at step {step} in {os.fspath(self._root)!r}. Stored steps: {shown}.")

    def _check_layers(self, step: int, activations: Mapping[str, torch.Tensor]) -> list[str]:
        """Return the layer order of the store, fixed by the first write, and raise if the layer names differ."""
        if self._layers is None:
            return list(activations)
        missing = [name for name in self._layers if name not in activations]
        unexpected = [name for name in activations if name not in self._layers]
        if missing or unexpected:
            raise ValueError(
                f"Capture at step {step} has different layers than the store at {os.fspath(self._root)!r}: "
                f"missing {missing}, unexpected {unexpected}. The first capture fixed the layers to "
                f"{self._layers}. Use a new store folder for another layer selection."
            )
        return list(self._layers)

    def _convert(self, name: str, step: int, tensor: torch.Tensor) -> tuple[torch.Tensor, str]:
        """Convert one layer to the storage dtype, or keep float32 where finite values would become inf."""
        values = tensor.detach().to(device="cpu", dtype=torch.float32)
        target = STORE_DTYPES[self._dtype]
        if target is not torch.float32:
            converted = values.to(target)
            overflow = torch.isinf(converted) & torch.isfinite(values)
            if not bool(overflow.any()):
                return converted.contiguous(), self._dtype
            if name not in self._warned_overflow:
                self._warned_overflow.add(name)
                logger.warning(
                    "Layer %r at step %d has %d finite values beyond the %s range (largest magnitude %.4g). "
                    "Storing this layer in float32 instead. Reported once per layer.",
                    name,
                    step,
                    int(overflow.sum()),
                    self._dtype,
                    float(values[torch.isfinite(values)].abs().max()),
                )
        # A copy, so that no two stored layers share memory (safetensors rejects shared tensors).
        return values.clone(memory_format=torch.contiguous_format), "float32"

    def _apply_retention(self, entries: list[SnapshotEntry]) -> tuple[list[SnapshotEntry], list[SnapshotEntry]]:
        """Split ``entries`` into the snapshots to keep and those to remove under the retention limits."""
        kept = list(entries)
        removed: list[SnapshotEntry] = []
        while len(kept) > 2 and self._over_limit(kept):
            # Removing snapshot i leaves a gap from step i-1 to step i+1, so remove the one whose gap is
            # smallest. min() returns the first minimum, which is the older snapshot on a tie.
            position = min(range(1, len(kept) - 1), key=lambda i: kept[i + 1].step - kept[i - 1].step)
            removed.append(kept.pop(position))
        kept_bytes = sum(e.bytes for e in kept)
        if self.max_bytes is not None and kept_bytes > self.max_bytes and not self._warned_byte_limit:
            self._warned_byte_limit = True
            logger.warning(
                "The first and newest snapshots of %s, which retention always keeps, take %d bytes, more than "
                "max_bytes=%d. Raise max_bytes or choose a smaller dtype. Reported once per store.",
                self._root,
                kept_bytes,
                self.max_bytes,
            )
        return kept, removed

    def _over_limit(self, entries: list[SnapshotEntry]) -> bool:
        if self.max_snapshots is not None and len(entries) > self.max_snapshots:
            return True
        return self.max_bytes is not None and sum(e.bytes for e in entries) > self.max_bytes

    def _check_snapshot_file(self, entry: SnapshotEntry, path: Path, metadata: dict[str, str], keys: set[str]):
        """Raise a ValueError if a snapshot file's metadata or tensor names do not match its index entry."""
        problems = []
        if metadata.get("step") != str(entry.step):
            problems.append(f"its metadata has step {metadata.get('step')!r}, the index {entry.step}")
        if metadata.get("fingerprint") != self._fingerprint:
            problems.append(
                f"its probe fingerprint {str(metadata.get('fingerprint'))[:12]!r} differs from the store's "
                f"{str(self._fingerprint)[:12]!r}"
            )
        if keys != set(self._layers or []):
            problems.append(f"it holds layers {sorted(keys)}, the index lists {self._layers}")
        if problems:
            raise ValueError(
                f"Snapshot file {os.fspath(path)!r} does not match its entry in {INDEX_NAME}: "
                + "; ".join(problems)
                + ". The file was replaced or the index belongs to another store."
            )

    def _read_index(self) -> None:
        index = _read_index_file(self.index_path)
        if index["dtype"] != self._dtype:
            raise ValueError(
                f"The snapshot store at {os.fspath(self._root)!r} stores {index['dtype']}, but `dtype` is "
                f"{self._dtype!r}. Pass dtype={index['dtype']!r}, open it with SnapshotStore.open, or use a new "
                "folder."
            )
        self._fingerprint = index["fingerprint"]
        self._layers = index["layers"]
        self._entries = index["snapshots"]

    def _write_index(self, entries: list[SnapshotEntry], fingerprint: str | None, layers: list[str] | None) -> None:
        index = {
            "format_version": FORMAT_VERSION,
            "fingerprint": fingerprint,
            "layers": layers,
            "dtype": self._dtype,
            "snapshots": [entry.to_json() for entry in entries],
        }
        _write_atomic(self.index_path, (json.dumps(index, indent=1) + "\n").encode())

    def _delete_files(self, entries: list[SnapshotEntry]) -> None:
        """Delete snapshot files that the index no longer lists.

        A failure is logged, not raised, because a leftover file only wastes space.
        """
        for entry in entries:
            try:
                (self._root / entry.file).unlink(missing_ok=True)
            except OSError as err:
                logger.warning("Could not delete dropped snapshot file %s: %s", self._root / entry.file, err)

    def _remove_temp_files(self) -> None:
        """Remove temporary files left by a process killed during a write. Call only while holding the lock."""
        for path in self._root.iterdir():
            if _TEMP_NAME.fullmatch(path.name):
                logger.info("Removing %s, left by an interrupted write.", path)
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()

    def _report_unlisted_snapshots(self) -> None:
        listed = {entry.file for entry in self._entries}
        unlisted = sorted(
            path.name
            for path in self._root.iterdir()
            if _SNAPSHOT_NAME.fullmatch(path.name) and path.name not in listed
        )
        if unlisted:
            logger.warning(
                "%s contains %d snapshot file(s) that %s does not list, left by an interrupted write or retention: %s. "
                "They are ignored. Delete them to free space.",
                self._root,
                len(unlisted),
                INDEX_NAME,
                unlisted[:5] + (["..."] if len(unlisted) > 5 else []),
            )

    @contextlib.contextmanager
    def _exclusive_lock(self, optional: bool = False) -> Iterator[bool]:
        """Hold an exclusive flock on the store's lock file, and yield whether this process may change the store.

        With ``optional=True``, a lock file that cannot be created (read-only folder) yields False instead of
        raising. Without flock (Windows) nothing is locked and this yields True.
        """
        if fcntl is None:
            # NOTE: Without a lock, a process opening the store removes temporary files of a concurrent writer.
            yield True
            return
        try:
            descriptor = os.open(self._root / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            if not optional:
                raise
            logger.debug("Reading %s without a lock: %s", self._root, err)
            yield False
            return
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX)
            yield True
        finally:
            os.close(descriptor)  # closing the descriptor releases the lock


def _write_atomic(path: Path, payload: bytes) -> None:
    """Write ``payload`` to ``path`` through a temporary file in the same folder, fsynced, then renamed."""
    temp_path = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temp_path, "wb") as file:
            file.write(payload)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp_path, path)
    except BaseException:
        with contextlib.suppress(OSError):
            temp_path.unlink()
        raise
    _fsync_folder(path.parent)


def _fsync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable. Does nothing where folders cannot be opened (Windows)."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def _read_index_file(path: Path) -> dict:
    """Read and validate ``index.json``, returning its fields with entries as :class:`SnapshotEntry` objects.

    Raises:
        ValueError: If the file is not valid JSON or not a snapshot index of a known format version.
    """
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{os.fspath(path)!r} is not a valid snapshot index: {err}.") from err

    def invalid(problem: str) -> ValueError:
        return ValueError(f"{os.fspath(path)!r} is not a valid snapshot index: {problem}.")

    if not isinstance(index, dict):
        raise invalid(f"expected a JSON object, got {type(index).__name__}")
    version = index.get("format_version")
    if not isinstance(version, int):
        raise invalid(f"`format_version` is {version!r}, expected an integer")
    if version > FORMAT_VERSION:
        raise ValueError(
            f"{os.fspath(path)!r} has format version {version}, but this version of contrasim-monitor reads "
            f"version {FORMAT_VERSION} at most. Upgrade contrasim-monitor to read it."
        )
    if index.get("dtype") not in STORE_DTYPES:
        raise invalid(f"`dtype` is {index.get('dtype')!r}, expected one of {list(STORE_DTYPES)}")
    fingerprint, layers = index.get("fingerprint"), index.get("layers")
    if fingerprint is not None and not isinstance(fingerprint, str):
        raise invalid(f"`fingerprint` is {fingerprint!r}, expected a string or null")
    if layers is not None and (not isinstance(layers, list) or not all(isinstance(n, str) for n in layers)):
        raise invalid(f"`layers` is {layers!r}, expected a list of strings or null")
    raw_entries = index.get("snapshots")
    if not isinstance(raw_entries, list):
        raise invalid(f"`snapshots` is {raw_entries!r}, expected a list")

    entries = []
    for raw in raw_entries:
        try:
            entry = SnapshotEntry(
                step=operator.index(raw["step"]),
                file=raw["file"],
                bytes=operator.index(raw["bytes"]),
                layer_dtypes=dict(raw["layer_dtypes"]),
            )
        except (TypeError, KeyError, ValueError) as err:
            raise invalid(f"snapshot entry {raw!r} is malformed ({err!r})") from err
        # Retention deletes the files that entries name, so an entry may only name its own snapshot file.
        if entry.file != snapshot_file_name(entry.step):
            raise invalid(
                f"entry for step {entry.step} names file {entry.file!r}, expected {snapshot_file_name(entry.step)!r}"
            )
        if entries and entry.step <= entries[-1].step:
            raise invalid(f"steps are not increasing ({entries[-1].step} then {entry.step})")
        entries.append(entry)
    if entries and (fingerprint is None or layers is None):
        raise invalid("it lists snapshots but no probe fingerprint or layers")
    return {"dtype": index["dtype"], "fingerprint": fingerprint, "layers": layers, "snapshots": entries}


def _json_value(value: object) -> object:
    """Return a probe field as JSON: tensors and arrays as nested lists, anything else unchanged."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().tolist()
    if hasattr(value, "tolist"):  # numpy arrays and scalars
        return value.tolist()
    return value


def _validate_root(root: object) -> Path:
    if not isinstance(root, (str, os.PathLike)):
        raise TypeError(f"`root` must be a folder path (str or os.PathLike), got {type(root).__name__}.")
    path = Path(root)
    if path.exists() and not path.is_dir():
        raise ValueError(f"`root` must be a folder, but {os.fspath(path)!r} exists and is not a folder.")
    return path


def _validate_dtype(dtype: object) -> str:
    for name, torch_dtype in STORE_DTYPES.items():
        if dtype == name or dtype is torch_dtype:
            return name
    if isinstance(dtype, (str, torch.dtype)):
        raise ValueError(f"`dtype` must be one of {list(STORE_DTYPES)}, got {dtype!r}.")
    raise TypeError(f"`dtype` must be a string such as 'float16' or a torch.dtype, got {type(dtype).__name__}.")


def _validate_limit(argument: str, value: object, minimum: int) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool):
        raise TypeError(f"`{argument}` must be an integer or None, got {value!r}.")
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"`{argument}` must be an integer or None, got {type(value).__name__} {value!r}.") from None
    if value < minimum:
        raise ValueError(f"`{argument}` must be at least {minimum}, got {value}.")
    return value


def _validate_step(argument: str, step: object, allow_negative: bool = False) -> int:
    if isinstance(step, bool):
        raise TypeError(f"`{argument}` must be an integer, got {step!r}.")
    try:
        step = operator.index(step)
    except TypeError:
        raise TypeError(f"`{argument}` must be an integer, got {type(step).__name__} {step!r}.") from None
    if step < 0 and not allow_negative:
        raise ValueError(f"`{argument}` must be a non-negative optimizer step, got {step}.")
    return step


def _validate_fingerprint(fingerprint: object) -> None:
    if not isinstance(fingerprint, str):
        raise TypeError(f"`fingerprint` must be a string (ProbeSet.fingerprint()), got {type(fingerprint).__name__}.")
    if not fingerprint:
        raise ValueError("`fingerprint` is an empty string. Pass ProbeSet.fingerprint() of the probe set.")


def _validate_activations(activations: object) -> None:
    if not isinstance(activations, Mapping):
        raise TypeError(f"`activations` must be a mapping from layer name to tensor, got {type(activations).__name__}.")
    if not activations:
        raise ValueError("`activations` is empty. A capture needs at least one layer.")
    num_examples = None
    for name, tensor in activations.items():
        if not isinstance(name, str) or not name:
            raise TypeError(f"Layer names in `activations` must be non-empty strings, got {name!r}.")
        if name == _SAFETENSORS_METADATA_KEY:
            raise ValueError(f"{name!r} is reserved by the safetensors format and cannot be a layer name.")
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"`activations[{name!r}]` must be a torch.Tensor, got {type(tensor).__name__}.")
        if not tensor.is_floating_point():
            raise TypeError(f"`activations[{name!r}]` must be floating point, got {tensor.dtype}.")
        if tensor.dim() != 2:
            raise ValueError(
                f"`activations[{name!r}]` must have shape (N, D), pooled over tokens, got {tuple(tensor.shape)}."
            )
        if num_examples is None:
            num_examples = tensor.shape[0]
        elif tensor.shape[0] != num_examples:
            raise ValueError(
                f"`activations[{name!r}]` has {tensor.shape[0]} rows, but other layers have {num_examples}. Every "
                "layer must hold one row per probe example."
            )
