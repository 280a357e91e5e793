"""Reading the zip container of a ``.slim`` artifact with its limits checked before any work.

A zip's central directory lists every member's name and declared sizes; nothing is inflated to read it.
:func:`read_members` uses it to refuse, before inflating a byte, a member that is not expected, one whose
declared size differs from the size its caller expects, and a total over the byte limit. Each member is
then read by a bounded reader that stops at the declared size, so a lying header cannot inflate more
than declared (and the zip CRC is checked at the end of each member).

The byte limit (:func:`max_artifact_bytes`) is ``max_bytes=`` when given, else the environment variable
``SLIMGUARD_MAX_ARTIFACT_BYTES`` (bytes, or with a unit: ``512MiB``, ``8GiB``, ``1TB``), else
:data:`DEFAULT_MAX_BYTES` (64 GiB, room for large real models).
"""

from __future__ import annotations

import os
import re
import zipfile
from pathlib import Path

from slimguard.core.errors import ArtifactError, ConfigError

DEFAULT_MAX_BYTES = 64 * 1024**3
MAX_BYTES_ENV = "SLIMGUARD_MAX_ARTIFACT_BYTES"
_CHUNK = 1 << 20
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10, "mib": 2**20,
          "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str, what: str) -> int:
    """``"64GiB"`` -> 68719476736; a plain integer is bytes. ConfigError naming ``what`` otherwise."""
    m = re.fullmatch(r"\s*(\d[\d_]*)\s*([A-Za-z]*)\s*", text)
    unit = m.group(2).lower() if m else ""
    if m is None or unit not in _UNITS or int(m.group(1)) <= 0:
        raise ConfigError(f"{what}: {text!r} is not a positive byte count; use e.g. 1073741824, 512MiB, 8GiB")
    return int(m.group(1)) * _UNITS[unit]


def max_artifact_bytes(max_bytes: int | None = None) -> int:
    """The byte limit in force: ``max_bytes``, else ``$SLIMGUARD_MAX_ARTIFACT_BYTES``, else 64 GiB."""
    if max_bytes is not None:
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes <= 0:
            raise ConfigError(f"max_bytes: {max_bytes!r} is not a positive integer number of bytes")
        return max_bytes
    env = os.environ.get(MAX_BYTES_ENV)
    return parse_bytes(env, MAX_BYTES_ENV) if env else DEFAULT_MAX_BYTES


def open_zip(path: Path) -> tuple[zipfile.ZipFile, dict[str, zipfile.ZipInfo]]:
    """Open ``path`` and read its central directory only; refuse duplicate member names."""
    if not path.is_file():
        raise ArtifactError(f"artifact not found: {path}; check the path")
    try:
        zf = zipfile.ZipFile(path)
    except Exception as exc:  # a bad or cut-off directory, a zip feature it does not read: all unreadable
        raise ArtifactError(f"{path}: not a readable .slim file, it may be truncated ({exc})") from None
    infos: dict[str, zipfile.ZipInfo] = {}
    for info in zf.infolist():
        if info.filename in infos:
            zf.close()
            raise ArtifactError(f"{path}: entry {info.filename!r} appears twice; the file was altered")
        infos[info.filename] = info
    return zf, infos


def read_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, limit: int, path: Path) -> bytes:
    """The member's bytes, refusing more than ``limit`` (inflation stops at ``limit + 1`` bytes)."""
    if info.file_size > limit:
        raise ArtifactError(f"{path}: entry {info.filename!r} declares {info.file_size:,} bytes, over its "
                            f"limit of {limit:,}; refusing it")
    chunks: list[bytes] = []
    got = 0
    try:
        with zf.open(info) as fh:
            while True:
                chunk = fh.read(min(_CHUNK, limit + 1 - got))
                if not chunk:
                    break
                got += len(chunk)
                if got > limit:
                    raise ArtifactError(f"{path}: entry {info.filename!r} inflates past {limit:,} bytes; "
                                        "refusing it")
                chunks.append(chunk)
    except ArtifactError:
        raise
    except Exception as exc:  # a bad CRC, a cut-off stream, a broken header, encryption: all corruption
        raise ArtifactError(f"{path}: entry {info.filename!r} is corrupted ({exc})") from None
    return b"".join(chunks)


def check_members(path: Path, infos: dict[str, zipfile.ZipInfo], expected: dict[str, int],
                  optional: dict[str, int], max_bytes: int) -> None:
    """Before inflating: every member is ``expected`` (name -> exact size) or ``optional`` (name -> size
    cap), every expected member is present, and the declared sizes add up to at most ``max_bytes``."""
    unexpected = sorted(set(infos) - set(expected) - set(optional))
    if unexpected:
        raise ArtifactError(f"{path}: unexpected entry {unexpected[0]!r} not listed in the manifest; "
                            "refusing it")
    total = 0
    for name, size in expected.items():
        if name not in infos:
            raise ArtifactError(f"{path}: entry {name!r} is missing")
        if infos[name].file_size != size:
            raise ArtifactError(f"{path}: entry {name!r} declares {infos[name].file_size:,} bytes, the "
                                f"manifest says {size:,}; the file was altered")
        total += size
    for name, cap in optional.items():
        if name in infos:
            if infos[name].file_size > cap:
                raise ArtifactError(f"{path}: entry {name!r} declares {infos[name].file_size:,} bytes, over "
                                    f"its limit of {cap:,}; refusing it")
            total += infos[name].file_size
    if total > max_bytes:
        raise ArtifactError(f"{path}: entries hold {total:,} bytes, over the limit of {max_bytes:,}; raise "
                            f"max_bytes= or {MAX_BYTES_ENV} if the file is trusted")
