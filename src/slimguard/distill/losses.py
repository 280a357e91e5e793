"""Distillation losses: soft and hard targets, label mixing, feature matching, attention transfer,
embedding matching, and the per-token losses of causal language models.

All functions take batched tensors and return a scalar (mean over the batch; for causal LMs, over the
predicted tokens that are not padding).

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


def _next_token_mask(shape: torch.Size, mask: torch.Tensor | None) -> torch.Tensor | None:
    """``(N, L-1)`` mask of the predictions that count: position ``t`` predicts token ``t + 1``, so both must
    be real tokens (a right- or left-padded batch loses its padding and the prediction made at a last token)."""
    if mask is None:
        return None
    if tuple(mask.shape) != tuple(shape[:2]):
        raise ModelError(f"attention mask of shape {tuple(mask.shape)} does not match logits {tuple(shape)}; "
                         "give the mask of the same (N, L) batch")
    m = mask.bool()
    return m[:, :-1] & m[:, 1:]


def _token_mean(per_token: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    if valid is None:
        return per_token.mean()
    v = valid.to(per_token.dtype)
    return (per_token * v).sum() / v.sum().clamp_min(1.0)


def next_token_ce(logits: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Causal-LM cross-entropy: the logits at position ``t`` against token ``t + 1``, averaged over the
    predicted tokens (padding excluded by ``mask``). ``exp`` of it is the batch's perplexity.

    Shape:
        logits ``(N, L, V)``, input_ids ``(N, L)``, mask ``(N, L)`` (1 = real token); returns a scalar.

    Example:
        >>> next_token_ce(torch.zeros(1, 3, 5), torch.tensor([[0, 1, 2]]))  # uniform over 5: log 5
        tensor(1.6094)
    """
    if logits.ndim != 3 or tuple(input_ids.shape) != tuple(logits.shape[:2]):
        raise ModelError(f"next-token loss needs (N, L, V) logits for (N, L) tokens; got logits "
                         f"{tuple(logits.shape)} for tokens {tuple(input_ids.shape)}")
    pred, target = logits[:, :-1].float(), input_ids[:, 1:]
    per = F.cross_entropy(pred.reshape(-1, pred.shape[-1]), target.reshape(-1), reduction="none")
    return _token_mean(per.view(target.shape), _next_token_mask(logits.shape, mask))


def causal_lm_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor | None = None,
                 temperature: float = 1.0) -> torch.Tensor:
    """``T^2 * KL(softmax(t / T) || softmax(s / T))`` of the next-token distributions, at every position
    that predicts a real token (the last position and padding excluded, as in :func:`next_token_ce`),
    averaged over those tokens.

    Shape:
        Both ``(N, L, V)`` logits, mask ``(N, L)``; returns a scalar.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if student_logits.shape != teacher_logits.shape or student_logits.ndim != 3:
        raise ModelError(f"token logits differ: student {tuple(student_logits.shape)} vs teacher "
                         f"{tuple(teacher_logits.shape)}; both must be (N, L, vocab) for the same tokens")
    log_p_s = F.log_softmax(student_logits[:, :-1].float() / temperature, dim=-1)
    log_p_t = F.log_softmax(teacher_logits[:, :-1].float() / temperature, dim=-1)
    per = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1)  # (N, L-1)
    return _token_mean(per, _next_token_mask(student_logits.shape, mask)) * temperature**2


def causal_lm_kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, input_ids: torch.Tensor,
                      mask: torch.Tensor | None = None, *, temperature: float = 1.0, alpha: float = 0.9,
                      targets: str = "soft") -> torch.Tensor:
    """``alpha * teacher term + (1 - alpha) * next-token CE`` for a causal LM: the teacher term is
    :func:`causal_lm_kl` at ``temperature`` (``soft``) or the cross-entropy against the teacher's argmax token
    at every position (``hard``); the data's own next tokens are the "labels".

    Shape:
        logits ``(N, L, V)``, input_ids and mask ``(N, L)``; returns a scalar.
    """
    parts = []
    if alpha > 0:
        if targets == "soft":
            teach = causal_lm_kl(student_logits, teacher_logits, mask, temperature)
        else:
            pred, target = student_logits[:, :-1].float(), teacher_logits[:, :-1].argmax(-1)
            per = F.cross_entropy(pred.reshape(-1, pred.shape[-1]), target.reshape(-1), reduction="none")
            teach = _token_mean(per.view(target.shape), _next_token_mask(student_logits.shape, mask))
        parts.append(alpha * teach)
    if alpha < 1:
        parts.append((1.0 - alpha) * next_token_ce(student_logits, input_ids, mask))
    return sum(parts[1:], parts[0])


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
