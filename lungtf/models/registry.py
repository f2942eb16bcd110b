"""Backbone registry: one frozen spec per backbone, and ``build_model`` that wraps it in the head.

Every model built here has the same outer shape (docs/architecture.md, section lungtf.models), so
training, evaluation, Grad-CAM and export never need to know which backbone they hold::

    pixels (float32 [None,S,S,3], raw 0-255 RGB)
      -> preprocess   (the backbone's own input normalisation, or ModelConfig.input_norm's)
      -> backbone     (a keras.Model; output = last convolutional feature map [B,h,w,C])
      -> pool -> dropout -> logits -> probabilities (softmax, float32 even under mixed precision)

Keeping the preprocessing inside the model means a saved model, a SavedModel export and the web
demo all take the same raw pixels, and nobody can feed it with the wrong normalisation.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import h5py
import keras

from lungtf.config import INPUT_NORMS, ModelConfig
from lungtf.weight_sources import pretrained_input_norm, weights_for

BACKBONE_LAYER = "backbone"
WEIGHT_CHOICES: tuple[str, ...] = ("imagenet", "none", "PATH")
"""What one backbone's weights may be: ImageNet weights, random init, or a local source."""

HDF5_SUFFIXES: tuple[str, ...] = (".h5", ".hdf5")
"""Names of the weights files ``backbone.load_weights`` reads (``.weights.h5`` included)."""

IMAGENET_FETCH_TIMEOUT_S = 20.0
"""Socket timeout while pretrained weights are fetched: fail fast when offline."""

HEAD_LAYERS: tuple[str, ...] = ("pool", "dropout", "logits", "probabilities")
"""The layers after the backbone, in call order (``build_model``'s head)."""

IMAGENET_MEAN = (123.675, 116.28, 103.53)
"""ImageNet RGB channel means in 0-255 units (torch-style normalisation)."""
IMAGENET_STD = (58.395, 57.12, 57.375)
"""ImageNet RGB channel standard deviations in 0-255 units."""
IMAGENET_PREPROCESSING = "torch-style: (pixels - ImageNet mean) / ImageNet std, in 0-255 units"
"""What ``imagenet_preprocess`` does, as the backbone specs state it."""

INPUT_NORM_VALUES: dict[str, tuple[tuple[float, ...], tuple[float, ...], str]] = {
    "unit": ((0.0, 0.0, 0.0), (255.0, 255.0, 255.0), "x / 255"),
    "imagenet": (IMAGENET_MEAN, IMAGENET_STD, IMAGENET_PREPROCESSING),
}
"""``ModelConfig.input_norm`` choices other than ``default``: ``(mean, std, description)`` of the
``PixelNormalization`` that replaces the backbone's own preprocessing."""

_REGISTRY: dict[str, BackboneSpec] = {}


@keras.saving.register_keras_serializable(package="lungtf")
class PixelNormalization(keras.layers.Layer):
    """Per-channel ``(x - mean) / std`` on raw 0-255 pixels, optionally RGB -> BGR first.

    One layer covers both conventions used here: caffe-style (``keras.applications.resnet50.
    preprocess_input``: BGR, ImageNet mean subtracted, no scaling) and torch-style (ImageNet mean
    and standard deviation, in 0-255 units). It always computes in float32, so mixed precision
    never rounds the pixels before the first convolution.

    Args:
        mean: three per-channel means, in the channel order *after* the optional BGR flip.
        std: three per-channel standard deviations (same order).
        bgr: reverse the channel axis (RGB input -> BGR) before normalising.
    """

    def __init__(self, mean, std=(1.0, 1.0, 1.0), bgr: bool = False, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"mean and std must be 3 values, std > 0; got mean={mean}, std={std}")
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.bgr = bool(bgr)

    def call(self, inputs):
        x = keras.ops.cast(inputs, "float32")
        if self.bgr:
            x = keras.ops.flip(x, axis=-1)
        return (x - keras.ops.array(self.mean)) / keras.ops.array(self.std)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "mean": self.mean, "std": self.std, "bgr": self.bgr}


