"""Config dataclasses: validation messages, YAML round-trip, unknown keys rejected."""

import logging
from dataclasses import replace

import h5py
import pytest

from lungtf import weight_sources
from lungtf.config import (
    PRESET_DIR,
    DataConfig,
    ModelConfig,
    RunConfig,
    TrainConfig,
    dump_yaml,
    from_dict,
    load_yaml,
    resolve_run_config,
    to_dict,
)
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
        (DataConfig(rotation_probability=1.5), "rotation_probability must be in 0..1; got 1.5"),
        (DataConfig(image_size=64, crop_size=96),
         r"crop_size must be 0 \(whole tiles\) or in 16..image_size \(64\); got 96"),
        (ModelConfig(weights="/no/such/file.weights.h5"), "/no/such/file"),
        (ModelConfig(dropout=1.0), "dropout"),
        (DataConfig(grouping_strictness="loose"), "grouping_strictness must be one of safe.*loose"),
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


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"epochs": -1}, "epochs must be an integer >= 0; got -1"),
        ({"head_epochs": 0, "epochs": 0}, "at least one epoch"),
        ({"lr": "fast"}, "lr must be a number in \\(0, 10\\] or 'auto'; got 'fast'"),
        ({"schedule": "step"}, "schedule must be one of cosine, onecycle, constant; got 'step'"),
        ({"label_smoothing": 1.0}, "label_smoothing"),
        ({"precision": "float16"}, "float16"),
        ({"jit_compile": "yes"}, "jit_compile"),
        ({"distribution": "tpu"}, "tpu"),
    ],
)
def test_train_config_validate(changes, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**changes).validate()


def test_resolution_order_defaults_preset_file_flags(tmp_path):
    assert RunConfig().train.scratch_epochs == TrainConfig().scratch_epochs
    preset = load_yaml(PRESET_DIR / "cpu.yaml")
    cfg = resolve_run_config("cpu")
    assert cfg.preset == "cpu" and cfg.data.image_size == preset["data"]["image_size"]
    assert cfg.train.head_epochs == TrainConfig().head_epochs  # not in the preset: default kept
    user = tmp_path / "my.yaml"
    user.write_text("data:\n  image_size: 48\ntrain:\n  lr: 1e-3\n  scratch_epochs: 3\n")
    cfg = resolve_run_config("cpu", user, {"train": {"scratch_epochs": 1}})
    assert cfg.data.image_size == cfg.model.image_size == 48  # mirrored into the model section
    assert cfg.train.lr == 0.001  # YAML 1.1 reads 1e-3 as text; taken as a number
    assert cfg.train.scratch_epochs == 1  # flags beat the file
    assert cfg.data.cache == preset["data"]["cache"]  # preset value survives the later layers
    dump_yaml(cfg, tmp_path / "config.yaml")
    assert from_dict(RunConfig, load_yaml(tmp_path / "config.yaml")) == cfg


def test_resolution_rejects_unknown_preset_and_keys(tmp_path):
    with pytest.raises(ValueError, match="preset must be one of cpu, cpu-224, gpu; got 'tpu'"):
        resolve_run_config("tpu")
    with pytest.raises(ValueError, match="unknown TrainConfig keys \\['epoch'\\]"):
        resolve_run_config(None, None, {"train": {"epoch": 3}})


def test_both_presets_load_and_state_their_recipe():
    gpu = resolve_run_config("gpu")
    assert (gpu.data.image_size, gpu.data.batch_size) == (224, 64)
    assert gpu.backbones == ("resnet50", "resnet50d", "efficientnetv2_rw_t", "regnet", "resnet34")
    assert gpu.model.weights == "imagenet"
    cpu = resolve_run_config("cpu")
    assert cpu.model.weights == "none" and cpu.data.image_size < 224
    # cpu-224 is the arm bench/cv.py paired with cpu: the cpu preset with five flags changed
    flags = {"data": {"image_size": 224, "crop_size": 112},
             "train": {"scratch_epochs": 16, "precision": "mixed_bfloat16"},
             "backbones": ["regnet:400mf"]}
    assert resolve_run_config("cpu-224") == replace(resolve_run_config("cpu", None, flags),
                                                     preset="cpu-224")
    for cfg in (gpu, cpu):
        cfg.data.validate()
        cfg.model.validate()
        cfg.train.validate()


