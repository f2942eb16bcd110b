"""A float32, device-independent copy of a model: what ``lungtf.export`` writes as a SavedModel.

A model trained with the GPU recipe differs from one trained on a CPU in two ways that must not
reach a SavedModel meant for stock TensorFlow Serving on a CPU:

- its layers keep the run's dtype policy (``mixed_float16``/``mixed_bfloat16``), so the exported
  graph would compute in float16 (emulated on most CPUs: slow, and rounded);
- a layer may choose its implementation from the device it is built on: ``GroupedConv2D`` takes
  Keras's grouped convolution when a GPU is visible at build time -- also when a checkpoint is
  reloaded for export -- and Keras's TensorFlow backend traces that convolution as an
  XLA-must-compile function (``_XlaMustCompile``), which ``tensorflow/serving`` on a CPU does not
  run by default (its warm-up fails and the version never loads).

``portable_copy`` rebuilds the model from its config with every dtype policy set to float32 and
every layer whose class declares a ``PORTABLE_CONFIG`` (``GroupedConv2D``: the depthwise
rewrite, plain TensorFlow kernels on any device) switched to it, then copies the weights. Weights
are float32 under every policy and the portable implementations store the same kernels, so the
copy computes the same function in float32, whatever device and policy the model was trained
with.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import keras

PORTABLE_DTYPE = "float32"
"""The dtype policy of every layer of an exported model."""


def _is_policy(value: Any) -> bool:
    return isinstance(value, dict) and "DTypePolicy" in str(value.get("class_name", ""))


def _portable_config(config: Any) -> Any:
    """``config`` (a serialized Keras object, nested) with float32 policies and portable layers."""
    if isinstance(config, list):
        return [_portable_config(v) for v in config]
    if not isinstance(config, dict):
        return config
    out = {k: _portable_config(v) for k, v in config.items()}
    inner = out.get("config")
    if isinstance(inner, dict) and "class_name" in out:
        if _is_policy(inner.get("dtype")):
            inner["dtype"] = PORTABLE_DTYPE
        name = out.get("registered_name") or out["class_name"]
        cls = keras.saving.get_registered_object(name)
        inner.update(getattr(cls, "PORTABLE_CONFIG", None) or {})
    return out


@contextlib.contextmanager
def dtype_policy(name: str) -> Iterator[None]:
    """Set Keras's global dtype policy to ``name`` inside the block and restore it after.

    Layers take the global policy when they are built, so building (or rebuilding) a model under
    a precision is scoped to this block and cannot leak into the next model of the process.
    """
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(name)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def portable_copy(model: keras.Model) -> keras.Model:
    """A float32 copy of ``model`` with device-independent layers and the same weights.

    ``model`` must be rebuildable from its config: a functional model, as ``build_model`` makes.
    """
    import lungtf.models  # noqa: F401  (registers the custom layers the config names)

    config = _portable_config(keras.saving.serialize_keras_object(model))
    with dtype_policy(PORTABLE_DTYPE):
        copy = keras.saving.deserialize_keras_object(config)
    copy.set_weights(model.get_weights())
    return copy
