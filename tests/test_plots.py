"""The run folder's pictures (engine/plots.py) and the results table's top-5 / balanced columns:
binning and ordering by hand, what each figure draws, and the PNG files plot_run writes."""

import json

import numpy as np
import pytest
from PIL import Image

from longtail.engine.plots import (
    CONFUSION_PLOT,
    CURVES_PLOT,
    METHOD_PLOT,
    binned_confusion,
    confusion_figure,
    curves_figure,
    eval_points,
    frequency_order,
    method_figure,
    method_keys,
    method_panels,
    plot_run,
)
from longtail.engine.report import results_table


def test_confusion_is_reordered_by_frequency_and_row_normalised():
    counts = [5, 50, 20]  # frequency order: class 1, 2, 0
    confusion = np.array([[1, 0, 3], [2, 6, 0], [0, 0, 0]])  # class 2 has no test image
    m, members = binned_confusion(confusion, counts)
    assert frequency_order(counts) == [1, 2, 0] and members == [[1], [2], [0]]
    assert m[0].tolist() == pytest.approx([0.75, 0.0, 0.25])  # class 1: 6 of 8 right, 2 as 0
    assert np.isnan(m[1]).all()  # no test images: no row
    assert m[2].tolist() == pytest.approx([0.0, 0.75, 0.25])  # class 0: 3 as class 2, 1 right


def test_confusion_bins_consecutive_frequency_ranks():
    counts = [40, 30, 20, 10, 5]  # already in frequency order; bins of 2: {0,1} {2,3} {4}
    confusion = np.zeros((5, 5))
    confusion[0, 0], confusion[0, 4] = 3, 1  # group 0: 3 stay in it, 1 goes to group 2
    confusion[1, 0] = 4  # class 1 predicted as 0: inside group 0 (counted on the diagonal)
    confusion[3, 2], confusion[4, 4] = 2, 5
    m, members = binned_confusion(confusion, counts, groups=3)
    assert members == [[0, 1], [2, 3], [4]]
    assert m[0].tolist() == pytest.approx([7 / 8, 0.0, 1 / 8])
    assert m[1].tolist() == pytest.approx([0.0, 1.0, 0.0])
    assert m[2].tolist() == pytest.approx([0.0, 0.0, 1.0])


def test_confusion_figure_labels_classes_or_groups():
    counts = [30, 10, 60]
    fig = confusion_figure(np.eye(3, dtype=int) * 4, counts, ["cat", "dog", "emu"])
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels == ["emu (60)", "cat (30)", "dog (10)"]
    assert ax.get_xlabel() == "predicted class" and "true class" in ax.get_ylabel()
    assert "100" in [t.get_text() for t in ax.texts]  # cells annotated at this size
    # 100 classes: 20 groups of 5, labelled by frequency ranks and their training counts
    counts = [100 - c for c in range(100)]
    fig = confusion_figure(np.eye(100, dtype=int), counts)
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert len(labels) == 20 and labels[0] == "1-5 (n 100-96)" and labels[-1] == "96-100 (n 5-1)"
    assert fig.axes[0].images[0].get_array().shape == (20, 20)
    assert confusion_figure(None, counts) is None  # no matrix kept (over 1,000 classes)


def test_eval_points_add_the_final_evaluation_once():
    history = [
        {"epoch": 1, "loss": 2.0, "lr": 0.1, "test": {"top1": 10.0}},
        {"epoch": 2, "loss": 1.5, "lr": 0.1},
    ]
    final = {"test": {"top1": 30.0}, "val": {"top1": 25.0}}
    points = eval_points(history, final)
    assert [(e, m["top1"]) for e, m in points["test"]] == [(1, 10.0), (2, 30.0)]
    assert [(e, m["top1"]) for e, m in points["val"]] == [(2, 25.0)]
    history[-1]["test"] = {"top1": 30.0}  # the last epoch evaluated in history already
    assert len(eval_points(history, final)["test"]) == 2


def test_curves_figure_draws_the_history():
    history = [
        {"epoch": e, "loss": 3.0 / e, "lr": 0.1 * e, "images_per_s": 1.0, "seconds": 1.0}
        for e in (1, 2, 3)
    ]
    history[1]["test"] = {"top1": 20.0, "many": 40.0, "few": 5.0}
    final = {"test": {"top1": 35.0, "mean_class_acc": 33.0, "many": 60.0, "few": 10.0}}
    fig = curves_figure(history, final, "cifar: ce")
    loss, lr, acc, groups = fig.axes
    assert list(loss.lines[0].get_ydata()) == [3.0, 1.5, 1.0]
    assert list(lr.lines[0].get_ydata()) == pytest.approx([0.1, 0.2, 0.3])
    lines = {line.get_label(): line for line in acc.lines}
    assert list(lines["test top-1"].get_xdata()) == [2, 3]
    assert list(lines["test top-1"].get_ydata()) == [20.0, 35.0]
    assert list(lines["test balanced"].get_ydata()) == [33.0]
    assert {line.get_label() for line in groups.lines} == {"many", "few"}  # medium: never given
    assert all(ax.get_xlabel() == "epoch" and ax.get_ylabel() for ax in fig.axes)
    assert fig.texts[0].get_text() == "cifar: ce"
    # no evaluation at all: loss and lr only
    assert len(curves_figure(history[:1]).axes) == 2
    assert curves_figure([]) is None


