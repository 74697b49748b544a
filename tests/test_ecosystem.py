"""Fitting the tools a vision researcher uses: the export as a timm / Hugging Face folder with its
preprocessing (strict keys, the run's features), ONNX, W&B and MLflow logging, and model.init from
timm / export / DINO weights.

One 2-step run (module fixture) serves the export, ONNX, logger and model.init tests.
"""

from __future__ import annotations

import argparse
import csv
import json
import re

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from timm.layers import resample_abs_pos_embed

from helpers import make_image_folder
from sove.cli import main
from sove.errors import SoveError
from sove.eval.features import EvalImages
from sove.run import teacher_backbone
from sove.models import build_networks
from sove.models.pretrained import backbone_weights
from sove.train.init_from import init_backbones

MEAN, STD = [0.4, 0.45, 0.5], [0.2, 0.25, 0.3]


def _optional(*packages: str) -> bool:
    import importlib.util

    return all(importlib.util.find_spec(p) is not None for p in packages)


LOGGERS = ["wandb", "mlflow"] if _optional("wandb", "mlflow") else []


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_cfg):
    """A 2-step TINY run (its own mean/std) with every logger whose package is installed; exported."""
    from sove.api import pretrain

    tmp = tmp_path_factory.mktemp("eco")
    images = make_image_folder(tmp / "images")
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONFIG_DIR": str(tmp / "wb"),
           "WANDB_CACHE_DIR": str(tmp / "wb"), "WANDB_DATA_DIR": str(tmp / "wb"),
           "MLFLOW_TRACKING_URI": (tmp / "mlruns").as_uri(), "MLFLOW_ALLOW_FILE_STORE": "true"}
    loggers = ",".join(["csv", "tensorboard"] + LOGGERS)
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        cfg = tiny_cfg(f"data.root={images}", f"trainer.out_dir={tmp}", "trainer.name=eco",
                       "trainer.max_steps=2", f"data.mean={MEAN}", f"data.std={STD}",
                       f"trainer.loggers=[{loggers}]")
        path = pretrain(cfg).path
    return path, cfg, images, tmp


# ------------------------------------------------------------------------------------------- export
def test_export_folder_loads_in_timm_with_the_runs_preprocessing(run, capsys):
    path, cfg, images, _ = run
    assert main(["export", str(path)]) == 0
    folder = path / "export"
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    data = timm.data.resolve_data_config({}, model=model)
    assert data == {"input_size": (3, 16, 16), "interpolation": "bilinear", "mean": MEAN, "std": STD,
                    "crop_pct": 1.0, "crop_mode": "center"}
    assert model.num_classes == 0 and model.pretrained_cfg["tag"] == "sove"
    meta = json.loads((path / "backbone.json").read_text())
    assert meta["architecture"] == "vit_tiny_patch16_224" and meta["model_kwargs"]["embed_dim"] == 32
    assert (meta["timm_dir"], meta["step"], meta["global_pool"]) == ("export", 2, "cls")
    # Strict: every timm parameter came from the file (a random init would differ).
    assert torch.equal(model.state_dict()["pos_embed"], teacher_backbone(path, cfg).vit.state_dict()["pos_embed"])
    # timm's transform gives sove's evaluation view of an image (20 px -> resize 16 -> centre crop 16),
    # up to PIL's vs torch's bilinear resampling; model(x) is the teacher's CLS feature.
    image = Image.open(next((images / "dark").iterdir())).convert("RGB")
    x_timm = timm.data.create_transform(**data)(image)
    x_sove = EvalImages([(torch.from_numpy(np.array(image)).permute(2, 0, 1), 0)], 16, MEAN, STD)[0][0]
    assert x_timm.shape == x_sove.shape == (3, 16, 16) and (x_timm - x_sove).abs().max() < 0.05
    with torch.no_grad():
        torch.testing.assert_close(model(x_sove[None]), teacher_backbone(path, cfg).eval()(x_sove[None])["cls"],
                                   atol=1e-5, rtol=0)


@pytest.mark.skipif(not _optional("onnx", "onnxscript", "onnxruntime"), reason="pip install 'sove[onnx]'")
def test_onnx_export_matches_pytorch(run, capsys):
    import onnxruntime

    from sove.export import load_backbone

    path = run[0]
    assert main(["export", str(path), "--onnx"]) == 0
    printed = capsys.readouterr().out
    diff = float(re.search(r"max abs difference ([0-9.e+-]+)", printed).group(1))
    assert "(opset 18, input images, output features)" in printed and diff < 1e-4
    model = load_backbone(path / "backbone.json")
    session = onnxruntime.InferenceSession(str(path / "export" / "model.onnx"), providers=["CPUExecutionProvider"])
    for shape in [(3, 3, 16, 16), (1, 3, 24, 32)]:  # dynamic batch and image size (ViT)
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
        got = torch.from_numpy(session.run(["features"], {"images": x.numpy()})[0])
        with torch.no_grad():
            assert got.shape == (shape[0], 32) and (got - model(x)).abs().max() < 1e-4
    assert main(["export", str(path)]) == 0  # a later export without --onnx leaves no stale model.onnx
    assert sorted(p.name for p in (path / "export").iterdir()) == ["config.json", "model.safetensors"]


