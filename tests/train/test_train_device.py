"""Where training runs: the device rules, the move there and back, DDP's ``device_ids``.

No GPU is needed: CUDA and the NCCL process group are faked by monkeypatching ``torch.cuda`` and
``slimguard.train.distributed``, and the model's ``.to`` and the loop's ``to_device`` are recorded (they do
not move anything), so the tests check which device is chosen and that everything is sent there and back.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from slimguard.core.errors import ConfigError, UserError
from slimguard.train import distributed
from slimguard.train import loop as loop_module
from slimguard.train.loop import FinetuneConfig, finetune
from slimguard.train.placement import placed, training_device

CPU, GPU0, GPU1 = torch.device("cpu"), torch.device("cuda", 0), torch.device("cuda", 1)


def _fake_cuda(monkeypatch, available: bool = True, count: int = 2) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)


def _fake_group(monkeypatch, backend: str | None, own: torch.device = GPU1) -> None:
    """A process group of one rank with ``backend``, whose rank's device is ``own`` (None: no group)."""
    monkeypatch.setattr(distributed, "is_initialized", lambda: backend is not None)
    monkeypatch.setattr(distributed, "backend", lambda: backend)
    monkeypatch.setattr(distributed, "device", lambda: own)
    monkeypatch.setattr(distributed, "world_size", lambda: 1)
    monkeypatch.setattr(distributed, "rank", lambda: 0)


NCCL = "cpu:gloo,cuda:nccl"
# (requested, backend of the process group (None: not under torchrun), CUDA available, expected device)
DEVICE_CASES = [
    ("auto", None, False, CPU),     # outside torchrun: the model's own device, as before
    ("auto", None, True, CPU),      # a CPU model stays on the CPU even where CUDA exists
    ("auto", "gloo", False, CPU),   # torchrun without CUDA
    ("auto", NCCL, True, GPU1),     # torchrun with NCCL: this rank's cuda:LOCAL_RANK
    ("cpu", NCCL, True, CPU),       # asked for explicitly
    ("cuda", None, True, GPU0),     # the current GPU
    ("cuda:1", None, True, GPU1),
    ("cuda", NCCL, True, GPU1),     # under torchrun, cuda is this rank's GPU
    ("cuda:1", NCCL, True, GPU1),
]


@pytest.mark.parametrize(("requested", "backend", "cuda", "expected"), DEVICE_CASES)
def test_training_device_rules(monkeypatch, requested, backend, cuda, expected):
    _fake_cuda(monkeypatch, cuda)
    _fake_group(monkeypatch, backend)
    assert training_device(nn.Linear(2, 2), requested) == expected


ERROR_CASES = [
    ("cuda", None, False, r"^finetune\.device: 'cuda' but torch finds no CUDA device on this machine; use device: cpu"),
    ("cuda:0", None, False, r"^finetune\.device: 'cuda:0' but torch finds no CUDA device"),
    ("cuda:5", None, True, r"^finetune\.device: 'cuda:5' but this machine has 2 GPU\(s\); use cuda:0 to cuda:1$"),
    ("cuda:0", NCCL, True, r"^finetune\.device: 'cuda:0' under torchrun, where this rank's GPU is cuda:1; write "),
]


@pytest.mark.parametrize(("requested", "backend", "cuda", "message"), ERROR_CASES)
def test_training_device_errors_are_one_line(monkeypatch, requested, backend, cuda, message):
    _fake_cuda(monkeypatch, cuda)
    _fake_group(monkeypatch, backend)
    with pytest.raises(ConfigError, match=message) as info:
        training_device(nn.Linear(2, 2), requested)
    assert isinstance(info.value, UserError) and "\n" not in str(info.value)


def test_cuda_without_cuda_fails_before_training(monkeypatch):
    _fake_cuda(monkeypatch, available=False)
    model = nn.Linear(4, 2)
    before = model.weight.detach().clone()
    data = [(torch.randn(8, 4), torch.zeros(8, dtype=torch.long))]
    with pytest.raises(ConfigError, match=r"^finetune\.device: 'cuda' but torch finds no CUDA"):
        finetune(model, data, FinetuneConfig(epochs=1, device="cuda"), progress=False)
    assert torch.equal(model.weight, before)


@pytest.mark.parametrize("value", ["gpu", "cuda:", "cuda:x", "CPU", "mps"])
def test_device_option_is_validated_and_names_the_key(value):
    with pytest.raises(ConfigError, match=rf"device: '{value}' is not allowed; allowed: auto, cpu, cuda, cuda:N"):
        FinetuneConfig(device=value)
    with pytest.raises(ConfigError, match=r"^steps\[0\]\.finetune: device: "):
        FinetuneConfig.from_fields({"device": value}, where="steps[0].finetune")
    assert FinetuneConfig.from_fields({"device": "cuda:1"}).device == "cuda:1"  # spelled right: loads anywhere


