"""TensorRT engines from the exported ONNX graphs, where the `tensorrt` package imports.

Where it does not (as on chorus's CPU machines), `build_engine` raises `MissingDependency` saying so, and
`chorus export --tensorrt` reports the skip; the ONNX files serve with onnxruntime either way.

Each dynamic input axis needs a (min, opt, max) range in the engine's optimization profile: `shape_ranges` gives the
batch and sequence axes the requested ranges and every other dynamic axis (the bank's slot capacity, a sparse site's
max_nnz) its size in the given example feeds, so a backbone engine fits the bank it was built for (a bank that grows
needs a new engine).
"""

from __future__ import annotations

import logging
from pathlib import Path

from chorus.errors import MissingDependency

log = logging.getLogger(__name__)

Shape = tuple[int, ...]


def import_tensorrt():
    """The `tensorrt` module, or MissingDependency saying it is not installed."""
    try:
        import tensorrt
    except ImportError as e:
        raise MissingDependency(f"tensorrt is not installed ({e}); TensorRT engines are skipped. Install NVIDIA "
                                "TensorRT's Python package (pip install tensorrt, on a machine with a CUDA GPU) to "
                                "build them; the ONNX files serve with onnxruntime meanwhile") from None
    return tensorrt


def shape_ranges(onnx_path: str | Path, example_shapes: dict[str, Shape], max_batch: int = 64,
                 max_sequence: int = 256, opt_batch: int = 16, opt_sequence: int = 64) -> dict[str, tuple[Shape, ...]]:
    """(min, opt, max) per graph input: `batch`/`sequence` axes over 1..max, other dynamic axes fixed at the example's
    size (`example_shapes`: input name -> shape, e.g. the bank's tensors)."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    ranges = {}
    for inp in model.graph.input:
        dims = inp.type.tensor_type.shape.dim
        lo, opt, hi = [], [], []
        for i, d in enumerate(dims):
            if d.dim_param == "batch":
                lo.append(1), opt.append(opt_batch), hi.append(max_batch)
            elif d.dim_param == "sequence":
                lo.append(1), opt.append(opt_sequence), hi.append(max_sequence)
            elif d.dim_param:
                if inp.name not in example_shapes:
                    raise ValueError(f"input {inp.name!r} has a dynamic axis {d.dim_param!r}: give its size in "
                                     "example_shapes")
                n = example_shapes[inp.name][i]
                lo.append(n), opt.append(n), hi.append(n)
            else:
                lo.append(d.dim_value), opt.append(d.dim_value), hi.append(d.dim_value)
        ranges[inp.name] = (tuple(lo), tuple(opt), tuple(hi))
    return ranges


def build_engine(onnx_path: str | Path, engine_path: str | Path, ranges: dict[str, tuple[Shape, ...]],
                 fp16: bool = False, workspace_gib: float = 4.0) -> Path:
    """Parse an ONNX file and serialize a TensorRT engine for the given input shape ranges."""
    trt = import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode of TensorRT >= 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ValueError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in ranges.items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise ValueError(f"TensorRT failed to build an engine from {onnx_path} (see its log above)")
    engine_path = Path(engine_path)
    engine_path.write_bytes(bytes(plan))
    log.info("TensorRT engine written to %s", engine_path)
    return engine_path
