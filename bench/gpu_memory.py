"""Estimated accelerator memory of one training step per backbone (an analytic ESTIMATE).

Nothing runs on a GPU here: each backbone is built with Keras (``weights: none``, the same
architecture as with ImageNet weights) at ``--image-size`` under the ``--precision`` policy, and
the memory of a step that trains every layer (the ``finetune``/``scratch`` phase, the peak of
the recipe) is added up from the model itself:

- weights: every variable, float32 under every policy (mixed precision keeps float32 weights);
- gradients: one float32 value per trainable weight;
- optimizer state: AdamW's two float32 moments per trainable weight;
- activations: the output of every layer (nested backbones walked down to their leaf layers),
  times the batch, at the layer's compute dtype (2 bytes under ``mixed_float16``, 4 under
  float32), as if each were kept for the backward pass; the device-side augmentation's float32
  outputs are counted too.

What it leaves out, so read it as a guide to the order of magnitude and to the ratios between
backbones: cuDNN/XLA workspaces and fusion (XLA keeps fewer intermediate tensors), temporaries
inside a layer (BatchNorm, the RegNet grouped convolution's depthwise form on CPU), the CUDA
context (~0.3-0.5 GB) and the allocator's fragmentation. TensorFlow reserves most of the GPU's
memory by default anyway; this estimate says whether a batch fits, not what ``nvidia-smi`` shows.

    python bench/gpu_memory.py [--image-size 224] [--batch-size 64] [--precision mixed_float16]
        [--backbones resnet50,efficientnetv2,regnet,resnet34] [--out FILE]
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import tensorflow as tf

from lungtf.config import DEFAULT_AUGMENT, ModelConfig, resolve_run_config
from lungtf.data.augment import build_augmenter
from lungtf.models import build_model, get_spec
from lungtf.models.portable import dtype_policy
from lungtf.train.fit import parse_entry

BYTES = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}
GIB = 1024**3


def leaf_layers(layer: keras.Layer) -> list[keras.Layer]:
    """The layers that compute: nested models and subclassed blocks (KerasHub's MBConv blocks
    are single layers with their own convolutions and BatchNorms inside) walked down."""
    return [
        sub
        for sub in layer._flatten_layers(include_self=False, recursive=True)
        if not isinstance(sub, keras.layers.InputLayer) and not list(sub._flatten_layers(False))
    ]


def activation_bytes(model: keras.Layer, image_size: int, batch: int, **call) -> int:
    """Bytes of every leaf layer's outputs for ``batch`` images, at the dtype they come out in.

    One eager forward pass of a single image records what each leaf layer returns (its ``call``
    wrapped for the pass), so layers used inside subclassed blocks count as well; the sizes are
    then scaled to the batch.
    """
    recorded = []
    leaves = leaf_layers(model)
    for leaf in leaves:
        def record(*args, _call=leaf.call, **kwargs):
            out = _call(*args, **kwargs)
            recorded.extend(t for t in tf.nest.flatten(out) if hasattr(t, "dtype"))
            return out
        leaf.call = record
    try:
        model(tf.zeros((1, image_size, image_size, 3)), **call)
    finally:
        for leaf in leaves:
            del leaf.call
    return sum(batch * math.prod(t.shape[1:]) * BYTES[t.dtype.name] for t in recorded)


def estimate(entry: str, image_size: int, batch: int, precision: str) -> dict:
    """The estimate for backbone ``entry`` (``name[:variant]``), in bytes, with its parameters."""
    name, variant = parse_entry(entry)
    variant = get_spec(name).resolve_variant(variant)
    with dtype_policy(precision):
        model = build_model(ModelConfig(backbone=name, variant=variant, weights="none",
                                        image_size=image_size))
        augmenter = build_augmenter(DEFAULT_AUGMENT)
    trainable = sum(math.prod(w.shape) for w in model.trainable_weights)
    every = sum(math.prod(w.shape) for w in model.weights)
    return {
        "entry": f"{name}:{variant}",
        "params": every,
        "weights": 4 * every,
        "gradients": 4 * trainable,
        "optimizer": 8 * trainable,
        "activations": activation_bytes(model, image_size, batch, training=True)
        + activation_bytes(augmenter, image_size, batch, training=True),
    }


def main(argv: list[str] | None = None) -> None:
    gpu = resolve_run_config("gpu")
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--image-size", type=int, default=gpu.data.image_size)
    p.add_argument("--batch-size", type=int, default=gpu.data.batch_size)
    p.add_argument("--precision", default="mixed_float16",
                   choices=("float32", "mixed_float16", "mixed_bfloat16"))
    p.add_argument("--backbones", default=",".join(gpu.backbones))
    p.add_argument("--out", type=Path, help="also write the markdown table here")
    args = p.parse_args(argv)
    lines = [
        (
            f"Estimated memory of one all-layers training step, {args.image_size} px, batch "
            f"{args.batch_size}, {args.precision} (bench/gpu_memory.py; an analytic estimate, "
            "not a measurement)"
        ),
        "",
        "| backbone | parameters | weights + gradients + AdamW | activations | total |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for entry in [e.strip() for e in args.backbones.split(",") if e.strip()]:
        r = estimate(entry, args.image_size, args.batch_size, args.precision)
        state = r["weights"] + r["gradients"] + r["optimizer"]
        lines.append(
            f"| {r['entry']} | {r['params'] / 1e6:.1f} M | {state / GIB:.2f} GiB | "
            f"{r['activations'] / GIB:.2f} GiB | {(state + r['activations']) / GIB:.1f} GiB |"
        )
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
