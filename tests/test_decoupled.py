"""Decoupled and post-hoc methods on a tiny real-format CIFAR-10 (stage 1: a few CE epochs of
ResNet-8): cRT / LWS keep the stage-1 backbone bit-identical, tau-norm and post-hoc logit
adjustment pick tau on val (never test), NCM predicts the nearest class mean, `longtail eval`
reproduces every method's metrics.json, and stage-1 mistakes are clear LongtailErrors."""

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from longtail.core.config import load_config
from longtail.core.errors import ConfigError, LongtailError
from longtail.data.samplers import ClassBalancedSampler
from longtail.engine.evaluate_run import evaluate_run
from longtail.engine.trainer import build_run, fit
from longtail.methods import METHODS
from longtail.methods.decoupled import tau_normalize
from longtail.models.heads import NCMHead

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TINY = [
    "model.backbone=resnet8",
    "data.imbalance_factor=10",
    "data.val_per_class=3",
    "train.batch_size=32",
    "train.eval_batch_size=64",
    "train.progress=false",
]
STAGE2 = ("crt", "lws", "tau_norm", "ncm", "la_posthoc")
COMPARED = (
    "top1",
    "many",
    "medium",
    "few",
    "mean_class_acc",
    "per_class",
    "ece",
    "nll",
    "confusion",
)


def cfg(name, *extra, dataset="cifar10_lt"):
    return load_config(CONFIGS / "methods" / f"{name}.yaml", [f"data={dataset}", *TINY, *extra])


def stage1_cfg(*extra):
    return cfg(
        "ce", "train.epochs=3", "schedule.warmup_epochs=1", "schedule.milestones=[2]", *extra
    )


def metrics_of(run_dir):
    return json.loads((Path(run_dir) / "metrics.json").read_text())


def weights_of(run_dir):
    return load_file(str(Path(run_dir) / "model.safetensors"))


def assert_eval_reproduces(run_dir, root, extra_keys=()):
    saved, again = metrics_of(run_dir), evaluate_run(Path(run_dir), root)
    for key in (*COMPARED, *extra_keys):
        assert again[key] == saved[key], key
    for key in COMPARED:
        assert again["val"][key] == saved["val"][key], f"val.{key}"


def assert_same_features(run_dir, stage1_dir):
    a, b = weights_of(stage1_dir), weights_of(run_dir)
    body = [k for k in a if not k.startswith("head.")]
    assert body and all(k in b for k in body)
    for key in body:  # weights and BN statistics, bit for bit
        assert torch.equal(a[key], b[key]), key


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return tmp_path_factory.mktemp("decoupled")


@pytest.fixture(scope="module")
def stage1(tiny_cifar_root, runs):
    run_dir = runs / "ce"
    fit(stage1_cfg(), run_dir, tiny_cifar_root)
    return run_dir


@pytest.fixture(scope="module")
def stage1_nobias(tiny_cifar_root, runs):
    run_dir = runs / "ce-nobias"
    fit(stage1_cfg("model.head_params={bias: false}"), run_dir, tiny_cifar_root)
    return run_dir


# ---------------------------------------------------------------------------------------------
# configs


@pytest.mark.parametrize("dataset", ["cifar10_lt", "cifar100_lt", "fashion_mnist_lt"])
@pytest.mark.parametrize("name", STAGE2)
def test_configs_load_and_name_registered_methods(dataset, name):
    c = load_config(CONFIGS / "methods" / f"{name}.yaml", [f"data={dataset}"])
    base = load_config(CONFIGS / "methods" / "ce.yaml", [f"data={dataset}"])
    assert c.data == base.data
    assert c.method.name in METHODS
    METHODS.check_kwargs(c.method.name, c.method.params())
    if name in ("crt", "lws"):
        assert c.sampler.name == "class_balanced" and c.sampler.params() == {"num_samples_cls": 4}
        assert c.train.epochs == (10 if name == "crt" else 5) and c.schedule.name == "cosine"
    else:
        assert c.train.epochs == 0
    assert c.model.head == {"lws": "lws", "ncm": "ncm"}.get(name, "linear")
    # the IF 50 / 10 variants are overrides
    assert (
        load_config(
            CONFIGS / "methods" / f"{name}.yaml", [f"data={dataset}", "data.imbalance_factor=50"]
        ).data.imbalance_factor
        == 50
    )