@dataclass(frozen=True)
class BackboneSpec:
    """What the rest of the project needs to know about one backbone.

    Attributes:
        name: registry name (``ModelConfig.backbone``).
        build: ``build(variant, input_shape, **kw) -> keras.Model`` returning the headless network
            (output: last convolutional feature map); transfer backbones accept ``weights``.
            ``input_shape`` is ``(None, None, 3)``: backbones are built size-free.
        preprocess: ``preprocess(variant) -> keras.layers.Layer``, the input normalisation the
            backbone expects, applied to raw 0-255 RGB pixels inside the model.
        preprocessing: one line saying what ``preprocess`` does, for logs and reports.
        default_size: the input side the backbone was designed for.
        default_variant: the variant ``ModelConfig.variant=None`` resolves to.
        variants: every allowed variant name.
        from_scratch: ``True`` when no pretrained weights exist (train all layers from the start).
        imagenet: whether ``weights="imagenet"`` is available (keras.applications weights).
        finetune_batchnorm: whether ``unfreeze_backbone`` should let BatchNorm train again. False
            for pretrained backbones: fine-tuning with the ImageNet statistics frozen is the Keras
            recipe, small batches would otherwise overwrite them. True for from-scratch ones.
        description: a short human description.
        loads_weights: ``loads_weights(source) -> bool``: whether ``build(..., weights=source)``
            loads this local or remote source itself (a reference checkpoint, a KerasHub
            preset directory or ``hf://`` handle). Other files go through
            ``backbone.load_weights`` (a ``.weights.h5`` saved from the same backbone).
        weights_source: where ``weights="imagenet"`` comes from (README table, error messages).
        weights_help: what a local source for this backbone looks like (error messages).
    """

    name: str
    build: Callable[..., keras.Model]
    preprocess: Callable[[str], keras.layers.Layer]
    preprocessing: str
    default_size: int
    default_variant: str
    variants: tuple[str, ...]
    from_scratch: bool
    imagenet: bool
    finetune_batchnorm: bool
    description: str
    loads_weights: Callable[[str], bool] = lambda source: False
    weights_source: str = ""
    weights_help: str = "a backbone weights file (model.get_layer('backbone').save_weights(...))"

    @property
    def weights_allowed(self) -> tuple[str, ...]:
        """Values ``ModelConfig.weights`` may take for this backbone."""
        return WEIGHT_CHOICES if self.imagenet else ("none", "PATH")

    def resolve_variant(self, variant: str | None) -> str:
        """The canonical variant name (``None`` -> default), or ``ValueError`` listing the valid ones."""
        chosen = self.default_variant if variant is None else str(variant).lower()
        if chosen not in self.variants:
            raise ValueError(
                f"unknown {self.name} variant {variant!r}; valid variants: {', '.join(self.variants)}"
            )
        return chosen


def register_backbone(
    name: str, *, from_scratch: bool, default_size: int = 224, **spec_fields
) -> Callable:
    """Decorator registering ``build`` under ``name`` with the remaining ``BackboneSpec`` fields.

    ``variants`` defaults to the default variant alone, ``imagenet`` to ``not from_scratch`` and
    ``finetune_batchnorm`` to ``from_scratch`` (pretrained backbones keep their ImageNet
    BatchNorm statistics when fine-tuned).

    Example::

        @register_backbone("resnet34", preprocess=..., preprocessing="...", default_variant="34",
                           from_scratch=True, description="...")
        def resnet34(variant, input_shape): ...
    """
    spec_fields = {"variants": (spec_fields.get("default_variant"),),
                   "imagenet": not from_scratch, "finetune_batchnorm": from_scratch,
                   **spec_fields, "from_scratch": from_scratch, "default_size": default_size}

    def decorator(build: Callable[..., keras.Model]) -> Callable[..., keras.Model]:
        if name in _REGISTRY:
            raise ValueError(f"backbone {name!r} is already registered")
        spec = BackboneSpec(name=name, build=build, **spec_fields)
        if spec.imagenet and not spec.weights_source:
            raise ValueError(f"backbone {name!r} has ImageNet weights: say where (weights_source)")
        spec.resolve_variant(spec.default_variant)
        _REGISTRY[name] = spec
        return build

    return decorator


