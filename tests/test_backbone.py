"""MaskedViT: mask token before the position embedding, teacher without one, dynamic image size."""

from __future__ import annotations

import pytest
import torch

from sove.models.backbone import MaskedViT, create_vit


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    return create_vit("vit_tiny", 28, 7, 1, depth=2, embed_dim=32, num_heads=2).eval()


def test_mask_token_replaces_exactly_masked_patches(vit):
    model = MaskedViT(vit)
    x = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[0, [0, 5, 15]] = True
    mask[1, [3]] = True
    with torch.no_grad():
        clean = model.embed(x, None)
        masked = model.embed(x, mask)
    prefix = vit.num_prefix_tokens
    assert prefix == 1 and clean.shape == masked.shape == (2, 1 + 16, 32)
    token_mask = torch.cat([torch.zeros(2, prefix, dtype=torch.bool), mask], dim=1)  # (batch, tokens)
    assert torch.equal(masked[~token_mask], clean[~token_mask])  # CLS and unmasked patches untouched
    assert (masked[token_mask] - clean[token_mask]).abs().amax(dim=1).min() > 0

    # Masked rows are mask_token + the position embedding of their own position.
    with torch.no_grad():
        model.mask_token.copy_(torch.linspace(-1.0, 1.0, 32))
        masked = model.embed(x, mask)
    pos = vit.pos_embed[0]  # (1 + 16, 32): CLS position first
    for b, p in mask.nonzero().tolist():
        torch.testing.assert_close(masked[b, prefix + p], model.mask_token + pos[prefix + p], atol=1e-6, rtol=0)
    assert torch.equal(masked[~token_mask], clean[~token_mask])
    # Different positions keep different embeddings even though they share the mask token.
    assert not torch.allclose(masked[0, prefix + 0], masked[0, prefix + 5])


def test_teacher_without_mask_token_rejects_mask(vit):
    teacher = MaskedViT(vit, with_mask_token=False)
    assert teacher.mask_token is None
    x = torch.randn(1, 1, 28, 28)
    with pytest.raises(ValueError, match="mask token"):
        teacher(x, torch.zeros(1, 16, dtype=torch.bool))


def test_wrong_mask_shape_raises(vit):
    model = MaskedViT(vit)
    with pytest.raises(ValueError, match=r"\(1, 16\)"):
        model.embed(torch.randn(1, 1, 28, 28), torch.zeros(1, 9, dtype=torch.bool))


def test_dynamic_img_size_token_counts(vit):
    model = MaskedViT(vit)
    assert model.grid(28) == (4, 4) and model.grid(14) == (2, 2)
    with torch.no_grad():
        big = model(torch.randn(2, 1, 28, 28))
        small = model(torch.randn(3, 1, 14, 14))
    assert big["patches"].shape == (2, 16, 32) and big["cls"].shape == (2, 32)
    assert small["patches"].shape == (3, 4, 32) and small["cls"].shape == (3, 32)


def test_deterministic_position_embedding_resample_equals_timms():
    """With deterministic algorithms on, the local crops' position embedding is a cached matrix times
    the embedding (its CUDA backward has no atomics); values and gradients equal timm's resample."""
    from sove.models.backbone import resample_matrix

    torch.manual_seed(0)
    vit = MaskedViT(create_vit("vit_tiny", 28, 7, 1, depth=2, embed_dim=32, num_heads=2))
    student = vit.vit
    torch.nn.init.normal_(student.pos_embed, std=0.5)
    grid = tuple(student.patch_embed.grid_size)
    x = torch.randn(3, grid[0] // 2, grid[1] // 2, student.embed_dim)
    outs, grads = [], []
    for deterministic in (False, True):
        torch.use_deterministic_algorithms(deterministic)
        try:
            student.pos_embed.grad = None
            out = vit.position_embed(x)
            out.square().sum().backward()
        finally:
            torch.use_deterministic_algorithms(False)
        outs.append(out.detach())
        grads.append(student.pos_embed.grad.clone())
    assert outs[0].shape == (3, 1 + (grid[0] // 2) * (grid[1] // 2), student.embed_dim)
    torch.testing.assert_close(outs[1], outs[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grads[1], grads[0], atol=1e-4, rtol=1e-5)
    w = resample_matrix(grid, (grid[0] // 2, grid[1] // 2), "cpu")
    assert w.shape == ((grid[0] // 2) * (grid[1] // 2), grid[0] * grid[1])
    torch.testing.assert_close(w.sum(1), torch.ones(w.shape[0]), atol=1e-5, rtol=0)  # interpolation weights
    full = torch.randn(3, *grid, student.embed_dim)
    torch.use_deterministic_algorithms(True)
    try:
        same_grid = vit.position_embed(full)
    finally:
        torch.use_deterministic_algorithms(False)
    torch.testing.assert_close(same_grid, student._pos_embed(full), atol=0, rtol=0)  # native grid: timm's path
