"""`chorus export`: a model directory's backbone + task bank, or one task's students, to ONNX (+ TensorRT).

    chorus export --model-dir model_repository/chorus --out exports/backbone
    chorus export --model-dir model_repository/chorus --students movie_review_sentiment --out exports/students [--k 2 4]

The model directory is a chorus Triton model directory: its `config.pbtxt` parameters name the backbone (`backbone`,
`max_rank`, `task_capacity`) and the tasks (`tasks`, a JSON map {name: directory relative to the model directory});
students are read from `students/<task>` under it (or `--students-dir`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from chorus.errors import ChorusError, MissingDependency, TaskFileError

# `{ key: "name", value: { string_value: "..." } }` in a config.pbtxt
_PARAM = re.compile(r'\{\s*key:\s*"([^"]+)"\s*,\s*value:\s*\{\s*string_value:\s*"((?:[^"\\]|\\.)*)"\s*\}\s*\}')


def model_parameters(model_dir: str | Path) -> dict[str, str]:
    """The string parameters of `model_dir/config.pbtxt`."""
    path = Path(model_dir) / "config.pbtxt"
    if not path.is_file():
        raise TaskFileError(f"{path} is missing: --model-dir must be a chorus model directory (e.g. "
                            "model_repository/chorus)")
    text = "\n".join(line for line in path.read_text(encoding="utf-8").splitlines() if not line.lstrip().startswith("#"))
    return {k: json.loads(f'"{v}"') for k, v in _PARAM.findall(text)}


def backbone_of(params: dict[str, str], model_dir: Path) -> str:
    from chorus.backends.engine import DEFAULT_BACKBONE

    name = params.get("backbone", DEFAULT_BACKBONE)
    local = model_dir / name
    return str(local) if (local / "config.json").is_file() else name  # a path relative to the model directory


def _cmd_export(args) -> int:
    model_dir = Path(args.model_dir)
    params = model_parameters(model_dir)
    backbone = backbone_of(params, model_dir)
    out = Path(args.out)
    if args.students:
        written = _export_students(args, model_dir, backbone, out)
    else:
        written = _export_backbone(args, params, model_dir, backbone, out)
    print(f"ONNX export written to {out}: {', '.join(sorted(p.name for p in written))}")
    if args.tensorrt:
        try:
            _tensorrt(args, out, written)
        except MissingDependency as e:
            print(f"TensorRT skipped: {e}")
    return 0


def _export_backbone(args, params, model_dir: Path, backbone: str, out: Path) -> list[Path]:
    from chorus.backends.engine import build_model
    from chorus.backends.formats import load_any
    from chorus.export.backbone import BANK_FILE, MANIFEST_FILE, MODEL_FILE, save_backbone_export

    try:
        tasks = json.loads(params.get("tasks", "{}"))
    except json.JSONDecodeError as e:
        raise TaskFileError(f"{model_dir / 'config.pbtxt'}: parameter tasks is not a JSON object: {e}") from None
    if not tasks:
        raise ChorusError(f"{model_dir / 'config.pbtxt'} names no tasks (parameter `tasks`): nothing to export")
    model = build_model(backbone, capacity=int(params.get("task_capacity", "16")),
                        max_rank=int(params.get("max_rank", "16")))
    sites = model.encoder.cfg.linear_sites()
    for name, path in tasks.items():
        model.bank.add(load_any(model_dir / path, name, sites=sites))
    save_backbone_export(model, out, args.opset)
    return [out / MODEL_FILE, out / BANK_FILE, out / MANIFEST_FILE]


def _export_students(args, model_dir: Path, backbone: str, out: Path) -> list[Path]:
    from chorus.backends.encoder import Encoder, read_hf_checkpoint
    from chorus.backends.engine import resolve_backbone
    from chorus.backends.students import SharedEmbeddings, read_students
    from chorus.export.students import MANIFEST_FILE, export_students, student_file

    path = Path(args.students_dir) if args.students_dir else model_dir / "students" / args.students
    files = read_students(path)
    cfg, state = read_hf_checkpoint(resolve_backbone(backbone))
    encoder = Encoder(cfg)
    encoder.load_hf_state_dict(state)
    group = files.group(SharedEmbeddings.from_encoder(encoder))
    ks = args.k or None
    export_students(group, out, files.labels, ks, args.opset, cfg.pad_token_id, files.prefixes)
    return [out / MANIFEST_FILE, *(out / student_file(k) for k in (ks or range(1, group.num_students + 1)))]


def _tensorrt(args, out: Path, written: list[Path]) -> None:
    from chorus.export.tensorrt import build_engine, import_tensorrt, shape_ranges

    import_tensorrt()  # says so before any work when it is not installed
    example: dict[str, tuple[int, ...]] = {}
    bank = out / "bank.safetensors"
    if bank in written:
        from safetensors import safe_open

        with safe_open(bank, "pt") as f:
            example = {n: tuple(f.get_slice(n).get_shape()) for n in f.keys()}
    for onnx_path in (p for p in written if p.suffix == ".onnx"):
        ranges = shape_ranges(onnx_path, example, args.max_batch, args.max_sequence)
        engine = build_engine(onnx_path, onnx_path.with_suffix(".plan"), ranges, fp16=args.fp16)
        print(f"TensorRT engine written to {engine}")


def register(sub) -> None:
    """Add `export` to the `chorus` command line's subparsers."""
    from chorus.export.backbone import OPSET

    p = sub.add_parser("export", help="export the backbone + task bank, or a task's students, to ONNX (+ TensorRT)")
    p.add_argument("--model-dir", default="model_repository/chorus",
                   help="chorus model directory (config.pbtxt names backbone and tasks)")
    p.add_argument("--students", metavar="TASK", help="export this task's students instead of the backbone")
    p.add_argument("--students-dir", help="default: <model-dir>/students/<TASK>")
    p.add_argument("--k", type=int, nargs="+", help="student prefixes to export (default: every k)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--opset", type=int, default=OPSET)
    p.add_argument("--tensorrt", action="store_true", help="also build TensorRT engines (.plan) where tensorrt imports")
    p.add_argument("--fp16", action="store_true", help="TensorRT: allow float16 kernels")
    p.add_argument("--max-batch", type=int, default=64, help="TensorRT profile: largest batch")
    p.add_argument("--max-sequence", type=int, default=256, help="TensorRT profile: longest sequence")
    p.set_defaults(func=_cmd_export)
