"""ImageNet weights for our RegNetY: the keras.applications RegNetY checkpoints, read with h5py.

Keras 2 (tf-keras) published ImageNet weights for ``keras.applications.RegNetY002`` ... ``320``
as HDF5 files in the legacy Keras weights layout (``<model>_notop.h5`` without the classifier).
Keras 3 has no RegNet, and its ``load_weights`` matches such a file to a model by layer order,
which our layer graph does not share. So the file is read here with h5py, and every weight is
assigned by name to the layer of ``lungtf.models.regnet`` that plays the same role; the two
networks compute the same function (``tests/test_regnet_weights.py`` checks it against
tf-keras's own RegNetY to 1e-4).

Reference layer names and ours (stage ``i`` and block ``j`` count from 0 there, from 1 here)::

    <model>_stem_conv / _stem_bn                      -> stem_conv / stem_bn
    <model>_Stage_i_YBlock_j_conv_1x1_1 (+ _bn)       -> s{i+1}_b{j+1}_a_conv / _a_bn
    <model>_Stage_i_YBlock_j_conv_3x3 (+ _bn)         -> s{i+1}_b{j+1}_b_conv / _b_bn
    <model>_Stage_i_YBlock_j_squeeze_and_excite_squeeze / _excite -> _se_reduce / _se_expand
    <model>_Stage_i_YBlock_j_conv_1x1_2 (+ _bn)       -> s{i+1}_b{j+1}_c_conv / _c_bn
    <model>_Stage_i_YBlock_j_skip_1x1 / _skip_bn      -> s{i+1}_b{j+1}_proj_conv / _proj_bn

The grouped 3x3 kernel is stored in the standard grouped layout ``[3, 3, in/groups, out]`` on
both sides, so no weight needs transposing.
"""

from __future__ import annotations

import re
from pathlib import Path

import h5py
import keras
import numpy as np

BASE_URL = "https://storage.googleapis.com/tensorflow/keras-applications/regnet/"
"""Where keras.applications downloads its RegNet weights from."""

REFERENCE: dict[str, tuple[str, str]] = {
    "200mf": ("regnety002", "f63221f63d625b8e201221499682587bfe29d33f50a4c4f4d53be00f66c0f12c"),
    "400mf": ("regnety004", "45e6ba8309a17a77e67afc05228454b2e0ee6be0dae65edc0f31f1da10cc066b"),
    "600mf": ("regnety006", "b70261cba4e60013c99d130cc098d2fce629ff978a445663b6fa4f8fc099a2be"),
    "800mf": ("regnety008", "b11f5432a216ee640fe9be6e32939defa8d08b8d136349bf3690715a98752ca1"),
    "1.6gf": ("regnety016", "d7404f50205e82d793e219afb9eb2bfeb781b6b2d316a6128c6d7d7dacab7f57"),
    "3.2gf": ("regnety032", "eb3ac1c45ec60f4f031c3f5180573422b1cf7bebc26c004637517372f68f8937"),
    "4.0gf": ("regnety040", "b5be2a5e5f072ecdd9c0b8a437cd896df0efa1f6a1f77e41caa8719b7dfcb05d"),
    "6.4gf": ("regnety064", "885c4b7ed7ea339daca7dafa1a62cb7d41b1068897ef90a5a3d71b4a2e2db31a"),
    "8.0gf": ("regnety080", "3d119577e1e3bf8d153b895e8ea9e4ec150ff2d92abdca711b6e949c3fd7115d"),
    "12gf": ("regnety120", "4a6fa387108380b730b71feea2ad80b5224b5ea9dc21dc156c93fe3c6186485c"),
    "16gf": ("regnety160", "ead1e6b568be8f34447ec8941299a9df4368736ba9a8205de5427fa20a1fb316"),
    "32gf": ("regnety320", "cad78f74a586e24c61d38be17f3ae53bb9674380174d2585da1a526b8c20e1fd"),
}
"""Our variant -> (keras.applications model name, SHA-256 of its ``_notop.h5`` file)."""

_BLOCK_PARTS = {
    "conv_1x1_1": "a_conv", "conv_1x1_1_bn": "a_bn", "conv_3x3": "b_conv", "conv_3x3_bn": "b_bn",
    "squeeze_and_excite_squeeze": "se_reduce", "squeeze_and_excite_excite": "se_expand",
    "conv_1x1_2": "c_conv", "conv_1x1_2_bn": "c_bn", "skip_1x1": "proj_conv", "skip_bn": "proj_bn",
}  # fmt: skip
_BLOCK = re.compile(r"_Stage_(\d+)_YBlock_(\d+)_(" + "|".join(_BLOCK_PARTS) + r")$")
_STEM = re.compile(r"_stem_(conv|bn)$")


