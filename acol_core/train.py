"""One worker's training loop: plain torch, runs alone in one process or under Ray Train.

Run alone (in-memory batches)::

    from acol_core.balance import apply_class_balance
    from acol_core.train import fit
    config, balance = apply_class_balance(TrainConfig(model="acol"), train_counts_per_class)
    result = fit(config, train_batches=lambda epoch: loader(epoch))

``fit`` weighs the loss by ``config.class_weights`` and nothing else: ``class_balance`` is resolved into
those weights, or into ``config.sampling_factors``, from the train split's counts before
(``acol_core.balance``; ``run_training`` does it from the dataset manifest). Sampling is the data's job:
pass ``config.sampling_factors`` to ``iterate_minibatches`` (Ray Train: ``build_datasets`` does it).

Under Ray Train, ``acol_core.jobs.train_run`` passes batches streamed by Ray Data and a hook that
reports metrics and checkpoints; nothing here imports Ray.
"""

from __future__ import annotations

import contextlib
import io
import math
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from acol_core.config import TrainConfig
from acol_core.localize import normalize_cam, resize_map
from acol_core.metrics import classification_accuracy, classification_metrics
from acol_core.models import create_model

__all__ = [
    "EpochHook",
    "EpochPrefetcher",
    "FitResult",
    "autocast",
    "build_model",
    "checkpoint_bytes",
    "choose_fusion",
    "classification_metrics",
    "fit",
    "flush_denormals",
    "iterate_minibatches",
    "load_checkpoint_bytes",
    "localization_metrics",
    "make_optimizer",
    "make_scheduler",
    "predict",
    "select_device",
    "train_epoch",
    "unwrap",
]

Batch = dict[str, Any]


class EpochHook(Protocol):
    """Called after every epoch; ``state`` builds the checkpoint state dict on demand."""

    def __call__(self, epoch: int, metrics: dict[str, float], state: Callable[[], dict]) -> None: ...


@dataclass
class FitResult:
    model: nn.Module
    history: list[dict[str, float]] = field(default_factory=list)


def flush_denormals(device: torch.device) -> None:
    """On CPU, treat subnormal floats as zero (FTZ/DAZ), before the first parallel op of the process.

    Co-attention's softmax over all positions underflows into subnormals, and x86 arithmetic on them
    is ~50x slower (a co-attention step at 28x28, D=512: 2.1 s -> 38 ms). Threads started later inherit
    the setting; numerically it only drops values below 1.2e-38.
    """
    if device.type == "cpu":
        torch.set_flush_denormal(True)


def select_device(prefer: str = "auto") -> torch.device:
    if prefer != "auto":
        return torch.device(prefer)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def autocast(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA (``auto``/``bf16``); full precision on CPU, where bf16 is slower."""
    if device.type == "cuda" and amp in ("auto", "bf16"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DDP wrapper (``compute_loss`` lives there)."""
    return model.module if hasattr(model, "module") else model


def build_model(config: TrainConfig) -> nn.Module:
    torch.manual_seed(config.seed)
    return create_model(
        config.model,
        num_classes=config.num_classes,
        in_channels=config.channels,
        backbone=config.backbone,
        pretrained=config.pretrained,
        **config.model_options,
    )


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """ACoL's recipe: SGD, momentum 0.9, weight decay 5e-4, heads at 10x a pretrained backbone's rate."""
    return torch.optim.SGD(
        unwrap(model).param_groups(config.lr, config.effective_head_lr_mult),
        lr=config.lr,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
    )


def make_scheduler(
    optimizer: torch.optim.Optimizer, config: TrainConfig
) -> torch.optim.lr_scheduler.LRScheduler:
    """Per-epoch schedule (stepped once per epoch, so resuming at an epoch boundary is exact)."""
    epochs = config.epochs

    def factor(epoch: int) -> float:
        if config.lr_schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))
        if config.lr_schedule == "step":
            return 0.1 ** (epoch // max(1, int(epochs * 0.66)))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def iterate_minibatches(
    arrays: dict[str, np.ndarray],
    batch_size: int,
    rng: np.random.Generator | None,
    augment: bool,
    *,
    intensity: float = 0.0,
    norm: str = "phantom",
    sampling_factors: Sequence[float] | None = None,
) -> Iterator[Batch]:
    """Shuffle (when ``rng``) and cut in-memory arrays into batches; the plain-process data path.

    ``intensity``: ``TrainConfig.intensity_augment``, used when augmenting images standardised with
    ``norm`` (``TrainConfig.effective_input_norm``). ``sampling_factors`` (``config.sampling_factors``;
    needs ``rng``) draw each class's rows that many times (``balance.sampled_rows``), each copy augmented
    afresh.
    """
    from acol_core.balance import sampled_rows
    from acol_core.data.transforms import augment_batch

    n = len(arrays["label"])
    if sampling_factors is not None:
        if rng is None:
            raise ValueError("sampling_factors need an rng (a shuffled train epoch)")
        order = rng.permutation(sampled_rows(arrays["label"], sampling_factors, rng))
        n = len(order)
    else:
        order = rng.permutation(n) if rng is not None else np.arange(n)
    for start in range(0, n, batch_size):
        idx = order[start : start + batch_size]
        batch = {k: v[idx] for k, v in arrays.items()}
        if augment and rng is not None:
            batch = augment_batch(batch, rng, intensity=intensity, norm=norm)
        yield batch


