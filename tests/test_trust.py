"""Nothing silently wrong: a diverging run stops with the epoch and step and keeps its last good
checkpoint, JSON files are always valid JSON, and config values are range-checked by the schema."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from longtail.cli import main
from longtail.core.config import load_config
from longtail.core.errors import ConfigError, LongtailError
from longtail.core.io import load_checkpoint, to_json
from longtail.engine.trainer import fit

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "methods" / "ce.yaml"
TINY = [
    "data=cifar10_lt",
    "model.backbone=resnet8",
    "data.imbalance_factor=10",
    "data.val_per_class=3",
    "train.batch_size=32",
    "train.eval_batch_size=64",
    "train.progress=false",
]


def _strict(text: str):
    def refuse(token):
        raise ValueError(f"not JSON: {token}")

    return json.loads(text, parse_constant=refuse)


def test_a_huge_lr_stops_the_run_instead_of_finishing(tiny_cifar_root, tmp_path, capsys):
    cfg = load_config(CONFIG, [*TINY, "train.epochs=2", "optim.lr=1e6"])
    with pytest.raises(
        LongtailError, match=r"diverged.*at epoch \d, step \d+ of 4 \(optim\.lr=1000000"
    ):
        fit(cfg, tmp_path / "r", tiny_cifar_root)
    assert not (tmp_path / "r" / "metrics.json").exists()  # never reported as finished
    rc = main(
        [
            "train",
            str(CONFIG),
            *TINY,
            "train.epochs=2",
            "optim.lr=1e6",
            "--out",
            str(tmp_path / "cli"),
            "--data-root",
            str(tiny_cifar_root),
        ]
    )
    assert rc == 2 and "Training diverged" in capsys.readouterr().err


def test_divergence_later_keeps_the_last_good_checkpoint(tiny_cifar_root, tmp_path):
    # lr 0.01 in epoch 1, then x1e9 from epoch 2 on: the loss explodes in epoch 2
    cfg = load_config(
        CONFIG,
        [
            *TINY,
            "train.epochs=3",
            "optim.lr=0.01",
            "schedule.warmup_epochs=0",
            "schedule.milestones=[1]",
            "schedule.gamma=1e9",
        ],
    )
    with pytest.raises(LongtailError, match=r"epoch 2, step .*after epoch 1\) is kept"):
        fit(cfg, tmp_path / "r", tiny_cifar_root)
    state = load_checkpoint(tmp_path / "r" / "last.pt")
    assert state["epoch"] == 1
    rows = (tmp_path / "r" / "history.jsonl").read_text().splitlines()
    assert len(rows) == 1 and math.isfinite(_strict(rows[0])["loss"])


def test_json_never_holds_nan_or_infinity():
    text = to_json({"top1": float("nan"), "few": [1.0, float("inf"), -float("inf")], "n": 3})
    assert _strict(text) == {"top1": None, "few": [1.0, None, None], "n": 3}


@pytest.mark.parametrize(
    "override, key",
    [
        ("optim.lr=nan", "optim.lr"),
        ("optim.lr=-0.1", "optim.lr"),
        ("optim.lr=.inf", "optim.lr"),
        ("optim.weight_decay=-1", "optim.weight_decay"),
        ("optim.grad_clip=0", "optim.grad_clip"),
        ("train.batch_size=0", "train.batch_size"),
        ("train.epochs=-1", "train.epochs"),
        ("train.checkpoint_every=0", "train.checkpoint_every"),
        ("train.eval_every=-2", "train.eval_every"),
        ("train.eval_batch_size=0", "train.eval_batch_size"),
        ("train.device=gpu", "train.device"),
        ("train.num_threads=0", "train.num_threads"),
        ("data.crop_padding=-4", "data.crop_padding"),
        ("data.imbalance_factor=0.5", "data.imbalance_factor"),
        ("data.val_per_class=-1", "data.val_per_class"),
        ("schedule.warmup_epochs=-1", "schedule.warmup_epochs"),
        ("seed=-1", "seed"),
    ],
)
def test_config_values_are_range_checked(override, key):
    with pytest.raises(ConfigError, match=rf"'{key}'"):
        load_config(CONFIG, ["data=cifar10_lt", override])


# ------------------------------------------------------------------ one process, one run folder


def test_a_second_process_on_the_same_folder_is_refused_with_the_holders_pid(
    tiny_cifar_root, tmp_path, capsys
):
    import subprocess
    import sys

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\nfrom longtail.core.run_folder import RunFolder\n"
            f"with RunFolder({str(run_dir)!r}).lock():\n    print('held', flush=True)\n"
            "    sys.stdin.readline()\n",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        rc = main(
            [
                "train",
                str(CONFIG),
                *TINY,
                "train.epochs=1",
                "--out",
                str(run_dir),
                "--data-root",
                str(tiny_cifar_root),
            ]
        )
        err = capsys.readouterr().err
        assert rc == 2 and f"in use by another longtail process (pid {holder.pid})" in err
        assert not (run_dir / "config.yaml").exists()  # nothing written
    finally:
        holder.communicate("\n", timeout=30)
    # released (the holder ended): the folder trains
    assert (
        main(
            [
                "train",
                str(CONFIG),
                *TINY,
                "train.epochs=1",
                "--out",
                str(run_dir),
                "--data-root",
                str(tiny_cifar_root),
            ]
        )
        == 0
    )


def test_a_folder_holding_other_files_is_not_overwritten(tiny_cifar_root, tmp_path, capsys):
    mine = tmp_path / "results"
    mine.mkdir()
    (mine / "metrics.json").write_text('{"mine": 1}\n')
    rc = main(
        [
            "train",
            str(CONFIG),
            *TINY,
            "train.epochs=1",
            "--out",
            str(mine),
            "--data-root",
            str(tiny_cifar_root),
        ]
    )
    assert (
        rc == 2
        and "is not empty (metrics.json) and is not a longtail run" in capsys.readouterr().err
    )
    assert (mine / "metrics.json").read_text() == '{"mine": 1}\n'
    assert sorted(p.name for p in mine.iterdir()) == ["metrics.json"]


def test_files_follow_the_umask_and_stale_temporaries_are_removed(tiny_cifar_root, tmp_path):
    import os

    run_dir = tmp_path / "run"
    cfg = load_config(CONFIG, [*TINY, "train.epochs=2"])
    old = os.umask(0o022)
    try:
        assert fit(cfg, run_dir, tiny_cifar_root, stop_after_epoch=1) is None  # "killed"
        (run_dir / ".last.pt.abc123.tmp").write_bytes(b"half a checkpoint")  # a killed write
        fit(cfg, run_dir, tiny_cifar_root, resume=True)
    finally:
        os.umask(old)
    assert not list(run_dir.glob(".*.tmp"))
    for name in ("config.yaml", "history.jsonl", "last.pt", "model.safetensors", "metrics.json"):
        assert (run_dir / name).stat().st_mode & 0o777 == 0o644, name


def test_a_full_disk_names_the_path_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    import errno

    from longtail.core.io import save_checkpoint

    path = tmp_path / "last.pt"
    save_checkpoint(path, {"epoch": 1})

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("torch.save", full)
    with pytest.raises(
        LongtailError,
        match=rf"No space left on {tmp_path} while writing last.pt; "
        r"the previous last.pt is kept",
    ):
        save_checkpoint(path, {"epoch": 2})
    monkeypatch.undo()
    assert load_checkpoint(path) == {"epoch": 1} and not list(tmp_path.glob(".*.tmp"))


def test_resume_without_a_checkpoint_says_it_starts_from_epoch_0(tiny_cifar_root, tmp_path, capsys):
    run_dir = tmp_path / "run"
    cfg = load_config(CONFIG, [*TINY, "train.epochs=1", "optim.lr=1e30"])
    with pytest.raises(LongtailError, match="diverged"):  # stops in epoch 1: no checkpoint
        fit(cfg, run_dir, tiny_cifar_root)
    assert (run_dir / "config.yaml").exists() and not (run_dir / "last.pt").exists()
    capsys.readouterr()
    with pytest.raises(LongtailError, match="diverged"):
        fit(cfg, run_dir, tiny_cifar_root, resume=True)
    assert (
        "has no checkpoint yet (no epoch had finished): the run starts from epoch 0"
        in capsys.readouterr().out
    )


# ------------------------------------------------------------------------- bad files, by name


def _bad_config(tmp_path, name, data: bytes):
    path = tmp_path / name
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(
    "name, data, message",
    [
        ("latin1.yaml", "seed: 1  # caf\xe9\n".encode("latin-1"), "is not UTF-8 text"),
        ("base.yaml", b"_base_: 3\n", "_base_ must be a file path or a list"),
        ("base_list.yaml", b"_base_: [ok.yaml, {a: 1}]\n", "_base_ must be a file path or a list"),
        ("list.yaml", b"- 1\n- 2\n", "must hold a mapping"),
        ("bad.yaml", b"seed: [1, 2\n", "is not valid YAML"),
        ("huge.yaml", b"#" * (2 << 20), "is 2.1 MB"),
        (
            "bomb.yaml",
            b"a: &a [x, x, x, x, x, x, x, x, x]\n"
            + b"".join(
                f"{c}: &{c} [{', '.join(['*' + p] * 9)}]\n".encode()
                for p, c in zip("abcdefgh", "bcdefghi")
            ),
            "more than 20 YAML aliases",
        ),
    ],
)
def test_bad_config_files_get_a_message_naming_the_file(tmp_path, name, data, message, capsys):
    path = _bad_config(tmp_path, name, data)
    with pytest.raises(ConfigError, match=message) as err:
        load_config(path, ["data=cifar10_lt"])
    assert str(path) in str(err.value) and len(str(err.value)) < 600  # no megabytes echoed
    assert main(["train", str(path), "data=cifar10_lt", "--out", str(tmp_path / "r")]) == 2
    assert "Traceback" not in capsys.readouterr().err and not (tmp_path / "r").exists()


def test_an_empty_config_warns(tmp_path):
    path = _bad_config(tmp_path, "empty.yaml", b"")
    with pytest.warns(UserWarning, match="is empty"):
        cfg = load_config(path, ["data=cifar10_lt"])
    assert cfg.data.dataset == "cifar10-lt"


def test_a_long_bad_value_is_not_echoed_in_full():
    with pytest.raises(ConfigError) as err:
        load_config(CONFIG, ["data=cifar10_lt", f"train.epochs={list(range(100000))}"])
    assert "'train.epochs'" in str(err.value) and len(str(err.value)) < 400


@pytest.fixture(scope="module")
def finished(tiny_cifar_root, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "ce"
    fit(load_config(CONFIG, [*TINY, "train.epochs=1"]), run_dir, tiny_cifar_root)
    return run_dir


def _copy(run_dir, tmp_path):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(run_dir, out)
    return out


def test_corrupt_weights_are_named(finished, tmp_path, tiny_cifar_root, capsys):
    run = _copy(finished, tmp_path)
    (run / "model.safetensors").write_bytes(b"not a safetensors file")
    assert main(["eval", str(run), "--data-root", str(tiny_cifar_root)]) == 2
    err = capsys.readouterr().err
    assert f"{run / 'model.safetensors'} cannot be read" in err and "Traceback" not in err


def test_a_checkpoint_of_another_model_names_the_keys(finished, tmp_path, tiny_cifar_root, capsys):
    run = _copy(finished, tmp_path)
    state = load_checkpoint(run / "last.pt")
    full = list(state["model"]["head.weight"].shape)
    state["model"]["head.weight"] = state["model"]["head.weight"][:, :3]
    del state["model"]["head.bias"]
    import torch

    torch.save(state, run / "last.pt")
    (run / "metrics.json").unlink()  # "unfinished": resume it
    rc = main(["train", "--resume", str(run), "--data-root", str(tiny_cifar_root)])
    err = capsys.readouterr().err
    assert rc == 2 and "do not fit this run's model: 1 missing (e.g. head.bias)" in err
    assert f"head.weight: saved [10, 3], this model {full}" in err


def test_a_corrupt_history_line_is_named(finished, tmp_path, tiny_cifar_root, capsys):
    run = _copy(finished, tmp_path)
    (run / "history.jsonl").write_text('{"epoch": 1, "loss": 2.0}\n{"epo')
    (run / "metrics.json").unlink()
    rc = main(["train", "--resume", str(run), "--data-root", str(tiny_cifar_root)])
    assert (
        rc == 2
        and f"{run / 'history.jsonl'} line 2 is not a history row" in capsys.readouterr().err
    )


# ------------------------------------------------------------------ resume continues the recorded run


@pytest.fixture
def killed(tiny_cifar_root, tmp_path):
    run_dir = tmp_path / "run"
    assert (
        fit(
            load_config(CONFIG, [*TINY, "train.epochs=2"]),
            run_dir,
            tiny_cifar_root,
            stop_after_epoch=1,
        )
        is None
    )
    return run_dir


@pytest.mark.parametrize(
    "override",
    [
        "optim.lr=0.5",
        "optim.momentum=0.5",
        "optim.weight_decay=0",
        "data.imbalance_factor=20",
        "loss=focal",
        "seed=3",
        "sampler=class_balanced",
        "train.batch_size=16",
    ],
)
def test_resume_refuses_a_changed_setting(killed, tiny_cifar_root, override, capsys):
    before = (killed / "config.yaml").read_text()
    rc = main(["train", "--resume", str(killed), override, "--data-root", str(tiny_cifar_root)])
    err = capsys.readouterr().err
    key = override.split("=")[0]
    assert rc == 2 and "continues the recorded run, but these settings differ" in err
    assert (key if "." in key else f"{key}") in err and "Only train.epochs" in err
    assert (killed / "config.yaml").read_text() == before  # nothing changed
    assert len((killed / "history.jsonl").read_text().splitlines()) == 1


def test_resume_may_extend_a_run_and_records_it(killed, tiny_cifar_root, capsys):
    rc = main(
        [
            "train",
            "--resume",
            str(killed),
            "train.epochs=3",
            "train.progress=false",
            "--data-root",
            str(tiny_cifar_root),
        ]
    )
    assert rc == 0
    assert load_config(killed / "config.yaml").train.epochs == 3  # config.yaml says so
    record = [json.loads(line) for line in (killed / "resumes.jsonl").read_text().splitlines()]
    assert record[0]["changes"] == {"train.epochs": [2, 3]}
    assert len((killed / "history.jsonl").read_text().splitlines()) == 3


def test_resume_with_a_config_or_out_is_refused(killed, tiny_cifar_root, tmp_path, capsys):
    assert main(["train", str(CONFIG), "--resume", str(killed)]) == 2
    assert "would be ignored" in capsys.readouterr().err
    assert main(["train", "--resume", str(killed), "--out", str(tmp_path / "other")]) == 2
    assert "--out" in capsys.readouterr().err and not (tmp_path / "other").exists()


# ------------------------------------------------------------------- no code runs by itself


def test_a_planted_materialize_script_is_never_run(tmp_path, monkeypatch, capsys):
    """A folder holding shared/data/materialize.py (in the working directory, its parent, beside
    the checkout) is not a reason to run it: only a mirror named by $LONGTAIL_MIRROR is used."""
    from longtail.data import paths

    sentinel = tmp_path / "ran.txt"
    script = f"open({str(sentinel)!r}, 'w').write('ran')\n"
    for folder in (tmp_path / "work" / "shared" / "data", tmp_path / "shared" / "data"):
        folder.mkdir(parents=True)
        (folder / "materialize.py").write_text(script)
    monkeypatch.chdir(tmp_path / "work")
    monkeypatch.delenv(paths.MIRROR_VAR, raising=False)
    monkeypatch.setattr(
        paths, "download_file", lambda *a, **k: (_ for _ in ()).throw(OSError("offline"))
    )
    rc = main(
        [
            "train",
            str(CONFIG),
            "data=cifar10_lt",
            "train.epochs=1",
            "--out",
            str(tmp_path / "r"),
            "--data-root",
            str(tmp_path / "empty-root"),
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "LONGTAIL_MIRROR=DIR" in err and "Traceback" not in err
    assert not sentinel.exists()  # the planted script never ran
    assert not (tmp_path / "r").exists()


# ------------------------------------------------------ calibration on the logits trained with


def test_a_cosine_head_run_reports_ece_and_nll_of_its_scaled_logits(tiny_cifar_root, tmp_path):
    import numpy as np
    import torch
    from safetensors.torch import load_file

    from longtail.engine.trainer import build_run

    recipe = CONFIG.parent / "ldam_drw.yaml"
    cfg = load_config(recipe, [*TINY, "train.epochs=2", "loss.drw_epoch=1"])
    metrics = fit(cfg, tmp_path / "ldam", tiny_cifar_root)
    assert metrics["logit_scale"] == 30.0
    run = build_run(cfg, tmp_path / "unused", tiny_cifar_root)
    model = run.method.model
    model.load_state_dict(load_file(str(tmp_path / "ldam" / "model.safetensors")))
    model.eval()
    d = run.data
    x = (d.test.images.float() / 255 - torch.tensor(d.mean).view(1, -1, 1, 1)) / torch.tensor(
        d.std
    ).view(1, -1, 1, 1)
    with torch.no_grad():
        z = 30.0 * model(x.contiguous(memory_format=torch.channels_last)).logits.double()
    y = d.test.labels
    nll = float(torch.nn.functional.cross_entropy(z, y))
    p = torch.softmax(z, 1)
    conf, pred = p.max(1)
    conf, correct = conf.numpy(), (pred == y).numpy()
    bins = np.clip(np.ceil(conf * 15).astype(int) - 1, 0, 14)
    ece = (
        100 * sum(abs(conf[bins == b].sum() - correct[bins == b].sum()) for b in range(15)) / len(y)
    )
    assert metrics["nll"] == pytest.approx(nll, rel=1e-4)
    assert metrics["ece"] == pytest.approx(ece, abs=1e-3)
    assert abs(metrics["nll"] - math.log(10)) > 0.05  # not the unscaled-cosine ln C


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["loss=focal", "loss.gamma=-1"], "loss.gamma"),
        (["loss=ldam", "loss.scale=0"], "loss.scale"),
        (["loss.drw_epoch=-1"], "loss.drw_epoch"),
        (["loss.drw_beta=1.5"], "loss.drw_beta"),
        (["loss=logit_adjusted", "loss.tau=.nan"], "loss.tau"),
        (["loss=gcl", "loss.beta=2"], "loss.beta"),
        (["loss=cb", "loss.base=focal", "loss.gamma=-1"], "loss.gamma"),
        (["sampler=class_balanced", "sampler.num_samples_cls=0"], "sampler.num_samples_cls"),
        (["sampler=class_balanced", "sampler.epoch_length=foo"], "sampler.epoch_length"),
        (["sampler=b3rs", "sampler.q=-1"], "sampler.q"),
        (["sampler=progressive", "sampler.progress=x"], "sampler.progress"),
        (["sampler=undersample", "sampler.per_class=0"], "sampler.per_class"),
        (["optim=sam", "optim.rho=-1"], "optim.rho"),
        (["optim.momentum=abc"], "optim.momentum"),
        (["schedule.gamma=0"], "schedule.gamma"),
        (["method=mfm", "method.meta_every=0"], "method.meta_every"),
        (["method=mfm", "method.modulate_at_test=sometimes"], "method.modulate_at_test"),
    ],
)
def test_component_options_are_range_checked_before_anything_is_built(
    overrides, key, tmp_path, capsys
):
    from longtail.engine.config_check import check_config

    with pytest.raises(ConfigError, match=rf"'{key}': "):
        check_config(load_config(CONFIG, ["data=cifar10_lt", *overrides]))
    assert (
        main(["train", str(CONFIG), "data=cifar10_lt", *overrides, "--out", str(tmp_path / "r")])
        == 2
    )
    assert "Traceback" not in capsys.readouterr().err and not (tmp_path / "r").exists()
