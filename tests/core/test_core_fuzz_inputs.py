"""Fuzzing the recipe, npz, csv and text loaders (hypothesis).

Random recipe YAML (raw bytes, YAML token soup, and near-valid recipes built from the real step names and
option keys with random values) goes through :func:`slimguard.core.recipe.load`: it returns a Recipe or
raises :class:`ConfigError`. Random npz files (random arrays of many dtypes, object arrays, extremes;
byte flips; forged ``.npy`` headers with valid zip CRCs) and random csv / text files go through
:func:`slimguard.data.load` (``npz:FILE``, ``csv:FILE``, ``text:FILE``): a bundle or :class:`DataError`.
A byte flip in an npz (its zip CRCs guard the arrays) must load identically or be refused.

No other exception may escape, and every load runs in a child process under a memory cap
(``resource.setrlimit(RLIMIT_AS)``) and a time cap, as in ``tests/artifact/test_artifact_fuzz.py`` (machinery in
``tests/fuzz_support.py``). Targeted cases: deep nesting, alias bombs, YAML python tags and a pickled
``.npy`` (canaries that must never run), ``.npy`` headers that promise 400 MB or 8 TB, huge CSV fields.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import fuzz_support as fz

SETTINGS = dict(deadline=None, derandomize=True, database=None, print_blob=False,
                suppress_health_check=list(HealthCheck))

# =========================================================================================================
# child side
# =========================================================================================================
WORK = Path(".")
MARKER = Path("canary-ran")
STEPS: dict[str, list[str]] = {}  # step name -> option keys (read from the registry in the child)
REF: dict[str, Any] = {}


def _write(name: str, blob: bytes | str) -> Path:
    path = WORK / name
    path.write_bytes(blob.encode() if isinstance(blob, str) else blob)
    return path


def _errors() -> tuple[type, type]:
    from slimguard.core.errors import ConfigError, DataError

    return ConfigError, DataError


def _load_recipe(path: Path) -> Any:
    from slimguard.core import recipe

    return recipe.load(path)


def _load_data(source: str) -> Any:
    from slimguard import data

    return data.load(source)


def _expect_recipe(case: str, path: Path) -> None:
    fz.progress(case)
    fz.judge(case, fz.attempt(lambda: _load_recipe(path)), _errors()[0], path,
             lambda r: None if hasattr(r, "steps") else f"not a recipe: load returned {type(r).__name__}")


def _bundle_fp(bundle: Any) -> str:
    """sha256 of the metadata (less the file's name) and of every split's arrays."""
    meta = {k: v for k, v in bundle.meta.to_dict().items() if k not in ("name", "description")}
    h = hashlib.sha256(json.dumps(meta, sort_keys=True, default=str).encode())
    for split in (bundle.train, bundle.val, bundle.test):
        for t in (split.x, split.y):
            h.update(repr(t).encode() if isinstance(t, list) or t is None else t.numpy().tobytes())
    return h.hexdigest()


def _expect_data(case: str, prefix: str, path: Path, same_as: str | None = None) -> None:
    def check(bundle: Any) -> str | None:
        if not hasattr(bundle, "train"):
            return f"not a data bundle: load returned {type(bundle).__name__}"
        if same_as is not None and _bundle_fp(bundle) != same_as:
            return "data changed silently: a damaged file loaded into different arrays"
        return None

    fz.progress(case)
    fz.judge(case, fz.attempt(lambda: _load_data(f"{prefix}:{path}")), _errors()[1], path, check)


def _brief(value: Any, n: int = 160) -> str:
    text = repr(value)
    return text if len(text) <= n else text[: n - 3] + "..."


# ---- recipes -----------------------------------------------------------------------------------------------
@settings(max_examples=60, **SETTINGS)
@given(blob=st.binary(max_size=200))
def fuzz_recipe_bytes(blob: bytes) -> None:
    _expect_recipe(f"recipe bytes {_brief(blob)}", _write("recipe.yaml", blob))


YAML_TOKENS = ["model: ", "data: ", "steps:", "task: ", "seed: ", "budget:", "max_accuracy_drop: ", "name: ",
               "magnitude", "sparsity: ", "finetune", "epochs: ", "weight-sharing", "bits: ", "zoo:digits-mlp",
               "digits", "\n", "\n  ", "\n    ", "- ", "{", "}", "[", "]", ", ", ": ", "? ", "&a ", "*a", "<<: *a",
               "!!python/object/apply:os.system ", "!!binary ", "!!str ", "!!int ", "!!float ", "!!set ",
               "!!omap ", "|\n", ">\n", "'", '"', "# c", "%YAML 1.1\n", "---\n", "...\n", "\t", "0x1F", "1e999",
               ".nan", ".inf", "-.inf", "~", "null", "true", "0", "-1", "0.8", "99999999999999999999999", "\x00",
               "\ufeff", "\u00e9", "\\x", "\\u0000", "@", "`", "%", "!", "=", "2001-12-14", "0o17", "1_000"]


@settings(max_examples=100, **SETTINGS)
@given(tokens=st.lists(st.sampled_from(YAML_TOKENS), max_size=40))
def fuzz_recipe_yaml_tokens(tokens: list[str]) -> None:
    text = "".join(tokens)
    _expect_recipe(f"recipe text {text!r}", _write("recipe.yaml", text))


_YAML_SCALARS = (st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True)
                 | st.text(max_size=10) | st.sampled_from([10**30, -(10**30), 2**63, "", "0.5", "zoo:digits-mlp"]))
_YAML_VALUES = st.recursive(_YAML_SCALARS, lambda c: st.lists(c, max_size=4)
                            | st.dictionaries(st.text(max_size=6), c, max_size=4), max_leaves=8)
_KEYS = st.sampled_from(["model", "data", "task", "seed", "budget", "steps", "name", "description"]) \
    | st.text(max_size=6) | st.integers(-2, 2) | st.none() | st.booleans()


@settings(max_examples=120, **SETTINGS)
@given(data=st.data())
def fuzz_recipe_structure(data: Any) -> None:
    """Near-valid recipes: real top keys, real step names with their real option keys, random values."""
    import yaml

    raw: dict[Any, Any] = {"model": "zoo:digits-mlp", "data": "digits"}
    steps = []
    for _ in range(data.draw(st.integers(0, 3), label="steps")):
        name = data.draw(st.sampled_from(sorted(STEPS)) | st.text(max_size=8), label="step")
        keys = STEPS.get(name, [])
        opts = data.draw(st.dictionaries(st.sampled_from(keys) if keys else st.text(max_size=4), _YAML_VALUES,
                                         max_size=3) | _YAML_VALUES, label="options")
        steps.append(data.draw(st.sampled_from([{name: opts}, name, [name, opts], {name: opts, "x": 1}]),
                               label="step shape"))
    raw["steps"] = steps
    for _ in range(data.draw(st.integers(0, 3), label="top-level edits")):
        key = data.draw(_KEYS, label="key")
        if data.draw(st.booleans(), label="delete"):
            raw.pop(key, None)
        else:
            raw[key] = data.draw(_YAML_VALUES, label="value")
    if data.draw(st.booleans(), label="budget"):
        raw["budget"] = data.draw(st.dictionaries(
            st.sampled_from(["max_accuracy_drop", "min_cosine_mean", "min_cosine_min", "other"]), _YAML_SCALARS,
            max_size=3), label="budget values")
    try:
        text = yaml.safe_dump(raw, allow_unicode=data.draw(st.booleans(), label="unicode"))
    except yaml.YAMLError:
        assume(False)
    _expect_recipe(f"recipe {_brief(raw, 400)}", _write("recipe.yaml", text))


# ---- npz ------------------------------------------------------------------------------------------------
DTYPES = ["float16", "float32", "float64", "int8", "int64", "uint8", "uint64", "bool", "complex64", "<U3",
          "datetime64[s]", "object"]


def _array(data: Any, shape: tuple[int, ...], label: str) -> np.ndarray:
    dtype = data.draw(st.sampled_from(DTYPES), label=f"{label} dtype")
    if dtype == "object":
        return np.array([data.draw(st.sampled_from([1, "a", None, 2.5]), label=f"{label} object")
                         for _ in range(int(np.prod(shape)))] or [], dtype=object).reshape(shape)
    if dtype.startswith("datetime"):
        return np.zeros(shape, dtype=dtype)
    return data.draw(hnp.arrays(np.dtype(dtype), shape), label=label)


@settings(max_examples=100, **SETTINGS)
@given(data=st.data())
def fuzz_npz_arrays(data: Any) -> None:
    """Random arrays: wrong dtypes (object, strings, complex, dates), NaN, extremes, ragged sizes, bad keys."""
    n = data.draw(st.sampled_from([12, 30, 0, 1, 9, 10]), label="rows")
    feat = data.draw(st.sampled_from([(3,), (1, 2, 2), (), (0,), (2, 1)]), label="example shape")
    x_clean = data.draw(st.booleans(), label="x float32 in [0, 1]")
    if x_clean:
        x = np.asarray(data.draw(hnp.arrays(np.float32, (n, *feat), elements=st.floats(0, 1, width=32)),
                                 label="x"))
    else:
        x = _array(data, (n, *feat), "x")
    y_clean = data.draw(st.booleans(), label="y int64 labels 0..2")
    ny = data.draw(st.sampled_from([n, n + 1, max(0, n - 1)]), label="y rows")
    y = np.arange(ny, dtype=np.int64) % 3 if y_clean else _array(data, (ny,), "y")
    arrays = {"x": x, "y": y}
    for _ in range(data.draw(st.integers(0, 2), label="key edits")):
        key = data.draw(st.sampled_from(["x", "y", "z", "X", "x.npy", "../x"]), label="key")
        if data.draw(st.booleans(), label="delete key"):
            arrays.pop(key, None)
        else:
            arrays[key] = _array(data, (n,), key)
    buf = io.BytesIO()
    try:
        np.savez(buf, **arrays)
    except (ValueError, TypeError, OSError):
        assume(False)
    desc = {k: (str(v.dtype), v.shape) for k, v in arrays.items()}
    _expect_data(f"npz arrays {desc} (x: {_brief(x.tolist(), 120)}, y: {_brief(y.tolist(), 80)})", "npz",
                 _write("arrays.npz", buf.getvalue()))


def _npz_members(blob: bytes) -> dict[str, bytes]:
    return dict(fz.zip_entries(blob))


@settings(max_examples=100, **SETTINGS)
@given(data=st.data())
def fuzz_npz_bytes(data: Any) -> None:
    """Byte flips and truncation of a valid npz: identical arrays or DataError (zip CRCs guard the data)."""
    blob = bytearray(REF["npz"])
    if data.draw(st.booleans(), label="truncate"):
        cut = data.draw(fz.zip_offsets(REF["npz"]), label="keep")
        blob, what = blob[:cut], f"keep {cut} of {len(REF['npz'])} bytes"
        same = None  # a cut npz can't hold the data; any load is judged by the loader's own checks
    else:
        flips = data.draw(st.lists(st.tuples(fz.zip_offsets(REF["npz"]), fz.XORS), min_size=1,
                                   max_size=4), label="(offset, xor)")
        for off, x in flips:
            blob[off] ^= x
        what, same = f"xor bytes {flips}", REF["npz_fp"]
    _expect_data(f"valid npz: {what}", "npz", _write("flip.npz", bytes(blob)), same)


def npy(header: str | bytes, data: bytes, version: tuple[int, int] = (1, 0)) -> bytes:
    """An ``.npy`` file with this header text (padded as numpy pads it; UTF-8, so random text can make
    bytes numpy's latin-1 reader never expects) and data."""
    raw = header.encode("utf-8", "surrogatepass") if isinstance(header, str) else header
    size_bytes = 2 if version == (1, 0) else 4
    pad = (-(6 + 2 + size_bytes + len(raw) + 1)) % 64
    raw = raw + b" " * pad + b"\n"
    return b"\x93NUMPY" + bytes(version) + len(raw).to_bytes(size_bytes, "little") + raw + data


_HEADER_VALUES = {
    "shape": st.sampled_from(["(20000, 20000)", "(10**12,)", "(1000000000000,)", "(-1, 3)", "(3.5,)", "()",
                              "(40, 3, 0)", "'x'", "(40,)", "(3, 40)", "(2**62, 2)", "[40, 3]", "None"]),
    "descr": st.sampled_from(["'<f4'", "'>f4'", "'<f8'", "'|O'", "'<U2'", "'|V8'", "'zz'", "'<i8'", "'|b1'",
                              "[('a', '<f4')]", "'<c8'", "'<M8[s]'", "3"]),
    "fortran_order": st.sampled_from(["True", "False", "'x'", "None"]),
}


@settings(max_examples=100, **SETTINGS)
@given(data=st.data())
def fuzz_npz_headers(data: Any) -> None:
    """Forged ``.npy`` headers (shape, dtype, order, raw text, data length) inside valid zips."""
    members = _npz_members(REF["npz"])
    name = data.draw(st.sampled_from(["x.npy", "y.npy"]), label="member")
    arr = np.load(io.BytesIO(members[name]), allow_pickle=False)
    fields = {"descr": repr(arr.dtype.str), "fortran_order": "False", "shape": repr(arr.shape)}
    payload = arr.tobytes()
    what = []
    for _ in range(data.draw(st.integers(1, 3), label="edits")):
        op = data.draw(st.sampled_from(["field", "field", "raw", "data"]), label="op")
        if op == "field":
            key = data.draw(st.sampled_from(sorted(_HEADER_VALUES)), label="field")
            fields[key] = data.draw(_HEADER_VALUES[key], label=key)
            what.append(f"{key}={fields[key]}")
        elif op == "raw":
            fields = {"raw": data.draw(st.sampled_from(["{}", "{'descr': '<f4'}", "[1, 2]", "__import__('os')",
                                                        "{'descr': '<f4', 'fortran_order': False, 'shape': (40, 3)"
                                                        ", 'x': 1}"]) | st.text(max_size=30), label="raw")}
            what.append(f"header text {fields['raw']!r}")
        else:
            size = data.draw(st.sampled_from([0, 1, len(payload) // 2, len(payload) + 8]), label="data bytes")
            payload = (payload * 2)[:size]
            what.append(f"data {size} bytes")
    header = fields["raw"] if "raw" in fields else \
        "{" + ", ".join(f"'{k}': {v}" for k, v in sorted(fields.items())) + ", }"
    version = data.draw(st.sampled_from([(1, 0), (2, 0), (3, 0), (9, 9)]), label="version")
    members[name] = npy(header, payload, version)
    blob = fz.zip_bytes(list(members.items()), zipfile.ZIP_STORED)
    _expect_data(f"npz {name}: {'; '.join(what)}; version {version}", "npz", _write("header.npz", blob))


# ---- csv and text ---------------------------------------------------------------------------------------
_CELLS = ["", " ", "nan", "NaN", "inf", "-inf", "1e999", "-1e999", "1e38", "3.5e38", "0x10", "1_000", " 3 ", "abc",
          '"1,2"', '"', "\x00", "\u00e9", "1,", "-0", "+1", "1e-400", "9" * 400, "\ufeff1", "\r"]


@settings(max_examples=100, **SETTINGS)
@given(data=st.data())
def fuzz_csv(data: Any) -> None:
    """A numeric table with a label column, then up to 3 spoiled cells, header edits and odd line endings."""
    ncol = data.draw(st.integers(1, 4), label="feature columns")
    nrow = data.draw(st.sampled_from([12, 20, 0, 9, 10, 1]), label="rows")
    header = [f"f{i}" for i in range(ncol)]
    at = data.draw(st.integers(0, ncol), label="label column at")
    header.insert(at, "label")
    cells = st.floats(-1e6, 1e6, allow_nan=False).map(repr) | st.integers(-5, 5).map(str)
    rows = [[data.draw(cells, label="cell") if j != at else str(i % 3) for j in range(ncol + 1)] for i in range(nrow)]
    what = []
    for _ in range(data.draw(st.integers(0, 3), label="spoilers")):
        kind = data.draw(st.sampled_from(["cell", "header", "row length"]), label="spoiler")
        if kind == "cell" and rows:
            r, c = data.draw(st.integers(0, nrow - 1), label="row"), data.draw(st.integers(0, ncol), label="col")
            rows[r][c] = data.draw(st.sampled_from(_CELLS) | st.text(max_size=4), label="value")
            what.append(f"cell[{r}][{c}]={rows[r][c]!r}")
        elif kind == "header":
            c = data.draw(st.integers(0, ncol), label="col")
            header[c] = data.draw(st.sampled_from(["label", "", "label ", "LABEL", "f0", "\u00e9", '"label"']),
                                  label="name")
            what.append(f"header[{c}]={header[c]!r}")
        elif rows:
            r = data.draw(st.integers(0, nrow - 1), label="row")
            rows[r] = rows[r][: data.draw(st.integers(0, ncol + 2), label="length")] + ["1"] * (
                data.draw(st.integers(0, 2), label="extra"))
            what.append(f"row {r} has {len(rows[r])} cells")
    eol = data.draw(st.sampled_from(["\n", "\r\n", "\r"]), label="line end")
    text = eol.join(",".join(r) for r in [header, *rows]) + eol
    encoding = data.draw(st.sampled_from(["utf-8", "utf-16", "latin-1"]), label="encoding")
    blob = text.encode(encoding, errors="replace")
    _expect_data(f"csv {ncol + 1}x{nrow} {'; '.join(what) or 'clean'}; {encoding}, eol {eol!r}", "csv",
                 _write("table.csv", blob))


@settings(max_examples=60, **SETTINGS)
@given(blob=st.binary(max_size=200))
def fuzz_csv_bytes(blob: bytes) -> None:
    _expect_data(f"csv bytes {_brief(blob)}", "csv", _write("bytes.csv", blob))


@settings(max_examples=60, **SETTINGS)
@given(blob=st.binary(max_size=200) | st.text(max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass")))
def fuzz_text_bytes(blob: bytes) -> None:
    _expect_data(f"text bytes {_brief(blob)}", "text", _write("lines.txt", blob))


# ---- targeted cases ----------------------------------------------------------------------------------------
def _canary(run: Any, what: str) -> None:
    MARKER.unlink(missing_ok=True)
    try:
        run()
    finally:
        ran = MARKER.exists()
        MARKER.unlink(missing_ok=True)
        if ran:
            fz.fail("code named by the file ran", what, "the canary ran while the file was loaded")


def _pickle_calling_open() -> bytes:
    """Protocol-0 pickle bytes that call ``builtins.open(MARKER, 'w')`` when unpickled."""
    return f"cbuiltins\nopen\n(V{MARKER}\nVw\ntR.".encode()


def _npz_with(x: bytes, y: bytes | None = None) -> bytes:
    members = _npz_members(REF["npz"])
    return fz.zip_bytes([("x.npy", x), ("y.npy", y if y is not None else members["y.npy"])], zipfile.ZIP_STORED)


def _recipe_case(name: str, text: str | bytes) -> Any:
    return lambda: _expect_recipe(f"recipe {name}: {_brief(text, 80)}", _write("targeted.yaml", text))


def _data_case(prefix: str, name: str, blob: bytes) -> Any:
    return lambda: _expect_data(f"{prefix} {name}", prefix, _write(f"targeted.{prefix}", blob))


_LAUGHS = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{c}: &{c} [{', '.join(['*' + p] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi", strict=True)) + \
    "model: zoo:digits-mlp\ndata: digits\nsteps: [magnitude]\nname: *i\n"


def _npz_field(offset: int, value: int) -> bytes:
    """The reference npz with one central directory field of 'x.npy' set."""
    return fz.patch_central(REF["npz"], 0, offset, value)


def _targeted() -> dict[str, Any]:
    ok = "model: zoo:digits-mlp\ndata: digits\nsteps:\n  - magnitude: {sparsity: 0.5}\n"
    pickled = npy("{'descr': '|O', 'fortran_order': False, 'shape': (40, 3), }", _pickle_calling_open())
    return {
        "recipe_valid_loads": _recipe_case("valid", ok),
        "recipe_deep_nesting": _recipe_case("nested 5000 deep", "[" * 5_000 + "]" * 5_000),
        "recipe_deep_mapping": _recipe_case("mapping nested 5000 deep", "{a: " * 5_000 + "1" + "}" * 5_000),
        "recipe_billion_laughs": _recipe_case("billion laughs", _LAUGHS),
        "recipe_python_tag": lambda: _canary(_recipe_case(
            "python tag", f"model: !!python/object/apply:builtins.open ['{MARKER}', 'w']\ndata: d\nsteps: [x]\n"),
            "recipe with a !!python/object/apply tag"),
        "recipe_not_utf8": _recipe_case("not UTF-8", b"model: \xff\xfe\ndata: digits\nsteps: [magnitude]\n"),
        "recipe_mixed_key_types": _recipe_case("int and str unknown keys", ok + "1: 2\nzz: 3\nnull: 4\n"),
        "recipe_step_huge_ints": _recipe_case("huge option values", ok.replace(
            "{sparsity: 0.5}", "{sparsity: 1e999}") + "  - weight-sharing: {bits: 100000000000000000000}\n"
                                                      "  - finetune: {epochs: 100000000000000000000}\n"),
        "recipe_step_key_not_string": _recipe_case("step named by a list", ok + "  - [a, b]: {}\n"),
        "recipe_is_a_directory": lambda: _expect_recipe("recipe path is a directory", WORK),
        "npz_shape_20000x20000_on_8_bytes": _data_case("npz", "x header shape (20000, 20000) over 8 bytes", _npz_with(
            npy("{'descr': '<f8', 'fortran_order': False, 'shape': (20000, 20000), }", bytes(8)))),
        "npz_shape_10e12": _data_case("npz", "x header shape (10**12,)", _npz_with(
            npy("{'descr': '<f4', 'fortran_order': False, 'shape': (1000000000000, 3), }", bytes(8)))),
        "npz_object_array_runs_no_pickle": lambda: _canary(_data_case(
            "npz", "x is a pickled object array (canary)", _npz_with(pickled)), "npz holding a pickle"),
        "npz_plain_pickle_file": lambda: _canary(_data_case(
            "npz", "the file is a pickle (canary)", _pickle_calling_open()), "a pickle named .npz"),
        "npz_is_a_single_npy": _data_case("npz", "the file is one .npy, not an archive", npy(
            "{'descr': '<f4', 'fortran_order': False, 'shape': (40, 3), }", bytes(480))),
        "npz_empty_file": _data_case("npz", "empty file", b""),
        "npz_encrypted_flag": _data_case("npz", "x.npy flagged encrypted", _npz_field(8, 0x0001)),
        "npz_patched_data_flag": _data_case("npz", "x.npy flagged compressed patched data", _npz_field(8, 0x0020)),
        "npz_version_needed_too_high": _data_case("npz", "x.npy needs zip version 14.8", _npz_field(6, 0x0094)),
        "npz_unknown_compression": _data_case("npz", "x.npy compression method 99", _npz_field(10, 99)),
        "npz_members_missing": _data_case("npz", "archive without x and y", fz.zip_bytes([("z.npy", b"")])),
        "csv_huge_field": _data_case("csv", "one 200 kB field", b"a,label\n" + b"1" * 200_000 + b",1\n"),
        "csv_not_utf8": _data_case("csv", "latin-1 bytes", b"a,label\n\xff,1\n" * 12),
        "csv_nul_bytes": _data_case("csv", "NUL bytes", b"a,label\n1\x00,1\n" * 12),
        "csv_ragged_rows": _data_case("csv", "ragged rows", b"a,label\n1,1\n2\n3,1,4\n" * 5),
        "csv_beyond_float32": _data_case("csv", "1e300 values", b"a,label\n" + b"1e300,1\n0,0\n" * 6),
        "text_nul_bytes": _data_case("text", "binary with NUL bytes", bytes(range(256)) * 4),
        "text_not_utf8": _data_case("text", "latin-1 bytes", ("caf\u00e9\n" * 20).encode("latin-1")),
    }


def child_setup(context: dict[str, Any]) -> dict[str, Any]:
    """Runs in the child before the memory cap: registry look-ups, reference files, a clean load each."""
    global WORK, MARKER
    import torch

    from slimguard.core.config import CONFIGS  # full: importing slimguard imports every plugin

    torch.set_num_threads(1)
    WORK = Path(context["workdir"])
    MARKER = WORK / "canary-ran"
    for name, cls in CONFIGS.items():
        STEPS[str(name)] = sorted(f.name for f in dataclasses.fields(cls) if f.init)
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    np.savez(buf, x=rng.random((40, 3), dtype=np.float32), y=np.arange(40, dtype=np.int64) % 3)
    REF["npz"] = buf.getvalue()
    REF["npz_fp"] = _bundle_fp(_load_data(f"npz:{_write('ref.npz', REF['npz'])}"))
    _load_recipe(_write("ref.yaml", "model: zoo:digits-mlp\ndata: digits\nsteps: [magnitude]\n"))
    table = "a,label\n" + "".join(f"{i},{i % 2}\n" for i in range(12))
    _load_data(f"csv:{_write('ref.csv', table)}")
    lines = "".join(f"line {i}\n" for i in range(12))
    _load_data(f"text:{_write('ref.txt', lines)}")
    cases: dict[str, Any] = {name: globals()[f"fuzz_{name}"] for name in PROPERTIES}
    cases.update(_targeted())
    return cases


# =========================================================================================================
# parent side
# =========================================================================================================
PROPERTIES = ["recipe_bytes", "recipe_yaml_tokens", "recipe_structure", "npz_arrays", "npz_bytes", "npz_headers",
              "csv", "csv_bytes", "text_bytes"]
TARGETED = [
    "recipe_valid_loads", "recipe_deep_nesting", "recipe_deep_mapping", "recipe_billion_laughs",
    "recipe_python_tag", "recipe_not_utf8", "recipe_mixed_key_types", "recipe_step_huge_ints",
    "recipe_step_key_not_string", "recipe_is_a_directory", "npz_shape_20000x20000_on_8_bytes", "npz_shape_10e12",
    "npz_object_array_runs_no_pickle", "npz_plain_pickle_file", "npz_is_a_single_npy", "npz_empty_file",
    "npz_encrypted_flag", "npz_patched_data_flag", "npz_version_needed_too_high", "npz_unknown_compression",
    "npz_members_missing", "csv_huge_field", "csv_not_utf8", "csv_nul_bytes", "csv_ragged_rows",
    "csv_beyond_float32", "text_nul_bytes", "text_not_utf8",
]


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict[str, Any]:
    work = tmp_path_factory.mktemp("fuzz_inputs")
    return fz.run_child(__file__, work, [*PROPERTIES, *TARGETED], {"workdir": str(work)})


@pytest.mark.parametrize("name", PROPERTIES)
def test_random_input_loads_or_raises_the_documented_error(report, name):
    """recipes: a Recipe or ConfigError; npz / csv / text: a DataBundle or DataError; npz byte flips:
    identical arrays or DataError. Nothing else escapes; every load stays inside the caps."""
    fz.assert_clean(report, name)


@pytest.mark.parametrize("name", TARGETED)
def test_targeted_input_is_handled_inside_the_caps(report, name):
    fz.assert_clean(report, name)


CRASHING_SUITE = """
import os
import signal

import fuzz_support as fz


def child_setup(context):
    def crash():
        fz.progress("the case that crashes")
        os.kill(os.getpid(), signal.SIGKILL)

    return {"crash": crash, "after": lambda: None}
"""


def test_a_child_that_dies_is_reported_with_the_case_it_was_on(tmp_path):
    """A loader that kills the process (a crash in native code, the kernel's OOM killer) fails the
    properties that had not finished, naming the case that was running."""
    suite = tmp_path / "crashing_suite.py"
    suite.write_text(CRASHING_SUITE)
    report = fz.run_child(suite, tmp_path / "child", ["crash", "after"], {})
    assert not report["child"]["ok"] and "exit code -9" in report["child"]["status"]
    for name in ("crash", "after"):
        (problem,) = report["results"][name]["harness"]
        assert "the child died (exit code -9) while running: the case that crashes" in problem
        with pytest.raises(pytest.fail.Exception, match="the case that crashes"):
            fz.assert_clean(report, name)


def test_fuzzing_ran_many_cases(report):
    assert report["child"]["ok"], report["child"]
    assert sum(report["results"][p]["cases"] for p in PROPERTIES) >= 500
    assert all(report["results"][t]["cases"] == 1 for t in TARGETED)

