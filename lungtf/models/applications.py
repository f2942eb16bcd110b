"""Transfer-learning backbones from keras.applications: ResNet50 and EfficientNetV2.

Both are built headless (``include_top=False``) so their output is the last convolutional
feature map, and with ``weights="imagenet"`` they use the real keras.applications download path
(``~/.keras/models`` cache). Their input normalisation differs and is kept exact:

- ResNet50 expects caffe-style input (``keras.applications.resnet50.preprocess_input``: RGB ->
  BGR, ImageNet mean subtracted, no scaling); the model's ``preprocess`` layer does exactly that.
- EfficientNetV2 is built with ``include_preprocessing=True``, so its own first layers rescale the
  raw pixels (B variants: /255 then ImageNet mean/std; S/M/L: /128 - 1). Its ``preprocess`` layer
  is therefore the identity: normalising twice would be wrong.
"""

from __future__ import annotations

import keras

from lungtf.models.registry import PixelNormalization, register_backbone

CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
"""ImageNet channel means in BGR order, as in keras.applications' caffe preprocessing."""

EFFICIENTNETV2 = {
    "b0": keras.applications.EfficientNetV2B0,
    "b1": keras.applications.EfficientNetV2B1,
    "b2": keras.applications.EfficientNetV2B2,
    "b3": keras.applications.EfficientNetV2B3,
    "s": keras.applications.EfficientNetV2S,
    "m": keras.applications.EfficientNetV2M,
    "l": keras.applications.EfficientNetV2L,
}


def caffe_preprocess(variant: str) -> keras.layers.Layer:
    """``keras.applications.resnet50.preprocess_input`` as a layer named ``preprocess``."""
    return PixelNormalization(mean=CAFFE_MEAN_BGR, bgr=True, name="preprocess")


@register_backbone(
    "resnet50",
    preprocess=caffe_preprocess,
    preprocessing="caffe: RGB->BGR, minus ImageNet mean (103.939, 116.779, 123.68), no scaling",
    default_variant="50",
    from_scratch=False,
    weights_source="keras.applications ImageNet h5 (~/.keras/models)",
    description="keras.applications ResNet50 (v1), transfer learning from ImageNet",
)
def resnet50(variant: str, input_shape: tuple[int, int, int], weights: str | None = None):
    """Headless keras.applications ResNet50; output ``conv5_block3_out`` [B, S/32, S/32, 2048]."""
    return keras.applications.ResNet50(include_top=False, weights=weights, input_shape=input_shape)


@register_backbone(
    "efficientnetv2",
    preprocess=lambda variant: keras.layers.Identity(name="preprocess"),
    preprocessing="identity here; EfficientNetV2's own Rescaling (+ Normalization for B*) inside",
    default_variant="b0",
    variants=tuple(EFFICIENTNETV2),
    from_scratch=False,
    weights_source="keras.applications ImageNet h5 (~/.keras/models)",
    description="keras.applications EfficientNetV2 (B0 default, S selectable), transfer learning",
)
def efficientnetv2(variant: str, input_shape: tuple[int, int, int], weights: str | None = None):
    """Headless keras.applications EfficientNetV2 with its built-in input preprocessing."""
    return EFFICIENTNETV2[variant](
        include_top=False, weights=weights, input_shape=input_shape, include_preprocessing=True
    )
