"""Fine-tuning PET tasks (and full fine-tunes, for comparison) on real data, through the serving engine's own bank.

A task trains in a one-task bank of the same `MultiTaskModel` that serves it, so what is trained is exactly what is
served: `chorus train` writes a task directory that `chorus task add` (or the model config) serves as it is.
"""

from __future__ import annotations

import concurrent.futures
import logging
import math
import multiprocessing
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from chorus.backends.engine import DEFAULT_BACKBONE, Engine
from chorus.backends.pet.base import layer_site
from chorus.backends.task_bank import TaskSpec
from chorus.backends.task_files import save_task
from chorus.data import DATASETS, load_dataset
from chorus.errors import ChorusError, InvalidInput

log = logging.getLogger(__name__)

# sites each method trains (site names end with these); IA3's are PEFT's defaults for BERT
ADAPTER_SITES = {"houlsby": ("attention.output.dense", "output.dense"), "pfeiffer": ("output.dense",)}
IA3_SITES = ("attention.self.key", "attention.self.value", "output.dense")  # output.dense: its input is scaled
PET_CHOICES = ("lora", "bitfit", "houlsby", "pfeiffer", "ia3", "maskbert", "diff_pruning", "layer_norm", "full")
ADAPTER_CHOICES = ("houlsby", "pfeiffer")  # one `adapter` bank; the choice is the adapter's placement
# `layer_norm` alone: the best of {3e-3, 1e-2, 3e-2} by validation accuracy on Rotten Tomatoes (the first 1,000 train
# examples, 2 epochs, seed 0: 0.757 / 0.759 / 0.733)
LAYER_NORM_LR = 1e-2


@dataclass
class TrainConfig:
    pet: str = "lora"  # one of PET_CHOICES (full fine-tune: a baseline, not servable as a task)
    epochs: int = 2
    batch_size: int = 32
    lr: float | None = None  # default per method, see `default_lr`
    head_lr: float = 2e-3
    seed: int = 0
    max_length: int = 128
    lora_r: int = 8
    lora_alpha: int = 16
    lora_targets: tuple[str, ...] = ("query", "value")  # PEFT's default for BERT
    adapter_bottleneck: int = 24  # AdapterHub's reduction_factor 16 on hidden 384
    adapter_activation: str = "relu"
    diff_density: float = 0.005  # Diff-Pruning keeps this fraction of the targeted weights (Guo et al.: 0.5%)
    mask_init_score: float = 0.01  # MaskBERT: every weight starts kept with this score; pruned once it drops below 0
    diff_sparse_epochs: int = 1  # Diff-Pruning: the last epochs train only the δ kept by magnitude pruning
                                 # (Guo et al.'s fixed-mask stage); 0 prunes once, after dense training
    warmup_fraction: float = 0.1  # linear warm-up over this fraction of the steps, then cosine decay to zero
    max_examples: int | None = None  # cap the training split (quick runs and tests)
    max_validation_examples: int | None = None  # cap the validation split (it only picks the epoch; test stays whole)
    tune_layer_norm: bool = False  # also tune every LayerNorm's weight and bias (the `layer_norm` method beside `pet`),
                                   # as Houlsby et al. do beside their adapters; `pet="layer_norm"` tunes them alone

    def __post_init__(self) -> None:
        if self.pet not in PET_CHOICES:
            raise InvalidInput(f"pet={self.pet!r}: choose one of {PET_CHOICES}")
        if self.tune_layer_norm and self.pet == "full":
            raise InvalidInput("tune_layer_norm: a full fine-tune already trains the LayerNorms")
        if self.epochs < 1 or self.batch_size < 1:
            raise InvalidInput("epochs and batch_size must be positive")
        if not 0 <= self.diff_sparse_epochs or not 0 <= self.warmup_fraction < 1:
            raise InvalidInput(f"diff_sparse_epochs={self.diff_sparse_epochs} must be >= 0 and "
                               f"warmup_fraction={self.warmup_fraction} in [0, 1)")

    def stages(self) -> list[int]:
        """Epochs per training stage: one stage, or for Diff-Pruning dense epochs then fixed-mask sparse epochs."""
        sparse = min(self.diff_sparse_epochs, self.epochs - 1) if self.pet == "diff_pruning" else 0
        return [self.epochs - sparse, sparse] if sparse else [self.epochs]

    @property
    def default_lr(self) -> float:
        # IA3 and Diff-Pruning: the best of {3e-3, 1e-2} and {2e-4, 5e-4, 1e-3} by validation accuracy on Rotten
        # Tomatoes (the first 1,000 train examples, 2 epochs, seed 0: 0.716 / 0.778 and 0.682 / 0.704 / 0.676)
        return self.lr or {"lora": 1e-3, "bitfit": 3e-3, "houlsby": 1e-3, "pfeiffer": 1e-3, "ia3": 1e-2,
                           "maskbert": 1e-3, "diff_pruning": 5e-4, "layer_norm": LAYER_NORM_LR, "full": 5e-5}[self.pet]

    @property
    def tunes_layer_norm(self) -> bool:
        return self.pet == "layer_norm" or self.tune_layer_norm

    def pet_options(self) -> dict[str, dict]:
        if self.pet == "lora":
            options = {"lora": {"r": self.lora_r, "alpha": self.lora_alpha, "target_modules": list(self.lora_targets)}}
        elif self.pet in ADAPTER_CHOICES:
            options = {"adapter": {"bottleneck": self.adapter_bottleneck, "activation": self.adapter_activation,
                                   "placement": self.pet}}
        elif self.pet == "diff_pruning":
            options = {"diff_pruning": {"density": self.diff_density}}
        else:
            options = {} if self.pet == "full" else {self.pet: {}}
        return {**options, "layer_norm": {}} if self.tunes_layer_norm else options


