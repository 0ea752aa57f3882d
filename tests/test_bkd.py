"""BKD (longtail.methods.bkd): the re-weighted teacher target and both KD readings against values
computed by hand; the step's loss is base + alpha T^2 KD with the teacher's logit scale; on a
tiny real-format CIFAR-10 a cosine-head LDAM teacher (1 epoch) distils into a linear-head student:
the teacher stays bit-identical (file and memory, never optimised), its metrics equal its own
run's; alpha = 0 trains exactly the CE run; resume is bit-exact; bad teachers are clear errors."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_DATA
from safetensors.torch import load_file

from longtail.core.config import load_config
from longtail.core.errors import ConfigError, LongtailError
from longtail.engine.trainer import build_run, fit
from longtail.losses.base import class_balanced_weights
from longtail.methods.bkd import BalancedKnowledgeDistillation, balanced_target, distillation_terms

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TINY = [
    *TINY_DATA,
    "schedule.warmup_epochs=0",
    "schedule.milestones=[1]",
    "schedule.gamma=0.1",
]
COMPARED = ("top1", "many", "medium", "few", "mean_class_acc", "ece", "nll")


def recipe(name, *extra):
    return load_config(CONFIGS / "methods" / f"{name}.yaml", [*TINY, *extra])


def student(teacher, *extra):
    return recipe("bkd", "train.epochs=2", f"method.teacher={teacher}", *extra)


def weights(run_dir):
    return load_file(str(Path(run_dir) / "model.safetensors"))


def history(run_dir):
    return [json.loads(x) for x in (Path(run_dir) / "history.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return tmp_path_factory.mktemp("bkd")


@pytest.fixture(scope="module")
def teacher(tiny_cifar_root, runs):
    """A cosine-head LDAM teacher (logit scale 30; another head than the students'), 1 epoch."""
    run_dir = runs / "teacher"
    fit(recipe("ldam_drw", "train.epochs=1"), run_dir, tiny_cifar_root)
    return run_dir


# ---------------------------------------------------------------------------------------------
# the distillation term by hand

Z_T = [[2.0, 0.0, -1.0], [0.5, 1.5, 0.0]]
Z_S = [[0.3, -0.2, 0.1], [-1.0, 0.4, 0.8]]
COUNTS = [100, 10, 1]
T = 2.0


def _softmax(row, t):
    e = [math.exp(v / t) for v in row]
    return [v / sum(e) for v in e]


def _cb_weights(counts, beta):
    w = [(1 - beta) / (1 - beta**n) for n in counts]
    return [v * len(w) / sum(w) for v in w]


def test_class_weights_are_the_effective_number_weights():
    w = _cb_weights(COUNTS, 0.9999)
    assert class_balanced_weights(COUNTS, 0.9999).tolist() == pytest.approx(w, rel=1e-6)
    assert w[2] > w[1] > w[0]  # the tail weighs most


def test_target_is_the_reweighted_renormalised_teacher_distribution():
    w = _cb_weights(COUNTS, 0.9999)
    want = []
    for row in Z_T:
        p = _softmax(row, T)
        s = sum(wc * pc for wc, pc in zip(w, p))
        want.append([wc * pc / s for wc, pc in zip(w, p)])
    got = balanced_target(torch.tensor(Z_T), T, class_balanced_weights(COUNTS, 0.9999))
    assert got.tolist() == [pytest.approx(r, rel=1e-5) for r in want]
    assert got[0, 2] > _softmax(Z_T[0], T)[2]  # mass moves to the tail class
    # no weights: the plain softened teacher output
    plain = balanced_target(torch.tensor(Z_T), T, None)
    assert plain.tolist() == [pytest.approx(_softmax(r, T), rel=1e-6) for r in Z_T]


def test_both_kd_readings_by_hand():
    w = _cb_weights(COUNTS, 0.9999)
    tw = class_balanced_weights(COUNTS, 0.9999)
    renorm, weighted, plain = [], [], []
    for zt, zs in zip(Z_T, Z_S):
        p, q = _softmax(zt, T), _softmax(zs, T)
        s = sum(wc * pc for wc, pc in zip(w, p))
        pt = [wc * pc / s for wc, pc in zip(w, p)]
        renorm.append(sum(a * math.log(a / b) for a, b in zip(pt, q)))
        weighted.append(sum(wc * a * math.log(a / b) for wc, a, b in zip(w, p, q)))
        plain.append(sum(a * math.log(a / b) for a, b in zip(p, q)))
    zt, zs = torch.tensor(Z_T), torch.tensor(Z_S)
    assert distillation_terms(zs, zt, T, tw, "renorm").tolist() == pytest.approx(renorm, rel=1e-5)
    got = distillation_terms(zs, zt, T, tw, "weighted_kl").tolist()
    assert got == pytest.approx(weighted, rel=1e-5)
    for variant in ("renorm", "weighted_kl"):  # w = 1 (before reweight_epoch): plain KD
        assert distillation_terms(zs, zt, T, None, variant).tolist() == pytest.approx(plain)
    assert abs(renorm[0] - weighted[0]) > 1e-2  # the two readings differ
    # the student equal to the target: no distillation loss
    same = torch.log(balanced_target(zt, T, tw)) * T
    assert distillation_terms(same, zt, T, tw, "renorm").abs().max() < 1e-6


# ---------------------------------------------------------------------------------------------
# the step


def test_step_loss_is_base_plus_alpha_t2_kd_with_the_teacher_scale(teacher, tiny_cifar_root, runs):
    cfg = student(
        teacher, "method.alpha=0.5", "method.variant=weighted_kl", "method.reweight_epoch=1"
    )
    run = build_run(cfg, runs / "unused", tiny_cifar_root)
    m = run.method
    assert isinstance(m, BalancedKnowledgeDistillation) and m.teacher_scale == 30.0
    assert m.teacher is not m.model and not any(p.requires_grad for p in m.teacher.parameters())
    batch = next(iter(run.loader.epoch(0)))
    m.model.eval()  # one output for the hand computation and the step's forward
    with torch.no_grad():
        z_s = m.model(batch.images).logits
        z_t = m.teacher(batch.images).logits * 30.0
    ce = F.cross_entropy(z_s, batch.labels)
    w = class_balanced_weights(run.data.class_counts, 0.9999)
    for epoch, weight in ((0, None), (1, w)):
        m.on_epoch_start(epoch)
        m.model.eval()
        kd = distillation_terms(z_s, z_t, 2.0, weight, "weighted_kl").mean()
        with torch.no_grad():
            got = m.compute_loss(batch)
        assert float(got) == pytest.approx(float(ce + 0.5 * 4.0 * kd), rel=1e-5), epoch
    # the raw (unscaled) cosine logits would give another loss
    raw = distillation_terms(z_s, z_t / 30.0, 2.0, w, "weighted_kl").mean()
    assert abs(float(ce + 2.0 * raw) - float(got)) > 1e-3


# ---------------------------------------------------------------------------------------------
# runs


@pytest.fixture(scope="module")
def bkd_run(teacher, tiny_cifar_root, runs):
    """A 2-epoch student (re-weighting from epoch 1), with the method object kept."""
    before = hashlib.sha256((teacher / "model.safetensors").read_bytes()).hexdigest()
    kept = []
    original = BalancedKnowledgeDistillation.on_train_end

    def keep(self):
        kept.append(self)
        original(self)

    mp = pytest.MonkeyPatch()
    mp.setattr(BalancedKnowledgeDistillation, "on_train_end", keep)
    try:
        metrics = fit(student(teacher, "method.reweight_epoch=1"), runs / "bkd", tiny_cifar_root)
    finally:
        mp.undo()
    return runs / "bkd", metrics, kept[0], before


def test_teacher_stays_frozen_and_unchanged(bkd_run, teacher):
    run_dir, _, method, before = bkd_run
    assert hashlib.sha256((teacher / "model.safetensors").read_bytes()).hexdigest() == before
    saved = load_file(str(teacher / "model.safetensors"))
    state = method.teacher.state_dict()
    assert saved.keys() == state.keys()
    for key, value in saved.items():  # weights and BatchNorm statistics, bit for bit
        assert torch.equal(state[key].cpu(), value), key
    assert not method.teacher.training
    assert not any(p.requires_grad for p in method.teacher.parameters())
    optimised = {id(p) for p in method.optim.params()}
    assert optimised and not optimised & {id(p) for p in method.teacher.parameters()}
    # the student is another model (linear head with a bias; the cosine head has none)
    assert "head.bias" in weights(run_dir) and "head.bias" not in saved


def test_teacher_metrics_and_kd_term_are_recorded(bkd_run, teacher):
    run_dir, metrics, _, _ = bkd_run
    saved = json.loads((run_dir / "metrics.json").read_text())
    own = json.loads((teacher / "metrics.json").read_text())
    t = saved["teacher"]
    assert t["run"] == str(teacher) and t["logit_scale"] == own["logit_scale"] == 30.0
    assert t["model"] == {"backbone": "resnet8", "head": "cosine"}
    for key in COMPARED:  # the teacher's numbers are its own run's (same batches and scale)
        assert t["test"][key] == own[key], key
        assert t["val"][key] == own["val"][key], f"val.{key}"
    assert saved["bkd"]["variant"] == "renorm" and saved["bkd"]["reweight_epoch"] == 1
    rows = history(run_dir)
    assert [r["epoch"] for r in rows] == [1, 2]
    assert all(math.isfinite(r["kd_loss"]) and r["kd_loss"] > 0 for r in rows)
    assert metrics["teacher"] == t


def test_alpha_zero_is_exactly_the_ce_run(bkd_run, teacher, tiny_cifar_root, runs):
    fit(recipe("ce", "train.epochs=2"), runs / "ce", tiny_cifar_root)
    fit(student(teacher, "method.alpha=0"), runs / "alpha0", tiny_cifar_root)
    ce, zero, kd = weights(runs / "ce"), weights(runs / "alpha0"), weights(bkd_run[0])
    assert ce.keys() == zero.keys() == kd.keys()
    for key in ce:
        assert torch.equal(ce[key], zero[key]), key
    assert any(not torch.equal(ce[k], kd[k]) for k in ce)  # alpha = 1 does change the run
    assert [r["loss"] for r in history(runs / "ce")] == [
        r["loss"] for r in history(runs / "alpha0")
    ]
    assert "kd_loss" not in history(runs / "alpha0")[0]


def test_resume_is_bit_exact(bkd_run, teacher, tiny_cifar_root, tmp_path):
    straight = bkd_run[0]
    killed = tmp_path / "killed"
    cfg = student(teacher, "method.reweight_epoch=1")  # the re-weighting starts after the resume
    assert fit(cfg, killed, tiny_cifar_root, stop_after_epoch=1) is None
    fit(cfg, killed, tiny_cifar_root, resume=True)
    a, b = weights(straight), weights(killed)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert [(r["loss"], r["kd_loss"]) for r in history(straight)] == [
        (r["loss"], r["kd_loss"]) for r in history(killed)
    ]


# ---------------------------------------------------------------------------------------------
# bad teachers


def test_bad_teacher_is_a_clear_error(teacher, tiny_cifar_root, runs, tmp_path):
    with pytest.raises(ConfigError, match="'method.teacher' is not set.*method.teacher=runs/ce"):
        build_run(recipe("bkd"), runs / "unused", tiny_cifar_root)
    with pytest.raises(LongtailError, match="no such folder.*configs/methods/ce.yaml"):
        build_run(student(tmp_path / "nothing"), runs / "unused", tiny_cifar_root)
    (tmp_path / "empty").mkdir()
    with pytest.raises(LongtailError, match="not a run folder"):
        build_run(student(tmp_path / "empty"), runs / "unused", tiny_cifar_root)
    unfinished = tmp_path / "unfinished"
    shutil.copytree(teacher, unfinished)
    (unfinished / "metrics.json").unlink()
    with pytest.raises(LongtailError, match="has not finished.*--resume"):
        build_run(student(unfinished), runs / "unused", tiny_cifar_root)
    with pytest.raises(LongtailError, match="data.imbalance_factor: teacher 10.0, this run 20.0"):
        build_run(student(teacher, "data.imbalance_factor=20"), runs / "unused", tiny_cifar_root)
    other = tmp_path / "other-classes"
    shutil.copytree(teacher, other)
    m = json.loads((other / "metrics.json").read_text())
    m["class_counts"] = m["class_counts"][:5]
    (other / "metrics.json").write_text(json.dumps(m))
    with pytest.raises(LongtailError, match="predicts 5 classes, this run has 10"):
        build_run(student(other), runs / "unused", tiny_cifar_root)
