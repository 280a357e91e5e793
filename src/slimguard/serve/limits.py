"""Request limits and input decoding, each failing as a problem (RFC 9457) with a status and a reason.

| limit                     | status | reason        |
|---------------------------|--------|---------------|
| body over ``max_body_bytes`` (declared or streamed) | 413 | ``body_size`` |
| more than ``max_items`` items                        | 413 | ``batch_size`` |
| JSON nested deeper than ``max_json_depth``           | 400 | ``json_depth`` |
| not JSON / not an object / wrong keys / not numbers  | 400 or 422 | ``json``, ``schema`` |
| contract violation (shape, dtype, range, NaN)        | 422 | ``contract``  |
| more than ``max_concurrency`` requests in flight     | 429 + ``Retry-After`` | ``concurrency`` |
| answer later than ``timeout_s``                      | 504 | ``timeout``   |

Bodies: ``application/json`` ``{"inputs": [[...], ...]}`` (a batch shaped ``(n, *input_shape)``),
``application/x-npy`` (a ``.npy`` array, never unpickled) or ``application/x-safetensors`` (one tensor,
named ``inputs`` when there are several).
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import torch

NPY = "application/x-npy"
SAFETENSORS = "application/x-safetensors"


class Problem(Exception):
    """An HTTP problem: ``status``, a short ``title``, a one-line ``detail``, the ``reason`` counted in
    the rejects metric, and optional structured ``errors`` (each naming a ``field`` and a ``rule``)."""

    def __init__(self, status: int, title: str, detail: str, reason: str,
                 errors: list[dict[str, Any]] | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status, self.title, self.detail, self.reason = status, title, detail, reason
        self.errors = errors or []
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": f"https://slimguard.dev/problems/{self.reason}", "title": self.title,
                               "status": self.status, "detail": self.detail}
        if self.errors:
            out["errors"] = self.errors
        return out


def schema_problem(field: str, rule: str, detail: str, status: int = 422) -> Problem:
    return Problem(status, "Invalid request body", detail, "schema" if status == 422 else "json",
                   [{"field": field, "rule": rule, "detail": detail}])


async def read_body(headers: Any, stream: AsyncIterator[bytes], limit: int) -> bytes:
    """The request body, refused (413) as soon as it is known to exceed ``limit`` bytes: from
    ``Content-Length`` before reading, else while streaming."""
    declared = headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise Problem(400, "Bad Content-Length", "Content-Length must be a non-negative integer", "json")
        if int(declared) > limit:
            raise _too_large(limit)
    chunks, size = [], 0
    async for chunk in stream:
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(limit: int) -> Problem:
    return Problem(413, "Request body too large", f"the body exceeds {limit} bytes; send fewer items per request",
                   "body_size", [{"field": "body", "rule": "max_body_bytes", "detail": f"at most {limit} bytes"}])


_STRINGS = re.compile(rb'"(?:[^"\\]|\\.)*"', re.S)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


def json_depth(body: bytes) -> int:
    """Deepest nesting of ``[`` and ``{`` in a JSON text (``1`` is 0, ``[1]`` is 1), found before parsing
    so that a deep document never reaches the parser's recursion: strings are cut out (a bracket in a
    string does not count), the brackets kept, and their running balance's maximum taken (numpy, no
    Python loop over the body)."""
    brackets = _STRINGS.sub(b"", body).translate(None, _NOT_BRACKETS)
    if not brackets:
        return 0
    codes = np.frombuffer(brackets, dtype=np.uint8)
    steps = np.where((codes == ord("[")) | (codes == ord("{")), 1, -1)
    return int(np.cumsum(steps).max())


def parse_json(body: bytes, max_depth: int) -> Any:
    """Parse ``body`` as JSON, refusing nesting deeper than ``max_depth`` (400, checked first) and invalid
    text (400)."""
    if json_depth(body) > max_depth:
        raise Problem(400, "JSON nested too deeply", f"the body nests deeper than {max_depth} levels", "json_depth",
                      [{"field": "body", "rule": "max_json_depth", "detail": f"at most {max_depth} levels"}])
    if _fast_loads is not None:
        try:
            return _fast_loads(body)
        except ValueError:  # NaN, Infinity, numbers past a float's range (the standard parser reads them), invalid
            pass
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise schema_problem("body", "json", "the body is not valid JSON (UTF-8)", status=400) from None


def _orjson_loads() -> Any:
    """``orjson.loads`` when orjson is installed (the ``serve`` extra has it), else None. It parses a digit's
    1,024 numbers in 25 us where the standard parser takes 200 us, a tenth of the service's CPU per request.
    What it refuses and the standard parser reads (NaN, Infinity, numbers past a float's range) goes to the
    standard parser, so those still reach the contract; integers past 64 bits arrive as floats of the same
    value (inputs become float32 anyway, and labels refuse integers that large either way)."""
    try:
        import orjson
    except ImportError:
        return None
    return orjson.loads


_fast_loads = _orjson_loads()


def _shape_of(value: Any, depth: int) -> list[int]:
    """The rectangular shape of nested lists ``depth`` deep; Problem naming the first ragged place."""
    shape: list[int] = []
    level = [value]
    for d in range(depth):
        sizes = set()
        nxt: list[Any] = []
        for v in level:
            if not isinstance(v, list):
                raise schema_problem("inputs", "shape", f"inputs must be nested lists {depth} deep "
                                     f"(a batch of examples); found a {type(v).__name__} at depth {d}")
            sizes.add(len(v))
            nxt.extend(v)
        if len(sizes) > 1:
            raise schema_problem("inputs", "shape", f"inputs are ragged at depth {d}: lengths {sorted(sizes)[:4]}")
        if not sizes or 0 in sizes:
            raise schema_problem("inputs", "shape", f"inputs hold an empty list at depth {d}")
        shape.append(sizes.pop())
        level = nxt
    for v in level:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise schema_problem("inputs", "type", f"inputs must hold numbers; found a {type(v).__name__}")
    return shape


def tensor_from_json(obj: Any, input_shape: tuple[int, ...], max_items: int) -> torch.Tensor:
    """The float32 batch ``(n, *input_shape)`` of a ``{"inputs": [...]}`` body.

    Only the nesting is checked here (an object, a key, rectangular lists of numbers, at most
    ``max_items`` items); shape against the model, ranges and finiteness are the contract's job.
    """
    if not isinstance(obj, dict):
        raise schema_problem("body", "type", f"the body must be a JSON object, got {type(obj).__name__}")
    extra = sorted(set(obj) - {"inputs", "ids"})
    if "texts" in obj:
        wanted = ", ".join(["N", *map(str, input_shape)])
        raise schema_problem("texts", "unsupported", f"this model takes tensors shaped ({wanted}), not texts; "
                             "send {\"inputs\": [...]}")
    if extra:
        raise schema_problem(extra[0], "unknown_key", f"unknown key {extra[0]!r}; allowed: inputs")
    if "inputs" not in obj:
        raise schema_problem("inputs", "required", "the body needs an \"inputs\" list (a batch of examples)")
    inputs = obj["inputs"]
    if not isinstance(inputs, list):
        raise schema_problem("inputs", "type", f"inputs must be a list of examples, got {type(inputs).__name__}")
    check_items(len(inputs), max_items)
    if not inputs:
        return torch.zeros((0, *input_shape))  # the contract refuses an empty batch, naming the rule
    depth = 1 + len(input_shape)
    try:  # fast path: rectangular lists of numbers (numpy infers a numeric dtype only then)
        arr = np.array(inputs)
    except (ValueError, OverflowError):
        arr = None
    if arr is None or arr.dtype.kind not in "fi" or arr.ndim != depth:
        _shape_of(inputs, depth)  # raises the precise problem (ragged, wrong nesting, not numbers)
        try:
            arr = np.asarray(inputs, dtype=np.float64)
        except OverflowError:
            raise schema_problem("inputs", "range", "inputs hold an integer too large for a float") from None
    with np.errstate(over="ignore"):
        return torch.from_numpy(arr.astype(np.float32))


def check_items(n: int, max_items: int, field: str = "inputs") -> None:
    if n > max_items:
        raise Problem(413, "Too many items", f"{n} items in one request; at most {max_items}", "batch_size",
                      [{"field": field, "rule": "max_items", "detail": f"at most {max_items} items"}])


def tensor_from_binary(body: bytes, content_type: str, max_items: int) -> torch.Tensor:
    """The batch in an ``.npy`` or safetensors body (never unpickled; dtype is left to the contract)."""
    if content_type == NPY:
        try:
            arr = np.load(io.BytesIO(body), allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise schema_problem("body", "npy", f"not a readable .npy array ({type(exc).__name__})") from None
        if not isinstance(arr, np.ndarray) or arr.dtype.kind not in "fiub":
            raise schema_problem("body", "dtype", "the .npy array must hold numbers")
        x = torch.from_numpy(np.ascontiguousarray(arr))
    else:
        from safetensors.torch import load as st_load

        try:
            tensors = st_load(body)
        except Exception:  # safetensors raises its own error types for malformed headers
            raise schema_problem("body", "safetensors", "not a readable safetensors file") from None
        if "inputs" in tensors:
            x = tensors["inputs"]
        elif len(tensors) == 1:
            x = next(iter(tensors.values()))
        else:
            raise schema_problem("inputs", "required", "a safetensors body needs one tensor, or one named inputs")
    if x.dim() >= 1:
        check_items(len(x), max_items)
    return x