# ---------------------------------------------------------------------------------------------
# cRT and LWS


def test_crt_sampler_is_class_balanced(stage1, tiny_cifar_root, runs):
    run = build_run(cfg("crt", f"stage1={stage1}"), runs / "unused", tiny_cifar_root)
    assert isinstance(run.loader.sampler, ClassBalancedSampler)
    labels = torch.cat([b.labels for b in run.loader.epoch(0)]).numpy()
    hist = np.bincount(labels, minlength=10)
    counts = run.data.class_counts
    assert len(labels) == max(counts) * len(counts)  # n_max * C items an epoch
    assert hist.max() - hist.min() <= 4  # one class visit (4 items) apart
    assert max(counts) / min(counts) == pytest.approx(10, rel=0.1)  # vs. 10x under instance


def test_crt_trains_only_a_fresh_head(stage1, tiny_cifar_root, runs):
    run_dir = runs / "crt"
    fit(cfg("crt", f"stage1={stage1}", "train.epochs=2"), run_dir, tiny_cifar_root)
    assert_same_features(run_dir, stage1)
    a, b = weights_of(stage1), weights_of(run_dir)
    assert not torch.equal(a["head.weight"], b["head.weight"])
    assert not torch.equal(a["head.bias"], b["head.bias"])
    assert_eval_reproduces(run_dir, tiny_cifar_root)


def test_crt_step_runs_the_backbone_without_autograd(stage1, tiny_cifar_root, runs):
    run = build_run(cfg("crt", f"stage1={stage1}"), runs / "unused", tiny_cifar_root)
    method = run.method
    assert [id(p) for p in method.optim.param_groups[0]["params"]] == [
        id(p) for p in method.model.head.parameters()
    ]
    seen = []
    conv = next(m for m in method.model.backbone.modules() if isinstance(m, torch.nn.Conv2d))
    hook = conv.register_forward_hook(
        lambda mod, inp, out: seen.append((torch.is_grad_enabled(), out.requires_grad))
    )
    method.train_model.train()
    method.on_epoch_start(0)
    method.train_step(next(iter(run.loader.epoch(0))))
    hook.remove()
    assert seen == [(False, False)]
    assert not method.model.backbone.training and not method.model.neck.training


def test_lws_learns_only_the_scales(stage1, tiny_cifar_root, runs):
    run_dir = runs / "lws"
    fit(cfg("lws", f"stage1={stage1}", "train.epochs=2"), run_dir, tiny_cifar_root)
    assert_same_features(run_dir, stage1)
    a, b = weights_of(stage1), weights_of(run_dir)
    assert torch.equal(a["head.weight"], b["head.weight"])
    assert torch.equal(a["head.bias"], b["head.bias"])
    assert set(b) - set(a) == {"head.scales"}
    assert not torch.equal(b["head.scales"], torch.ones(10))
    assert metrics_of(run_dir)["lws_scales"] == pytest.approx(b["head.scales"].tolist())
    assert_eval_reproduces(run_dir, tiny_cifar_root, ("lws_scales",))


def test_lws_needs_the_lws_head(stage1, tiny_cifar_root, runs):
    with pytest.raises(ConfigError, match="model.head=lws"):
        build_run(
            cfg("lws", f"stage1={stage1}", "model.head=linear"), runs / "unused", tiny_cifar_root
        )


# ---------------------------------------------------------------------------------------------
# tau-normalisation


def test_tau_norm_with_tau_0_is_stage1(stage1_nobias, tiny_cifar_root, runs):
    run_dir = runs / "tau0"
    fit(
        cfg(
            "tau_norm", f"stage1={stage1_nobias}", "model.head_params={bias: false}", "method.tau=0"
        ),
        run_dir,
        tiny_cifar_root,
    )
    a, b = metrics_of(stage1_nobias), metrics_of(run_dir)
    assert b["tau"] == 0.0 and b["tau_source"] == "method.tau"
    for key in COMPARED:
        assert a[key] == b[key], key
        assert a["val"][key] == b["val"][key], key
    assert torch.equal(weights_of(stage1_nobias)["head.weight"], weights_of(run_dir)["head.weight"])


