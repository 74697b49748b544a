"""Retrieval / video / segmentation through the CLI on a real tiny run and on its exported backbone."""

from __future__ import annotations

import json

import torch

from sove.cli import main
from sove.eval.encoder import load_frozen
from sove.run import teacher_backbone
from sove.api import pretrain
from test_retrieval import make_dataset
from test_segmentation import make_ade
from test_video import make_davis


def test_cli_on_run_and_exported_backbone(tmp_path, image_folder, tiny_cfg):
    cfg = tiny_cfg(f"data.root={image_folder}", f"trainer.out_dir={tmp_path}", "trainer.name=r",
                   "trainer.max_steps=2")
    run = pretrain(cfg).path
    assert main(["export", str(run)]) == 0

    # Both sources give the teacher's tokens: global = [CLS], patches on the (rows, cols) grid.
    x = torch.randn(2, 3, 16, 24, generator=torch.Generator().manual_seed(0))
    from_run, from_file = load_frozen(run_dir=run), load_frozen(backbone=run / "backbone.json")
    with torch.no_grad():
        ref = teacher_backbone(run, cfg).eval()(x)
    for enc in (from_run, from_file):
        g, p = enc(x)
        assert enc.token_stride == 4 and enc.image_size == 16 and p.shape == (2, 4, 6, 32)
        assert torch.allclose(g, ref["cls"], atol=1e-5)
        assert torch.allclose(p.reshape(2, 24, 32), ref["patches"], atol=1e-5)

    ox = make_dataset(tmp_path / "ox")
    assert main(["eval", "retrieval", "--run", str(run), "--data", str(ox)]) == 0
    assert main(["eval", "retrieval", "--backbone", str(run / "backbone.json"), "--data", str(ox),
                 "--out", str(tmp_path / "ret.json")]) == 0
    a = json.loads((run / "eval" / "retrieval_toyox.json").read_text())
    b = json.loads((tmp_path / "ret.json").read_text())
    assert a["medium"]["ap"] == b["medium"]["ap"] and a["image_size"] == 16

    davis = make_davis(tmp_path / "davis", frames=4)
    assert main(["eval", "video", "--backbone", str(run), "--data", str(davis), "--image-size", "16"]) == 0
    v = json.loads((run / "eval" / "video.json").read_text())  # eval/ next to backbone.json = the run here
    assert 0 <= v["JF_mean"] <= 100 and v["sequences"]["square"]["frames_scored"] == 2
    assert sorted(p.name for p in (run / "eval" / "video_masks" / "square").iterdir()) == [
        f"{t:05d}.png" for t in range(4)]

    ade = make_ade(tmp_path / "ade")
    assert main(["eval", "segmentation", "--run", str(run), "--data", str(ade), "--epochs", "2"]) == 0
    s = json.loads((run / "eval" / "segmentation.json").read_text())
    assert s["num_classes"] == 2 and 0 <= s["mIoU"] <= 100 and len(s["iou"]) == 2
