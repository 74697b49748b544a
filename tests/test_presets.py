"""Presets state only what differs from the defaults and resolve exactly as before they were shortened; every
config value has one definition (concept settings, choice lists, search dtype); the CLI lists the presets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from omegaconf import OmegaConf

from sove.cli import main
from sove.config import PRESET_DIR, SOVEConfig, load_config
from sove.errors import ConfigError

#: Every packaged preset (and the bare defaults) resolved by the code before the presets were rewritten as
#: differences from the defaults (one dotted key per value).
RESOLVED = json.loads((Path(__file__).parent / "fixtures" / "presets_resolved.json").read_text())
#: Keys added since that dump, with the value every preset resolves to.
ADDED = {"loss.search_dtype": "float32", "method": "sove", "peers.num_prototypes": 4096, "peers.center_momentum": 0.9,
         "trainer.auto_resume": False, "trainer.deterministic": False}
PRESETS = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def leaves(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        out.update(leaves(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return out


def resolved(name: str | None) -> dict:
    overrides = ["data.root=unused"] if name == "folder_vit_tiny" else []
    return leaves(OmegaConf.to_container(load_config(name, overrides)))


@pytest.mark.parametrize("name", [None, *PRESETS])
def test_each_preset_resolves_exactly_as_before(name):
    now = resolved(name)
    assert {k: now.pop(k) for k in ADDED} == ADDED
    assert now == RESOLVED[name or "(defaults)"]


def test_the_dump_covers_every_packaged_preset():
    assert sorted(RESOLVED) == sorted(["(defaults)", *PRESETS])


def test_no_preset_line_restates_a_default():
    defaults = leaves(OmegaConf.to_container(OmegaConf.structured(SOVEConfig)))
    restated = {name: [k for k, v in leaves(yaml.safe_load((PRESET_DIR / f"{name}.yaml").read_text())).items()
                       if defaults[k] == v] for name in PRESETS}
    assert restated == {name: [] for name in PRESETS}


def test_paper_presets_are_a_few_lines():
    lengths = {name: len((PRESET_DIR / f"{name}.yaml").read_text().splitlines()) for name in PRESETS}
    assert all(lengths[name] <= 10 for name in PRESETS if name.startswith("imagenet_")), lengths


def test_pretrain_help_lists_every_preset_with_its_description(capsys):
    with pytest.raises(SystemExit):
        main(["pretrain", "--help"])
    help_lines = capsys.readouterr().out.splitlines()
    assert main(["presets"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in table] == PRESETS
    assert help_lines[-len(PRESETS) - 1:] == ["packaged presets (--config NAME):"] + [f"  {line}" for line in table]


def test_concept_settings_are_one_dataclass():
    from sove.method import ConceptSettings
    from sove.method.sove import build_sove_loss as build_loss

    cfg = load_config("fashion_mnist_tiny")
    assert OmegaConf.get_type(cfg.loss.cls) is ConceptSettings
    loss = build_loss(cfg)
    assert loss.cls == ConceptSettings(num_anchors=512, num_tasks=2)
    assert loss.patch == ConceptSettings(num_anchors=128, num_judges=1, num_tasks=1)


@pytest.mark.parametrize("value, dtype", [("float32", torch.float32), ("bfloat16", torch.bfloat16),
                                          ("float16", torch.float16), ("auto", torch.float32)])
def test_search_dtype_is_a_config_key(value, dtype, monkeypatch):
    from sove.method.sove import build_sove_loss as build_loss

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # auto: float32 off CUDA
    assert build_loss(load_config("fashion_mnist_tiny", [f"loss.search_dtype={value}"])).search_dtype == dtype


def test_choice_errors_come_from_the_shared_lists():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["loss.search_dtype=half"])
    assert str(err.value) == "loss.search_dtype: must be one of float32, bfloat16, float16, auto; got 'half'"
    with pytest.raises(ConfigError) as err:
        load_config(None, ["loss.patch.label_mode=hard"])
    assert str(err.value) == "loss.patch.label_mode: ('hard') must be one of soft, onehot"


def test_loggers_choice_matches_the_builders():
    from sove.choices import LOGGERS
    from sove.train.loggers import _BUILDERS

    assert sorted(LOGGERS) == sorted(_BUILDERS)


def test_concept_range_is_one_check_for_the_config_and_the_library():
    """The config line names the key; a direct call of the library gets the same words as a ValueError."""
    from sove.method import select_judges

    with pytest.raises(ConfigError) as err:
        load_config(None, ["loss.cls.smoothing=1.0"])
    assert str(err.value) == "loss.cls.smoothing: (1.0) must be in [0, 1)"
    with pytest.raises(ValueError) as err:
        select_judges(torch.eye(4), torch.tensor([0, 1]), num_judges=1, smoothing=1.0)
    assert str(err.value) == "smoothing (1.0) must be in [0, 1)"
    with pytest.raises(ConfigError) as err:
        load_config("fashion_mnist_tiny", ["loss.cls.num_judges=4000"])
    assert str(err.value) == ("loss.cls.num_judges: (4000) too large: the pool left after removing num_anchors (512) "
                              "anchors from the feature set (4096 rows) has 3584 rows (loss.cls_feature_set_size)")
