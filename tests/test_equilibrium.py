"""LOCE's equilibrium loss (``loss.name=ebl``) and memory-augmented feature sampling
(``method.name=mfs``): the class-score update and the loss against hand-computed values, no update
in evaluation or without gradients, the FIFO queues, the class sampler's histogram against the
1/s rule, a decoupled run on a tiny real-format CIFAR-10 that keeps the stage-1 backbone bit for
bit, bit-exact resume of queues / scores / generator, and the errors that name the fix."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_DATA
from safetensors.torch import load_file

from longtail.core.config import load_config
from longtail.core.errors import ConfigError, LongtailError
from longtail.core.io import load_checkpoint
from longtail.engine.trainer import build_run, fit
from longtail.losses import LOSSES, class_balanced_weights, create
from longtail.methods import METHODS
from longtail.methods.mfs import FeatureMemory, memory_seed

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
RECIPES = ("ebl", "ebl_mfs", "ebl_mfs_e2e")
TINY = [*TINY_DATA]
SHORT = ["schedule.warmup_epochs=1", "schedule.milestones=[1]"]  # the 200-epoch recipe, shortened

Z = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 1.0], [1.0, 1.0, 1.0]])
Y = torch.tensor([0, 1, 1, 0])


def cfg(name, *extra):
    return load_config(CONFIGS / "methods" / f"{name}.yaml", [*TINY, *extra])


def softmax_row(row):
    e = [math.exp(v) for v in row]
    return [v / sum(e) for v in e]


def hand_update(s, logits, targets, alpha, weights=None):
    """s_c <- a^n s_c + (1 - a^n) p_bar_c, with plain Python floats."""
    weights = weights or [1.0] * len(targets)
    s = list(s)
    for c in range(len(s)):
        idx = [i for i, y in enumerate(targets) if y == c]
        if not idx:
            continue
        n = sum(weights[i] for i in idx)
        p = sum(weights[i] * softmax_row(logits[i])[c] for i in idx) / n
        s[c] = alpha**n * s[c] + (1 - alpha**n) * p
    return s


def hand_loss(s, logits, targets):
    total = 0.0
    for row, y in zip(logits, targets):
        adj = [z + math.log(sc) for z, sc in zip(row, s)]
        total += -math.log(softmax_row(adj)[y])
    return total / len(targets)


# ---------------------------------------------------------------------------------------------
# the loss


def test_score_update_and_loss_against_hand_values():
    loss = create("ebl", class_counts=[5, 3, 1])
    assert torch.equal(loss.class_scores, torch.full((3,), 0.01))
    z, y = Z.tolist(), Y.tolist()
    # class 0: softmax scores e/(e+2) and 1/3, n = 2 -> 0.81 * 0.01 + 0.19 * 0.45472 = 0.094497
    s1 = hand_update([0.01] * 3, z, y, 0.9)
    assert s1[0] == pytest.approx(0.81 * 0.01 + 0.19 * (math.e / (math.e + 2) + 1 / 3) / 2)
    value = loss(Z, Y)  # the update comes first: this loss uses s1
    assert loss.class_scores.tolist() == pytest.approx(s1, rel=1e-6)
    assert loss.class_scores[2] == 0.01  # absent from the batch: unchanged, bit for bit
    assert float(value) == pytest.approx(hand_loss(s1, z, y), rel=1e-6)
    assert float(value) != pytest.approx(float(F.cross_entropy(Z, Y)), rel=1e-3)  # not CE
    # a second step moves on from s1 (momentum on the running value, not on 0.01)
    z2, y2 = [[0.0, 3.0, 0.0], [2.0, 0.0, 1.0]], [1, 2]
    s2 = hand_update(s1, z2, y2, 0.9)
    value2 = loss(torch.tensor(z2), torch.tensor(y2))
    assert loss.class_scores.tolist() == pytest.approx(s2, rel=1e-6)
    assert float(value2) == pytest.approx(hand_loss(s2, z2, y2), rel=1e-6)


def test_momentum_option_and_score_weights():
    loss = create("ebl", class_counts=[5, 3, 1], momentum=0.5, init_score=0.2)
    w = [1.0, 0.5, 0.5, 1.0]  # two samples of class 1 count as one instance together
    loss(Z, Y, score_weights=torch.tensor(w))
    s = hand_update([0.2] * 3, Z.tolist(), Y.tolist(), 0.5, w)
    assert loss.class_scores.tolist() == pytest.approx(s, rel=1e-6)
    # class 1: n = 1, p_bar = the mean of its two scores: 0.5 * 0.2 + 0.5 * mean
    p = (softmax_row([0.0, 2.0, 0.0])[1] + softmax_row([0.0, 0.0, 1.0])[1]) / 2
    assert float(loss.class_scores[1]) == pytest.approx(0.5 * 0.2 + 0.5 * p, rel=1e-6)


def test_scores_not_updated_in_eval_or_without_grad():
    loss = create("ebl", class_counts=[5, 3, 1])
    loss.class_scores.copy_(torch.tensor([0.5, 0.2, 0.05]))
    before = loss.class_scores.clone()
    with torch.no_grad():
        value = loss(Z, Y)
    assert torch.equal(loss.class_scores, before)
    assert float(value) == pytest.approx(hand_loss(before.tolist(), Z.tolist(), Y.tolist()))
    loss.eval()
    loss(Z.clone().requires_grad_(True), Y).backward()
    assert torch.equal(loss.class_scores, before)
    loss.train()
    loss(Z, Y)
    assert not torch.equal(loss.class_scores, before)


def test_drw_weights_compose_and_scores_persist_in_the_state():
    counts = [50, 10, 2]
    loss = create("ebl", class_counts=counts, drw_epoch=1)
    loss(Z, Y)
    state = loss.state_dict()
    assert set(state) == {"class_scores"}  # persistent; the DRW buffers are rebuilt
    fresh = create("ebl", class_counts=counts, drw_epoch=1)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.class_scores, loss.class_scores)
    fresh.set_epoch(1)
    with torch.no_grad():
        got = fresh(Z, Y)
    log_s = loss.class_scores.log()
    want = F.cross_entropy(Z + log_s, Y, weight=class_balanced_weights(counts, 0.9999))
    assert float(got) == pytest.approx(float(want), rel=1e-6)
    assert float(got) != pytest.approx(float(F.cross_entropy(Z + log_s, Y)), rel=1e-3)


def test_loss_options_are_validated():
    with pytest.raises(ConfigError, match="loss.momentum"):
        create("ebl", class_counts=[3, 1], momentum=1.0)
    with pytest.raises(ConfigError, match="loss.init_score"):
        create("ebl", class_counts=[3, 1], init_score=0.0)
    with pytest.raises(ConfigError, match="loss.momentum"):
        LOSSES.check_options("ebl", {"momentum": 1.5}, "loss")
    with pytest.raises(ConfigError, match="class_counts"):
        create("ebl")


# ---------------------------------------------------------------------------------------------
# the queues and the sampler


def tagged(labels, start):
    """Features [B, 2] = (class, a running id) so the queue's contents can be read back."""
    ids = torch.arange(start, start + len(labels), dtype=torch.float32)
    return torch.stack([torch.tensor(labels, dtype=torch.float32), ids], 1)


