"""Behavioural tests of the samplers: class shares, batch composition, DDP splits, resume."""

from __future__ import annotations

import numpy as np
import pytest

from longtail.core.errors import ConfigError
from longtail.data.samplers import SAMPLERS, build_sampler

COUNTS = [500, 200, 80, 30, 10]
N = sum(COUNTS)
C = len(COUNTS)
P_IB = np.array(COUNTS) / N
P_CB = np.full(C, 1.0 / C)
P_SQRT = np.sqrt(COUNTS) / np.sqrt(COUNTS).sum()
CHI2_999 = {4: 18.467, 29: 58.301}  # chi-square 99.9 % critical values (df -> value)
B = 64  # global batch used with b3rs


def make_labels(counts=COUNTS, seed=123):
    """Labels in a shuffled order, so that positions are not grouped by class."""
    labels = np.repeat(np.arange(len(counts)), counts)
    return np.random.default_rng(seed).permutation(labels)


LABELS = make_labels()

ALL = {
    "instance": {},
    "class_balanced": {},
    "square_root": {},
    "progressive": {"total_epochs": 10},
    "b3rs": {"batch_size": B},
}


def build(name, seed=0, labels=LABELS, counts=COUNTS, **params):
    return build_sampler(name, labels, counts, seed=seed, **{**ALL.get(name, {}), **params})


def hist(idx, labels=LABELS, c=C):
    return np.bincount(labels[np.asarray(idx, dtype=np.int64)], minlength=c)


def chi2(observed, p):
    observed = np.asarray(observed, dtype=np.float64)
    expected = observed.sum() * np.asarray(p, dtype=np.float64)
    return float(((observed - expected) ** 2 / expected).sum())


def pooled_hist(sampler_factory, epoch, n_seeds):
    """Class histogram of ``epoch`` pooled over independent seeds."""
    return sum(hist(sampler_factory(seed).global_order(epoch)) for seed in range(n_seeds))


# --------------------------------------------------------------------------- registry / options


def test_all_samplers_registered():
    assert set(ALL) <= set(SAMPLERS.names())


@pytest.mark.parametrize("name", sorted(ALL))
def test_unknown_option_names_config_key(name):
    with pytest.raises(ConfigError, match=r"sampler\.bogus_option"):
        build(name, bogus_option=1)


@pytest.mark.parametrize(
    "name, params, key",
    [
        ("class_balanced", {"epoch_length": "huge"}, "epoch_length"),
        ("class_balanced", {"epoch_length": 0}, "epoch_length"),
        ("class_balanced", {"num_samples_cls": 0}, "num_samples_cls"),
        ("square_root", {"q": -1.0}, "q"),
        ("progressive", {"total_epochs": None}, "total_epochs"),
        ("progressive", {"total_epochs": 0}, "total_epochs"),
        ("b3rs", {"batch_size": None}, "batch_size"),
        ("b3rs", {"batch_size": 3}, "batch_size"),  # fewer than the 4 blocks
        ("b3rs", {"num_blocks": 0}, "num_blocks"),
    ],
)
def test_bad_option_values_name_config_key(name, params, key):
    with pytest.raises(ConfigError, match=rf"sampler\.{key}"):
        build(name, **params)


def test_labels_outside_class_counts_rejected():
    with pytest.raises(ValueError, match="labels"):
        build_sampler("instance", [0, 1, 5], [1, 1, 1])


# --------------------------------------------------------------------------- instance


def test_instance_epoch_is_a_permutation_with_exact_counts():
    s = build("instance", seed=3)
    order = s.global_order(0)
    assert len(s) == N
    np.testing.assert_array_equal(np.sort(order), np.arange(N))
    np.testing.assert_array_equal(hist(order), COUNTS)
    assert not np.array_equal(order, np.arange(N))  # actually shuffled


# --------------------------------------------------------------------------- class_balanced


def test_class_balanced_epoch_length_options():
    assert len(build("class_balanced")) == max(COUNTS) * C == 2500
    assert len(build("class_balanced", epoch_length="max")) == 2500
    assert len(build("class_balanced", epoch_length="dataset")) == N
    assert len(build("class_balanced", epoch_length=1003)) == 1003
    assert len(build("class_balanced", epoch_length=1003).global_order(0)) == 1003


