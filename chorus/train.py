"""Fine-tuning PET tasks (and full fine-tunes, for comparison) on real data, through the serving engine's own bank.

A task trains in a one-task bank of the same `MultiTaskModel` that serves it, so what is trained is exactly what is
served: `chorus train` writes a task directory that `chorus task add` (or the model config) serves as it is.
"""

from __future__ import annotations

import logging
import math
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
from chorus.errors import InvalidInput

log = logging.getLogger(__name__)

# sites each method trains (site names end with these); IA3's are PEFT's defaults for BERT
ADAPTER_SITES = {"houlsby": ("attention.output.dense", "output.dense"), "pfeiffer": ("output.dense",)}
IA3_SITES = ("attention.self.key", "attention.self.value", "output.dense")  # output.dense: its input is scaled
PET_CHOICES = ("lora", "bitfit", "houlsby", "pfeiffer", "ia3", "maskbert", "diff_pruning", "full")
ADAPTER_CHOICES = ("houlsby", "pfeiffer")  # one `adapter` bank; the choice is the adapter's placement


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
    max_examples: int | None = None  # cap the training split (quick runs and tests)

    def __post_init__(self) -> None:
        if self.pet not in PET_CHOICES:
            raise InvalidInput(f"pet={self.pet!r}: choose one of {PET_CHOICES}")
        if self.epochs < 1 or self.batch_size < 1:
            raise InvalidInput("epochs and batch_size must be positive")

    @property
    def default_lr(self) -> float:
        return self.lr or {"lora": 1e-3, "bitfit": 3e-3, "houlsby": 1e-3, "pfeiffer": 1e-3, "ia3": 3e-3,
                           "maskbert": 1e-3, "diff_pruning": 2e-4, "full": 5e-5}[self.pet]

    def pet_options(self) -> dict[str, dict]:
        if self.pet == "lora":
            return {"lora": {"r": self.lora_r, "alpha": self.lora_alpha, "target_modules": list(self.lora_targets)}}
        if self.pet in ADAPTER_CHOICES:
            return {"adapter": {"bottleneck": self.adapter_bottleneck, "activation": self.adapter_activation,
                                "placement": self.pet}}
        if self.pet == "diff_pruning":
            return {"diff_pruning": {"density": self.diff_density}}
        return {} if self.pet == "full" else {self.pet: {}}


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
    trainable_parameters: int
    spec: TaskSpec | None = field(default=None, repr=False)

    def summary(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "spec"}


def initial_task(name: str, engine: Engine, labels: list[str], cfg: TrainConfig, seed: int) -> TaskSpec:
    """Each method as its paper / PEFT starts it, so the untrained task is the backbone itself: LoRA A Kaiming-uniform,
    B zero; BitFit deltas zero; adapters down N(0, 0.01²), up and biases zero (near-identity); IA3 l = 1 (stored 0);
    MaskBERT every weight of every linear a candidate, kept (score `mask_init_score`); Diff-Pruning δ = 0 over every
    weight (pruned to `diff_density` after training, see `DiffPruning.finish_training`). A small random head."""
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


