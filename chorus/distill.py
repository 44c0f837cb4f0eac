"""Distil a chorus task (or any teacher) into K shallow students by stacking distillation and boosting.

Student Parallelism (Wang et al., KDD'25). Students are trained one after another on the distillation set D (the
task's training split, optionally plus unlabeled texts from other corpora: distillation needs only teacher logits):

    F_0 = 0
    for k in 1..K:
        R_k = T - F_{k-1}                                       # the residual the earlier students leave, (N, L)
        S_k = argmin  mean ||S(x) - R_k(x)||²                   # boosting loss, MSE against the residual logits
                    + β · mean_tokens ||h¹_S(x) - h^j_T(x)||²   # lower layer imitates teacher layer j's states
        α_k = <R_k, S_k> / (L · ||S_k||²)                       # inner products over all of D's logits
        F_k = F_{k-1} + α_k · S_k

`<R, S> / ||S||²` is the least-squares step along S_k; the shrinkage constant `L` >= 1 (`DistillConfig.shrinkage`)
scales it down as a learning rate does in gradient boosting (L = 1: the full line-search step). Any prefix F_k is a
model of its own, which is what lets serving run fewer students under load.

Initialisation: a student's layers start from teacher layers (the task's LoRA merged in): by default its bottom
layer from teacher layer 0 and its top layer from the teacher's last layer (`DistillConfig.init_layers`); student 1's
head starts as the teacher's head (it fits T itself), later heads near zero (they fit small residuals). The
embeddings are the backbone's, shared and frozen.

Teacher logits and hidden states for D are computed once and cached under `.cache/distill/`. Training is seeded and
resumable: the student directory is rewritten after each student, and a rerun with the same settings continues after
the last finished student.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

import chorus
from chorus.backends.encoder import Encoder, EncoderConfig
from chorus.backends.engine import DEFAULT_BACKBONE, Engine
from chorus.backends.reference import merged_state
from chorus.backends.students import (SharedEmbeddings, Student, StudentConfig, StudentFiles, StudentGroup,
                                      read_students, save_students, stack_students)
from chorus.backends.students.reference import additive_mask, mean_pool
from chorus.backends.task_files import TENSOR_FILE, load_task
from chorus.data import DATASETS, load_dataset, load_texts, normalize
from chorus.errors import InvalidInput, dataclass_from_dict
from chorus.train import _batches, _tensors

log = logging.getLogger(__name__)

# Texts that must never be distilled on when a task is evaluated on another corpus's test split.
OVERLAPPING = {"rotten_tomatoes": {"vader_movies"}, "vader_movies": {"rotten_tomatoes"}}


@dataclass
class DistillConfig:
    num_students: int = 4  # K
    num_layers: int = 2  # per student
    epochs: int = 3  # per student
    batch_size: int = 32
    lr: float = 1e-4  # student layers (they start from teacher layers: a fine-tuning rate)
    head_lr: float = 1e-3
    weight_decay: float = 0.01
    shrinkage: float = 1.0  # L in α_k = <R, S_k> / (L·||S_k||²); 1 = the least-squares step
    imitation_weight: float = 0.5  # β: student layer 1 vs teacher layer `imitate_layer`, per token
    imitate_layer: int | None = None  # teacher hidden state index (0 = embeddings); None: the middle layer
    init_layers: tuple[int, ...] | None = None  # teacher layer per student layer; None: (0, ..., last)
    augment: tuple[str, ...] = ("vader_tweets", "vader_amazon", "vader_nyt")  # unlabeled extra distillation texts
    perturbations: int = 0  # perturbed copies of each training text (word dropout / a random span), teacher-labelled
    max_length: int = 128
    seed: int = 0
    max_examples: int | None = None  # cap the training split (quick runs, tests)

    def __post_init__(self) -> None:
        if self.num_students < 1 or self.num_layers < 1 or self.epochs < 1 or self.batch_size < 1:
            raise InvalidInput("num_students, num_layers, epochs and batch_size must be positive")
        if self.perturbations < 0:
            raise InvalidInput(f"perturbations must be >= 0, got {self.perturbations}")
        if self.shrinkage <= 0:
            raise InvalidInput(f"shrinkage L must be > 0 (1 = no shrinkage), got {self.shrinkage}")
        self.augment = tuple(self.augment)
        self.init_layers = tuple(self.init_layers) if self.init_layers is not None else None
        if self.init_layers is not None and len(self.init_layers) != self.num_layers:
            raise InvalidInput(f"init_layers {self.init_layers} names {len(self.init_layers)} teacher layers for "
                               f"{self.num_layers}-layer students")
        unknown = sorted(set(self.augment) - set(DATASETS))
        if unknown:
            raise InvalidInput(f"augment: unknown datasets {unknown}; choose from {sorted(DATASETS)}")

    @classmethod
    def from_dict(cls, d: dict) -> DistillConfig:
        return dataclass_from_dict(cls, d, "DistillConfig")

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


# ---- teachers -------------------------------------------------------------------------------------------------------
@dataclass
class Teacher:
    """What distillation needs from a teacher. `forward(input_ids, attention_mask)` (B, T) -> (logits (B, L), hidden
    states: a sequence of num_layers + 1 tensors (B, T, C), index 0 the embeddings, as Hugging Face's
    `output_hidden_states`). `layer_state` (Hugging Face BertModel names) and `head` initialise students; without
    them students start random."""

    labels: list[str]
    forward: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, Sequence[torch.Tensor]]]
    tokenize: Callable[[list[str]], list[list[int]]]
    embeddings: SharedEmbeddings
    encoder_config: EncoderConfig
    identity: str  # names the teacher's weights, for the cache key
    backbone: str = ""
    layer_state: dict[str, torch.Tensor] | None = None
    head: tuple[torch.Tensor, torch.Tensor] | None = None  # (L, C), (L,)
    engine: Engine | None = field(default=None, repr=False)  # the serving engine, when the teacher is a chorus task


def chorus_teacher(task: str, tasks_dir: str | Path = "model_repository/chorus/tasks", device: str = "cpu",
                   max_length: int = 128) -> Teacher:
    """A chorus task as teacher: the task in a one-task `Engine` (the serving path), layer by layer."""
    path = Path(tasks_dir) / task
    spec = load_task(path, task)
    backbone = spec.meta.get("backbone", DEFAULT_BACKBONE)
    rank = spec.pet.get("lora", {}).get("r", 1)
    engine = Engine(backbone, device=device, capacity=2, max_length=max_length, max_rank=max(rank, 1))
    engine.add_task(spec)
    encoder, bank = engine.model.encoder, engine.bank
    embeddings = SharedEmbeddings.from_encoder(encoder)
    n_labels = len(spec.labels)

    def forward(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        rows = bank.row_tasks([task] * len(input_ids))
        x = embeddings(input_ids)
        mask = additive_mask(attention_mask, x.dtype)
        hidden = [x]
        for layer in encoder.layers:
            x = layer(x, mask, rows)
            hidden.append(x)
        return bank.classify(mean_pool(x, attention_mask), rows)[:, :n_labels], hidden

    backbone_state = {k: v.detach().cpu() for k, v in encoder.hf_parameter_map().items()}
    digest = hashlib.sha256((path / TENSOR_FILE).read_bytes()).hexdigest()[:16]
    return Teacher(list(spec.labels), forward, engine.tokenize, embeddings, engine.cfg, f"{task}:{digest}:{backbone}",
                   str(backbone), merged_state(backbone_state, spec),
                   (spec.tensors["classifier.weight"], spec.tensors["classifier.bias"]), engine)


# ---- teacher outputs, cached ----------------------------------------------------------------------------------------
@dataclass
class TeacherOutputs:
    """Teacher logits (N, L) and, flattened over tokens, one layer's hidden states (sum of lengths, C) in fp16."""

    logits: torch.Tensor
    hidden: torch.Tensor
    offsets: torch.Tensor  # (N + 1,): row i's tokens are hidden[offsets[i]:offsets[i+1]]

    def hidden_batch(self, rows: list[int], T: int) -> torch.Tensor:
        """The rows' hidden states zero-padded to T: (B, T, C) float32."""
        out = torch.zeros(len(rows), T, self.hidden.shape[1])
        for i, r in enumerate(rows):
            a, b = int(self.offsets[r]), int(self.offsets[r + 1])
            out[i, : b - a] = self.hidden[a:b].float()
        return out


