"""Stage-2 fusion: per-level fusion operators and the joint teacher's ``FusionBackbone``
(paper §3.2; paper_notes C8-C12, A5, A20). Importing this package registers the "fusion"
backbone and the "concat1x1" / "cross_attention" / "fa_blocks" operators."""

from .ops import (FUSION_REGISTRY, Concat1x1Fusion, CrossAttentionFusion, ResidualConvBlock,
                  build_fusion_op)
from .fa_blocks import FusionAttentionBlock, FusionAttentionFusion
from .fusion_backbone import (FusionBackbone, TeacherInput, build_fusion_backbone,
                              load_teacher_backbone)

__all__ = [
    "FUSION_REGISTRY", "Concat1x1Fusion", "CrossAttentionFusion", "ResidualConvBlock",
    "build_fusion_op", "FusionBackbone", "TeacherInput", "build_fusion_backbone",
    "load_teacher_backbone", "FusionAttentionBlock", "FusionAttentionFusion",
]
