"""ResNet-20 for 32x32 inputs (He et al. 2016, CIFAR variant) as in the DPaI release.

Three stages of three basic blocks with widths 16/32/64; where the shape changes the shortcut is a
1x1 stride-2 convolution followed by BatchNorm (not the zero-padding "option A"). Global average pooling
and one linear classifier. Kaiming-normal initialisation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dpai_lib.models import register_model
from dpai_lib.models.init import kaiming_normal_init


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus shortcut, then ReLU."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    def __init__(self, blocks_per_stage: int, widths: tuple[int, ...], num_classes: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        layers, in_planes = [], widths[0]
        for i, width in enumerate(widths):
            for j in range(blocks_per_stage):
                layers.append(BasicBlock(in_planes, width, stride=2 if (i > 0 and j == 0) else 1))
                in_planes = width
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)
        kaiming_normal_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.pool(self.layers(out))
        return self.fc(torch.flatten(out, 1))


@register_model("resnet20")
def resnet20(num_classes: int = 10) -> CifarResNet:
    """ResNet-20 (0.27 M prunable weights at 10 classes)."""
    return CifarResNet(3, (16, 32, 64), num_classes)