def cache_dir() -> Path:
    return Path(chorus.__file__).resolve().parents[1] / ".cache" / "distill"


@torch.no_grad()
def teacher_outputs(teacher: Teacher, ids: list[list[int]], layer: int, device: torch.device, what: str,
                    cache: Path | None = None, progress: bool = True, batch_size: int = 64) -> TeacherOutputs:
    """Run the teacher over token rows once; cached on disk by (teacher, rows, layer)."""
    from safetensors.torch import load_file, save_file

    key = hashlib.sha256(json.dumps([teacher.identity, layer, ids]).encode()).hexdigest()[:24]
    path = (cache or cache_dir()) / f"{what}-{key}.safetensors"
    if path.is_file():
        t = load_file(path)
        log.info("teacher outputs for %s: cached %s", what, path)
        return TeacherOutputs(t["logits"], t["hidden"], t["offsets"])
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    logits = torch.zeros(len(ids), len(teacher.labels))
    pieces: list[torch.Tensor | None] = [None] * len(ids)
    for start in tqdm(range(0, len(order), batch_size), desc=f"teacher on {what}", disable=not progress, unit="batch",
                      mininterval=0.5 if sys.stderr.isatty() else 10.0):
        rows = order[start : start + batch_size]
        x, m = _tensors([ids[i] for i in rows], teacher.encoder_config.pad_token_id, device)
        out, hidden = teacher.forward(x, m)
        logits[rows] = out.float().cpu()
        h = hidden[layer].to(torch.float16).cpu()
        for j, r in enumerate(rows):
            pieces[r] = h[j, : len(ids[r])]
    offsets = torch.tensor([0] + [len(r) for r in ids]).cumsum(0)
    result = TeacherOutputs(logits, torch.cat(pieces), offsets)  # type: ignore[arg-type]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({"logits": result.logits, "hidden": result.hidden, "offsets": result.offsets}, tmp)
    tmp.replace(path)
    return result


