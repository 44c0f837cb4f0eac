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


def _check_tasks(engine, task: np.ndarray | None, text: np.ndarray | None, input_ids: np.ndarray | None) -> list[str]:
    if task is None:
        raise InvalidInput("input TASK is missing: every row names the task that classifies it")
    if (text is None) == (input_ids is None):
        raise InvalidInput("send exactly one of TEXT (strings) or INPUT_IDS (token ids), "
                           f"got {'both' if text is not None else 'neither'}")
    tasks = _strings("TASK", task)
    unknown = sorted({t for t in tasks if t not in engine.bank.tasks})
    if unknown:
        raise InvalidInput(f"unknown task {unknown[0]!r}; served tasks: {sorted(engine.bank.tasks)}")
    return tasks


def _texts(text: np.ndarray) -> list[str]:
    texts = _strings("TEXT", text)
    for i, t in enumerate(texts):
        if not t.strip():
            raise InvalidInput(f"input TEXT row {i} is empty")
        if len(t) > MAX_TEXT_CHARS:
            raise InvalidInput(f"input TEXT row {i} has {len(t)} characters, more than the {MAX_TEXT_CHARS} accepted")
    return texts


def _token_ids(engine, input_ids: np.ndarray) -> list[list[int]]:
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
    return ids


def _fit(engine, ids: list[list[int]], truncate: bool) -> list[int]:
    """Refuse (or, with `truncate`, cut to their first tokens) rows longer than the engine reads; the cut rows."""
    truncated = []
    for i, row in enumerate(ids):
        if len(row) > engine.max_length:
            if not truncate:
                raise InvalidInput(f"input TEXT row {i} is {len(row)} tokens long, more than the {engine.max_length} "
                                   f"this model reads: shorten it, or set the request parameter truncate=true "
                                   f"to classify its first {engine.max_length} tokens")
            ids[i] = row[: engine.max_length - 1] + row[-1:]
            truncated.append(i)
    return truncated


def _row_count(ids: list, tasks: list[str], text_given: bool) -> None:
    if len(ids) != len(tasks):
        raise InvalidInput(f"TASK has {len(tasks)} rows but {'TEXT' if text_given else 'INPUT_IDS'} "
                           f"has {len(ids)}: send one task name per row")


def decode_request(engine, text: np.ndarray | None, input_ids: np.ndarray | None,
                   task: np.ndarray | None, truncate: bool = False) -> DecodedRequest:
    """Validate one request's inputs against `engine` (tokenizer, vocabulary, served tasks) and tokenize its text.

    A text longer than the engine's `max_length` tokens is refused, unless `truncate` (the request parameter
    `truncate=true`) asks to keep its first tokens.
    """
    tasks = _check_tasks(engine, task, text, input_ids)
    if text is not None:
        ids = engine.tokenize(_texts(text), truncate=False)
        truncated = _fit(engine, ids, truncate)
    else:
        ids, truncated = _token_ids(engine, input_ids), []
    _row_count(ids, tasks, text is not None)
    return DecodedRequest(ids, tasks, truncated)


def decode_many(engine, requests: list[dict]) -> list[DecodedRequest | InvalidInput]:
    """`decode_request` for every request an `execute()` call holds, with one tokenizer call for all their texts.

    Each item of `requests` holds the keyword arguments of `decode_request` (`text`, `input_ids`, `task`,
    `truncate`); each result is the request's DecodedRequest, or the InvalidInput that names what was wrong with it
    (the other requests are decoded all the same).
    """
    out: list = [None] * len(requests)
    texts: list[str] = []
    spans: list[tuple[int, int, int, list[str]]] = []  # (request, first text, end, tasks)
    for i, r in enumerate(requests):
        try:
            tasks = _check_tasks(engine, r.get("task"), r.get("text"), r.get("input_ids"))
            if r.get("text") is None:
                ids = _token_ids(engine, r["input_ids"])
                _row_count(ids, tasks, False)
                out[i] = DecodedRequest(ids, tasks, [])
                continue
            these = _texts(r["text"])
            _row_count(these, tasks, True)
        except InvalidInput as e:
            out[i] = e
            continue
        spans.append((i, len(texts), len(texts) + len(these), tasks))
        texts.extend(these)
    if texts:
        ids = engine.tokenize(texts, truncate=False)
        for i, a, b, tasks in spans:
            rows = ids[a:b]
            try:
                out[i] = DecodedRequest(rows, tasks, _fit(engine, rows, bool(requests[i].get("truncate"))))
            except InvalidInput as e:
                out[i] = e
    return out
