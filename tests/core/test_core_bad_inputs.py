"""Bad input files give one specific error, never a traceback: binary recipes and tables, YAML aliases,
oversized recipes, empty or fake ``.npz`` files, forged array headers, values that overflow float32."""

from __future__ import annotations

import io
import zipfile

import numpy as np
import pytest
from typer.testing import CliRunner

from slimguard import data as sgdata
from slimguard.cli import build_app
from slimguard.core.errors import ConfigError, DataError
from slimguard.core.recipe import MAX_RECIPE_BYTES, load, loads

runner = CliRunner()
APP = build_app()
BINARY = bytes(range(256)) * 4  # 0x80.. alone are not valid UTF-8
GOOD = "model: zoo:digits-mlp\ndata: digits\nsteps: [int8-dynamic]\n"
# three levels of nine aliases: 729 strings from 150 bytes; a few more levels would need gigabytes
BOMB = ('a: &a ["x","x","x","x","x","x","x","x","x"]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]\n'
        'c: [*b,*b,*b,*b,*b,*b,*b,*b,*b]\n' + GOOD)


def _file(tmp_path, name, content):
    p = tmp_path / name
    p.write_bytes(content if isinstance(content, bytes) else content.encode())
    return p


def _one_line(err):
    text = str(err.value)
    assert "\n" not in text and text, text
    return text


# ---- recipes -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("content", "message"),
    [
        (BINARY, "not UTF-8 text (byte 128)"),
        (BOMB, "YAML anchors and aliases (&name, *name) are not allowed (line 1)"),
        ("name: &n demo\n" + GOOD, "anchors and aliases"),  # an anchor alone is refused as well
        ("[" * 5000 + "]" * 5000, "nested too deeply"),
        ("model: [unclosed\n", "not valid YAML at line"),
        (b"#" * (MAX_RECIPE_BYTES + 1), "too large for a recipe file"),
    ],
    ids=["binary", "alias-bomb", "anchor", "deep", "invalid", "oversized"],
)
def test_bad_recipe_files_are_config_errors(tmp_path, content, message):
    with pytest.raises(ConfigError) as err:
        load(_file(tmp_path, "r.yaml", content))
    assert message in _one_line(err)


def test_plain_recipe_still_loads_and_aliases_are_refused_in_text_too():
    assert [s.config_name for s in loads(GOOD).steps] == ["int8-dynamic"]
    with pytest.raises(ConfigError, match="anchors and aliases"):
        loads(BOMB, "bomb.yaml")


@pytest.mark.parametrize(
    ("content", "message"),
    [(BINARY, "not UTF-8 text (byte 128)"), (BOMB, "YAML anchors and aliases (&name, *name) are not allowed")],
    ids=["binary", "alias-bomb"],
)
def test_cli_bad_recipe_exit_2_one_line(tmp_path, content, message):
    out = tmp_path / "out"
    r = runner.invoke(APP, ["compress", "-r", str(_file(tmp_path, "r.yaml", content)), "-o", str(out)])
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], r.output
    assert not out.exists()


# ---- data files ----------------------------------------------------------------------------------------------
def _npz(tmp_path, **arrays):
    p = tmp_path / "d.npz"
    np.savez(p, **arrays)
    return p