def list_backbones() -> tuple[str, ...]:
    """Registered backbone names, in registration order."""
    return tuple(_REGISTRY)


def get_spec(name: str) -> BackboneSpec:
    """The spec of backbone ``name``; ``ValueError`` listing the registered names otherwise."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown backbone {name!r}; valid backbones: {', '.join(list_backbones())}"
        ) from None


def fetch_advice(spec: BackboneSpec) -> str:
    """How to give ``spec`` its weights without network (the tail of every fetch error)."""
    return (
        f"Use --weights PATH (or --weights {spec.name}=PATH for this backbone alone) with PATH = "
        f"{spec.weights_help}, or --weights none to train from random initialisation."
    )


@contextlib.contextmanager
def _imagenet_fetch(spec: BackboneSpec) -> Iterator[None]:
    """Bound socket waits while pretrained weights download; turn failures into advice."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(IMAGENET_FETCH_TIMEOUT_S)
    try:
        yield
    except (ValueError, RuntimeError):
        raise  # a source that does not fit, or a loader that explained its failure already
    except Exception as err:  # keras.utils.get_file raises a bare Exception on fetch failure
        raise RuntimeError(
            f"could not fetch the ImageNet weights of {spec.name} from {spec.weights_source} "
            f"({err}). {fetch_advice(spec)}"
        ) from err
    finally:
        socket.setdefaulttimeout(previous)


def check_weights_source(name: str, source: str) -> None:
    """``ValueError`` when backbone ``name`` cannot take weights of ``source``'s kind.

    A cheap check of the kind only, run by ``RunConfig.validate()`` for every backbone of a run
    before anything trains (whether a file fits the variant is known only when it is loaded):
    ``imagenet`` and ``none`` are always accepted (``imagenet`` for a backbone without ImageNet
    weights trains from scratch with a warning); a source the backbone's own loader takes is
    accepted (``spec.loads_weights``); any other source must be an HDF5 weights file
    (``.weights.h5``, ``.h5``, ``.hdf5``) for ``backbone.load_weights``, so a KerasHub preset
    directory or handle, or another kind of file, is refused.
    """
    spec = get_spec(name)
    if source in WEIGHT_CHOICES[:2] or spec.loads_weights(source):
        return
    if "://" in source or Path(source).is_dir():
        why = "a KerasHub preset directory or handle"
    elif not source.lower().endswith(HDF5_SUFFIXES):
        why = f"not a Keras weights file ({', '.join(HDF5_SUFFIXES)})"
    elif not h5py.is_hdf5(source):
        why = "not an HDF5 file"
    else:
        return
    raise ValueError(
        f"{spec.name} cannot load weights from {source} ({why}); it takes imagenet, none or "
        f"{spec.weights_help}"
    )


def preprocess_layer(spec: BackboneSpec, variant: str, input_norm: str = "default"):
    """The model's ``preprocess`` layer: the backbone's own (``default``) or ``input_norm``'s.

    Raises:
        ValueError: an unknown ``input_norm``, or one other than ``default`` for a backbone that
            normalises its input inside the backbone (keras.applications EfficientNetV2).
    """
    layer = spec.preprocess(variant)
    if input_norm == INPUT_NORMS[0]:
        return layer
    if input_norm not in INPUT_NORM_VALUES:
        raise ValueError(f"input_norm must be one of {', '.join(INPUT_NORMS)}; got {input_norm!r}")
    if not isinstance(layer, PixelNormalization):  # a setting the backbone cannot take
        raise ValueError(  # noqa: TRY004
            f"{spec.name} normalises its input inside the backbone ({spec.preprocessing}), so it "
            f"takes only input_norm default; got {input_norm!r}"
        )
    mean, std, _ = INPUT_NORM_VALUES[input_norm]
    return PixelNormalization(mean=mean, std=std, name="preprocess")


