"""Machinery shared by the fuzz suites (``tests/artifact/test_artifact_fuzz.py`` and
``tests/core/test_core_fuzz_inputs.py``).

The suites feed untrusted files (mutated ``.slim`` artifacts, random recipe YAML, random npz/csv/text) to
slimguard's loaders and check one property: every file either loads (bit-identically, where the mutation
could not have changed anything legitimately) or raises the documented :class:`UserError` subclass. No
other exception may escape, the loader must stay inside a memory cap, and inside a time cap.

How it runs: the parent test process starts ONE child per suite (``python tests/fuzz_support.py SUITE
PLAN``). The child imports the suite's test module, warms up (imports, one clean load of every reference
file), then caps its own address space with ``resource.setrlimit(RLIMIT_AS, now + HEADROOM)`` and runs the
suite's hypothesis properties and targeted cases. Each case is judged here; a failure raises a
:class:`Violation` subclass named after the failure, so hypothesis shrinks each distinct bug separately.
The last (shrunk) example of each bug is recorded and written to a JSON report that the parent's tests
assert on. A child killed outright (a crash, or the parent's timeout) is reported with the case that was
running, read from a progress file.

A loader that allocates past the cap gets a ``MemoryError`` (or torch's "can't allocate memory"); that is
a failure even when the loader catches it and re-raises the documented class (the chain still holds it):
sizes must be checked before allocating, not after.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import io
import json
import os
import resource
import signal
import subprocess
import sys
import time
import traceback
import warnings
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

HEADROOM_MB = 160  # address space one load may add to the child; a loader that inflates a 200 MB bomb exceeds it
CHILD_HEADROOM_MB = 1024  # the whole child, hypothesis's bookkeeping included, stays this close to its start
CASE_SECONDS = 20  # one load taking longer than this is a failure (a loop driven by a forged count)
SHRINK_SECONDS = 4  # a failing property shrinks its examples this long, then reports them as they are
CHILD_TIMEOUT = 240  # the parent kills a child that runs longer; the report names the case it was on

# ---- the child's side: judging one case --------------------------------------------------------------


class Violation(AssertionError):
    """A case broke the property. Subclasses are made per failure kind so hypothesis keeps them apart."""


class CaseTimeout(BaseException):
    """Raised by the alarm when one case runs past :data:`CASE_SECONDS`; a BaseException, so a loader's
    ``except Exception`` cannot turn it into its own error class."""


_KINDS: dict[str, type[Violation]] = {}


def _violation_type(key: str) -> type[Violation]:
    if key not in _KINDS:
        name = "".join(c if c.isalnum() else "_" for c in key)[:80]
        _KINDS[key] = type(f"Violation_{name}", (Violation,), {})
    return _KINDS[key]


@dataclasses.dataclass
class Failure:
    key: str
    case: str
    message: str
    where: str
    file: str = ""


class ShrinkBudgetSpent(BaseException):
    """Raised once a property has shrunk its failures for :data:`SHRINK_SECONDS`: the examples recorded so
    far are reported as they are (a BaseException, so hypothesis stops instead of counting a failure)."""


class Recorder:
    """Keeps, per failure key, the last example seen: hypothesis shrinks towards smaller failing examples
    and replays the smallest one last."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.failures: dict[str, Failure] = {}
        self.cases = 0
        self.current = ""
        self.first_failure: float | None = None


RECORDER = Recorder()
_PROGRESS: Path | None = None


def progress(case: str) -> None:
    """Note the case about to run (read by the parent if the child dies during it); stop shrinking once
    the budget is spent."""
    first = RECORDER.first_failure
    if first is not None and time.monotonic() - first > SHRINK_SECONDS:
        raise ShrinkBudgetSpent
    RECORDER.current = case
    RECORDER.cases += 1
    if _PROGRESS is not None:
        _PROGRESS.write_text(case)


@dataclasses.dataclass
class Outcome:
    value: Any = None
    error: BaseException | None = None


def _on_alarm(signum: int, frame: Any) -> None:
    raise CaseTimeout(f"case ran longer than {CASE_SECONDS} s")