@dataclass
class TrainResult:
    name: str
    dataset: str
    pet: str
    validation_accuracy: float
    test_accuracy: float
    train_examples: int
    test_examples: int
    seconds: float
    trainable_parameters: int  # what the optimizer trained for this task, head included (full: the whole encoder)
    epochs: int = 0
    stored_parameters: int = 0  # values a served task holds (its file's tensors; full fine-tune: a whole encoder copy)
    task_bytes: int = 0  # those values in fp32, as `chorus train` writes them
    train_losses: list[float] = field(default_factory=list)  # mean training loss of each epoch
    validation_history: list[float] = field(default_factory=list)  # validation accuracy after each epoch
    sparsity: dict = field(default_factory=dict)  # MaskBERT / Diff-Pruning: weights changed of the weights targeted
    spec: TaskSpec | None = field(default=None, repr=False)

    def summary(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "spec"}


def initial_task(name: str, engine: Engine, labels: list[str], cfg: TrainConfig, seed: int) -> TaskSpec:
    """Each method as its paper / PEFT starts it, so the untrained task is the backbone itself: LoRA A Kaiming-uniform,
    B zero; BitFit deltas zero; adapters down N(0, 0.01²), up and biases zero (near-identity); IA3 l = 1 (stored 0);
    MaskBERT every weight of every linear a candidate, kept (score `mask_init_score`); Diff-Pruning δ = 0 over every
    weight (pruned to `diff_density` after training, see `DiffPruning.finish_training`); LayerNorms (`layer_norm`, or
    `tune_layer_norm` beside another method) the backbone's own weights and biases. A small random head."""
    g = torch.Generator().manual_seed(seed)
    hidden = engine.cfg.hidden_size
    tensors = {"classifier.weight": torch.randn(len(labels), hidden, generator=g) * 0.02,
               "classifier.bias": torch.zeros(len(labels))}
    for site, (out_f, in_f) in engine.cfg.linear_sites().items():
        if cfg.pet == "lora" and site.endswith(cfg.lora_targets):
            bound = 1 / math.sqrt(in_f)  # kaiming_uniform_(a=sqrt(5)) as nn.Linear and PEFT use
            tensors[f"{site}.lora_A"] = (torch.rand(cfg.lora_r, in_f, generator=g) * 2 - 1) * bound
            tensors[f"{site}.lora_B"] = torch.zeros(out_f, cfg.lora_r)
        elif cfg.pet == "bitfit":
            tensors[f"{site}.bias_delta"] = torch.zeros(out_f)
        elif cfg.pet in ADAPTER_CHOICES and layer_site(site) in ADAPTER_SITES[cfg.pet]:
            m = cfg.adapter_bottleneck
            tensors.update({f"{site}.adapter_down": torch.randn(m, out_f, generator=g) * 0.01,
                            f"{site}.adapter_down_bias": torch.zeros(m), f"{site}.adapter_up": torch.zeros(out_f, m),
                            f"{site}.adapter_up_bias": torch.zeros(out_f)})
        elif cfg.pet == "ia3" and layer_site(site) in IA3_SITES:
            tensors[f"{site}.ia3_l"] = torch.zeros(in_f if layer_site(site) == "output.dense" else out_f)
        elif cfg.pet == "maskbert":
            tensors[f"{site}.mask_index"] = torch.arange(out_f * in_f, dtype=torch.float32)
            tensors[f"{site}.mask_score"] = torch.full((out_f * in_f,), cfg.mask_init_score)
        elif cfg.pet == "diff_pruning":
            tensors[f"{site}.diff_index"] = torch.arange(out_f * in_f, dtype=torch.float32)
            tensors[f"{site}.diff_value"] = torch.zeros(out_f * in_f)
            tensors[f"{site}.diff_bias"] = torch.zeros(out_f)
    if cfg.tunes_layer_norm:
        for site, norm in engine.model.encoder.pet_norms().items():
            tensors[f"{site}.weight"] = norm.weight.detach().float().cpu().clone()
            tensors[f"{site}.bias"] = norm.bias.detach().float().cpu().clone()
    return TaskSpec(name, list(labels), cfg.pet_options(), tensors)


