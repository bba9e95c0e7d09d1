"""Random pruning with layer-wise budgets.

Each prunable tensor keeps exactly ``k_l`` uniformly random weights, where ``k_l`` follows the
layer-wise budget: ``"erk"`` (Erdős–Rényi-Kernel, the DPaI release's Random baseline, its
``--ablation random``) or ``"uniform"`` (the same density in every layer). Data-free; the masks depend
only on the architecture, the sparsity, the budget and ``seed``.
"""

from __future__ import annotations

import torch
from torch import nn

from dpai_lib.masks import Masks, prunable_parameters
from dpai_lib.pruners import register_pruner
from dpai_lib.pruners._select import Budget
from dpai_lib.sparsity import layer_kept_counts


@register_pruner("random", needs_data=False)
def random_prune(
    model: nn.Module, sparsity: float, *, input_shape: tuple[int, ...], data=None, seed: int = 0, budget: Budget = "erk"
) -> Masks:
    params = prunable_parameters(model)
    counts = layer_kept_counts({n: p.shape for n, p in params.items()}, sparsity, budget)
    gen = torch.Generator().manual_seed(seed)
    masks = {}
    for name, p in params.items():
        flat = torch.zeros(p.numel(), dtype=torch.bool)
        flat[torch.randperm(p.numel(), generator=gen)[: counts[name]]] = True
        masks[name] = flat.view(p.shape)
    return Masks(masks)