# ---- boosting -------------------------------------------------------------------------------------------------------
def boosting_weight(residual: torch.Tensor, outputs: torch.Tensor, shrinkage: float = 1.0) -> float:
    """α = <R, S> / (L·||S||²) over all rows and logits: the least-squares step along S, shrunk by L."""
    denom = shrinkage * float((outputs.double() ** 2).sum())
    return float((residual.double() * outputs.double()).sum()) / denom if denom > 0 else 0.0


def accuracy(logits: torch.Tensor, gold: Sequence[int]) -> float:
    return float((logits.argmax(-1) == torch.as_tensor(list(gold))).float().mean()) if len(gold) else 0.0


@torch.no_grad()
def student_outputs(group: StudentGroup, ids: list[list[int]], pad: int, device, student: int,
                    batch_size: int = 128) -> torch.Tensor:
    """One student's logits over token rows: (N, L)."""
    out = torch.zeros(len(ids), group.cfg.num_labels)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        x, m = _tensors([ids[i] for i in rows], pad, device)
        out[rows] = group.student_logits(x, m, k=student + 1)[student].float().cpu()
    return out


def new_student(cfg: StudentConfig, dcfg: DistillConfig, teacher: Teacher, index: int) -> Student:
    """A student starting from teacher layers (see the module docstring)."""
    torch.manual_seed(dcfg.seed * 1000 + index)
    student = Student(cfg)
    if teacher.layer_state is not None:
        last = teacher.encoder_config.num_layers - 1
        init = dcfg.init_layers or tuple(range(cfg.num_layers - 1)) + (last,)
        for layer, t in enumerate(init):
            student.init_layer_from(layer, teacher.layer_state, t)
    with torch.no_grad():
        if index == 0 and teacher.head is not None:
            student.classifier.weight.copy_(teacher.head[0])
            student.classifier.bias.copy_(teacher.head[1])
        else:
            student.classifier.weight.normal_(0.0, 0.02)
            student.classifier.bias.zero_()
    return student


