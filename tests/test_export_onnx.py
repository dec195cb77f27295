"""``detkd export --onnx``: the ONNX student gives the detections of the PyTorch student (onnxruntime)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from detkd.commands.export import export_student
from detkd.config import to_dict
from detkd.models import build_detector
from detkd.runtime.checkpoint import save_checkpoint
from tests.engine_helpers import SIZE, tiny_config

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


@pytest.mark.parametrize("arch", ["retinanet", "faster_rcnn"])
def test_onnx_export_detects_what_pytorch_detects(arch, tmp_path):
    """Outputs are named after the detector's own keys (their order differs between families)."""
    cfg = tiny_config(tmp_path / "data", tmp_path / "run", arch=arch)
    torch.manual_seed(0)
    model = build_detector(cfg.model).eval()
    if arch == "retinanet":  # untrained, every anchor scores near the 0.01 prior, under the 0.05 threshold:
        torch.nn.init.constant_(model.head.classification_head.cls_logits.bias, 0.0)  # give it boxes to compare
    save_checkpoint(tmp_path / "run" / "last.pt", {"model": model.state_dict(), "config": to_dict(cfg)})

    written = export_student(tmp_path / "run", tmp_path / "exp", checkpoint="last.pt", onnx=True)
    path = tmp_path / "exp" / "student.onnx"
    assert path in written
    onnx.checker.check_model(onnx.load(str(path)))

    image = torch.rand(3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model([image])[0]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    boxes, labels, scores = session.run(["boxes", "labels", "scores"], {"images": image.numpy()})
    assert len(expected["scores"]) == cfg.model.detections_per_img  # a full set of detections to compare
    np.testing.assert_array_equal(labels, expected["labels"].numpy())
    np.testing.assert_allclose(scores, expected["scores"].numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(boxes, expected["boxes"].numpy(), rtol=1e-4, atol=1e-3)
