"""Multi-crop views, the SSL dataset and its collate function (docs/method.md, "Views and augmentation")."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from sove.data import MultiCropAugmentation, SSLDataset, collate_views
from sove.data.multicrop import blur_kernel_size, random_crop_box


class _Constant(Dataset):
    """Constant uint8 images of value ``index`` (shape (channels, 30, 30)), label index % 3."""

    def __init__(self, n=5, channels=1):
        self.n, self.channels = n, channels

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return torch.full((self.channels, 30, 30), 10 * i, dtype=torch.uint8), i % 3


@pytest.mark.parametrize("channels", [1, 3])
def test_views_count_shape_dtype(channels):
    aug = MultiCropAugmentation(16, 8, num_local_crops=3, num_channels=channels)
    views = aug(torch.randint(0, 256, (channels, 30, 20), dtype=torch.uint8))
    assert len(views) == 2 + 3
    assert [tuple(v.shape) for v in views] == [(channels, 16, 16)] * 2 + [(channels, 8, 8)] * 3
    assert all(v.dtype == torch.float32 for v in views)


def test_constant_image_stays_constant():
    aug = MultiCropAugmentation(16, 8, num_local_crops=4, color_jitter=0.0, solarize_p=0.0,
                                mean=(0.25,), std=(0.5,))
    expected = (200 / 255 - 0.25) / 0.5
    for _ in range(5):
        for view in aug(torch.full((1, 30, 30), 200, dtype=torch.uint8)):
            torch.testing.assert_close(view, torch.full_like(view, expected), atol=1e-5, rtol=0)


def test_unresized_crops_do_not_share_memory():
    # Crop = whole image at its own size: the crop kernel returns a view of the input; the
    # in-place normalisation of one view must not leak into the next.
    aug = MultiCropAugmentation(30, 30, num_local_crops=2, global_crop_scale=(1.0, 1.0),
                                local_crop_scale=(1.0, 1.0), color_jitter=0.0, blur=False,
                                solarize_p=0.0)
    image = torch.randint(0, 256, (1, 30, 30), dtype=torch.uint8)
    expected = (image.float() / 255 - 0.5) / 0.5
    for view in aug(image):
        assert torch.allclose(view, expected, atol=1e-6) or torch.allclose(
            view, expected.flip(-1), atol=1e-6)


def test_jittered_constant_image_is_uniform_per_view():
    aug = MultiCropAugmentation(16, 8, num_local_crops=2, num_channels=3, color_jitter=1.0)
    for view in aug(torch.full((3, 30, 30), 90, dtype=torch.uint8)):
        spread = view.flatten(1).max(1).values - view.flatten(1).min(1).values
        assert spread.max() < 1e-4


def test_crop_box_and_kernel_size():
    assert random_crop_box(28, 28, (1.0, 1.0), [0.5] * 40) == (0, 0, 28, 28)
    assert random_crop_box(10, 40, (1.0, 1.0), [0.5] * 40) == (0, 13, 10, 13)  # fallback: centred
    assert [blur_kernel_size(s) for s in (8, 28, 32, 96, 224)] == [3, 3, 3, 11, 23]


def test_wrong_input_raises():
    aug = MultiCropAugmentation(16, 8, num_local_crops=1)
    with pytest.raises(ValueError, match="uint8 image of shape \\(1, height, width\\)"):
        aug(torch.zeros(3, 30, 30, dtype=torch.uint8))


def test_ssl_dataset_and_collate():
    aug = MultiCropAugmentation(16, 8, num_local_crops=2, color_jitter=0.0, solarize_p=0.0)
    ds = SSLDataset(_Constant(), aug, patch_size=4, mask_ratio=0.5)
    item = ds[2]
    assert item["index"] == 2 and item["label"] == 2 and ds.grid == (4, 4)
    assert item["masks"].shape == (2, 16) and item["masks"].dtype == torch.bool
    assert item["masks"].sum(1).tolist() == [8, 8]
    batch = next(iter(DataLoader(ds, batch_size=4, collate_fn=collate_views)))
    assert [tuple(c.shape) for c in batch["crops"]] == [(4, 1, 16, 16)] * 2 + [(4, 1, 8, 8)] * 2
    assert batch["masks"].shape == (2, 4, 16) and batch["masks"].dtype == torch.bool
    assert batch["index"].tolist() == [0, 1, 2, 3] and batch["index"].dtype == torch.int64
    assert batch["label"].tolist() == [0, 1, 2, 0] and batch["label"].dtype == torch.int64
    # Image i is constant with value 10 * i: row i of every stacked view keeps that value.
    expected = (10 * torch.arange(4.0) / 255 - 0.5) / 0.5
    for crops in batch["crops"]:
        torch.testing.assert_close(crops.flatten(1).amin(1), expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(crops.flatten(1).amax(1), expected, atol=1e-5, rtol=0)


def test_ssl_dataset_follows_manual_seed():
    ds = SSLDataset(_Constant(), MultiCropAugmentation(16, 8, 2), patch_size=4)
    torch.manual_seed(0)
    a = ds[1]
    torch.manual_seed(0)
    b = ds[1]
    assert torch.equal(a["masks"], b["masks"])
    assert all(torch.equal(x, y) for x, y in zip(a["crops"], b["crops"]))


def test_patch_size_must_divide_crop():
    with pytest.raises(ValueError, match="multiple of patch_size"):
        SSLDataset(_Constant(), MultiCropAugmentation(18, 8, 1), patch_size=4)
