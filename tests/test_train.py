"""The plain-process train loop, config, checkpoints and the exported model file."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from acol_core.config import ConfigError, TrainConfig
from acol_core.export import ExportError, export_bytes, load_exported, read_export_info
from acol_core.train import (
    EpochPrefetcher,
    build_model,
    checkpoint_bytes,
    fit,
    iterate_minibatches,
    load_checkpoint_bytes,
    localization_metrics,
    make_optimizer,
    predict,
)


def _toy_arrays(n: int = 48, size: int = 32, seed: int = 0) -> dict[str, np.ndarray]:
    """Class 1 images hold a bright square (the object); class 0 images are noise only."""
    rng = np.random.default_rng(seed)
    images = rng.normal(0, 0.3, size=(n, 1, size, size)).astype(np.float32)
    labels = np.arange(n) % 2
    masks = np.zeros((n, size, size), np.uint8)
    for i in np.flatnonzero(labels):
        y, x = rng.integers(2, size - 12, size=2)
        images[i, 0, y : y + 10, x : x + 10] += 2.0
        masks[i, y : y + 10, x : x + 10] = 1
    return {
        "image": images,
        "label": labels.astype(np.int64),
        "mask": masks,
        "anatomy_mask": np.zeros_like(masks),
        "fullsup": np.ones(n, bool),
    }


def _config(**kw) -> TrainConfig:
    base = {"model": "acol", "epochs": 3, "batch_size": 16, "lr": 0.02, "image_size": 32, "augment": False}
    return TrainConfig.from_dict({**base, **kw})


def _fit(config: TrainConfig, data: dict, **kw):
    return fit(
        config,
        train_batches=lambda e: iterate_minibatches(
            data, config.batch_size, np.random.default_rng([0, e]), False
        ),
        val_batches=lambda: iterate_minibatches(data, 32, None, False),
        **kw,
    )


@pytest.mark.parametrize(
    "values, message",
    [
        ({"epochs": 0}, "epochs"),
        ({"lr": -1.0}, "lr"),
        ({"model_options": {"delta": 1.5}}, "delta"),
        ({"bogus": 1}, "unknown config keys: bogus"),
        ({"amp": "fp8"}, "amp"),
        ({"head_lr_mult": 0.0}, "head_lr_mult"),
    ],
)
def test_config_rejects_bad_values(values, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig.from_dict(values)


@pytest.mark.parametrize(
    "values, head_lr",
    [
        ({}, 0.02),
        ({"pretrained": "vgg16.pth"}, 0.2),
        ({"pretrained": "vgg16.pth", "head_lr_mult": 3.0}, 0.06),
    ],
)
def test_heads_train_at_10x_only_when_fine_tuning(values, head_lr):
    """ACoL's 10x heads are a fine-tuning recipe; from scratch the heads train at the backbone's rate."""
    model = build_model(_config())
    groups = make_optimizer(model, _config(**values)).param_groups
    assert [(g["name"], g["lr"]) for g in groups] == [("backbone", 0.02), ("heads", pytest.approx(head_lr))]


def test_config_round_trips_through_plain_dict():
    cfg = _config(model_options={"delta": 0.7})
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("model", ["cam", "acol"])
def test_fit_learns_toy_task_and_reports_metrics(model):
    data = _toy_arrays()
    result = _fit(_config(model=model, epochs=6), data)
    last = result.history[-1]
    assert len(result.history) == 6
    assert result.history[0]["train_loss"] > last["train_loss"]
    assert last["val_accuracy"] >= 0.9
    for key in ("val_pxap", "val_max_box_acc_v2", "val_off_target"):
        assert 0.0 <= last[key] <= 1.0
    # the object is a bright square: the class map should find it far better than chance (share of pixels)
    assert last["val_pxap"] > 0.5


def test_resume_from_checkpoint_matches_uninterrupted_run():
    data = _toy_arrays()
    cfg = _config(epochs=4)
    full = _fit(cfg, data)
    saved: dict = {}

    def keep(epoch, metrics, state):
        if epoch == 1:
            saved["blob"] = checkpoint_bytes(state())

    _fit(cfg.replace(epochs=4), data, hooks=[keep])
    resumed = _fit(cfg, data, resume=load_checkpoint_bytes(saved["blob"]))
    assert [h["epoch"] for h in resumed.history] == [2.0, 3.0]
    for key, value in full.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[key], value, rtol=1e-5, atol=1e-6)


def test_checkpoint_refuses_pickled_objects():
    import pickle

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    blob = pickle.dumps({"model": Evil()})
    with pytest.raises(pickle.UnpicklingError):
        load_checkpoint_bytes(blob)


def test_predict_uses_given_label_or_prediction():
    data = _toy_arrays(n=8)
    model = _fit(_config(epochs=1), data).model
    with_labels = predict(model, iterate_minibatches(data, 8, None, False), torch.device("cpu"))
    without = predict(model, iterate_minibatches(data, 8, None, False), torch.device("cpu"), use_labels=False)
    assert with_labels["cam"].shape == (8, 32, 32)
    assert with_labels["cam"].min() >= 0 and with_labels["cam"].max() <= 1
    same = with_labels["pred"] == data["label"]
    np.testing.assert_allclose(with_labels["cam"][same], without["cam"][same], atol=1e-6)


def test_localization_metrics_skip_rows_without_object():
    data = _toy_arrays(n=8)
    pred = {
        "pred": data["label"],
        "label": data["label"],
        "mask": data["mask"],
        "cam": data["mask"].astype(float),
    }
    metrics = localization_metrics(pred)
    assert metrics["localized_rows"] == 4
    assert metrics["pxap"] == pytest.approx(1.0)
    assert metrics["accuracy"] == 1.0


def test_export_round_trip_and_bad_files(tmp_path):
    data = _toy_arrays(n=8)
    cfg = _config(epochs=1)
    model = _fit(cfg, data).model
    blob = export_bytes(model, cfg, ["healthy", "tumour"])
    loaded, info = load_exported(blob)
    assert info.class_names == ["healthy", "tumour"] and info.config == cfg
    x = torch.as_tensor(data["image"])
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x)["logits"], model(x)["logits"])
    with pytest.raises(ExportError, match="class names"):
        export_bytes(model, cfg, ["only-one"])
    with pytest.raises(ExportError):
        read_export_info(blob[:40])  # header cut short
    with pytest.raises(ExportError):
        load_exported(b"\x00" * 64)
    with pytest.raises(ExportError, match="damaged|truncated"):
        load_exported(blob[:-100])


def test_epoch_prefetcher_loads_next_epoch_in_background():
    """Epoch e + 1's iterator is made, and its first batch taken, in another thread once epoch e ends."""
    made: list[tuple[int, str]] = []
    pulled = {epoch: threading.Event() for epoch in range(3)}

    def make(epoch: int):
        made.append((epoch, threading.current_thread().name))
        for i in range(2):
            pulled[epoch].set()
            yield {"epoch": epoch, "i": i}

    prefetch = EpochPrefetcher(make, epochs=3)
    prefetch.start(0)
    assert pulled[0].wait(5)  # the first batch is taken before anyone asks
    assert [b["i"] for b in prefetch(0)] == [0, 1]
    assert prefetch.pending_epoch == 1 and pulled[1].wait(5)
    assert [b["epoch"] for b in prefetch(1)] == [1, 1]
    assert [b["epoch"] for b in prefetch(2)] == [2, 2]
    assert prefetch.pending_epoch is None  # nothing past the last epoch
    assert [e for e, _ in made] == [0, 1, 2]
    assert all(name.startswith("prefetch-epoch-") for _, name in made)


def test_epoch_prefetcher_raises_prefetch_errors_and_handles_odd_orders():
    def make(epoch: int):
        if epoch == 1:
            raise OSError("storage went away")
        return iter([epoch])

    prefetch = EpochPrefetcher(make, epochs=3)
    assert list(prefetch(0)) == [0]
    with pytest.raises(OSError, match="storage went away"):
        next(prefetch(1))
    # A prefetched epoch other than the one asked for is dropped; the asked one is made.
    prefetch.start(2)
    assert list(prefetch(0)) == [0]
    assert list(EpochPrefetcher(lambda e: iter([]), epochs=2)(0)) == []
