"""RegNetY from "Designing Network Design Spaces" (Radosavovic et al., CVPR 2020), written here.

Keras 3 ships no RegNet, so the network is generated from the paper's quantised linear width
parametrisation. For block ``j < depth`` the continuous width is ``u_j = w0 + wa * j``; it is
snapped to ``w0 * wm ** round(log(u_j / w0) / log(wm))``, rounded to a multiple of 8, and
consecutive blocks of equal width form one stage. With bottleneck ratio 1 each stage's width is
then made a multiple of its group width (the group width is capped at the stage width).

The network is, layer for layer, keras.applications' (Keras 2) RegNetY, so that its published
ImageNet weights load onto it (``lungtf.models.regnet_weights``): input scaled by 1/255 (the
reference's built-in ``Rescaling``; no mean/std), a 3x3/2 stem of 32 channels, then the stages of
Y blocks -- 1x1 conv, grouped 3x3 conv (stride 2 in each stage's first block), squeeze-and-
excitation with ``int(0.25 * block input width)`` channels, 1x1 conv, plus the shortcut (1x1/2
projection in each stage's first block) -- each conv followed by BatchNorm (epsilon 1e-5,
momentum 0.9), ReLU after all but the last. Only the initialisation for training from scratch
differs (He fan-out, as pycls; the reference uses ``he_normal``): it is not part of the function.

The published RegNetY settings (pycls model zoo) are the variants below; each has ImageNet weights
(``--weights imagenet``). 200mf-800mf are the ones that fit a 2-core CPU budget, 1.6gf (the
default, 11.2 M parameters at 1,000 classes) the study's.
The grouped 3x3 convolution is ``GroupedConv2D``: on a machine without GPU it runs as a depthwise
convolution plus a per-group sum on TensorFlow's ordinary CPU kernels, instead of Keras's
XLA-compiled grouped convolution, which is an order of magnitude slower on CPU. Exports always
take the depthwise form (``lungtf.models.portable``): TF Serving on a CPU does not run
XLA-must-compile functions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import keras
import numpy as np
import tensorflow as tf

from lungtf.models import regnet_weights
from lungtf.models.registry import PixelNormalization, register_backbone
from lungtf.models.resnet import conv_bn, conv_init, residual

STEM_WIDTH = 32
SE_RATIO = 0.25
WIDTH_QUANTUM = 8


@dataclass(frozen=True)
class RegNetParams:
    """One point of the RegNet design space (bottleneck ratio 1, as for every published RegNetY).

    Attributes:
        depth: number of blocks ``d``.
        w0: initial width.
        wa: slope of the linear width function.
        wm: width multiplier between quantised stages.
        group_width: channels per group of the 3x3 convolution.
    """

    depth: int
    w0: int
    wa: float
    wm: float
    group_width: int


REGNETY: dict[str, RegNetParams] = {
    "200mf": RegNetParams(13, 24, 36.44, 2.49, 8),
    "400mf": RegNetParams(16, 48, 27.89, 2.09, 8),
    "600mf": RegNetParams(15, 48, 32.54, 2.32, 16),
    "800mf": RegNetParams(14, 56, 38.84, 2.40, 16),
    "1.6gf": RegNetParams(27, 48, 20.71, 2.65, 24),
    "3.2gf": RegNetParams(21, 80, 42.63, 2.66, 24),
    "4.0gf": RegNetParams(22, 96, 31.41, 2.24, 64),
    "6.4gf": RegNetParams(25, 112, 33.22, 2.27, 72),
    "8.0gf": RegNetParams(17, 192, 76.82, 2.19, 56),
    "12gf": RegNetParams(19, 168, 73.36, 2.37, 112),
    "16gf": RegNetParams(18, 200, 106.23, 2.48, 112),
    "32gf": RegNetParams(20, 232, 115.89, 2.53, 232),
}
"""Published RegNetY configurations (pycls ``configs/dds_baselines/regnety``)."""


def stage_plan(params: RegNetParams) -> list[tuple[int, int, int]]:
    """``(width, depth, group_width)`` of each stage generated from ``params``."""
    ws_cont = np.arange(params.depth) * params.wa + params.w0
    ks = np.round(np.log(ws_cont / params.w0) / np.log(params.wm))
    widths = np.round(params.w0 * np.power(params.wm, ks) / WIDTH_QUANTUM).astype(int)
    stage_widths, stage_depths = np.unique(widths * WIDTH_QUANTUM, return_counts=True)
    plan = []
    for width, depth in zip(stage_widths.tolist(), stage_depths.tolist()):
        group = min(params.group_width, width)
        plan.append((max(group, round(width / group) * group), depth, group))
    return plan


@keras.saving.register_keras_serializable(package="lungtf")
class GroupedConv2D(keras.layers.Layer):
    """A grouped convolution ("same" padding, no bias) that is fast on CPU as well as on GPU.

    TensorFlow has no CPU kernel for grouped convolutions; Keras routes ``Conv2D(groups>1)``
    through XLA there, which is ~20x slower than a plain convolution and recompiles on every
    eager call. The same result is a depthwise convolution with ``depth_multiplier`` = output
    channels per group followed by a sum over each group's input channels, which runs on the
    ordinary CPU kernels. The kernel is stored in the standard grouped layout
    ``[k, k, in/groups, filters]`` either way, so weights move freely between implementations.

    Args:
        filters: output channels (a multiple of the number of groups).
        kernel_size: square kernel side.
        strides: square stride.
        group_width: input channels per group.
        implementation: ``grouped`` (``keras.ops.conv``, the cuDNN path; Keras's TensorFlow
            backend compiles it with XLA on every device), ``depthwise`` (the CPU-friendly
            rewrite, no XLA) or ``auto``: ``grouped`` when a GPU is visible at build time. An
            export always uses ``depthwise`` (``PORTABLE_CONFIG``), so a SavedModel holds no
            XLA-must-compile function whatever device the model was trained or reloaded on.
        kernel_initializer: initialiser of the grouped kernel.
    """

    IMPLEMENTATIONS = ("auto", "grouped", "depthwise")
    PORTABLE_CONFIG: ClassVar[dict[str, str]] = {"implementation": "depthwise"}
    """What ``lungtf.models.portable.portable_copy`` (export) sets: plain kernels on any device."""

    def __init__(self, filters, kernel_size, strides=1, group_width=1, implementation="auto",
                 kernel_initializer="he_normal", **kwargs):
        super().__init__(**kwargs)
        if implementation not in self.IMPLEMENTATIONS:
            raise ValueError(
                f"implementation must be one of {', '.join(self.IMPLEMENTATIONS)}; "
                f"got {implementation!r}"
            )
        self.filters, self.kernel_size, self.strides = filters, kernel_size, strides
        self.group_width, self.implementation = group_width, implementation
        self.kernel_initializer = keras.initializers.get(kernel_initializer)

    def build(self, input_shape):
        channels = input_shape[-1]
        self.groups = channels // self.group_width
        if channels % self.group_width or self.filters % self.groups:
            raise ValueError(
                f"input channels ({channels}) must be a multiple of group_width "
                f"({self.group_width}) and filters ({self.filters}) of the group count"
            )
        self.kernel = self.add_weight(
            name="kernel", initializer=self.kernel_initializer,
            shape=(self.kernel_size, self.kernel_size, self.group_width, self.filters),
        )
        self.resolved = self.implementation
        if self.resolved == "auto":
            self.resolved = "grouped" if tf.config.list_physical_devices("GPU") else "depthwise"

    def call(self, inputs):
        if self.resolved == "grouped":
            return keras.ops.conv(inputs, self.kernel, self.strides, padding="same")
        k, g, gw, go = self.kernel_size, self.groups, self.group_width, self.filters // self.groups
        kernel = keras.ops.reshape(self.kernel, (k, k, gw, g, go))
        kernel = keras.ops.reshape(keras.ops.transpose(kernel, (0, 1, 3, 2, 4)), (k, k, g * gw, go))
        y = keras.ops.depthwise_conv(inputs, kernel, self.strides, padding="same")
        _, height, width, _ = keras.ops.shape(y)
        y = keras.ops.sum(keras.ops.reshape(y, (-1, height, width, g, gw, go)), axis=4)
        return keras.ops.reshape(y, (-1, height, width, self.filters))

    def compute_output_shape(self, input_shape):
        batch, height, width, _ = input_shape
        side = [None if d is None else -(-d // self.strides) for d in (height, width)]
        return (batch, *side, self.filters)

    def get_config(self):
        return {
            **super().get_config(), "filters": self.filters, "kernel_size": self.kernel_size,
            "strides": self.strides, "group_width": self.group_width,
            "implementation": self.implementation,
            "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
        }


def y_block(x, width: int, stride: int, group_width: int, name: str):
    """One RegNetY residual bottleneck block (bottleneck ratio 1) with squeeze-and-excitation.

    The squeeze width is ``int(SE_RATIO * block input width)``, rounded down as the reference.
    """
    width_in = x.shape[-1]
    y = conv_bn(x, width, 1, 1, f"{name}_a")
    y = GroupedConv2D(
        width, 3, stride, group_width, kernel_initializer=conv_init(), name=f"{name}_b_conv"
    )(y)
    y = keras.layers.BatchNormalization(epsilon=1e-5, momentum=0.9, name=f"{name}_b_bn")(y)
    y = keras.layers.ReLU(name=f"{name}_b_relu")(y)
    se = keras.layers.GlobalAveragePooling2D(keepdims=True, name=f"{name}_se_pool")(y)
    se = keras.layers.Conv2D(
        max(1, int(SE_RATIO * width_in)), 1, activation="relu", kernel_initializer=conv_init(),
        name=f"{name}_se_reduce",
    )(se)
    se = keras.layers.Conv2D(
        width, 1, activation="sigmoid", kernel_initializer=conv_init(), name=f"{name}_se_expand"
    )(se)
    y = keras.layers.Multiply(name=f"{name}_se_scale")([y, se])
    y = conv_bn(y, width, 1, 1, f"{name}_c", relu=False)
    return residual(x, y, width, stride, name)


REGNET_PREPROCESSING = "x / 255 (keras.applications RegNet's built-in Rescaling; no mean/std)"


def regnet_preprocess(variant: str) -> keras.layers.Layer:
    """The reference RegNetY's input scaling (``Rescaling(1/255)``), named ``preprocess``."""
    return PixelNormalization(mean=(0.0, 0.0, 0.0), std=(255.0, 255.0, 255.0), name="preprocess")


