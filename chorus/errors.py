"""The exceptions chorus raises. Each message says what failed, what was expected, what came, and how to fix it.

`InvalidInput` maps to Triton's INVALID_ARG, `Overloaded` to UNAVAILABLE; everything else is INTERNAL.
"""

import dataclasses


class ChorusError(Exception):
    """Base class of every error chorus raises on purpose."""


class InvalidInput(ChorusError, ValueError):
    """A request, task file or argument is malformed (Triton: INVALID_ARG)."""


class UnknownTask(InvalidInput, KeyError):
    """A request names a task that is not served."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class TaskFileError(InvalidInput):
    """A PET / task file is missing, malformed, or does not fit the backbone."""


class TaskPathError(InvalidInput):
    """A task or student directory lies outside the server's task roots (`chorus.backends.paths`)."""


class Overloaded(ChorusError):
    """The server cannot meet the request's deadline right now (Triton: UNAVAILABLE)."""


class ServerError(ChorusError):
    """tritonserver could not be found, started, or reached."""


class MissingDependency(ChorusError):
    """An optional package a requested path needs (tensorrt, onnxruntime-gpu) is not installed."""


def dataclass_from_dict(cls, d: dict, what: str):
    """`cls(**d)` for a dataclass `cls` (a config read from JSON or a Triton parameter), refusing keys it does not
    have: InvalidInput names them and the known ones, e.g. "scheduler config: unknown keys ['max_wiat_s']; known:
    [...]". The dataclass's own checks (`__post_init__`) judge the values."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise InvalidInput(f"{what}: unknown keys {unknown}; known: {sorted(known)}")
    return cls(**d)
