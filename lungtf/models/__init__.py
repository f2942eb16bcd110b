"""Backbones and the classifier around them (docs/architecture.md, section lungtf.models).

Importing this package registers every backbone (resnet50, efficientnetv2, regnet, resnet34, and
through KerasHub resnet50d and efficientnetv2_rw_t) and every custom layer (KerasHub's blocks
included, by importing keras_hub), so ``keras.models.load_model(path)`` works on any ``.keras``
file written here.
"""

from lungtf.models import applications, hub, regnet, resnet  # noqa: F401  (registers the backbones)
from lungtf.models.registry import (
    BackboneSpec,
    PixelNormalization,
    build_model,
    check_input_norm,
    check_weights_source,
    freeze_backbone,
    get_spec,
    list_backbones,
    model_parts,
    register_backbone,
    training_view,
    unfreeze_backbone,
)

__all__ = [
    "BackboneSpec",
    "PixelNormalization",
    "build_model",
    "check_input_norm",
    "check_weights_source",
    "freeze_backbone",
    "get_spec",
    "list_backbones",
    "model_parts",
    "register_backbone",
    "training_view",
    "unfreeze_backbone",
]