def _batches(lengths: list[int], batch_size: int, rng: random.Random) -> list[list[int]]:
    """Length-bucketed shuffled batches: shuffle, sort within pools of 50 batches, batch, shuffle the batches."""
    order = list(range(len(lengths)))
    rng.shuffle(order)
    pool = 50 * batch_size
    batches = []
    for start in range(0, len(order), pool):
        chunk = sorted(order[start : start + pool], key=lambda i: lengths[i])
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def _tensors(ids: list[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(len(r) for r in ids)
    input_ids = torch.full((len(ids), T), pad, dtype=torch.long)
    mask = torch.zeros((len(ids), T), dtype=torch.long)
    for i, r in enumerate(ids):
        input_ids[i, : len(r)], mask[i, : len(r)] = torch.as_tensor(r), 1
    return input_ids.to(device), mask.to(device)


@torch.no_grad()
def accuracy(engine: Engine, name: str, ids: list[list[int]], labels: list[int], batch_size: int = 128) -> float:
    engine.model.eval()
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    correct = 0
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        x, m = _tensors([ids[i] for i in rows], engine.cfg.pad_token_id, engine.device)
        logits = engine.model(x, m, engine.bank.row_tasks([name] * len(rows)))
        correct += sum(int(p == labels[i]) for p, i in zip(logits.argmax(-1).tolist(), rows))
    return correct / max(len(ids), 1)


def lr_factor(step: int, steps: int, warmup_fraction: float = 0.1) -> float:
    """Learning-rate multiplier at optimizer step `step` (0-based) of `steps`: linear warm-up over
    `round(warmup_fraction · steps)` steps, then cosine decay; positive at every step, for any `steps` >= 1
    (`OneCycleLR` divides by zero when `pct_start · steps` is 1, e.g. 10 steps, and gives a 1-step run no rate)."""
    warmup = round(warmup_fraction * steps)
    if step < warmup:
        return (step + 1) / (warmup + 1)
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def _trainable(engine: Engine, cfg: TrainConfig, initial: TaskSpec) -> tuple[list, int]:
    """The parameters to train and how many values of them belong to this task (the bank's other slots and MaskBERT's
    and Diff-Pruning's position lists are not trained)."""
    bank = engine.bank
    head = [bank.head_weight, bank.head_bias]
    if cfg.pet == "full":
        body = list(engine.model.encoder.parameters())
        return body + head, sum(p.numel() for p in body) + initial.tensors["classifier.weight"].numel() + len(
            initial.labels)
    body = [p for m in bank.methods.values() for p in m.parameters()]
    count = sum(t.numel() for k, t in initial.tensors.items() if not k.endswith(("mask_index", "diff_index")))
    return body + head, count


def _sparsity(engine: Engine, spec: TaskSpec, pet: str) -> dict:
    """For the sparse methods: how many weights the served task changes, of the weights it could change."""
    key = {"maskbert": "mask_index", "diff_pruning": "diff_index"}.get(pet)
    if key is None:
        return {}
    sites = engine.cfg.linear_sites()
    changed = sum(t.numel() for k, t in spec.tensors.items() if k.endswith(key))
    total = sum(o * i for o, i in sites.values())
    return {"weights_changed": changed, "weights_targeted": total, "fraction": changed / total}


def train_task(name: str, dataset: str, cfg: TrainConfig, backbone: str = DEFAULT_BACKBONE,
               device: str | None = None, progress: bool = True) -> TrainResult:
    """Fine-tune one task; return its test accuracy and (for PET methods) the servable TaskSpec.

    Each stage (see `TrainConfig.stages`) runs AdamW with `lr_factor`'s schedule and keeps its epoch with the best
    validation accuracy; after the first stage the method turns its trained state into what it serves
    (`finish_training`, e.g. Diff-Pruning's magnitude pruning), and the next stage trains only what was kept."""
    if dataset not in DATASETS:
        raise InvalidInput(f"unknown dataset {dataset!r}; choose one of {sorted(DATASETS)}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    data = load_dataset(dataset, seed=cfg.seed)
    engine = Engine(backbone, device=device, capacity=2, max_length=cfg.max_length, max_rank=max(cfg.lora_r, 1))
    initial = initial_task(name, engine, list(data.labels), cfg, cfg.seed)
    engine.add_task(initial)
    train = data.train[: cfg.max_examples] if cfg.max_examples else data.train
    if not train:
        raise InvalidInput(f"dataset {dataset!r} has no training examples (max_examples={cfg.max_examples})")
    splits = {"train": train, "validation": data.validation[: cfg.max_validation_examples], "test": data.test}
    tokens = {split: engine.tokenize([e.text for e in examples]) for split, examples in splits.items()}
    gold = {split: [e.label for e in examples] for split, examples in splits.items()}

    bank = engine.bank
    params, trainable = _trainable(engine, cfg, initial)
    for p in params:
        p.requires_grad_(True)
    head_ids = {id(bank.head_weight), id(bank.head_bias)}
    body = [p for p in params if id(p) not in head_ids]
    entry = bank.tasks[name]
    n_labels = len(data.labels)
    per_epoch = math.ceil(len(train) / cfg.batch_size)
    losses: list[float] = []
    history: list[float] = []
    best = -1.0
    started = time.monotonic()
    bar = tqdm(total=cfg.epochs * per_epoch, desc=f"train {name} ({cfg.pet}, {dataset})", disable=not progress,
               unit="step", mininterval=0.5 if sys.stderr.isatty() else 10.0)
    for stage, epochs in enumerate(cfg.stages()):
        if stage:  # e.g. Diff-Pruning: prune, then train only the kept δ (fresh moments: the positions moved)
            for method, slot in entry.slots.items():
                bank.methods[method].finish_training(slot, entry.pet[method])
            best = accuracy(engine, name, tokens["validation"], gold["validation"])
            log.info("%s: %.4f validation accuracy after finishing stage %d", name, best, stage)
        optimizer = torch.optim.AdamW([{"params": body, "lr": cfg.default_lr},
                                       {"params": [bank.head_weight, bank.head_bias], "lr": cfg.head_lr}],
                                      weight_decay=0.0)
        steps = epochs * per_epoch
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_factor(step, steps, cfg.warmup_fraction))
        best_state = {k: v.detach().clone() for k, v in engine.model.state_dict().items()} if stage else None
        for epoch in range(epochs):
            engine.model.train()
            total, count = 0.0, 0
            for batch in _batches([len(t) for t in tokens["train"]], cfg.batch_size, rng):
                x, m = _tensors([tokens["train"][i] for i in batch], engine.cfg.pad_token_id, engine.device)
                y = torch.tensor([gold["train"][i] for i in batch], device=engine.device)
                logits = engine.model(x, m, bank.row_tasks([name] * len(batch)))[:, :n_labels]
                loss = F.cross_entropy(logits, y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                total, count = total + loss.item() * len(batch), count + len(batch)
                bar.update()
                bar.set_postfix(loss=f"{loss.item():.3f}", epoch=len(losses) + 1)
            losses.append(total / count)
            val = accuracy(engine, name, tokens["validation"], gold["validation"])
            history.append(val)
            log.info("%s epoch %d: train loss %.4f, validation accuracy %.4f", name, len(losses), losses[-1], val)
            bar.set_postfix(val_acc=f"{val:.4f}", epoch=len(losses))
            if val > best:  # keep the stage's best epoch by validation accuracy
                best = val
                best_state = {k: v.detach().clone() for k, v in engine.model.state_dict().items()}
        engine.model.load_state_dict(best_state)
    bar.close()
    for p in params:
        p.requires_grad_(False)
    for method, slot in entry.slots.items():  # what is tested is what is served
        bank.methods[method].finish_training(slot, entry.pet[method])
    test = accuracy(engine, name, tokens["test"], gold["test"])
    seconds = time.monotonic() - started
    spec, stored, sparsity = None, trainable, {}
    if cfg.pet != "full":
        spec = bank.export(name)
        spec.meta = {"dataset": dataset, "backbone": str(backbone), "train": asdict(cfg),
                     "metrics": {"validation_accuracy": best, "test_accuracy": test}}
        stored = sum(t.numel() for t in spec.tensors.values())
        sparsity = _sparsity(engine, spec, cfg.pet)
    return TrainResult(name, dataset, cfg.pet, best, test, len(train), len(splits["test"]), seconds, trainable,
                       epochs=cfg.epochs, stored_parameters=stored, task_bytes=4 * stored, train_losses=losses,
                       validation_history=history, sparsity=sparsity, spec=spec)


# The default repository's tasks: (name, dataset, PET method, epochs); four PET types, so that serving always mixes
# LoRA, IA3, BitFit and adapter rows (the dearer sparse methods, MaskBERT and Diff-Pruning, are in the report only).
DEFAULT_TASKS = (
    ("movie_review_sentiment", "rotten_tomatoes", "lora", 2),
    ("tweet_sentiment", "vader_tweets", "ia3", 3),
    ("amazon_review_sentiment", "vader_amazon", "bitfit", 3),
    ("news_editorial_sentiment", "vader_nyt", "pfeiffer", 3),
)


def build_default_tasks(tasks_dir: Path, progress: bool = True, force: bool = False) -> list[TrainResult | str]:
    """Train every default task not yet built into `tasks_dir`; resumable (a finished task is kept)."""
    done = []
    for name, dataset, pet, epochs in DEFAULT_TASKS:
        target = tasks_dir / name
        built = built_as(target, name)
        if built == (dataset, pet, epochs) and not force:
            log.info("%s: already built at %s", name, target)
            done.append(name)
            continue
        if built is not None and not force:
            log.info("%s: built at %s as %s; retraining as %s", name, target, built, (dataset, pet, epochs))
        result = train_task(name, dataset, TrainConfig(pet=pet, epochs=epochs), progress=progress)
        save_task(result.spec, target)
        log.info("%s: test accuracy %.4f, written to %s", name, result.test_accuracy, target)
        done.append(result)
    return done


def built_as(target: Path, name: str) -> tuple[str, str, int] | None:
    """(dataset, method, epochs) a built task directory was trained with, or None when there is none (or unreadable)."""
    from chorus.backends.task_files import load_task

    if not (target / "task.safetensors").is_file():
        return None
    try:
        meta = load_task(target, name).meta
        return meta["dataset"], meta["train"]["pet"], meta["train"]["epochs"]
    except (ChorusError, KeyError, TypeError):
        return ("?", "?", 0)


# ---- command line ---------------------------------------------------------------------------------------------------
def _cmd_train(args) -> int:
    cfg = TrainConfig(pet=args.pet, epochs=args.epochs, seed=args.seed, max_examples=args.max_examples,
                      lora_r=args.lora_r, lora_alpha=args.lora_alpha, lr=args.lr, tune_layer_norm=args.tune_layer_norm)
    result = train_task(args.task, args.dataset, cfg, backbone=args.backbone)
    print(f"{result.name}: {result.pet} on {result.dataset}: test accuracy {result.test_accuracy:.4f} "
          f"({result.test_examples} held-out examples), validation {result.validation_accuracy:.4f}, "
          f"{result.seconds:.0f} s")
    if result.spec is not None and args.out:
        print(f"task written to {save_task(result.spec, Path(args.out))}")
    return 0


def _cmd_build_repository(args) -> int:
    tasks_dir = Path(args.repository) / "chorus" / "tasks"
    build_default_tasks(tasks_dir, force=args.force)
    (tasks_dir / ".built").write_text("default tasks built by `chorus build-repository`\n")
    for name, dataset, pet, _ in DEFAULT_TASKS:
        from chorus.backends.task_files import load_task

        acc = load_task(tasks_dir / name, name).meta.get("metrics", {}).get("test_accuracy")
        print(f"{name}: {pet} on {dataset}, test accuracy {acc:.4f}")
    print(f"default model repository ready: {Path(args.repository).resolve()}")
    return 0


def _cmd_accuracy_report(args) -> int:
    """Each default task's PET test accuracy next to a full fine-tune of the same backbone, as a results file.

    PET figures come from the built repository's task files (trained with the same config and seed) when present.
    """
    import json

    from chorus.backends.task_files import load_task

    if args.methods:
        return _pet_types_report(args)
    tasks_dir = Path(args.repository) / "chorus" / "tasks"
    rows = []
    for name, dataset, pet, epochs in DEFAULT_TASKS:
        built = tasks_dir / name
        if (built / "task.safetensors").is_file():
            spec = load_task(built, name)
            m = spec.meta["metrics"]
            rows.append({"name": name, "dataset": dataset, "pet": pet, "test_accuracy": m["test_accuracy"],
                         "validation_accuracy": m["validation_accuracy"], "source": str(built),
                         "trainable_parameters": sum(t.numel() for t in spec.tensors.values())})
        else:
            rows.append(train_task(name, dataset, TrainConfig(pet=pet, epochs=epochs)).summary())
        rows.append(train_task(name, dataset, TrainConfig(pet="full", epochs=epochs)).summary())
        print(f"{name}: {pet} {rows[-2]['test_accuracy']:.4f}, full fine-tune {rows[-1]['test_accuracy']:.4f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    command, machine, date = _provenance()
    lines = [f"# Test accuracy: PET tasks vs full fine-tune on {DEFAULT_BACKBONE}", "",
             f"- command: `{command}`", f"- machine: {machine}", f"- date: {date}",
             "- splits: seeded (0), de-duplicated 80/10/10 (`chorus.data`); accuracy on the held-out test split; "
             "each run keeps its epoch with the best validation accuracy; PET rows are the served task files", "",
             "| task | dataset | method | trainable params | test accuracy | full fine-tune | gap (points) |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: |"]
    for pet_row, full_row in zip(rows[::2], rows[1::2]):
        gap = 100 * (pet_row["test_accuracy"] - full_row["test_accuracy"])
        lines.append(f"| {pet_row['name']} | {pet_row['dataset']} | {pet_row['pet']} | "
                     f"{pet_row['trainable_parameters']:,} | {pet_row['test_accuracy']:.4f} | "
                     f"{full_row['test_accuracy']:.4f} | {gap:+.1f} |")
    out.write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps({"command": command, "machine": machine, "date": date,
                                                    "runs": rows}, indent=2) + "\n")
    print(f"written {out} and {out.with_suffix('.json')}")
    return 0


def _provenance() -> tuple[str, str, str]:
    """The command line, the machine and the date, as results files record them."""
    import datetime
    import platform
    import shlex

    command = "chorus " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    machine = f"{platform.node()} ({platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__})"
    return command, machine, datetime.date.today().isoformat()


PET_TYPES = {"lora": "LoRA", "bitfit": "BitFit", "houlsby": "Adapter (Houlsby)", "pfeiffer": "Adapter (Pfeiffer)",
             "ia3": "IA3", "maskbert": "MaskBERT", "diff_pruning": "Diff-Pruning",
             "layer_norm": "LayerNorm (LN-tuning)", "full": "full fine-tune"}


def _pet_types_report(args) -> int:
    """One task per PET method on one dataset (same seed, split and epochs), next to a full fine-tune."""
    methods = [m for m in PET_CHOICES if m != "full"] if args.methods == "all" else args.methods.split(",")
    unknown = sorted(set(methods) - set(PET_CHOICES))
    if unknown:
        raise InvalidInput(f"--methods: unknown {unknown}; choose from {PET_CHOICES} or 'all'")
    if "full" not in methods:
        methods.append("full")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    configs = {pet: TrainConfig(pet=pet, epochs=args.epochs, max_examples=args.max_examples,
                                max_validation_examples=args.max_validation) for pet in methods}
    runs = {}
    with concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn"),
                                                initializer=torch.set_num_threads,
                                                initargs=(max(1, torch.get_num_threads() // args.jobs),)) as pool:
        dearest_first = sorted(configs, key=lambda m: m not in ("maskbert", "diff_pruning", "full"))
        futures = {pool.submit(_report_run, args.dataset, configs[pet], not args.quiet and args.jobs == 1): pet
                   for pet in dearest_first}
        for future in concurrent.futures.as_completed(futures):
            pet = futures[future]
            runs[pet] = {**future.result(), "lr": configs[pet].default_lr}
            print(f"{pet}: test accuracy {runs[pet]['test_accuracy']:.4f}, validation "
                  f"{runs[pet]['validation_accuracy']:.4f}, {runs[pet]['stored_parameters']:,} values stored, "
                  f"{runs[pet]['seconds']:.0f} s", flush=True)
            # after every run, in method order: a long report leaves what it finished
            _write_pet_types(out, [runs[m] for m in methods if m in runs], args)
    print(f"written {out} and {out.with_suffix('.json')}")
    return 0


def _report_run(dataset: str, cfg: TrainConfig, progress: bool) -> dict:
    """One run of the PET-types report (in a worker process: returns plain data)."""
    result = train_task(f"{dataset}_{cfg.pet}", dataset, cfg, progress=progress)
    return {**result.summary(), "threads": torch.get_num_threads()}


def _write_pet_types(out: Path, runs: list[dict], args) -> None:
    import json

    command, machine, date = _provenance()
    machine += f"; {args.jobs} run(s) at once, {runs[0]['threads']} thread(s) each"
    full = next((r for r in runs if r["pet"] == "full"), None)
    cfg = TrainConfig()
    lines = [f"# Test accuracy of every PET type vs a full fine-tune of {DEFAULT_BACKBONE} on {args.dataset}", "",
             f"- command: `{command}`", f"- machine: {machine}", f"- date: {date}",
             f"- splits: seeded (0), de-duplicated 80/10/10 (`chorus.data`); accuracy on the held-out test split "
             f"({runs[0]['test_examples']:,} examples); every run: seed 0, the first {runs[0]['train_examples']:,} "
             f"examples of the seeded train split{' (capped by --max-examples)' if args.max_examples else ''}"
             f"{f', validation capped to its first {args.max_validation:,}' if args.max_validation else ''}, "
             f"{args.epochs} epochs, batch {cfg.batch_size}, AdamW, warm-up {cfg.warmup_fraction:.0%} then cosine, "
             f"head lr {cfg.head_lr:g}; each keeps its epoch with the best validation accuracy; PET rows are the "
             "served task (what `chorus train --out` writes)",
             "- trained params: what the optimizer updated for the task (classifier head included); stored values / "
             "bytes: what a served task file holds (fp32; sparse methods store positions too); full fine-tune: a "
             "whole encoder copy per task", "",
             "| PET type | `--pet` | lr | epochs | trained params | stored values per task | bytes per task | "
             "validation | test accuracy | vs full (points) | wall time (s) |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in runs:
        gap = "" if full is None or r is full else f"{100 * (r['test_accuracy'] - full['test_accuracy']):+.1f}"
        lines.append(f"| {PET_TYPES[r['pet']]} | {r['pet']} | {r['lr']:g} | {r['epochs']} | "
                     f"{r['trainable_parameters']:,} | {r['stored_parameters']:,} | {r['task_bytes']:,} | "
                     f"{r['validation_accuracy']:.4f} | {r['test_accuracy']:.4f} | {gap} | {r['seconds']:.0f} |")
    notes = [f"- {PET_TYPES[r['pet']]}: changes {r['sparsity']['weights_changed']:,} of "
             f"{r['sparsity']['weights_targeted']:,} linear weights ({100 * r['sparsity']['fraction']:.2f}%)"
             for r in runs if r["sparsity"]]
    if notes:
        lines += ["", *notes]
    out.write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps({"command": command, "machine": machine, "date": date,
                                                    "dataset": args.dataset, "runs": runs}, indent=2) + "\n")


def register(sub) -> None:
    p = sub.add_parser("train", help="fine-tune one PET task on a real dataset and print its test accuracy")
    p.add_argument("--task", required=True, help="task name")
    p.add_argument("--dataset", required=True, choices=sorted(DATASETS))
    p.add_argument("--pet", default="lora", choices=PET_CHOICES)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--lora-alpha", type=int, default=16)
    p.add_argument("--tune-layer-norm", action="store_true", help="also tune every LayerNorm's weight and bias beside "
                   "--pet (as Houlsby et al. do beside their adapters); --pet layer_norm tunes them alone")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-examples", type=int, default=None, help="cap the training split")
    p.add_argument("--backbone", default=DEFAULT_BACKBONE)
    p.add_argument("--out", help="write the task directory here (servable with `chorus task add`)")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("build-repository", help="train the default tasks into the model repository")
    p.add_argument("--repository", default="model_repository")
    p.add_argument("--force", action="store_true", help="retrain tasks already built")
    p.set_defaults(func=_cmd_build_repository)

    p = sub.add_parser("accuracy-report", help="PET vs full fine-tune test accuracy of the default tasks")
    p.add_argument("--repository", default="model_repository", help="read built PET tasks' accuracy from here")
    p.add_argument("--out", default=f"perf/results/accuracy-{time.strftime('%Y-%m-%d')}.md")
    p.add_argument("--methods", help="instead of the default tasks: train one task per PET method (comma-separated, "
                   "or 'all') on --dataset, next to a full fine-tune")
    p.add_argument("--dataset", default="rotten_tomatoes", choices=sorted(DATASETS), help="with --methods")
    p.add_argument("--epochs", type=int, default=2, help="with --methods: epochs of every run")
    p.add_argument("--max-examples", type=int, default=None, help="with --methods: cap every run's training split")
    p.add_argument("--max-validation", type=int, default=None, help="with --methods: cap the validation split")
    p.add_argument("--jobs", type=int, default=1, help="with --methods: runs at once, in processes sharing the "
                   "threads (a run's result does not depend on it)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_accuracy_report)
