"""Drawing shared by the commands: labelled detection boxes on an image (``detkd predict``, the detection
grids of ``detkd analyze detections``) and the label font (those and the prototype galleries)."""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

TP_COLOR = (0, 170, 0)
FP_COLOR = (230, 0, 0)
GT_COLOR = (0, 90, 255)


def label_font(size: int = 12):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has no size argument
        return ImageFont.load_default()


def draw_detections(
    image: Image.Image,
    boxes: Tensor,
    labels: Tensor,
    scores: Tensor | None = None,
    *,
    class_names: dict[int, str] | None = None,
    colors: Sequence[tuple[int, int, int]] | None = None,
    scale: float = 1.0,
    width: int = 2,
) -> Image.Image:
    """A copy of ``image`` with ``boxes`` (M, 4) xyxy (times ``scale``) outlined, each labelled with its class
    name (``class_names`` id -> name, else the id) and, when given, score. ``colors``: one RGB per box
    (default red)."""
    out = image.convert("RGB").copy()
    draw = ImageDraw.Draw(out)
    font = label_font(11)
    names = class_names or {}
    for j, (box, lab) in enumerate(zip(boxes.tolist(), labels.tolist())):
        color = tuple(colors[j]) if colors is not None else FP_COLOR
        x0, y0, x1, y1 = (v * scale for v in box)
        draw.rectangle((x0, y0, max(x1, x0 + 1), max(y1, y0 + 1)), outline=color, width=width)
        text = names.get(int(lab), str(int(lab)))
        if scores is not None:
            text = f"{text} {float(scores[j]):.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        tw, th = right - left, bottom - top
        ty = y0 - th - 3 if y0 - th - 3 >= 0 else y0 + 1
        draw.rectangle((x0, ty, x0 + tw + 4, ty + th + 3), fill=color)
        draw.text((x0 + 2 - left, ty + 1 - top), text, fill=(255, 255, 255), font=font)
    return out
