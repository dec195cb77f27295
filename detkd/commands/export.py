"""``detkd export``: the student of a run as a plain torchvision state dict that loads without detkd.

OUT receives:

- ``student.pt``: the student's ``state_dict()`` only (no optimizer, no adapters, no teacher);
- ``model.json``: the model section of the run's config, what is needed to rebuild the detector;
- ``build_model.py``: a copy of :mod:`detkd.models.torchvision_build` (torch + torchvision only), whose
  ``load_exported(OUT)`` rebuilds the detector and loads the weights;
- optionally ``student.torchscript.pt`` (``torch.jit.script``) and ``student.onnx``.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import torch

from detkd.config import ConfigError, ModelConfig, from_dict
from detkd.models import build_detector
from detkd.models import torchvision_build as tvb
from detkd.runtime.checkpoint import CheckpointError, load_checkpoint, pick_checkpoint, save_checkpoint
from detkd.runtime.files import atomic_write_text


def export_student(run_dir: str | Path, out: str | Path, checkpoint: str = "best.pt", torchscript: bool = False,
                   onnx: bool = False) -> list[Path]:
    """Write the student of ``run_dir`` to ``out``; returns the files written."""
    run_dir, out = Path(run_dir), Path(out)
    ckpt_path = pick_checkpoint(run_dir, checkpoint)
    ckpt = load_checkpoint(ckpt_path)
    if "model" not in ckpt or "config" not in ckpt:
        raise CheckpointError(f"{ckpt_path} is not a detkd training checkpoint (no 'model' / 'config' entry)")
    model_cfg = from_dict(ModelConfig, ckpt["config"]["model"], "model")
    model_cfg.weights, model_cfg.backbone_weights = "none", "none"
    model = build_detector(model_cfg)
    model.load_state_dict(ckpt["model"])  # strict: the student alone, adapters live elsewhere
    model.eval()

    out.mkdir(parents=True, exist_ok=True)
    written = [out / "student.pt", out / "model.json", out / "build_model.py"]
    save_checkpoint(written[0], model.state_dict())
    spec = {"format": "detkd-export-1", "source": str(ckpt_path), "epoch": ckpt.get("epoch"),
            "metrics": ckpt.get("metrics", {}), "torch": torch.__version__,
            "model": dataclasses.asdict(model_cfg)}
    atomic_write_text(written[1], json.dumps(spec, indent=2))
    shutil.copyfile(tvb.__file__, written[2])

    if torchscript:
        path = out / "student.torchscript.pt"
        torch.jit.script(model).save(str(path))
        written.append(path)
    if onnx:
        written.append(_export_onnx(model, model_cfg, out / "student.onnx"))
    return written


def _export_onnx(model: torch.nn.Module, cfg: ModelConfig, path: Path) -> Path:
    try:
        import onnx  # noqa: F401
    except ImportError as e:
        raise ConfigError("ONNX export needs the onnx package: pip install 'detkd[export]'") from e
    dummy = [torch.rand(3, cfg.min_size, cfg.min_size)]
    with torch.no_grad():  # the outputs in the detector's own order: Faster R-CNN's is not RetinaNet's
        names = list(model(dummy)[0])
    torch.onnx.export(model, (dummy,), str(path), opset_version=17, dynamo=False,
                      input_names=["images"], output_names=names)
    return path