def _convention(spec: BackboneSpec, input_norm: str) -> tuple[tuple, str]:
    """``(key, description)`` of what ``input_norm`` makes of ``spec``'s input; equal keys,
    equal inputs to the backbone."""
    layer = preprocess_layer(spec, spec.default_variant, input_norm)
    config = layer.get_config()
    key = tuple(config.get(k) for k in ("mean", "std", "bgr")) + (type(layer).__name__,)
    if input_norm == INPUT_NORMS[0]:
        return key, f"{spec.name}'s own, {spec.preprocessing}"
    return key, f"{input_norm}, {INPUT_NORM_VALUES[input_norm][2]}"


def check_input_norm(name: str, source: str, input_norm: str) -> None:
    """``ValueError`` when backbone ``name`` with weights ``source`` cannot take ``input_norm``.

    Pretrained weights saw their input normalised one way, and keep it: ``imagenet``, a source
    the backbone's own loader takes (a reference checkpoint, a KerasHub preset) and a weights
    file of unknown origin are taken to follow the backbone's own preprocessing (``default``); a
    ``.weights.h5`` written by ``python -m lungtf.pretrain`` follows the ``input_norm`` its log
    records (``lungtf.weight_sources.pretrained_input_norm``). ``none`` (and ``imagenet`` for a
    backbone without ImageNet weights, which then trains from scratch) takes any. Run by
    ``RunConfig.validate()`` for every backbone and by ``build_model``.
    """
    spec = get_spec(name)
    run, run_text = _convention(spec, input_norm)
    if source == "none" or (source == "imagenet" and not spec.imagenet):
        return
    recorded = pretrained_input_norm(source)
    theirs, theirs_text = _convention(spec, recorded or INPUT_NORMS[0])
    if run != theirs:
        origin = (f"lungtf.pretrain weights {source} (pretrained with input_norm {recorded})"
                  if recorded else f"weights {source}")
        raise ValueError(
            f"input_norm {input_norm} ({run_text}) differs from the input convention of "
            f"{spec.name}'s {origin}: {theirs_text}. Pretrained weights need the input they were "
            f"trained on: use input_norm {recorded or 'default'}, or weights none (or weights "
            f"from python -m lungtf.pretrain --input-norm {input_norm})"
        )


def _build_backbone(spec: BackboneSpec, variant: str, source: str) -> keras.Model:
    """The headless backbone with weights ``source`` (one source: ``weights_for`` resolved it)."""
    shape = (None, None, 3)  # size-free, so that training_view can train it on crops
    check_weights_source(spec.name, source)
    if source == "imagenet" and not spec.imagenet:
        raise ValueError(
            f"{spec.name} has no ImageNet weights (it is {spec.description}); use "
            f"--weights none (train from scratch) or --weights PATH (a backbone weights file)"
        )
    if source == "none":
        backbone = spec.build(variant, shape)
    elif source == "imagenet" or spec.loads_weights(source):  # the backbone's own loader
        with _imagenet_fetch(spec):
            backbone = spec.build(variant, shape, weights=source)
    else:  # a Keras weights file of this backbone
        backbone = spec.build(variant, shape)
        try:
            backbone.load_weights(source)
        except (ValueError, KeyError) as err:
            raise ValueError(
                f"weights file {source} does not fit {spec.name} variant {variant} "
                f"({err}); it must be {spec.weights_help}, saved from the same backbone and "
                f"variant"
            ) from err
    backbone.name = BACKBONE_LAYER
    return backbone


