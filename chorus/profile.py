"""`chorus profile`: PetS's latency tables for a chorus model directory on this machine's engine.

    chorus profile --model-dir model_repository/chorus --out model_repository/chorus/latency.json

α(batch, length) for the shared backbone, β(PET type, batch, length) for each served PET type, and β for the students
when a task has them, measured with the model's own parameters (backbone, dtype, tasks, students) on `--device`.
Point the entry model's `latency_table` parameter at the file and the server loads it instead of profiling at start.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from chorus.errors import InvalidInput


def _cmd_profile(args) -> int:
    from chorus.backends.engine import DTYPES, Engine
    from chorus.backends.executor import profile_engine
    from chorus.backends.students.bank import StudentBank
    from chorus.export.cli import backbone_of, model_parameters

    model_dir = Path(args.model_dir)
    params = model_parameters(model_dir)
    dtype = params.get("dtype", "float32")
    if dtype not in DTYPES:
        raise InvalidInput(f"{model_dir / 'config.pbtxt'}: dtype={dtype!r}; expected one of {sorted(DTYPES)}")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    engine = Engine(backbone_of(params, model_dir), device=device, dtype=DTYPES[dtype],
                    capacity=int(params.get("task_capacity", "16")),
                    max_length=int(params.get("max_length", "0")) or None, max_rank=int(params.get("max_rank", "16")))
    tasks, students = (json.loads(params.get(key, "{}")) for key in ("tasks", "students"))
    for name, path in tasks.items():
        engine.load_task(name, model_dir / path)
    bank = StudentBank(engine) if students else None
    for name, path in students.items():
        bank.load(name, model_dir / path)
    table = profile_engine(engine, bank, batch_sizes=tuple(args.batch_sizes), seq_lens=tuple(args.seq_lens),
                           repeats=args.repeats)
    table.save(args.out)
    print(f"latency tables for {len(tasks)} tasks on {device} ({dtype}) written to {args.out}")
    for i, n in enumerate(table.batch_sizes):
        alpha = " ".join(f"L{L}={1000 * table.shared[i][j]:.2f}" for j, L in enumerate(table.seq_lens))
        print(f"  alpha batch {n}: {alpha} ms")
    for p, grid in sorted(table.pet.items()):
        beta = " ".join(f"L{L}={1000 * grid[-1][j]:.2f}" for j, L in enumerate(table.seq_lens))
        print(f"  beta {p} batch {table.batch_sizes[-1]}: {beta} ms")
    return 0


def register(sub) -> None:
    p = sub.add_parser("profile", help="measure the scheduler's latency tables (PetS's alpha/beta) for a model")
    p.add_argument("--model-dir", default="model_repository/chorus", help="a chorus model directory")
    p.add_argument("--out", required=True, help="where to write the table (JSON, chorus-latency/1)")
    p.add_argument("--device", help="default: cuda if present, else cpu")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32, 64])
    p.add_argument("--seq-lens", type=int, nargs="+", default=[16, 32, 64, 128])
    p.add_argument("--repeats", type=int, default=3, help="runs per grid point (the median is kept)")
    p.set_defaults(func=_cmd_profile)