def test_queues_are_fifo_per_class():
    mem = FeatureMemory(3, 3, 2, torch.device("cpu"), seed=0)
    mem.enqueue(tagged([0, 0, 1], 0), torch.tensor([0, 0, 1]))
    assert mem.fill.tolist() == [2, 1, 0] and mem.ptr.tolist() == [2, 1, 0]
    mem.enqueue(tagged([0, 0], 10), torch.tensor([0, 0]))  # wraps: slot 0 is overwritten
    assert mem.features[0, :, 1].tolist() == [11.0, 1.0, 10.0]
    assert mem.fill.tolist() == [3, 1, 0] and mem.ptr.tolist() == [1, 1, 0]
    # 5 of class 1 in one batch: its queue keeps the last 3, written from its pointer on
    mem.enqueue(tagged([1] * 5, 20), torch.tensor([1] * 5))
    assert mem.features[1, :, 1].tolist() == [24.0, 22.0, 23.0]
    assert mem.fill.tolist() == [3, 3, 0] and mem.ptr.tolist() == [1, 1, 0]
    assert torch.equal(mem.features[:2, :, 0], torch.tensor([[0.0] * 3, [1.0] * 3]))
    assert torch.equal(mem.features[2], torch.zeros(3, 2))


def chi2(hist, probs):
    expected = probs * hist.sum()
    keep = expected > 0
    return float(((hist[keep] - expected[keep]) ** 2 / expected[keep]).sum())


