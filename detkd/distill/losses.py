"""Loss pieces shared by several methods: temperature-softened KL(teacher || student) over a softmax or per
class sigmoid, per-channel standardisation (PKD, CrossKD), and a zero connected to the autograd graph (empty
batches under DDP)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def softmax_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """Per row KL(p_t || p_s) of temperature-softened softmaxes, times T^2 (Hinton et al. 2015, Sec. 2:
    the T^2 keeps gradient magnitudes comparable across temperatures). (R, K) -> (R,), float32."""
    log_ps = F.log_softmax(student_logits.float() / temperature, dim=1)
    log_pt = F.log_softmax(teacher_logits.detach().float() / temperature, dim=1)
    return (log_pt.exp() * (log_pt - log_ps)).sum(dim=1) * temperature**2


def sigmoid_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """Element-wise binary KL(p_t || p_s) of temperature-softened sigmoids, times T^2 (the per-class
    Bernoulli form of KD for sigmoid classifiers such as RetinaNet and FCOS). Same shape as the inputs."""
    xs = student_logits.float() / temperature
    xt = teacher_logits.detach().float() / temperature
    pt = torch.sigmoid(xt)
    # log p = logsigmoid(x), log(1 - p) = logsigmoid(-x): finite for any finite logit
    kl = pt * (F.logsigmoid(xt) - F.logsigmoid(xs)) + (1 - pt) * (F.logsigmoid(-xt) - F.logsigmoid(-xs))
    return kl * temperature**2


def graph_zero(tensors: list[Tensor]) -> Tensor:
    """A float32 scalar 0 that depends on ``tensors``, so every parameter upstream still gets a (zero)
    gradient: DistributedDataParallel expects the same parameters to be used on every step."""
    total = tensors[0].new_zeros((), dtype=torch.float32)
    for t in tensors:
        total = total + t.float().sum() * 0.0
    return total


def standardize(x: Tensor, stats: str = "instance", eps: float = 1e-6) -> Tensor:
    """(N, C, H, W) -> the same shape, each channel at zero mean and unit variance.

    ``instance``: statistics over H x W per image and channel, population variance (divide by H W).
    ``batch``: statistics over N x H x W per channel, Bessel-corrected (divide by N H W - 1; by N H W when
    that is 1), as the authors' code. Both divide by ``sqrt(var + eps^2)``."""
    x = x.float()
    dims = (2, 3) if stats == "instance" else (0, 2, 3)
    count = 1
    for d in dims:
        count *= x.shape[d]
    correction = 1 if (stats == "batch" and count > 1) else 0
    mean = x.mean(dim=dims, keepdim=True)
    # eps inside the root: sqrt has an infinite slope at 0, so a 1x1 level would send a NaN gradient through
    # std + eps; sqrt(var + eps^2) gives it 0 and a zero gradient instead (a constant channel over several
    # positions still gets a finite gradient of order 1/eps, as with the authors' std + eps)
    std = (x.var(dim=dims, keepdim=True, correction=correction) + eps * eps).sqrt()
    return (x - mean) / std
