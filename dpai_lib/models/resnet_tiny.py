"""ResNet-18 for 64x64 Tiny-ImageNet inputs, as in the DPaI release.

The ImageNet ResNet-18 layout (four stages of two basic blocks, widths 64/128/256/512, 1x1 stride-2
conv+BN shortcuts) with a 3x3 stride-1 stem and no max-pool, so 64x64 inputs end at 8x8 before global
average pooling, and a classifier **without bias**, as in the release. Initialisation as the release's:
``nn.init.kaiming_uniform_`` (its defaults: fan-in, gain sqrt(2)) on every conv/linear weight, BatchNorm
weight 1 and bias 0. Version 2: version 1 had a classifier bias and PyTorch's default initialisation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dpai_lib.models import register_model
from dpai_lib.models.init import kaiming_uniform_init
from dpai_lib.models.resnet_cifar import BasicBlock


class TinyResNet(nn.Module):
    def __init__(self, blocks: tuple[int, ...], num_classes: int) -> None:
        super().__init__()
        widths = (64, 128, 256, 512)
        self.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        stages, in_planes = [], 64
        for i, (width, n) in enumerate(zip(widths, blocks)):
            stage = []
            for j in range(n):
                stage.append(BasicBlock(in_planes, width, stride=2 if (i > 0 and j == 0) else 1))
                in_planes = width
            stages.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes, bias=False)
        kaiming_uniform_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.fc(torch.flatten(self.pool(out), 1))


@register_model("resnet18", version=2)
def resnet18(num_classes: int = 200) -> TinyResNet:
    """ResNet-18 with a 3x3 stem (11.26 M prunable weights at 200 classes)."""
    return TinyResNet((2, 2, 2, 2), num_classes)
