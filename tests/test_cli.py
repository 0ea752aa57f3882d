"""The command-line contract: data stats / split, and one-paragraph errors with exit code 2."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from longtail.cli import main

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "methods" / "ce.yaml"


def run_json(capsys, *argv):
    assert main(list(argv)) == 0
    return json.loads(capsys.readouterr().out)


def test_cifar10_lt_stats(capsys):
    s = run_json(capsys, "data", "stats", "cifar10-lt", "--imbalance-factor", "100", "--json")
    assert s["counts"] == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
    assert s["total"] == 12406 and s["num_classes"] == 10
    assert s["groups"] == {"many": [0, 1, 2, 3, 4, 5, 6, 7], "medium": [8, 9], "few": []}


def test_cifar100_lt_stats_need_no_data(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("LONGTAIL_DATA", str(tmp_path))  # nothing there
    s = run_json(capsys, "data", "stats", "cifar100-lt", "--json")
    assert s["total"] == 10847 and s["num_classes"] == 100
    assert [len(s["groups"][g]) for g in ("many", "medium", "few")] == [35, 35, 30]


def test_step_profile_and_other_factors(capsys):
    s = run_json(
        capsys,
        "data",
        "stats",
        "cifar10-lt",
        "--profile",
        "step",
        "--imbalance-factor",
        "10",
        "--json",
    )
    assert s["counts"] == [5000] * 5 + [500] * 5
    s = run_json(capsys, "data", "stats", "cifar100-lt", "--imbalance-factor", "50", "--json")
    assert s["counts"][0] == 500 and s["counts"][-1] == 10
    assert s["imbalance_factor"] == 50


def test_stats_table_output(capsys):
    assert main(["data", "stats", "fashion-mnist-lt"]) == 0
    out = capsys.readouterr().out
    assert "fashion-mnist-lt: 10 classes" in out and "6000" in out


def test_split_export_matches_reference_construction(capsys, real_data_root, tmp_path):
    out = tmp_path / "split.txt"
    assert (
        main(["data", "split", "cifar10-lt", "--data-root", str(real_data_root), "--out", str(out)])
        == 0
    )
    rows = np.loadtxt(out, dtype=np.int64)
    assert rows.shape == (12406, 2)
    # independent re-implementation of LDAM-DRW imbalance_cifar.py on the real labels
    from longtail.data.build import load_split

    labels = load_split("cifar10", "train", real_data_root).labels.numpy()
    np.random.seed(0)
    ref = []
    for c, n in enumerate([5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]):
        idx = np.where(labels == c)[0]
        np.random.shuffle(idx)
        ref.extend(idx[:n])
    assert rows[:, 0].tolist() == [int(i) for i in ref]
    assert (labels[rows[:, 0]] == rows[:, 1]).all()


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["data", "stats", "cifar11-lt"], "Unknown dataset 'cifar11-lt'"),
        (["train", str(CONFIG), "data=cifar10_lt", "train.epochz=1"], "unknown key 'train.epochz'"),
        (["train", "missing.yaml"], "does not exist"),
        (["eval", "/nonexistent/run"], "not a run folder"),
    ],
)
def test_user_errors_are_one_paragraph(argv, needle, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


def test_missing_dataset_names_the_path(tmp_path, monkeypatch, capsys):
    import longtail.data.paths as paths

    monkeypatch.delenv(paths.MIRROR_VAR, raising=False)
    monkeypatch.setattr(paths, "download_file", _refuse_download)
    assert (
        main(
            [
                "data",
                "split",
                "cifar10-lt",
                "--data-root",
                str(tmp_path / "empty"),
                "--out",
                str(tmp_path / "s.txt"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert str(tmp_path / "empty") in err and "--data-root" in err
    assert not (tmp_path / "s.txt").exists()


def _refuse_download(url, dest, md5, *args, **kwargs):
    raise OSError("network is unreachable (test)")


def test_console_script_entry_point():
    out = subprocess.run(
        [sys.executable, "-m", "longtail", "data", "stats", "cifar10-lt", "--json"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert json.loads(out)["total"] == 12406


def test_list_shows_every_registered_component_with_its_options(capsys):
    from longtail.losses import LOSSES

    rows = run_json(capsys, "list", "--json")
    names = {(r["section"], r["name"]) for r in rows}
    assert {("loss", n) for n in LOSSES.names()} <= names
    rsam = next(r for r in rows if (r["section"], r["name"]) == ("optim", "rsam"))
    assert {"rho", "dis_mul", "decay_epoch", "momentum"} <= set(rsam["options"])  # base's too
    step = next(r for r in rows if (r["section"], r["name"]) == ("schedule", "step"))
    assert step["options"] == ["gamma", "milestones"] and step["summary"].startswith("Per-epoch")
    assert main(["list", "sampler"]) == 0 and "b3rs" in capsys.readouterr().out
    assert main(["list", "nope"]) == 2 and "No section 'nope'" in capsys.readouterr().err
