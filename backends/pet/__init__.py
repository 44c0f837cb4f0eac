"""PET methods: each keeps its tasks' parameters in preallocated slots and adds one per-row op to PetLinears (or,
`layer_norm`, to the encoder's PetLayerNorms).

Slot 0 of every method is the null slot (all zeros, the identity): rows of tasks that do not use a method point there
and skip its op. A batch may mix rows of every method; each method runs its rows grouped (`PetMethod.row_groups`).

| method | tensors per site (file) | op: where it sits | bytes/task, all-MiniLM-L6-v2 (fp32) |
| --- | --- | --- | --- |
| `lora` | `lora_A` (r, in), `lora_B` (out, r) | post: `y += s·(x·Aᵀ)·Bᵀ`, rows grouped by rank | r=8 on query+value: 294,912 |
| `bitfit` | `bias_delta` (out,) | post: `y += δb` | all 36 linears: 82,944 |
| `adapter` | `adapter_down` (m, out), `adapter_down_bias` (m,), `adapter_up` (out, m), `adapter_up_bias` (out,) | post on `attention.output.dense` + `output.dense` (houlsby) or `output.dense` (pfeiffer): `y += up(act(down(y)))`, before residual + LayerNorm | m=64: houlsby 2,380,800; pfeiffer 1,190,400 |
| `ia3` | `ia3_l` (out,), at `output.dense` (in,) | post `y ⊙ (1+l)` at key/value; pre `x ⊙ (1+l)` at `output.dense` (FFN activations) | key+value+output.dense: 55,296 |
| `maskbert` | `mask_index` (nnz,) pruned positions [+ `mask_score` (nnz,) while training] | post: `y += x·(-W⊙M̄)ᵀ`, per task, CSR | 4 bytes per pruned weight (12 in the bank: int64 + value); 5% of 10.6M linear weights: 2.1 MB |
| `diff_pruning` | `diff_index`, `diff_value` (nnz,), `diff_bias` (out,) optional | post: `y += x·δᵀ + δb`, per task, CSR | 8 bytes per kept weight (12 in the bank) + 4·out per site; 0.5% of the linears' weights + all biases: 507,617 |
| `layer_norm` | per norm site (`embeddings.LayerNorm`, `encoder.layer.{i}.{attention.output,output}.LayerNorm`): `weight`, `bias` (hidden,), the tuned values (the bank keeps deltas) | the norm: shared `(x - mean)/std` once per batch, each row's affine `⊙ γ_task + β_task` (the backbone's where a task tunes none) | all 13 LayerNorms: 39,936 |

(all-MiniLM-L6-v2: 6 layers, hidden 384, feed-forward 1536: 36 linears, 10.6M weights, 13 LayerNorms. Bank slots
of padded methods take the bank's maximum: LoRA `max_rank`, adapters `max_bottleneck`. Each task also holds a
classifier head.)
"""

from chorus.backends.pet.adapter import Adapter
from chorus.backends.pet.base import GatheredRows, PetMethod, RowGroup, RowTasks
from chorus.backends.pet.bitfit import BitFit
from chorus.backends.pet.diff_pruning import DiffPruning
from chorus.backends.pet.ia3 import IA3
from chorus.backends.pet.layer_norm import LayerNormTuning
from chorus.backends.pet.lora import LoRA
from chorus.backends.pet.maskbert import MaskBERT

PET_METHODS: dict[str, type[PetMethod]] = {
    "lora": LoRA, "bitfit": BitFit, "adapter": Adapter, "ia3": IA3, "maskbert": MaskBERT, "diff_pruning": DiffPruning,
    "layer_norm": LayerNormTuning,
}

__all__ = ["PET_METHODS", "IA3", "Adapter", "BitFit", "DiffPruning", "GatheredRows", "LayerNormTuning", "LoRA",
           "MaskBERT", "PetMethod", "RowGroup", "RowTasks"]
