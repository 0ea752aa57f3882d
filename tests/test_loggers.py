"""Experiment loggers on a tiny real run: history.jsonl gets the last epoch's evaluation, and
csv / tensorboard / mlflow / wandb (offline) hold the same scalars, read back with each tool's
own reader; a missing library names its pip extra."""

from __future__ import annotations

import csv
import glob
import importlib.util
import json
import struct
from pathlib import Path

import pytest
from conftest import TINY_RUN

from longtail.core.config import load_config
from longtail.core.errors import ConfigError
from longtail.engine import loggers as loggers_module
from longtail.engine.config_check import check_config
from longtail.engine.loggers import require, scalars
from longtail.engine.trainer import fit

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "methods" / "ce.yaml"
OPTIONAL = [name for name in ("tensorboard", "mlflow", "wandb") if importlib.util.find_spec(name)]


def tiny_cfg(epochs, extra=()):
    return load_config(CONFIG, [*TINY_RUN, f"train.epochs={epochs}", *extra])


def history(run_dir):
    return [json.loads(x) for x in (Path(run_dir) / "history.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def logged_run(tiny_cifar_root, tmp_path_factory, monkeypatch_module):
    monkeypatch_module.delenv("WANDB_MODE", raising=False)
    monkeypatch_module.delenv("MLFLOW_TRACKING_URI", raising=False)
    run_dir = tmp_path_factory.mktemp("logged") / "ce-logged"
    names = json.dumps(["csv", *OPTIONAL])
    cfg = tiny_cfg(2, ["train.eval_every=1", f"train.logger={names}"])
    metrics = fit(cfg, run_dir, tiny_cifar_root)
    return run_dir, metrics, history(run_dir)


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def epoch_scalars(rows):
    """{key: {epoch: value}} of every scalar the history rows hold (as the loggers flatten them)."""
    out: dict = {}
    for row in rows:
        for key, value in scalars(row, skip=frozenset({"epoch"})).items():
            out.setdefault(key, {})[row["epoch"]] = value
    return out


def test_last_epoch_evaluation_reaches_history(logged_run):
    _, metrics, rows = logged_run
    assert [r["epoch"] for r in rows] == [1, 2]
    assert "test" in rows[0]  # eval_every=1: the periodic evaluation of epoch 1
    last = rows[1]  # the last epoch: the final evaluation (it used to be left out)
    for key in ("top1", "top5", "mean_class_acc", "many", "medium", "few", "ece"):
        assert last["test"][key] == metrics[key], key
        assert last["val"][key] == metrics["val"][key], key


def test_csv_holds_every_history_scalar(logged_run):
    run_dir, metrics, rows = logged_run
    table = list(csv.DictReader((run_dir / "metrics.csv").read_text().splitlines()))
    assert [int(r["epoch"]) for r in table] == [1, 2]  # the last epoch once, its eval merged in
    expected = epoch_scalars(rows)
    assert set(table[0]) == {"epoch", *expected}
    for key, per_epoch in expected.items():
        for epoch, value in per_epoch.items():
            assert float(table[epoch - 1][key]) == value, (key, epoch)
    final = dict(csv.reader((run_dir / "final_metrics.csv").read_text().splitlines()[1:]))
    assert float(final["final/top1"]) == metrics["top1"]
    assert float(final["final/val/top1"]) == metrics["val"]["top1"]
    assert not any(k.startswith("final/provenance") for k in final)


def test_tensorboard_event_file_reads_back(logged_run):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, metrics, rows = logged_run
    acc = EventAccumulator(str(run_dir / "tb"))
    acc.Reload()
    expected = epoch_scalars(rows)
    assert {"loss", "lr", "test/top1", "val/top1"} <= set(acc.Tags()["scalars"])
    for key, per_epoch in expected.items():
        events = acc.Scalars(key)
        assert [e.step for e in events] == sorted(per_epoch), key
        for e in events:
            assert e.value == pytest.approx(per_epoch[e.step], rel=1e-6), (key, e.step)
    (final,) = acc.Scalars("final/top1")
    assert final.step == 2 and final.value == pytest.approx(metrics["top1"], rel=1e-6)
    (text,) = acc.Tensors("config/text_summary")
    assert "backbone: resnet8" in text.tensor_proto.string_val[0].decode()


def test_mlflow_file_store_reads_back(logged_run):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    run_dir, metrics, rows = logged_run
    client = MlflowClient(tracking_uri=(run_dir / "mlruns").resolve().as_uri())
    experiment = client.get_experiment_by_name("longtail")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "ce-logged" and run.info.status == "FINISHED"
    assert run.data.params["optim.lr"] == "0.1" and run.data.params["train.epochs"] == "2"
    assert run.data.params["model.backbone"] == "resnet8"
    for key, per_epoch in epoch_scalars(rows).items():
        logged = client.get_metric_history(run.info.run_id, key)
        assert {m.step: m.value for m in logged} == pytest.approx(per_epoch), key
    assert run.data.metrics["final/top1"] == pytest.approx(metrics["top1"])
    assert run.data.metrics["final/few"] == pytest.approx(metrics["few"])


def wandb_records(path):
    """The records of an offline .wandb file (LevelDB log blocks of W&B protobuf records)."""
    from wandb.proto import wandb_internal_pb2 as pb

    raw = Path(path).read_bytes()
    assert raw[:4] == b":W&B"
    block, pos, records, part = 32768, 7, [], b""
    while pos + 7 <= len(raw):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, size, kind = struct.unpack("<IHB", raw[pos : pos + 7])
        if size == 0 and kind == 0:
            pos += block - pos % block
            continue
        data, pos = raw[pos + 7 : pos + 7 + size], pos + 7 + size
        part = data if kind in (1, 2) else part + data
        if kind in (1, 4):  # a full record, or the last piece of one
            record = pb.Record()
            record.ParseFromString(part)
            records.append(record)
    return records


def _items(items):
    return {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in items}


def test_wandb_offline_run_holds_history_and_summary(logged_run):
    pytest.importorskip("wandb")
    run_dir, metrics, rows = logged_run
    run_id = (run_dir / "wandb_run_id.txt").read_text().strip()
    (path,) = glob.glob(str(run_dir / "wandb" / f"offline-run-*-{run_id}" / f"run-{run_id}.wandb"))
    records = wandb_records(path)
    logged: dict = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            item = _items(r.history.item)
            for key, value in item.items():
                if not key.startswith("_"):
                    logged.setdefault(key, {})[item["_step"]] = value
    expected = epoch_scalars(rows)
    assert set(logged) == set(expected)
    for key, per_epoch in expected.items():
        assert logged[key] == pytest.approx(per_epoch), key
    summary: dict = {}
    for r in records:
        if r.WhichOneof("record_type") == "summary":
            summary.update(_items(r.summary.update))
    assert summary["final/top1"] == pytest.approx(metrics["top1"])
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert run.display_name == "ce-logged"
    config: dict = {}
    for r in records:
        if r.WhichOneof("record_type") == "config":
            config.update(_items(r.config.update))
    assert config["optim"]["lr"] == 0.1 and config["model"]["backbone"] == "resnet8"


def test_csv_logger_continues_on_resume(tiny_cifar_root, tmp_path):
    cfg = tiny_cfg(2, ["train.logger=csv"])
    assert fit(cfg, tmp_path / "r", tiny_cifar_root, stop_after_epoch=1) is None
    assert [r["epoch"] for r in csv.DictReader(open(tmp_path / "r" / "metrics.csv"))] == ["1"]
    fit(cfg, tmp_path / "r", tiny_cifar_root, resume=True)
    table = list(csv.DictReader(open(tmp_path / "r" / "metrics.csv")))
    rows = history(tmp_path / "r")
    assert [r["epoch"] for r in table] == ["1", "2"]
    assert [float(r["loss"]) for r in table] == [r["loss"] for r in rows]
    assert float(table[1]["test/top1"]) == rows[1]["test"]["top1"]


def test_logger_names_and_keys_are_checked():
    with pytest.raises(ConfigError, match="no logger named 'tensorbord'"):
        check_config(tiny_cfg(1, ["train.logger=tensorbord"]))
    with pytest.raises(ConfigError, match="train.logger_params.projct"):
        check_config(tiny_cfg(1, ["train.logger=csv", "train.logger_params={projct: x}"]))
    with pytest.raises(ConfigError, match="train.logger_params.wandb.tracking_uri"):
        check_config(tiny_cfg(1, ["train.logger_params={wandb: {tracking_uri: x}}"]))
    check_config(tiny_cfg(1, ["train.logger=[csv]", "train.logger_params={project: p, name: n}"]))


def test_a_missing_library_names_its_pip_extra(monkeypatch):
    monkeypatch.setattr(loggers_module.MLflowLogger, "module", "longtail_no_such_module")
    with pytest.raises(ConfigError, match=r'pip install "longtail\[mlflow\]"'):
        check_config(tiny_cfg(1, ["train.logger=[csv, mlflow]"]))
    with pytest.raises(ConfigError, match=r'pip install "longtail\[wandb\]"'):
        require("longtail_no_such_module", "wandb")
