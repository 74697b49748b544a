"""The command line answers fast and says what it takes: config errors before heavy imports,
choice errors listing the valid values, defaults in ``--help``, ``sove presets``, the folder preset."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from sove.cli import main
from sove.config import PRESET_DIR, load_config
from sove.errors import ConfigError

SRC = str(Path(__file__).resolve().parents[1] / "src")


def test_config_error_is_answered_before_torch_lightning_timm_are_imported():
    """Regression: `sove pretrain` imported the trainer (torch, Lightning, timm: 6-15 s) before reading
    the config, so a typo took that long to answer (benchmarks/cli_latency.py, docs/benchmarks.md)."""
    code = ("import sys; from sove.cli import main; rc = main(['pretrain', 'trainer.precision=bf16']); "
            "print(rc, *(m in sys.modules for m in ('torch', 'lightning', 'timm')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={"PYTHONPATH": SRC})
    assert done.stdout.split() == ["2", "False", "False", "False"]
    assert done.stderr.strip() == ("sove: error: trainer.precision: must be one of auto, 32-true, bf16-mixed, "
                                   "16-mixed, bf16-true; got 'bf16'")


@pytest.mark.parametrize("override, line", [
    ("trainer.accelerator=tpu2", "trainer.accelerator: must be one of auto, cpu, gpu, cuda, mps, tpu; got 'tpu2'"),
    ("trainer.loggers=[csv,neptune]", "trainer.loggers: unknown logger 'neptune'; the loggers are csv, tensorboard, "
                                      "wandb, mlflow (e.g. trainer.loggers=[csv,tensorboard,wandb])"),
    ("trainer.loggers=[tensorboard]", "trainer.loggers: must include csv (metrics.csv feeds `sove plot` and "
                                      "--resume); got ['tensorboard']"),
    ("data.on_error=ignore", "data.on_error: must be skip or raise, got 'ignore'"),
    ("trainer.on_nonfinite=ignore", "trainer.on_nonfinite: must be stop or skip, got 'ignore'"),
])
def test_choice_errors_list_the_valid_values(override, line):
    with pytest.raises(ConfigError) as err:
        load_config(None, ["data.root=unused", override])
    assert str(err.value) == line


def test_help_shows_the_defaults(capsys):
    with pytest.raises(SystemExit) as done:
        main(["eval", "linear", "--help"])
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert done.value.code == 0
    assert "feature rows per optimizer step (default: 1024)" in out and "(default: cls4)" in out
    assert "(default: None)" not in out and "(default: False)" not in out


def test_presets_lists_every_packaged_preset_with_its_description(capsys):
    assert main(["presets"]) == 0
    lines = capsys.readouterr().out.splitlines()
    names = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
    assert [line.split()[0] for line in lines] == names
    assert all(len(line.split(maxsplit=1)) == 2 for line in lines)  # every preset has a description
    assert "folder_vit_tiny      Your own RGB images: ViT-Ti/16 at 112 px on a folder (pass data.root=DIR); a GPU " \
           "is advised." in lines


def test_folder_preset_needs_only_the_folder(image_folder):
    with pytest.raises(ConfigError, match="data.root: is required when data.source=folder"):
        load_config("folder_vit_tiny")
    cfg = load_config("folder_vit_tiny", [f"data.root={image_folder}"])
    assert (cfg.data.source, cfg.data.num_channels, cfg.trainer.name) == ("folder", 3, "folder_vit_tiny")
    # 300 photos (docs/configs.md, "Small datasets"): the settings that fit them close the run plan's warnings
    from sove.train.preflight import check_run_plan

    assert check_run_plan(cfg, 300, 1)[-1] == ("settings that fit 300 images: optim.batch_size=32 "
                                               "loss.cls_feature_set_size=256 loss.cls.num_anchors=32")
