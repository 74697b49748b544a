"""The device-sensitive parts, on every device this machine has: ``pytest -m gpu``.

Each test runs once per device (``cpu`` always; ``cuda`` when a CUDA GPU is present, else skipped) and
checks the device's result against an independent float64 reference (tests/reference.py) and, on CUDA,
against the same computation in CPU fp32. ``benchmarks/gpu_check.sh`` runs these on a GPU machine.

Tolerances (docs/method.md, "Precision, memory and reproducibility"):

* fp32 on CUDA vs CPU: 1e-5 absolute on probabilities, 1e-5 relative on losses (TF32 off for
  matmuls and cuDNN; the products accumulate in another order on each device);
* bf16 autocast: concept probabilities are computed in fp32 with autocast off, so under autocast they
  equal the fp32 ones within the fp32 tolerance; a ``bfloat16`` judge search picks the fp32
  search's judges for at least 98% of the judges on random unit features, where the neighbours'
  similarities crowd together (it may swap two whose similarities round to the same bf16 value);
  the anchors and the fp32 weights of the judges it picks are the same.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import reference as ref
from sove.method import FeatureSet
from sove.method.concepts import draw_anchors, select_judges
from sove.method.losses import cls_loss, patch_loss
from sove.train.optim import EMA

pytestmark = pytest.mark.gpu

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                 reason="no CUDA GPU on this machine"))]


@pytest.fixture(autouse=True)
def _no_tf32():
    """Plain fp32 products on CUDA (the comparisons below are fp32 vs fp32): matmuls and cuDNN (the
    patch convolution); torch's ``fp32_precision`` settings where they exist, else the legacy flags."""
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        knobs = (torch.backends.cuda.matmul, torch.backends.cudnn.conv)
        before = [k.fp32_precision for k in knobs]
        for k in knobs:
            k.fp32_precision = "ieee"
        yield
        for k, value in zip(knobs, before):
            k.fp32_precision = value
        return
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def _problem(seed: int = 0, n: int = 256, d: int = 32, k: int = 24, j: int = 4):
    features = ref.unit(n, d, seed=seed)
    anchors = draw_anchors(n, k, torch.Generator().manual_seed(seed))
    return features, anchors, j


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("label_mode", ["soft", "onehot"])
def test_concepts_and_losses_match_the_reference(device, label_mode):
    features, anchors, j = _problem()
    concepts = select_judges(features.to(device), anchors.to(device), num_judges=j, label_mode=label_mode,
                             chunk_size=7)  # several chunks
    want_index = ref.judge_index(features, anchors, j)
    assert torch.equal(concepts.judge_index.cpu(), want_index)
    want_w = ref.weights(features, want_index, 0.1, label_mode)
    torch.testing.assert_close(concepts.weights.cpu().double(), want_w, atol=1e-6, rtol=0)

    judges = features[want_index]
    student = ref.unit(6, 5, 32, seed=1)  # 2 globals + 4 locals, batch 5
    teacher = ref.unit(2, 5, 32, seed=2)
    p = concepts.probs(student[0].to(device), 0.1)
    assert p.dtype == torch.float32
    torch.testing.assert_close(p.sum(1).cpu(), torch.ones(5), atol=1e-6, rtol=0)
    torch.testing.assert_close(p.cpu().double(), ref.probs(judges, want_w, student[0], 0.1), atol=1e-5, rtol=0)

    got = cls_loss(student.to(device), teacher.to(device), concepts, 0.1, 0.04)
    assert float(got) == pytest.approx(ref.cls_loss(student, teacher, judges, want_w, 0.1, 0.04), rel=1e-5)
    tokens_s, tokens_t = ref.unit(9, 32, seed=3), ref.unit(9, 32, seed=4)
    owner = torch.tensor([0, 0, 1, 3, 3, 3, 5, 6, 6])
    got = patch_loss(tokens_s.to(device), tokens_t.to(device), owner.to(device), 8, concepts, 0.1, 0.07)
    want = ref.patch_loss(tokens_s, tokens_t, owner, 8, judges, want_w, 0.1, 0.07)
    assert float(got) == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_loss_gradients_match_cpu_fp32(device):
    """The CLS loss gradient w.r.t. the student embeddings equals CPU fp32 (and the paper-size path through
    precomputed similarities, :meth:`Concepts.probs_from_similarity`, equals the direct one)."""
    features, anchors, j = _problem(seed=5)
    grads = {}
    for where in ("cpu", device):
        concepts = select_judges(features.to(where), anchors.to(where), num_judges=j)
        student = ref.unit(4, 3, 32, seed=6).to(where).requires_grad_()
        teacher = ref.unit(2, 3, 32, seed=7).to(where)
        cls_loss(student, teacher, concepts, 0.1, 0.04).backward()
        grads[where] = student.grad.cpu()
        sims = (student.reshape(-1, 32) @ features.to(where).T, teacher.reshape(-1, 32) @ features.to(where).T)
        student.grad = None
        cls_loss(student, teacher, concepts, 0.1, 0.04, *sims).backward()
        torch.testing.assert_close(student.grad.cpu(), grads[where], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(grads[device], grads["cpu"], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_concept_probabilities_under_bf16_autocast_are_fp32(device):
    features, anchors, j = _problem(seed=8)
    concepts = select_judges(features.to(device), anchors.to(device), num_judges=j)
    u = ref.unit(16, 32, seed=9).to(device)
    plain = concepts.probs(u, 0.04)
    with torch.autocast(device_type=device, dtype=torch.bfloat16):
        mixed = concepts.probs(u, 0.04)
        log_mixed = concepts.log_probs(u, 0.04)
    assert mixed.dtype == log_mixed.dtype == torch.float32
    torch.testing.assert_close(mixed, plain, atol=1e-6, rtol=0)
    torch.testing.assert_close(log_mixed.exp(), plain, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_judge_search_agrees_with_fp32(device):
    features, anchors, j = _problem(seed=10, n=4096, d=64, k=256, j=9)
    exact = select_judges(features.to(device), anchors.to(device), num_judges=j)
    low = select_judges(features.to(device), anchors.to(device), num_judges=j, search_dtype=torch.bfloat16)
    # share of each concept's bf16-chosen judges that the fp32 search chose too (98.9% measured on the CPU)
    shared = (low.judge_index[:, :, None] == exact.judge_index[:, None, :]).any(2).float().mean()
    assert float(shared) >= 0.98
    assert torch.equal(low.judge_index[:, 0], exact.judge_index[:, 0])  # anchors never move
    assert low.weights.dtype == torch.float32  # weights recomputed in fp32 from the rows
    agree = (low.judge_index == exact.judge_index).all(1)
    torch.testing.assert_close(low.weights[agree], exact.weights[agree], atol=0, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_feature_set_enqueue_wraps_on_device(device):
    fs = FeatureSet(5, 4, seed=0).to(device)
    rows = F.normalize(torch.arange(28, dtype=torch.float32).view(7, 4) + 1, dim=1)
    fs.enqueue(rows[:3].to(device), torch.tensor([10, 11, 12], device=device))
    fs.enqueue(rows[3:].to(device), torch.tensor([13, 14, 15, 16], device=device))
    # 7 rows into 5 slots: rows 5, 6 overwrite slots 0, 1 (FIFO)
    torch.testing.assert_close(fs.features.cpu(), torch.cat([rows[5:7], rows[2:5]]), atol=0, rtol=0)
    assert fs.indices.cpu().tolist() == [15, 16, 12, 13, 14] and int(fs.ptr) == 2


@pytest.mark.parametrize("device", DEVICES)
def test_masked_forward_and_ema_match_cpu(device, tiny_cfg, tmp_path):
    from sove.models import build_networks

    cfg = tiny_cfg(f"data.root={tmp_path}", "model.drop_path_rate=0")  # no random drop path: comparable
    outs, teachers = {}, {}
    for where in ("cpu", device):
        student, teacher = (m.to(where) for m in build_networks(cfg, seed=0))
        g = torch.Generator().manual_seed(0)
        gl = torch.randn(4, 3, 16, 16, generator=g).to(where)
        lc = torch.randn(4, 3, 8, 8, generator=g).to(where)
        masks = (torch.rand(4, 16, generator=g) < 0.4).to(where)
        out = student(gl, lc, masks=masks)
        clean = student(gl, lc)
        # a masked position's token differs from the clean one; an unmasked image's token does not
        assert not torch.allclose(out["cls"][:4], clean["cls"][:4])
        outs[where] = {k: v.detach().cpu() for k, v in out.items()}
        ema = EMA(student, teacher)
        with torch.no_grad():
            for p in student.parameters():
                p.add_(0.01)
        ema.update(0.9)
        teachers[where] = {k: v.detach().cpu() for k, v in teacher.state_dict().items()}
        if where == "cpu":  # EMA by hand: 0.9 * t + 0.1 * (t + 0.01) = t + 0.001 (teacher = student copy)
            start = build_networks(cfg, seed=0)[1].state_dict()
            for k, v in teachers[where].items():
                if v.is_floating_point():
                    torch.testing.assert_close(v, start[k] + 0.001, atol=1e-6, rtol=0)
    for k in outs["cpu"]:
        torch.testing.assert_close(outs[device][k], outs["cpu"][k], atol=2e-5, rtol=1e-4)
    for k in teachers["cpu"]:
        torch.testing.assert_close(teachers[device][k], teachers["cpu"][k], atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_checkpoint_save_load_resume_is_bit_identical(device, tmp_path, image_folder, tiny_overrides):
    """2 epochs straight == stop after step 5 + resume, bit for bit, on ``device`` with
    ``trainer.deterministic=true``; the checkpoint loads on the CPU (``map_location``) too."""
    from helpers import with_method_state
    from sove.api import pretrain, resume
    from sove.config import load_config
    from sove.train.checkpoint import load_checkpoint

    accelerator = "cpu" if device == "cpu" else "gpu"
    base = tiny_overrides + [f"data.root={image_folder}", f"trainer.out_dir={tmp_path}", "trainer.loggers=[csv]",
                             f"trainer.accelerator={accelerator}", "trainer.deterministic=true"]
    pretrain(load_config(None, base + ["trainer.name=straight"]))
    pretrain(load_config(None, base + ["trainer.name=resumed", "trainer.max_steps=5"]))
    resume(tmp_path / "resumed", trainer={"max_steps": None})
    assert not torch.are_deterministic_algorithms_enabled()  # restored when each run ended
    a = with_method_state(load_checkpoint(tmp_path / "straight" / "checkpoints" / "last.pt"))
    b = with_method_state(load_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.pt"))
    assert a["step"] == b["step"] == 8
    for part in ("student", "teacher", "method"):
        for key in a[part]:
            assert a[part][key].device.type == "cpu"
            assert torch.equal(a[part][key], b[part][key]), f"{part}.{key} differs after resume on {device}"
    for i, state in a["optimizer"]["state"].items():
        for key, value in state.items():
            assert torch.equal(value, b["optimizer"]["state"][i][key]), f"optimizer {i}.{key} differs on {device}"
    if device == "cuda":
        assert "cuda" in a["rng"] and len(a["rng"]["cuda"]) == torch.cuda.device_count()