# ------------------------------------------------------------------------------------------ loggers
@pytest.mark.skipif(not LOGGERS, reason="pip install 'sove[wandb,mlflow]'")
def test_offline_wandb_and_mlflow_runs_write_their_files(run):
    import mlflow

    path, _, _, tmp = run
    with open(path / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["step"] for r in rows] == ["1", "2"] and any((path / "tensorboard").iterdir())
    offline = list((path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(offline) == 1 and offline[0].stat().st_size > 0
    client = mlflow.MlflowClient((tmp / "mlruns").as_uri())
    (found,) = client.search_runs([client.get_experiment_by_name("sove").experiment_id])
    assert found.info.run_name == "eco" and found.info.status == "FINISHED"
    assert found.data.params["loss.cls.num_judges"] == "3" and found.data.params["trainer.name"] == "eco"
    history = client.get_metric_history(found.info.run_id, "loss/loss")
    assert [(m.step, m.value) for m in history] == [(int(r["step"]), float(r["loss/loss"])) for r in rows]


# --------------------------------------------------------------------------------------- model.init
def test_model_init_from_an_export_equals_its_weights_and_resamples_the_grid(run, capsys, tiny_cfg):
    path, cfg, images, _ = run
    main(["export", str(path)])
    source = teacher_backbone(path, cfg).vit.state_dict()
    for size, grid in ((16, 4), (24, 6)):
        new = tiny_cfg(f"data.root={images}", f"data.global_crop_size={size}", f"data.mean={MEAN}",
                       f"data.std={STD}", f"model.init={path / 'export'}")
        student, teacher = init_backbones(new, new.model.init)
        for net in (student, teacher):
            got = net.backbone.vit.state_dict()
            assert all(torch.equal(got[k], v) for k, v in source.items() if k != "pos_embed")
            expected = resample_abs_pos_embed(source["pos_embed"], [grid, grid], num_prefix_tokens=1)
            assert torch.equal(got["pos_embed"], expected)
        assert torch.equal(student.backbone.mask_token, torch.zeros(32))
    out = capsys.readouterr()
    assert (f"model.init: {path / 'export' / 'model.safetensors'}: loaded 30 backbone tensors into the student and "
            "the teacher; the projection heads start new") in out.out
    assert "resampled pos_embed from a 4x4 to a 6x6 patch grid" in out.out and "warning" not in out.err


def test_model_init_from_a_dino_checkpoint_takes_the_teacher_backbone(tmp_path, capsys, tiny_cfg):
    cfg = tiny_cfg("data.root=unused", f"model.init={tmp_path / 'dino.pth'}")
    donor = build_networks(cfg, seed=7)[1]  # another seed: other weights
    teacher = {f"backbone.{k}": v for k, v in donor.backbone.vit.state_dict().items()}
    teacher["head.last_layer.weight"] = torch.zeros(5, 16)
    torch.save({"teacher": teacher, "student": {}, "args": argparse.Namespace(arch="vit_small")}, tmp_path / "dino.pth")
    student, _ = init_backbones(cfg, cfg.model.init)
    assert all(torch.equal(student.backbone.vit.state_dict()[k], v) for k, v in donor.backbone.vit.state_dict().items())
    assert "loaded 30 backbone tensors into the student and the teacher; left out 1 (heads, mask token)" in \
        capsys.readouterr().out


def test_model_init_timm_name_from_the_local_cache(tmp_path, monkeypatch, capsys, tiny_cfg):
    """timm:NAME reads the user's Hugging Face cache (here a locally written one, offline)."""
    from safetensors.torch import save_file

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))  # read at import: set them here
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    torch.manual_seed(3)
    src = timm.create_model("test_vit", pretrained=False, num_classes=0)  # timm's own tiny test ViT
    snapshot = tmp_path / f"models--{src.pretrained_cfg['hf_hub_id'].replace('/', '--')}" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    save_file(src.state_dict(), str(snapshot / "model.safetensors"))
    cfg = tiny_cfg("data.root=unused", "model.arch=test_vit", "model.patch_size=16", "model.depth=null",
                   "model.embed_dim=null", "model.num_heads=null", "data.global_crop_size=32",
                   "data.local_crop_size=16", "model.init=timm:test_vit")
    _, teacher = init_backbones(cfg, cfg.model.init)
    got = teacher.backbone.vit.state_dict()
    assert all(torch.equal(got[k], v) for k, v in src.state_dict().items() if k != "pos_embed")
    assert torch.equal(got["pos_embed"], resample_abs_pos_embed(src.pos_embed, [2, 2], num_prefix_tokens=1))
    assert capsys.readouterr().err.strip() == (
        "warning: model.init: timm:test_vit was trained with mean [0.5, 0.5, 0.5] and std [0.5, 0.5, "
        "0.5], data.mean / data.std are [0.5, 0.5, 0.5] / [0.25, 0.25, 0.25]: set data.mean=[0.5, 0.5, 0.5] "
        "data.std=[0.5, 0.5, 0.5] to feed it inputs normalised as it expects")
    with pytest.raises(SoveError, match=r"model.init=timm:test_vit2: timm could not load its pretrained weights "
                                        r"\(.*\); sove downloads nothing"):
        backbone_weights("timm:test_vit2")  # not in the cache


def test_model_init_errors_stop_before_the_run_directory(tmp_path, image_folder, capsys, tiny_overrides):
    args = ["pretrain", *tiny_overrides, f"data.root={image_folder}", f"trainer.out_dir={tmp_path / 'runs'}"]
    assert main(args + [f"model.init={tmp_path / 'nope.pth'}"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"sove: error: model.init: '{tmp_path / 'nope.pth'}' not found; give timm:NAME, a sove export (RUN/export or "
        "backbone.json), a sove run or checkpoint, or a timm/DINO checkpoint file")
    assert main(args + ["model.init=x", "trainer.init_from=y"]) == 2
    assert capsys.readouterr().err.strip() == (
        "sove: error: model.init/trainer.init_from: give one: model.init starts the backbones from weights (heads "
        "new), trainer.init_from the whole student and teacher from a sove checkpoint")
    assert not (tmp_path / "runs").exists()
