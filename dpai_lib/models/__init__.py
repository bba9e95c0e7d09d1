"""Model registry: ``build_model(name, num_classes, **kw)`` and ``list_models()``.

Registered networks (one family per file): ``resnet20`` (CIFAR), ``resnet18`` (Tiny-ImageNet, 3x3 stem,
no max-pool), ``vgg19_bn`` (CIFAR), ``vit_b_16`` (torchvision, configurable ``image_size``), ``vit_tiny``
(a CPU-friendly ViT for 32x32 inputs) and ``efficientnet_b0`` (torchvision). Any torchvision
classification model is reachable as ``tv:<name>`` (e.g. ``tv:resnet50``), randomly initialised.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from dpai_lib.registry import Registry, UnknownNameError

MODELS: Registry[Callable[..., nn.Module]] = Registry("model")
register_model = MODELS.register

TORCHVISION_PREFIX = "tv:"


def _torchvision_names() -> list[str]:
    from torchvision import models

    return sorted(models.list_models(module=models))


def list_models(include_torchvision: bool = False) -> list[str]:
    """Registered model names; with ``include_torchvision`` also every ``tv:<name>``."""
    _load_builtin()
    names = MODELS.names()
    if include_torchvision:
        names += [TORCHVISION_PREFIX + n for n in _torchvision_names()]
    return names


def model_version(name: str) -> int:
    """The code version of a model (raised by every change to its architecture or initialisation);
    torchvision models (``tv:``) are version 1."""
    if name.startswith(TORCHVISION_PREFIX):
        return 1
    _load_builtin()
    return MODELS.version(name)


def build_model(name: str, num_classes: int, **kwargs) -> nn.Module:
    """Build a freshly initialised network. ``kwargs`` go to the builder (e.g. ``image_size``)."""
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer; got {num_classes!r}")
    if name.startswith(TORCHVISION_PREFIX):
        from torchvision import models

        tv_name = name[len(TORCHVISION_PREFIX):]
        known = _torchvision_names()
        if tv_name not in known:
            raise UnknownNameError(
                f"unknown torchvision classification model {tv_name!r}; known: {', '.join(known)}"
            )
        if kwargs.get("weights") not in (None,):
            raise ValueError("tv: models are built randomly initialised; pretrained weights are not supported here")
        return models.get_model(tv_name, weights=None, num_classes=num_classes, **kwargs)
    _load_builtin()
    try:
        builder = MODELS.get(name)
    except UnknownNameError as err:
        raise UnknownNameError(f"{err} (or any torchvision classification model as 'tv:<name>')") from None
    return builder(num_classes=num_classes, **kwargs)


def _load_builtin() -> None:
    # Importing the family modules registers their builders; done lazily so ``import dpai_lib`` is cheap.
    from dpai_lib.models import resnet_cifar, resnet_tiny, vgg, vit_efficientnet  # noqa: F401
