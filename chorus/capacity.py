"""`chorus capacity`: how many tasks of each PET type fit beside one backbone in a device's memory.

Bytes per task are measured, not computed from a formula: for each PET type with its usual settings, a task bank is
built on the `meta` device (shapes and dtypes only, no memory) around the backbone, one task with random tensors of that
type is registered, and the bytes of one slot are summed over every tensor the bank keeps per slot — the method's
per-site (linear or LayerNorm) slot tensors and per-slot buffers (LoRA scalings, sparse positions as int64 and their
counts) and the classifier head's slot (padded to the bank's `max_labels`). Tasks that fit = (memory − backbone) //
bytes per task.

Not counted: activations and workspace of the batches being served, the CUDA context, and the transient copy while a
bank grows (slots double when full, so preallocate `capacity` near the number you need).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from itertools import chain

import torch
from torch import nn

from chorus.backends.encoder import Encoder, EncoderConfig
from chorus.backends.task_bank import TaskBank
from chorus.backends.task_files import random_task

# The backbones' shapes (their Hugging Face config.json); only shapes matter here.
BACKBONES = {
    "all-MiniLM-L6-v2": EncoderConfig(vocab_size=30522, hidden_size=384, num_layers=6, num_heads=12,
                                      intermediate_size=1536, max_positions=512),
    "bert-base": EncoderConfig(),  # bert-base-uncased: 12 layers, hidden 768, feed-forward 3072
}
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
PROBE_CAPACITY = 5  # slots in the measuring bank; odd, so no per-slot tensor is mistaken for another


@dataclass(frozen=True)
class PetSetting:
    """A PET type with its usual settings: the task's `pet` options and the bank options sized to them (a bank pads
    every slot to its `max_rank` / `max_bottleneck`)."""

    label: str
    pet: dict
    bank_options: dict


SETTINGS = (
    PetSetting("LoRA r=8 (query, value)", {"lora": {"r": 8, "alpha": 16, "target_modules": ["query", "value"]}},
               {"lora": {"max_rank": 8}}),
    PetSetting("IA3 (key, value, FFN output)", {"ia3": {}}, {}),
    PetSetting("Houlsby adapter m=64", {"adapter": {"bottleneck": 64, "placement": "houlsby"}},
               {"adapter": {"max_bottleneck": 64}}),
    PetSetting("Pfeiffer adapter m=64", {"adapter": {"bottleneck": 64, "placement": "pfeiffer"}},
               {"adapter": {"max_bottleneck": 64}}),
    PetSetting("BitFit (all linears)", {"bitfit": {}}, {}),
    PetSetting("MaskBERT 0.5% pruned", {"maskbert": {"density": 0.005}}, {}),
    PetSetting("Diff-Pruning 0.5% + biases", {"diff_pruning": {"density": 0.005}}, {}),
    PetSetting("LayerNorm (all, LN-tuning)", {"layer_norm": {}}, {}),
)


@dataclass(frozen=True)
class CapacityRow:
    label: str
    pet_bytes: int  # one task's slot in its PET method's bank
    head_bytes: int  # one task's classifier-head slot
    tasks: int  # tasks of this type that fit beside the backbone

    @property
    def task_bytes(self) -> int:
        return self.pet_bytes + self.head_bytes


def slot_bytes(module: nn.Module, capacity: int, recurse: bool = True) -> int:
    """Bytes of one slot: one row of every parameter and buffer of `module` whose first dimension is its slots."""
    tensors = chain(module.parameters(recurse=recurse), module.buffers(recurse=recurse))
    return sum(t[0].numel() * t.element_size() for t in tensors if t.dim() and t.shape[0] == capacity)


def measure(cfg: EncoderConfig, dtype: torch.dtype, setting: PetSetting, max_labels: int = 8) -> tuple[int, int, int]:
    """(backbone bytes, PET slot bytes, head slot bytes) of one task of `setting`, from a bank on the meta device."""
    with torch.device("meta"):
        encoder = Encoder(cfg).to(dtype)
    bank = TaskBank(encoder, capacity=PROBE_CAPACITY, max_labels=max_labels, method_options=setting.bank_options)
    bank.add(random_task("probe", cfg.hidden_size, cfg.linear_sites(), setting.pet))
    backbone = sum(t.numel() * t.element_size() for t in chain(encoder.parameters(), encoder.buffers()))
    pet = sum(slot_bytes(bank.methods[m], bank.methods[m].capacity) for m in setting.pet)
    head = slot_bytes(bank, bank.head_capacity, recurse=False)
    return backbone, pet, head


def capacity_table(backbone: str, memory_gib: float, dtype: str = "float16",
                   max_labels: int = 8) -> tuple[int, list[CapacityRow]]:
    """Backbone bytes and, per PET setting, bytes per task and how many tasks fit in `memory_gib` beside it."""
    cfg, torch_dtype = BACKBONES[backbone], DTYPES[dtype]
    budget = int(memory_gib * 2**30)
    rows, backbone_bytes = [], 0
    for setting in SETTINGS:
        backbone_bytes, pet, head = measure(cfg, torch_dtype, setting, max_labels)
        rows.append(CapacityRow(setting.label, pet, head, max(0, budget - backbone_bytes) // (pet + head)))
    return backbone_bytes, rows


def format_table(backbone: str, memory_gib: float, dtype: str, backbone_bytes: int, rows: list[CapacityRow]) -> str:
    lines = [f"{backbone} ({dtype}): backbone {backbone_bytes:,} bytes; budget {memory_gib:g} GiB",
             "",
             f"| {'PET type':<30} | {'PET slot B':>12} | {'head slot B':>11} | {'bytes/task':>12} | {'tasks that fit':>14} |",
             f"| {'-' * 30} | {'-' * 12}:| {'-' * 11}:| {'-' * 12}:| {'-' * 14}:|"]
    for r in rows:
        lines.append(f"| {r.label:<30} | {r.pet_bytes:>12,} | {r.head_bytes:>11,} | {r.task_bytes:>12,} | "
                     f"{r.tasks:>14,} |")
    return "\n".join(lines)


def _cmd_capacity(args: argparse.Namespace) -> int:
    backbone_bytes, rows = capacity_table(args.backbone, args.memory_gb, args.dtype, args.max_labels)
    print(format_table(args.backbone, args.memory_gb, args.dtype, backbone_bytes, rows))
    print("\nHeads are padded to max_labels; activations, workspace and bank growth are not counted.")
    return 0


def register(sub) -> None:
    p = sub.add_parser("capacity", help="bytes per task of each PET type, and how many fit beside one backbone")
    p.add_argument("--backbone", default="all-MiniLM-L6-v2", choices=sorted(BACKBONES))
    p.add_argument("--memory-gb", type=float, default=80.0, help="device memory in GiB (default 80)")
    p.add_argument("--dtype", default="float16", choices=sorted(DTYPES))
    p.add_argument("--max-labels", type=int, default=8, help="the bank's labels per head (default 8, as served)")
    p.set_defaults(func=_cmd_capacity)
