"""Transformer and EfficientNet models, built from torchvision's implementations.

``vit_b_16`` is torchvision's ViT-B/16 with a configurable ``image_size`` (a multiple of 16), so it can be
pruned and trained at the data set's resolution (the DPaI release could not: it fixed 224x224).
``vit_tiny`` is a small ViT for 32x32 inputs (patch 4, 6 layers, width 192, 3 heads) that trains on a CPU.
Attention input projections (``in_proj_weight``) are prunable parameters like any linear weight
(see :func:`dpai_lib.masks.prunable_parameters`).
"""

from __future__ import annotations

from torch import nn

from dpai_lib.models import register_model


@register_model("vit_b_16")
def vit_b_16(num_classes: int = 200, image_size: int = 224) -> nn.Module:
    from torchvision.models import vit_b_16 as tv_vit_b_16

    if image_size % 16:
        raise ValueError(f"vit_b_16 needs image_size divisible by the patch size 16; got {image_size}")
    return tv_vit_b_16(weights=None, num_classes=num_classes, image_size=image_size)


@register_model("vit_tiny")
def vit_tiny(num_classes: int = 10, image_size: int = 32) -> nn.Module:
    from torchvision.models.vision_transformer import VisionTransformer

    if image_size % 4:
        raise ValueError(f"vit_tiny needs image_size divisible by the patch size 4; got {image_size}")
    return VisionTransformer(
        image_size=image_size, patch_size=4, num_layers=6, num_heads=3, hidden_dim=192, mlp_dim=384,
        num_classes=num_classes,
    )


@register_model("efficientnet_b0")
def efficientnet_b0(num_classes: int = 1000) -> nn.Module:
    from torchvision.models import efficientnet_b0 as tv_efficientnet_b0

    return tv_efficientnet_b0(weights=None, num_classes=num_classes)
