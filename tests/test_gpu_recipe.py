"""benchmarks/gpu_recipe.py's batch tiling and the trainer's phase timer that it reads (the concept
selection share of a step is timed inside the objective phase)."""

from __future__ import annotations

from contextlib import contextmanager

import torch

from gpu_recipe import tile
from sove.method.losses import no_phase
from sove.run import prepare_run_dir
from sove.train.trainer import Trainer


def test_tile_repeats_the_rows_and_gives_distinct_indices():
    crops = [torch.arange(3.0).view(3, 1, 1, 1).expand(3, 2, 4, 4), torch.arange(3.0).view(3, 1, 1, 1) + 10]
    masks = torch.tensor([[True, False, True], [False, False, True]])[..., None].expand(2, 3, 5)
    batch = {"crops": crops, "masks": masks, "index": torch.tensor([7, 8, 9]), "label": torch.zeros(3), "skipped": []}
    out = tile(batch, 7, torch.device("cpu"))
    assert [c.shape[0] for c in out["crops"]] == [7, 7] and out["masks"].shape == (2, 7, 5)
    assert out["crops"][0][:, 0, 0, 0].tolist() == [0, 1, 2, 0, 1, 2, 0]
    assert out["crops"][1].flatten().tolist() == [10, 11, 12, 10, 11, 12, 10]
    assert out["masks"][:, :, 0].tolist() == [[True, False, True, True, False, True, True],
                                              [False, False, True, False, False, True, False]]
    assert out["index"].tolist() == list(range(7))  # distinct rows for the feature sets


def test_concept_selection_is_timed_inside_the_objective_once_per_task(tmp_path, image_folder, tiny_cfg):
    cfg = tiny_cfg(f"data.root={image_folder}", f"trainer.out_dir={tmp_path}", "trainer.max_steps=2")
    trainer = Trainer(cfg, prepare_run_dir(cfg, overwrite=True))
    events: list[tuple[str, str]] = []

    @contextmanager
    def timer(name: str):
        events.append(("enter", name))
        yield
        events.append(("exit", name))

    trainer.timer = timer
    trainer.fit()
    inside, selections = [], 0
    for kind, name in events:
        if kind == "enter" and name == "concept selection":
            assert inside[-1:] == ["objective"]  # nested in the objective phase
            selections += 1
        inside = inside + [name] if kind == "enter" else inside[:-1]
    # TINY: 2 CLS tasks + 1 patch task per step, 2 steps
    assert selections == 2 * (cfg.loss.cls.num_tasks + cfg.loss.patch.num_tasks) == 6
    assert [n for k, n in events if k == "enter"].count("objective") == 2
    assert trainer.method.loss_fn.phase is no_phase  # the trainer's timer is not kept (no reference cycle)
