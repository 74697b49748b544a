"""data.augment_on=device: same parameters, distributions and (up to resampling) pixels as the
loader path; padding, size bound, persistent workers (sove.data.decoded, sove.data.device_augment)."""

from __future__ import annotations

import pytest
import torch
import torchvision.transforms.v2 as v2
from scipy import stats
from torch.utils.data import DataLoader, Dataset

from sove.config import load_config
from sove.data.decoded import DecodedDataset, bound_size, crop_boxes, pad_to_canvas, view_params
from sove.data.device_augment import DeviceMultiCrop
from sove.data.multicrop import MultiCropAugmentation, SSLDataset, collate_views, random_crop_box
from sove.data.sampler import EpochKeys, ResumableSampler
from sove.errors import ConfigError, DataError
from sove.train.builders import build_train_dataset, resolve_augment_on

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _one_thread():
    """Small tensors: a second intra-op thread only adds synchronisation (slow on a busy machine)."""
    torch.set_num_threads(1)
    yield


class _Smooth(Dataset):
    """Smooth uint8 images (low-frequency sinusoids, periods >= 10 px), one per index."""

    def __init__(self, n: int, channels: int = 3, height: int = 40, width: int = 50) -> None:
        self.n, self.channels, self.height, self.width = n, channels, height, width

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        if i == 3 and self.n == 7:
            raise DataError("cannot decode image 'x.jpg': truncated")
        u = torch.rand(3, self.channels, 1, 1, generator=torch.Generator().manual_seed(i))
        y, x = torch.arange(self.height).view(-1, 1) / 10.0, torch.arange(self.width) / 10.0
        image = 0.5 + 0.4 * torch.sin(u[0] * y + u[1] * x + 6.0 * u[2])  # (channels, height, width)
        return image.mul(255).round().to(torch.uint8), i % 2


def _both_paths(source, aug, n):
    loader = collate_views([SSLDataset(source, aug, 4)[i] for i in range(n)])
    dataset = DecodedDataset(source, aug, 4)
    device = dataset.augment_batch(dataset.collate([dataset[i] for i in range(n)]), CPU)
    return loader, device


def test_crop_boxes_equal_the_loader_paths_boxes():
    g = torch.Generator().manual_seed(0)
    heights, widths = torch.randint(1, 400, (3000,), generator=g), torch.randint(1, 400, (3000,), generator=g)
    heights[:300] = 10  # very wide images: the centred fallback box
    u = torch.rand(3000, 40, generator=g)
    for scale in ((0.05, 0.4), (0.14, 1.0), (1.0, 1.0)):
        got = crop_boxes(heights.double(), widths.double(), scale, u.double())
        expected = [random_crop_box(int(h), int(w), scale, row.tolist()) for h, w, row in zip(heights, widths, u)]
        assert got.tolist() == [list(map(float, box)) for box in expected]


@pytest.mark.parametrize("channels", [1, 3])
def test_without_resampling_both_paths_give_the_same_pixels(channels):
    # Crops of the whole 16 px image at 16 px: no interpolation; every colour step forced often.
    aug = MultiCropAugmentation(16, 16, 2, global_crop_scale=(1.0, 1.0), local_crop_scale=(1.0, 1.0),
                                mean=(0.4,) * channels, std=(0.3,) * channels, num_channels=channels,
                                color_jitter=1.0, grayscale_p=0.5, solarize_p=0.5)
    loader, device = _both_paths(_Smooth(32, channels, 16, 16), aug, 32)
    assert torch.equal(loader["masks"], device["masks"]) and torch.equal(loader["index"], device["index"])
    for a, b in zip(loader["crops"], device["crops"]):
        torch.testing.assert_close(b, a, atol=2e-5, rtol=0)


def test_resized_crops_agree_within_the_stated_tolerance():
    # Bicubic-antialias (loader) vs roi_align bilinear-area (device) on smooth images, default recipe.
    aug = MultiCropAugmentation(32, 16, 4, num_channels=3, mean=(0.0,) * 3, std=(1.0,) * 3)
    loader, device = _both_paths(_Smooth(16), aug, 16)
    diff = torch.cat([(a - b).abs().flatten() for a, b in zip(loader["crops"], device["crops"])])
    assert diff.mean() < 1e-3 and diff.max() < 0.03, (float(diff.mean()), float(diff.max()))  # measured 2e-4, 0.01


def test_padding_does_not_change_an_images_crops():
    # A 10 x 12 image alone and padded next to a 20 x 30 one: boxes at its right / bottom edge,
    # upscaled (bilinear reaches one pixel past the box) must not see the padding.
    small, large = _Smooth(2, 3, 10, 12)[0][0], _Smooth(2, 3, 20, 30)[1][0]
    aug = MultiCropAugmentation(16, 8, 1, num_channels=3, color_jitter=0.0, blur=False, solarize_p=0.0)
    params = view_params(torch.rand(2, 3, 54, generator=torch.Generator().manual_seed(1)),
                         torch.tensor([[10, 12], [20, 30]]), aug)
    params["boxes"][0] = torch.tensor([[4.0, 3.0, 12.0, 10.0], [0.0, 0.0, 12.0, 10.0], [9.0, 7.0, 12.0, 10.0]])
    crops = DeviceMultiCrop(aug)
    padded = crops.crops(pad_to_canvas([small, large]), params)
    alone = crops.crops(small.unsqueeze(0), {k: v[:1] for k, v in params.items()})
    for a, b in zip(alone, padded):
        torch.testing.assert_close(b[0], a[0], atol=1e-6, rtol=0)  # edge weights: float rounding only


ALPHA = 0.001  # per-test level of the distribution checks below


