"""The Python API (docs/python_api.md): the documented example runs; a user's dataset of PIL images, arrays,
tensors or (image, label) tuples trains; bad items, keywords and keys are one error naming them; a run on a
Python dataset resumes bit for bit with dataset= and is refused, with what to do, where sove cannot read it."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

import sove
from helpers import with_method_state
from sove.cli import main
from sove.config import load_config
from sove.data.python_source import ACCEPTED, PythonSource
from sove.errors import ConfigError, SoveError
from sove.train.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"<!-- api-example -->\s*```python\n(.*?)```", re.S)


def example_code() -> str:
    """The example between ``<!-- api-example -->`` markers: README.md's when it has one, else docs/python_api.md's."""
    readme = (ROOT / "README.md").read_text()
    found = BLOCK.search(readme) or BLOCK.search((ROOT / "docs" / "python_api.md").read_text())
    assert found, "no ```python block after <!-- api-example --> in README.md or docs/python_api.md"
    return found.group(1)


def test_the_documented_example_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    exec(compile(example_code(), "python_api example", "exec"), {"__name__": "example"})
    out = capsys.readouterr().out.splitlines()
    # 32 items with 2 target classes; 4 steps logged every 2 steps: rows at steps 2 and 4.
    assert out[0] == "data: python:Blobs (32 items), 2 classes (from its .targets/.labels)"
    assert out[1].startswith(f"sove {sove.__version__}: method sove, 32 images, global batch 8, 4 steps/epoch")
    run = sove.Run(tmp_path / "runs" / "blobs")
    assert [row["step"] for row in run.metrics()] == [2.0, 4.0]
    assert "concept_purity" in run.metrics()[-1]  # the labels reached the diagnostic
    assert out[-1].startswith(f"Run('{Path('runs') / 'blobs'}') (8, 128) ")
    assert (run.config.data.source, run.config.data.root) == ("python", "python:Blobs (32 items)")


def _pixels(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 6, 5, 3), dtype=np.uint8)  # (N, H, W, RGB)


def test_pil_images_arrays_tensors_and_tuples_give_the_same_items():
    pixels = _pixels(3)
    chw = torch.from_numpy(pixels).permute(0, 3, 1, 2)
    kinds = {
        "pil": [Image.fromarray(p) for p in pixels],
        "hwc array": list(pixels),
        "chw tensor": list(chw),
        "(pil, label) tuples": [(Image.fromarray(p), k + 5) for k, p in enumerate(pixels)],
    }
    for kind, items in kinds.items():
        source = PythonSource(items, num_channels=3)
        for k in range(3):
            image, label = source[k]
            assert image.dtype == torch.uint8 and torch.equal(image, chw[k]), kind
            assert label == (k + 5 if "tuples" in kind else -1), kind
        assert source.labels is None and source.classes is None
    gray = PythonSource([pixels[0][:, :, 0]], num_channels=3)[0][0]  # (H, W) -> RGB by repetition
    assert torch.equal(gray, torch.from_numpy(pixels[0][:, :, 0]).expand(3, -1, -1))


def test_targets_give_labels_and_classes():
    class Labelled(torch.utils.data.Dataset):
        targets, classes = [1, 0, 1], ["cat", "dog"]

        def __len__(self):
            return 3

        def __getitem__(self, i):
            return torch.zeros(1, 4, 4, dtype=torch.uint8)

    source = PythonSource(Labelled(), num_channels=1)
    assert source.labels.tolist() == [1, 0, 1] and source.classes == ["cat", "dog"]
    assert [source[i][1] for i in range(3)] == [1, 0, 1]
    assert source.description == "python:Labelled (3 items)"


def test_a_bad_item_is_one_error_naming_the_index_and_the_accepted_types(tmp_path, tiny_cfg):
    with pytest.raises(SoveError) as e:
        sove.pretrain(tiny_cfg("data.root=unused", f"trainer.out_dir={tmp_path}"), dataset=["not an image"])
    assert str(e.value) == f"dataset item 0 is a str; accepted: {ACCEPTED}"
    assert not (tmp_path / "sove").exists()  # refused before any run directory
    source = PythonSource([np.zeros((4, 4), np.uint8), np.zeros((4, 4), np.float32)], num_channels=1)
    with pytest.raises(SoveError, match=re.escape("dataset item 1 is a ndarray of dtype float32 and shape (4, 4); "
                                                  f"accepted: {ACCEPTED}")):
        source[1]


def test_bad_keywords_and_keys_are_named(tmp_path):
    with pytest.raises(ConfigError, match=r"^sove.pretrain\(optimizer=...\): 'optimizer' is not a config section or "
                                          r"key; the sections are data, mask, model, loss, peers, optim, trainer, "
                                          r"eval \(each a dict\), the keys method$"):
        sove.pretrain({"optim": {"epochs": 1}}, optimizer={"epochs": 1})
    with pytest.raises(ConfigError, match=r"^sove.pretrain\(optim=...\): a config section takes a dict"):
        sove.pretrain(None, optim=1)
    with pytest.raises(ConfigError, match=r"^config key 'optim.epoch'"):
        sove.pretrain("fashion_mnist_tiny", optim={"epoch": 1})


class Noise(torch.utils.data.Dataset):
    """32 RGB 20x20 images as (image, label) tuples, two classes by brightness; ``targets`` as torchvision's."""

    def __init__(self, n: int = 32):
        self.pixels = _pixels(n)
        self.pixels[n // 2:] //= 4
        self.targets = [int(k < n // 2) for k in range(n)]

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        return Image.fromarray(self.pixels[i]), self.targets[i]


@pytest.fixture(scope="module")
def python_runs(tmp_path_factory, tiny_overrides):
    """A straight run of 4 steps (dict config) and the same run (DictConfig) stopped at step 3, mid-epoch, and
    resumed with dataset= to step 4."""
    tmp = tmp_path_factory.mktemp("api")
    dotlist = tiny_overrides + ["data.root=unused", f"trainer.out_dir={tmp}"]
    config = OmegaConf.to_container(OmegaConf.from_dotlist(dotlist))
    sove.pretrain(config, Noise(), trainer={"name": "straight", "max_steps": 4})
    sove.pretrain(load_config(None, dotlist), dataset=Noise(), trainer={"name": "resumed", "max_steps": 3})
    assert sove.Run(tmp / "resumed").step == 3
    run = sove.resume(tmp / "resumed", dataset=Noise(), trainer={"max_steps": 4})
    return tmp, run


def test_resume_with_the_dataset_equals_the_straight_run(python_runs):
    tmp, run = python_runs
    assert run.path == tmp / "resumed" and run.step == 4
    a = with_method_state(load_checkpoint(tmp / "straight" / "checkpoints" / "last.pt"))
    b = with_method_state(load_checkpoint(run.checkpoint))
    for part in ("student", "teacher", "method"):
        assert a[part].keys() == b[part].keys()
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), f"{part}.{key} differs after resume"
    exported = sove.load_backbone(run.export())  # the timm model of the Run's teacher
    assert torch.equal(exported.pos_embed, run.backbone().vit.pos_embed)


def test_a_python_dataset_run_is_refused_where_sove_cannot_read_it(python_runs, capsys):
    tmp, run = python_runs
    advice = ("data.source=python: the images come from a Python dataset (python:Noise (32 items)) given to "
              "sove.pretrain(dataset=...), which sove cannot read from a config: set it only through sove.pretrain / "
              "sove.resume (dataset=); to evaluate such a run use data.source=folder data.root=TRAIN "
              "data.test_root=TEST (or --backbone with your own folder)")
    capsys.readouterr()
    assert main(["eval", "knn", "--run", str(run.path)]) == 2
    assert capsys.readouterr().err == f"sove: error: {advice}\n"
    assert main(["pretrain", "--resume", str(run.path), "trainer.max_steps=9"]) == 2
    assert capsys.readouterr().err == f"sove: error: {advice}\n"
    with pytest.raises(SoveError, match=f"^{re.escape(advice)}$"):
        sove.resume(run, trainer={"max_steps": 9})
    with pytest.raises(SoveError, match=re.escape("sove.resume(dataset=...): got python:Noise (30 items), the run "
                                                  "was trained on python:Noise (32 items); pass the same dataset")):
        sove.resume(run, dataset=Noise(30), trainer={"max_steps": 9})
    assert run.step == 4  # nothing was touched


def test_sove_exports_the_api_lazily():
    assert sove.pretrain is sys.modules["sove.api"].pretrain and sove.Run is sys.modules["sove.run"].Run
    with pytest.raises(AttributeError, match="module 'sove' has no attribute 'pretrian'"):
        sove.pretrian


def test_data_source_python_from_a_config_says_where_it_belongs(tmp_path, capsys):
    """Regression: `sove pretrain data.source=python` answered `data.root: is required when data.source=python`,
    and with a root `this run was trained on a Python dataset (imgs)` for a run that did not exist."""
    from sove.cli import main
    from sove.errors import ConfigError

    with pytest.raises(ConfigError, match=r"^data.source: python is set by sove.pretrain\(dataset=...\) / "
                                          r"sove.resume\(dataset=...\) only"):
        load_config(None, ["data.source=python"])
    assert main(["pretrain", "data.source=python", f"data.root={tmp_path}", f"trainer.out_dir={tmp_path}"]) == 2
    assert capsys.readouterr().err.startswith(
        f"sove: error: data.source=python: the images come from a Python dataset ({tmp_path}) given to "
        "sove.pretrain(dataset=...), which sove cannot read from a config")


UNUSED_TEST_DATASET = ("sove: warning: test_dataset= is used only by the periodic k-NN, which eval.knn_every_epochs=0 "
                       "turns off; set eval.knn_every_epochs=N to evaluate every N epochs")


def test_test_dataset_gives_a_python_dataset_run_its_periodic_knn(tmp_path, capsys, tiny_overrides):
    """Before: the periodic k-NN of a Python-dataset run was always skipped (no test split). Its value at the last
    step equals a hand-made weighted k-NN of the final teacher on the two datasets (all images: the subsets are
    larger than the splits)."""
    import torchvision.transforms.v2.functional as TF

    dotlist = tiny_overrides + ["data.root=unused", f"trainer.out_dir={tmp_path}", "trainer.name=r",
                                "eval.knn_every_epochs=1"]
    train, test = Noise(32), Noise(16)
    run = sove.pretrain(load_config(None, dotlist), dataset=train, test_dataset=test)
    out, err = capsys.readouterr()
    assert "periodic k-NN on a class-balanced subset: 32 train / 16 test images of 2 classes" in out
    assert UNUSED_TEST_DATASET not in err.splitlines()
    assert "k-NN" not in err  # trainer.progress=false (TINY): no feature bars (before: one per split and epoch)
    knn = [(int(r["step"]), float(r["knn_top1"])) for r in run.metrics() if r.get("knn_top1")]
    assert [s for s, _ in knn] == [4, 8]

    cfg, backbone = run.config, run.backbone()

    def features(ds):
        x = torch.stack([TF.to_dtype(TF.pil_to_tensor(ds[i][0]), torch.float32, scale=True) for i in range(len(ds))])
        x = TF.normalize(TF.center_crop(TF.resize(x, 16, antialias=True), [16, 16]), list(cfg.data.mean),
                         list(cfg.data.std))
        with torch.no_grad():
            return torch.nn.functional.normalize(backbone(x)["global"].double(), dim=1)

    ftr, fte = features(train), features(test)
    ytr, yte = torch.tensor(train.targets), torch.tensor(test.targets)
    best = 0.0
    for k in cfg.eval.knn_k:
        hits = 0
        for q in range(len(test)):
            sim, idx = (ftr @ fte[q]).topk(k)
            votes = torch.zeros(2, dtype=torch.float64).index_add_(0, ytr[idx], (sim / 0.07).exp())
            hits += int(votes.argmax() == yte[q])
        best = max(best, 100.0 * hits / len(test))
    assert knn[-1][1] == pytest.approx(best, abs=1e-9)


def test_test_dataset_with_the_periodic_knn_off_is_one_warning(tmp_path, capsys, tiny_overrides):
    """Before: with eval.knn_every_epochs=0 (the default) test_dataset= was silently never used."""
    dotlist = tiny_overrides + ["data.root=unused", f"trainer.out_dir={tmp_path}", "trainer.name=r",
                                "trainer.max_steps=1"]
    run = sove.pretrain(load_config(None, dotlist), dataset=Noise(), test_dataset=Noise(16))
    assert capsys.readouterr().err.splitlines().count(UNUSED_TEST_DATASET) == 1
    sove.resume(run, dataset=Noise(), test_dataset=Noise(16), trainer={"max_steps": 2})
    assert capsys.readouterr().err.splitlines().count(UNUSED_TEST_DATASET) == 1


def test_test_dataset_errors_name_what_to_do(image_folder):
    with pytest.raises(SoveError, match=r"^test_dataset= is the periodic k-NN's test split of a Python dataset=, "
                                        r"and this run has a folder dataset=: set data.test_root=TEST_FOLDER instead$"):
        sove.pretrain("fashion_mnist_tiny", str(image_folder), test_dataset=Noise(4))
    unlabelled = [torch.zeros(3, 8, 8, dtype=torch.uint8)] * 4
    with pytest.raises(SoveError, match=r"^test_dataset=: the list has no .targets / .labels"):
        sove.pretrain("fashion_mnist_tiny", Noise(8), test_dataset=unlabelled)
    three = Noise(6)
    three.targets = [0, 1, 2, 0, 1, 2]
    with pytest.raises(SoveError, match=r"^test_dataset=: label 2 is not a label of dataset= \(0 \.\. 1\)"):
        sove.pretrain("fashion_mnist_tiny", Noise(8), test_dataset=three)
