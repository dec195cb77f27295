"""Typed configuration: YAML files validated into dataclasses.

A config file is a YAML mapping whose keys mirror :class:`Config`. Every key is checked: an unknown key
or a value of the wrong type raises :class:`ConfigError` naming the dotted path of the key
(``model.fpn_channels``), so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A config key is unknown, missing or has a value of the wrong type."""


# ----------------------------------------------------------------------------------------------------------
# Sections


@dataclass
class DigitsConfig:
    """Parameters of the embedded digits data set (see :mod:`detkd.data.digits`)."""

    image_size: int = 128  # square scene side in pixels
    train_images: int = 2000  # scenes in the train split
    val_images: int = 300  # scenes in the val split (drawn from other MNIST digits)
    min_digits: int = 1  # digits per scene, at least
    max_digits: int = 4  # digits per scene, at most
    scale_min: float = 0.8  # digit size in multiples of the 28 px MNIST glyph
    scale_max: float = 2.0  # largest digit size, same unit
    max_overlap: float = 0.1  # largest IoU allowed between two digits of one scene
    seed: int = 0  # the same seed writes the same bytes


@dataclass
class DataConfig:
    """Where the images and annotations are, and how they are loaded.

    ``format``: ``coco`` (instances json + image folder), ``voc`` (VOCdevkit tree, ``train_sets`` /
    ``val_sets`` like ``VOC2007/trainval``), ``voc_folder`` (loose images + VOC XML files) or ``digits``
    (the embedded data set, generated under ``root`` when absent).
    """

    format: Literal["coco", "voc", "voc_folder", "digits"] = "digits"  # layout of the data (see above)
    root: str = "data/digits"  # data set folder; the paths below are relative to it
    train_ann: str = "annotations/instances_train.json"  # coco: train json; voc_folder: XML folder
    train_images: str = "train"  # coco / voc_folder: train image folder
    val_ann: str = "annotations/instances_val.json"  # coco: val json; voc_folder: XML folder
    val_images: str = "val"  # coco / voc_folder: val image folder
    train_sets: list[str] = field(default_factory=lambda: ["VOC2007/trainval", "VOC2012/trainval"])  # voc: union
    val_sets: list[str] = field(default_factory=lambda: ["VOC2007/test"])  # voc: evaluation sets
    class_names: list[str] = field(default_factory=list)  # voc / voc_folder; empty = the 20 VOC classes
    bad_boxes: Literal["repair", "drop", "error"] = "repair"  # degenerate / out-of-image boxes
    bad_images: Literal["error", "skip"] = "error"  # missing / unreadable images
    bad_annotations: Literal["error", "skip"] = "error"  # broken entries of an annotation file (coco)
    hflip: float = 0.5  # probability of a horizontal flip in training
    photometric: bool = False  # random photometric distortion in training
    batch_size: int = 8  # images per step and per process
    workers: int = 2  # data loader worker processes; 0 loads in the training process, which is faster for
    # tiny images (64 px digits: a batch loads in 7 ms, waiting for it from a worker takes 18-24 ms; bench_loop.py)
    digits: DigitsConfig = field(default_factory=DigitsConfig)  # format digits: generation parameters


# torchvision's COCO detectors that ``model.torchvision`` names: family, backbone and FPN width of each (the
# rest of the layout, heads and anchors included, is torchvision's; see detkd.models.torchvision_build)
TORCHVISION_MODELS: dict[str, tuple[str, str, int]] = {
    "fasterrcnn_resnet50_fpn": ("faster_rcnn", "resnet50", 256),
    "fasterrcnn_resnet50_fpn_v2": ("faster_rcnn", "resnet50", 256),
    "fasterrcnn_mobilenet_v3_large_fpn": ("faster_rcnn", "mobilenet_v3_large", 256),
    "fasterrcnn_mobilenet_v3_large_320_fpn": ("faster_rcnn", "mobilenet_v3_large", 256),
    "retinanet_resnet50_fpn": ("retinanet", "resnet50", 256),
    "retinanet_resnet50_fpn_v2": ("retinanet", "resnet50", 256),
    "fcos_resnet50_fpn": ("fcos", "resnet50", 256),
}
# keys that a torchvision model fixes: a config may repeat them only with the model's own value
TORCHVISION_IMPLIED = ("arch", "backbone", "fpn_channels", "anchor_sizes", "head_norm")
# the builder's own defaults where they differ from ModelConfig's, used when a config names the model and
# leaves the key out (the 320 model is defined by its 320 px input)
TORCHVISION_DEFAULTS: dict[str, dict[str, int]] = {
    "fasterrcnn_mobilenet_v3_large_320_fpn": {"min_size": 320, "max_size": 640, "rpn_pre_nms_top_n_test": 150,
                                              "rpn_post_nms_top_n_test": 150},
}