def test_weights_per_backbone_parse_resolve_and_check(tmp_path):
    preset = tmp_path / "preset"
    preset.mkdir()
    h5 = tmp_path / "regnety016_notop.h5"
    h5py.File(h5, "w").close()  # an HDF5 file: the kind regnet loads (whether it fits: at build)
    value = f"regnet={h5},resnet50d={preset},efficientnetv2_rw_t=hf://timm/efficientnetv2_rw_t,none"
    ModelConfig(weights=value).validate()
    assert weight_sources.weights_for(value, "regnet:400mf") == str(h5)
    assert weight_sources.weights_for(value, "resnet50d") == str(preset)
    assert weight_sources.weights_for(value, "efficientnetv2_rw_t").startswith("hf://")
    assert weight_sources.weights_for(value, "resnet34") == "none"  # the bare item
    assert weight_sources.weights_for(f"regnet={h5}", "resnet50") == "imagenet"
    assert weight_sources.weights_for(f"regnet:200mf={h5},regnet=none", "regnet:200mf") == str(h5)
    run = RunConfig(model=ModelConfig(weights=value),
                    backbones=("regnet", "resnet50d", "efficientnetv2_rw_t", "resnet34"))
    run.validate()
    with pytest.raises(ValueError, match="names resnet50d, which the run does not train"):
        RunConfig(model=ModelConfig(weights=f"resnet50d={preset}"), backbones=("regnet",)).validate()
    for bad, message in [
        ("regnet=/no/such.h5", "got '/no/such.h5'"),
        ("none,imagenet", "one source without NAME="),
        (f"regnet={h5},regnet=none", "names 'regnet' twice"),
        ("imagenet,", "an empty item"),
    ]:
        with pytest.raises(ValueError, match=message):
            ModelConfig(weights=bad).validate()


def test_every_backbones_weights_kind_is_checked_before_anything_trains(tmp_path):
    """A source a backbone cannot load is refused by validate(), not when its turn comes (the
    fourth backbone of the gpu preset, after three fine-tunes)."""
    preset, torch_file, h5 = tmp_path / "preset", tmp_path / "r50d.pth", tmp_path / "b.weights.h5"
    preset.mkdir()
    torch_file.write_bytes(b"not hdf5")
    h5py.File(h5, "w").close()
    backbones = ("resnet50", "resnet50d", "efficientnetv2_rw_t", "regnet", "resnet34")
    ok = f"resnet50d={preset},efficientnetv2_rw_t=hf://timm/x,regnet={h5},resnet34=none"
    RunConfig(model=ModelConfig(weights=ok), backbones=backbones).validate()
    for bad, message in [
        (f"regnet={preset}", (f"'regnet'.*regnet cannot load weights from {preset} "
                              r"\(a KerasHub preset directory or handle\).*regnety016_notop.h5")),
        ("resnet34=hf://timm/resnet34", "resnet34 cannot load weights from hf://timm/resnet34"),
        (f"resnet50d={torch_file}", (r"resnet50d cannot load weights from .*r50d.pth \(not a "
                                     r"Keras weights file \(.h5, .hdf5\)\).*save_to_preset")),
        (f"regnet:200mf={tmp_path / 'fake.h5'}", "got '.*fake.h5'"),  # a file that does not exist
        (f"regnet:400mf={h5}", "names regnet:400mf, which the run does not train"),
    ]:
        with pytest.raises(ValueError, match=message):
            RunConfig(model=ModelConfig(weights=bad), backbones=backbones).validate()
    fake = tmp_path / "fake.h5"
    fake.write_bytes(b"")  # named like weights, not HDF5
    with pytest.raises(ValueError, match=r"'resnet50': resnet50 cannot .*fake.h5 \(not an HDF5"):
        RunConfig(model=ModelConfig(weights=f"{fake},resnet34=none"), backbones=backbones).validate()


def test_train_cli_reports_a_bad_configuration_in_one_line_and_writes_nothing(tmp_path, caplog):
    """A bad flag value, --config file or stored config.yaml ends `python -m lungtf.train` with
    exit code 2 and one error line naming the problem, before any run directory is made."""
    from lungtf.train.cli import main

    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("train: [unclosed\n")
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("train:\n  epochz: 3\n")
    out = tmp_path / "runs"
    cases = [
        (["--lr", "-1"], "lr"),
        (["--pretrain-epochs", "2", "--weights", "imagenet"], "pretrain_epochs"),
        (["--config", str(bad_yaml)], "bad.yaml"),
        (["--config", str(unknown)], "epochz"),
        (["--config", str(tmp_path / "missing.yaml")], "missing.yaml"),
        (["--resume", str(tmp_path / "no-such-run")], "config.yaml"),
    ]
    for flags, named in cases:
        caplog.clear()
        with caplog.at_level(logging.ERROR, logger="lungtf.train"):
            code = main(["--preset", "cpu", "--output", str(out), "--data", str(tmp_path), *flags])
        assert code == 2, flags
        errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(errors) == 1 and "invalid configuration" in errors[0], (flags, errors)
        assert named in errors[0], (flags, errors)
    assert not out.exists()
