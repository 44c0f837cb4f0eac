"""Hostile task files added to a running server: the load is refused naming the file and what is wrong, and the
served tasks go on answering (the unit tests, tests/unit/test_file_fuzz.py, cover every reader case by case)."""

import shutil

import pytest
import torch
from safetensors.torch import load, save_file

from chorus.errors import ChorusError
from tests.functional.conftest import DEFAULT_TASKS, REPOSITORY

MOVIE = REPOSITORY / "chorus" / "tasks" / "movie_review_sentiment"


def load_file(path):
    """Read into memory: the file is rewritten next, which a memory-mapped read must not see."""
    return load(path.read_bytes())


def nan_weight(d):
    tensors = load_file(d / "task.safetensors")
    name = sorted(k for k in tensors if k.endswith("lora_A"))[0]
    tensors[name][0, 0] = float("nan")
    save_file(tensors, d / "task.safetensors")
    return rf"{d / 'task.safetensors'} tensor '{name}' holds 1 NaN or infinite value"


def pickle_as_safetensors(d):
    torch.save(load_file(d / "task.safetensors"), d / "task.safetensors")
    return rf"{d / 'task.safetensors'} is not a readable safetensors file.*torch.save\(\) archive"


def truncated(d):
    data = (d / "task.safetensors").read_bytes()
    (d / "task.safetensors").write_bytes(data[: len(data) // 2])
    return rf"{d / 'task.safetensors'} is not a readable safetensors file"


@pytest.mark.parametrize("breakage", [nan_weight, pickle_as_safetensors, truncated])
def test_hostile_task_files_are_refused_by_name_and_serving_goes_on(http_client, tmp_path, breakage):
    bad = shutil.copytree(MOVIE, tmp_path / "bad")
    match = breakage(bad)
    with pytest.raises(ChorusError, match=match):
        http_client.add_task("bad_task", bad)
    assert sorted(http_client.tasks()) == DEFAULT_TASKS
    assert http_client.classify(["a wonderful film"], "movie_review_sentiment")[0].label == "positive"