def train_task(name: str, dataset: str, cfg: TrainConfig, backbone: str = DEFAULT_BACKBONE,
               device: str | None = None, progress: bool = True) -> TrainResult:
    """Fine-tune one task; return its test accuracy and (for PET methods) the servable TaskSpec."""
    if dataset not in DATASETS:
        raise InvalidInput(f"unknown dataset {dataset!r}; choose one of {sorted(DATASETS)}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    data = load_dataset(dataset, seed=cfg.seed)
    engine = Engine(backbone, device=device, capacity=2, max_length=cfg.max_length, max_rank=max(cfg.lora_r, 1))
    engine.add_task(initial_task(name, engine, list(data.labels), cfg, cfg.seed))

    train = data.train[: cfg.max_examples] if cfg.max_examples else data.train
    tokens = {split: engine.tokenize([e.text for e in examples])
              for split, examples in (("train", train), ("validation", data.validation), ("test", data.test))}
    gold = {"train": [e.label for e in train], "validation": [e.label for e in data.validation],
            "test": [e.label for e in data.test]}

    bank = engine.bank
    pet_params = [p for m in bank.methods.values() for p in m.parameters()]
    head_params = [bank.head_weight, bank.head_bias]
    body = list(engine.model.encoder.parameters()) if cfg.pet == "full" else pet_params
    for p in body + head_params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW([{"params": body, "lr": cfg.default_lr},
                                   {"params": head_params, "lr": cfg.head_lr}], weight_decay=0.0)
    trainable = sum(p.numel() for p in body + head_params if p.requires_grad)
    if cfg.pet != "full":  # count what a task really holds, not the bank's padding and null slot
        trainable = sum(t.numel() for t in bank.export(name).tensors.values())

    steps = cfg.epochs * math.ceil(len(train) / cfg.batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=[cfg.default_lr, cfg.head_lr],
                                                    total_steps=steps, pct_start=0.1)
    n_labels = len(data.labels)
    best, best_state = -1.0, None
    started = time.monotonic()
    bar = tqdm(total=steps, desc=f"train {name} ({cfg.pet}, {dataset})", disable=not progress, unit="step",
               mininterval=0.5 if sys.stderr.isatty() else 10.0)
    for epoch in range(cfg.epochs):
        engine.model.train()
        for batch in _batches([len(t) for t in tokens["train"]], cfg.batch_size, rng):
            x, m = _tensors([tokens["train"][i] for i in batch], engine.cfg.pad_token_id, engine.device)
            y = torch.tensor([gold["train"][i] for i in batch], device=engine.device)
            logits = engine.model(x, m, bank.row_tasks([name] * len(batch)))[:, :n_labels]
            loss = F.cross_entropy(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}", epoch=epoch + 1)
        val = accuracy(engine, name, tokens["validation"], gold["validation"])
        log.info("%s epoch %d: validation accuracy %.4f", name, epoch + 1, val)
        bar.set_postfix(val_acc=f"{val:.4f}", epoch=epoch + 1)
        if val > best:  # keep the best epoch by validation accuracy
            best = val
            best_state = {k: v.detach().clone() for k, v in engine.model.state_dict().items()}
    bar.close()
    engine.model.load_state_dict(best_state)
    entry = bank.tasks[name]  # e.g. Diff-Pruning's magnitude pruning: the test accuracy is the served task's
    for method, slot in entry.slots.items():
        bank.methods[method].finish_training(slot, entry.pet[method])
    test = accuracy(engine, name, tokens["test"], gold["test"])
    seconds = time.monotonic() - started
    spec = None
    if cfg.pet != "full":
        spec = bank.export(name)
        spec.meta = {"dataset": dataset, "backbone": str(backbone), "train": asdict(cfg),
                     "metrics": {"validation_accuracy": best, "test_accuracy": test}}
    return TrainResult(name, dataset, cfg.pet, best, test, len(train), len(data.test), seconds, trainable, spec)


# The default repository's tasks: (name, dataset, PET method, epochs).
DEFAULT_TASKS = (
    ("movie_review_sentiment", "rotten_tomatoes", "lora", 2),
    ("tweet_sentiment", "vader_tweets", "lora", 3),
    ("amazon_review_sentiment", "vader_amazon", "bitfit", 3),
    ("news_editorial_sentiment", "vader_nyt", "bitfit", 3),
)


def build_default_tasks(tasks_dir: Path, progress: bool = True, force: bool = False) -> list[TrainResult | str]:
    """Train every default task not yet built into `tasks_dir`; resumable (a finished task is kept)."""
    done = []
    for name, dataset, pet, epochs in DEFAULT_TASKS:
        target = tasks_dir / name
        if (target / "task.safetensors").is_file() and not force:
            log.info("%s: already built at %s", name, target)
            done.append(name)
            continue
        result = train_task(name, dataset, TrainConfig(pet=pet, epochs=epochs), progress=progress)
        save_task(result.spec, target)
        log.info("%s: test accuracy %.4f, written to %s", name, result.test_accuracy, target)
        done.append(result)
    return done


# ---- command line ---------------------------------------------------------------------------------------------------
def _cmd_train(args) -> int:
    cfg = TrainConfig(pet=args.pet, epochs=args.epochs, seed=args.seed, max_examples=args.max_examples,
                      lora_r=args.lora_r, lora_alpha=args.lora_alpha, lr=args.lr)
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
    import datetime
    import json
    import platform
    import shlex

    from chorus.backends.task_files import load_task

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
    command = "chorus " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    machine = f"{platform.node()} ({platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__})"
    date = datetime.date.today().isoformat()
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


def register(sub) -> None:
    p = sub.add_parser("train", help="fine-tune one PET task on a real dataset and print its test accuracy")
    p.add_argument("--task", required=True, help="task name")
    p.add_argument("--dataset", required=True, choices=sorted(DATASETS))
    p.add_argument("--pet", default="lora", choices=PET_CHOICES)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--lora-alpha", type=int, default=16)
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
    p.set_defaults(func=_cmd_accuracy_report)
