"""bench/gpu_memory.py counts what each layer that computes returns, inside subclassed blocks too."""

from __future__ import annotations

import keras

from bench.gpu_memory import activation_bytes, estimate, leaf_layers
from lungtf.models.portable import dtype_policy


class Block(keras.layers.Layer):
    """A subclassed block like KerasHub's MBConv: two layers hidden inside one."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.conv = keras.layers.Conv2D(4, 3, padding="same")
        self.act = keras.layers.ReLU()

    def call(self, x):
        return self.act(self.conv(x))


def _model() -> keras.Model:
    pixels = keras.Input((None, None, 3))
    return keras.Model(pixels, keras.layers.Conv2D(2, 1)(Block()(pixels)))


def test_subclassed_blocks_are_walked_into_and_scaled_to_the_batch():
    model = _model()
    assert sorted(type(la).__name__ for la in leaf_layers(model)) == ["Conv2D", "Conv2D", "ReLU"]
    # 8x8 outputs: 4 + 4 + 2 channels, float32, 5 images
    assert activation_bytes(model, 8, batch=5) == 5 * 8 * 8 * (4 + 4 + 2) * 4
    assert model.layers[1].call.__func__ is Block.call  # the recording wrapper is removed


def test_mixed_precision_halves_the_activations():
    with dtype_policy("mixed_float16"):
        half = activation_bytes(_model(), 8, batch=1)
    assert half == activation_bytes(_model(), 8, batch=1) // 2


def test_estimate_of_a_registered_backbone_counts_state_and_activations():
    r = estimate("regnet:200mf", 32, 4, "float32")
    assert r["weights"] == 4 * r["params"] and r["optimizer"] == 2 * r["gradients"] > 0
    assert r["activations"] > 4 * 32 * 32 * 3 * 4  # more than the input images alone
