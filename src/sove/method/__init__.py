"""The SOVE method: feature sets, concepts (anchors + judges), soft labels, the two losses.

Pure tensor code: imports only torch/numpy and ``sove.distributed``.
"""

from sove.method.concepts import Concepts, anchor_generator, draw_anchors, nearest_judges, select_judges
from sove.method.feature_set import FeatureSet
from sove.method.losses import ConceptSettings, SOVELoss, cls_loss, cross_view_pairs, patch_loss

__all__ = [
    "Concepts", "ConceptSettings", "FeatureSet", "SOVELoss", "anchor_generator", "cls_loss",
    "cross_view_pairs", "draw_anchors", "nearest_judges", "patch_loss", "select_judges",
]
