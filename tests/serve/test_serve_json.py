"""Request bodies are parsed by orjson when it is installed, with the standard parser's answers: what orjson
refuses and the standard parser reads (NaN, Infinity, integers past a float's range) goes to the standard
parser, so the contract, not the JSON parser, names those values. Integers past 64 bits arrive as floats of
the same value (inputs become float32 anyway; labels refuse integers past 2**31 either way)."""

from __future__ import annotations

import json

import pytest

from slimguard.serve import limits
from slimguard.serve.limits import Problem, parse_json

BODIES = [
    b'{"inputs": [[[0.5, -0.25, 1e-3, 3, 0]]]}',
    b'{"texts": ["caf\\u00e9 \xe2\x82\xac", "a \\"quoted\\" word"], "ids": []}',
    b'{"inputs": [[NaN, Infinity, -Infinity]]}',  # orjson refuses; the standard parser reads them
    b'{"inputs": [[1e2, -7]], "ids": ["x"]}',
    b'{"inputs": [[1' + b"0" * 400 + b"]]}",       # an integer past a float's range: orjson refuses
    b'{"inputs": [1e400]}',                       # orjson refuses; the standard parser reads inf
    b'{"a": 1, "a": 2}',                          # duplicate keys: the last wins in both
]


@pytest.mark.parametrize("body", BODIES)
def test_answers_equal_the_standard_parser(body):
    got, want = parse_json(body, 32), json.loads(body)
    assert json.dumps(got) == json.dumps(want)  # NaN != NaN: compare the texts


def test_integers_past_64_bits_arrive_as_floats_of_their_value():
    big = 123456789012345678901234567890
    got = parse_json(b'{"inputs": [[%d, 5]]}' % big, 32)["inputs"][0]
    assert got[0] == float(big) and got[1] == 5 and isinstance(got[1], int)


def test_invalid_json_is_still_a_400():
    for body in (b'{"inputs": [1, 2,]}', b"\xff\xfe", b"", b"[1] [2]"):
        with pytest.raises(Problem) as e:
            parse_json(body, 32)
        assert e.value.status == 400 and e.value.errors[0]["rule"] == "json"


def test_orjson_parses_when_installed():
    orjson = pytest.importorskip("orjson")
    assert limits._fast_loads is orjson.loads