_END = object()


class EpochPrefetcher:
    """Per-epoch batches whose next epoch starts loading, in a thread, as soon as this one runs dry.

    A streaming loader (a Ray Data shard) starts a new execution every epoch and waits 0.7-3 s for its
    first batch. Here epoch ``e + 1``'s iterator is made, and its first batch taken, while epoch ``e``'s
    validation, checkpoint and report run. ``prefetcher(epoch)`` is a drop-in ``train_batches`` for
    ``fit``; ``start(epoch)`` begins one ahead of time (while the model is being built).

    Epochs must be asked for in order (``fit`` does): a prefetched epoch other than the one asked for is
    waited for and dropped. An error raised while prefetching is raised by the call that asks for it.

    Examples:
        >>> prefetch = EpochPrefetcher(lambda epoch: [epoch * 10, epoch * 10 + 1], epochs=2)
        >>> list(prefetch(0)), prefetch.pending_epoch
        ([0, 1], 1)
        >>> list(prefetch(1)), prefetch.pending_epoch
        ([10, 11], None)
    """

    def __init__(self, make: Callable[[int], Iterable[Batch]], epochs: int) -> None:
        self._make = make
        self._epochs = int(epochs)
        self._pending: tuple[int, threading.Thread, dict[str, Any]] | None = None

    @property
    def pending_epoch(self) -> int | None:
        """The epoch being (or already) prefetched, if any."""
        return None if self._pending is None else self._pending[0]

    def start(self, epoch: int) -> None:
        """Start making ``epoch``'s batches in a thread (nothing past the last epoch, nor twice)."""
        if epoch >= self._epochs or self._pending is not None:
            return
        box: dict[str, Any] = {}

        def work() -> None:
            try:
                box["iterator"] = iterator = iter(self._make(epoch))
                box["first"] = next(iterator, _END)
            except BaseException as exc:  # re-raised in the caller's thread
                box["error"] = exc

        thread = threading.Thread(target=work, name=f"prefetch-epoch-{epoch}", daemon=True)
        thread.start()
        self._pending = (epoch, thread, box)

    def __call__(self, epoch: int) -> Iterator[Batch]:
        return self._batches(epoch)

    def _batches(self, epoch: int) -> Iterator[Batch]:
        pending, self._pending = self._pending, None
        head: list[Batch] = []
        iterator: Iterator[Batch] | None = None
        if pending is not None:
            pending[1].join()
            box = pending[2]
            if pending[0] == epoch:
                if "error" in box:
                    raise box["error"]
                iterator = box["iterator"]
                head = [] if box["first"] is _END else [box["first"]]
        if iterator is None:
            iterator = iter(self._make(epoch))
        yield from head
        yield from iterator
        self.start(epoch + 1)