def test_a_one_epoch_run_gets_whole_epoch_ticks():
    history = [{"epoch": 1, "loss": 2.0, "lr": 0.1, "images_per_s": 1.0, "seconds": 1.0}]
    fig = curves_figure(history, {"test": {"top1": 30.0}})
    fig.canvas.draw()
    for ax in fig.axes:
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert ticks == [1.0]  # not 0.5, 0.6, ... 1.5


def test_method_curves_take_every_extra_numeric_key():
    history = [
        {
            "epoch": e,
            "lr": 0.1,
            "loss": 1.0,
            "images_per_s": 9.0,
            "seconds": 1.0,
            "test": {"top1": 1.0},
            "kd_loss": 1.0 / e,
            "lr_mean": 0.1 * e,
            "lr_min": 0.05 * e,
            "lr_max": 0.2 * e,
            "snapshot": "a",  # text: not a curve
            "frozen": True,  # a flag: not a curve
        }
        for e in (1, 2)
    ]
    history[1]["pml_ramp"] = 0.5  # present from epoch 2 only
    assert method_keys(history) == ["kd_loss", "lr_mean", "lr_min", "lr_max", "pml_ramp"]
    panels = method_panels(method_keys(history))
    assert panels == {
        "kd_loss": ["kd_loss"],
        "lr": ["lr_mean", "lr_min", "lr_max"],
        "pml_ramp": ["pml_ramp"],
    }
    fig = method_figure(history)
    assert [ax.get_title() for ax in fig.axes] == ["kd_loss", "lr", "pml_ramp"]
    assert len(fig.axes[1].lines) == 3
    assert list(fig.axes[2].lines[0].get_xdata()) == [2]
    assert method_figure([{k: history[0][k] for k in ("epoch", "loss", "lr")}]) is None


def test_plot_run_writes_the_run_folder_pictures(tmp_path):
    counts = [200 // (c + 1) + 1 for c in range(40)]  # 40 classes: a binned matrix
    rng = np.random.default_rng(0)
    confusion = rng.integers(0, 5, size=(40, 40)) + np.eye(40, dtype=int) * 10
    per_class = [100.0 * confusion[c, c] / confusion[c].sum() for c in range(40)]
    test = {"top1": 50.0, "per_class": per_class, "confusion": confusion.tolist()}
    history = [{"epoch": e, "loss": 1.0 / e, "lr": 0.1, "meta_loss": 2.0 / e} for e in (1, 2)]
    (tmp_path / "history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in history))
    written = plot_run(tmp_path, {"test": test}, counts, title="tiny")
    assert set(written) == {"curves", "confusion", "method", "per_class"}
    for name in (CURVES_PLOT, CONFUSION_PLOT, METHOD_PLOT, "per_class_accuracy.png"):
        with Image.open(tmp_path / name) as im:
            pixels = np.asarray(im.convert("L"), dtype=float)
        assert im.format == "PNG" and min(im.size) >= 300, name
        assert pixels.std() > 10, name  # drawn, not blank
    assert not list(tmp_path.glob(".*tmp*"))
    # no method keys and no confusion matrix: those two files are not written
    other = tmp_path / "other"
    other.mkdir()
    written = plot_run(other, {"test": {**test, "confusion": None}}, counts, history=history[:0])
    assert set(written) == {"per_class"}


def test_results_table_shows_top5_only_beyond_ten_classes():
    def split(classes, top1, top5, balanced):
        return {
            "top1": top1,
            "top5": top5,
            "mean_class_acc": balanced,
            "many": None,
            "medium": 50.0,
            "few": 10.0,
            "ece": 3.0,
            "num_samples": 100,
            "per_class": [0.0] * classes,
        }

    ten = results_table({"test": split(10, 71.25, 99.0, 64.5)})
    header, _, row = ten.splitlines()
    assert "top-5" not in header and header.split()[1:3] == ["all", "balanced"]
    assert row.split()[1:3] == ["71.25", "64.50"]
    many = results_table(
        {"test": split(100, 40.0, 70.125, 35.5), "val": split(100, 41.0, 72.0, 41.0)}
    )
    header, _, test, val = many.splitlines()
    assert header.split()[1:4] == ["all", "top-5", "balanced"]
    assert test.split()[1:4] == ["40.00", "70.12", "35.50"] and val.split()[2] == "72.00"
