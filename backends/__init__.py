"""The engine: shared backbone, PET operators, task bank; importable without Triton."""