class _Recorded(nn.Module):
    """A module whose ``.to`` calls are recorded and not carried out (there is no GPU to move to)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.moves: list[torch.device] = []

    def to(self, *args, **kwargs):  # type: ignore[override]
        self.moves.append(torch.device(args[0]))
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


def test_under_nccl_the_model_teacher_and_batches_go_to_the_ranks_gpu_and_back(monkeypatch):
    """torchrun with NCCL: the model and the teacher move to cuda:LOCAL_RANK for training and back to the CPU
    afterwards, every batch is sent there, and DistributedDataParallel gets that GPU as its device."""
    _fake_cuda(monkeypatch)
    _fake_group(monkeypatch, NCCL, own=GPU1)
    monkeypatch.setattr(loop_module, "_distributed", lambda: (True, 0, 1))
    wrapped: list[dict] = []

    class FakeDDP(nn.Module):
        def __init__(self, module: nn.Module, **kwargs) -> None:
            super().__init__()
            self.module = module
            wrapped.append(kwargs)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.module(x)

    monkeypatch.setattr(torch.nn.parallel, "DistributedDataParallel", FakeDDP)
    sent: list[torch.device] = []

    def to_device(batch, device):
        sent.append(device)
        return batch

    monkeypatch.setattr(loop_module, "to_device", to_device)
    model, teacher = _Recorded(nn.Linear(4, 3)), _Recorded(nn.Linear(4, 3))
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 4, generator=g), torch.randint(0, 3, (40,), generator=g)
    batches = [(x[i : i + 10], y[i : i + 10]) for i in range(0, 40, 10)]

    def loss_fn(m: nn.Module, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(m(xb) + 0 * teacher(xb), yb)

    history = finetune(model, batches, FinetuneConfig(epochs=2), loss_fn=loss_fn, move_with=[teacher],
                       progress=False)
    assert history["steps"] == 8
    assert model.moves == [GPU1, CPU] and teacher.moves == [GPU1, CPU]
    assert sent == [GPU1] * 16  # inputs and labels of 8 steps
    assert wrapped == [{"device_ids": [1]}]


def test_cpu_training_is_untouched(monkeypatch):
    """On the CPU nothing is moved (no ``.to`` call at all), and ``device: cpu`` trains exactly as ``auto``."""
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 4, generator=g), torch.randint(0, 3, (64,), generator=g)
    batches = [(x[i : i + 16], y[i : i + 16]) for i in range(0, 64, 16)]
    weights = []
    for device in ("auto", "cpu"):
        torch.manual_seed(0)
        model = _Recorded(nn.Linear(4, 3))
        finetune(model, batches, FinetuneConfig(epochs=2, device=device), progress=False)
        assert model.moves == []
        weights.append(model.inner.weight.detach().clone())
    assert torch.equal(weights[0], weights[1])  # atol 0: the same computation


def test_placed_moves_back_on_error_and_skips_modules_already_there():
    here, away = _Recorded(nn.Linear(2, 2)), _Recorded(nn.Linear(2, 2))
    with pytest.raises(RuntimeError, match="boom"):
        with placed(CPU, [here]):
            raise RuntimeError("boom")
    assert here.moves == []  # already on the CPU
    with pytest.raises(RuntimeError, match="boom"):
        with placed(GPU1, [away, away]):  # listed twice: moved once
            raise RuntimeError("boom")
    assert away.moves == [GPU1, CPU]


def test_distillation_moves_the_teacher_with_the_student(monkeypatch):
    """``distill`` trains through the loop with its teacher (and projections) moved along: on the training
    device for the steps, back afterwards."""
    from slimguard import data as sgdata
    from slimguard.distill import DistillConfig, distill

    monkeypatch.setattr(loop_module, "training_device", lambda model, requested: GPU1)
    monkeypatch.setattr(loop_module, "to_device", lambda batch, device: batch)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(48, 4, generator=g)
    bundle = sgdata.bundle_from_batches([(x, (x[:, 0] > 0).long())], kind="tabular")
    teacher, student = _Recorded(nn.Linear(4, 2)), _Recorded(nn.Linear(4, 2))
    history = distill(teacher, student, bundle, DistillConfig(finetune=FinetuneConfig(epochs=1)), progress=False)
    assert history["steps"] > 0
    assert student.moves == [GPU1, CPU] and teacher.moves == [GPU1, CPU]