def file_name(variant: str) -> str:
    """keras.applications' file name of ``variant``'s headless weights (``regnety016_notop.h5``)."""
    return f"{REFERENCE[variant][0]}_notop.h5"


def fetch(variant: str) -> str:
    """Download (or find in ``~/.keras/models``) the ImageNet weights of ``variant``; its path.

    The same call keras.applications makes: ``keras.utils.get_file`` with the published URL and
    SHA-256, so the file is shared with a Keras 2 install and checked before use. Raises what
    ``get_file`` raises when the file cannot be fetched (the caller bounds and explains it).
    """
    name = file_name(variant)
    return keras.utils.get_file(
        name, BASE_URL + name, cache_subdir="models", file_hash=REFERENCE[variant][1]
    )


def _text(values) -> list[str]:
    return [v.decode() if isinstance(v, bytes) else str(v) for v in values]


def _weights_root(f: h5py.File) -> h5py.Group:
    """The group holding ``layer_names`` (a full-model file nests it in ``model_weights``)."""
    return f.get("model_weights", f)


def is_reference_file(source: str) -> bool:
    """Whether ``source`` is a legacy Keras (``keras.applications``-style) HDF5 weights file.

    Those list their layers in a ``layer_names`` attribute; a Keras 3 ``.weights.h5`` file (our
    own ``save_weights``) does not, and goes through ``keras.Model.load_weights`` instead.
    """
    path = Path(source)
    if not path.is_file() or not h5py.is_hdf5(path):
        return False
    with h5py.File(path, "r") as f:
        return "layer_names" in _weights_root(f).attrs


def our_layer_name(reference_name: str) -> str | None:
    """The name of our layer that plays the role of reference layer ``reference_name``.

    ``None`` for a reference layer that has no counterpart here (the classifier of a file with
    top, which this headless backbone does not have).
    """
    if match := _STEM.search(reference_name):
        return f"stem_{match[1]}"
    if match := _BLOCK.search(reference_name):
        stage, block, part = int(match[1]) + 1, int(match[2]) + 1, _BLOCK_PARTS[match[3]]
        return f"s{stage}_b{block}_{part}"
    return None


def read_reference(path: str) -> dict[str, dict[str, np.ndarray]]:
    """``{our layer name: {weight name: array}}`` from a keras.applications RegNetY file.

    Weight names lose their layer prefix and ``:0`` suffix (``kernel``, ``gamma``, ...), the names
    Keras 3 gives the same variables. Layers without weights are skipped.

    Raises:
        ValueError: a weighted layer that no layer here corresponds to (not a RegNetY file).
    """
    out: dict[str, dict[str, np.ndarray]] = {}
    with h5py.File(path, "r") as f:
        root = _weights_root(f)
        for layer in _text(root.attrs["layer_names"]):
            names = _text(root[layer].attrs.get("weight_names", []))
            if not names:
                continue
            ours = our_layer_name(layer)
            if ours is None:
                if layer.endswith("head_dense"):
                    continue  # the ImageNet classifier of a file with top: not part of a backbone
                raise ValueError(
                    f"{path} holds weights of layer {layer!r}, which is not a layer of a "
                    f"keras.applications RegNetY (stem_conv/bn, Stage_i_YBlock_j_...)"
                )
            out[ours] = {n.split("/")[-1].split(":")[0]: np.asarray(root[layer][n]) for n in names}
    return out


def load_reference(backbone: keras.Model, path: str) -> None:
    """Assign the weights of keras.applications RegNetY file ``path`` to our ``backbone``.

    Every variable of ``backbone`` must receive exactly one weight of the same name and shape,
    and every weight of the file must be used: a file of another variant, or of another network,
    fails with ``ValueError`` before the backbone is changed.
    """
    reference = read_reference(path)
    assignments = []
    for layer in backbone.layers:
        if not layer.weights:
            continue
        given = reference.pop(layer.name, None)
        if given is None:
            raise ValueError(f"{path} has no weights for layer {layer.name!r} of {backbone.name}")
        for variable in layer.weights:
            value = given.pop(variable.name, None)
            if value is None or tuple(value.shape) != tuple(variable.shape):
                got = "nothing" if value is None else f"shape {tuple(value.shape)}"
                raise ValueError(
                    f"{path} does not fit {backbone.name}: {layer.name}/{variable.name} needs "
                    f"shape {tuple(variable.shape)}, the file has {got}"
                )
            assignments.append((variable, value))
        if given:
            raise ValueError(f"{path}: unused weights {sorted(given)} of layer {layer.name!r}")
    if reference:
        raise ValueError(
            f"{path} does not fit {backbone.name}: it has weights for layers this variant lacks "
            f"({', '.join(sorted(reference)[:5])}{', ...' if len(reference) > 5 else ''})"
        )
    for variable, value in assignments:
        variable.assign(value)
