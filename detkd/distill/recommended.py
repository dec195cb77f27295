"""Which method to use: what detkd's converged benches recommend, per detector family.

A recommendation rests on ``detkd bench configs/bench/converged_*.yaml`` (students started from pretrained
backbones and trained to their plateau, benchmarks/RESULTS.md, "Converged"): the method with the largest
gain over the student alone, paired by seed, whose 95% interval over at least three seeds excludes zero.
Where no method's interval does, the family gets no recommendation. The options are the ones its bench row
used. RetinaNet has no converged bench of its own (its digits teacher does not reach the bench's target,
RESULTS.md); FCOS's recommendation, the nearest one-stage evidence, is given for it and says so.

``detkd methods`` marks the recommended methods and ``detkd methods NAME`` prints the evidence, and, for a
method that is not recommended, the best options its converged rows found (``BEST_OPTIONS``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Recommendation:
    archs: tuple[str, ...]  # the student's detector families it is for
    method: str  # registry name
    options: dict[str, Any] = field(default_factory=dict)  # the method's options, as the bench row set them
    evidence: str = ""  # the bench, the seeds and the paired gain behind it, in one line


RECOMMENDED: tuple[Recommendation, ...] = (
    Recommendation(
        ("fcos", "retinanet"), "defeat", {},
        "converged FCOS bench (configs/bench/converged_fcos.yaml: R34 teacher 0.599 -> MobileNetV3-Large "
        "student 0.461 alone), 5 seeds: +4.2 mAP [+3.3, +5.1], 31% of the gap; next PKD +3.6 [+1.8, +5.4] on "
        "3 seeds; RetinaNet: the nearest one-stage evidence, not measured on its own",
    ),
    Recommendation(
        ("faster_rcnn",), "gid", {},
        "converged Faster R-CNN bench (configs/bench/converged_faster_rcnn.yaml: R34 teacher 0.695 -> "
        "MobileNetV3-Large student 0.620 alone), 5 seeds: +2.1 mAP [+1.4, +2.7], 27% of the gap; next FGFI "
        "+1.9 [+1.1, +2.7] on 5 seeds; on a second CPU type (AMD EPYC) first again, 3 seeds: +1.6 [+1.2, +2.0], "
        "ahead of MGD +1.1 [+0.8, +1.3]; on twice the schedule (24 epochs, 3 seeds) +2.7 [+1.4, +3.9], 35% of the "
        "gap, while the student alone gains 0.2",
    ),
)


# The options the converged benches found best for a method that is not its family's recommendation, so that a
# user who wants that method anyway starts from them (``detkd methods NAME`` prints them with their evidence).
BEST_OPTIONS: tuple[Recommendation, ...] = (
    Recommendation(
        ("fcos", "retinanet"), "global", {"adapter": "conv3x3", "feat_loss": "defeat", "use_resp": False},
        "converged FCOS bench (configs/bench/converged_fcos.yaml, AMD EPYC), 3 seeds: +4.0 mAP [+2.2, +5.8], "
        "level with DeFeat on the same seeds (+4.3), against +1.5 [-1.0, +4.1] with the paper's defaults: Eq. 7 "
        "on the whole map through a linear 3x3 adapter, no response term; RetinaNet: the nearest one-stage "
        "evidence, not measured on its own",
    ),
    Recommendation(
        ("faster_rcnn",), "global", {"use_feat": False, "use_resp": False},
        "converged Faster R-CNN bench (configs/bench/converged_faster_rcnn.yaml), 3 seeds: +0.5 mAP [-0.6, +1.6], "
        "no gain shown, against -2.2 [-5.7, +1.3] with the paper's defaults (the relation term alone: the local "
        "terms cost the student its localisation); GID is the recommendation",
    ),
)


def recommendations(method: str | None = None) -> list[Recommendation]:
    """The recommendations, or those of one method."""
    return [r for r in RECOMMENDED if method is None or r.method == method]


def best_options(method: str) -> list[Recommendation]:
    """The best options found for ``method`` per family where it is not the recommended method."""
    return [r for r in BEST_OPTIONS if r.method == method]


def as_config(rec: Recommendation) -> str:
    """The ``distill.methods`` entry in YAML flow style, as a user pastes it into a config."""
    opts = "".join(f", {k}: {str(v).lower() if isinstance(v, bool) else v}" for k, v in rec.options.items())
    return f"{{name: {rec.method}{opts}}}"
