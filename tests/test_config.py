"""Config dataclasses: validation messages, YAML round-trip, unknown keys rejected."""

import pytest

from lungtf.config import DataConfig, ModelConfig, dump_yaml, from_dict, load_yaml, to_dict
from lungtf.constants import CLASS_NAMES, class_index, is_cancer


def test_class_names_and_cancer_mapping():
    assert CLASS_NAMES == ("lung_aca", "lung_n", "lung_scc")
    assert [is_cancer(c) for c in CLASS_NAMES] == [True, False, True]
    with pytest.raises(ValueError, match="lung_aca, lung_n, lung_scc"):
        class_index("colon_aca")


@pytest.mark.parametrize(
    "cfg, message",
    [
        (DataConfig(ratios=(0.5, 0.5, 0.5)), "sum to 1"),
        (DataConfig(image_size=8), "image_size"),
        (DataConfig(augment=("flip_horizontal", "mixup")), "mixup"),
        (ModelConfig(weights="/no/such/file.weights.h5"), "/no/such/file"),
        (ModelConfig(dropout=1.0), "dropout"),
    ],
)
def test_validate_names_what_was_received(cfg, message):
    with pytest.raises(ValueError, match=message):
        cfg.validate()


def test_yaml_round_trip_and_unknown_keys(tmp_path):
    cfg = from_dict(DataConfig, {"image_size": 64, "augment": ["rotate"]})
    assert cfg.augment == ("rotate",) and cfg.image_size == 64
    dump_yaml(cfg, tmp_path / "c.yaml")
    assert from_dict(DataConfig, load_yaml(tmp_path / "c.yaml")) == cfg
    assert to_dict(cfg)["augment"] == ["rotate"]
    with pytest.raises(ValueError, match="imagesize"):
        from_dict(DataConfig, {"imagesize": 64})