def attempt(fn: Callable[[], Any]) -> Outcome:
    """Run ``fn`` under the time cap and the memory cap (:data:`HEADROOM_MB` more address space than the
    process holds now); return its value or the exception it raised."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = vm_size() + HEADROOM_MB * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (cap if hard == resource.RLIM_INFINITY else min(hard, cap), hard))
    old = signal.signal(signal.SIGALRM, _on_alarm)
    signal.alarm(CASE_SECONDS)
    try:
        return Outcome(value=fn())
    except CaseTimeout as exc:
        return Outcome(error=exc)
    except Exception as exc:  # the judge decides which classes are allowed
        return Outcome(error=exc)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


_ALLOC_WORDS = ("can't allocate memory", "cannot allocate memory", "bad_alloc", "not enough memory",
                "out of memory", "unable to allocate")


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    cur: BaseException | None = exc
    while cur is not None and all(cur is not s for s in seen) and len(seen) < 20:
        seen.append(cur)
        cur = cur.__cause__ or cur.__context__
    return seen


def hit_memory_cap(exc: BaseException) -> BaseException | None:
    """The exception in ``exc``'s chain that says an allocation failed (the cap was reached), if any."""
    for e in _chain(exc):
        if isinstance(e, MemoryError):
            return e
        if isinstance(e, RuntimeError) and any(w in str(e).lower() for w in _ALLOC_WORDS):
            return e
    return None


def _where(exc: BaseException) -> str:
    """``file:line in function`` of the frame that raised, preferring slimguard's own code."""
    frames = traceback.extract_tb(exc.__traceback__)
    ours = [f for f in frames if "slimguard" in f.filename and "tests" not in f.filename]
    f = (ours or frames or [None])[-1]
    if f is None:
        return "?"
    path = f.filename.split("/src/", 1)[-1] if "/src/" in f.filename else Path(f.filename).name
    return f"{path}:{f.lineno} in {f.name}"


def _short(text: str, n: int = 300) -> str:
    text = text.replace("\n", "\\n")
    return text if len(text) <= n else text[:n] + "..."


def fail(key: str, case: str, message: str, where: str = "", file: str | Path = "") -> None:
    """Record a failure and raise it (as a per-key Violation subclass) so hypothesis shrinks it."""
    kept = ""
    if file and Path(file).is_file():  # keep the failing input for reproduction
        keep = Path(file).parent / "failures"
        keep.mkdir(exist_ok=True)
        digest = hashlib.sha256(f"{key} {case}".encode()).hexdigest()[:10]
        kept = str(keep / f"{digest}{Path(file).suffix}")
        Path(kept).write_bytes(Path(file).read_bytes())
    RECORDER.failures[key] = Failure(key, case, message, where, kept)
    if RECORDER.first_failure is None:
        RECORDER.first_failure = time.monotonic()
    raise _violation_type(key)(f"{key}: {message} [case: {case}]")


def _verdict(outcome: Outcome, allowed: type[BaseException],
             check_value: Callable[[Any], str | None] | None) -> tuple[str, str, str] | None:
    """``(key, message, where)`` of what broke the property, or None."""
    exc = outcome.error
    if exc is None:
        problem = check_value(outcome.value) if check_value else None
        return (f"loaded but {problem.split(':')[0]}", problem, "") if problem else None
    cap = hit_memory_cap(exc)
    if cap is not None:
        shown = f" (surfaced as {type(exc).__name__})" if cap is not exc else ""
        return (f"memory cap hit in {_where(cap)}", f"{type(cap).__name__}: {_short(str(cap))}{shown}",
                _where(cap))
    if isinstance(exc, CaseTimeout):
        return "time cap hit", str(exc), _where(exc)
    if isinstance(exc, allowed):
        if "\n" in str(exc):
            return f"multi-line {type(exc).__name__} message", _short(str(exc)), _where(exc)
        return None
    where = _where(exc)
    return f"escaped {type(exc).__name__} at {where}", f"{type(exc).__name__}: {_short(str(exc))}", where


def judge(case: str, outcome: Outcome, allowed: type[BaseException], file: str | Path = "",
          check_value: Callable[[Any], str | None] | None = None) -> None:
    """The property: ``outcome`` is an ``allowed`` error with a one-line message, or a value that
    ``check_value`` accepts (it returns a problem, or None). Anything else is recorded and raised.

    The outcome is dropped before raising: hypothesis keeps failing exceptions, and a traceback that
    still held the loader's frames would keep every model and blob of every failure alive."""
    verdict = _verdict(outcome, allowed, check_value)
    for e in _chain(outcome.error) if outcome.error is not None else []:
        traceback.clear_frames(e.__traceback__)
    outcome.error = outcome.value = None
    if verdict is not None:
        key, message, where = verdict
        fail(key, case, message, where, file)