def test_class_balanced_max_epoch_is_exactly_balanced_and_cycles_items():
    s = build("class_balanced", seed=5)
    order = s.global_order(2)
    # n_max * C items = 125 full cycles over the shuffled class list, 4 items per visit
    np.testing.assert_array_equal(hist(order), [500] * C)
    # each class is read from a reshuffled cyclic iterator: item counts differ by at most one
    for c in range(C):
        items = order[LABELS[order] == c]
        per_item = np.bincount(items, minlength=N)[LABELS == c]
        assert per_item.min() >= 1
        assert per_item.max() - per_item.min() <= 1, (c, per_item.min(), per_item.max())


def test_class_balanced_runs_of_num_samples_cls_and_class_cycle():
    for k in (4, 3):
        s = build("class_balanced", seed=1, num_samples_cls=k, epoch_length=k * C * 20)
        cls = LABELS[s.global_order(0)].reshape(-1, k)
        # every visit is a run of k items of one class
        assert (cls == cls[:, :1]).all()
        # the visits walk a shuffled cyclic class list: every C consecutive visits = all classes
        visits = cls[:, 0].reshape(-1, C)
        assert (np.sort(visits, axis=1) == np.arange(C)).all()
        # ... reshuffled between cycles
        assert len({tuple(v) for v in visits}) > 1


def test_class_balanced_shares_uniform_over_many_epochs():
    s = build("class_balanced", epoch_length=1003)  # partial cycles at the epoch end
    per_epoch = [hist(s.global_order(e)) for e in range(30)]
    for h in per_epoch:  # one epoch is balanced up to one partial visit
        assert np.abs(h - 1003 / C).max() <= 4
    total = np.sum(per_epoch, axis=0)
    assert chi2(total, P_CB) < CHI2_999[4]
    assert np.abs(total / total.sum() - 0.2).max() < 0.002
    assert chi2(total, P_IB) > 1000  # the test discriminates against instance shares


def test_class_balanced_skips_empty_classes():
    counts = [48, 0, 20, 5]
    labels = make_labels(counts)
    s = build_sampler("class_balanced", labels, counts)
    assert len(s) == 48 * 3  # C counts the non-empty classes
    h = hist(s.global_order(0), labels, 4)
    assert h[1] == 0 and (h[[0, 2, 3]] == 48).all()


# --------------------------------------------------------------------------- square_root


def test_square_root_shares_follow_sqrt_counts():
    total = pooled_hist(lambda seed: build("square_root", seed=seed), epoch=0, n_seeds=25)
    assert total.sum() == 25 * N
    assert chi2(total, P_SQRT) < CHI2_999[4]
    assert chi2(total, P_IB) > 1000 and chi2(total, P_CB) > 1000
    np.testing.assert_allclose(build("square_root").class_distribution(0), P_SQRT)


def test_square_root_exponent_option_and_uniform_items():
    s = build("square_root", q=0.0)
    total = sum(hist(s.global_order(e)) for e in range(25))
    assert chi2(total, P_CB) < CHI2_999[4]
    # within class 3 (30 items) every item is equally likely
    s = build("square_root", seed=9)
    items = np.concatenate([s.global_order(e) for e in range(40)])
    per_item = np.bincount(items[LABELS[items] == 3], minlength=N)[LABELS == 3]
    assert chi2(per_item, np.full(30, 1 / 30)) < CHI2_999[29]


# --------------------------------------------------------------------------- progressive


