"""A bench file: what it names (student, teacher, rows of methods, seeds, budget) read into typed
dataclasses, with errors that name the file and key; one run of the bench, and where its result goes."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from detkd.config import (
    ConfigError,
    MethodConfig,
    apply_overrides,
    from_dict,
    load_yaml,
    normalise_methods,
    resolve_config_path,
)


@dataclass
class BenchMethod:
    """One row of the table: the distillers of the run and config overrides for that run only."""

    methods: list[MethodConfig] = field(default_factory=list)  # as distill.methods of a run config
    overrides: list[str] = field(default_factory=list)  # key=value for this row, e.g. train.clip_grad=35
    seeds: list[int] = field(default_factory=list)  # the seeds this row runs (an ablation on one seed); [] = all


@dataclass
class BenchConfig:
    student_config: str = ""  # config of the student (data, model, train); relative to the bench file
    teacher_config: str = ""  # config of the teacher (its model and train sections); same
    teacher_checkpoint: str = ""  # trained teacher; empty = train it with teacher_config in OUT/teacher
    methods: dict[str, Any] = field(default_factory=dict)  # label -> [methods] or {methods, overrides}
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])  # one run of every row per seed
    pretrain_epochs: int = 0  # student epochs before distillation (0 = distil from scratch)
    epochs: int = 0  # distillation (and baseline) epochs; 0 = the student config's train.epochs
    fair_budget: bool = True  # add the baseline trained pretrain_epochs + epochs in one schedule
    overrides: list[str] = field(default_factory=list)  # key=value for every run (teacher included)
    teacher_overrides: list[str] = field(default_factory=list)  # key=value for the teacher run only
    distill_overrides: list[str] = field(default_factory=list)  # key=value for every distilled run, e.g.
    # distill.balance=1.0 (pairs trained from scratch; see docs/bench.md)
    finetune_overrides: list[str] = field(default_factory=list)  # key=value for the runs that start from the
    # pre-trained student (baseline and methods), e.g. a shorter warm-up for a short second phase
    output_dir: str = "runs/bench"  # runs, table, plots
    pretrain_backbones: bool = False  # first pre-train the teacher's and the student's backbones as digit
    # classifiers where their model.backbone_weights names a missing `detkd pretrain` file (DIR/BACKBONE.pt)
    pretrain_options: dict[str, Any] = field(default_factory=dict)  # its options (detkd pretrain --set)


@dataclass
class BenchRun:
    """One run of a bench (the teacher, a seed's baseline or a method's row): its command and full config."""

    name: str  # folder under the bench output, e.g. seed0/fgd
    row: str  # table row label
    seed: int
    command: str  # train | distill | eval
    raw: dict[str, Any]  # full config mapping written to run.yaml
    checkpoint: str = ""  # eval runs: the checkpoint evaluated

    def folder(self, out: Path) -> Path:
        return out / self.name


def load_bench(path: str | Path, overrides: list[str] | None = None) -> tuple[BenchConfig, dict[str, BenchMethod]]:
    """Read a bench file (or a shipped one by name, like ``bench/digits_retinanet``); config paths inside it
    are relative to the file. Errors name the file and key."""
    path = resolve_config_path(path)
    raw = apply_overrides(load_yaml(path), overrides or [])
    try:
        cfg = from_dict(BenchConfig, raw)
        methods = _parse_methods(cfg.methods)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    for key in ("student_config", "teacher_config"):
        value = getattr(cfg, key)
        if not value:
            raise ConfigError(f"{path}: {key} is required")
        resolved = (path.parent / value).resolve()
        if not resolved.is_file():
            raise ConfigError(f"{path}: {key}: file not found: {resolved}")
        setattr(cfg, key, str(resolved))
    if cfg.teacher_checkpoint and not Path(cfg.teacher_checkpoint).is_file():
        raise ConfigError(f"{path}: teacher_checkpoint: file not found: {cfg.teacher_checkpoint} (train that "
                          f"teacher first, or set teacher_checkpoint= to let this bench train one with teacher_config)")
    if not cfg.seeds:
        raise ConfigError(f"{path}: seeds: give at least one seed")
    if len(set(cfg.seeds)) != len(cfg.seeds):
        raise ConfigError(f"{path}: seeds: {cfg.seeds} repeats a seed")
    if cfg.pretrain_epochs < 0 or cfg.epochs < 0:
        raise ConfigError(f"{path}: pretrain_epochs and epochs must be >= 0")
    for label, m in methods.items():
        if set(m.seeds) - set(cfg.seeds):
            raise ConfigError(f"{path}: methods.{label}.seeds: {m.seeds} names a seed the bench does not run "
                              f"(seeds: {cfg.seeds})")
    return cfg, methods


def _parse_methods(raw: dict[str, Any]) -> dict[str, BenchMethod]:
    out = {}
    reserved = {"teacher", "pretrain", "baseline", "fair_budget"}
    for label, value in raw.items():
        where = f"methods.{label}"
        if label in reserved or "/" in label or not label:
            raise ConfigError(f"{where}: {label!r} is not a usable row label (reserved or contains '/')")
        if not isinstance(value, dict):
            value = {"methods": value}
        value = normalise_methods(dict(value))
        out[label] = from_dict(BenchMethod, value, where)
        if not out[label].methods:
            raise ConfigError(f"{where}: name at least one method")
    return out


def result_path(run: BenchRun, out: Path) -> Path:
    return run.folder(out) / "result.json"
