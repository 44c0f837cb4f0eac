"""Turning one inference request's input arrays into token ids and task names, with every check a request needs.

Triton-free: the Triton model hands numpy arrays in; each problem raises InvalidInput naming the input and row.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from chorus.errors import InvalidInput

MAX_TEXT_CHARS = 100_000  # longer texts are refused before tokenizing


@dataclass
class DecodedRequest:
    ids: list[list[int]]
    tasks: list[str]
    truncated: list[int]  # rows whose text was cut to the engine's max_length (only when the request allowed it)


def _strings(name: str, array: np.ndarray) -> list[str]:
    if array.dtype != np.object_ and array.dtype.kind not in "SU":
        raise InvalidInput(f"input {name} must be BYTES (UTF-8 strings), got {array.dtype}")
    if array.ndim != 2 or array.shape[1] != 1:
        raise InvalidInput(f"input {name} must have shape [batch, 1], got {list(array.shape)}")
    out = []
    for i, v in enumerate(array[:, 0]):
        if isinstance(v, bytes):
            try:
                v = v.decode("utf-8")
            except UnicodeDecodeError as e:
                raise InvalidInput(f"input {name} row {i} is not valid UTF-8 ({e.reason} at byte {e.start})") from None
        out.append(str(v))
    return out


def decode_request(engine, text: np.ndarray | None, input_ids: np.ndarray | None,
                   task: np.ndarray | None, truncate: bool = False) -> DecodedRequest:
    """Validate one request's inputs against `engine` (tokenizer, vocabulary, served tasks) and tokenize its text.

    A text longer than the engine's `max_length` tokens is refused, unless `truncate` (the request parameter
    `truncate=true`) asks to keep its first tokens.
    """
    if task is None:
        raise InvalidInput("input TASK is missing: every row names the task that classifies it")
    if (text is None) == (input_ids is None):
        raise InvalidInput("send exactly one of TEXT (strings) or INPUT_IDS (token ids), "
                           f"got {'both' if text is not None else 'neither'}")
    tasks = _strings("TASK", task)
    unknown = sorted({t for t in tasks if t not in engine.bank.tasks})
    if unknown:
        raise InvalidInput(f"unknown task {unknown[0]!r}; served tasks: {sorted(engine.bank.tasks)}")
    truncated: list[int] = []
    if text is not None:
        texts = _strings("TEXT", text)
        for i, t in enumerate(texts):
            if not t.strip():
                raise InvalidInput(f"input TEXT row {i} is empty")
            if len(t) > MAX_TEXT_CHARS:
                raise InvalidInput(f"input TEXT row {i} has {len(t)} characters, more than the {MAX_TEXT_CHARS} accepted")
        ids = engine.tokenize(texts, truncate=False)
        for i, row in enumerate(ids):
            if len(row) > engine.max_length:
                if not truncate:
                    raise InvalidInput(f"input TEXT row {i} is {len(row)} tokens long, more than the {engine.max_length} "
                                       f"this model reads: shorten it, or set the request parameter truncate=true "
                                       f"to classify its first {engine.max_length} tokens")
                ids[i] = row[: engine.max_length - 1] + row[-1:]
                truncated.append(i)
    else:
        if input_ids.dtype != np.int32:
            raise InvalidInput(f"input INPUT_IDS must be INT32, got {input_ids.dtype}")
        if input_ids.ndim != 2 or input_ids.shape[1] == 0:
            raise InvalidInput(f"input INPUT_IDS must have shape [batch, tokens>0], got {list(input_ids.shape)}")
        pad = engine.cfg.pad_token_id
        # rows of one request share a length: trailing pad ids are padding, not tokens
        ids = []
        for row in input_ids:
            kept = np.flatnonzero(row != pad)
            ids.append(row[: kept[-1] + 1].tolist() if len(kept) else [])
        engine.check_ids(ids)
    if len(ids) != len(tasks):
        raise InvalidInput(f"TASK has {len(tasks)} rows but {'TEXT' if text is not None else 'INPUT_IDS'} "
                           f"has {len(ids)}: send one task name per row")
    return DecodedRequest(ids, tasks, truncated)
