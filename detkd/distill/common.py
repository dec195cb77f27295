"""Small pieces shared by the feature and logit distillers.

- :func:`build_adapters`: per-level convolutions mapping student channels to teacher channels.
- :func:`resolve_adapter`: the ``auto`` adapter kind (identity where the widths agree, else a 1x1 conv).
- :func:`select_levels`: the pyramid levels a feature distiller works on (default: all but Faster R-CNN's
  max-pooled ``pool`` level).
- :func:`check_pyramids` / :func:`check_adapters`: teacher, student and adapters agree on the levels.
- :func:`box_masks` / :func:`box_mask` / :func:`weighted_box_mask`: boxes rasterised on the pyramid levels
  (DeFeat-style masks; the weighted one keeps the largest per-box weight of each cell).
- :func:`grid_anchors` / :func:`level_anchors` / :func:`imitation_masks`: FGFI near-object anchor masks.
- :func:`softmax_kl` / :func:`sigmoid_kl`: temperature-softened KL(teacher || student).
- :func:`check_logits`: the teacher's and the student's classification outputs exist and agree.
- :func:`graph_zero`: a zero that stays connected to the autograd graph (empty batches under DDP).

Everything works on :class:`~detkd.taps.Taps` in the transformed frame: feature cell ``(i, j)`` of a
level with stride ``s`` covers the pixels ``[j s, (j + 1) s) x [i s, (i + 1) s)`` of the padded batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import box_iou

from detkd.config import ConfigError
from detkd.distill.base import range_error
from detkd.taps import Taps

ADAPTER_KINDS = ("conv1x1", "conv3x3", "identity")


def build_adapters(student_channels: list[int], teacher_channels: list[int], kind: str = "conv1x1",
                   relu: bool = False, where: str = "adapter") -> nn.ModuleList:
    """One adapter per pyramid level mapping student channels to teacher channels.

    ``kind``: ``conv1x1`` / ``conv3x3`` (a convolution with bias, PyTorch's default initialisation, padding
    that keeps the map size) or ``identity`` (only when the widths agree). ``relu`` appends a ReLU (the FGFI
    authors used conv3x3 + ReLU on post-ReLU VGG features; FPN outputs are signed, so it is off by default).
    """
    if len(student_channels) != len(teacher_channels):
        raise ConfigError(
            f"{where}: student has {len(student_channels)} pyramid levels, teacher {len(teacher_channels)}; "
            "feature distillation needs the same levels in both detectors"
        )
    if kind not in ADAPTER_KINDS:
        raise ConfigError(f"{where}: adapter {kind!r} is not one of {', '.join(ADAPTER_KINDS)}")
    adapters = []
    for level, (cs, ct) in enumerate(zip(student_channels, teacher_channels)):
        if kind == "identity":
            if cs != ct:
                raise ConfigError(
                    f"{where}: adapter 'identity' needs equal widths, level {level} has student {cs} and "
                    f"teacher {ct} channels (use conv1x1 or conv3x3)"
                )
            layers: list[nn.Module] = [nn.Identity()]
        else:
            k = 1 if kind == "conv1x1" else 3
            conv = nn.Conv2d(cs, ct, kernel_size=k, padding=k // 2)
            nn.init.zeros_(conv.bias)
            layers = [conv]
        if relu:
            layers.append(nn.ReLU())
        adapters.append(nn.Sequential(*layers))
    return nn.ModuleList(adapters)


def resolve_adapter(kind: str, student_channels: list[int], teacher_channels: list[int]) -> str:
    """``auto`` -> ``identity`` when every level has the same width in both detectors, else ``conv1x1``
    (the PKD / CWD / MGD authors align only when the widths differ); other kinds are returned as given."""
    if kind != "auto":
        return kind
    return "identity" if list(student_channels) == list(teacher_channels) else "conv1x1"


def level_adapters(levels: list[int], kind: str, teacher_channels: list[int], student_channels: list[int],
                   arch: str, method: str) -> tuple[list[int], nn.ModuleList]:
    """The levels a feature method uses (:func:`select_levels`) and one adapter per used level
    (:func:`resolve_adapter` + :func:`build_adapters`); errors name ``{method}.options.levels`` / ``.adapter``."""
    used = select_levels(levels, len(student_channels), arch, f"{method}.options.levels")
    sc = [student_channels[i] for i in used]
    tc = [teacher_channels[i] for i in used]
    return used, build_adapters(sc, tc, resolve_adapter(kind, sc, tc), where=f"{method}.options.adapter")


def select_levels(levels: list[int], num_levels: int, arch: str, where: str) -> list[int]:
    """The pyramid indices a feature distiller uses: ``levels`` when given (distinct, in range), else every
    level except Faster R-CNN's last one: torchvision's ``pool`` is P5 max-pooled for the RPN, with no conv
    of its own, and the authors of FGD, PKD, CWD and MGD distil the four FPN output convs P2-P5."""
    if levels:
        if any(not 0 <= i < num_levels for i in levels) or len(set(levels)) != len(levels):
            raise range_error(where, f"distinct indices in [0, {num_levels - 1}]", list(levels))
        return list(levels)
    if arch == "faster_rcnn" and num_levels > 1:
        return list(range(num_levels - 1))
    return list(range(num_levels))


def check_levels(levels: list[int], teacher: Taps, student: Taps, method: str) -> None:
    """Both pyramids have the same levels, the chosen ``levels`` exist, and their maps agree in size."""
    check_pyramids(teacher, student, method)
    if levels and max(levels) >= len(student.features):
        raise ValueError(
            f"{method}: built for levels {levels}, the student taps have {len(student.features)} "
            f"({student.level_names})"
        )


def check_pyramids(teacher: Taps, student: Taps, method: str) -> None:
    """Raise a clear error unless both pyramids have the same number of levels and map sizes."""
    nt, ns = len(teacher.features), len(student.features)
    if nt != ns:
        raise ValueError(
            f"{method}: teacher has {nt} pyramid levels ({teacher.level_names}), student {ns} "
            f"({student.level_names}); feature distillation needs the same levels"
        )
    for level, (ft, fs) in enumerate(zip(teacher.features, student.features)):
        if ft.shape[0] != fs.shape[0] or ft.shape[-2:] != fs.shape[-2:]:
            raise ValueError(
                f"{method}: level {level} ({student.level_names[level]}) teacher map {tuple(ft.shape)} and "
                f"student map {tuple(fs.shape)} differ in batch or spatial size"
            )


def check_adapters(adapters: nn.ModuleList, student: Taps, method: str) -> None:
    """The pyramid of the batch must have as many levels as the adapters were built for."""
    if len(adapters) != len(student.features):
        raise ValueError(
            f"{method}: built for {len(adapters)} pyramid levels, the student taps have "
            f"{len(student.features)} ({student.level_names})"
        )


def check_logits(teacher: Taps, student: Taps, field: str, request: str, method: str) -> tuple[Tensor, Tensor]:
    """The (student, teacher) logits ``field`` of the taps (``class_logits`` / ``cls_logits``), with a clear
    error when either is missing (``request``: the :class:`~detkd.taps.TapRequest` flag that provides the
    teacher's) or their shapes differ."""
    zs, zt = getattr(student, field), getattr(teacher, field)
    if zs is None:
        raise ValueError(f"{method}: the student taps have no {field}")
    if zt is None:
        raise ValueError(f"{method}: the teacher taps have no {field}; request {request}=True")
    if zt.shape != zs.shape:
        raise ValueError(f"{method}: teacher {field} {tuple(zt.shape)} != student {tuple(zs.shape)}")
    return zs, zt


def graph_zero(tensors: list[Tensor]) -> Tensor:
    """A float32 scalar 0 that depends on ``tensors``, so every parameter upstream still gets a (zero)
    gradient: DistributedDataParallel expects the same parameters to be used on every step."""
    total = tensors[0].new_zeros((), dtype=torch.float32)
    for t in tensors:
        total = total + t.float().sum() * 0.0
    return total


# ----------------------------------------------------------------------------------------------------------
# Ground-truth masks


def box_cell_ranges(boxes: Tensor, height: int, width: int,
                    stride: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The cells each of ``boxes`` (M, 4) covers on a level of stride ``stride``: columns ``x0 .. x1 - 1`` and
    rows ``y0 .. y1 - 1`` as float (M,) tensors.

    The start is floored and the end ceiled (``floor(x1 / s) .. ceil(x2 / s) - 1``), clamped to the map, and
    every box covers at least one cell, so even a box smaller than a cell marks the cell it falls in.
    """
    b = boxes.detach().float() / stride
    x0 = b[:, 0].floor().clamp(0, width - 1)
    y0 = b[:, 1].floor().clamp(0, height - 1)
    x1 = torch.maximum(b[:, 2].ceil().clamp(max=width), x0 + 1)
    y1 = torch.maximum(b[:, 3].ceil().clamp(max=height), y0 + 1)
    return x0, y0, x1, y1


def box_cells(boxes: Tensor, height: int, width: int, stride: float) -> Tensor:
    """(M, height, width) bool: the cells of one level each box covers (:func:`box_cell_ranges`)."""
    x0, y0, x1, y1 = box_cell_ranges(boxes, height, width, stride)
    cols = torch.arange(width, device=boxes.device, dtype=torch.float32)
    rows = torch.arange(height, device=boxes.device, dtype=torch.float32)
    in_x = (cols[None, :] >= x0[:, None]) & (cols[None, :] < x1[:, None])  # (M, W)
    in_y = (rows[None, :] >= y0[:, None]) & (rows[None, :] < y1[:, None])  # (M, H)
    return in_y[:, :, None] & in_x[:, None, :]


def box_mask(boxes: Tensor, height: int, width: int, stride: float) -> Tensor:
    """(height, width) float 0/1 map of the cells of one level that overlap any of ``boxes`` (M, 4)
    (cells as :func:`box_cell_ranges`)."""
    if boxes.numel() == 0:
        return torch.zeros((height, width), dtype=torch.float32, device=boxes.device)
    return box_cells(boxes, height, width, stride).any(dim=0).float()


def weighted_box_mask(boxes: Tensor, weights: Tensor, height: int, width: int,
                      stride: float) -> tuple[Tensor, Tensor]:
    """Per-box weighted :func:`box_mask`: the (height, width) float map of the largest of ``weights`` (M,)
    over the boxes covering each cell (0 where none does; the weights are taken as constants) and the
    (height, width) bool coverage, which also holds the cells of zero-weight boxes."""
    if boxes.numel() == 0:
        mask = torch.zeros((height, width), dtype=torch.float32, device=boxes.device)
        return mask, mask.bool()
    inside = box_cells(boxes, height, width, stride)
    weighted = (inside.float() * weights.detach().float()[:, None, None]).amax(dim=0)
    return weighted, inside.any(dim=0)


def box_masks(taps: Taps, boxes: list[Tensor]) -> list[Tensor]:
    """Per level, (N, 1, H, W) 0/1 masks of the per-image ``boxes`` (transformed frame) on that level."""
    masks = []
    for feat, stride in zip(taps.features, taps.strides):
        h, w = feat.shape[-2:]
        masks.append(torch.stack([box_mask(b, h, w, stride) for b in boxes])[:, None])
    return masks


# ----------------------------------------------------------------------------------------------------------
# Anchors and the FGFI imitation mask


def grid_anchors(height: int, width: int, stride: float, sizes: list[float], aspect_ratios: list[float],
                 device: torch.device | str = "cpu") -> Tensor:
    """Anchors of one level as (height * width * A, 4) xyxy, location-major: the layout and the rounding of
    torchvision's ``AnchorGenerator`` (A = len(sizes) * len(aspect_ratios), aspect ratio = h / w)."""
    scales = torch.as_tensor(sizes, dtype=torch.float32, device=device)
    ratios = torch.as_tensor(aspect_ratios, dtype=torch.float32, device=device)
    h_ratios = torch.sqrt(ratios)
    w_ratios = 1.0 / h_ratios
    ws = (w_ratios[:, None] * scales[None, :]).reshape(-1)
    hs = (h_ratios[:, None] * scales[None, :]).reshape(-1)
    base = (torch.stack([-ws, -hs, ws, hs], dim=1) / 2).round()  # (A, 4) centred on 0
    xs = torch.arange(width, dtype=torch.float32, device=device) * stride
    ys = torch.arange(height, dtype=torch.float32, device=device) * stride
    sy, sx = torch.meshgrid(ys, xs, indexing="ij")
    shifts = torch.stack([sx, sy, sx, sy], dim=-1).reshape(-1, 1, 4)
    return (shifts + base[None]).reshape(-1, 4)


def level_anchors(taps: Taps, image: int, sizes: list[float] | None = None,
                  aspect_ratios: tuple[float, ...] | list[float] = (0.5, 1.0, 2.0)) -> list[Tensor]:
    """Anchors of image ``image`` per level as (H * W, A_l, 4).

    Uses ``taps.anchors`` split by ``taps.num_anchors_per_level`` when the taps carry them (RetinaNet, FCOS,
    and Faster R-CNN if the taps record the RPN anchors); otherwise generates them with
    :func:`grid_anchors` from ``sizes`` (one per level; ``None`` = 8 x stride, torchvision's Faster R-CNN
    default 32..512 on strides 4..64) and ``aspect_ratios``.
    """
    shapes = [tuple(f.shape[-2:]) for f in taps.features]
    out = []
    if taps.anchors is not None:
        if taps.num_anchors_per_level is None or len(taps.num_anchors_per_level) != len(shapes):
            raise ValueError(
                f"taps.num_anchors_per_level {taps.num_anchors_per_level} does not give one count per "
                f"pyramid level ({len(shapes)} levels)"
            )
        chunks = taps.anchors[image].split(list(taps.num_anchors_per_level))
        for level, (chunk, (h, w)) in enumerate(zip(chunks, shapes)):
            if chunk.shape[0] % (h * w) != 0:
                raise ValueError(
                    f"taps.anchors level {level}: {chunk.shape[0]} anchors is not a multiple of the "
                    f"{h}x{w} feature map"
                )
            out.append(chunk.reshape(h * w, -1, 4))
        return out
    if sizes is not None and len(sizes) != len(shapes):
        raise ValueError(f"anchor sizes {list(sizes)} must give one size per pyramid level ({len(shapes)})")
    device = taps.features[0].device
    for level, ((h, w), stride) in enumerate(zip(shapes, taps.strides)):
        size = 8.0 * stride if sizes is None else float(sizes[level])
        out.append(grid_anchors(h, w, stride, [size], list(aspect_ratios), device).reshape(h * w, -1, 4))
    return out


def imitation_mask_batch(taps: Taps, factor: float = 0.5, sizes: list[float] | None = None,
                         aspect_ratios: tuple[float, ...] | list[float] = (0.5, 1.0, 2.0)) -> list[Tensor]:
    """Per level, the (N, H, W) float 0/1 FGFI imitation masks (:func:`imitation_masks`) of the batch's
    images, from their ground-truth boxes and the anchors of :func:`level_anchors`."""
    shapes = [tuple(f.shape[-2:]) for f in taps.features]
    per_image = [imitation_masks(level_anchors(taps, i, sizes, aspect_ratios), shapes, t["boxes"], factor)
                 for i, t in enumerate(taps.targets)]
    return [torch.stack([m[level] for m in per_image]) for level in range(len(shapes))]


def imitation_masks(anchors: list[Tensor], shapes: list[tuple[int, int]], boxes: Tensor,
                    factor: float = 0.5) -> list[Tensor]:
    """FGFI near-object imitation mask of one image, per level (H, W) float 0/1 (Wang et al., CVPR 2019,
    Sec. 3.1).

    For every ground-truth box: the IoU with every anchor of every level, its maximum ``m`` over all
    anchors, and the threshold ``factor * m``; a location is in the mask when any of its anchors reaches
    the threshold of any box. With one level this is the paper's per-image IoU map; with a pyramid the
    maximum is taken over all the detector's anchors, so each box marks the locations of the levels whose
    anchors fit it. Boxes no anchor overlaps (max IoU 0) mark nothing.
    """
    masks = [torch.zeros(shape, dtype=torch.float32, device=boxes.device) for shape in shapes]
    if boxes.shape[0] == 0:
        return masks
    gt = boxes.detach().float()
    ious = [box_iou(a.reshape(-1, 4).float(), gt).reshape(a.shape[0], a.shape[1], -1) for a in anchors]
    best = torch.stack([iou.amax(dim=(0, 1)) for iou in ious]).amax(dim=0)  # (M,)
    thresh = factor * best
    valid = best > 0
    for level, iou in enumerate(ious):
        hit = (iou >= thresh) & valid  # (HW, A, M)
        masks[level] = hit.any(dim=2).any(dim=1).float().reshape(shapes[level])
    return masks


# ----------------------------------------------------------------------------------------------------------
# Softened KL divergences


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