def test_tau_norm_picks_the_best_tau_on_val(stage1, tiny_cifar_root, runs):
    run_dir = runs / "tau_norm"
    fit(cfg("tau_norm", f"stage1={stage1}"), run_dir, tiny_cifar_root)
    m = metrics_of(run_dir)
    table = m["tau_table"]
    assert [r["tau"] for r in table] == pytest.approx([i / 10 for i in range(21)])
    best = max(r["val_top1"] for r in table)
    first_best = next(r["tau"] for r in table if r["val_top1"] == best)
    assert m["tau"] == first_best and m["tau_source"] == "val"
    assert m["val"]["top1"] == pytest.approx(best)  # the final val eval = the table
    w1, w = weights_of(stage1)["head.weight"], weights_of(run_dir)
    assert torch.allclose(w["head.weight"], w1 / w1.norm(dim=1, keepdim=True) ** m["tau"])
    assert torch.equal(w["head.bias"], torch.zeros(10))  # bias dropped
    assert_eval_reproduces(run_dir, tiny_cifar_root, ("tau", "tau_table"))
    # resuming the finished run normalises the stage-1 weights again, not the saved ones
    again = fit(cfg("tau_norm", f"stage1={stage1}"), run_dir, tiny_cifar_root, resume=True)
    assert again["top1"] == m["top1"] and again["tau"] == m["tau"]
    assert torch.equal(weights_of(run_dir)["head.weight"], w["head.weight"])


def test_tau_normalize_rows():
    w = torch.tensor([[3.0, 4.0], [0.0, 2.0]])
    assert torch.equal(tau_normalize(w, 0.0), w)
    assert torch.allclose(tau_normalize(w, 1.0).norm(dim=1), torch.ones(2))
    assert torch.allclose(tau_normalize(w, 0.5), w / torch.tensor([[5.0], [2.0]]).sqrt())


# ---------------------------------------------------------------------------------------------
# NCM


def test_ncm_head_predicts_the_nearest_class_mean():
    head = NCMHead(3, 4)
    means = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [1.0, 1.0, 0]])
    head.means.copy_(means * torch.tensor([[5.0], [0.1], [2.0], [3.0]]))  # norms do not matter
    feats = torch.tensor(
        [[2.0, 0.1, 0], [0.1, 3.0, 0.2], [0, 0.1, -0.1], [1.0, 0.9, 0.1], [-1.0, 0, 0.5]]
    )
    logits = head(feats)
    cos = F.normalize(feats, dim=1) @ F.normalize(means, dim=1).T
    assert torch.allclose(logits, cos)
    assert logits.argmax(1).tolist() == [0, 1, 1, 3, 2]
    assert logits.abs().max() <= 1 + 1e-6


def test_ncm_means_and_eval(stage1, tiny_cifar_root, runs):
    run_dir = runs / "ncm"
    fit(cfg("ncm", f"stage1={stage1}"), run_dir, tiny_cifar_root)
    assert_same_features(run_dir, stage1)
    means = weights_of(run_dir)["head.means"]
    # independent recomputation: stage-1 features of the un-augmented training images
    run = build_run(stage1_cfg(), runs / "unused", tiny_cifar_root)
    model = run.method.model
    model.load_state_dict(weights_of(stage1))
    model.eval()
    d = run.data
    x = (d.train.images.float() / 255 - torch.tensor(d.mean).view(1, -1, 1, 1)) / torch.tensor(
        d.std
    ).view(1, -1, 1, 1)
    with torch.no_grad():
        f = F.normalize(model(x).features, dim=1)
    expected = torch.stack([f[d.train.labels == c].mean(0) for c in range(10)])
    assert torch.allclose(means, expected, atol=1e-5)
    # predictions: the class whose mean is nearest (cosine) to the test features
    with torch.no_grad():
        xt = (d.test.images.float() / 255 - torch.tensor(d.mean).view(1, -1, 1, 1)) / torch.tensor(
            d.std
        ).view(1, -1, 1, 1)
        ft = F.normalize(model(xt).features, dim=1)
    pred = (ft @ F.normalize(expected, dim=1).T).argmax(1)
    top1 = 100.0 * float((pred == d.test.labels).sum()) / len(pred)
    assert metrics_of(run_dir)["top1"] == pytest.approx(top1)
    assert_eval_reproduces(run_dir, tiny_cifar_root)