def test_parameter_distributions_match_torchvision_and_the_recipe():
    # 27 tests on fixed draws: each at level 0.001 (Bonferroni), a family-wise false alarm below 3%.
    # At 0.01 each, seeds failed by chance (seed 0 of the named streams: 1648 of 2000 jitters, p = 0.007).
    n = 2000
    aug = MultiCropAugmentation(32, 16, 2, num_channels=3)
    dataset = DecodedDataset(_Smooth(1, 3, 40, 50), aug, 4, mask_ratio=0.0)
    dataset.source = [dataset.source[0]] * n  # one image: the parameters are what is tested
    p = dataset.collate([dataset[i] for i in range(n)])["params"]  # the device path's own route
    torch.manual_seed(0)
    image = [torch.empty(3, 40, 50)]
    for v, spec in enumerate(aug.views[:3]):  # global 1, global 2, one local
        ref = v2.RandomResizedCrop(spec.size, scale=spec.scale, ratio=(3 / 4, 4 / 3))
        boxes = [ref.make_params(image) for _ in range(n)]
        ref_w, ref_h = (torch.tensor([float(b[k]) for b in boxes]) for k in ("width", "height"))
        w, h = (p["boxes"][:, v, 2] - p["boxes"][:, v, 0]), (p["boxes"][:, v, 3] - p["boxes"][:, v, 1])
        assert stats.ks_2samp(w * h, ref_w * ref_h).pvalue > ALPHA  # crop area
        assert stats.ks_2samp(torch.log(w / h), torch.log(ref_w / ref_h)).pvalue > ALPHA  # aspect ratio
        for key, prob in (("flip", 0.5), ("jitter", 0.8), ("gray", 0.2), ("blur", spec.blur_p),
                          ("solarize", spec.solarize_p)):
            hits = int(p[key][:, v].sum())
            assert hits == n * prob if prob in (0.0, 1.0) else stats.binomtest(hits, n, prob).pvalue > ALPHA, key
    jitter = v2.ColorJitter(0.4, 0.4, 0.2, 0.1)
    ref = [jitter.make_params(image) for _ in range(n)]
    names = ("brightness_factor", "contrast_factor", "saturation_factor", "hue_factor")
    for op, name in enumerate(names):
        assert stats.ks_2samp(p["factors"][:, 2, op], [r[name] for r in ref]).pvalue > ALPHA, name
    first = torch.bincount(p["order"][:, 2, 0], minlength=4)  # the first jitter op: uniform
    assert stats.chisquare(first).pvalue > ALPHA
    blur = v2.GaussianBlur(3, sigma=(0.1, 2.0))
    ref_sigma = [blur.make_params(image)["sigma"][0] for _ in range(n)]
    assert stats.ks_2samp(p["sigma"][:, 2], ref_sigma).pvalue > ALPHA


def test_bound_size_and_unreadable_images():
    image = torch.zeros(3, 30, 60, dtype=torch.uint8)
    assert bound_size(image, 20).shape == (3, 10, 20)
    assert bound_size(image, 60) is image and bound_size(image, 0) is image
    aug = MultiCropAugmentation(16, 8, 1, num_channels=3)
    dataset = DecodedDataset(_Smooth(7, 3, 40, 50), aug, 4, max_image_side=25)
    item = dataset[3]  # index 3 is unreadable: the next one is used, as in the loader path
    assert item["index"] == 4 and item["skipped"] == ["cannot decode image 'x.jpg': truncated"]
    assert item["image"].shape == (3, 20, 25)


def test_persistent_workers_follow_the_samplers_epoch():
    # A persistent worker keeps its own dataset copy (set_epoch in this process never reaches it);
    # the (epoch, index) keys of EpochKeys still give epoch 1 its own augmentation.
    aug = MultiCropAugmentation(16, 8, 1, num_channels=3)
    dataset = DecodedDataset(_Smooth(8, 3, 20, 20), aug, 4)
    sampler = ResumableSampler(8, 4, seed=0)
    loader = DataLoader(dataset, batch_size=4, sampler=EpochKeys(sampler), collate_fn=dataset.collate,
                        num_workers=1, persistent_workers=True)
    for epoch in (0, 1):
        sampler.set_position(epoch)
        batch = next(iter(loader))
        expected = dataset.collate([dataset[(epoch, int(i))] for i in batch["index"]])
        assert torch.equal(batch["params"]["boxes"], expected["params"]["boxes"])
        assert torch.equal(batch["masks"], expected["masks"])


def test_augment_on_config_keys():
    assert load_config(None).data.augment_on == "auto"
    with pytest.raises(ConfigError, match=r"^data.augment_on: must be one of auto, loader, device; got 'gpu'$"):
        load_config(None, ["data.augment_on=gpu"])
    with pytest.raises(ConfigError, match=r"^data.max_image_side: must be >= 0 \(0 = no bound\), got -1$"):
        load_config(None, ["data.max_image_side=-1"])
    assert load_config(None).data.max_image_side == 512


def test_auto_picks_device_on_cuda_or_without_workers(monkeypatch, image_folder, tiny_cfg):

    def path(*overrides):
        return resolve_augment_on(tiny_cfg(f"data.root={image_folder}", *overrides))

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert path() == "device" and path("data.num_workers=2") == "loader"
    assert path("data.augment_on=loader") == "loader" and path("data.augment_on=device",
                                                               "data.num_workers=2") == "device"
    assert type(build_train_dataset(tiny_cfg(f"data.root={image_folder}"))) is DecodedDataset
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert path("data.num_workers=2") == "device" and path("data.num_workers=2", "trainer.accelerator=cpu") == "loader"
