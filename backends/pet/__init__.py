"""PET methods: each keeps its tasks' parameters in preallocated slots and adds one per-row op to PetLinears.

Slot 0 of every method is the null slot (all zeros): rows of tasks that do not use a method point there.
"""

from chorus.backends.pet.base import PetMethod, RowTasks
from chorus.backends.pet.bitfit import BitFit
from chorus.backends.pet.lora import LoRA

PET_METHODS: dict[str, type[PetMethod]] = {"lora": LoRA, "bitfit": BitFit}

__all__ = ["PET_METHODS", "BitFit", "LoRA", "PetMethod", "RowTasks"]
