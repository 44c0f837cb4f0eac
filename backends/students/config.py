"""The shape of a student group."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from chorus.errors import InvalidInput, dataclass_from_dict


@dataclass(frozen=True)
class StudentConfig:
    num_students: int = 4  # K
    num_layers: int = 2  # per student; Student Parallelism's students are 1-2 layers deep
    hidden_size: int = 384  # = the teacher's: students read its embeddings and start from its layers
    num_heads: int = 12
    intermediate_size: int = 1536
    num_labels: int = 2
    layer_norm_eps: float = 1e-12
    dropout: float = 0.1  # training only (reference modules); the fused inference path has none

    def __post_init__(self) -> None:
        for name in ("num_students", "num_layers", "hidden_size", "num_heads", "intermediate_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise InvalidInput(f"StudentConfig.{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.hidden_size % self.num_heads:
            raise InvalidInput(f"StudentConfig: hidden_size {self.hidden_size} is not a multiple of num_heads "
                               f"{self.num_heads}")
        if not isinstance(self.num_labels, int) or self.num_labels < 2:
            raise InvalidInput(f"StudentConfig.num_labels must be an integer >= 2, got {self.num_labels!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise InvalidInput(f"StudentConfig.dropout must be in [0, 1), got {self.dropout!r}")

    @classmethod
    def from_dict(cls, d: dict) -> StudentConfig:
        return dataclass_from_dict(cls, d, "StudentConfig")

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def head_size(self) -> int:
        return self.hidden_size // self.num_heads
