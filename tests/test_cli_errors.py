"""Bad input stops with a one-line error naming the path or the config key (exit status 2)."""

from __future__ import annotations

import pytest

from sove.cli import main


def run_cli(capsys, args):
    status = main(args)
    err = capsys.readouterr().err.strip()
    return status, err


def test_unknown_config_key_names_the_key(capsys):
    status, err = run_cli(capsys, ["pretrain", "loss.cls.num_judgez=3"])
    assert status == 2 and len(err.splitlines()) == 1
    assert "num_judgez" in err


def test_missing_data_root_names_the_path(tmp_path, capsys, tiny_overrides):
    missing = tmp_path / "does_not_exist"
    status, err = run_cli(capsys, ["pretrain", *tiny_overrides, f"data.root={missing}", f"trainer.out_dir={tmp_path}"])
    assert status == 2 and len(err.splitlines()) == 1
    assert str(missing) in err


def test_empty_data_root_names_the_path(tmp_path, capsys, tiny_overrides):
    empty = tmp_path / "empty"
    empty.mkdir()
    status, err = run_cli(capsys, ["pretrain", *tiny_overrides, f"data.root={empty}",
                                   f"trainer.out_dir={tmp_path / 'r'}"])
    assert status == 2 and len(err.splitlines()) == 1
    assert str(empty) in err and "no images" in err


def test_folder_without_images_names_the_path(tmp_path, capsys, tiny_overrides):
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "notes.txt").write_text("not an image")
    (folder / ".DS_Store").write_bytes(b"\0\0")
    status, err = run_cli(capsys, ["pretrain", *tiny_overrides, f"data.root={folder}",
                                   f"trainer.out_dir={tmp_path / 'r'}"])
    assert status == 2 and str(folder) in err and len(err.splitlines()) == 1


def test_fewer_images_than_a_batch(tmp_path, capsys, image_folder, tiny_overrides):
    status, err = run_cli(capsys, ["pretrain", *tiny_overrides, f"data.root={image_folder}", "optim.batch_size=64",
                                   f"trainer.out_dir={tmp_path / 'r'}"])
    assert status == 2 and "optim.batch_size" in err and "32 images" in err


@pytest.mark.parametrize("override, key", [
    ("loss.cls.num_anchors=40", "loss.cls.num_anchors"),  # not smaller than E_C (40)
    ("loss.cls.num_judges=0", "loss.cls.num_judges"),
    ("loss.cls.num_judges=40", "loss.cls.num_judges"),  # pool 40 - 8 anchors = 32 rows
    ("data.global_crop_size=18", "data.global_crop_size"),  # not divisible by patch 4
    ("mask.ratio=1.0", "mask.ratio"),
    ("loss.cls.label_mode=hard", "loss.cls.label_mode"),
    ("optim.batch_size=many", "optim.batch_size"),
])
def test_invalid_values_name_the_key_before_any_work(tmp_path, capsys, override, key, tiny_overrides):
    status, err = run_cli(capsys, ["pretrain", *tiny_overrides, "data.root=/nonexistent", override,
                                   f"trainer.out_dir={tmp_path}"])
    assert status == 2 and key in err and len(err.splitlines()) == 1
    assert not any(tmp_path.iterdir())  # failed before creating the run directory


def test_unknown_preset_lists_the_packaged_ones(capsys):
    status, err = run_cli(capsys, ["pretrain", "--config", "no_such_preset"])
    assert status == 2 and "no_such_preset" in err and "fashion_mnist_tiny" in err


def test_bad_data_root_leaves_no_run_directory(tmp_path, capsys, tiny_overrides):
    """Regression: a failed data check used to leave runs/<name>/ behind, and the retry then
    complained that the run directory exists instead of naming the bad path."""
    missing = tmp_path / "typo"
    args = ["pretrain", *tiny_overrides, f"data.root={missing}", f"trainer.out_dir={tmp_path / 'runs'}"]
    for _ in range(2):
        status, err = run_cli(capsys, args)
        assert status == 2 and str(missing) in err and "exists" not in err.replace("does not exist", "")
    assert not (tmp_path / "runs").exists()


def test_own_images_under_the_default_source_name_the_source_key(tmp_path, capsys):
    """Regression: `data.root=DIR` with 3 channels under the default source said only `data.num_channels must
    be 1 for data.source=fashion_mnist` (the user meant data.source=folder)."""
    from sove.data.sources import build_source
    from sove.errors import DataError

    with pytest.raises(DataError) as e:
        build_source("fashion_mnist", str(tmp_path), "train", False, 3)
    assert str(e.value) == ("data.num_channels must be 1 for data.source=fashion_mnist (the default source), got 3; "
                            "for your own images set data.source=folder (or shards)")
