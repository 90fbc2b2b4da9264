"""The epoch selection rule shared by training's checkpoints and the sweep: tables of hand-made histories."""

from __future__ import annotations

import pytest

from acol_core.selection import best_within_margin, retention_score, select_epoch, val_class_rows


def _history(*epochs: tuple[float | None, float | None], rows: tuple[int, int] = (40, 20)) -> list[dict]:
    """One metrics dict per (balanced accuracy, PxAP); None leaves the key out."""
    out = []
    for epoch, (ba, px) in enumerate(epochs):
        row: dict = {"epoch": float(epoch), "val_rows_0": rows[0], "val_rows_1": rows[1]}
        if ba is not None:
            row["val_balanced_accuracy"] = ba
        if px is not None:
            row["val_pxap"] = px
        out.append(row)
    return out


@pytest.mark.parametrize(
    "epochs, rows, available, expected, reason",
    [
        # the demo's failure: an early PxAP peak while classification is half-trained
        ([(0.70, 0.90), (0.95, 0.60), (0.94, 0.70), (0.96, 0.65)], (40, 20), None, 2, "within 0.03"),
        # the best balanced accuracy itself wins when its PxAP is best among the candidates
        ([(0.80, 0.5), (0.97, 0.8), (0.90, 0.9)], (40, 20), None, 1, "within 0.03"),
        # exactly at the margin's edge is a candidate
        ([(0.90, 0.5), (0.87, 0.9)], (40, 20), None, 1, "within 0.03"),
        # ties in PxAP go to the later epoch
        ([(0.95, 0.7), (0.95, 0.7), (0.5, 0.9)], (40, 20), None, 1, "within 0.03"),
        # a collapsed model (always healthy: balanced accuracy 0.5) never beats one that classifies
        ([(0.5, 0.95), (0.5, 0.9), (0.88, 0.2)], (40, 20), None, 2, "within 0.03"),
        # too few val rows of a class: the last epoch, whatever the metrics say
        ([(0.9, 0.9), (0.6, 0.1)], (40, 9), None, 1, "fewer than 10"),
        ([(0.9, 0.9), (0.6, 0.1)], (5, 40), None, 1, "fewer than 10"),
        # no val at all: the last epoch
        ([(None, None), (None, None), (None, None)], (40, 20), None, 2, "no val balanced accuracy"),
        # no fullsup rows (no PxAP): the best balanced accuracy among the candidates
        ([(0.90, None), (0.92, None), (0.91, None)], (40, 20), None, 1, "no val_pxap"),
        # the rule's pick lost its checkpoint: the best kept candidate
        ([(0.70, 0.90), (0.95, 0.60), (0.94, 0.70), (0.96, 0.65)], (40, 20), {1, 3}, 3, "within 0.03"),
        # no kept checkpoint is a candidate: the last kept epoch
        ([(0.70, 0.90), (0.95, 0.60), (0.50, 0.70)], (40, 20), {0, 2}, 2, "no kept epoch"),
        # too few rows and a checkpoint missing: the last kept
        ([(0.9, 0.9), (0.6, 0.1), (0.6, 0.1)], (40, 3), {0, 1}, 1, "fewer than 10"),
    ],
)
def test_select_epoch(epochs, rows, available, expected, reason) -> None:
    chosen = select_epoch(_history(*epochs, rows=rows), available=available)
    assert chosen.epoch == expected
    assert reason in chosen.reason


def test_select_epoch_empty_and_bad_mode() -> None:
    assert select_epoch([]).epoch is None
    assert select_epoch(_history((0.9, 0.9)), available=set()).epoch is None
    with pytest.raises(ValueError, match="mode"):
        select_epoch(_history((0.9, 0.9)), mode="best")


def test_select_epoch_min_mode_and_margin() -> None:
    history = _history((0.90, 0.3), (0.92, 0.5), (0.80, 0.1))
    assert select_epoch(history, mode="min").epoch == 0  # smallest metric among candidates
    assert select_epoch(history, margin=0.2).epoch == 1
    assert select_epoch(history, margin=0.2, mode="min").epoch == 2
    assert select_epoch(history, margin=0.0).epoch == 1


def test_retention_score_ranks_the_running_choice_above_the_rest() -> None:
    history = _history((0.70, 0.90), (0.95, 0.60), (0.94, 0.70), (0.60, 0.99))
    scores = [retention_score(history[: i + 1]) for i in range(len(history))]
    # epoch 0 is the choice of [0]; 1 is the choice of [0, 1]; 2 of [0..2]; 3 never is
    assert scores == [0.0, 1.0, 2.0, -1.0]
    assert retention_score([]) == -1.0


def test_val_class_rows_reads_counts_only() -> None:
    assert val_class_rows({"val_rows_0": 12.0, "val_rows_1": 3, "val_rows_x": 5, "val_recall_0": 1.0}) == {
        0: 12,
        1: 3,
    }


@pytest.mark.parametrize(
    "rows, mode, expected",
    [
        # a trial that collapsed (balanced accuracy 0.5) loses to one that classifies, whatever its PxAP
        ([{"ba": 0.5, "m": 0.9}, {"ba": 0.93, "m": 0.6}, {"ba": 0.95, "m": 0.5}], "max", 1),
        # ties go to the later row
        ([{"ba": 0.9, "m": 0.6}, {"ba": 0.9, "m": 0.6}], "max", 1),
        ([{"ba": 0.9, "m": 0.6}, {"ba": 0.92, "m": 0.4}], "min", 1),
        # without balanced accuracy on any row: the metric alone; with it on some, only those compete
        ([{"m": 0.3}, {"m": 0.7}], "max", 1),
        ([{"m": 0.9}, {"ba": 0.6, "m": 0.2}], "max", 1),
        # rows without the metric never win; none with it: None
        ([{"ba": 0.99}, {"ba": 0.9, "m": 0.1}], "max", 1),
        ([{"ba": 0.9}], "max", None),
    ],
)
def test_best_within_margin(rows, mode, expected) -> None:
    assert best_within_margin(rows, "m", mode, balanced_key="ba") == expected
