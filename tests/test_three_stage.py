"""The three-stage strategy (METHODS.md §3) as one `longtail train` command, on a tiny real-format
CIFAR-10 (ResNet-8, 1 epoch a stage): four run folders and final metrics over all classes; stage 2's
loader yields no image of the removed class and its logit gets no probability mass or gradient;
stage 3's sampler is balanced; `--resume` continues an interrupted pipeline without re-running
finished stages; stage mistakes are ConfigErrors naming the key; the bench harness runs a
pipeline as one run."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from longtail.cli import main
from longtail.core.config import load_config
from longtail.core.errors import ConfigError, DataError, LongtailError
from longtail.data.build import resolve_exclude_classes
from longtail.data.samplers import ClassBalancedSampler, UndersampleSampler, build_sampler
from longtail.engine import trainer
from longtail.engine.evaluate_run import evaluate_run
from longtail.engine.pipeline import expand_stages
from longtail.engine.trainer import build_run
from longtail.methods.finetune import mask_logits

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
THREE = CONFIGS / "methods" / "three_stage.yaml"
C10 = "data=cifar10_lt"  # the dataset selector of every run of THREE here
TINY = [
    "model.backbone=resnet8",
    "data.imbalance_factor=10",
    "data.val_per_class=3",
    "train.batch_size=32",
    "train.eval_batch_size=64",
    "train.progress=false",
]
NAMES = ["stage1", "stage2", "stage3a", "stage3b"]
RUN_FILES = ("config.yaml", "history.jsonl", "last.pt", "model.safetensors", "metrics.json")


def read_json(path):
    return json.loads(Path(path).read_text())


def train(*argv, root):
    return main(["train", *map(str, argv), "--data-root", str(root)])


@pytest.fixture(scope="module")
def pipeline(tiny_cifar_root, tmp_path_factory):
    """configs/methods/three_stage.yaml data=cifar10_lt, 1 epoch a stage, run with ONE `longtail train`."""
    run_dir = tmp_path_factory.mktemp("three_stage") / "run"
    assert train(THREE, C10, *TINY, "train.epochs=1", "--out", run_dir, root=tiny_cifar_root) == 0
    return run_dir


def stage_cfgs(run_dir, *extra):
    """The pipeline's stage configs, chained to ``run_dir``'s stage folders."""
    overrides = [C10, *TINY, "train.epochs=1", *extra]  # as `longtail train THREE <overrides>`
    cfg = load_config(THREE, overrides)
    return {
        s.name: s.cfg
        for s in expand_stages(cfg, overrides, source=THREE, run_dir=run_dir.resolve())
    }


# ---------------------------------------------------------------------------------------------
# the recipe


@pytest.mark.parametrize("dataset", ["cifar10_lt", "cifar100_lt", "fashion_mnist_lt"])
def test_three_stage_configs_hold_the_proposed_recipe(dataset):
    path, data = THREE, f"data={dataset}"
    stages = expand_stages(load_config(path, [data]), [data], source=path, run_dir=Path("/runs/x"))
    assert [s.name for s in stages] == NAMES
    c1, c2, c3a, c3b = (s.cfg for s in stages)
    ce = load_config(CONFIGS / "methods" / "ce.yaml", [data]).to_dict()
    assert c1.to_dict() == ce  # stage 1 = ce.yaml
    assert [c.method.name for c in (c1, c2, c3a, c3b)] == ["erm", "residual", "finetune", "crt"]
    assert [c.train.epochs for c in (c1, c2, c3a, c3b)] == [200, 50, 10, 10]
    assert [c.optim.lr for c in (c1, c2, c3a)] == [0.1, 0.01, 0.001]
    assert c2.data.exclude_classes == "largest" and c2.schedule.params()["milestones"] == [40, 45]
    assert c3a.sampler.name == "undersample" and c3a.data.exclude_classes is None
    crt = load_config(CONFIGS / "methods" / "crt.yaml", [data]).to_dict()
    assert {**c3b.to_dict(), "stage1": None} == crt  # stage 3b = crt.yaml
    assert [c.stage1 for c in (c1, c2, c3a, c3b)] == [None, *(f"/runs/x/{n}" for n in NAMES[:3])]
    # a shorter pipeline shortens every stage alike; the IF override reaches every stage
    short = expand_stages(
        load_config(path, [data, "train.epochs=8", "data.imbalance_factor=50"]),
        [data, "train.epochs=8", "data.imbalance_factor=50"],
        source=path,
    )
    assert [s.cfg.train.epochs for s in short] == [8, 2, 1, 1]
    assert {s.cfg.data.imbalance_factor for s in short} == {50}


def test_recorded_config_is_self_contained(pipeline):
    saved = load_config(pipeline / "config.yaml")
    assert [s.name for s in saved.stages] == NAMES
    assert all(
        s.config is None and s.lr_scale is None and s.epochs_scale is None for s in saved.stages
    )
    again = expand_stages(saved, run_dir=pipeline.resolve())
    for st in again:
        mine = load_config(pipeline / st.name / "config.yaml").to_dict()
        # the pipeline records what each stage asks for, the stage what it trained with:
        # train.amp=auto resolved when the stage was built (fp32 in the test suite)
        assert (st.cfg.train.amp, mine["train"]["amp"]) == ("auto", "none"), st.name
        mine["train"]["amp"] = "auto"
        assert st.cfg.to_dict() == mine, st.name


# ---------------------------------------------------------------------------------------------
# one command, four run folders


def test_one_command_runs_every_stage_into_its_folder(pipeline):
    for i, name in enumerate(NAMES):
        folder = pipeline / name
        assert all((folder / f).is_file() for f in RUN_FILES), name
        saved = yaml.safe_load((folder / "config.yaml").read_text())
        assert saved["stages"] is None
        assert saved["stage1"] == (str(pipeline.resolve() / NAMES[i - 1]) if i else None)
    final, last = (
        read_json(pipeline / "metrics.json"),
        read_json(pipeline / "stage3b" / "metrics.json"),
    )
    assert final["final_stage"] == "stage3b"
    for key in ("top1", "many", "medium", "few", "per_class", "confusion", "class_counts", "val"):
        assert final[key] == last[key], key
    assert len(final["per_class"]) == 10 and None not in final["per_class"]  # all classes
    assert len(final["class_counts"]) == 10 and final["num_samples"] == 100
    assert [r["name"] for r in final["stages"]] == NAMES
    assert final["epochs"] == 4
    assert final["train_seconds"] == pytest.approx(
        sum(read_json(pipeline / n / "metrics.json")["train_seconds"] for n in NAMES)
    )
    assert read_json(pipeline / "stage2" / "metrics.json")["masked_classes"] == [0]


def test_eval_of_the_pipeline_folder_reproduces_its_metrics(pipeline, tiny_cifar_root):
    final, again = read_json(pipeline / "metrics.json"), evaluate_run(pipeline, tiny_cifar_root)
    for key in ("top1", "per_class", "confusion", "ece"):
        assert again[key] == final[key], key


# ---------------------------------------------------------------------------------------------
# stage 2: the residual set


def test_stage2_loader_yields_no_removed_class(pipeline, tiny_cifar_root, tmp_path):
    cfg = stage_cfgs(pipeline)["stage2"]
    run = build_run(cfg, tmp_path / "unused", tiny_cifar_root)
    assert run.data.excluded_classes == (0,)  # "largest" = class 0 (30 images)
    full = build_run(stage_cfgs(pipeline)["stage1"], tmp_path / "unused1", tiny_cifar_root).data
    assert run.data.class_counts == full.class_counts  # the losses' counts stay whole
    for epoch in (0, 1):
        labels = torch.cat([b.labels for b in run.loader.epoch(epoch)]).numpy()
        assert len(labels) == sum(full.class_counts[1:])
        assert 0 not in labels and set(labels) == set(range(1, 10))
    assert 0 in run.data.test.labels.tolist()  # test keeps every class
    assert torch.equal(run.data.test.labels, full.test.labels)
    assert torch.equal(run.data.val.labels, full.val.labels)  # val as without the option


def test_stage2_removed_logit_gets_no_mass_and_no_gradient(pipeline, tiny_cifar_root, tmp_path):
    run = build_run(stage_cfgs(pipeline)["stage2"], tmp_path / "unused", tiny_cifar_root)
    method = run.method
    seen = []

    def keep_logits(module, inputs, output):  # returns None: output unchanged
        output.retain_grad()
        seen.append(output)

    handle = method.model.head.register_forward_hook(keep_logits)
    try:
        method.train_model.train()
        batch = next(iter(run.loader.epoch(0)))
        loss = method.compute_loss(batch)  # the real training path
        loss.backward()
    finally:
        handle.remove()
    logits = seen[-1]
    assert torch.all(logits.grad[:, 0] == 0)  # no gradient to the removed logit
    assert logits.grad[:, 1:].abs().sum() > 0
    # no probability mass: the loss is the 9-way CE over the other logits
    nine_way = F.cross_entropy(logits.detach().float()[:, 1:], batch.labels - 1)
    assert float(loss.detach()) == pytest.approx(float(nine_way), rel=1e-5)
    probs = torch.softmax(mask_logits(logits.detach().float(), method.masked), dim=1)
    assert torch.all(probs[:, 0] == 0)


def test_mask_logits_gradient_is_zero_for_any_loss():
    logits = torch.randn(6, 10, requires_grad=True)
    masked = torch.zeros(10, dtype=torch.bool)
    masked[[0, 3]] = True
    labels = torch.tensor([1, 2, 4, 5, 9, 8])
    F.cross_entropy(mask_logits(logits, masked), labels).backward()
    assert torch.all(logits.grad[:, [0, 3]] == 0) and torch.isfinite(logits.grad).all()


# ---------------------------------------------------------------------------------------------
# stage 3: balanced


def test_stage3_samplers_are_balanced(pipeline, tiny_cifar_root, tmp_path):
    cfgs = stage_cfgs(pipeline)
    run = build_run(cfgs["stage3a"], tmp_path / "a", tiny_cifar_root)
    assert isinstance(run.loader.sampler, UndersampleSampler)
    counts = run.data.class_counts
    for epoch in (0, 1):
        labels = torch.cat([b.labels for b in run.loader.epoch(epoch)]).numpy()
        hist = np.bincount(labels, minlength=10)
        assert (hist == min(counts)).all(), hist  # exactly balanced, all classes
    run = build_run(cfgs["stage3b"], tmp_path / "b", tiny_cifar_root)
    assert isinstance(run.loader.sampler, ClassBalancedSampler)
    labels = torch.cat([b.labels for b in run.loader.epoch(0)]).numpy()
    hist = np.bincount(labels, minlength=10)
    assert len(labels) == max(counts) * 10 and hist.max() - hist.min() <= 4


def test_undersample_sampler():
    counts = [500, 200, 80, 30, 10]
    labels = np.random.default_rng(0).permutation(np.repeat(np.arange(5), counts))
    s = build_sampler("undersample", labels, counts, seed=3)
    assert len(s) == 50
    orders = [s.global_order(e) for e in range(3)]
    for order in orders:
        assert np.array_equal(np.bincount(labels[order], minlength=5), [10] * 5)
        assert len(set(order.tolist())) == len(order)  # without replacement
    # re-drawn every epoch, a function of (seed, epoch) only (exact resume)
    assert not np.array_equal(np.sort(orders[0]), np.sort(orders[1]))
    assert np.array_equal(
        build_sampler("undersample", labels, counts, seed=3).global_order(2), orders[2]
    )
    np.testing.assert_allclose(s.class_distribution(), [0.2] * 5)
    # two ranks share each global batch
    single, r0, r1 = s.batches(0, 16), s.batches(0, 16, 0, 2), s.batches(0, 16, 1, 2)
    for g, a, b in zip(single, r0, r1):
        assert sorted(np.concatenate([a, b]).tolist()) == sorted(g.tolist())
    assert len(build_sampler("undersample", labels, counts, per_class=4)) == 20
    with pytest.raises(ConfigError, match="per_class"):
        build_sampler("undersample", labels, counts, per_class=11)
    with pytest.raises(ConfigError, match="bogus"):
        build_sampler("undersample", labels, counts, bogus=1)


# ---------------------------------------------------------------------------------------------
# resume


def test_resume_after_an_interrupted_stage2_skips_stage1(
    tiny_cifar_root, tmp_path, monkeypatch, capsys
):
    run_dir = tmp_path / "run"
    real_fit, calls = trainer.fit, []

    def crashing_fit(cfg, folder, data_root, resume=False, **kw):
        calls.append((Path(folder).name, resume))
        if Path(folder).name == "stage2":  # killed after its first epoch
            real_fit(cfg, folder, data_root, resume=resume, stop_after_epoch=1)
            raise KeyboardInterrupt
        return real_fit(cfg, folder, data_root, resume=resume, **kw)

    monkeypatch.setattr(trainer, "fit", crashing_fit)
    # train.epochs=6: stage 2 runs round(0.25 x 6) = 2 epochs, stages 3a / 3b one each
    argv = [THREE, C10, *TINY, "train.epochs=6", "schedule.milestones=[5]", "--out", run_dir]
    assert train(*argv, root=tiny_cifar_root) == 130
    assert calls == [("stage1", False), ("stage2", False)]
    assert (
        not (run_dir / "metrics.json").exists()
        and not (run_dir / "stage2" / "metrics.json").exists()
    )
    assert len((run_dir / "stage2" / "history.jsonl").read_text().splitlines()) == 1
    before = {
        p.name: (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
        for p in (run_dir / "stage1").iterdir()
    }
    first_epoch = (run_dir / "stage2" / "history.jsonl").read_text().splitlines()[0]

    calls.clear()
    monkeypatch.setattr(
        trainer,
        "fit",
        lambda cfg, folder, data_root, resume=False, **kw: (
            calls.append((Path(folder).name, resume)),
            real_fit(cfg, folder, data_root, resume, **kw),
        )[1],
    )
    assert main(["train", "--resume", str(run_dir), "--data-root", str(tiny_cifar_root)]) == 0
    assert calls == [("stage2", True), ("stage3a", False), ("stage3b", False)]
    after = {
        p.name: (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
        for p in (run_dir / "stage1").iterdir()
    }
    assert after == before  # stage 1 untouched
    history = (run_dir / "stage2" / "history.jsonl").read_text().splitlines()
    assert len(history) == 2 and history[0] == first_epoch  # resumed, not restarted
    final = read_json(run_dir / "metrics.json")
    assert final["final_stage"] == "stage3b" and len(final["per_class"]) == 10
    assert "skipped" in capsys.readouterr().out
    # a finished pipeline resumes to nothing
    calls.clear()
    assert main(["train", "--resume", str(run_dir), "--data-root", str(tiny_cifar_root)]) == 0
    assert calls == []


# ---------------------------------------------------------------------------------------------
# mistakes


def write_pipeline(folder: Path, stages, **top) -> Path:
    path = folder / "pipe.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "_base_": [
                    str(CONFIGS / "datasets" / "cifar10_lt.yaml"),
                    str(CONFIGS / "methods" / "ce.yaml"),
                ],
                **top,
                "stages": stages,
            },
            sort_keys=False,
        )
    )
    return path


def test_bad_stage_key_is_a_config_error_naming_it(tmp_path, tiny_cifar_root, capsys):
    path = write_pipeline(
        tmp_path, [{"name": "stage1"}, {"name": "stage2", "overide": {"optim.lr": 0.01}}]
    )
    with pytest.raises(ConfigError, match=r"unknown key 'stages\.1\.overide'"):
        load_config(path)
    assert train(path, "--out", tmp_path / "run", root=tiny_cifar_root) == 2
    assert "stages.1.overide" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_bad_override_key_names_the_stage_and_key(tmp_path, tiny_cifar_root, capsys):
    path = write_pipeline(
        tmp_path, [{"name": "stage1"}, {"name": "stage2", "overrides": {"optim.lrr": 0.01}}]
    )
    with pytest.raises(ConfigError, match=r"stage 'stage2'.*unknown key 'optim\.lrr'.*'optim\.lr'"):
        expand_stages(load_config(path), source=path)
    assert train(path, *TINY, "--out", tmp_path / "run", root=tiny_cifar_root) == 2
    err = capsys.readouterr().err
    assert "stage 'stage2'" in err and "optim.lrr" in err
    assert not (tmp_path / "run").exists()  # nothing trained, no folder


def test_failed_start_leaves_no_pipeline_folder(tmp_path, tiny_cifar_root, capsys):
    run_dir = tmp_path / "never"
    assert (
        train(THREE, C10, *TINY, "data.dataset=cifar11-lt", "--out", run_dir, root=tiny_cifar_root)
        == 2
    )
    assert not run_dir.exists() and "data.dataset" in capsys.readouterr().err


@pytest.mark.parametrize(
    "stages, match",
    [
        ([{"name": "a"}, {"name": "a"}], "Two stages are named 'a'"),
        (
            [{"name": "a"}, {"name": "b", "lr_scale": 0.1, "overrides": {"optim": {"lr": 0.2}}}],
            "both lr_scale",
        ),
        (
            [{"name": "a"}, {"name": "b", "overrides": {"data.imbalance_factor": 50}}],
            r"data\.imbalance_factor=50",
        ),
        ([{"name": "a"}, {"name": "b", "config": "missing.yaml"}], "missing.yaml' not found"),
        ([{"name": "a/b"}], "stages.0.name"),
        ([{"name": "a", "epochs_scale": -1}], "stages.0.epochs_scale"),
    ],
)
def test_stage_mistakes_are_config_errors(tmp_path, stages, match):
    path = write_pipeline(tmp_path, stages)
    with pytest.raises(ConfigError, match=match):
        expand_stages(load_config(path), source=path)


def test_exclude_classes_option():
    assert resolve_exclude_classes("largest", [5, 9, 9, 1]) == [1]
    assert resolve_exclude_classes([3, 0, 3], [5, 9, 9, 1]) == [0, 3]
    assert resolve_exclude_classes(None, [5, 9]) == []
    with pytest.raises(DataError, match="class 7"):
        resolve_exclude_classes([7], [5, 9])
    with pytest.raises(DataError, match="every training image"):
        resolve_exclude_classes([0, 1], [5, 9])
    with pytest.raises(ConfigError, match="data.exclude_classes"):
        load_config(None, ["data.exclude_classes=smallest"])


def test_residual_and_finetune_need_their_inputs(tiny_cifar_root, tmp_path):
    with pytest.raises(ConfigError, match="data.exclude_classes"):
        build_run(
            load_config(THREE, [C10, *TINY, "method.name=residual", "stage1=/nowhere"]),
            tmp_path / "a",
            tiny_cifar_root,
        )
    with pytest.raises(LongtailError, match="stage1"):
        build_run(
            load_config(THREE, [C10, *TINY, "method.name=finetune"]),
            tmp_path / "b",
            tiny_cifar_root,
        )


# ---------------------------------------------------------------------------------------------
# the bench harness


def test_bench_runs_a_pipeline_as_one_run(tiny_cifar_root, tmp_path):
    from longtail.bench.runner import BenchOptions, run_bench
    from longtail.bench.suite import load_suite, plan_suite

    pipe = write_pipeline(
        tmp_path,
        [
            {"name": "first"},
            {
                "name": "second",
                "lr_scale": 0.1,
                "epochs_scale": 0.5,
                "overrides": {"method.name": "finetune", "sampler.name": "undersample"},
            },
        ],
    )
    suite = tmp_path / "suite.yaml"
    suite.write_text(
        yaml.safe_dump(
            {"epochs": 2, "overrides": TINY, "runs": [{"name": "pipe", "config": str(pipe)}]}
        )
    )
    plan = plan_suite(load_suite(suite), tmp_path / "out")
    assert plan[0].error is None and [s.cfg.train.epochs for s in plan[0].stages] == [2, 1]
    messages = []
    assert (
        run_bench(
            BenchOptions(
                suite=str(suite),
                out=tmp_path / "out",
                data_root=str(tiny_cifar_root),
                results_dir=tmp_path / "results",
                docs=None,
            ),
            messages.append,
        )
        == 0
    )
    run_dir = tmp_path / "out" / "suite" / "pipe"
    assert (run_dir / "first" / "metrics.json").is_file() and (
        run_dir / "second" / "metrics.json"
    ).is_file()
    assert read_json(run_dir / "metrics.json")["final_stage"] == "second"
    rows = read_json(tmp_path / "results" / "suite.json")["rows"]
    assert rows[0]["status"] == "done" and rows[0]["epochs"] == 3