# ---- the child's side: running the suite -------------------------------------------------------------
def vm_size() -> int:
    """This process's virtual memory size in bytes (what RLIMIT_AS limits)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmSize in /proc/self/status")


def cap_memory(headroom_mb: int) -> int:
    """Cap the whole child (a safety net; each case gets its own, tighter cap in :func:`attempt`)."""
    cap = vm_size() + headroom_mb * 2**20
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    return cap


def _summarise(exc: BaseException) -> list[BaseException]:
    group = getattr(exc, "exceptions", None)  # an exception group (several distinct bugs)
    if isinstance(group, (list, tuple)):
        out: list[BaseException] = []
        for e in group:
            out += _summarise(e)
        return out
    return [exc]


def run_one(fn: Callable[[], None]) -> dict[str, Any]:
    """Run one property or targeted case; return its failures and any harness errors."""
    RECORDER.reset()
    start = time.monotonic()
    harness: list[str] = []
    try:
        fn()
    except BaseException as exc:  # collect everything: the parent asserts on the report
        for e in _summarise(exc):
            if not isinstance(e, (Violation, ShrinkBudgetSpent)):
                tb = "".join(traceback.format_exception(type(e), e, e.__traceback__))
                harness.append(f"{type(e).__name__}: {_short(str(e), 500)} | {_short(tb[-1500:], 1500)}")
    return {"failures": [dataclasses.asdict(f) for f in RECORDER.failures.values()], "harness": harness,
            "cases": RECORDER.cases, "seconds": round(time.monotonic() - start, 2),
            "vm_mb_after": vm_size() // 2**20}


def child_main(argv: list[str]) -> int:
    """``fuzz_support.py TEST_FILE PLAN_JSON``: run the suite's properties under the caps."""
    global _PROGRESS
    test_file, plan_path = Path(argv[1]), Path(argv[2])
    plan = json.loads(plan_path.read_text())
    out, _PROGRESS = Path(plan["report"]), Path(plan["progress"])
    warnings.simplefilter("ignore")
    spec = importlib.util.spec_from_file_location(f"fuzz_suite_{test_file.stem}", test_file)
    assert spec is not None and spec.loader is not None
    suite = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(suite)
    cases: dict[str, Callable[[], None]] = suite.child_setup(plan["context"])
    report: dict[str, Any] = {"cap_bytes": cap_memory(plan["headroom_mb"]), "results": {}}
    for name in plan["run"]:
        _PROGRESS.write_text(f"{name}: starting")
        report["results"][name] = run_one(cases[name])
        out.write_text(json.dumps(report, indent=1))
    _PROGRESS.write_text("done")
    return 0


