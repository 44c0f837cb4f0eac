"""A compact BERT encoder whose every linear is PetS's shared op plus task-specific PET ops.

The backbone weights are shared by all tasks and frozen; each `PetLinear` computes the shared `X·Wᵀ + b` once for the
whole batch and then adds the PET ops of whatever tasks the rows belong to (see `chorus.backends.pet`), and each
`PetLayerNorm` normalises the whole batch once and gives the rows of tasks that tune it their own affine. Loads Hugging
Face BERT checkpoints (`config.json` + `model.safetensors` or `pytorch_model.bin`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from chorus.backends.pet import fused
from chorus.errors import TaskFileError

# The linears of one BERT layer, by their Hugging Face module path under `encoder.layer.{i}.`.
LAYER_LINEARS = (
    "attention.self.query",
    "attention.self.key",
    "attention.self.value",
    "attention.output.dense",
    "intermediate.dense",
    "output.dense",
)
# The LayerNorms ("norm sites"), by their Hugging Face module path: the embeddings' and, per layer, these two.
EMBEDDINGS_NORM = "embeddings.LayerNorm"
ACTIVATIONS = {"gelu": F.gelu}  # what the feed-forward's intermediate linear applies (exact gelu, as BERT)
LAYER_NORMS = ("attention.output.LayerNorm", "output.LayerNorm")


def norm_sites(num_layers: int, hidden: int) -> dict[str, tuple[int, int]]:
    """Every LayerNorm a task may tune: its site name (Hugging Face path) -> (hidden, hidden), the shape of a linear
    site (a LayerNorm maps hidden features to hidden features; its weight and bias are (hidden,))."""
    sites = {EMBEDDINGS_NORM: (hidden, hidden)}
    sites.update({f"encoder.layer.{n}.{name}": (hidden, hidden) for n in range(num_layers) for name in LAYER_NORMS})
    return sites


@dataclass(frozen=True)
class EncoderConfig:
    vocab_size: int = 30522
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    max_positions: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}")

    @classmethod
    def from_hf(cls, hf: dict) -> EncoderConfig:
        """From a Hugging Face BertConfig dict (config.json)."""
        if hf.get("hidden_act", "gelu") not in ("gelu", "gelu_python"):
            raise ValueError(f"hidden_act {hf['hidden_act']!r} is not supported; chorus's encoder uses exact gelu")
        if hf.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError("only absolute position embeddings are supported")
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=hf["num_attention_heads"],
            intermediate_size=hf["intermediate_size"],
            max_positions=hf["max_position_embeddings"],
            type_vocab_size=hf.get("type_vocab_size", 2),
            layer_norm_eps=hf.get("layer_norm_eps", 1e-12),
            pad_token_id=hf.get("pad_token_id") or 0,
        )

    def to_hf(self) -> dict:
        return {
            "model_type": "bert", "architectures": ["BertModel"], "hidden_act": "gelu",
            "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_layers, "num_attention_heads": self.num_heads,
            "intermediate_size": self.intermediate_size, "max_position_embeddings": self.max_positions,
            "type_vocab_size": self.type_vocab_size, "layer_norm_eps": self.layer_norm_eps,
            "pad_token_id": self.pad_token_id, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
        }

    def linear_sites(self) -> dict[str, tuple[int, int]]:
        """Every PET-able linear: its site name (Hugging Face path) -> (out_features, in_features)."""
        h, i = self.hidden_size, self.intermediate_size
        shapes = {"attention.self.query": (h, h), "attention.self.key": (h, h), "attention.self.value": (h, h),
                  "attention.output.dense": (h, h), "intermediate.dense": (i, h), "output.dense": (h, i)}
        return {f"encoder.layer.{n}.{name}": shapes[name] for n in range(self.num_layers) for name in LAYER_LINEARS}

    def norm_sites(self) -> dict[str, tuple[int, int]]:
        """Every LayerNorm a task may tune (see `norm_sites`)."""
        return norm_sites(self.num_layers, self.hidden_size)


class PetLinear(nn.Module):
    """PetS's unified PET linear: `y = X·Wᵀ + b` shared by every row, plus each PET op gathered per row.

    The task bank fills two lists: `pre_ops`, callables `op(x, rows) -> x` that change the input of the rows that
    use them before the shared op (e.g. IA3's scaling of the feed-forward activations), and `ops`, callables
    `op(x, y, rows) -> y` that add a task-specific term for the rows that use it (`rows` is the batch's `RowTasks`).
    Given `GatheredRows` instead (export), each op's `gathered` form runs: one traceable op over every row.
    """

    def __init__(self, site: str, out_features: int, in_features: int):
        super().__init__()
        self.site = site
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False)
        self.pre_ops: list = []
        self.ops: list = []

    def forward(self, x: torch.Tensor, rows, activation: str | None = None, then: list = (),
                pre_ops: list | None = None, residual: torch.Tensor | None = None, norm: PetLayerNorm | None = None,
                overlap: fused.Overlap | None = None) -> torch.Tensor:
        """x (B, T, in) -> (B, T, out). `activation` ("gelu" or None) follows the post ops; `then`: ops of the
        pre-op form on the (activated) output, the next linear's pre ops, which that linear then leaves out
        (`pre_ops=()`): `FeedForward` passes the output linear's, so that the fused path scales that linear's input in
        this linear's pass. `pre_ops`: this linear's own (default). `residual` (B, T, out): added last (a sublayer's
        input, before its LayerNorm), in the fused path within the post ops' pass. `norm`: that LayerNorm, applied
        last (in the fused path its kernel also adds the residual, a lone bias term and an adapter's term:
        `PetLayerNorm.fused`). `overlap`: where the fused path takes this linear's sparse products launched ahead on
        a side stream and defers its post ops: the output is final once `overlap.finish()` has run."""
        gathered = getattr(rows, "gathered", False)
        for op in self.pre_ops if pre_ops is None else pre_ops:
            if not gathered:
                x = op(x, rows)
            elif op.method in rows.slots:  # a method the batch's rows do not use is left out of the gathered form
                x = op.gathered(x, rows)
        y = F.linear(x, self.weight, self.bias)  # the shared op, once for the whole batch: (B, T, out)
        if gathered:
            return self._gathered_post_ops(x, y, rows, activation, then, residual, norm, overlap)
        for op in self.ops:
            y = op(x, y, rows)
        if activation is not None:
            y = ACTIVATIONS[activation](y)
        for op in then:
            y = op(y, rows)
        y = y if residual is None else y + residual
        return y if norm is None else norm(y, rows)

    def _gathered_post_ops(self, x: torch.Tensor, y: torch.Tensor, rows, activation: str | None, then: list,
                           residual: torch.Tensor | None, norm: PetLayerNorm | None,
                           overlap: fused.Overlap | None) -> torch.Tensor:
        """The post ops', the activation's, `then`'s and the residual's gathered forms, leaving out methods the
        batch's rows do not use. Where the fused kernels serve, each step with a fused form gives its term to
        `fused.PostOps`, which launches them together on y, this linear's own fresh output (a kernel or two per site,
        not one or two per method, a third for the activation and a fourth for the residual), then `norm`, whose kernel
        takes the residual, a lone bias term and an adapter's term."""
        ahead, delta = overlap.take(self) if overlap is not None else ([], None)  # sparse products launched ahead
        steps = [(op.fused and (lambda op=op: op.fused(x, rows)), lambda y, op=op: op.gathered(x, y, rows))
                 for op in self.ops if op.method in rows.slots and op not in ahead]
        if activation is not None:
            steps.append((lambda: ("activation", activation), ACTIVATIONS[activation]))
        steps += [(op.fused and (lambda op=op: op.fused(None, rows)), lambda y, op=op: op.gathered(y, rows))
                  for op in then if op.method in rows.slots]
        if residual is not None:
            steps.append((lambda: ("residual", residual), lambda y: y + residual))
        pending = fused.PostOps(x, rows) if fused.available(y) else None
        if delta is not None:  # launched ahead only where the fused kernels serve
            y, pending.join = pending.add(y, "delta", delta), overlap.join
        for term, apply in steps:
            if pending is not None and term:
                y = pending.add(y, *term())
                continue
            if pending is not None:
                y = pending.run(y)
            y = apply(y)
        if pending is None:
            return y if norm is None else norm(y, rows)
        if overlap is not None and overlap.defer(pending, y):  # (a linear with a norm is never deferred: residual)
            return y
        fused_norm = norm.fused(rows) if norm is not None else None
        y = pending.run(y, fused_norm)
        return y if norm is None or fused_norm is not None else norm(y, rows)


class PetLayerNorm(nn.LayerNorm):
    """A shared LayerNorm whose affine a task may override (`chorus.backends.pet.layer_norm`).

    The task bank may add one op, `op(x, rows) -> y | None`, to `ops`: it normalises the batch once and gives each row
    the affine of its task's slot, or returns None when no row of the batch overrides this norm; then (and whenever
    no op is hooked, or `rows` is None) the plain `F.layer_norm` with the backbone's weight and bias runs, exactly as
    an `nn.LayerNorm` (same parameters and state-dict names). Given `GatheredRows` (export), the op's `gathered` form
    runs, or, where the fused kernels serve, one kernel for the norm and every row's affine (`fused`).
    """

    def __init__(self, site: str, hidden: int, eps: float):
        super().__init__(hidden, eps=eps)
        self.site = site
        self.ops: list = []  # at most one: an op replaces the affine, it does not add to it

    def forward(self, x: torch.Tensor, rows=None) -> torch.Tensor:
        gathered = getattr(rows, "gathered", False)
        if gathered and fused.available(x) and (norm := self.fused(rows)) is not None:
            return norm(x)
        for op in self.ops if rows is not None else ():
            if gathered and op.method not in rows.slots:
                continue
            y = (op.gathered if gathered else op)(x, rows)
            if y is not None:
                return y
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)

    def fused(self, rows):
        """In a gathered forward where the fused kernels serve (`fused.NORM`), this norm as one kernel
        `norm(x, residual=None, delta=None, site_bias=None) -> LayerNorm(x + site_bias + delta + residual)`
        (`fused.layer_norm`: each row's affine of its task's slot, tokens past its length zeros); else None."""
        if not fused.NORM:
            return None
        ops = [op for op in self.ops if op.method in rows.slots]
        tuned = ops[0].fused(None, rows)[1] if ops else None
        lengths = fused.row_lengths(rows)
        return lambda x, residual=None, delta=None, site_bias=None: fused.layer_norm(
            x, self.weight, self.bias, self.eps, residual, tuned, delta, site_bias, lengths)


