"""Tiny run configs for the end-to-end tests: 64 px digits, ResNet-18 FPN-32, a handful of images."""

from __future__ import annotations

import copy
import socket
from pathlib import Path

from detkd.config import (
    Config,
    DataConfig,
    DigitsConfig,
    DistillConfig,
    MethodConfig,
    ModelConfig,
    TrainConfig,
)

SIZE = 64


def tiny_model(arch: str = "retinanet", fpn: int = 32, backbone: str = "resnet18") -> ModelConfig:
    return ModelConfig(arch=arch, backbone=backbone, num_classes=10, fpn_channels=fpn, min_size=SIZE,
                       max_size=SIZE, norm="bn", anchor_sizes=[16, 32, 64, 128, 256],
                       rpn_pre_nms_top_n_train=200, rpn_post_nms_top_n_train=100, rpn_pre_nms_top_n_test=100,
                       rpn_post_nms_top_n_test=50, box_batch_size_per_image=32, detections_per_img=10)


def tiny_config(data_root: Path, out: Path, arch: str = "retinanet", epochs: int = 1, train_images: int = 8,
                **train_kw) -> Config:
    digits = DigitsConfig(image_size=SIZE, train_images=train_images, val_images=4, min_digits=1, max_digits=2,
                          scale_min=1.0, scale_max=1.4, seed=0)
    data = DataConfig(format="digits", root=str(Path(data_root) / f"n{train_images}"), batch_size=4, workers=0,
                      hflip=0.5, digits=digits)
    train = TrainConfig(epochs=epochs, optimizer="sgd", lr=0.01, warmup_iters=2, schedule="multistep",
                        milestones=[100], eval_every=1, keep_last=1, log_every=1, seed=0, **train_kw)
    return Config(data=data, model=tiny_model(arch), train=train, output_dir=str(out))


def with_distill(cfg: Config, teacher_ckpt: str, methods: list[str | MethodConfig], teacher_fpn: int = 48,
                 out: Path | None = None) -> Config:
    cfg = copy.deepcopy(cfg)
    cfg.distill = DistillConfig(
        teacher=tiny_model(cfg.model.arch, fpn=teacher_fpn),
        teacher_checkpoint=teacher_ckpt,
        methods=[m if isinstance(m, MethodConfig) else MethodConfig(m) for m in methods],
    )
    if out is not None:
        cfg.output_dir = str(out)
    return cfg


def real_pair_taps(arch: str, teacher_fpn: int, build_method):
    """Tiny random torchvision student (FPN 32) and frozen teacher, one padded batch with an empty image, and
    their taps: ``(student, teacher, method, det_losses, teacher_taps, student_taps, targets)``.
    ``build_method(teacher_channels, student_channels)`` makes the distiller under test."""
    import torch

    from detkd.models import build_detector, feature_channels
    from detkd.taps import tap_student, tap_teacher, transform_batch

    torch.manual_seed(0)
    common = dict(arch=arch, backbone="resnet18", num_classes=3, min_size=64, max_size=64,
                  box_batch_size_per_image=32, rpn_batch_size_per_image=32, rpn_pre_nms_top_n_train=100,
                  rpn_post_nms_top_n_train=50)
    student = build_detector(ModelConfig(fpn_channels=32, **common)).train()
    teacher = build_detector(ModelConfig(fpn_channels=teacher_fpn, **common)).eval().requires_grad_(False)
    method = build_method(feature_channels(teacher), feature_channels(student))
    images = [torch.rand(3, 64, 64), torch.rand(3, 48, 64)]  # the second is padded to 64 x 64
    targets = [{"boxes": torch.tensor([[4.0, 6.0, 30.0, 40.0], [20.0, 10.0, 60.0, 50.0]]),
                "labels": torch.tensor([1, 2])},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}]
    image_list, tt = transform_batch(student, images, targets)
    det_losses, s_taps = tap_student(student, image_list, tt, method.request())  # as DistillStep taps it
    t_taps = tap_teacher(teacher, image_list, tt, method.request(), s_taps)
    return student, teacher, method, det_losses, t_taps, s_taps, tt


def random_global_pair(root: Path, teacher_fpn: int, student_fpn: int, k: int, train_images: int = 8,
                       size: int | None = None):
    """A random RetinaNet teacher (detkd checkpoint ``teacher.pt``) and student (plain state dict
    ``student.pt``) under ``root``, and a ``global`` distill config naming them (``global.yaml``).
    Returns ``(cfg, cfg_path, student_cfg)``; ``size`` resizes the images (default: the data's 64 px)."""
    import torch
    import yaml

    from detkd.config import to_dict
    from detkd.models import build_detector
    from detkd.runtime.checkpoint import save_checkpoint

    torch.manual_seed(1)
    teacher_cfg = tiny_model("retinanet", fpn=teacher_fpn)
    student_cfg = tiny_model("retinanet", fpn=student_fpn)
    if size is not None:
        teacher_cfg.min_size = teacher_cfg.max_size = student_cfg.min_size = student_cfg.max_size = size
    save_checkpoint(root / "teacher.pt", {"model": build_detector(teacher_cfg).state_dict()})
    torch.manual_seed(2)
    torch.save(build_detector(student_cfg).state_dict(), root / "student.pt")

    cfg = tiny_config(root / "data", root / "run", arch="retinanet", train_images=train_images)
    cfg.model = student_cfg
    cfg = with_distill(cfg, str(root / "teacher.pt"), [MethodConfig("global", options={"k": k})])
    cfg.distill.teacher = teacher_cfg
    cfg_path = root / "global.yaml"
    cfg_path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return cfg, cfg_path, student_cfg


def free_port() -> int:
    """A TCP port free now on the loopback interface (each DDP launch takes its own: a port just released
    by the previous launch can still be in TIME_WAIT)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
