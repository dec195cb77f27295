"""Setting up a run, shared by the trainer and every command: the device, the student and its frozen
teacher with their weights, the distillers, and the non-augmented feature loader of the prototype methods."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from detkd.config import Config, ConfigError, ModelConfig
from detkd.data import build_dataset, build_loader
from detkd.data.samplers import ShardSampler
from detkd.distill import REGISTRY, build_distiller
from detkd.distill.global_kd.base import PrototypeDistiller
from detkd.engine.step import DistillStep
from detkd.models import (
    build_detector,
    check_pair,
    checkpoint_state_dict,
    detector_arch,
    load_checked,
    paired_channels,
)
from detkd.models.weights import check_checkpoint_fits
from detkd.runtime import dist
from detkd.runtime.checkpoint import CheckpointError
from detkd.runtime.console import info
from detkd.taps.head_walk import head_depth


def resolve_device(name: str, timeout_s: int = 600) -> torch.device:
    return dist.init_from_env(name, timeout_s=timeout_s)


def build_models(cfg: Config, device: torch.device) -> tuple[nn.Module, nn.Module | None, DistillStep]:
    """Student, frozen teacher (or None) and the step module, all on ``device``.

    The student is built first, before anything else draws random numbers, so that a run's start depends
    on its seed alone (``detkd bench`` compares runs that must share it)."""
    student = build_detector(cfg.model)
    if cfg.distill is None:
        return student.to(device), None, DistillStep(student.to(device))

    dc = cfg.distill
    check_pair(dc.teacher, cfg.model)
    if not dc.teacher_checkpoint:
        raise ConfigError("distill.teacher_checkpoint: a trained teacher checkpoint is required")
    if not dc.methods:
        raise ConfigError("distill.methods: name at least one method (e.g. methods: [fgfi])")
    if Path(dc.teacher_checkpoint).is_file():  # (else a torchvision weights name, or not found below)
        check_checkpoint_fits(dc.teacher_checkpoint, dc.teacher, "distill.teacher", "distill.teacher_checkpoint")
    if dc.student_init == "checkpoint" and dc.student_checkpoint and Path(dc.student_checkpoint).is_file():
        check_checkpoint_fits(dc.student_checkpoint, cfg.model, "model", "distill.student_checkpoint")
    teacher = frozen_teacher(dc.teacher, dc.teacher_checkpoint)

    if dc.student_init == "checkpoint":
        if not dc.student_checkpoint:
            raise ConfigError("distill.student_checkpoint: required when distill.student_init is 'checkpoint'")
        student = build_detector(with_weights(cfg.model, dc.student_checkpoint))
    elif dc.student_init == "inherit":
        n = inherit_from_teacher(student, teacher)
        info(f"inherit: copied {n} neck/head tensors from the teacher (shapes that match)")

    # feature distillers compare levels of equal stride: pyramids differ (P2-P6, P3-P7, MobileNetV3's 3 levels)
    pairs, t_ch, s_ch = paired_channels(teacher, student, "distill")
    all_pairs = pairs or [(i, i) for i in range(len(t_ch))]
    distillers = nn.ModuleList(
        build_distiller(m.name, m.options, t_ch, s_ch, cfg.model.arch, where=f"distill.methods[{i}]",
                        pair=f"teacher {_describe_model(dc.teacher)} / student {_describe_model(cfg.model)}")
        for i, m in enumerate(dc.methods)
    )
    check_requests(distillers, teacher, student, all_pairs, _describe_model(dc.teacher), _describe_model(cfg.model))
    weights = [m.weight for m in dc.methods]
    teacher.to(device)
    student.to(device)
    step = DistillStep(student, distillers.to(device), weights, teacher, balance=dc.balance, pairs=pairs)
    return student, teacher, step


def _describe_model(model_cfg) -> str:
    return model_cfg.torchvision or f"{model_cfg.arch} {model_cfg.backbone}"


def check_requests(distillers: nn.ModuleList, teacher: nn.Module, student: nn.Module,
                   pairs: list[tuple[int, int]], teacher_name: str, student_name: str) -> None:
    """Raise :class:`ConfigError` at start-up when a method needs outputs that this teacher / student pair
    cannot give: RoI logits or proposals (two-stage on both sides), dense per-anchor outputs (one-stage
    on both sides, the same anchors per location on every paired level), head features for the teacher's
    head (CrossKD: the same one-stage head type on both sides)."""
    t_arch, s_arch = detector_arch(teacher), detector_arch(student)
    pair = f"teacher {teacher_name} / student {student_name}"
    for i, d in enumerate(distillers):
        req = d.request()
        where = f"distill.methods[{i}] ({getattr(d, 'name', type(d).__name__)})"
        if (req.roi_outputs or req.proposals) and (t_arch != "faster_rcnn" or s_arch != "faster_rcnn"):
            raise ConfigError(
                f"{where}: needs the RoI outputs of both detectors on the student's RoIs, which only two "
                f"Faster R-CNNs have; the pair is {pair} (pick a method without RoI terms, or a Faster "
                f"R-CNN on both sides)"
            )
        if req.head_layer >= 0:
            if t_arch != s_arch or t_arch == "faster_rcnn":
                raise ConfigError(
                    f"{where}: runs the teacher's head layers on the student's head features, which needs a "
                    f"RetinaNet or FCOS head on both sides and the same head type; the pair is {pair} "
                    f"({t_arch} / {s_arch} heads)"
                )
            depth = min(head_depth(teacher), head_depth(student))
            if req.head_layer > depth:
                raise ConfigError(f"{where}: head layer {req.head_layer} is past the heads' {depth} conv blocks "
                                  f"(pair {pair})")
        if req.dense_outputs:
            if t_arch == "faster_rcnn" or s_arch == "faster_rcnn":
                raise ConfigError(
                    f"{where}: needs the dense per-anchor head outputs of both detectors, which only "
                    f"RetinaNet / FCOS have; the pair is {pair}"
                )
            t_apl = teacher.anchor_generator.num_anchors_per_location()
            s_apl = student.anchor_generator.num_anchors_per_location()
            if [t_apl[a] for a, _ in pairs] != [s_apl[b] for _, b in pairs]:
                raise ConfigError(
                    f"{where}: compares the two heads anchor by anchor, but the pair {pair} has "
                    f"{t_apl[0]} and {s_apl[0]} anchors per location: their outputs do not correspond "
                    f"(pick the same anchors on both sides)"
                )


def with_weights(model_cfg: ModelConfig, path: str) -> ModelConfig:
    """A copy of ``model_cfg`` that loads the whole detector from ``path`` (and no backbone weights)."""
    out = copy.deepcopy(model_cfg)
    out.weights = path
    out.backbone_weights = "none"
    return out


def inherit_from_teacher(student: nn.Module, teacher: nn.Module) -> int:
    """Copy the teacher's neck (FPN) and head tensors into the student wherever names and shapes match."""
    s_state = student.state_dict()
    t_state = teacher.state_dict()
    copied = 0
    for k, v in t_state.items():
        if k.startswith("backbone.body."):
            continue  # the backbone is what the student does differently
        if k in s_state and s_state[k].shape == v.shape:
            s_state[k] = v.clone()
            copied += 1
    student.load_state_dict(s_state)
    return copied




