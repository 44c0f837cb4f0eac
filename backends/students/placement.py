"""One task's students over several devices: contiguous ranges of the K students per device, the boosting sum
gathered once (Student Parallelism across GPUs by placement).

Semantics (K students, devices d_0..d_{n-1}, ranges r_i = [a_i, b_i) with a_0 = 0, b_i = a_{i+1}, b_{n-1} = K):

    for i with a_i < k:                                            # launched on every device before any waiting
        ids_i, mask_i = copy of input_ids, attention_mask on d_i
        partial_i = Σ_{a_i <= j < min(k, b_i)} α_j · S_j(ids_i)   # d_i's fused StudentGroup (CUDA graphs on a GPU)
    return Σ_i partial_i, gathered once onto d_0                    # (B, L) on d_0, the group's dtype

Each device holds only its slice of the stacked weights and a copy of the backbone's embeddings (one copy per
device, shared by every task placed there: pass the same `embeddings` dict to every task's `PlacedStudents`); the
device that already holds the embeddings uses them by reference. Nothing waits for a device until the gather: the
input copies and every device's kernels (or graph replays) are queued on each device's current stream in turn, and
GPU-to-GPU copies do not block the host, so the devices compute their partial sums at the same time. The partial
sums are stacked on d_0 and summed there in one reduction (accumulating in float32 for half precision).

Why contiguous ranges, in order: boosting makes every prefix of the students a model, so pruning always keeps the
first k and drops the tail. With contiguous ranges a prefix k runs on the first devices only, at most one of them on
part of its slice, and the tail devices sit idle, with nothing to copy or gather from them: free for other work.
Interleaving the students over the devices (student j on device j mod n) would keep every device busy for any
k >= n and gather from all of them for every batch. The default split is balanced (sizes differ by at most one)
with the larger slices first: all K finish as soon as on any even split, and a prefix k <= ceil(K/n) never leaves
the first device (no copy, no gather). Give `sizes` for unequal devices.

Every device needs at least one student: K students cannot be placed on more than K devices (an empty device would
hold a copy of the embeddings and never run); `StudentBank` places a task with fewer students than devices on the
first K of them. Repeated devices are allowed (e.g. ["cpu", "cpu", "cpu"]: the split and gather run for real
without GPUs; they then share one embeddings copy and run one after another).
"""

from __future__ import annotations

from collections.abc import MutableMapping, Sequence

import torch

from chorus.backends.students.config import StudentConfig
from chorus.backends.students.cuda_graphs import GraphedStudents
from chorus.backends.students.embeddings import SharedEmbeddings
from chorus.backends.students.group import StudentGroup
from chorus.errors import InvalidInput


def as_device(device: str | torch.device) -> torch.device:
    """A device with its index ("cuda" -> "cuda:<current>"), so equal devices compare equal."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def balanced_split(num_students: int, num_devices: int) -> list[range]:
    """Contiguous ranges of students, one per device, sizes differing by at most one, the larger first:
    K=5 on 2 devices -> [range(0, 3), range(3, 5)]."""
    if num_devices < 1:
        raise InvalidInput("placing students needs at least one device")
    if num_students < num_devices:
        raise InvalidInput(f"{num_students} students cannot be placed on {num_devices} devices: every device needs at "
                           f"least one student; place them on at most {num_students} devices")
    base, extra = divmod(num_students, num_devices)
    return _ranges([base + (i < extra) for i in range(num_devices)])


def _ranges(sizes: Sequence[int]) -> list[range]:
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    return [range(a, a + n) for a, n in zip(starts, sizes)]


def embeddings_on(embeddings: SharedEmbeddings, device: torch.device) -> SharedEmbeddings:
    """The same tables on `device`: `embeddings` itself where they already are, else one copy."""
    if embeddings.word.device == device:
        return embeddings
    return SharedEmbeddings(*(t.to(device) for t in (embeddings.word, embeddings.position, embeddings.token_type,
                                                     embeddings.norm_weight, embeddings.norm_bias)), embeddings.eps)


def _to(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    # GPU to GPU: queued on the streams (PyTorch orders it after the source's work), never blocks the host
    return x.to(device, non_blocking=x.is_cuda and device.type == "cuda")


class PlacedStudents:
    """A `StudentGroup`'s K students placed over `devices` in contiguous ranges (`sizes[i]` students on devices[i];
    default `balanced_split`); called like `GraphedStudents`: `(input_ids, attention_mask, k) -> (B, L)` on the first
    device. `group` is only read (its stacked tensors are sliced onto the devices; it may live anywhere and be dropped
    afterwards). `embeddings`: {device: SharedEmbeddings} of the group's backbone, filled here for the devices it
    lacks; share one dict between the tasks placed over the same backbone so that each device holds one copy."""

    def __init__(self, group: StudentGroup, devices: Sequence[str | torch.device], sizes: Sequence[int] | None = None,
                 embeddings: MutableMapping[torch.device, SharedEmbeddings] | None = None):
        K = group.num_students
        self.devices = [as_device(d) for d in devices]
        if sizes is None:
            self.ranges = balanced_split(K, len(self.devices))
        else:
            sizes = list(sizes)
            if len(sizes) != len(self.devices) or sum(sizes) != K or min(sizes, default=0) < 1:
                raise InvalidInput(f"sizes {sizes}: expected {len(self.devices)} positive counts (one per device) "
                                   f"summing to the group's {K} students")
            self.ranges = _ranges(sizes)
        self.cfg = group.cfg
        self.device = self.devices[0]  # where inputs are expected and the boosting sum is gathered
        embeddings = {} if embeddings is None else embeddings
        tensors, alphas, dtype = group.tensors(), group.boosting_weights, group.head_w.dtype
        self.groups: list[StudentGroup] = []
        for device, r in zip(self.devices, self.ranges):
            if device not in embeddings:
                embeddings[device] = embeddings_on(group.embeddings, device)
            cfg = StudentConfig.from_dict({**group.cfg.to_dict(), "num_students": len(r)})
            part = {name: t[r.start : r.stop].to(device=device, dtype=dtype, copy=True) for name, t in tensors.items()}
            self.groups.append(StudentGroup(cfg, embeddings[device], part, alphas[r.start : r.stop].to(device)).eval())
        self.runners = [GraphedStudents(g) for g in self.groups]  # CUDA graphs on GPUs; the eager group elsewhere

    @property
    def num_students(self) -> int:
        return self.cfg.num_students

    def active(self, k: int) -> list[tuple[int, int]]:
        """(device index, how many of its students run) for a prefix k: the devices whose range starts below k."""
        return [(i, min(k, r.stop) - r.start) for i, r in enumerate(self.ranges) if r.start < k]

    @torch.inference_mode()
    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, k: int | None = None) -> torch.Tensor:
        """The boosting sum of the first k students (all by default): (B, T) -> (B, L) on the first device."""
        k = self.num_students if k is None else k
        if not isinstance(k, int) or not 1 <= k <= self.num_students:
            raise ValueError(f"k={k!r}: a student group of {self.num_students} runs a prefix of 1..{self.num_students}")
        active = self.active(k)
        inputs = [(_to(input_ids, self.devices[i]), _to(attention_mask, self.devices[i])) for i, _ in active]
        partials = [self.runners[i](ids, mask, k=n) for (i, n), (ids, mask) in zip(active, inputs)]  # nothing waits
        if len(partials) == 1:
            return partials[0]
        gathered = torch.stack([_to(p, self.device) for p in partials])  # (devices, B, L): the one gather
        return gathered.sum(0, dtype=torch.promote_types(gathered.dtype, torch.float32)).to(gathered.dtype)
