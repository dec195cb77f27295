"""Dense heads layer by layer (CrossKD: the teacher's head continues from the student's head features).

torchvision's RetinaNet and FCOS heads have two subnets (classification, regression), each a ``conv``
tower of blocks [Conv2d, optional norm, ReLU] (RetinaNet: Conv2dNormActivation blocks; FCOS: one flat
Sequential) and predictor convs, applied to every pyramid level with shared weights. The walk below
runs the same modules in the same order as ``head.forward`` and records a block's output before its
activation; the activation is then applied out of place so that the recorded tensor survives (the
RetinaNet blocks' ReLU is in place). :mod:`detkd.taps` calls it when a request names a ``head_layer``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detkd.models.build import detector_arch

_NORMS = (nn.GroupNorm, nn.BatchNorm2d, nn.SyncBatchNorm, nn.LayerNorm)


def head_blocks(subnet: nn.Module) -> list[tuple[list[nn.Module], nn.Module | None]]:
    """The conv tower of a RetinaNet / FCOS head subnet as blocks ``(body, activation)``: body = the conv
    and its norm, activation = the block's last module (None when the block ends with a conv or norm)."""
    leaves: list[nn.Module] = []
    for m in subnet.conv.children():
        leaves.extend(m.children() if isinstance(m, nn.Sequential) else [m])
    blocks: list[list[nn.Module]] = []
    for m in leaves:
        if isinstance(m, nn.Conv2d) or not blocks:
            blocks.append([m])
        else:
            blocks[-1].append(m)
    out = []
    for b in blocks:
        last = b[-1]
        if len(b) > 1 and not isinstance(last, (nn.Conv2d, *_NORMS)):
            out.append((b[:-1], last))
        else:
            out.append((b, None))
    return out


def head_depth(model: nn.Module) -> int:
    """Conv blocks in each subnet tower of a RetinaNet / FCOS head (4 for torchvision's)."""
    return len(head_blocks(model.head.classification_head))


def _activate(act: nn.Module | None, x: Tensor) -> Tensor:
    if act is None:
        return x
    if isinstance(act, nn.ReLU):
        return F.relu(x)  # out of place: x may be a recorded pre-activation feature
    return act(x.clone()) if getattr(act, "inplace", False) else act(x)


def _tower(blocks: list[tuple[list[nn.Module], nn.Module | None]], x: Tensor, start: int,
           record: int = -1) -> tuple[Tensor, Tensor | None]:
    """Blocks ``start..`` on ``x``; also returns the output of block ``record`` (1-based) before its
    activation (``record == 0``: ``x`` itself)."""
    kept = x if record == 0 else None
    for j in range(start, len(blocks)):
        body, act = blocks[j]
        for m in body:
            x = m(x)
        if j + 1 == record:
            kept = x
        x = _activate(act, x)
    return x, kept


def _flatten(out: Tensor, k: int) -> Tensor:
    # (N, A * K, H, W) -> (N, H W A, K), as the torchvision heads do
    n, _, h, w = out.shape
    return out.view(n, -1, k, h, w).permute(0, 3, 4, 1, 2).reshape(n, -1, k)


def _predict(model: nn.Module, cls_x: Tensor, reg_x: Tensor) -> dict[str, Tensor]:
    """One level's head outputs from the two towers' last features (the predictor convs)."""
    cls_head, reg_head = model.head.classification_head, model.head.regression_head
    out = {"cls_logits": _flatten(cls_head.cls_logits(cls_x), cls_head.num_classes)}
    if detector_arch(model) == "fcos":
        out["bbox_regression"] = _flatten(F.relu(reg_head.bbox_reg(reg_x)), 4)
        out["bbox_ctrness"] = _flatten(reg_head.bbox_ctrness(reg_x), 1)
    else:
        out["bbox_regression"] = _flatten(reg_head.bbox_reg(reg_x), 4)
    return out


def _cat_levels(per_level: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    return {k: torch.cat([o[k] for o in per_level], dim=1) for k in per_level[0]}


def _check_layer(model: nn.Module, layer: int) -> None:
    depth = head_depth(model)
    if not 0 <= layer <= depth:
        raise ValueError(f"head layer {layer} is outside 0..{depth} (the head's conv blocks per subnet)")


def run_head(model: nn.Module, features: list[Tensor], layer: int
             ) -> tuple[dict[str, Tensor], list[Tensor], list[Tensor]]:
    """A RetinaNet / FCOS head on the pyramid ``features``, the same outputs as ``model.head(features)``,
    and per level the classification and regression towers' features after conv block ``layer``
    (1-based) before its activation (``layer == 0``: the pyramid features themselves)."""
    _check_layer(model, layer)
    cls_blocks = head_blocks(model.head.classification_head)
    reg_blocks = head_blocks(model.head.regression_head)
    outs, cls_mid, reg_mid = [], [], []
    for f in features:
        cls_x, c = _tower(cls_blocks, f, 0, layer)
        reg_x, r = _tower(reg_blocks, f, 0, layer)
        outs.append(_predict(model, cls_x, reg_x))
        cls_mid.append(c)
        reg_mid.append(r)
    return _cat_levels(outs), cls_mid, reg_mid


def head_tail(model: nn.Module, layer: int) -> Callable[[list[Tensor], list[Tensor]], dict[str, Tensor]]:
    """A function that runs ``model``'s head from block ``layer`` on: per level, the activation of block
    ``layer`` (none for ``layer == 0``), the remaining blocks and the predictors, on given classification
    and regression tower features (those :func:`run_head` records). In eval mode; no ``no_grad``: with a
    frozen model the gradient reaches the given features and nothing in ``model``."""
    _check_layer(model, layer)
    cls_blocks = head_blocks(model.head.classification_head)
    reg_blocks = head_blocks(model.head.regression_head)
    act_c = cls_blocks[layer - 1][1] if layer > 0 else None
    act_r = reg_blocks[layer - 1][1] if layer > 0 else None

    def run(cls_features: list[Tensor], reg_features: list[Tensor]) -> dict[str, Tensor]:
        modes = [(m, m.training) for m in model.modules()]
        model.eval()
        try:
            outs = []
            for c, r in zip(cls_features, reg_features):
                cls_x, _ = _tower(cls_blocks, _activate(act_c, c), layer)
                reg_x, _ = _tower(reg_blocks, _activate(act_r, r), layer)
                outs.append(_predict(model, cls_x, reg_x))
        finally:
            for m, training in modes:
                m.training = training
        return _cat_levels(outs)

    return run
