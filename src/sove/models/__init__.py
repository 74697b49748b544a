"""Networks: timm ViT with mask token, shared projection head."""

from sove.models.backbone import ARCH_ALIASES, MaskedViT, create_vit, timm_name
from sove.models.head import ProjectionHead
from sove.models.swin import MaskedSwin, create_swin

__all__ = ["ARCH_ALIASES", "MaskedSwin", "MaskedViT", "ProjectionHead", "create_swin", "create_vit", "timm_name"]
from sove.models.network import Backbone, SOVENetwork, build_backbone, build_networks, build_teacher_backbone  # noqa: E402

__all__ += ["Backbone", "SOVENetwork", "build_backbone", "build_networks", "build_teacher_backbone"]