def train_student(student: Student, teacher: Teacher, ids: list[list[int]], residual: torch.Tensor,
                  hidden: TeacherOutputs, dcfg: DistillConfig, device: torch.device, index: int,
                  progress: bool = True) -> None:
    """Fit one student to the residual (MSE) while its layer 1 imitates the teacher's hidden states."""
    student.to(device).train()
    head = list(student.classifier.parameters())
    body = [p for n, p in student.named_parameters() if not n.startswith("classifier.")]
    opt = torch.optim.AdamW([{"params": body, "lr": dcfg.lr}, {"params": head, "lr": dcfg.head_lr}],
                            weight_decay=dcfg.weight_decay)
    rng = random.Random(dcfg.seed * 1000 + index)
    steps = dcfg.epochs * math.ceil(len(ids) / dcfg.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[dcfg.lr, dcfg.head_lr], total_steps=steps, pct_start=0.1)
    pad = teacher.encoder_config.pad_token_id
    bar = tqdm(total=steps, desc=f"student {index + 1}/{dcfg.num_students}", disable=not progress, unit="step",
               mininterval=0.5 if sys.stderr.isatty() else 10.0)
    for epoch in range(dcfg.epochs):
        for batch in _batches([len(r) for r in ids], dcfg.batch_size, rng):
            x, m = _tensors([ids[i] for i in batch], pad, device)
            with torch.no_grad():
                emb = teacher.embeddings(x)
            logits, layers = student(emb, m)
            boost = F.mse_loss(logits, residual[batch].to(device))
            loss = boost
            if dcfg.imitation_weight:
                target = hidden.hidden_batch(batch, x.shape[1]).to(device)
                w = m.unsqueeze(-1).to(target.dtype)
                imitation = (((layers[0] - target) ** 2) * w).sum() / (w.sum() * target.shape[-1])
                loss = boost + dcfg.imitation_weight * imitation
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update()
            bar.set_postfix(boost=f"{boost.item():.3f}", loss=f"{loss.item():.3f}", epoch=epoch + 1)
    bar.close()
    student.eval()


# ---- the whole run --------------------------------------------------------------------------------------------------
@dataclass
class DistillResult:
    files: StudentFiles
    teacher_validation_accuracy: float
    teacher_test_accuracy: float
    distill_examples: int
    seconds: float