# ---- the parent's side ---------------------------------------------------------------------------------
def run_child(test_file: str | Path, workdir: Path, run: list[str], context: dict[str, Any]) -> dict[str, Any]:
    """Start the child for ``test_file``, wait, and return its report (completed with what a dead child
    left: every unfinished name gets a failure naming the case that was running)."""
    workdir.mkdir(parents=True, exist_ok=True)
    plan = {"report": str(workdir / "report.json"), "progress": str(workdir / "progress.txt"),
            "headroom_mb": CHILD_HEADROOM_MB, "context": context, "run": run}
    plan_path = workdir / "plan.json"
    plan_path.write_text(json.dumps(plan))
    env = {**os.environ, "MALLOC_ARENA_MAX": "2", "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
    env.pop("SLIMGUARD_SIGNING_KEY", None)  # the suites choose their keys themselves
    cmd = [sys.executable, str(Path(__file__).resolve()), str(Path(test_file).resolve()), str(plan_path)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=CHILD_TIMEOUT, env=env,
                              cwd=workdir)
        status = f"exit code {proc.returncode}"
        tail = (proc.stdout + proc.stderr)[-3000:]
        ok = proc.returncode == 0
    except subprocess.TimeoutExpired as exc:
        status, ok = f"killed after {CHILD_TIMEOUT} s", False
        tail = (str(exc.stdout or "") + str(exc.stderr or ""))[-3000:]
    report_path = Path(plan["report"])
    report = json.loads(report_path.read_text()) if report_path.is_file() else {"results": {}}
    report["child"] = {"status": status, "tail": tail, "ok": ok}
    if not ok:
        running = Path(plan["progress"]).read_text() if Path(plan["progress"]).is_file() else "?"
        for name in run:
            if name not in report["results"]:
                report["results"][name] = {
                    "failures": [], "cases": 0, "seconds": 0,
                    "harness": [f"the child died ({status}) while running: {running}; output tail: {tail}"]}
    return report


def assert_clean(report: dict[str, Any], name: str) -> None:
    """Fail the calling test with every recorded failure of ``name`` (kind, minimal case, exception)."""
    import pytest

    result = report["results"].get(name)
    if result is None:
        pytest.fail(f"{name} did not run; child: {report['child']['status']}: {report['child']['tail']}")
    lines = [f"{f['key']}\n    case: {f['case']}\n    error: {f['message']}"
             + (f"\n    input kept at: {f['file']}" if f["file"] else "") for f in result["failures"]]
    lines += [f"harness error: {h}" for h in result["harness"]]
    if lines:
        pytest.fail(f"{name}: {len(lines)} problem(s) after {result['cases']} cases:\n" + "\n".join(lines),
                    pytrace=False)


# ---- comparing models ---------------------------------------------------------------------------------
def fingerprint(model: Any) -> str:
    """sha256 over the module tree (names and classes), every state_dict tensor (name, dtype, shape,
    raw bytes) and every pruning mask: equal fingerprints mean bit-identical models."""
    import torch

    from slimguard.core.masks import iter_masks

    h = hashlib.sha256()
    for name, mod in model.named_modules():
        h.update(f"m {name} {type(mod).__module__}.{type(mod).__qualname__};".encode())
    tensors = [("t", k, t) for k, t in model.state_dict().items()]
    tensors += [("mask", k, m) for k, _, _, m in iter_masks(model)]
    for kind, k, t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{kind} {k} {t.dtype} {list(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def disagreement(model: Any, manifest: Any) -> str | None:
    """A loaded tensor whose dtype or shape is not the one its manifest entry declares, or None."""
    tensors = manifest.get("tensors") if isinstance(manifest, dict) else None
    if not isinstance(tensors, dict):
        return None
    state = model.state_dict()
    for key, meta in tensors.items():
        if not isinstance(meta, dict) or "codec" not in meta or key not in state:
            continue
        t = state[key]
        dtype, shape = str(t.dtype).removeprefix("torch."), list(t.shape)
        if meta.get("dtype") != dtype or meta.get("shape") != shape:
            return (f"a tensor disagrees with its manifest: {key} loaded as {dtype} {shape}, the manifest "
                    f"declares {meta.get('dtype')!r} {meta.get('shape')!r}")
    return None


# ---- building inputs ----------------------------------------------------------------------------------
def zip_bytes(entries: list[tuple[str, bytes]], compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    """A zip holding ``entries`` in order (duplicates allowed), with valid CRCs."""
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about duplicate names, which we want
        with zipfile.ZipFile(buf, "w", compression=compression) as zf:
            for name, blob in entries:
                zf.writestr(name, blob)
    return buf.getvalue()


def zip_entries(blob: bytes) -> list[tuple[str, bytes]]:
    with zipfile.ZipFile(io.BytesIO(blob)) as zf:
        return [(i.filename, zf.read(i)) for i in zf.infolist()]


_ZIP_SIGNATURES = (b"PK\x03\x04", b"PK\x01\x02", b"PK\x05\x06", b"PK\x06\x06", b"PK\x06\x07", b"PK\x07\x08")


def zip_marks(blob: bytes) -> list[int]:
    """Offsets of every zip record signature (local headers, central directory, end records): byte
    flips aimed just past these hit flags, sizes, name lengths and offsets instead of payload."""
    marks = set()
    for sig in _ZIP_SIGNATURES:
        at = blob.find(sig)
        while at >= 0:
            marks.add(at)
            at = blob.find(sig, at + 1)
    return sorted(marks) or [0]


def _xors() -> Any:
    from hypothesis import strategies as st

    return st.sampled_from([0x01, 0x20, 0x08, 0x80, 0xFF]) | st.integers(1, 255)


XORS = _xors()  # what to xor a byte with: single flag bits (encrypted, data descriptor, patched, utf-8) or any


def patch_central(blob: bytes, index: int, offset: int, value: int) -> bytes:
    """``blob`` with a 2-byte field of the ``index``-th central directory record set to ``value``
    (offsets: 6 version needed, 8 flags, 10 compression method)."""
    at = [m for m in zip_marks(blob) if blob[m : m + 4] == b"PK\x01\x02"][index] + offset
    return blob[:at] + value.to_bytes(2, "little") + blob[at + 2 :]


# offsets, from a record's signature, of the fields a reader trusts: versions, flags, method, crc, sizes,
# name / extra / comment lengths, disk numbers, attributes, header offset (local, central and end records)
ZIP_FIELDS = [4, 5, 6, 7, 8, 9, 10, 11, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30, 32, 34, 38, 42]


def zip_offsets(blob: bytes) -> Any:
    """A hypothesis strategy of byte offsets into ``blob``: a field of a zip record, near one, or anywhere."""
    from hypothesis import strategies as st

    n, marks = len(blob), st.sampled_from(zip_marks(blob))
    field = st.builds(lambda m, d: min(n - 1, m + d), marks, st.sampled_from(ZIP_FIELDS))
    near = st.builds(lambda m, d: min(n - 1, m + d), marks, st.integers(0, 46))
    return field | near | st.integers(0, n - 1)


def sha256(blob: bytes) -> str:
    return hashlib.sha256(blob).hexdigest()


def write_bomb(path: Path, member: str, megabytes: int, base: list[tuple[str, bytes]]) -> Path:
    """The ``base`` entries plus ``member``: ``megabytes`` MB of zeros, streamed (small compressed)."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        for name, blob in base:
            zf.writestr(name, blob)
        chunk = bytes(2**20)
        with zf.open(member, "w", force_zip64=True) as fh:
            for _ in range(megabytes):
                fh.write(chunk)
    return path


def fix_block_crc(body: bytes) -> bytes:
    """A huffman block body (everything before the crc) with its crc32 appended."""
    return body + zlib.crc32(body).to_bytes(4, "little")


def _varint_at(b: bytes, pos: int) -> int:
    while pos < len(b) and b[pos] & 0x80:
        pos += 1
    return pos + 1


def block_fields(block: bytes, codebook_sizes: list[int]) -> list[tuple[str, int, int]]:
    """``(name, start, end)`` of the varint/u8 count fields of a huffman block (format of
    ``slimguard.codec.huffman``), so a mutation can forge one count and fix the crc."""
    b = block[:-4]
    fields: list[tuple[str, int, int]] = []

    def varint(name: str, pos: int) -> int:
        end = _varint_at(b, pos)
        fields.append((name, pos, end))
        return end

    def table(prefix: str, pos: int) -> int:
        start = pos
        pos = varint(f"{prefix}.nsym", pos)
        nsym = read_varint(b, start)
        fields.append((f"{prefix}.lenbits", pos, pos + 1))
        lenbits = b[pos]
        return pos + 1 + (nsym * lenbits + 7) // 8

    layout, cbcode = b[5], b[6]
    pos = varint("numel", 7)
    k_at = pos
    pos = varint("codebook_size", pos) + read_varint(b, k_at) * codebook_sizes[cbcode]
    pos = table("index_table", pos)
    pos = varint("n_index", pos)
    if layout == 1:
        fields.append(("gap_bits", pos, pos + 1))
        pos = table("gap_table", pos + 1)
        pos = varint("n_gap", pos)
    nbits_at = pos
    pos = varint("index_nbits", pos) + (read_varint(b, nbits_at) + 7) // 8
    if layout == 1:
        varint("gap_nbits", pos)
    return [f for f in fields if f[2] <= len(b)]


def read_varint(b: bytes, pos: int) -> int:
    n = shift = 0
    while pos < len(b):
        c = b[pos]
        n |= (c & 0x7F) << shift
        shift += 7
        pos += 1
        if not c & 0x80:
            break
    return n


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        c, n = n & 0x7F, n >> 7
        out.append(c | (0x80 if n else 0))
        if not n:
            return bytes(out)


def safetensors_split(blob: bytes) -> tuple[dict[str, Any], bytes]:
    """(header JSON, data buffer) of a safetensors file."""
    n = int.from_bytes(blob[:8], "little")
    return json.loads(blob[8 : 8 + n]), blob[8 + n :]


def safetensors_join(header: dict[str, Any] | bytes, data: bytes) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header, separators=(",", ":")).encode()
    return len(raw).to_bytes(8, "little") + raw + data


if __name__ == "__main__":
    import fuzz_support  # the suites import this module by name: use that one instance, not ``__main__``

    sys.exit(fuzz_support.child_main(sys.argv))
