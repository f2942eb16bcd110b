"""Weight EMA (``--ema``): validation and best.keras use the averaged weights, resume keeps them."""

from pathlib import Path

import keras
import numpy as np
import pytest

from lungtf.config import TrainConfig, resolve_run_config
from lungtf.train.callbacks import make_callbacks, read_history
from lungtf.train.cli import _overrides, build_parser


def _model() -> keras.Model:
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, activation="relu"),
                              keras.layers.Dense(3, activation="softmax")])
    model.compile(keras.optimizers.AdamW(0.05, use_ema=True, ema_momentum=0.9),
                  "sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


class _EveryEpochIsBest(keras.callbacks.Callback):
    """Makes each epoch the best so far (best.keras is written at every epoch end)."""

    def on_epoch_end(self, epoch, logs=None):
        logs["val_accuracy"] = float(epoch)


class _Record(keras.callbacks.Callback):
    """Placed before ``make_callbacks``: the raw weights and the optimizer's averages at an
    epoch's end, before ``SwapEMA`` swaps them."""

    def __init__(self):
        super().__init__()
        self.raw, self.average, self.iterations = [], [], []

    def on_epoch_end(self, epoch, logs=None):
        opt = self.model.optimizer
        self.raw.append([v.numpy().copy() for v in opt._trainable_variables])
        self.average.append([v.numpy().copy() for v in opt._model_variables_moving_average])
        self.iterations.append(int(opt.iterations.numpy()))


class _Restored(keras.callbacks.Callback):
    """Placed after ``make_callbacks``: what the backup restored, when the first epoch begins."""

    def on_epoch_begin(self, epoch, logs=None):
        if not hasattr(self, "raw"):
            opt = self.model.optimizer
            self.raw = [v.numpy().copy() for v in opt._trainable_variables]
            self.average = [v.numpy().copy() for v in opt._model_variables_moving_average]
            self.iterations = int(opt.iterations.numpy())


def _data() -> tuple[np.ndarray, np.ndarray]:
    x = np.random.default_rng(0).normal(size=(48, 8)).astype("float32")
    return x, (x[:, 0] > 0).astype("int32") + (x[:, 1] > 1)


def _fit(model, out: Path, epochs: int, *first, last=()):
    x, y = _data()
    return model.fit(x, y, validation_data=(x, y), epochs=epochs, batch_size=8, verbose=0,
                     shuffle=False,
                     callbacks=[*first, *make_callbacks(out, "scratch", model, 48, 0, ema=True),
                                *last])


def _close(a, b) -> bool:
    return all(np.allclose(u, v, atol=1e-6) for u, v in zip(a, b))


def test_best_checkpoint_holds_the_averages_and_resume_keeps_them(tmp_path):
    record = _Record()
    history = _fit(_model(), tmp_path, 2, _EveryEpochIsBest(), record)
    best = keras.models.load_model(tmp_path / "best.keras")
    assert _close(best.get_weights(), record.average[-1])  # the averaged weights were saved
    assert not _close(best.get_weights(), record.raw[-1])  # not the raw ones
    # validation ran on the averaged weights: the saved model reproduces the logged val_loss
    x, y = _data()
    loss = best.evaluate(x, y, verbose=0, return_dict=True)["loss"]  # compiled as saved
    assert loss == pytest.approx(history.history["val_loss"][-1], 1e-5)
    # a restart restores the raw weights, the averages and the step count of the last backup
    restored = _Restored()
    _fit(_model(), tmp_path, 3, last=[restored])
    assert restored.iterations == record.iterations[-1] == 12
    assert _close(restored.raw, record.raw[-1]) and _close(restored.average, record.average[-1])
    assert [r["epoch"] for r in read_history(tmp_path / "history.csv")] == ["0", "1", "2"]


def test_early_stopping_keeps_the_averages_in_the_model(tmp_path):
    model, record = _model(), _Record()
    stop = keras.callbacks.LambdaCallback(
        on_epoch_end=lambda epoch, logs: setattr(model, "stop_training", epoch == 0))
    x, y = _data()
    callbacks = make_callbacks(tmp_path, "scratch", model, 48, 0, ema=True)
    swap = next(i for i, c in enumerate(callbacks) if type(c).__name__ == "SwapEMA")
    callbacks.insert(swap, stop)  # where EarlyStopping sits: before the swap
    model.fit(x, y, validation_data=(x, y), epochs=5, batch_size=8, verbose=0,
              callbacks=[record, *callbacks])
    assert len(record.average) == 1 and _close(model.get_weights(), record.average[0])


def test_ema_flag_config_and_validation():
    args = build_parser().parse_args(["--ema", "0.99"])
    assert _overrides(args)["train"]["ema_momentum"] == 0.99
    assert resolve_run_config("cpu", None, _overrides(args)).train.ema_momentum == 0.99
    assert TrainConfig().ema_momentum is None
    for bad in (0, 1, 1.5, -0.1, True, "0.9"):
        with pytest.raises(ValueError, match="ema_momentum must be a number in \\(0, 1\\)"):
            TrainConfig(ema_momentum=bad).validate()
