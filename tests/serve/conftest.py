"""Fixtures for the service tests: a small compressed artifact, and real ``slimguard serve`` processes
on 127.0.0.1 (port 0: the process picks a free port and prints it), called with httpx.

Every wait is bounded in time; clients never use proxies (``trust_env=False``), so traffic stays on
127.0.0.1.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

API_KEY = "test-key-0123456789"
KEY_ENV = "SG_SERVE_TEST_KEY"
START_TIMEOUT_S = 90.0


class Server:
    """A ``slimguard serve`` subprocess. ``url`` once it listens; ``client()`` for httpx calls."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None) -> None:
        code = "from slimguard.cli import main; main()"
        full_env = {**os.environ, KEY_ENV: API_KEY, "SLIMGUARD_QUIET": "1", **(env or {})}
        self.proc = subprocess.Popen([sys.executable, "-c", code, "serve", *args, "--port", "0"],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full_env)
        self.stderr: list[str] = []
        threading.Thread(target=self._drain_stderr, daemon=True).start()
        self.url = self._wait_for_url()

    def _drain_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr.append(line)

    def _wait_for_url(self) -> str:
        assert self.proc.stdout is not None
        found: list[str] = []

        def read() -> None:
            assert self.proc.stdout is not None
            line = self.proc.stdout.readline()
            found.append(line)

        t = threading.Thread(target=read, daemon=True)
        t.start()
        t.join(START_TIMEOUT_S)
        line = found[0] if found else ""
        if not line.startswith("serving on http://127.0.0.1:"):
            self.kill()
            raise AssertionError(f"server did not start: {line!r} {''.join(self.stderr)[-2000:]}")
        return line.split()[-1]

    def client(self, key: str | None = API_KEY, timeout: float = 20.0) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=timeout, trust_env=False)

    def terminate(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@contextlib.contextmanager
def serving(artifact: Path, *args: str, env: dict[str, str] | None = None) -> Iterator[Server]:
    server = Server([str(artifact), *args], env)
    try:
        yield server
    finally:
        with contextlib.suppress(subprocess.TimeoutExpired):
            server.terminate(20)
        server.kill()


def metric(text: str, name: str) -> float:
    """The value of one sample line ``name`` (with its labels, exactly) in Prometheus text; 0 if absent."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory) -> dict[str, Path]:
    """``small``: digits-mlp pruned to 50% sparsity; ``other``: pruned to 30% (a second version);
    ``broken``: ``small`` with its tensors entry damaged (fails its checks on load)."""
    import zipfile

    import slimguard as sg
    from slimguard.artifact import save
    from slimguard.models import zoo

    d = tmp_path_factory.mktemp("serve")
    out = {}
    for name, sparsity in (("small", 0.5), ("other", 0.3)):
        m = zoo.load("digits-mlp", progress=False)
        sg.prune_(m, sg.MagnitudePruningConfig(sparsity=sparsity))
        out[name] = save(m, d / f"{name}.slim")
    broken = d / "broken.slim"
    with zipfile.ZipFile(out["small"]) as src, zipfile.ZipFile(broken, "w") as dst:
        for item in src.infolist():
            data = src.read(item.filename)
            if item.filename == "tensors.safetensors":
                data = data[:-64] + bytes(64)
            dst.writestr(item, data)
    out["broken"] = broken
    return out


@pytest.fixture(scope="session")
def digits_json(digits) -> dict[str, list]:
    """Request bodies: 4 test digits, and 32 far-OOD images."""
    from slimguard import data

    return {"id": {"inputs": digits.test.x[:4].tolist()},
            "ood": {"inputs": data.load("digits-ood").test.x[:32].tolist()}}


def wait_until(fn, timeout: float = 10.0, every: float = 0.05) -> bool:
    """Poll ``fn()`` until true, at most ``timeout`` seconds."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if fn():
            return True
        time.sleep(every)
    return False


@pytest.fixture(scope="session")
def text_artifacts(tmp_path_factory) -> dict[str, Path]:
    """Tiny random text models (nothing downloaded) saved as artifacts with their tokenizers embedded:
    ``classifier`` (a 3-class BERT sequence classifier, max 64 positions) with ``classifier_data``
    (``jsonl:`` labelled texts), and ``embedder`` (a BERT embedder) with ``embedder_data`` (``text:``)."""
    import json
    import random

    from tests.hf_support import WORDS, build_family

    from slimguard.artifact import save
    from slimguard.models.hf import load_hf

    d = tmp_path_factory.mktemp("serve-text")
    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(120)]
    rows = [{"text": t, "label": i % 3, "split": ("train", "train", "train", "val", "test")[i % 5]}
            for i, t in enumerate(texts)]
    (d / "reviews.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "lines.txt").write_text("\n".join(texts) + "\n")
    out = {}
    for name, family in (("classifier", "bert"), ("embedder", "bert-embed")):
        model = load_hf(str(build_family(family, d / family)))
        out[name] = save(model, d / f"{name}.slim")
    out["classifier_data"] = Path(f"jsonl:{d / 'reviews.jsonl'}")
    out["embedder_data"] = Path(f"text:{d / 'lines.txt'}")
    return out