def test_sampler_histogram_follows_inverse_scores():
    scores = torch.tensor([0.5, 0.2, 0.1, 0.05, 0.01, 0.001])
    mem = FeatureMemory(6, 5, 2, torch.device("cpu"), seed=memory_seed(0, 0))
    labels = [0] * 5 + [1] * 4 + [2] * 3 + [3] * 2 + [4] * 3  # class 5: empty queue
    mem.enqueue(tagged(labels, 0), torch.tensor(labels))
    xs, ys = zip(*(mem.sample(scores, 8, 4) for _ in range(2500)))  # 20,000 classes, 4 each
    assert all(x.shape == (32, 2) for x in xs)
    x, y = torch.cat(xs), torch.cat(ys)
    assert torch.equal(x[:, 0], y.float())  # each feature is one of its class's
    hist = np.bincount(y[::4].numpy(), minlength=6).astype(float)
    assert hist.sum() == 20000 and hist[5] == 0  # never an empty queue
    inv = 1.0 / (scores.double().numpy() + 1e-7)
    inv[5] = 0.0
    right = inv / inv.sum()
    assert chi2(hist, right) < 25.0  # df 4: p < 1e-4 above 23.5
    assert np.abs(hist / hist.sum() - right).max() < 0.015
    wrong = {
        "uniform": np.array([1, 1, 1, 1, 1, 0.0]),
        "proportional to s": np.r_[scores.numpy()[:5], 0.0],
        "1/s^2": inv**2,
    }
    for name, p in wrong.items():
        assert chi2(hist, p / p.sum()) > 1000.0, name
    # features uniformly over the stored ones of a class (class 3 keeps 2 of 5 slots)
    offsets = [0, 5, 9, 12, 14]  # the running ids of each class's first feature
    for c, n in enumerate([5, 4, 3, 2, 3]):
        counts = np.bincount(x[y == c, 1].long().numpy() - offsets[c], minlength=n)
        assert len(counts) == n and counts.min() > 0
        expected = counts.sum() / n
        assert chi2(counts.astype(float), np.full(n, 1.0 / n)) < 25.0, (c, counts, expected)


def test_no_memory_while_every_queue_is_empty():
    mem = FeatureMemory(4, 5, 3, torch.device("cpu"), seed=0)
    x, y = mem.sample(torch.full((4,), 0.01), 8, 4)
    assert x.shape == (0, 3) and y.shape == (0,)


# ---------------------------------------------------------------------------------------------
# recipes and errors


@pytest.mark.parametrize("name", RECIPES)
def test_recipes_load_and_state_the_paper(name):
    path = CONFIGS / "methods" / f"{name}.yaml"
    first = path.read_text().splitlines()[0]
    assert "ICCV 2021" in first and "27.4 is detection" in first
    for dataset in ("cifar10_lt", "cifar100_lt", "fashion_mnist_lt"):
        c = load_config(path, [f"data={dataset}"])
        assert c.loss.name == "ebl" and c.loss.params()["momentum"] == 0.9
        METHODS.check_kwargs(c.method.name, c.method.params())
    c = load_config(path, ["data=cifar10_lt"])
    if name == "ebl":
        assert c.method.name == "erm" and c.train.epochs == 200
    else:
        p = c.method.params()
        assert c.method.name == "mfs"
        assert p["sampled_num_classes"] * p["sampled_num_features"] == 32
        assert p["queue_size"] == 80
        assert p["mode"] == ("decoupled" if name == "ebl_mfs" else "end_to_end")
    if name == "ebl_mfs":
        assert (c.train.epochs, c.optim.lr, c.schedule.name) == (10, 0.05, "cosine")
        assert c.train.batch_size == 128 and c.sampler.name == "instance"


def test_mfs_needs_a_loss_with_class_scores(tiny_cifar_root, tmp_path):
    with pytest.raises(ConfigError, match="use loss.name=ebl"):
        build_run(
            cfg("ce", "method.name=mfs", "method.mode=end_to_end"), tmp_path / "r", tiny_cifar_root
        )


def test_decoupled_mfs_needs_stage1(tiny_cifar_root, tmp_path):
    with pytest.raises(LongtailError, match="stage1") as err:
        build_run(cfg("ebl_mfs"), tmp_path / "r", tiny_cifar_root)
    assert "configs/methods/ebl_mfs.yaml" in str(err.value)
    with pytest.raises(ConfigError, match="method.mode"):
        build_run(cfg("ebl_mfs", "method.mode=joint"), tmp_path / "r", tiny_cifar_root)


# ---------------------------------------------------------------------------------------------
# tiny real runs


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return tmp_path_factory.mktemp("equilibrium")


@pytest.fixture(scope="module")
def stage1(tiny_cifar_root, runs):
    run_dir = runs / "ce"
    fit(
        cfg("ce", "train.epochs=3", "schedule.warmup_epochs=1", "schedule.milestones=[2]"),
        run_dir,
        tiny_cifar_root,
    )
    return run_dir


def test_decoupled_step_feeds_batch_plus_memory_to_the_head(stage1, tiny_cifar_root, runs):
    run = build_run(cfg("ebl_mfs", f"stage1={stage1}"), runs / "unused", tiny_cifar_root)
    method = run.method
    method.train_model.train()
    method.on_epoch_start(0)  # pre-fills the queues: every class its min(n_c, 80) features
    assert method.memory.fill.tolist() == [min(n, 80) for n in run.data.class_counts]
    seen = []
    hook = method.model.head.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[0]))
    conv = next(m for m in method.model.backbone.modules() if isinstance(m, torch.nn.Conv2d))
    grads = []
    hook2 = conv.register_forward_hook(lambda m, i, o: grads.append(torch.is_grad_enabled()))
    batch = next(iter(run.loader.epoch(0)))
    before = method.class_scores.clone()
    method.train_step(batch)
    hook.remove()
    hook2.remove()
    assert seen == [len(batch.labels) + 32] and grads == [False]
    assert not torch.equal(method.class_scores, before)
    assert int(method._epoch_sampled.sum()) == 32
    assert not method.model.backbone.training and not method.model.neck.training


