"""Distillation losses: soft and hard targets, label mixing, feature matching, attention transfer,
and embedding matching.

All functions take batched tensors and return a scalar (mean over the batch).

Papers:
    Hinton, Vinyals, Dean 2015, "Distilling the Knowledge in a Neural Network" (soft targets, T^2 scaling).
    Romero et al. 2015, "FitNets" (hint / feature matching through a learned regressor).
    Zagoruyko and Komodakis 2017, "Paying More Attention to Attention" (attention transfer).
    Wang et al. 2020, "MiniLM" (self-attention distribution transfer for transformers).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from slimguard.core.errors import ModelError


def soft_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 4.0) -> torch.Tensor:
    """``T^2 * KL(softmax(t / T) || softmax(s / T))`` averaged over the batch (Hinton et al. 2015).

    The ``T^2`` factor keeps the gradient scale independent of the temperature.

    Shape:
        Both ``(N, C)`` logits; returns a scalar.

    Example:
        >>> soft_kl(torch.zeros(1, 2), torch.zeros(1, 2))  # identical distributions
        tensor(0.)
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    log_p_s = F.log_softmax(student_logits / temperature, dim=-1)
    log_p_t = F.log_softmax(teacher_logits / temperature, dim=-1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1).mean()
    return kl * temperature**2


def hard_ce(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the student against the teacher's argmax (hard targets).

    Shape:
        Both ``(N, C)``; returns a scalar.
    """
    return F.cross_entropy(student_logits, teacher_logits.argmax(-1))


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor | None = None, *,
            temperature: float = 4.0, alpha: float = 0.9, targets: str = "soft") -> torch.Tensor:
    """``alpha * distill + (1 - alpha) * CE(student, labels)``; without labels the distillation term alone.

    Args:
        targets: ``soft`` (KL at ``temperature``) or ``hard`` (teacher argmax).
        alpha: weight of the teacher term in [0, 1] (default 0.9).

    Shape:
        logits ``(N, C)``, labels ``(N,)``; returns a scalar.
    """
    teach = soft_kl(student_logits, teacher_logits, temperature) if targets == "soft" \
        else hard_ce(student_logits, teacher_logits)
    if labels is None or alpha >= 1.0:
        return teach
    return alpha * teach + (1.0 - alpha) * F.cross_entropy(student_logits, labels)


def embedding_loss(student: torch.Tensor, teacher: torch.Tensor, kind: str = "cosine") -> torch.Tensor:
    """Match embeddings: ``cosine`` is ``mean(1 - cos(s, t))``; ``mse`` is the mean over the batch of the
    squared Euclidean distance.

    Shape:
        Both ``(N, D)``; returns a scalar.
    """
    if kind == "cosine":
        return (1.0 - F.cosine_similarity(student, teacher, dim=-1)).mean()
    return (student - teacher).pow(2).sum(-1).mean()


def feature_loss(student: torch.Tensor, teacher: torch.Tensor, kind: str = "mse",
                 mask: torch.Tensor | None = None) -> torch.Tensor:
    """Distance between two feature maps of equal shape: mean squared error, or ``1 - cosine`` along the
    channel (conv, dim 1) or feature (last) dimension.

    Args:
        mask: optional ``(N, T)`` token mask for ``(N, T, D)`` hidden states (padding ignored).

    Shape:
        ``(N, C, H, W)``, ``(N, T, D)`` or ``(N, D)``; returns a scalar.
    """
    if kind == "cosine":
        dim = 1 if student.ndim == 4 else -1
        per = 1.0 - F.cosine_similarity(student, teacher, dim=dim)
    else:
        per = (student - teacher).pow(2).mean(1 if student.ndim == 4 else -1)
    if mask is not None and per.ndim == 2 and mask.shape == per.shape:
        m = mask.to(per.dtype)
        return (per * m).sum() / m.sum().clamp_min(1.0)
    return per.mean()


def attention_map(feature: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Spatial attention map of Zagoruyko and Komodakis: ``sum_c F_c^2``, flattened, L2-normalised.

    For hidden states ``(N, T, D)`` the map is over tokens (padding zeroed by ``mask``).

    Shape:
        ``(N, C, H, W)`` -> ``(N, H*W)``; ``(N, T, D)`` -> ``(N, T)``.
    """
    if feature.ndim == 4:
        a = feature.pow(2).sum(1).flatten(1)
    elif feature.ndim == 3:
        a = feature.pow(2).sum(-1)
        if mask is not None:
            a = a * mask.to(a.dtype)
    else:
        raise ModelError("attention transfer needs (N, C, H, W) or (N, T, D) features, "
                         f"got shape {tuple(feature.shape)}")
    return F.normalize(a, dim=1)


def attention_transfer(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``mean_n || a_s - a_t ||_2^2`` of normalised attention maps (Zagoruyko and Komodakis 2017)."""
    if student.ndim == 4 and teacher.ndim == 4:
        student, teacher = align_spatial(student, teacher)
    s, t = attention_map(student, mask), attention_map(teacher, mask)
    if s.shape != t.shape:
        raise ModelError(f"attention maps differ: student {tuple(s.shape)} vs teacher {tuple(t.shape)}; "
                         "pair layers with the same number of positions")
    return (s - t).pow(2).sum(1).mean()


def attention_kl(student_probs: torch.Tensor, teacher_probs: torch.Tensor, mask: torch.Tensor | None = None,
                 eps: float = 1e-8) -> torch.Tensor:
    """MiniLM self-attention transfer: ``KL(A_t || A_s)`` per query row, averaged over heads and the
    queries that are not padding.

    Shape:
        Both ``(N, H, T, T)`` attention probabilities (heads may differ; they are averaged first then);
        ``mask`` ``(N, T)``.
    """
    if student_probs.shape[1] != teacher_probs.shape[1]:
        student_probs = student_probs.mean(1, keepdim=True)
        teacher_probs = teacher_probs.mean(1, keepdim=True)
    kl = (teacher_probs * ((teacher_probs + eps).log() - (student_probs + eps).log())).sum(-1)  # (N, H, T)
    if mask is not None:
        m = mask.to(kl.dtype)[:, None, :]
        return (kl * m).sum() / (m.sum() * kl.shape[1]).clamp_min(1.0)
    return kl.mean()


def make_projection(student: torch.Tensor, teacher: torch.Tensor) -> nn.Module | None:
    """A learned regressor (FitNets) mapping the student's feature width to the teacher's, or None when
    the widths already agree: a 1x1 convolution for ``(N, C, H, W)`` maps, a Linear otherwise."""
    if student.ndim != teacher.ndim:
        raise ModelError(
            f"feature ranks differ: student {tuple(student.shape)} vs teacher {tuple(teacher.shape)}; "
            "pair layers of the same kind"
        )
    if student.ndim == 4:
        cs, ct = student.shape[1], teacher.shape[1]
        return None if cs == ct else nn.Conv2d(cs, ct, 1, bias=False)
    ds, dt = student.shape[-1], teacher.shape[-1]
    return None if ds == dt else nn.Linear(ds, dt, bias=False)


def align_spatial(student: torch.Tensor, teacher: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pool the larger of two ``(N, C, H, W)`` maps to the other's spatial size."""
    if student.ndim != 4 or student.shape[-2:] == teacher.shape[-2:]:
        return student, teacher
    if student.shape[-1] > teacher.shape[-1]:
        return F.adaptive_avg_pool2d(student, (teacher.shape[-2], teacher.shape[-1])), teacher
    return student, F.adaptive_avg_pool2d(teacher, (student.shape[-2], student.shape[-1]))