def perturb(text: str, rng: random.Random) -> str:
    """A nearby input for the teacher to label (TinyBERT-style augmentation, without a vocabulary): either drop
    each word with probability 0.15, or keep a random contiguous span of at least half the words."""
    words = text.split()
    if len(words) < 4:
        return text
    if rng.random() < 0.5:
        kept = [w for w in words if rng.random() >= 0.15]
        return " ".join(kept or words[:1])
    n = rng.randint((len(words) + 1) // 2, len(words) - 1)
    start = rng.randint(0, len(words) - n)
    return " ".join(words[start : start + n])


def distillation_texts(dataset: str, dcfg: DistillConfig) -> tuple[list[str], list[str], dict]:
    """(train texts, augmenting texts, counts): the task's training split, plus `perturbations` perturbed copies of
    each training text, plus other corpora's texts; minus any text whose de-duplication key is in the task's
    validation or test split, or already in the set."""
    banned = sorted(set(dcfg.augment) & OVERLAPPING.get(dataset, set()))
    if banned:
        raise InvalidInput(f"augment: {banned} overlap {dataset}'s test split; distilling on them leaks the test set")
    data = load_dataset(dataset, seed=dcfg.seed)
    train = data.train[: dcfg.max_examples] if dcfg.max_examples else data.train
    held_out = {normalize(e.text) for e in data.validation + data.test}
    seen = {normalize(e.text) for e in train}
    extra, counts = [], {}
    rng = random.Random(dcfg.seed)
    perturbed = [perturb(e.text, rng) for _ in range(dcfg.perturbations) for e in train]
    perturbed = [t for t in dict.fromkeys(perturbed) if normalize(t) not in held_out and normalize(t) not in seen]
    seen |= {normalize(t) for t in perturbed}
    extra += perturbed
    counts["perturbed_train"] = len(perturbed)
    for name in dcfg.augment:
        texts = [t for t in load_texts(name) if normalize(t) not in held_out and normalize(t) not in seen]
        seen |= {normalize(t) for t in texts}
        counts[name] = len(texts)
        extra += texts[: dcfg.max_examples] if dcfg.max_examples else texts
    return [e.text for e in train], extra, counts


def distill(teacher: Teacher, dataset: str, dcfg: DistillConfig, out: str | Path, device: str | None = None,
            progress: bool = True, cache: Path | None = None) -> DistillResult:
    """Train `dcfg.num_students` students from `teacher` on `dataset` (+ augmenting texts); write them to `out` after
    each student; evaluate every prefix on the held-out test split. Resumes from students already in `out`."""
    started = time.monotonic()
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out = Path(out)
    data = load_dataset(dataset, seed=dcfg.seed)
    train_texts, extra_texts, extra_counts = distillation_texts(dataset, dcfg)
    ids = teacher.tokenize(train_texts + extra_texts)
    val_ids, test_ids = teacher.tokenize([e.text for e in data.validation]), teacher.tokenize([e.text for e in data.test])
    val_gold, test_gold = [e.label for e in data.validation], [e.label for e in data.test]
    layer = dcfg.imitate_layer if dcfg.imitate_layer is not None else teacher.encoder_config.num_layers // 2
    T = teacher_outputs(teacher, ids, layer, dev, "distill", cache, progress)
    T_val = teacher_outputs(teacher, val_ids, layer, dev, "validation", cache, progress).logits
    T_test = teacher_outputs(teacher, test_ids, layer, dev, "test", cache, progress).logits
    teacher_val, teacher_test = accuracy(T_val, val_gold), accuracy(T_test, test_gold)
    log.info("teacher %s: validation accuracy %.4f, test accuracy %.4f; distilling on %d texts (%d train + %s)",
             teacher.identity, teacher_val, teacher_test, len(ids), len(train_texts), extra_counts)

    C = teacher.encoder_config
    scfg = StudentConfig(num_students=dcfg.num_students, num_layers=dcfg.num_layers, hidden_size=C.hidden_size,
                         num_heads=C.num_heads, intermediate_size=C.intermediate_size, num_labels=len(teacher.labels),
                         layer_norm_eps=C.layer_norm_eps)
    settings = {"distill": {**dcfg.to_dict(), "num_students": None}, "teacher": teacher.identity, "dataset": dataset}
    students: list[Student] = []
    alphas: list[float] = []
    if (out / "chorus_students.json").is_file():
        done = read_students(out)
        if done.meta.get("settings") == settings and done.config.num_students <= dcfg.num_students:
            from chorus.backends.students import unstack_students

            students = unstack_students(done.config, done.tensors)
            alphas = [float(a) for a in done.boosting_weights]
            log.info("resuming: %d of %d students already in %s", len(students), dcfg.num_students, out)
        else:
            log.warning("%s holds students trained with other settings; they will be replaced", out)

    pad = C.pad_token_id
    F_train = torch.zeros_like(T.logits)
    per_val, per_test = [], []
    for k in range(dcfg.num_students):
        if k >= len(students):
            student = new_student(scfg, dcfg, teacher, k)
            train_student(student, teacher, ids, T.logits - F_train, T, dcfg, dev, k, progress)
            students.append(student.cpu())
        cfg_k = StudentConfig.from_dict({**scfg.to_dict(), "num_students": k + 1})
        group = StudentGroup(cfg_k, teacher.embeddings, stack_students(students[: k + 1]),
                             torch.tensor(alphas[:k] + [1.0])).to(dev)
        S = student_outputs(group, ids, pad, dev, k)
        if k >= len(alphas):
            alphas.append(boosting_weight(T.logits - F_train, S, dcfg.shrinkage))
        F_train += alphas[k] * S
        per_val.append(student_outputs(group, val_ids, pad, dev, k))
        per_test.append(student_outputs(group, test_ids, pad, dev, k))
        prefixes = []
        for j in range(k + 1):
            w = torch.tensor(alphas[: j + 1])[:, None, None]
            v, t = (w * torch.stack(per_val[: j + 1])).sum(0), (w * torch.stack(per_test[: j + 1])).sum(0)
            prefixes.append({"k": j + 1, "validation_accuracy": accuracy(v, val_gold),
                             "test_accuracy": accuracy(t, test_gold),
                             "test_agreement_with_teacher": float((t.argmax(-1) == T_test.argmax(-1)).float().mean())})
        log.info("student %d: α=%.4f, ensemble of %d: test accuracy %.4f (teacher %.4f), train residual MSE %.4f",
                 k + 1, alphas[k], k + 1, prefixes[-1]["test_accuracy"], teacher_test,
                 float(((T.logits - F_train) ** 2).mean()))
        files = StudentFiles(cfg_k, list(teacher.labels), stack_students(students[: k + 1]), torch.tensor(alphas),
                             {"backbone": teacher.backbone, "fingerprint": teacher.embeddings.fingerprint()},
                             prefixes, {"settings": settings, "imitate_layer": layer,
                                        "teacher_accuracy": {"validation": teacher_val, "test": teacher_test},
                                        "distill_examples": {"train": len(train_texts), **extra_counts}})
        save_students(files, out)
    return DistillResult(files, teacher_val, teacher_test, len(ids), time.monotonic() - started)


# ---- latency --------------------------------------------------------------------------------------------------------
@torch.inference_mode()
def measure_latency(models: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]], ids: list[list[int]],
                    batch_sizes: Sequence[int] = (1, 32), batches: int = 24, repeats: int = 5, pad: int = 0,
                    seed: int = 0) -> dict[str, dict[int, float]]:
    """Median wall time (ms) of each model per batch size, over `batches` random batches of real rows x `repeats`;
    models are interleaved within each repeat so that load on a shared machine hits them alike."""
    rng = random.Random(seed)
    inputs = {b: [_tensors(rng.sample(ids, b), pad, "cpu") for _ in range(batches)] for b in batch_sizes}
    times: dict[str, dict[int, list[float]]] = {name: {b: [] for b in batch_sizes} for name in models}
    for name, fn in models.items():  # warm up
        for b in batch_sizes:
            fn(*inputs[b][0])
    for _ in range(repeats):
        for b in batch_sizes:
            for name, fn in models.items():
                for x, m in inputs[b]:
                    t0 = time.perf_counter()
                    fn(x, m)
                    times[name][b].append((time.perf_counter() - t0) * 1e3)
    return {name: {b: statistics.median(v) for b, v in per.items()} for name, per in times.items()}