def test_decoupled_run_keeps_the_backbone_and_trains_the_head(stage1, tiny_cifar_root, runs):
    run_dir = runs / "ebl_mfs"
    metrics = fit(cfg("ebl_mfs", f"stage1={stage1}", "train.epochs=2"), run_dir, tiny_cifar_root)
    a, b = (
        load_file(str(stage1 / "model.safetensors")),
        load_file(str(run_dir / "model.safetensors")),
    )
    body = [k for k in a if not k.startswith("head.")]
    assert body and all(torch.equal(a[k], b[k]) for k in body)  # weights and BN statistics
    assert not torch.equal(a["head.weight"], b["head.weight"])
    assert not torch.equal(a["head.bias"], b["head.bias"])
    m = metrics["mfs"]
    steps = m["steps"]
    assert steps == 8 and sum(m["sampled_class_histogram"]) == 32 * steps
    assert len(m["class_scores"]) == 10 and all(0 < s <= 1 for s in m["class_scores"])
    assert m["class_scores"] != [0.01] * 10
    saved = load_checkpoint(run_dir / "last.pt")["method"]
    assert saved["loss"]["class_scores"].tolist() == pytest.approx(m["class_scores"])
    history = [json.loads(x) for x in (run_dir / "history.jsonl").read_text().splitlines()]
    assert [r["mfs_memory_features"] for r in history] == [128.0, 128.0]


@pytest.mark.parametrize("name", ["ebl_mfs_e2e", "ebl_mfs"])
def test_resume_is_bit_exact(name, stage1, tiny_cifar_root, tmp_path):
    extra = ["train.epochs=2", f"stage1={stage1}"] + (SHORT if name == "ebl_mfs_e2e" else [])
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    fit(cfg(name, *extra), straight, tiny_cifar_root)
    assert fit(cfg(name, *extra), killed, tiny_cifar_root, stop_after_epoch=1) is None
    fit(cfg(name, *extra), killed, tiny_cifar_root, resume=True)
    a, b = (load_file(str(d / "model.safetensors")) for d in (straight, killed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sa, sb = (load_checkpoint(d / "last.pt")["method"] for d in (straight, killed))
    assert torch.equal(sa["loss"]["class_scores"], sb["loss"]["class_scores"])
    for key in ("features", "fill", "ptr", "generator"):
        assert torch.equal(sa["mfs"]["memory"][key], sb["mfs"]["memory"][key]), key
    assert torch.equal(sa["mfs"]["sampled"], sb["mfs"]["sampled"])
    assert int(sa["mfs"]["memory"]["fill"].sum()) > 0


def test_end_to_end_trains_the_backbone_and_fills_queues_as_it_goes(tiny_cifar_root, tmp_path):
    run = build_run(cfg("ebl_mfs_e2e", *SHORT), tmp_path / "r", tiny_cifar_root)
    method = run.method
    method.train_model.train()
    method.on_epoch_start(0)
    assert int(method.memory.fill.sum()) == 0  # no pre-fill
    batches = iter(run.loader.epoch(0))
    first = next(batches)
    conv = next(m for m in method.model.backbone.modules() if isinstance(m, torch.nn.Conv2d))
    w0 = conv.weight.detach().clone()
    method.train_step(first)  # empty queues: no memory yet; the batch is enqueued
    assert int(method._epoch_sampled.sum()) == 0
    assert method.memory.fill.tolist() == np.bincount(first.labels.numpy(), minlength=10).tolist()
    method.train_step(next(batches))
    assert int(method._epoch_sampled.sum()) == 32
    assert not torch.equal(conv.weight, w0)


# ---------------------------------------------------------------------------------------------
# DDP: the scores are all-reduced


def _ddp_scores(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        loss = create("ebl", class_counts=[5, 3, 1])
        half = slice(0, 2) if rank == 0 else slice(2, 4)
        loss(Z[half], Y[half])
        if rank == 1:
            torch.save(loss.class_scores, out)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_scores_are_synchronised_over_ranks(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "rank1.pt"
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.start_processes(_ddp_scores, args=(port, str(out)), nprocs=2, start_method="spawn")
    whole = create("ebl", class_counts=[5, 3, 1])
    whole(Z, Y)
    assert torch.allclose(torch.load(out, weights_only=True), whole.class_scores, rtol=1e-6)