def test_ncm_needs_the_ncm_head(stage1, tiny_cifar_root, runs):
    with pytest.raises(ConfigError, match="model.head=ncm"):
        build_run(
            cfg("ncm", f"stage1={stage1}", "model.head=linear"), runs / "unused", tiny_cifar_root
        )


# ---------------------------------------------------------------------------------------------
# post-hoc logit adjustment


def test_posthoc_la_with_tau_0_is_stage1(stage1, tiny_cifar_root, runs):
    run_dir = runs / "la0"
    fit(cfg("la_posthoc", f"stage1={stage1}", "method.tau=0"), run_dir, tiny_cifar_root)
    a, b = metrics_of(stage1), metrics_of(run_dir)
    assert b["tau"] == 0.0
    for key in COMPARED:
        assert a[key] == b[key], key
        assert a["val"][key] == b["val"][key], key
    assert_eval_reproduces(run_dir, tiny_cifar_root, ("tau",))


def test_posthoc_la_tuned_tau_fixes_a_biased_stage1(stage1, tiny_cifar_root, runs):
    # stage 1 made biased: logits z / 10 + 2 log(prior) (tau = 2 gives back stage 1's argmax)
    biased = runs / "ce-biased"
    shutil.copytree(stage1, biased)
    w = weights_of(stage1)
    counts = torch.tensor(metrics_of(stage1)["class_counts"], dtype=torch.float32)
    w["head.weight"] = w["head.weight"] / 10
    w["head.bias"] = w["head.bias"] / 10 + 2 * torch.log(counts / counts.sum())
    save_file(w, str(biased / "model.safetensors"))
    before = evaluate_run(biased, tiny_cifar_root)["val"]["mean_class_acc"]

    run_dir = runs / "la"
    fit(cfg("la_posthoc", f"stage1={biased}"), run_dir, tiny_cifar_root)
    m = metrics_of(run_dir)
    assert m["tau"] > 0 and m["tau"] == m["tau_tuned"] and m["tau_source"] == "val"
    best = max(r["val_top1"] for r in m["tau_table"])
    assert m["tau"] == next(r["tau"] for r in m["tau_table"] if r["val_top1"] == best)
    assert m["val"]["top1"] == pytest.approx(best)
    assert m["val"]["mean_class_acc"] > before
    assert m["tau_table"][0]["val_top1"] < best  # tau = 0 (the biased model) loses
    assert (
        set(m["posthoc_tau1"]) == {"test", "val"}
        and m["posthoc_tuned"]["test"]["top1"] == m["top1"]
    )
    assert_eval_reproduces(run_dir, tiny_cifar_root, ("tau", "tau_table", "posthoc_tau1"))


# ---------------------------------------------------------------------------------------------
# stage-1 errors