@dataclass
class ModelConfig:
    """A torchvision detector (see :func:`detkd.models.build_detector`).

    ``torchvision`` names one of torchvision's COCO detectors (``fasterrcnn_resnet50_fpn_v2``...): the model
    is then built exactly as torchvision builds it, so its published weights load key by key, and ``arch``,
    ``backbone``, ``fpn_channels``, anchors and heads follow from the name (its other builder defaults apply
    where a config file leaves the key out: 320 / 640 px and 150 test proposals for the 320 model).
    Empty: detkd's own layout (any ResNet / MobileNetV3 width and depth), described by the keys below.
    """

    torchvision: Literal[
        "",
        "fasterrcnn_resnet50_fpn",
        "fasterrcnn_resnet50_fpn_v2",
        "fasterrcnn_mobilenet_v3_large_fpn",
        "fasterrcnn_mobilenet_v3_large_320_fpn",
        "retinanet_resnet50_fpn",
        "retinanet_resnet50_fpn_v2",
        "fcos_resnet50_fpn",
    ] = ""  # a torchvision COCO detector, built as torchvision builds it; empty = detkd's layout
    arch: Literal["faster_rcnn", "retinanet", "fcos"] = "retinanet"  # detector family
    backbone: Literal[
        "resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "mobilenet_v3_large"
    ] = "resnet18"  # backbone trunk under the FPN
    num_classes: int = 10  # foreground classes; torchvision's background index 0 is added for Faster R-CNN
    fpn_channels: int = 256  # FPN width
    min_size: int = 800  # shorter image side after resizing
    max_size: int = 1333  # longer image side at most
    weights: str = "none"  # detector weights: none | torchvision weights name | checkpoint path
    backbone_weights: str = "none"  # none | torchvision weights name | checkpoint path
    trainable_layers: int = 5  # backbone stages that train (0-5); the rest are frozen
    norm: Literal["frozen_bn", "bn"] = "frozen_bn"  # bn when training from scratch
    head_norm: Literal["none", "gn"] = "none"  # retinanet: GroupNorm in the head (torchvision's v2 head)
    anchor_sizes: list[int] = field(default_factory=list)  # one per level; empty = torchvision default
    aspect_ratios: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0])  # anchor height / width
    rpn_batch_size_per_image: int = 256  # anchors sampled for the RPN loss
    rpn_pre_nms_top_n_train: int = 2000  # RPN proposals per level before NMS (training)
    rpn_post_nms_top_n_train: int = 2000  # proposals kept after NMS (training)
    rpn_pre_nms_top_n_test: int = 1000  # same, inference
    rpn_post_nms_top_n_test: int = 1000  # same, inference
    box_batch_size_per_image: int = 512  # RoIs sampled for the box head (the CPU cost)
    box_positive_fraction: float = 0.25  # share of positive RoIs in that sample
    score_thresh: float = 0.05  # detections below this score are dropped
    detections_per_img: int = 100  # detections kept per image

    def __post_init__(self) -> None:
        # a torchvision model fixes its family, backbone and width: set them, so code reading cfg.arch works
        if self.torchvision in TORCHVISION_MODELS:
            self.arch, self.backbone, self.fpn_channels = TORCHVISION_MODELS[self.torchvision]  # type: ignore[assignment]