class SelfAttention(nn.Module):
    def __init__(self, cfg: EncoderConfig, prefix: str):
        super().__init__()
        h = cfg.hidden_size
        self.num_heads = cfg.num_heads
        self.query = PetLinear(f"{prefix}.attention.self.query", h, h)
        self.key = PetLinear(f"{prefix}.attention.self.key", h, h)
        self.value = PetLinear(f"{prefix}.attention.self.value", h, h)
        self.dense = PetLinear(f"{prefix}.attention.output.dense", h, h)
        self.norm = PetLayerNorm(f"{prefix}.attention.output.LayerNorm", h, cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, rows) -> torch.Tensor:
        B, T, C = x.shape
        # the fused gathered path runs the three linears' sparse products on a side stream beside their shared ops,
        # and the key's score-shifting and -scaling terms leave its pass (`fused.Overlap`)
        overlap = fused.Overlap()  # does nothing off that path
        overlap.launch_ahead(x, rows, (self.query, self.value, self.key))
        q = self.query(x, rows, overlap=overlap)
        v = self.value(x, rows, overlap=overlap)
        overlap.keys_for(q)
        k = self.key(x, rows, overlap=overlap)
        overlap.finish()
        q, k, v = (t.view(B, T, self.num_heads, C // self.num_heads).transpose(1, 2) for t in (q, k, v))  # per head
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, heads, T, C // heads)
        a = a.transpose(1, 2).reshape(B, T, C)
        return self.dense(a, rows, residual=x, norm=self.norm)


class FeedForward(nn.Module):
    def __init__(self, cfg: EncoderConfig, prefix: str):
        super().__init__()
        self.intermediate = PetLinear(f"{prefix}.intermediate.dense", cfg.intermediate_size, cfg.hidden_size)
        self.output = PetLinear(f"{prefix}.output.dense", cfg.hidden_size, cfg.intermediate_size)
        self.norm = PetLayerNorm(f"{prefix}.output.LayerNorm", cfg.hidden_size, cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor, rows) -> torch.Tensor:
        h = self.intermediate(x, rows, activation="gelu", then=self.output.pre_ops)  # the output's input, made here
        return self.output(h, rows, pre_ops=(), residual=x, norm=self.norm)


class Layer(nn.Module):
    def __init__(self, cfg: EncoderConfig, index: int):
        super().__init__()
        prefix = f"encoder.layer.{index}"
        self.attention = SelfAttention(cfg, prefix)
        self.ffn = FeedForward(cfg, prefix)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, rows) -> torch.Tensor:
        return self.ffn(self.attention(x, mask, rows), rows)


class Encoder(nn.Module):
    """BERT embeddings + layers, returning mean-pooled sentence vectors (the pooling all-MiniLM-L6-v2 was trained with)."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.cfg = cfg
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embeddings = nn.Embedding(cfg.max_positions, cfg.hidden_size)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.embeddings_norm = PetLayerNorm(EMBEDDINGS_NORM, cfg.hidden_size, cfg.layer_norm_eps)
        self.layers = nn.ModuleList(Layer(cfg, i) for i in range(cfg.num_layers))
        self.requires_grad_(False)

    def pet_linears(self) -> dict[str, PetLinear]:
        return {m.site: m for m in self.modules() if isinstance(m, PetLinear)}

    def pet_norms(self) -> dict[str, PetLayerNorm]:
        return {m.site: m for m in self.modules() if isinstance(m, PetLayerNorm)}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, rows=None) -> torch.Tensor:
        """input_ids, attention_mask: (B, T) -> pooled (B, hidden)."""
        B, T = input_ids.shape
        gathered = getattr(rows, "gathered", False)
        if gathered:
            rows.begin(attention_mask)
        positions = torch.arange(T, device=input_ids.device)
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions) + self.token_type_embeddings.weight[0]
        x = self.embeddings_norm(x, rows)  # (B, T, C)
        keep = attention_mask.bool()
        mask = torch.zeros(B, 1, 1, T, dtype=x.dtype, device=x.device)  # additive, broadcast over heads and queries
        mask.masked_fill_(~keep[:, None, None, :], torch.finfo(x.dtype).min)
        for layer in self.layers:
            x = layer(x, mask, rows)
        if gathered:
            rows.memo.clear()  # what the layers shared (e.g. transposed inputs) is not kept past the forward
        weights = keep.to(x.dtype).unsqueeze(-1)  # (B, T, 1)
        return (x * weights).sum(1) / weights.sum(1).clamp(min=1.0)

    # ---- Hugging Face checkpoints -------------------------------------------------------------------------------
    def hf_parameter_map(self) -> dict[str, nn.Parameter]:
        """Hugging Face BertModel parameter name -> this module's parameter."""
        out = {
            "embeddings.word_embeddings.weight": self.word_embeddings.weight,
            "embeddings.position_embeddings.weight": self.position_embeddings.weight,
            "embeddings.token_type_embeddings.weight": self.token_type_embeddings.weight,
        }
        for site, module in (self.pet_linears() | self.pet_norms()).items():  # sites are Hugging Face module paths
            out[f"{site}.weight"], out[f"{site}.bias"] = module.weight, module.bias
        return out

    def load_hf_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Copy a Hugging Face BertModel state dict in (a `bert.` prefix and pooler/MLM weights are ignored)."""
        state = {k.removeprefix("bert."): v for k, v in state.items()}
        params = self.hf_parameter_map()
        missing = sorted(set(params) - set(state))
        if missing:
            raise TaskFileError(f"checkpoint lacks {len(missing)} backbone tensors, e.g. {missing[:3]}")
        with torch.no_grad():
            for name, p in params.items():
                t = state[name]
                if tuple(t.shape) != tuple(p.shape):
                    raise TaskFileError(f"checkpoint tensor {name} has shape {tuple(t.shape)}, expected {tuple(p.shape)}")
                p.copy_(t.to(p.dtype))


def read_hf_checkpoint(path: str | Path) -> tuple[EncoderConfig, dict[str, torch.Tensor]]:
    """Read `config.json` and the weights of a Hugging Face BERT directory, without unpickling anything."""
    path = Path(path)
    cfg = EncoderConfig.from_hf(json.loads((path / "config.json").read_text()))
    if (path / "model.safetensors").exists():
        from safetensors.torch import load_file

        state = load_file(path / "model.safetensors")
    elif (path / "pytorch_model.bin").exists():
        state = torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
    else:
        raise TaskFileError(f"{path} holds neither model.safetensors nor pytorch_model.bin")
    return cfg, state


def init_random(encoder: Encoder, seed: int = 0) -> None:
    """BERT's initialisation (normal(0, 0.02), LayerNorm 1/0), for bert-base-shaped benchmark backbones."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in encoder.named_parameters():
            if "norm" in name:
                p.fill_(1.0 if name.endswith("weight") else 0.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)