def test_progressive_interpolates_from_instance_to_balanced():
    T = 10
    factory = lambda seed: build("progressive", seed=seed, total_epochs=T)  # noqa: E731
    start = pooled_hist(factory, epoch=0, n_seeds=20)
    end = pooled_hist(factory, epoch=T, n_seeds=20)
    mid = pooled_hist(factory, epoch=T // 2, n_seeds=20)
    p_mid = (P_IB + P_CB) / 2
    assert chi2(start, P_IB) < CHI2_999[4]
    assert chi2(end, P_CB) < CHI2_999[4]
    assert chi2(mid, p_mid) < CHI2_999[4]
    assert chi2(mid, P_IB) > 200 and chi2(mid, P_CB) > 200
    s = factory(0)
    np.testing.assert_allclose(s.class_distribution(0), P_IB)
    np.testing.assert_allclose(s.class_distribution(3), 0.7 * P_IB + 0.3 * P_CB)
    np.testing.assert_allclose(s.class_distribution(T), P_CB)
    np.testing.assert_allclose(s.class_distribution(3 * T), P_CB)  # clipped after T
    assert len(s) == N


# --------------------------------------------------------------------------- b3rs


def test_b3rs_blocks_are_contiguous_in_count_order_and_roughly_equal():
    s = build("b3rs")
    assert [b.tolist() for b in s.blocks] == [[0], [1], [2], [3, 4]]
    np.testing.assert_array_equal(s.block_counts, [500, 200, 80, 40])
    # CIFAR-100-LT (IF 100) profile, classes given in a scrambled order
    counts = np.array([int(500 * 0.01 ** (c / 99)) for c in range(100)])
    counts = counts[np.random.default_rng(0).permutation(100)]
    labels = make_labels(counts)
    s = build_sampler("b3rs", labels, counts, batch_size=128)
    assert s.num_blocks == 4 and all(len(b) >= 1 for b in s.blocks)
    assert sorted(np.concatenate(s.blocks).tolist()) == list(range(100))
    for hi, lo in zip(s.blocks, s.blocks[1:]):  # contiguous in descending-count order
        assert counts[hi].min() >= counts[lo].max()
    assert s.block_counts.sum() == counts.sum() == 10847
    assert s.block_counts.max() / s.block_counts.min() < 1.1
    assert np.abs(s.block_counts - counts.sum() / 4).max() < 0.05 * counts.sum() / 4


def test_b3rs_quotas_follow_sqrt_block_sizes():
    s = build("b3rs")
    raw = B * np.sqrt(s.block_counts) / np.sqrt(s.block_counts).sum()  # 27.6 17.5 11.0 7.8
    np.testing.assert_array_equal(s.quotas, [28, 17, 11, 8])  # largest remainder
    assert s.quotas.sum() == B and np.abs(s.quotas - raw).max() < 1
    # q = 1 follows block sizes, q = 0 is block-balanced
    np.testing.assert_array_equal(build("b3rs", q=0.0).quotas, [16, 16, 16, 16])
    np.testing.assert_array_equal(build("b3rs", q=1.0).quotas, [39, 16, 6, 3])


def test_b3rs_every_quota_at_least_one():
    counts = [10000, 1, 1, 1]
    s = build_sampler("b3rs", make_labels(counts), counts, batch_size=4)
    np.testing.assert_array_equal(s.quotas, [1, 1, 1, 1])
    s = build_sampler("b3rs", make_labels(counts), counts, batch_size=8)
    assert s.quotas.sum() == 8 and s.quotas.min() >= 1


def test_b3rs_every_batch_has_exact_quotas_and_whole_batches():
    s = build("b3rs", seed=2)
    assert len(s) == 13 * B == 832  # round(820 / 64) = 13 batches
    assert s.num_batches(B) == s.num_batches(B, drop_last=True) == 13
    order = s.global_order(0)
    assert len(order) == 832
    blocks = s.block_of_class[LABELS[order]].reshape(13, B)
    for row in blocks:
        np.testing.assert_array_equal(np.bincount(row, minlength=4), [28, 17, 11, 8])
    # blocks are interleaved: the first and the second half of each batch hold every block
    for half in (blocks[:, : B // 2], blocks[:, B // 2 :]):
        assert all(len(np.unique(h)) == 4 for h in half)
    # uniform inside a block: items of block 3 (classes 3, 4) all seen, counts differ by <= 1
    items = order[s.block_of_class[LABELS[order]] == 3]
    per_item = np.bincount(items, minlength=N)[np.isin(LABELS, [3, 4])]
    assert per_item.min() >= 1 and per_item.max() - per_item.min() <= 1
    h = hist(order)
    np.testing.assert_allclose(h / h.sum(), s.class_distribution(0), atol=0.01)


def test_b3rs_rejects_other_batch_sizes():
    s = build("b3rs")
    with pytest.raises(ValueError, match="batch size"):
        s.batches(0, 32)
    with pytest.raises(ValueError, match="batch size"):
        s.num_batches(128)


@pytest.mark.parametrize("world_size", [2, 4])
def test_b3rs_every_rank_batch_holds_every_block(world_size):
    s = build("b3rs", seed=4)
    per_rank = [s.batches(1, B, rank=r, world_size=world_size) for r in range(world_size)]
    totals = np.zeros((world_size, 4), dtype=np.int64)
    for r in range(world_size):
        for batch in per_rank[r]:
            assert len(batch) == B // world_size
            cnt = np.bincount(s.block_of_class[LABELS[batch]], minlength=4)
            assert (cnt >= s.quotas // world_size).all()
            assert (cnt <= -(-s.quotas // world_size)).all()
            totals[r] += cnt
    # the extra items rotate over ranks: per-block epoch totals differ by at most one
    assert (totals.max(axis=0) - totals.min(axis=0) <= 1).all()


def test_b3rs_warns_when_a_block_cannot_reach_every_rank():
    s = build("b3rs")
    with pytest.warns(RuntimeWarning, match="ranks"):
        s.batches(0, B, rank=0, world_size=16)


# --------------------------------------------------------------------------- DDP, all samplers


@pytest.mark.parametrize("name", sorted(ALL))
def test_two_ranks_partition_the_single_process_batches(name):
    s = build(name, seed=7)
    single = s.batches(0, B)
    r0, r1 = s.batches(0, B, rank=0, world_size=2), s.batches(0, B, rank=1, world_size=2)
    order = s.global_order(0)
    assert len(single) == len(r0) == len(r1) == s.num_batches(B)
    np.testing.assert_array_equal(np.concatenate(single), order[: sum(map(len, single))])
    for g, a, b in zip(single, r0, r1):
        assert abs(len(a) - len(b)) <= 1 and len(a) + len(b) == len(g)
        # union equals the single-process batch, and the two shares are disjoint (as a multiset)
        np.testing.assert_array_equal(
            np.bincount(a, minlength=N) + np.bincount(b, minlength=N), np.bincount(g, minlength=N)
        )
    if name == "instance":  # no repeats inside an epoch: plain set disjointness too
        assert not set(np.concatenate(r0)) & set(np.concatenate(r1))
        assert len(np.concatenate(r0 + r1)) == N


@pytest.mark.parametrize("name", sorted(ALL))
def test_rank_class_proportions_match_single_process(name):
    s = build(name, seed=11)
    epochs = range(4)
    single = sum(hist(np.concatenate(s.batches(e, B))) for e in epochs)
    p_single = single / single.sum()
    for rank in (0, 1):
        h = sum(hist(np.concatenate(s.batches(e, B, rank=rank, world_size=2))) for e in epochs)
        assert abs(h.sum() - single.sum() / 2) <= len(epochs)
        np.testing.assert_allclose(h / h.sum(), p_single, atol=0.02)


def test_batches_validates_rank_and_divisibility():
    s = build("instance")
    with pytest.raises(ValueError, match="divisible"):
        s.batches(0, 63, rank=0, world_size=2)
    with pytest.raises(ValueError, match="rank"):
        s.batches(0, 64, rank=2, world_size=2)


# --------------------------------------------------------------------------- reproducibility


@pytest.mark.parametrize("name", sorted(ALL))
def test_order_depends_only_on_seed_and_epoch(name):
    a, b = build(name, seed=5), build(name, seed=5)
    b.global_order(7)  # history must not matter (exact resume)
    np.testing.assert_array_equal(a.global_order(3), b.global_order(3))
    np.testing.assert_array_equal(a.global_order(3), a.global_order(3))
    assert not np.array_equal(a.global_order(3), a.global_order(4))
    assert not np.array_equal(a.global_order(3), build(name, seed=6).global_order(3))
    for rank in (0, 1):
        for x, y in zip(a.batches(2, B, rank, 2), b.batches(2, B, rank, 2)):
            np.testing.assert_array_equal(x, y)
    assert len(a.global_order(0)) == len(a)
    assert a.global_order(0).dtype == np.int64


def test_progressive_reference_schedule_is_balanced_in_the_last_epoch():
    """The paper's t / T reaches class balance only at t = T; the decoupling code interpolates
    over linspace(0, 1, T), balanced in the last epoch t = T - 1."""
    counts = [40, 10, 5, 2]
    labels = make_labels(counts)
    paper = build_sampler("progressive", labels, counts, total_epochs=5)
    reference = build_sampler("progressive", labels, counts, total_epochs=5, progress="reference")
    ib = np.array(counts) / sum(counts)
    for epoch, a_paper, a_ref in [(0, 0.0, 0.0), (2, 0.4, 0.5), (4, 0.8, 1.0)]:
        np.testing.assert_allclose(paper.probabilities(epoch), (1 - a_paper) * ib + a_paper / 4)
        np.testing.assert_allclose(reference.probabilities(epoch), (1 - a_ref) * ib + a_ref / 4)
    with pytest.raises(ConfigError, match="progress"):
        build_sampler("progressive", labels, counts, total_epochs=5, progress="linear")
