"""VGG-19 with BatchNorm for 32x32 inputs (the "lottery" CIFAR variant used by the DPaI release).

Sixteen 3x3 convolutions (64, 64, M, 128, 128, M, 256 x4, M, 512 x4, M, 512 x4), each followed by
BatchNorm and ReLU; four max-pools bring 32x32 to 2x2, a 2x2 average pool to 1x1, and a single linear
layer maps 512 features to the classes. Kaiming-normal initialisation.
"""

from __future__ import annotations

import torch
from torch import nn

from dpai_lib.models import register_model
from dpai_lib.models.init import kaiming_normal_init

VGG19 = (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512)


class CifarVGG(nn.Module):
    def __init__(self, plan: tuple, num_classes: int, batch_norm: bool = True) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        in_channels = 3
        for item in plan:
            if item == "M":
                layers.append(nn.MaxPool2d(2))
                continue
            layers.append(nn.Conv2d(in_channels, item, 3, padding=1))
            if batch_norm:
                layers.append(nn.BatchNorm2d(item))
            layers.append(nn.ReLU(inplace=True))
            in_channels = item
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_channels, num_classes)
        kaiming_normal_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


@register_model("vgg19_bn")
def vgg19_bn(num_classes: int = 100) -> CifarVGG:
    """VGG-19-BN (20.07 M prunable weights at 100 classes)."""
    return CifarVGG(VGG19, num_classes)
