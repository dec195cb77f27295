"""``detkd demo``: the whole story offline on the embedded digits data, in minutes on a CPU.

Makes the digits data (if absent), trains a teacher and a weaker student, distils the student from the
teacher with a classic baseline and with the global-knowledge method, evaluates every model and prints
one table. Each stage writes ``results.json`` when it finishes; running the demo again skips finished
stages and resumes an interrupted one.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass
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
from detkd.utils import info


@dataclass
class Stage:
    name: str
    cfg: Config
    note: str


def demo_stages(out_dir: str | Path, quick: bool = False) -> list[Stage]:
    """The demo's runs, smallest settings that still separate teacher and student on 2 CPU cores."""
    out = Path(out_dir)
    size = 64
    digits = DigitsConfig(image_size=size, train_images=64 if quick else 800, val_images=16 if quick else 200,
                          min_digits=1, max_digits=2, scale_min=1.2, scale_max=1.8, seed=0)
    data = DataConfig(format="digits", root=str(out / "data"), batch_size=8, workers=0, hflip=0.0, digits=digits)
    base_model = ModelConfig(arch="retinanet", num_classes=10, min_size=size, max_size=size, norm="bn",
                             anchor_sizes=[16, 32, 64, 128, 256], score_thresh=0.05, detections_per_img=10)
    teacher = copy.deepcopy(base_model)
    teacher.backbone, teacher.fpn_channels = "resnet34", 96
    student = copy.deepcopy(base_model)
    student.backbone, student.fpn_channels = "resnet18", 32
    train = TrainConfig(epochs=1 if quick else 5, optimizer="adamw", lr=1e-3, weight_decay=1e-4, warmup_iters=50,
                        schedule="cosine", eval_every=0, keep_last=0, log_every=20, seed=0)
    student_train = copy.deepcopy(train)
    student_train.epochs = 1 if quick else 3

    def run(name: str, model: ModelConfig, tr: TrainConfig, distill: DistillConfig | None = None) -> Config:
        return Config(data=copy.deepcopy(data), model=copy.deepcopy(model), train=copy.deepcopy(tr),
                      distill=distill, output_dir=str(out / name))

    teacher_ckpt = str(out / "teacher" / "last.pt")

    def distill(methods: list[MethodConfig]) -> DistillConfig:
        return DistillConfig(teacher=copy.deepcopy(teacher), teacher_checkpoint=teacher_ckpt, methods=methods)

    return [
        Stage("teacher", run("teacher", teacher, train), "RetinaNet ResNet-34-FPN (96 ch), 5 epochs"),
        Stage("student", run("student", student, student_train), "RetinaNet ResNet-18-FPN (32 ch), 3 epochs"),
        Stage("fgfi", run("student_fgfi", student, student_train, distill([MethodConfig("fgfi")])),
              "student + FGFI feature imitation"),
        Stage("global", run("student_global", student, student_train, distill([MethodConfig("global")])),
              "student + global knowledge (PGM + RDM)"),
    ]


def run_demo(out_dir: str | Path = "runs/demo", quick: bool = False) -> list[dict]:
    from detkd.engine.trainer import fit

    rows = []
    t_all = time.perf_counter()
    for stage in demo_stages(out_dir, quick):
        result_file = Path(stage.cfg.output_dir) / "results.json"
        if result_file.is_file():
            row = json.loads(result_file.read_text())
            info(f"[demo] {stage.name}: finished earlier, reusing {result_file}")
        else:
            info(f"[demo] {stage.name}: {stage.note}")
            t0 = time.perf_counter()
            metrics = fit(stage.cfg, resume=(Path(stage.cfg.output_dir) / "last.pt").is_file())
            row = {"run": stage.name, "model": stage.note, "mAP": metrics["mAP"], "AP50": metrics["AP50"],
                   "AP75": metrics["AP75"], "minutes": (time.perf_counter() - t0) / 60}
            result_file.write_text(json.dumps(row, indent=2))
        rows.append(row)
    print(format_table(rows))
    print(f"total {(time.perf_counter() - t_all) / 60:.1f} min; runs and logs under {out_dir}")
    return rows


def format_table(rows: list[dict]) -> str:
    head = f"| {'run':<8} | {'model':<46} | {'mAP':>6} | {'AP50':>6} | {'AP75':>6} | {'min':>5} |"
    sep = "|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|"
    lines = [head, sep]
    for r in rows:
        lines.append(f"| {r['run']:<8} | {r['model']:<46} | {r['mAP']:6.3f} | {r['AP50']:6.3f} | {r['AP75']:6.3f} "
                     f"| {r['minutes']:5.1f} |")
    return "\n".join(lines)