def test_missing_stage1_is_a_clear_error(tiny_cifar_root, runs, tmp_path):
    for name in STAGE2:
        with pytest.raises(LongtailError, match="`stage1`") as err:
            fit(cfg(name), tmp_path / name, tiny_cifar_root)
        assert "ce.yaml" in str(err.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(LongtailError, match="stage1=.*(no config.yaml)"):
        fit(cfg("crt", f"stage1={tmp_path / 'empty'}"), tmp_path / "x", tiny_cifar_root)
    (tmp_path / "empty" / "config.yaml").write_text("{}")
    with pytest.raises(LongtailError, match="stage1=.*model.safetensors"):
        fit(cfg("crt", f"stage1={tmp_path / 'empty'}"), tmp_path / "y", tiny_cifar_root)


def test_stage1_on_other_data_is_refused(stage1, tiny_cifar_root, runs):
    with pytest.raises(LongtailError, match="data.imbalance_factor: stage 1 10.0, this run 20.0"):
        build_run(
            cfg("crt", f"stage1={stage1}", "data.imbalance_factor=20"),
            runs / "unused",
            tiny_cifar_root,
        )
    with pytest.raises(LongtailError, match="data.subset_seed"):
        build_run(
            cfg("tau_norm", f"stage1={stage1}", "data.subset_seed=3"),
            runs / "unused",
            tiny_cifar_root,
        )


def test_stage1_with_another_model_is_refused(stage1, tiny_cifar_root, runs):
    with pytest.raises(
        LongtailError, match="model.backbone: stage 1 'resnet8', this run 'resnet20'"
    ):
        build_run(
            cfg("crt", f"stage1={stage1}", "model.backbone=resnet20"),
            runs / "unused",
            tiny_cifar_root,
        )


def test_training_free_methods_refuse_epochs(stage1, tiny_cifar_root, runs):
    for name in ("tau_norm", "ncm", "la_posthoc"):
        with pytest.raises(ConfigError, match="train.epochs=0"):
            build_run(
                cfg(name, f"stage1={stage1}", "train.epochs=2"), runs / "unused", tiny_cifar_root
            )


# ---------------------------------------------------------------------------------------------
# real data


@pytest.mark.realdata
@pytest.mark.slow
def test_crt_lifts_tail_accuracy_on_real_cifar10_lt(real_data_root, tmp_path):
    """ResNet-8 CE for 1 epoch on the real CIFAR-10-LT IF100, then 1 cRT epoch (N class-balanced
    images): the re-trained classifier raises the val mean-class and the medium-shot accuracy."""
    start = time.perf_counter()
    common = [
        "model.backbone=resnet8",
        "train.progress=false",
        "data.max_test_per_class=300",
        "data.val_per_class=100",
    ]
    s1 = tmp_path / "ce"
    a = fit(
        load_config(
            CONFIGS / "methods" / "ce.yaml",
            [
                "data=cifar10_lt",
                *common,
                "train.epochs=1",
                "schedule.warmup_epochs=0",
                "train.eval_every=0",
            ],
        ),
        s1,
        real_data_root,
    )
    b = fit(
        load_config(
            CONFIGS / "methods" / "crt.yaml",
            [
                "data=cifar10_lt",
                *common,
                f"stage1={s1}",
                "train.epochs=1",
                "sampler.epoch_length=dataset",
            ],
        ),
        tmp_path / "crt",
        real_data_root,
    )
    assert_same_features(tmp_path / "crt", s1)
    assert b["val"]["mean_class_acc"] > a["val"]["mean_class_acc"] + 5
    assert b["medium"] > a["medium"]
    assert time.perf_counter() - start < 180


def test_ncm_reference_variant_centres_and_uses_euclidean_distance(stage1, tiny_cifar_root, runs):
    """The decoupling code's KNNClassifier default (cl2n + l2): x = (f - mu) / |f - mu|, class
    means of x unnormalised, z_c = -|x - m_c|^2 (head options metric=euclidean, center=true)."""
    run_dir = runs / "ncm-reference"
    fit(
        cfg("ncm", f"stage1={stage1}", "model.head_params={metric: euclidean, center: true}"),
        run_dir,
        tiny_cifar_root,
    )
    saved = weights_of(run_dir)
    run = build_run(stage1_cfg(), runs / "unused", tiny_cifar_root)
    model = run.method.model
    model.load_state_dict(weights_of(stage1))
    model.eval()
    d = run.data

    def features(images):
        x = (images.float() / 255 - torch.tensor(d.mean).view(1, -1, 1, 1)) / torch.tensor(
            d.std
        ).view(1, -1, 1, 1)
        with torch.no_grad():
            return model(x).features.double()

    f = features(d.train.images)
    mu = f.mean(0)
    x = F.normalize(f - mu, dim=1)
    means = torch.stack([x[d.train.labels == c].mean(0) for c in range(10)])
    assert torch.allclose(saved["head.feature_mean"].double(), mu, atol=1e-5)
    assert torch.allclose(saved["head.means"].double(), means, atol=1e-5)
    xt = F.normalize(features(d.test.images) - mu, dim=1)
    pred = torch.cdist(xt, means).argmin(1)
    top1 = 100.0 * float((pred == d.test.labels).sum()) / len(pred)
    assert metrics_of(run_dir)["top1"] == pytest.approx(top1)
    assert_eval_reproduces(run_dir, tiny_cifar_root)