def feature_loader(cfg: Config) -> DataLoader:
    """Training images without random augmentation, this rank's shard (prototype extraction)."""
    ds = build_dataset(cfg.data, "train", cfg.model, train=False)
    return build_loader(ds, cfg.data.batch_size, cfg.data.workers, shuffle=False,
                        sampler=ShardSampler(len(ds), dist.rank(), dist.world_size()))


def frozen_teacher(model_cfg: ModelConfig, checkpoint: str) -> nn.Module:
    """The detector of ``model_cfg`` with the weights of ``checkpoint``, in eval mode, without gradients."""
    teacher = build_detector(with_weights(model_cfg, checkpoint))
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def load_teacher(cfg: Config) -> nn.Module:
    """The frozen teacher of ``cfg.distill`` (model ``teacher``, weights ``teacher_checkpoint``), for the
    commands that read a trained pair; a missing or unloadable checkpoint is a :class:`CheckpointError`."""
    dc = cfg.distill
    check_pair(dc.teacher, cfg.model)
    if not dc.teacher_checkpoint:
        raise ConfigError("distill.teacher_checkpoint: a trained teacher checkpoint is required")
    if not Path(dc.teacher_checkpoint).is_file():
        raise CheckpointError(f"distill.teacher_checkpoint: teacher checkpoint not found: {dc.teacher_checkpoint}")
    try:
        return frozen_teacher(dc.teacher, dc.teacher_checkpoint)
    except RuntimeError as e:
        raise CheckpointError(f"distill.teacher_checkpoint: {e}") from None


def load_student(cfg: Config, checkpoint: str) -> nn.Module:
    """The student of ``cfg.model`` with the weights of ``checkpoint`` (detkd checkpoint or plain state dict)."""
    if not Path(checkpoint).is_file():
        raise CheckpointError(f"--checkpoint: student checkpoint not found: {checkpoint}")
    student = build_detector(cfg.model)
    try:
        load_checked(student, checkpoint_state_dict(checkpoint), checkpoint)
    except RuntimeError as e:
        raise CheckpointError(f"--checkpoint: {e} (model {cfg.model.arch}/{cfg.model.backbone}, "
                              f"{cfg.model.num_classes} classes, fpn_channels {cfg.model.fpn_channels})") from None
    return student


def prototype_method(cfg: Config) -> tuple[str, dict[str, Any]]:
    """(name, options) of the first method of the run that uses a prototype bank, else ``global``'s defaults."""
    for m in cfg.distill.methods:
        cls = REGISTRY.get(m.name)
        if cls is not None and issubclass(cls, PrototypeDistiller):
            return m.name, dict(m.options)
    return "global", {}
