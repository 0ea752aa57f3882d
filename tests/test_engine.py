"""The training engine on a tiny real-format CIFAR-10: it learns, writes a complete run folder,
resumes bit-for-bit, and `longtail eval` reproduces metrics.json; checkpoints load safely."""

import json
from pathlib import Path

import pytest
import torch
from conftest import TINY_RUN
from safetensors.torch import load_file

from longtail.cli import main
from longtail.core.config import load_config
from longtail.core.errors import LongtailError
from longtail.core.io import load_checkpoint
from longtail.engine.trainer import fit

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "methods" / "ce.yaml"
TINY = [*TINY_RUN]


def tiny_cfg(epochs=3, extra=()):
    return load_config(CONFIG, [*TINY, f"train.epochs={epochs}", *extra])


@pytest.fixture(scope="module")
def finished_run(tiny_cifar_root, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "ce"
    metrics = fit(tiny_cfg(4), run_dir, tiny_cifar_root)
    return run_dir, metrics


def test_run_folder_is_complete(finished_run):
    run_dir, metrics = finished_run
    for name in (
        "config.yaml",
        "history.jsonl",
        "last.pt",
        "model.safetensors",
        "metrics.json",
        "per_class_accuracy.png",
        "training_curves.png",
        "confusion_matrix.png",
    ):
        assert (run_dir / name).is_file(), name
    assert not list(run_dir.glob(".*tmp*"))  # no temp files left behind
    rows = [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]
    for r in rows:
        assert {"epoch", "lr", "loss", "images_per_s", "seconds"} <= set(r)
    assert [round(r["lr"], 6) for r in rows] == [0.1, 0.1, 0.1, 0.01]  # warm-up 1, x0.1 after 3
    saved = json.loads((run_dir / "metrics.json").read_text())
    for key in ("top1", "many", "medium", "few", "per_class", "ece", "val"):
        assert key in saved
    assert len(saved["per_class"]) == 10 and saved["class_counts"][0] == 30


def test_training_learns(finished_run):
    run_dir, metrics = finished_run
    rows = [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]
    assert rows[-1]["loss"] < 0.7 * rows[0]["loss"]
    assert metrics["top1"] > 40.0  # 10 colour classes: chance is 10 %


def test_eval_reproduces_metrics_json(finished_run, tiny_cifar_root, capsys):
    run_dir, _ = finished_run
    assert main(["eval", str(run_dir), "--data-root", str(tiny_cifar_root), "--json"]) == 0
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    saved = json.loads((run_dir / "metrics.json").read_text())
    for key in ("top1", "many", "medium", "few", "per_class", "ece", "confusion"):
        assert again[key] == saved[key], key
    assert again["val"]["top1"] == saved["val"]["top1"]


def test_eval_prints_the_table(finished_run, tiny_cifar_root, capsys):
    run_dir, _ = finished_run
    assert main(["eval", str(run_dir), "--data-root", str(tiny_cifar_root)]) == 0
    out = capsys.readouterr().out
    saved = json.loads((run_dir / "metrics.json").read_text())
    assert "many" in out and f"{saved['top1']:.2f}" in out and f"{saved['val']['top1']:.2f}" in out


def test_resume_is_bit_exact(tiny_cifar_root, tmp_path):
    cfg = tiny_cfg(3)
    fit(cfg, tmp_path / "straight", tiny_cifar_root)
    assert fit(cfg, tmp_path / "killed", tiny_cifar_root, stop_after_epoch=1) is None
    assert not (tmp_path / "killed" / "metrics.json").exists()
    assert load_checkpoint(tmp_path / "killed" / "last.pt")["epoch"] == 1
    fit(cfg, tmp_path / "killed", tiny_cifar_root, resume=True)
    a = load_file(str(tmp_path / "straight" / "model.safetensors"))
    b = load_file(str(tmp_path / "killed" / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    h1 = (tmp_path / "straight" / "history.jsonl").read_text().splitlines()
    h2 = (tmp_path / "killed" / "history.jsonl").read_text().splitlines()
    assert [json.loads(x)["loss"] for x in h1] == [json.loads(x)["loss"] for x in h2]


def test_resume_via_cli_continues(tiny_cifar_root, tmp_path):
    run_dir = tmp_path / "run"
    fit(tiny_cfg(2), run_dir, tiny_cifar_root, stop_after_epoch=1)
    assert main(["train", "--resume", str(run_dir), "--data-root", str(tiny_cifar_root)]) == 0
    assert json.loads((run_dir / "metrics.json").read_text())["epochs"] == 2


def test_checkpoint_refuses_arbitrary_pickles(tmp_path):
    import pickle

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "last.pt"
    path.write_bytes(pickle.dumps({"x": Evil()}, protocol=2))
    with pytest.raises(LongtailError, match="cannot be loaded safely"):
        load_checkpoint(path)


def test_existing_run_folder_is_not_overwritten(finished_run, tiny_cifar_root):
    run_dir, _ = finished_run
    with pytest.raises(LongtailError, match="--resume"):
        fit(tiny_cfg(1), run_dir, tiny_cifar_root)


def test_resume_of_a_folder_that_is_not_a_run(tmp_path, tiny_cifar_root, capsys):
    assert main(["train", "--resume", str(tmp_path), "--data-root", str(tiny_cifar_root)]) == 2
    err = capsys.readouterr().err
    assert "not a run folder" in err and "Traceback" not in err


def test_unwritable_run_folder(tmp_path, tiny_cifar_root, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    code = main(
        [
            "train",
            str(CONFIG),
            "--out",
            str(blocker / "run"),
            "--data-root",
            str(tiny_cifar_root),
            *TINY,
            "train.epochs=1",
        ]
    )
    assert code == 2
    assert "Cannot write the run folder" in capsys.readouterr().err


def test_ldam_requires_cosine_head(tiny_cifar_root, tmp_path):
    with pytest.raises(LongtailError, match="model.head=cosine"):
        fit(tiny_cfg(1, ["loss.name=ldam"]), tmp_path / "r", tiny_cifar_root)


def test_failed_start_leaves_no_run_folder(tmp_path, tiny_cifar_root, capsys):
    run_dir = tmp_path / "never"
    code = main(
        [
            "train",
            str(CONFIG),
            "--out",
            str(run_dir),
            "--data-root",
            str(tiny_cifar_root),
            "data=cifar10_lt",
            "data.dataset=cifar11-lt",
        ]
    )
    assert code == 2 and not run_dir.exists()
    assert "data.dataset" in capsys.readouterr().err


def test_unwritable_split_output_is_a_clear_error(tmp_path, tiny_cifar_root, capsys):
    out = tmp_path / "missing-folder" / "split.txt"
    assert (
        main(["data", "split", "cifar10", "--data-root", str(tiny_cifar_root), "--out", str(out)])
        == 2
    )
    err = capsys.readouterr().err
    assert "missing-folder" in err and "Traceback" not in err and not out.exists()
