"""Networks: timm ViT with mask token, shared projection head."""

from sove.models.backbone import ARCH_ALIASES, MaskedViT, create_vit, timm_name
from sove.models.head import ProjectionHead

__all__ = ["ARCH_ALIASES", "MaskedViT", "ProjectionHead", "create_vit", "timm_name"]
from sove.models.network import SOVENetwork, build_networks, build_teacher_backbone  # noqa: E402

__all__ += ["SOVENetwork", "build_networks", "build_teacher_backbone"]
