"""Exported backbone: timm reloads it offline with strict keys and gives the run's teacher features."""

from __future__ import annotations

import json

import torch

from conftest import TINY
from sove.cli import main
from sove.config import load_config
from sove.eval.features import teacher_backbone
from sove.export import load_backbone
from sove.train.trainer import pretrain


def test_export_reloads_in_timm_with_identical_embeddings(tmp_path, image_folder):
    cfg = load_config(None, TINY + [f"data.root={image_folder}", f"trainer.out_dir={tmp_path}", "trainer.name=e",
                                    "trainer.max_steps=2"])
    run = pretrain(cfg)
    assert main(["export", str(run)]) == 0
    meta = json.loads((run / "backbone.json").read_text())
    assert meta["architecture"] == "vit_tiny_patch16_224" and meta["model_kwargs"]["embed_dim"] == 32
    model = load_backbone(run / "backbone.json")
    ours = teacher_backbone(run, cfg).eval()
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = ours(x)["cls"]
        got = model.forward_features(x)[:, 0]
    assert torch.allclose(got, expected, atol=1e-5)
    # Strict: every timm parameter came from the file (a random init would differ).
    sd = model.state_dict()
    assert torch.equal(sd["pos_embed"], ours.vit.state_dict()["pos_embed"])
