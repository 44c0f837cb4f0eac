"""Student Parallelism (Wang et al., KDD'25): K shallow students that together stand in for one deep teacher.

Each student is a 1-2 layer BERT over the backbone's (shared, frozen) embeddings with its own classifier head; the
group's output is the boosting sum `Σ_k α_k·S_k(x)`. Students are trained one after another (`chorus.distill`), each on
the residual the earlier ones leave, so any prefix of them is itself a usable model: serving can run `k` of them
(`StudentGroup.forward(..., k=k)` or `prune_to(k)`) and pick `k` from the per-prefix accuracy and latency stored with
the students.

- `config.py`      `StudentConfig`
- `embeddings.py`  `SharedEmbeddings`: the backbone's embedding tables, shared by reference, never copied
- `reference.py`   `Student` / `ReferenceStudentGroup`: plain nn.Modules, one student at a time (training, tests)
- `group.py`       `StudentGroup`: the fused inference path, all students at once over stacked (K, ...) weights
- `files.py`       the `chorus-students/1` directory format (safetensors + JSON)
- `cuda_graphs.py` `GraphedStudents`: the group as CUDA graphs per (k, batch bucket, length bucket) on a GPU
- `placement.py`   `PlacedStudents`: a group's students over several devices in contiguous ranges, the sum gathered once
- `bank.py`        `StudentBank`: the students of served tasks over the serving backbone's embeddings; accuracy budget
- `pruning.py`     `PruningPolicy`: how many students a batch runs, from load and deadline (the scheduler's choose_k)
"""

from chorus.backends.students.config import StudentConfig
from chorus.backends.students.embeddings import SharedEmbeddings
from chorus.backends.students.files import (StudentFiles, load_students, read_students, save_students)
from chorus.backends.students.group import StudentGroup
from chorus.backends.students.reference import ReferenceStudentGroup, Student, stack_students, unstack_students
from chorus.backends.students.placement import PlacedStudents
from chorus.backends.students.bank import StudentBank
from chorus.backends.students.pruning import PruningPolicy

__all__ = ["StudentConfig", "SharedEmbeddings", "Student", "ReferenceStudentGroup", "StudentGroup", "StudentFiles",
           "stack_students", "unstack_students", "save_students", "read_students", "load_students", "StudentBank",
           "PlacedStudents", "PruningPolicy"]