def build_model(cfg: ModelConfig) -> keras.Model:
    """Build the classifier described by ``cfg`` (validated first).

    The model takes raw 0-255 float32 RGB pixels of ``cfg.image_size`` and returns float32 class
    probabilities, whatever the global dtype policy (mixed precision keeps the softmax in float32).

    Raises:
        ValueError: unknown backbone or variant, ``imagenet`` for a backbone that has none, a
            weights file that does not fit, or an ``input_norm`` the weights or the backbone
            cannot take (``check_input_norm``).
        RuntimeError: ``imagenet`` weights could not be fetched (no network).
    """
    cfg.validate()
    spec = get_spec(cfg.backbone)
    variant = spec.resolve_variant(cfg.variant)
    entry = cfg.backbone if cfg.variant is None else f"{cfg.backbone}:{cfg.variant}"
    source = weights_for(cfg.weights, entry)
    check_input_norm(spec.name, source, cfg.input_norm)
    preprocess = preprocess_layer(spec, variant, cfg.input_norm)
    backbone = _build_backbone(spec, variant, source)
    pixels = keras.Input((cfg.image_size, cfg.image_size, 3), dtype="float32", name="pixels")
    x = preprocess(pixels)
    x = backbone(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    x = keras.layers.Dropout(cfg.dropout, name="dropout")(x)
    x = keras.layers.Dense(cfg.num_classes, name="logits")(x)
    probabilities = keras.layers.Activation("softmax", dtype="float32", name="probabilities")(x)
    return keras.Model(pixels, probabilities, name=f"{spec.name}_{variant}")


def _sublayers(layer: keras.layers.Layer) -> Iterator[keras.layers.Layer]:
    """Every layer nested in ``layer``, parents before their children.

    Also the sublayers of custom layers that hold their own layers as attributes (KerasHub's
    MBConv blocks own BatchNorm layers and have no ``layers`` list), which Keras tracks.
    """
    return iter(layer._flatten_layers(include_self=False, recursive=True))


def freeze_backbone(model: keras.Model) -> None:
    """Freeze the ``backbone`` layer: no trainable weights, every BatchNorm in inference mode.

    In Keras 3 a BatchNormalization with ``trainable=False`` normalises with its moving statistics
    even when called with ``training=True``, so the head can be trained on top of pretrained
    features without disturbing them. Recompile the model after calling this.
    """
    model.get_layer(BACKBONE_LAYER).trainable = False


def unfreeze_backbone(model: keras.Model, train_batchnorm: bool = False) -> None:
    """Make the backbone trainable again for fine-tuning; recompile the model afterwards.

    Args:
        model: a model from ``build_model``.
        train_batchnorm: also let the backbone's BatchNorm layers train (batch statistics and
            gamma/beta). Keep ``False`` when fine-tuning pretrained weights: the BatchNorm layers
            stay in inference mode with their pretrained statistics. Pass
            ``get_spec(name).finetune_batchnorm`` to follow the backbone's own rule.
    """
    backbone = model.get_layer(BACKBONE_LAYER)
    backbone.trainable = True
    # Set every layer explicitly: Keras does not re-propagate trainable=True to a sublayer that was
    # frozen on its own, so a previous unfreeze(train_batchnorm=False) would otherwise stick.
    for layer in _sublayers(backbone):
        layer.trainable = train_batchnorm or not isinstance(layer, keras.layers.BatchNormalization)


def model_parts(model: keras.Model) -> tuple[Callable, keras.Model, Callable]:
    """Split a ``build_model`` model into ``(preprocess, backbone, head)`` callables (Grad-CAM).

    ``head(features)`` maps the backbone's feature map to probabilities in inference mode, so
    ``head(backbone(preprocess(pixels)))`` equals ``model(pixels)``.
    """
    pool, dropout, logits, probabilities = (model.get_layer(n) for n in HEAD_LAYERS)

    def head(features):
        return probabilities(logits(dropout(pool(features), training=False)))

    return model.get_layer("preprocess"), model.get_layer(BACKBONE_LAYER), head



def training_view(model: keras.Model, augmenter: keras.Layer | None = None) -> keras.Model:
    """The model that ``fit`` trains: ``model``'s own layers (shared weights) on any input size.

    A ``build_model`` model takes whole tiles of one size, the size it is evaluated, exported and
    served at. Training may feed random crops instead (``DataConfig.crop_size``) while validation
    feeds whole tiles, so ``fit`` runs this view: the same preprocessing, backbone and head layers
    behind an input of free height and width (the backbone is built size-free and the head pools
    globally). With ``augmenter`` (augmentation on the device) the view takes whole tiles and
    augments them first; the augmenter does nothing in validation. Save ``model``, not the view.
    """
    names = ("preprocess", BACKBONE_LAYER, *HEAD_LAYERS)
    shape = model.input_shape[1:] if augmenter is not None else (None, None, 3)
    pixels = keras.Input(shape, name="pixels")
    x = pixels if augmenter is None else augmenter(pixels)
    for name in names:
        x = model.get_layer(name)(x)
    return keras.Model(pixels, x, name=f"{model.name}_training")