def _forged_npz(tmp_path):
    """An archive whose x header claims 10^12 float64 values but holds 64 bytes."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f8", "fortran_order": False, "shape": (10**6, 10**6)})
    p = tmp_path / "forged.npz"
    with zipfile.ZipFile(p, "w") as zf:
        zf.writestr("x.npy", header.getvalue() + bytes(64))
        zf.writestr("y.npy", header.getvalue())
    return p


def _npy_named_npz(tmp_path):
    p = tmp_path / "plain.npz"
    with open(p, "wb") as fh:
        np.save(fh, np.zeros(20))
    return p


Y20 = np.arange(20) % 2
CSV_ROWS = "".join(f"{-1e39 if i == 4 else i},{i % 2}\n" for i in range(20))
DATA_CASES = [
    ("empty-npz", lambda t: "npz:" + str(_file(t, "e.npz", b"")), "the file is empty"),
    ("text-npz", lambda t: "npz:" + str(_file(t, "t.npz", "x,y\n1,2\n")), "not an .npz archive"),
    ("npy-npz", lambda t: "npz:" + str(_npy_named_npz(t)), "not an .npz archive"),
    ("forged-header", lambda t: "npz:" + str(_forged_npz(t)), "claims shape (1000000, 1000000)"),
    ("object-npz", lambda t: "npz:" + str(_npz(t, x=np.array([{"a": 1}] * 20, dtype=object), y=Y20)),
     "Object arrays cannot be loaded"),
    ("float32-overflow-npz", lambda t: "npz:" + str(_npz(t, x=np.full((20, 3), 1e300), y=Y20)),
     "beyond float32's range of +-3.4e38 (first in row 0: 1e+300)"),
    ("float32-overflow-csv", lambda t: "csv:" + str(_file(t, "big.csv", "a,label\n" + CSV_ROWS)),
     "beyond float32's range of +-3.4e38 (first in row 4: -1e+39)"),
    ("binary-csv", lambda t: "csv:" + str(_file(t, "b.csv", b"a,label" + BINARY)), "not UTF-8 text (byte 135)"),
    ("huge-field-csv", lambda t: "csv:" + str(_file(t, "h.csv", "a,label\n" + "x" * 200_000 + ",1\n")),
     "not a readable CSV file (field larger than field limit"),
    ("binary-text", lambda t: "text:" + str(_file(t, "b.txt", BINARY)), "not UTF-8 text (byte 128)"),
    ("nul-text", lambda t: "text:" + str(_file(t, "n.txt", "one line of text\n" + chr(0) * 8 + "\n")),
     "a binary file (NUL byte at 17)"),
]


@pytest.mark.parametrize(("name", "make", "message"), DATA_CASES, ids=[c[0] for c in DATA_CASES])
def test_bad_data_files_are_data_errors(tmp_path, name, make, message):
    with pytest.raises(DataError) as err:
        sgdata.load(make(tmp_path))
    assert message in _one_line(err), name


def test_csv_with_a_byte_order_mark_still_finds_its_label(tmp_path):
    rows = "a,label\n" + "".join(f"{i},{i % 2}\n" for i in range(20))
    b = sgdata.load("csv:" + str(_file(tmp_path, "bom.csv", b"\xef\xbb\xbf" + rows.encode())))
    assert b.meta.input_shape == (1,) and b.meta.num_classes == 2


def test_make_bundle_refuses_values_that_overflow_float32():
    from slimguard.data.core import make_bundle

    x = np.zeros((20, 2))
    x[7, 1] = 1e39
    with pytest.raises(DataError, match="beyond float32's range \\(first in row 7\\)"):
        make_bundle(x, Y20, {"name": "mine", "task": "classification", "low": 0.0, "high": 1.0}, seed=0)


@pytest.mark.parametrize(
    ("make", "message"),
    [(lambda t: "npz:" + str(_file(t, "e.npz", b"")), "the file is empty"),
     (lambda t: "csv:" + str(_file(t, "b.csv", BINARY)), "not UTF-8 text"),
     (lambda t: "npz:" + str(_npz(t, x=np.full((20, 1, 8, 8), 1e300), y=Y20)), "beyond float32's range")],
    ids=["empty-npz", "binary-csv", "overflow"],
)
def test_cli_bad_data_exit_2_one_line(tmp_path, make, message):
    r = runner.invoke(APP, ["evaluate", "zoo:digits-mlp", "--data", make(tmp_path)])
    assert r.exit_code == 2, r.output  # an empty .npz used to print only "Aborted." with exit 1
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], r.output