@dataclass
class TrainConfig:
    epochs: int = 12  # training length
    preset: Literal["", "1x", "2x"] = ""  # 1x = 12 epochs, steps at 8 and 11; 2x = 24, steps at 16 and 22
    optimizer: Literal["sgd", "adamw"] = "sgd"  # optimizer
    lr: float = 0.02  # base learning rate (for the whole batch of all processes)
    momentum: float = 0.9  # SGD momentum
    weight_decay: float = 1e-4  # weight decay
    warmup_iters: int = 500  # linear warm-up length in iterations
    warmup_factor: float = 0.001  # learning-rate factor at iteration 0
    schedule: Literal["multistep", "cosine"] = "multistep"  # decay after warm-up
    milestones: list[int] = field(default_factory=lambda: [8, 11])  # multistep: epochs where lr *= gamma
    gamma: float = 0.1  # multistep decay factor
    clip_grad: float = 0.0  # max global grad norm; 0 = off
    amp: bool = False  # mixed precision, GPU only
    eval_every: int = 1  # epochs; 0 = only at the end
    keep_last: int = 2  # epoch checkpoints kept besides last.pt and best.pt
    checkpoint_every: int = 0  # iterations between mid-epoch saves of last.pt; 0 = only at epoch ends
    log_every: int = 20  # iterations
    max_bad_steps: int = 5  # consecutive non-finite losses before the run stops
    seed: int = 0  # seeds Python, NumPy, torch and the data order
    deterministic: bool = False  # torch deterministic algorithms (slower)
    threads: int = 0  # CPU threads of torch; 0 = PyTorch's default (one per core). Results depend on it: fix it
    # (with deterministic) for runs that repeat on any machine
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dist_timeout_s: int = 600  # DDP: a collective waiting longer for another rank fails the run


COCO_MAX_DETS = [1, 10, 100]


@dataclass
class EvalConfig:
    """How detections are scored (see :mod:`detkd.evaluation`).

    ``max_dets``: COCO's maximum detections per image, three increasing counts; AP and the per-size AR use
    the last, and the three AR metrics are named after them (``AR1 AR10 AR100`` by default). COCO's 100
    caps recall for scenes with more objects: for dense data set the last count, and
    ``model.detections_per_img``, to at least the most objects an image holds (docs/data.md).
    """

    max_dets: list[int] = field(default_factory=lambda: list(COCO_MAX_DETS))  # COCO maxDets; last one for AP


@dataclass
class MethodConfig:
    """One distiller of a run: its registry name, its weight, and its own options."""

    name: str = ""  # registry name (fitnet, fgfi, defeat, kd, rkd, fgd, gid, global, ...)
    weight: float = 1.0  # multiplies every term of the method
    options: dict[str, Any] = field(default_factory=dict)  # the method's own options (docs/methods.md)


@dataclass
class DistillConfig:
    teacher: ModelConfig = field(default_factory=ModelConfig)  # the teacher detector (keys of model)
    teacher_config: str = ""  # a config file whose model section is the teacher (resolved at load time)
    teacher_checkpoint: str = ""  # trained teacher weights (required)
    methods: list[MethodConfig] = field(default_factory=list)  # distillers of the run
    student_init: Literal["none", "checkpoint", "inherit"] = "none"  # start of the student
    student_checkpoint: str = ""  # student_init checkpoint: its weights
    decay: bool = False  # scale every distillation term by (1 - epoch / epochs), except a method's undecayed terms
    balance: float = 0.0  # > 0: on the first step, scale down each distillation term larger than balance x the
    # detection loss to that size, then keep the factors (pairs trained from scratch; 0 = the papers' weights)
    # Teacher cost (benchmarks/RESULTS.md, "Teacher cache"; docs/architecture.md, "Teacher cache")
    teacher_cache: bool = True  # reuse the teacher's student-independent outputs (features, proposals, dense head)
    # when the same input recurs (epochs, bench rows); bit-identical in float32; off under data.photometric
    cache_dir: str = ""  # also keep them in this folder, shared by runs of the same teacher ("" = memory only;
    # detkd bench sets OUT/teacher_cache); entries are files, written atomically, checked when read
    cache_memory_mb: int = 2048  # in-memory share of the cache; past it, entries go to cache_dir only
    cache_disk_mb: int = 20480  # at most this much in cache_dir; past it, new entries are not written
    cache_dtype: Literal["float32", "float16"] = "float32"  # float16 stores the features in half precision
    # (half the size; head outputs stay float32): not bit-identical, losses within 1e-3 relative (tested)
    teacher_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # the live teacher forward: auto =
    # as the step (float16 under train.amp on CUDA, else float32); float32 even under AMP; bfloat16 / float16:
    # autocast, outputs cast back to float32
    teacher_channels_last: bool = False  # the teacher in channels_last memory format (a CUDA / oneDNN speed-up)


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)  # see data
    model: ModelConfig = field(default_factory=ModelConfig)  # the detector trained (the student)
    train: TrainConfig = field(default_factory=TrainConfig)  # see train
    eval: EvalConfig = field(default_factory=EvalConfig)  # see eval
    distill: DistillConfig | None = None  # present: `detkd distill` trains against a teacher
    output_dir: str = "runs/default"  # run folder: checkpoints, logs, config