def latency_report(teacher: Teacher, out: str | Path, test_texts: list[str], threads: int | None = None,
                   **kwargs) -> dict:
    """Per-prefix CPU latency of the students in `out` vs the teacher (serving engine, and its LoRA merged into a
    plain 6-layer encoder); written into the students' `prefixes[k-1]["latency"]`."""
    import os
    import platform

    if threads:
        torch.set_num_threads(threads)
    files = read_students(out)
    group = files.group(teacher.embeddings).eval()
    ids = teacher.tokenize(test_texts)
    models: dict[str, Callable] = {}
    if teacher.engine is not None:
        engine, name = teacher.engine, next(iter(teacher.engine.bank.tasks))
        models["teacher"] = lambda x, m: engine.model(x, m, engine.bank.row_tasks([name] * len(x)))
    if teacher.layer_state is not None and teacher.head is not None:
        merged = Encoder(teacher.encoder_config)
        merged.load_hf_state_dict(teacher.layer_state)
        merged.eval()
        W, b = teacher.head
        models["teacher_merged"] = lambda x, m: F.linear(merged(x, m), W, b)
    for k in range(1, group.num_students + 1):
        models[f"k={k}"] = lambda x, m, k=k: group(x, m, k=k)
    ms = measure_latency(models, ids, pad=teacher.encoder_config.pad_token_id, **kwargs)
    base = ms.get("teacher") or ms.get("teacher_merged")
    machine = f"{platform.processor() or platform.machine()}, nproc {os.cpu_count()}, torch threads " \
              f"{torch.get_num_threads()}, torch {torch.__version__}"
    for k, p in enumerate(files.prefixes, start=1):
        p["latency"] = {"device": "cpu", "machine": machine,
                        **{f"batch{b}_ms": round(t, 3) for b, t in ms[f"k={k}"].items()},
                        **{f"batch{b}_vs_teacher": round(t / base[b], 3) for b, t in ms[f"k={k}"].items()}}
    files.meta["teacher_latency"] = {name: {f"batch{b}_ms": round(t, 3) for b, t in ms[name].items()}
                                     for name in ms if name.startswith("teacher")}
    save_students(files, out)
    return {"ms": ms, "machine": machine}


