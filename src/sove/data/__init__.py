"""Data pipeline: image sources, multi-crop views and patch masks (docs/method.md, "Views and augmentation")."""

from sove.data.decode import decode_image
from sove.data.masking import (
    BlockwiseMaskGenerator,
    RandomMaskGenerator,
    build_mask_generator,
)
from sove.data.multicrop import MultiCropAugmentation, SSLDataset, collate_views
from sove.data.sources import (
    FashionMNIST,
    ImageFolder,
    build_source,
    find_fashion_mnist,
    read_idx,
)

__all__ = [
    "BlockwiseMaskGenerator",
    "FashionMNIST",
    "ImageFolder",
    "MultiCropAugmentation",
    "RandomMaskGenerator",
    "SSLDataset",
    "build_mask_generator",
    "build_source",
    "collate_views",
    "decode_image",
    "find_fashion_mnist",
    "read_idx",
]