@register_backbone(
    "regnet",
    preprocess=regnet_preprocess,
    preprocessing=REGNET_PREPROCESSING,
    default_variant="1.6gf",
    variants=tuple(REGNETY),
    from_scratch=False,
    loads_weights=regnet_weights.is_reference_file,
    weights_source="keras.applications (Keras 2) RegNetY ImageNet h5, mapped by name",
    weights_help="the keras.applications file (regnety016_notop.h5 for 1.6gf, regnety002 ... "
    "regnety320_notop.h5) or a backbone .weights.h5 file",
    description="RegNetY written in this project, layer for layer keras.applications' RegNetY",
)
def regnet(
    variant: str, input_shape: tuple[int, int, int], weights: str | None = None
) -> keras.Model:
    """Headless RegNetY ``variant``; output the last stage's feature map [B, S/32, S/32, C].

    Args:
        variant: a key of ``REGNETY``.
        input_shape: the input shape (``(None, None, 3)`` here: built size-free).
        weights: ``None`` (random initialisation), ``"imagenet"`` (the keras.applications file,
            fetched into ``~/.keras/models``) or the path of such a file on disk.
    """
    inputs = keras.Input(input_shape)
    x = conv_bn(inputs, STEM_WIDTH, 3, 2, "stem")
    for stage, (width, depth, group) in enumerate(stage_plan(REGNETY[variant]), start=1):
        for block in range(1, depth + 1):
            x = y_block(x, width, 2 if block == 1 else 1, group, f"s{stage}_b{block}")
    model = keras.Model(inputs, x, name=f"regnety_{variant}")
    if weights is not None:
        path = regnet_weights.fetch(variant) if weights == "imagenet" else weights
        regnet_weights.load_reference(model, path)
    return model