# ---- command line ---------------------------------------------------------------------------------------------------
def _cmd_distill(args) -> int:
    dcfg = DistillConfig(num_students=args.students, num_layers=args.layers, epochs=args.epochs, seed=args.seed,
                         shrinkage=args.shrinkage, augment=tuple(args.augment), max_examples=args.max_examples,
                         perturbations=args.perturbations, lr=args.lr)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    teacher = chorus_teacher(args.task, args.tasks_dir, device=device, max_length=dcfg.max_length)
    dataset = args.dataset or teacher.engine.bank.tasks[args.task].meta.get("dataset")
    if dataset not in DATASETS:
        raise InvalidInput(f"task {args.task!r} names no known dataset ({dataset!r}); pass --dataset")
    out = Path(args.out or Path(args.tasks_dir).parent / "students" / args.task)
    result = distill(teacher, dataset, dcfg, out, device=device)
    print(f"teacher {args.task}: test accuracy {result.teacher_test_accuracy:.4f}; {result.distill_examples} "
          f"distillation texts; {result.seconds:.0f} s")
    if not args.no_latency:
        cpu_teacher = teacher if device == "cpu" else chorus_teacher(args.task, args.tasks_dir, "cpu", dcfg.max_length)
        data = load_dataset(dataset, seed=dcfg.seed)
        latency_report(cpu_teacher, out, [e.text for e in data.test])
    files = read_students(out)
    for p, a in zip(files.prefixes, files.boosting_weights.tolist()):
        lat = p.get("latency", {})
        print(f"k={p['k']}: α={a:.3f} test accuracy {p['test_accuracy']:.4f} "
              f"({100 * (p['test_accuracy'] - result.teacher_test_accuracy):+.2f} points vs teacher)"
              + (f", CPU latency batch 1 {lat['batch1_ms']:.2f} ms ({lat['batch1_vs_teacher']:.2f}x teacher), "
                 f"batch 32 {lat['batch32_ms']:.1f} ms ({lat['batch32_vs_teacher']:.2f}x)" if lat else ""))
    print(f"students written to {out}")
    if args.url:  # hot-load them into the running server (Triton's repository API)
        from chorus.client import ChorusClient

        with ChorusClient(args.url, protocol=args.protocol, admin_key=args.admin_key) as client:
            client.set_students(args.task, out)
        print(f"the server at {args.url} now answers {args.task} through these students")
    return 0


def register(sub) -> None:
    """Add `distill` to the `chorus` command line's subparsers."""
    p = sub.add_parser("distill", help="distil a task into K shallow students (Student Parallelism)")
    p.add_argument("--task", required=True, help="teacher task name (a directory under --tasks-dir)")
    p.add_argument("--tasks-dir", default="model_repository/chorus/tasks")
    p.add_argument("--dataset", help="default: the dataset the task was trained on (its meta)")
    p.add_argument("--students", type=int, default=4, help="K")
    p.add_argument("--layers", type=int, default=2, help="layers per student")
    p.add_argument("--epochs", type=int, default=3, help="epochs per student")
    p.add_argument("--shrinkage", type=float, default=1.0, help="L in α_k = <R, S_k> / (L·||S_k||²)")
    p.add_argument("--augment", nargs="*", default=list(DistillConfig.augment),
                   help="other corpora whose texts (labels unused) join the distillation set")
    p.add_argument("--perturbations", type=int, default=0,
                   help="perturbed copies of each training text to add (teacher-labelled)")
    p.add_argument("--lr", type=float, default=DistillConfig.lr, help="student layers' learning rate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-examples", type=int, default=None, help="cap each distillation source (quick runs)")
    p.add_argument("--device", help="default: cuda if present, else cpu")
    p.add_argument("--no-latency", action="store_true", help="skip the per-prefix CPU latency measurement")
    p.add_argument("--out", help="default: model_repository/chorus/students/<task>")
    p.add_argument("--url", default=os.environ.get("CHORUS_URL"),
                   help="a running chorus server to hot-load the students into (env CHORUS_URL; default: none)")
    p.add_argument("--protocol", choices=["http", "grpc"], default=os.environ.get("CHORUS_PROTOCOL", "http"))
    p.add_argument("--admin-key", default=os.environ.get("CHORUS_ADMIN_KEY"),
                   help="key for Triton's restricted repository API (env CHORUS_ADMIN_KEY)")
    p.set_defaults(func=_cmd_distill)
