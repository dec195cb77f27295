"""Planning a bench: every run's full config (teacher, per seed pre-training, baseline, one run per method,
fair budget), in execution order, each validated before anything trains."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from detkd.bench.spec import BenchConfig, BenchMethod, BenchRun
from detkd.config import (
    ConfigError,
    apply_overrides,
    config_from_dict,
    load_raw,
)
from detkd.distill import build_distiller
from detkd.models.torchvision_build import NUM_LEVELS


def plan_runs(cfg: BenchConfig, methods: dict[str, BenchMethod], only: list[str] | None = None) -> list[BenchRun]:
    """Every run of the bench in execution order (seed by seed, so a partial bench has whole seeds).

    Each run's config is validated here, so a bad method option fails before anything trains.
    """
    if only:
        unknown = [m for m in only if m not in methods]
        if unknown:
            raise ConfigError(f"--methods: unknown row {unknown[0]!r} (rows of this bench: {', '.join(methods)})")
        methods = {k: v for k, v in methods.items() if k in only}
    out = Path(cfg.output_dir)
    student = apply_overrides(load_raw(cfg.student_config), list(cfg.overrides))
    teacher = apply_overrides(load_raw(cfg.teacher_config), [*cfg.overrides, *cfg.teacher_overrides])
    student.pop("distill", None)
    teacher.pop("distill", None)
    epochs = cfg.epochs or config_from_dict(copy.deepcopy(student)).train.epochs
    pre = cfg.pretrain_epochs

    runs: list[BenchRun] = []
    if cfg.teacher_checkpoint:
        t_run = BenchRun("teacher", "teacher", -1, "eval", _with(teacher, out / "teacher"), cfg.teacher_checkpoint)
        teacher_ckpt = cfg.teacher_checkpoint
    else:
        t_run = BenchRun("teacher", "teacher", -1, "train", _with(teacher, out / "teacher"))
        teacher_ckpt = str(out / "teacher" / "last.pt")
    runs.append(t_run)

    for seed in cfg.seeds:
        init = ""
        if pre > 0:
            runs.append(BenchRun(f"seed{seed}/pretrain", "pretrain", seed, "train",
                            _with(student, out / f"seed{seed}/pretrain", seed=seed, epochs=pre)))
            init = str(out / f"seed{seed}/pretrain" / "last.pt")
        base = apply_overrides(_with(student, out / f"seed{seed}/baseline", seed=seed, epochs=epochs),
                               list(cfg.finetune_overrides) if init else [])
        if init:
            base["model"]["weights"] = init
            base["model"]["backbone_weights"] = "none"
        runs.append(BenchRun(f"seed{seed}/baseline", "baseline", seed, "train", base))
        for label, m in methods.items():
            if m.seeds and seed not in m.seeds:
                continue
            raw = apply_overrides(_with(student, out / f"seed{seed}/{label}", seed=seed, epochs=epochs),
                                  list(cfg.finetune_overrides) if init else [])
            raw["distill"] = {
                "teacher": copy.deepcopy(teacher["model"]),
                "teacher_checkpoint": teacher_ckpt,
                "methods": [{"name": x.name, "weight": x.weight, "options": dict(x.options)} for x in m.methods],
                "student_init": "checkpoint" if init else "none",
                "student_checkpoint": init,
                # every row and seed feeds the teacher the same images: one teacher cache for all of them
                "cache_dir": str(out / "teacher_cache"),
            }
            raw = apply_overrides(raw, [*cfg.distill_overrides, *m.overrides])
            runs.append(BenchRun(f"seed{seed}/{label}", label, seed, "distill", raw))
        if pre > 0 and cfg.fair_budget:
            runs.append(BenchRun(f"seed{seed}/fair_budget", "fair_budget", seed, "train",
                            _with(student, out / f"seed{seed}/fair_budget", seed=seed, epochs=pre + epochs)))

    for r in runs:
        try:
            _validate(config_from_dict(copy.deepcopy(r.raw)))
        except ConfigError as e:
            raise ConfigError(f"bench run {r.name}: {e}") from None
    return runs


def _validate(run_cfg) -> None:
    """Method names and options too, not only the config's types: a bad option would otherwise surface only
    when its run starts, maybe an hour into the bench."""
    if run_cfg.distill is None:
        return
    t_ch = [run_cfg.distill.teacher.fpn_channels] * NUM_LEVELS  # every FPN level has the FPN's width
    s_ch = [run_cfg.model.fpn_channels] * NUM_LEVELS
    for i, m in enumerate(run_cfg.distill.methods):
        build_distiller(m.name, m.options, t_ch, s_ch, run_cfg.model.arch, where=f"distill.methods[{i}]")


def _with(raw: dict[str, Any], out: Path, seed: int | None = None, epochs: int | None = None) -> dict[str, Any]:
    raw = copy.deepcopy(raw)
    raw["output_dir"] = str(out)
    train = raw.setdefault("train", {})
    if seed is not None:
        train["seed"] = seed
    if epochs is not None:
        train["epochs"] = epochs
        train.pop("preset", None)  # a preset would overwrite the epochs
        if train.get("schedule", "multistep") == "multistep":
            # the student file's milestones belong to its own length: scale them to this one
            train["milestones"] = _scaled_milestones(raw, epochs)
    return raw


def _scaled_milestones(raw: dict[str, Any], epochs: int) -> list[int]:
    cfg = config_from_dict(copy.deepcopy({k: v for k, v in raw.items() if k != "distill"}))
    base_epochs = {"1x": 12, "2x": 24}.get(cfg.train.preset, cfg.train.epochs)
    return sorted({max(1, round(m * epochs / base_epochs)) for m in cfg.train.milestones if m < base_epochs})
