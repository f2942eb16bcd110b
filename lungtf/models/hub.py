"""The study's two timm backbones through KerasHub: ResNet50-D and EfficientNetV2-rw-t.

The study fine-tuned timm's ``resnet50d`` and ``efficientnetv2_rw_t``. KerasHub (the Keras team's
successor of KerasCV) ships both as Keras 3 models:

- ``resnet50d``: ``keras_hub.models.ResNetBackbone`` in its ResNet-vd configuration (deep 3x3
  stem of 32-32-64 channels, average-pool shortcuts: the "bag of tricks" ResNet-D that timm's
  ``resnet50d`` also is). ImageNet weights: preset ``resnet_vd_50_imagenet``, which KerasHub
  converted from PaddleClas ``ResNet50_vd`` (timm's own ``resnet50d`` checkpoint has no KerasHub
  converter in keras-hub 0.32, so ``hf://timm/resnet50d...`` is refused by KerasHub).
- ``efficientnetv2_rw_t``: ``keras_hub.models.EfficientNetBackbone`` with timm's ``rw_t``
  configuration; ImageNet weights: preset ``efficientnet2_rw_t_ra2_imagenet`` (converted from
  ``timm/efficientnetv2_rw_t.ra2_in1k``), or that timm checkpoint directly with
  ``--weights hf://timm/efficientnetv2_rw_t.ra2_in1k``.

Both presets normalise with the ImageNet mean and standard deviation (their ImageConverter:
``scale = 1 / (255 std)``, ``offset = -mean / std``), which is our torch-style ``preprocess``
layer in 0-255 units. A preset that ships an ImageConverter with other values is refused rather
than silently fed the wrong normalisation.

Weights: ``none`` builds the preset's architecture with random weights; ``imagenet`` loads the
built-in preset (downloaded by KerasHub into its Kaggle cache; offline it fails at once, naming the
handle); a directory written by ``save_to_preset`` or a ``SCHEME://`` handle is loaded with
``from_preset``; a ``.weights.h5`` file (``model.get_layer('backbone').save_weights``) goes
through the registry like for every other backbone. The KerasHub network is re-wrapped as a
plain functional ``keras.Model`` (its layers, unchanged), so a saved ``.keras`` file holds
ordinary layers plus KerasHub's registered blocks (importing this module imports keras_hub).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import keras
import keras_hub
import numpy as np

from lungtf.models.registry import fetch_advice, get_spec, register_backbone
from lungtf.models.resnet import (
    IMAGENET_MEAN,
    IMAGENET_PREPROCESSING,
    IMAGENET_STD,
    imagenet_preprocess,
)

RESNET50D_CONFIG = {
    "input_conv_filters": [32, 32, 64],
    "input_conv_kernel_sizes": [3, 3, 3],
    "stackwise_num_filters": [64, 128, 256, 512],
    "stackwise_num_blocks": [3, 4, 6, 3],
    "stackwise_num_strides": [1, 2, 2, 2],
    "block_type": "bottleneck_block_vd",
    "use_pre_activation": False,
}
"""``ResNetBackbone`` arguments of ``resnet_vd_50_imagenet`` (KerasHub's ResNet50_vd conversion)."""

EFFICIENTNETV2_RW_T_CONFIG = {
    "stackwise_width_coefficients": [0.8] * 6,
    "stackwise_depth_coefficients": [0.9] * 6,
    "stackwise_kernel_sizes": [3] * 6,
    "stackwise_num_repeats": [2, 4, 4, 6, 9, 15],
    "stackwise_input_filters": [24, 24, 48, 64, 128, 160],
    "stackwise_output_filters": [24, 48, 64, 128, 160, 256],
    "stackwise_expansion_ratios": [1, 4, 4, 4, 6, 6],
    "stackwise_strides": [1, 2, 2, 2, 1, 2],
    "stackwise_squeeze_and_excite_ratios": [0, 0, 0, 0.25, 0.25, 0.25],
    "stackwise_block_types": ["cba", "fused", "fused", "unfused", "unfused", "unfused"],
    "stackwise_force_input_filters": [0] * 6,
    "stackwise_nores_option": [False] * 6,
    "activation": "silu",
    "min_depth": None,
    "include_stem_padding": True,
    "use_depth_divisor_as_min_depth": True,
    "cap_round_filter_decrease": True,
    "stem_conv_padding": "valid",
    "batch_norm_momentum": 0.9,
    "batch_norm_epsilon": 1e-5,
    "dropout": 0,
    "projection_activation": None,
}
"""``EfficientNetBackbone`` arguments KerasHub's timm converter gives ``efficientnetv2_rw_t``."""


@dataclass(frozen=True)
class HubModel:
    """One KerasHub backbone: its class, built-in ImageNet preset and random-init config."""

    cls: type
    preset: str
    config: dict
    shape_argument: str  # the constructor argument that takes the input shape


HUB: dict[str, HubModel] = {
    "resnet50d": HubModel(
        keras_hub.models.ResNetBackbone, "resnet_vd_50_imagenet", RESNET50D_CONFIG, "image_shape"
    ),
    "efficientnetv2_rw_t": HubModel(
        keras_hub.models.EfficientNetBackbone, "efficientnet2_rw_t_ra2_imagenet",
        EFFICIENTNETV2_RW_T_CONFIG, "input_shape",
    ),
}  # fmt: skip


def handle(preset: str) -> str:
    """The download handle of a built-in KerasHub preset (``kaggle://...``), else ``preset``."""
    for model in HUB.values():
        if preset in model.cls.presets:
            return model.cls.presets[preset].get("kaggle_handle", preset)
    return preset


def is_preset_source(source: str) -> bool:
    """A KerasHub preset: a local directory or a ``SCHEME://`` handle (not a weights file)."""
    return "://" in source or Path(source).is_dir()


def preset_normalisation(preset: str) -> tuple[np.ndarray, np.ndarray] | None:
    """``(mean, std)`` in 0-255 units of the preset's ImageConverter, ``None`` if it has none."""
    try:
        converter = keras_hub.layers.ImageConverter.from_preset(preset)
    except FileNotFoundError:
        return None
    if converter is None:
        return None
    scale = np.broadcast_to(np.asarray(1.0 if converter.scale is None else converter.scale), 3)
    offset = np.broadcast_to(np.asarray(0.0 if converter.offset is None else converter.offset), 3)
    return 0.0 - offset / scale, 1.0 / scale  # 0.0 - x: a zero prints as 0.0, not -0.0


def _check_normalisation(name: str, preset: str) -> None:
    found = preset_normalisation(preset)
    if found is None:
        return
    if not (np.allclose(found[0], IMAGENET_MEAN, rtol=1e-4)
            and np.allclose(found[1], IMAGENET_STD, rtol=1e-4)):
        raise ValueError(
            f"preset {preset} normalises its input with mean {np.round(found[0], 3).tolist()}, "
            f"std {np.round(found[1], 3).tolist()} (0-255 units); lungtf's {name} model applies "
            f"the ImageNet mean {IMAGENET_MEAN} and std {IMAGENET_STD}: use a preset trained so"
        )


def build_hub(name: str, input_shape: tuple, weights: str | None = None) -> keras.Model:
    """Headless KerasHub backbone ``name`` as a plain functional model (last feature map out).

    Args:
        name: a key of ``HUB``.
        input_shape: the input shape (``(None, None, 3)``: built size-free).
        weights: ``None`` (random initialisation with the preset's architecture), ``"imagenet"``
            (the built-in preset) or a preset directory / handle for ``from_preset``.

    Raises:
        ValueError: a local directory that is not a preset of this backbone class, or whose
            ImageConverter normalises differently.
        RuntimeError: a remote preset could not be fetched or loaded (message: what was tried
            and how to pass a local preset instead).
    """
    model = HUB[name]
    shape = {model.shape_argument: tuple(input_shape)}
    if weights is None:
        hub = model.cls(**model.config, **shape)
    else:
        preset = model.preset if weights == "imagenet" else weights
        try:
            hub = model.cls.from_preset(preset, **shape)
        except Exception as err:
            if Path(preset).is_dir():
                raise ValueError(
                    f"{preset} is not a KerasHub {model.cls.__name__} preset for {name} ({err})"
                ) from err
            raise RuntimeError(
                f"could not load KerasHub preset {preset} ({handle(preset)}) for {name}: "
                f"{type(err).__name__}: {err}. {fetch_advice(get_spec(name))} A preset directory "
                f"is what save_to_preset writes, or a downloaded copy of the preset."
            ) from err
        _check_normalisation(name, preset)
    return keras.Model(hub.input, hub.output, name=name)


_HELP = "a KerasHub {} preset directory (save_to_preset) or handle (hf://..., kaggle://...), or a "
_HELP += "backbone .weights.h5 file"


@register_backbone(
    "resnet50d",
    preprocess=imagenet_preprocess,
    preprocessing=IMAGENET_PREPROCESSING,
    default_variant="50",
    from_scratch=False,
    loads_weights=is_preset_source,
    weights_source="KerasHub preset resnet_vd_50_imagenet (PaddleClas ResNet50_vd, ImageNet-1k)",
    weights_help=_HELP.format("ResNetBackbone"),
    description="KerasHub ResNet-vd 50 (ResNet50-D, the study's timm resnet50d), transfer learning",
)
def resnet50d(variant: str, input_shape: tuple, weights: str | None = None) -> keras.Model:
    """Headless ResNet50-D; output the last stage's feature map [B, S/32, S/32, 2048]."""
    return build_hub("resnet50d", input_shape, weights)


@register_backbone(
    "efficientnetv2_rw_t",
    preprocess=imagenet_preprocess,
    preprocessing=IMAGENET_PREPROCESSING,
    default_variant="rw_t",
    from_scratch=False,
    loads_weights=is_preset_source,
    weights_source="KerasHub preset efficientnet2_rw_t_ra2_imagenet (timm "
    "efficientnetv2_rw_t.ra2_in1k)",
    weights_help=_HELP.format("EfficientNetBackbone"),
    description="KerasHub EfficientNetV2 rw_t (the study's timm efficientnetv2_rw_t), transfer "
    "learning",
)
def efficientnetv2_rw_t(
    variant: str, input_shape: tuple, weights: str | None = None
) -> keras.Model:
    """Headless EfficientNetV2-rw-t; output ``top_activation`` [B, S/32, S/32, 1024]."""
    return build_hub("efficientnetv2_rw_t", input_shape, weights)
