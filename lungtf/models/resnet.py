"""ResNet34 (basic blocks, He et al. 2016) written out explicitly, trained from scratch.

keras.applications has no ResNet34 (KerasHub's ResNet34 is only reached through presets, which
download), so the network is spelled out here: a 7x7/2 stem with 3x3/2 max pooling,
then four stages of [3, 4, 6, 3] basic blocks (two 3x3 convolutions and a residual) at widths
64, 128, 256, 512, the first block of stages 2-4 striding by 2 with a 1x1 projection shortcut.
With a 1,000-class head this is the reference 21.8 M parameters (torchvision: 21,797,672).
"""

from __future__ import annotations

import keras

from lungtf.models.registry import (
    IMAGENET_MEAN,
    IMAGENET_PREPROCESSING,
    IMAGENET_STD,
    PixelNormalization,
    register_backbone,
)


def conv_init() -> keras.initializers.Initializer:
    """He (fan-out) initialisation, as the ResNet/RegNet reference code uses for training from
    scratch: a new initialiser for every layer.

    One shared instance (as before) drew its random seed once, when this module was imported
    (before ``keras.utils.set_random_seed``), and then gave every kernel of the same shape the
    same values: a model built from scratch was neither reproducible across processes nor had
    independent layers. A new one per layer draws its seed when the layer is made."""
    return keras.initializers.VarianceScaling(2.0, mode="fan_out", distribution="untruncated_normal")


RESNET34_DEPTHS = (3, 4, 6, 3)
RESNET34_WIDTHS = (64, 128, 256, 512)


def imagenet_preprocess(variant: str) -> keras.layers.Layer:
    """Torch-style ImageNet mean/std normalisation of raw pixels, named ``preprocess``."""
    return PixelNormalization(mean=IMAGENET_MEAN, std=IMAGENET_STD, name="preprocess")


def conv_bn(x, filters: int, kernel: int, stride: int, name: str, relu: bool = True):
    """Bias-free convolution, BatchNorm (eps 1e-5, momentum 0.9), optional ReLU."""
    x = keras.layers.Conv2D(
        filters, kernel, strides=stride, padding="same", use_bias=False,
        kernel_initializer=conv_init(), name=f"{name}_conv",
    )(x)
    x = keras.layers.BatchNormalization(epsilon=1e-5, momentum=0.9, name=f"{name}_bn")(x)
    return keras.layers.ReLU(name=f"{name}_relu")(x) if relu else x


def residual(x, y, filters: int, stride: int, name: str):
    """``ReLU(shortcut(x) + y)``: identity shortcut, or a 1x1 projection when the shape changes."""
    if stride != 1 or x.shape[-1] != filters:
        x = conv_bn(x, filters, 1, stride, f"{name}_proj", relu=False)
    return keras.layers.ReLU(name=f"{name}_out")(keras.layers.Add(name=f"{name}_add")([x, y]))


def basic_block(x, filters: int, stride: int, name: str):
    """Two 3x3 convolutions plus a shortcut (1x1 projection when the shape changes), then ReLU."""
    y = conv_bn(x, filters, 3, stride, f"{name}_1")
    y = conv_bn(y, filters, 3, 1, f"{name}_2", relu=False)
    return residual(x, y, filters, stride, name)


@register_backbone(
    "resnet34",
    preprocess=imagenet_preprocess,
    preprocessing=IMAGENET_PREPROCESSING,
    default_variant="34",
    from_scratch=True,
    description="a basic-block ResNet34 written in this project, trained from scratch",
)
def resnet34(variant: str, input_shape: tuple[int, int, int]) -> keras.Model:
    """Headless ResNet34; output the last stage's feature map [B, S/32, S/32, 512]."""
    inputs = keras.Input(input_shape)
    x = conv_bn(inputs, 64, 7, 2, "stem")
    x = keras.layers.MaxPooling2D(3, strides=2, padding="same", name="stem_pool")(x)
    for stage, (depth, width) in enumerate(zip(RESNET34_DEPTHS, RESNET34_WIDTHS), start=1):
        for block in range(1, depth + 1):
            stride = 2 if stage > 1 and block == 1 else 1
            x = basic_block(x, width, stride, f"s{stage}_b{block}")
    return keras.Model(inputs, x, name="resnet34")
