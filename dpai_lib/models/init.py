"""Weight initialisation shared by the CIFAR-style networks (as in the DPaI release)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def kaiming_normal_init(model: nn.Module) -> None:
    """Conv/Linear weights Kaiming-normal (fan-in, ReLU gain), biases 0; BatchNorm weight 1, bias 0."""
    _init(model, nn.init.kaiming_normal_)


def kaiming_uniform_init(model: nn.Module) -> None:
    """Conv/Linear weights Kaiming-uniform (fan-in, ReLU gain), biases 0; BatchNorm weight 1, bias 0."""
    _init(model, nn.init.kaiming_uniform_)


def _init(model: nn.Module, weight_init: Callable[[torch.Tensor], object]) -> None:
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            weight_init(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
