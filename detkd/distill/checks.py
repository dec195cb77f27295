"""Checks of a distiller's inputs: teacher, student and adapters agree on the pyramid levels and map sizes,
and both detectors' classification outputs exist and agree."""

from __future__ import annotations

from torch import Tensor, nn

from detkd.taps import Taps


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