def _to_tensor(value: Any, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    t = value if isinstance(value, torch.Tensor) else torch.as_tensor(np.ascontiguousarray(value))
    return t.to(device=device, dtype=dtype, non_blocking=True)


def train_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Iterable[Batch],
    device: torch.device,
    amp: str = "auto",
    class_weights: Sequence[float] | None = None,
) -> dict[str, float]:
    """One pass over ``batches``; returns mean loss, train accuracy, images, images/s and the wait for
    the first batch (a streaming loader's start-up each epoch). ``class_weights`` weigh the loss's rows
    by class (``acol_core.balance``)."""
    model.train()
    weights = None if class_weights is None else torch.tensor(list(class_weights), dtype=torch.float32)
    weights = None if weights is None else weights.to(device)
    total_loss, correct, seen = 0.0, 0, 0
    started = time.perf_counter()
    first_batch_s = 0.0
    for batch in batches:
        if not seen:
            first_batch_s = time.perf_counter() - started
        images = _to_tensor(batch["image"], device, torch.float32)
        labels = _to_tensor(batch["label"], device, torch.long)
        with autocast(device, amp):
            outputs = model(images, labels)
            losses = unwrap(model).compute_loss(outputs, labels, class_weights=weights)
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        optimizer.step()
        total_loss += float(losses["loss"].detach()) * len(labels)
        correct += int((outputs["logits"].detach().argmax(1) == labels).sum())
        seen += len(labels)
    elapsed = time.perf_counter() - started
    return {
        "train_loss": total_loss / max(seen, 1),
        "train_accuracy": correct / max(seen, 1),
        "train_images": float(seen),
        "train_images_per_s": seen / max(elapsed, 1e-9),
        "train_first_batch_s": first_batch_s,
    }


@torch.no_grad()
def predict(
    model: nn.Module,
    batches: Iterable[Batch],
    device: torch.device,
    amp: str = "auto",
    use_labels: bool = True,
) -> dict[str, np.ndarray]:
    """Logits, predictions and normalised CAMs at input resolution for every row of ``batches``.

    With ``use_labels`` the map is the ground-truth class's (wsolevaluation's GT-known protocol);
    otherwise the predicted class's.
    """
    model.eval()
    out: dict[str, list[np.ndarray]] = {}
    for batch in batches:
        images = _to_tensor(batch["image"], device, torch.float32)
        labels = _to_tensor(batch["label"], device, torch.long) if use_labels else None
        with autocast(device, amp):
            outputs = model(images, labels)
        size = tuple(images.shape[-2:])
        cams = normalize_cam(resize_map(outputs["cam"].float().cpu().numpy(), size))
        logits = outputs["logits"].float().cpu().numpy()
        parts = {"logits": logits, "pred": logits.argmax(1), "cam": cams}
        for name, cam in outputs.get("cams", {}).items():  # candidate fusions (`fusion: auto`)
            parts[f"cam:{name}"] = normalize_cam(resize_map(cam.float().cpu().numpy(), size))
        parts.update(
            {k: np.asarray(batch[k]) for k in ("label", "mask", "anatomy_mask", "fullsup") if k in batch}
        )
        for key, value in parts.items():
            out.setdefault(key, []).append(value)
    return {k: np.concatenate(v) for k, v in out.items()}


def localization_metrics(
    pred: dict[str, np.ndarray], rows: np.ndarray | None = None, step: float = 0.01
) -> dict:
    """Val metrics of ``predict``'s output: accuracy on every row; localisation on the rows that contain an
    object (non-empty mask; GT-known), optionally a subset, scored by ``evaluate.localization_report``
    (the one scoring path) on the maps quantised as ``acol localize`` stores them.
    """
    from acol_core.evaluate import JoinedRows, localization_report

    metrics = {"accuracy": classification_accuracy(pred["pred"], pred["label"])}
    if "mask" not in pred:
        return metrics
    has_object = (pred["mask"] == 1).reshape(len(pred["mask"]), -1).any(1)
    keep = has_object if rows is None else has_object & rows
    metrics["localized_rows"] = int(keep.sum())
    if not keep.any():
        return metrics
    anatomy = pred["anatomy_mask"][keep] if "anatomy_mask" in pred else None
    joined = JoinedRows.from_arrays(pred["cam"][keep], pred["mask"][keep], anatomy)
    # Only threshold-free metrics are reported per epoch: the thresholds given here are unused.
    report = localization_report(joined, 0.5, 0.5, step=step)
    metrics["pxap"] = report["pxap"]
    metrics["max_box_acc_v2"] = report["max_box_acc_v2"]
    metrics["dice"] = report["best_dice"]["dice"]
    if "off_target_share" in report:
        metrics["off_target"] = report["off_target_share"]
    return metrics


