"""The task bank: every served task's PET parameters and classifier head, in preallocated slots on the device.

A batch may mix rows of any tasks: `row_tasks(names)` turns the rows' task names into per-method slot indices, the
encoder runs each shared op once for the whole batch, and each PET op gathers its rows' slots.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass, field

import torch
from torch import nn

from chorus.backends.encoder import Encoder
from chorus.backends.pet import PET_METHODS, RowTasks
from chorus.errors import InvalidInput, TaskFileError, UnknownTask

TASK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def check_task_name(name: str) -> str:
    if not isinstance(name, str) or not TASK_NAME.match(name) or ".." in name:
        raise InvalidInput(f"task name {name!r} is not a safe name: use 1-64 letters, digits, '_', '-' or '.', "
                           "starting with a letter or digit, with no '..'")
    return name


@dataclass
class TaskSpec:
    """One task as files describe it: its labels, its PET methods with their options, and its tensors.

    `tensors` keys: `classifier.weight` (num_labels, hidden), `classifier.bias` (num_labels,), and per method the
    tensors its class documents, e.g. `encoder.layer.0.attention.self.query.lora_A`.
    """

    name: str
    labels: list[str]
    pet: dict[str, dict]  # method -> options, e.g. {"lora": {"r": 8, "alpha": 16}, "bitfit": {}}
    tensors: dict[str, torch.Tensor]
    meta: dict = field(default_factory=dict)  # free-form: dataset, metrics, base model

    def method_tensors(self, method: str) -> dict[str, torch.Tensor]:
        owns = PET_METHODS[method].owns
        return {k: v for k, v in self.tensors.items() if owns(k)}


@dataclass
class TaskEntry:
    name: str
    labels: list[str]
    head_slot: int
    slots: dict[str, int]  # method -> slot (only methods the task uses)
    pet: dict[str, dict]
    meta: dict


class TaskBank(nn.Module):
    """Slots for every PET method and the per-task classifier heads, on the encoder's device."""

    def __init__(self, encoder: Encoder, capacity: int = 16, max_labels: int = 8,
                 method_options: dict[str, dict] | None = None):
        """`method_options`: per PET method, keyword options of its bank, e.g. {"lora": {"max_rank": 16}}."""
        super().__init__()
        p = encoder.word_embeddings.weight
        self.device, self.dtype = p.device, p.dtype
        self.hidden = encoder.cfg.hidden_size
        options = method_options or {}
        unknown = sorted(set(options) - set(PET_METHODS))
        if unknown:
            raise ValueError(f"options for unknown PET methods {unknown}; known: {sorted(PET_METHODS)}")
        self.methods = nn.ModuleDict({name: cls(cls.backbone_sites(encoder.cfg), capacity, self.device, self.dtype,
                                                **options.get(name, {}))
                                      for name, cls in PET_METHODS.items()})
        for m in self.methods.values():
            m.attach(m.backbone_modules(encoder))
        self.max_labels = max_labels
        self.head_capacity = capacity
        self.head_weight = nn.Parameter(torch.zeros(capacity, max_labels, self.hidden, device=self.device,
                                                    dtype=self.dtype), requires_grad=False)
        self.head_bias = nn.Parameter(torch.zeros(capacity, max_labels, device=self.device, dtype=self.dtype),
                                      requires_grad=False)
        self.register_buffer("num_labels", torch.zeros(capacity, dtype=torch.long, device=self.device))
        self.free_heads = list(range(capacity - 1, -1, -1))
        self.tasks: dict[str, TaskEntry] = {}
        self.version = 0  # bumped by every add/remove: exported graphs re-bind (or re-export) the bank when it moves
        self._lock = threading.Lock()  # guards add/remove against a concurrent row_tasks

    # -- registering ------------------------------------------------------------------------------------------------
    def validate(self, spec: TaskSpec) -> dict[str, dict]:
        """Check a task against the backbone and the bank; return each method's tensors grouped by site."""
        check_task_name(spec.name)
        unknown = sorted(set(spec.pet) - set(self.methods))
        if unknown:
            raise TaskFileError(f"task {spec.name!r}: unknown PET method(s) {unknown}; supported: {sorted(self.methods)}")
        n = len(spec.labels)
        if not 2 <= n <= self.max_labels or len(set(spec.labels)) != n:
            raise TaskFileError(f"task {spec.name!r}: needs 2..{self.max_labels} distinct labels, got {spec.labels}")
        expected = {"classifier.weight": (n, self.hidden), "classifier.bias": (n,)}
        for key, shape in expected.items():
            t = spec.tensors.get(key)
            if t is None:
                raise TaskFileError(f"task {spec.name!r}: tensor {key!r} is missing (expected shape {shape})")
            if tuple(t.shape) != shape:
                raise TaskFileError(f"task {spec.name!r}: tensor {key!r} has shape {tuple(t.shape)}, expected {shape} "
                                    f"({n} labels x hidden size {self.hidden})")
        claimed = set(expected)
        groups = {}
        for method, options in spec.pet.items():
            tensors = spec.method_tensors(method)
            if not tensors:
                raise TaskFileError(f"task {spec.name!r}: declares {method} but holds no {method} tensors")
            groups[method] = self.methods[method].validate(spec.name, options, tensors)
            claimed |= set(tensors)
        stray = sorted(set(spec.tensors) - claimed)
        if stray:
            raise TaskFileError(f"task {spec.name!r}: tensors {stray[:5]} belong to no declared PET method "
                                f"(declared: {sorted(spec.pet)})")
        return groups

    def add(self, spec: TaskSpec, replace: bool = False) -> TaskEntry:
        """Register a task (validated first: a bad task changes nothing). `replace` swaps an existing task's weights."""
        groups = self.validate(spec)
        # a bank that grows here must not become inference tensors (callers may be under torch.inference_mode)
        with self._lock, torch.inference_mode(False):
            if spec.name in self.tasks and not replace:
                raise InvalidInput(f"task {spec.name!r} is already registered; replace it explicitly")
            slots: dict[str, int] = {}
            try:  # all of the task or none of it: slots written before a failure are given back
                for m, g in groups.items():
                    slots[m] = self._write_method(m, g, spec.pet[m])
                head = self._write_head(spec)
            except BaseException:
                for m, slot in slots.items():
                    self.methods[m].clear(slot)
                raise
            entry = TaskEntry(spec.name, list(spec.labels), head, slots, spec.pet, dict(spec.meta))
            old = self.tasks.get(spec.name)
            self.tasks[spec.name] = entry
            if old is not None:
                self._release(old)
            self.version += 1
        return entry

    def _write_method(self, method: str, group: dict, options: dict) -> int:
        """One method's slot for a validated task; a write that fails gives its slot back before raising."""
        bank = self.methods[method]
        free = set(bank.free)
        try:
            return bank.write(group, options)
        except BaseException:
            for slot in free - set(bank.free):  # the slot it took
                bank.clear(slot)
            raise

    def remove(self, name: str) -> None:
        with self._lock:
            entry = self.tasks.pop(name, None)
            if entry is None:
                raise UnknownTask(f"task {name!r} is not registered")
            self._release(entry)
            self.version += 1

    def _release(self, entry: TaskEntry) -> None:
        for m, slot in entry.slots.items():
            self.methods[m].clear(slot)
        with torch.no_grad():
            self.head_weight[entry.head_slot] = 0
            self.head_bias[entry.head_slot] = 0
            self.num_labels[entry.head_slot] = 0
        self.free_heads.append(entry.head_slot)

    def _write_head(self, spec: TaskSpec) -> int:
        if not self.free_heads:
            self._grow_heads(2 * self.head_capacity)
        slot = self.free_heads.pop()
        n = len(spec.labels)
        with torch.no_grad():
            self.head_weight[slot] = 0
            self.head_bias[slot] = 0
            self.head_weight[slot, :n] = spec.tensors["classifier.weight"].to(self.device, self.dtype)
            self.head_bias[slot, :n] = spec.tensors["classifier.bias"].to(self.device, self.dtype)
            self.num_labels[slot] = n
        return slot

    def _grow_heads(self, capacity: int) -> None:
        def grown(t: torch.Tensor) -> torch.Tensor:
            new = torch.zeros(capacity, *t.shape[1:], device=t.device, dtype=t.dtype)
            new[: len(t)] = t.detach()
            return new

        self.head_weight = nn.Parameter(grown(self.head_weight), requires_grad=self.head_weight.requires_grad)
        self.head_bias = nn.Parameter(grown(self.head_bias), requires_grad=self.head_bias.requires_grad)
        self.num_labels = grown(self.num_labels)
        self.free_heads = list(range(capacity - 1, self.head_capacity - 1, -1)) + self.free_heads
        self.head_capacity = capacity

    def export(self, name: str) -> TaskSpec:
        """Read a registered task back out of the bank (e.g. after training in it)."""
        entry = self.tasks[name]
        n = len(entry.labels)
        tensors = {"classifier.weight": self.head_weight[entry.head_slot, :n].detach().cpu().float().clone(),
                   "classifier.bias": self.head_bias[entry.head_slot, :n].detach().cpu().float().clone()}
        for m, slot in entry.slots.items():
            got = self.methods[m].read(slot)
            if m == "lora":  # un-pad to the task's rank
                r = entry.pet["lora"]["r"]
                got = {k: (v[:r] if k.endswith("lora_A") else v[:, :r]).clone() for k, v in got.items()}
            tensors.update(got)
        return TaskSpec(name, list(entry.labels), entry.pet, tensors, dict(entry.meta))

    # -- serving ----------------------------------------------------------------------------------------------------
    def row_tasks(self, names: list[str]) -> RowTasks:
        """Per-row slot indices for a batch whose rows belong to the named tasks."""
        with self._lock:
            try:
                entries = [self.tasks[n] for n in names]
            except KeyError as e:
                raise UnknownTask(f"unknown task {e.args[0]!r}; served tasks: {sorted(self.tasks)}") from None
            slots = {m: torch.tensor([e.slots.get(m, 0) for e in entries], dtype=torch.long, device=self.device)
                     for m in self.methods}
            heads = torch.tensor([e.head_slot for e in entries], dtype=torch.long, device=self.device)
        return RowTasks.build(slots, heads)

    def bank_tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor the export form of the model reads (see `GatheredRows`), by export name; live references."""
        out = {"head.weight": self.head_weight, "head.bias": self.head_bias, "head.num_labels": self.num_labels}
        for m, meth in self.methods.items():
            out.update({f"{m}.{k}": t for k, t in meth.bank_tensors().items()})
        return out

    def snapshot(self) -> tuple[int, dict[str, torch.Tensor]]:
        """(version, bank_tensors()) read together, never halfway through an add or remove."""
        with self._lock:
            return self.version, self.bank_tensors()

    def classify(self, pooled: torch.Tensor, rows: RowTasks) -> torch.Tensor:
        """Per-row classifier heads: pooled (B, hidden) -> logits (B, max_labels), -inf past each task's labels."""
        if rows.gathered:  # export: the heads are graph inputs
            weight, bias, num_labels = (rows.tensors[f"head.{n}"] for n in ("weight", "bias", "num_labels"))
        else:
            weight, bias, num_labels = self.head_weight, self.head_bias, self.num_labels
        W, b = weight[rows.head_slots], bias[rows.head_slots]  # (B, L, H), (B, L)
        logits = torch.bmm(W, pooled.unsqueeze(-1)).squeeze(-1) + b  # (B, L)
        n = num_labels[rows.head_slots]
        past = torch.arange(self.max_labels, device=logits.device)[None, :] >= n[:, None]
        return logits.masked_fill(past, float("-inf"))

    def bytes_per_task(self) -> dict[str, int]:
        head = (self.max_labels * (self.hidden + 1)) * self.head_weight.element_size()
        return {"head": head, **{m: meth.bytes_per_slot() for m, meth in self.methods.items()}}