# ----------------------------------------------------------------------------------------------------------
# Validation


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, path: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and return it converted (ints widen to floats)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {type(value).__name__} {value!r}")
        return from_dict(tp, value, path)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, path)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{path}: {value!r} matches none of {tp}")
    if origin is Literal:
        if value not in args:
            choices = ", ".join(repr(a) for a in args)
            raise ConfigError(f"{path}: {value!r} is not one of {choices}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {type(value).__name__} {value!r}")
        item_tp = args[0] if args else Any
        return [_convert(v, item_tp, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {type(value).__name__} {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{path}: unsupported annotation {_type_name(tp)}")


def from_dict(cls: type, data: dict[str, Any], path: str = "") -> Any:
    """Build dataclass ``cls`` from a plain mapping, rejecting unknown keys and wrong types by name."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"{path}." if path else ""
        raise ConfigError(
            f"unknown key {where}{unknown[0]!s} (valid keys{' of ' + path if path else ''}: "
            f"{', '.join(sorted(names))})"
        )
    kwargs = {}
    for key, value in data.items():
        kwargs[key] = _convert(value, hints[key], f"{path}.{key}" if path else key)
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested mapping of a config (what gets saved next to checkpoints)."""
    return dataclasses.asdict(cfg)


def normalise_methods(raw: dict[str, Any]) -> dict[str, Any]:
    """Accept ``methods: [defeat, kd]`` and ``methods: [{name: kd, weight: 2, T: 4}]``.

    Keys of a method entry other than ``name`` and ``weight`` are that method's options.
    """
    methods = raw.get("methods")
    if methods is None:
        return raw
    if isinstance(methods, str):
        methods = [methods]
    out = []
    for m in methods:
        if isinstance(m, str):
            out.append({"name": m})
        elif isinstance(m, dict):
            m = dict(m)
            entry = {"name": m.pop("name", ""), "weight": m.pop("weight", 1.0)}
            options = m.pop("options", {})
            options = {**options, **m}
            entry["options"] = options
            out.append(entry)
        else:
            out.append(m)  # let validation report it
    return {**raw, "methods": out}


def parse_value(text: str) -> Any:
    """A command-line override value, read as YAML (``3``, ``0.1``, ``true``, ``[8, 11]``, ``abc``)."""
    return yaml.safe_load(text) if text != "" else ""


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.sub=value`` strings to a raw config mapping (before validation)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        node = raw
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part} is not a section")
        node[parts[-1]] = parse_value(text)
    return raw


def _apply_presets(cfg: Config) -> Config:
    if cfg.train.preset == "1x":
        cfg.train.epochs, cfg.train.milestones = 12, [8, 11]
    elif cfg.train.preset == "2x":
        cfg.train.epochs, cfg.train.milestones = 24, [16, 22]
    return cfg


def check_max_dets(max_dets: list[int], detections_per_img: int) -> None:
    """``eval.max_dets`` is three increasing positive counts, and the model returns no more detections per
    image than the evaluation counts (those past the last count would be dropped unscored)."""
    if len(max_dets) != 3 or min(max_dets) < 1 or sorted(set(max_dets)) != list(max_dets):
        raise ConfigError(f"eval.max_dets: expected three increasing positive counts like {COCO_MAX_DETS}, "
                          f"got {max_dets}")
    if detections_per_img > max_dets[-1]:
        raise ConfigError(
            f"model.detections_per_img ({detections_per_img}) exceeds eval.max_dets' last count "
            f"({max_dets[-1]}): the evaluation would ignore the lowest-scored {detections_per_img - max_dets[-1]} "
            f"detections of a full image; raise eval.max_dets to [{max_dets[0]}, {max_dets[1]}, "
            f"{detections_per_img}] (dense data) or lower detections_per_img"
        )


def check_model_values(model: ModelConfig) -> None:
    """The model keys that :func:`validate` checks on a config and :func:`detkd.models.build_detector` on any
    model section it builds (a teacher's too, whatever built the ModelConfig)."""
    if model.num_classes < 1:
        raise ConfigError(f"model.num_classes must be >= 1, got {model.num_classes}")
    if not 0 <= model.trainable_layers <= 5:
        raise ConfigError(f"model.trainable_layers must be in 0..5, got {model.trainable_layers}")


def validate(cfg: Config) -> Config:
    """Value checks that types alone cannot express; each error names the key."""
    check_model_values(cfg.model)
    checks = [
        (cfg.model.fpn_channels >= 1, "model.fpn_channels must be >= 1"),
        (cfg.model.min_size >= 16, "model.min_size must be >= 16"),
        (cfg.model.max_size >= cfg.model.min_size, "model.max_size must be >= model.min_size"),
        (cfg.train.epochs >= 1, "train.epochs must be >= 1"),
        (cfg.train.lr > 0, "train.lr must be > 0"),
        (cfg.data.batch_size >= 1, "data.batch_size must be >= 1"),
        (cfg.data.workers >= 0, "data.workers must be >= 0"),
        (0.0 <= cfg.data.hflip <= 1.0, "data.hflip must be a probability in [0, 1]"),
        (cfg.train.keep_last >= 0, "train.keep_last must be >= 0"),
        (cfg.train.max_bad_steps >= 1, "train.max_bad_steps must be >= 1"),
        (cfg.train.checkpoint_every >= 0, f"train.checkpoint_every must be >= 0, got {cfg.train.checkpoint_every}"),
        (cfg.train.dist_timeout_s >= 1, f"train.dist_timeout_s must be >= 1, got {cfg.train.dist_timeout_s}"),
    ]
    for ok, msg in checks:
        if not ok:
            raise ConfigError(msg)
    check_max_dets(cfg.eval.max_dets, cfg.model.detections_per_img)
    if cfg.distill is not None:
        if cfg.distill.balance < 0:
            raise ConfigError(f"distill.balance must be >= 0, got {cfg.distill.balance}")
        for key in ("cache_memory_mb", "cache_disk_mb"):
            if getattr(cfg.distill, key) < 0:
                raise ConfigError(f"distill.{key} must be >= 0, got {getattr(cfg.distill, key)}")
        for i, m in enumerate(cfg.distill.methods):
            if m.weight < 0:
                raise ConfigError(f"distill.methods[{i}].weight must be >= 0, got {m.weight}")
        if cfg.distill.teacher.num_classes != cfg.model.num_classes:
            raise ConfigError(
                f"distill.teacher.num_classes ({cfg.distill.teacher.num_classes}) differs from "
                f"model.num_classes ({cfg.model.num_classes}): teacher and student must share one class set"
            )
    return cfg


# Config keys that hold file or folder paths. They are resolved against the current directory (like paths on
# the command line), after ``~`` expansion; ``base`` and ``distill.teacher_config`` are relative to the file
# that names them (see :func:`load_raw`).
PATH_KEYS = ("data.root", "output_dir", "model.weights", "model.backbone_weights", "distill.teacher_checkpoint",
             "distill.student_checkpoint", "distill.cache_dir", "distill.teacher.weights",
             "distill.teacher.backbone_weights")


def _expand_home(cfg: Config) -> Config:
    for key in PATH_KEYS:
        *parents, name = key.split(".")
        node: Any = cfg
        for part in parents:
            node = getattr(node, part, None)
        if node is not None and isinstance(getattr(node, name), str) and getattr(node, name).startswith("~"):
            setattr(node, name, str(Path(getattr(node, name)).expanduser()))
    return cfg


def check_torchvision_keys(model: Any, path: str) -> Any:
    """A model section naming ``torchvision:`` may repeat the keys that model fixes (arch, backbone...) only
    with the model's own values: a config saying ``arch: retinanet`` next to a Faster R-CNN is an error.
    Returns the section with the builder's defaults (:data:`TORCHVISION_DEFAULTS`) for the keys it leaves
    out."""
    if not isinstance(model, dict) or not model.get("torchvision"):
        return model
    name = model["torchvision"]
    if name not in TORCHVISION_MODELS:
        return model  # from_dict reports the unknown name with the valid choices
    arch, backbone, width = TORCHVISION_MODELS[name]
    implied = {"arch": arch, "backbone": backbone, "fpn_channels": width, "anchor_sizes": [],
               "head_norm": "gn" if name == "retinanet_resnet50_fpn_v2" else "none"}
    for key in TORCHVISION_IMPLIED:
        if key in model and model[key] != implied[key] and not (key == "head_norm" and model[key] == "none"):
            raise ConfigError(
                f"{path}.{key}: {model[key]!r} contradicts {path}.torchvision {name!r}, which fixes "
                f"{key} = {implied[key]!r} (leave {key} out, or drop torchvision for detkd's own layout)"
            )
    return {**TORCHVISION_DEFAULTS.get(name, {}), **model}


def config_from_dict(raw: dict[str, Any]) -> Config:
    raw = dict(raw)
    if "model" in raw:
        raw["model"] = check_torchvision_keys(raw["model"], "model")
    if isinstance(raw.get("distill"), dict):
        raw["distill"] = normalise_methods(raw["distill"])
        if "teacher" in raw["distill"]:
            raw["distill"]["teacher"] = check_torchvision_keys(raw["distill"]["teacher"], "distill.teacher")
    return validate(_expand_home(_apply_presets(from_dict(Config, raw))))


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping with the safe loader, with errors that name the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(raw).__name__}")
    return raw


def merge(base: dict[str, Any], child: dict[str, Any]) -> dict[str, Any]:
    """Recursive merge: mappings merge key by key, anything else in ``child`` replaces ``base``."""
    out = dict(base)
    for k, v in child.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_raw(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A config mapping with its ``base:`` chain resolved (``base`` is a path relative to the file)."""
    path = Path(path).resolve()
    if path in _seen:
        raise ConfigError(f"{path}: 'base' chain loops back to itself")
    raw = load_yaml(path)
    base = raw.pop("base", None)
    distill = raw.get("distill")
    if isinstance(distill, dict) and isinstance(distill.get("teacher_config"), str) and distill["teacher_config"]:
        # The teacher is another config's model: take that section, then apply any teacher keys given here.
        tpath = (path.parent / distill["teacher_config"]).resolve()
        teacher_model = load_raw(tpath, (*_seen, path)).get("model", {})
        distill["teacher"] = merge(teacher_model, distill.get("teacher") or {})
        distill["teacher_config"] = str(tpath)
    if base is None:
        return raw
    if not isinstance(base, str):
        raise ConfigError(f"{path}: base: expected a file path, got {base!r}")
    base_path = path.parent / base
    if not base_path.is_file():
        base_path = resolve_config_path(base)  # a shipped config by name (``base: voc/tv_faster_rcnn_r50_v2``)
        if not base_path.is_file():
            raise ConfigError(f"{path}: base: {base} is neither a file next to it nor a shipped config")
    return merge(load_raw(base_path, (*_seen, path)), raw)


def shipped_configs() -> Path | None:
    """The folder of the configs shipped with detkd: ``detkd/configs`` in an installed package (the
    repository's ``configs/``, see pyproject.toml), else the ``configs/`` folder of a clone."""
    here = Path(__file__).resolve().parent
    for folder in (here / "configs", here.parent / "configs"):
        if folder.is_dir():
            return folder
    return None


def list_shipped_configs() -> list[str]:
    """Names of the shipped configs (``digits/retinanet_r18_student.yaml``...), without ``_base`` files."""
    folder = shipped_configs()
    if folder is None:
        return []
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*.yaml") if not p.name.startswith("_"))


def resolve_config_path(path: str | Path) -> Path:
    """``path`` itself when it is a file, else the shipped config of that name (``digits/fcos_r18_student``,
    with or without ``.yaml`` and a leading ``configs/``), so an installed detkd runs its configs without a
    clone. A path found nowhere is returned as given (loading it then says it was not found)."""
    given = Path(path).expanduser()
    if given.is_file():
        return given
    folder = shipped_configs()
    name = str(path)
    if name.startswith("configs/"):
        name = name[len("configs/"):]
    if folder is not None:
        for candidate in (folder / name, folder / f"{name}.yaml"):
            if candidate.is_file():
                return candidate
    return given


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Load (following ``base:``), override and validate a config file, or a shipped config by name
    (:func:`resolve_config_path`). Errors name the file and the key."""
    path = resolve_config_path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path} (nor a shipped config of that name; `detkd configs` "
                          f"lists them)")
    raw = apply_overrides(load_raw(path), overrides or [])
    try:
        return config_from_dict(raw)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