def choose_fusion(
    model: nn.Module, pred: dict[str, np.ndarray], rows: np.ndarray | None, step: float = 0.01
) -> int | None:
    """For a model with ``fusion="auto"`` (`models.FusionChoice`): the candidate fusion with the best
    val PxAP on ``rows`` (fullsup val rows) becomes the model's, and ``pred["cam"]`` its map.

    Returns the chosen candidate's index, or None when ``pred`` offers no candidates. Ties and rows
    without any object keep the first candidate (``max``, the paper's).
    """
    names = [key.split(":", 1)[1] for key in pred if key.startswith("cam:")]
    if not names:
        return None
    scores = []
    for name in names:
        pxap = localization_metrics({**pred, "cam": pred[f"cam:{name}"]}, rows=rows, step=step).get("pxap")
        scores.append(float(pxap) if pxap is not None and np.isfinite(pxap) else -1.0)
    best = int(np.argmax(scores))
    model.choose_fusion(names[best])
    pred["cam"] = pred[f"cam:{names[best]}"]
    return best


def checkpoint_bytes(state: dict) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def load_checkpoint_bytes(data: bytes) -> dict:
    """Checkpoints hold tensors and plain numbers only: never unpickle arbitrary objects."""
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def fit(
    config: TrainConfig,
    train_batches: Callable[[int], Iterable[Batch]],
    val_batches: Callable[[], Iterable[Batch]] | None = None,
    hooks: Sequence[EpochHook] = (),
    resume: dict | None = None,
    model: nn.Module | None = None,
    device: torch.device | None = None,
    prepare: Callable[[nn.Module], nn.Module] | None = None,
) -> FitResult:
    """Train for ``config.epochs`` epochs, starting after ``resume["epoch"]`` when given.

    Args:
        train_batches: epoch -> batches; the caller owns shuffling (seeded by epoch so reruns match).
        val_batches: batches of validation rows; localisation scored with ``localization_metrics`` on
            ``fullsup`` rows, classification (``classification_metrics``) on all rows.
        hooks: called after each epoch (checkpointing, reporting).
        prepare: wraps the model after it is on its device (Ray's ``prepare_model`` for DDP).
    """
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    device = device or select_device()
    flush_denormals(device)
    model = model if model is not None else build_model(config)
    model.to(device)
    if resume is not None:
        model.load_state_dict(resume["model"])
    if prepare is not None:
        model = prepare(model)
    optimizer = make_optimizer(model, config)
    scheduler = make_scheduler(optimizer, config)
    start = 0
    if resume is not None:
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        # The schedule is this run's (e.g. a resumed run given more epochs): the checkpoint keeps the
        # old schedule's next rate, which for a cosine ending at the old last epoch is 0.
        for group, base, factor in zip(
            optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas, strict=True
        ):
            group["lr"] = base * factor(scheduler.last_epoch)
        start = int(resume["epoch"]) + 1
    result = FitResult(model=model)
    for epoch in range(start, config.epochs):
        torch.manual_seed(config.seed * 1000 + epoch)
        metrics: dict[str, float] = {"epoch": float(epoch), "lr": optimizer.param_groups[0]["lr"]}
        metrics.update(
            train_epoch(model, optimizer, train_batches(epoch), device, config.amp, config.class_weights)
        )
        scheduler.step()
        if val_batches is not None:
            # The bare module: a DDP forward on rank 0 alone would wait for the other ranks' collectives.
            pred = predict(unwrap(model), val_batches(), device, config.amp)
            fullsup = pred.get("fullsup")
            choice = choose_fusion(unwrap(model), pred, fullsup, config.val_step)
            if choice is not None:
                metrics["val_fusion_index"] = float(choice)
            val = localization_metrics(
                pred, rows=fullsup if fullsup is not None else None, step=config.val_step
            )
            val.update(classification_metrics(pred["pred"], pred["label"], config.num_classes))
            metrics.update({f"val_{k}": float(v) for k, v in val.items()})

        def state(epoch: int = epoch) -> dict:
            return {
                "model": unwrap(model).state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "epoch": epoch,
                "config": config.to_dict(),
            }

        for hook in hooks:
            hook(epoch, metrics, state)
        result.history.append(metrics)
    return result
