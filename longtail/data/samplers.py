"""Batch samplers for long-tailed training; every sampler is rank-aware through one code path.

A sampler produces the *global* index order of an epoch from ``(seed, epoch)``; ``batches``
cuts it into global batches and gives each rank its share, so DDP and single-process runs see
the same samples and the same class proportions. Nothing is carried from one epoch to the next,
so resuming at epoch ``e`` reproduces the uninterrupted run exactly.

Every sampler is a ``torch.utils.data.Sampler`` too: ``DataLoader(dataset, sampler=s,
batch_size=B)`` iterates one epoch's global order per pass (epochs 0, 1, 2, ... in turn;
``s.set_epoch(e)`` fixes the epoch of the next pass, as ``DistributedSampler.set_epoch``).

Registered samplers (``sampler.name`` in a config, their options as keys of ``sampler``):

========================  ============================================================  ============
name                      class distribution of an epoch                                 items/epoch
========================  ============================================================  ============
``instance``              n_c / N (a permutation of the training set)                   N
``class_balanced``        1 / C (class-aware sampling, runs of ``num_samples_cls``)      n_max * C
``square_root``           n_c^q / sum_j n_j^q, q = 0.5                                   N
``progressive``           (1 - t/T) n_c / N + (t/T) / C                                 N
``b3rs``                  per batch: B_k = B N_k^q / sum_j N_j^q items of block k        ~N (whole batches)
``undersample``           1 / C: m = min_c n_c distinct items a class, re-drawn per epoch  m * C
========================  ============================================================  ============
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Annotated, Dict, Iterator, List, Literal, Optional, Sequence, Type, Union, cast

import numpy as np
from pydantic import Field
from torch.utils.data import Sampler

from longtail.core.errors import ConfigError
from longtail.core.facts import RunFacts
from longtail.core.registry import Registry

SAMPLERS = Registry("sampler")

_KEY = "sampler."

# option types with their ranges (the config check validates ``sampler.*`` against them)
PositiveInt = Annotated[int, Field(ge=1)]
NonNegative = Annotated[float, Field(ge=0.0, allow_inf_nan=False)]


def epoch_rng(seed: int, epoch: int, stream: int = 0) -> np.random.Generator:
    """An independent numpy generator for (seed, epoch, stream): reproducible and resumable."""
    return np.random.default_rng(
        np.random.SeedSequence([int(seed), int(epoch), int(stream), 0x5A3])
    )


def _cyclic_stream(rng: np.random.Generator, items: np.ndarray, length: int) -> np.ndarray:
    """``length`` items from a shuffled cyclic iterator over ``items``, reshuffled when exhausted.

    This is ``RandomCycleIter`` of classifier-balancing's ``ClassAwareSampler``, vectorised: the
    stream is the concatenation of independent random permutations of ``items``, so over any
    ``k * len(items)`` consecutive draws every item appears exactly ``k`` times.
    """
    n = len(items)
    if length <= 0:
        return np.empty(0, dtype=np.int64)
    reps = -(-length // n)
    perms = np.argsort(rng.random((reps, n)), axis=1, kind="stable")
    return np.asarray(items, dtype=np.int64)[perms.ravel()[:length]]


def _largest_remainder(weights: np.ndarray, total: int) -> np.ndarray:
    """Integers proportional to ``weights`` summing to ``total`` (Hamilton / largest remainder).

    Ties in the fractional part go to the lower index, so the result is deterministic.
    """
    w = np.asarray(weights, dtype=np.float64)
    raw = total * w / w.sum()
    out = np.floor(raw).astype(np.int64)
    left = int(total - out.sum())
    if left > 0:
        frac = raw - out
        order = np.lexsort((np.arange(len(w)), -frac))  # largest fraction first, then index
        out[order[:left]] += 1
    return out


def _require_int(value, key: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ConfigError(f"'{_KEY}{key}' must be an integer >= {minimum}, got {value!r}.")
    return int(value)


def _require_float(value, key: str, minimum: float = 0.0) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float, np.integer, np.floating))
        or not math.isfinite(float(value))
        or float(value) < minimum
    ):
        raise ConfigError(f"'{_KEY}{key}' must be a finite number >= {minimum}, got {value!r}.")
    return float(value)


class BaseSampler(Sampler[int]):
    """Base class. Subclasses implement :meth:`global_order`.

    A ``torch.utils.data.Sampler`` of dataset positions: each ``iter()`` yields the global order
    of the next epoch (0 first; :meth:`set_epoch` chooses it), ``len()`` is the items per epoch.

    Args:
        labels: int array [N], the class of every training item (positions 0..N-1).
        class_counts: training images per class, length C.
        seed: base seed; each epoch's order depends only on (seed, epoch).

    Subclasses may override :meth:`_split_global_batch` to change how one global batch is
    shared between ranks (the default gives rank r the r-th contiguous slice).
    """

    def __init__(self, labels: Sequence[int], class_counts: Sequence[int], seed: int = 0):
        self.labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        self.class_counts = [int(c) for c in class_counts]
        self.num_classes = len(self.class_counts)
        self.seed = int(seed)
        if self.labels.size and (self.labels.min() < 0 or self.labels.max() >= self.num_classes):
            raise ValueError(
                f"labels must lie in [0, {self.num_classes}) (len(class_counts)); "
                f"got min {self.labels.min()}, max {self.labels.max()}"
            )
        self.class_indices: List[np.ndarray] = [
            np.flatnonzero(self.labels == c) for c in range(self.num_classes)
        ]
        # what can actually be sampled: counts taken from the labels themselves
        self.counts = np.array([len(ix) for ix in self.class_indices], dtype=np.int64)
        self.present = np.flatnonzero(self.counts > 0)

    #: options this sampler takes from the run when the config leaves them out:
    #: {option: RunFacts attribute}, e.g. {"batch_size": "batch_size"}
    run_facts: Dict[str, str] = {}

    @classmethod
    def from_facts(cls, labels, class_counts, facts: RunFacts, **options) -> "BaseSampler":
        """Build for a run: the seed, and every option of ``run_facts`` the config does not
        set, come from ``facts``."""
        for option, fact in cls.run_facts.items():
            options.setdefault(option, getattr(facts, fact))
        return cls(labels, class_counts, seed=facts.seed, **options)

    def __len__(self) -> int:
        """Items per epoch (global, all ranks together)."""
        return len(self.labels)

    def global_order(self, epoch: int) -> np.ndarray:
        """int64 [len(self)]: positions into the training set for this epoch, all ranks."""
        raise NotImplementedError

    # -- torch.utils.data.Sampler ----------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """The 0-based epoch whose order the next ``iter()`` yields (later passes count on)."""
        if isinstance(epoch, bool) or not isinstance(epoch, (int, np.integer)) or epoch < 0:
            raise ValueError(f"epoch must be an integer >= 0, got {epoch!r}")
        self._next_epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        """One epoch's global order (single process): epoch 0, then 1, 2, ... unless
        :meth:`set_epoch` says which."""
        epoch = getattr(self, "_next_epoch", 0)
        self._next_epoch = epoch + 1
        return iter(self.global_order(epoch).tolist())

    def class_distribution(self, epoch: int = 0) -> np.ndarray:
        """float64 [C]: the expected share of each class among the items of ``epoch``."""
        return self.counts / max(int(self.counts.sum()), 1)

    def num_batches(self, batch_size: int, drop_last: bool = False) -> int:
        n = len(self)
        return n // batch_size if drop_last else -(-n // batch_size)

    def batches(
        self,
        epoch: int,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
    ) -> List[np.ndarray]:
        """This rank's index batches for ``epoch``.

        ``batch_size`` is the global batch; each global batch is shared between the
        ``world_size`` ranks in equal parts (the last, short batch as evenly as possible) by
        :meth:`_split_global_batch`, so the union over ranks is exactly the single-process batch.
        """
        if batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if batch_size % world_size:
            raise ValueError(f"batch size {batch_size} is not divisible by world size {world_size}")
        order = self.global_order(epoch)
        return [
            order[p] for p in self.rank_positions(order, batch_size, rank, world_size, drop_last)
        ]

    def rank_positions(
        self,
        order: np.ndarray,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
    ) -> List[np.ndarray]:
        """Positions into ``order`` (an epoch's global order) of this rank's batches.

        The loader uses positions (not only indices) to draw each sample's augmentation from its
        global position, so a sample is augmented alike whichever rank trains it.
        """
        n = len(order)
        out = []
        for b in range(self.num_batches(batch_size, drop_last)):
            pos = np.arange(b * batch_size, min((b + 1) * batch_size, n))
            out.append(pos[self._split_global_batch(order[pos], b, world_size)[rank]])
        return out

    def _split_global_batch(
        self, glob: np.ndarray, batch_index: int, world_size: int
    ) -> List[np.ndarray]:
        """Each rank's share of one global batch, as positions into ``glob`` (default: contiguous,
        equal slices)."""
        return np.array_split(np.arange(len(glob)), world_size)

    def state_dict(self) -> Dict:
        return {}

    def load_state_dict(self, state: Dict) -> None:
        pass


@SAMPLERS.register("instance")
class InstanceSampler(BaseSampler):
    """Instance-balanced sampling: a uniform random permutation of the training set each epoch.

    Every item is seen exactly once per epoch, so class c has share n_c / N.
    """

    def __init__(self, labels, class_counts, seed: int = 0, shuffle: bool = True):
        super().__init__(labels, class_counts, seed)
        self.shuffle = shuffle

    def global_order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(len(self.labels), dtype=np.int64)
        return epoch_rng(self.seed, epoch).permutation(len(self.labels)).astype(np.int64)


@SAMPLERS.register("class_balanced")
class ClassBalancedSampler(BaseSampler):
    """Class-aware (class-balanced) sampling, Kang et al., "Decoupling Representation and
    Classifier for Long-Tailed Recognition" (ICLR 2020), ``ClassAwareSampler`` of
    facebookresearch/classifier-balancing (after Shen et al., ECCV 2016).

    Every class has probability p_c = 1 / C. The epoch walks a shuffled cyclic list of the
    (non-empty) classes; each visited class contributes ``num_samples_cls`` consecutive items
    taken from that class's own shuffled cyclic iterator (reshuffled when exhausted). Unlike the
    reference code, the iterators restart every epoch from (seed, epoch), so resume is exact.

    Args:
        num_samples_cls: consecutive items per class visit (4 in the ImageNet-LT configs).
        epoch_length: ``"max"`` (n_max * C, the reference; C = classes with items), ``"dataset"``
            (N, the training-set size, comparable with instance sampling) or a positive integer.
    """

    def __init__(
        self,
        labels,
        class_counts,
        seed: int = 0,
        num_samples_cls: PositiveInt = 4,
        epoch_length: Union[Literal["max", "dataset"], PositiveInt] = "max",
    ):
        super().__init__(labels, class_counts, seed)
        self.num_samples_cls = _require_int(num_samples_cls, "num_samples_cls", 1)
        if len(self.present) == 0:
            raise ValueError("class_balanced sampler needs at least one labelled item")
        if epoch_length == "max":
            self._len = int(self.counts.max()) * len(self.present)
        elif epoch_length == "dataset":
            self._len = len(self.labels)
        elif (
            isinstance(epoch_length, (int, np.integer))
            and not isinstance(epoch_length, bool)
            and epoch_length >= 1
        ):
            self._len = int(epoch_length)
        else:
            raise ConfigError(
                f"'{_KEY}epoch_length' must be 'max', 'dataset' or a positive "
                f"integer, got {epoch_length!r}."
            )
        self.epoch_length = epoch_length

    def __len__(self) -> int:
        return self._len

    def class_distribution(self, epoch: int = 0) -> np.ndarray:
        p = np.zeros(self.num_classes)
        p[self.present] = 1.0 / len(self.present)
        return p

    def global_order(self, epoch: int) -> np.ndarray:
        k, present = self.num_samples_cls, self.present
        visits = -(-self._len // k)
        rng = epoch_rng(self.seed, epoch, stream=0)
        # shuffled cyclic iterator over the class list
        cycles = -(-visits // len(present))
        cls_seq = present[
            np.argsort(rng.random((cycles, len(present))), axis=1, kind="stable").ravel()[:visits]
        ]
        out = np.empty((visits, k), dtype=np.int64)
        item_rng = epoch_rng(self.seed, epoch, stream=1)
        rows_by_class = np.argsort(cls_seq, kind="stable")  # visit rows grouped by class
        ends = np.cumsum(np.bincount(cls_seq, minlength=self.num_classes))
        for c in present:
            rows = rows_by_class[(ends[c - 1] if c else 0) : ends[c]]
            if len(rows):
                out[rows] = _cyclic_stream(item_rng, self.class_indices[c], len(rows) * k).reshape(
                    len(rows), k
                )
        return out.ravel()[: self._len]


class _ClassProbabilitySampler(BaseSampler):
    """N i.i.d. draws per epoch: a class c ~ p(epoch), then a uniform item of class c."""

    def __init__(self, labels, class_counts, seed: int = 0):
        super().__init__(labels, class_counts, seed)
        if len(self.present) == 0:
            raise ValueError(f"{type(self).__name__} needs at least one labelled item")
        self._flat_indices = np.concatenate(self.class_indices).astype(np.int64)

    def probabilities(self, epoch: int) -> np.ndarray:
        raise NotImplementedError

    def class_distribution(self, epoch: int = 0) -> np.ndarray:
        return self.probabilities(epoch)

    def global_order(self, epoch: int) -> np.ndarray:
        n = len(self)
        p = self.probabilities(epoch)
        rng = epoch_rng(self.seed, epoch)
        cls = rng.choice(self.num_classes, size=n, p=p)
        flat = self._flat_indices
        start = np.concatenate([[0], np.cumsum(self.counts)[:-1]])
        within = np.minimum(
            (rng.random(n) * self.counts[cls]).astype(np.int64), self.counts[cls] - 1
        )
        return flat[start[cls] + within].astype(np.int64)


@SAMPLERS.register("square_root")
class SquareRootSampler(_ClassProbabilitySampler):
    """Square-root sampling, Mahajan et al. (ECCV 2018) as used in Kang et al., "Decoupling
    Representation and Classifier for Long-Tailed Recognition" (ICLR 2020):
    p_c = n_c^q / sum_j n_j^q with q = 1/2 (q = 1: instance-balanced, q = 0: class-balanced).

    Each of the N items of an epoch is drawn i.i.d.: a class from p, then a uniform item of it.

    Args:
        q: the exponent (default 0.5).
    """

    def __init__(self, labels, class_counts, seed: int = 0, q: NonNegative = 0.5):
        super().__init__(labels, class_counts, seed)
        self.q = _require_float(q, "q", 0.0)
        w = np.zeros(self.num_classes)
        w[self.present] = self.counts[self.present].astype(np.float64) ** self.q
        self._p = w / w.sum()

    def probabilities(self, epoch: int) -> np.ndarray:
        return self._p.copy()


@SAMPLERS.register("progressive")
class ProgressivelyBalancedSampler(_ClassProbabilitySampler):
    """Progressively-balanced sampling, Kang et al., "Decoupling Representation and Classifier
    for Long-Tailed Recognition" (ICLR 2020), eq. (2):
    p_c(t) = (1 - t/T) * p_c^IB + (t/T) * p_c^CB, with p_c^IB = n_c / N (instance-balanced),
    p_c^CB = 1 / C (class-balanced), t the epoch (counted from 0) and T = ``total_epochs``;
    t/T is clipped to [0, 1], so epochs t >= T are class-balanced.

    Each of the N items of an epoch is drawn i.i.d.: a class from p(t), then a uniform item of it.

    Args:
        total_epochs: T, required (normally the length of the training schedule).
        progress: ``paper`` (default) t/T as eq. (2), balanced only from epoch T on; ``reference``
            the decoupling code's ``linspace(0, 1, T)[t]`` = t / (T - 1), balanced in the last epoch.
    """

    def __init__(
        self,
        labels,
        class_counts,
        seed: int = 0,
        total_epochs: Optional[PositiveInt] = None,
        progress: Literal["paper", "reference"] = "paper",
    ):
        super().__init__(labels, class_counts, seed)
        if progress not in ("paper", "reference"):
            raise ConfigError(
                f"'{_KEY}progress' must be paper (t / T) or reference "
                f"(t / (T - 1)), got {progress!r}."
            )
        self.progress = progress
        if total_epochs is None:
            raise ConfigError(
                f"Sampler 'progressive' needs '{_KEY}total_epochs' (T in "
                f"p(t) = (1 - t/T) p_IB + (t/T) p_CB), e.g. the number of epochs."
            )
        self.total_epochs = _require_int(total_epochs, "total_epochs", 1)
        self._p_ib = self.counts / self.counts.sum()
        self._p_cb = np.zeros(self.num_classes)
        self._p_cb[self.present] = 1.0 / len(self.present)

    run_facts = {"total_epochs": "epochs"}  # from the run unless the config sets it

    def probabilities(self, epoch: int) -> np.ndarray:
        span = self.total_epochs if self.progress == "paper" else max(self.total_epochs - 1, 1)
        a = min(max(epoch / span, 0.0), 1.0)
        p = (1.0 - a) * self._p_ib + a * self._p_cb
        return p / p.sum()


@SAMPLERS.register("b3rs")
class B3RSSampler(BaseSampler):
    """B3RS, block-based relatively balanced batch sampler (Zhang, "You Only Need End-to-End
    Training for Long-Tailed Recognition", arXiv 2112.05958; [PROPOSED] reading of docs/methods/whitening.md).

    Classes are sorted by n_c (descending) and cut into K contiguous blocks of roughly equal total
    count N_k (each block at least one class). Every global batch of size B holds exactly
    B_k = B * N_k^q / sum_j N_j^q items of block k (q = 0.5; largest-remainder rounding so
    sum_k B_k = B, then every B_k >= 1). Inside a block items are drawn uniformly, from a
    shuffled cyclic iterator over the block's items (so per-class shares inside block k are
    n_c / N_k). An epoch is round(N / B) whole batches.

    Within a global batch the blocks are interleaved (low-discrepancy order), and
    :meth:`batches` shares each block's B_k items between the ranks as evenly as possible
    (floor or ceil of B_k / world_size, the extra items rotating over ranks from batch to batch),
    so every rank slice holds every block whenever B_k >= world_size.

    Args:
        batch_size: the global batch size B (a run's ``train.batch_size``); ``batches`` must use it.
        num_blocks: K (default 4; reduced to the number of non-empty classes if larger).
        q: the exponent (0.5 "relatively balanced"; 1 ~ instance, 0 block-balanced).
    """

    run_facts = {"batch_size": "batch_size"}  # from the run unless the config sets it

    def __init__(
        self,
        labels,
        class_counts,
        seed: int = 0,
        batch_size: Optional[PositiveInt] = None,
        num_blocks: PositiveInt = 4,
        q: NonNegative = 0.5,
    ):
        super().__init__(labels, class_counts, seed)
        if batch_size is None:
            raise ConfigError(f"Sampler 'b3rs' needs '{_KEY}batch_size' (the global batch size).")
        self.batch_size = _require_int(batch_size, "batch_size", 1)
        K = _require_int(num_blocks, "num_blocks", 1)
        self.q = _require_float(q, "q", 0.0)
        if len(self.present) == 0:
            raise ValueError("b3rs sampler needs at least one labelled item")
        K = min(K, len(self.present))
        if self.batch_size < K:
            raise ConfigError(
                f"'{_KEY}batch_size' = {self.batch_size} is smaller than the "
                f"number of blocks {K}; every batch must contain every block."
            )
        self.num_blocks = K
        self.blocks = self._partition(K)  # list of class-id arrays
        self.block_of_class = np.full(self.num_classes, -1, dtype=np.int64)
        for k, cls in enumerate(self.blocks):
            self.block_of_class[cls] = k
        self.block_counts = np.array([self.counts[c].sum() for c in self.blocks], dtype=np.int64)
        self.block_items = [
            np.sort(np.concatenate([self.class_indices[c] for c in cls])) for cls in self.blocks
        ]
        self.quotas = self._quotas(self.batch_size)
        self.batches_per_epoch = max(1, int(round(len(self.labels) / self.batch_size)))
        # low-discrepancy interleave: the j-th item of block k sits at key (j + 0.5) / B_k
        keys = np.concatenate([(np.arange(n) + 0.5) / n for n in self.quotas])
        blk = np.repeat(np.arange(K), self.quotas)
        self.pattern = blk[np.lexsort((blk, keys))]  # block id of each batch position

    # -- construction -----------------------------------------------------------------------
    def _partition(self, K: int) -> List[np.ndarray]:
        """Contiguous cut of the classes sorted by count (desc.) into K blocks ~ N / K each.

        Greedy with re-targeting: block k ends where its total is closest to (remaining total) /
        (remaining blocks), leaving at least one class for every later block.
        """
        cls = self.present[np.argsort(-self.counts[self.present], kind="stable")]
        cum = np.cumsum(self.counts[cls])
        blocks, start, done = [], 0, 0
        for k in range(K):
            m = K - k
            last = len(cls) - m  # latest allowed end index
            if m == 1:
                end = len(cls) - 1
            else:
                target = done + (cum[-1] - done) / m
                cand = np.arange(start, last + 1)
                end = int(cand[np.argmin(np.abs(cum[cand] - target))])
            blocks.append(cls[start : end + 1])
            done, start = int(cum[end]), end + 1
        return blocks

    def _quotas(self, B: int) -> np.ndarray:
        """B_k = B N_k^q / sum_j N_j^q, largest remainder, then each B_k >= 1 (B >= K)."""
        w = self.block_counts.astype(np.float64) ** self.q
        quotas = _largest_remainder(w, B)
        while (quotas == 0).any():
            quotas[int(np.argmax(quotas))] -= 1
            quotas[int(np.flatnonzero(quotas == 0)[0])] += 1
        return quotas

    # -- epoch ------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.batches_per_epoch * self.batch_size

    def class_distribution(self, epoch: int = 0) -> np.ndarray:
        p = np.zeros(self.num_classes)
        for k, cls in enumerate(self.blocks):
            p[cls] = self.quotas[k] / self.batch_size * self.counts[cls] / self.block_counts[k]
        return p

    def _check_batch_size(self, batch_size: int) -> None:
        if batch_size != self.batch_size:
            raise ValueError(
                f"b3rs was built for batch size {self.batch_size} "
                f"({_KEY}batch_size) but is asked for batches of {batch_size}"
            )

    def num_batches(self, batch_size: int, drop_last: bool = False) -> int:
        self._check_batch_size(batch_size)
        return self.batches_per_epoch

    def global_order(self, epoch: int) -> np.ndarray:
        nb, B = self.batches_per_epoch, self.batch_size
        out = np.empty((nb, B), dtype=np.int64)
        for k in range(self.num_blocks):
            rng = epoch_rng(self.seed, epoch, stream=1 + k)
            stream = _cyclic_stream(rng, self.block_items[k], nb * int(self.quotas[k]))
            out[:, self.pattern == k] = stream.reshape(nb, int(self.quotas[k]))
        return out.ravel()

    def batches(
        self,
        epoch: int,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
    ) -> List[np.ndarray]:
        self._check_batch_size(batch_size)
        if world_size > 1 and (self.quotas < world_size).any():
            warnings.warn(
                f"b3rs: block quotas {self.quotas.tolist()} of batch {batch_size} cannot "
                f"put every block on each of {world_size} ranks; use a larger batch or "
                f"fewer blocks",
                RuntimeWarning,
                stacklevel=2,
            )
        return super().batches(epoch, batch_size, rank, world_size, drop_last)

    def rank_quotas(self, batch_index: int, world_size: int) -> np.ndarray:
        """int [world_size, K]: items of block k that rank r gets in global batch ``batch_index``.

        Block k's B_k = a_k W + r_k items give every rank a_k, and its r_k extras go to distinct
        ranks; the extras of all blocks are dealt round-robin starting at a rank that rotates
        with the batch index, so every rank gets exactly B / W items.
        """
        W, K = world_size, self.num_blocks
        base, extra = np.divmod(self.quotas, W)
        q = np.tile(base, (W, 1))
        pos = batch_index % W  # rotating first receiver
        for k in range(K):
            for _ in range(int(extra[k])):
                q[pos % W, k] += 1
                pos += 1
        return q

    def _split_global_batch(
        self, glob: np.ndarray, batch_index: int, world_size: int
    ) -> List[np.ndarray]:
        if world_size == 1:
            return [np.arange(len(glob))]
        q = self.rank_quotas(batch_index, world_size)
        blk = self.block_of_class[self.labels[glob]]
        owner = np.empty(len(glob), dtype=np.int64)
        for k in range(self.num_blocks):
            owner[blk == k] = np.repeat(np.arange(world_size), q[:, k])
        return [np.flatnonzero(owner == r) for r in range(world_size)]


@SAMPLERS.register("undersample")
class UndersampleSampler(BaseSampler):
    """Random undersampling to a class-balanced set, re-drawn every epoch: the balanced set of
    the three-stage strategy (Li, Tan, Pan, arXiv 2104.09830; [PROPOSED] reading of docs/methods/three_stage.md).

    Every epoch takes m distinct items of each class that has items, uniformly without
    replacement, and shuffles the m * C' items together (C' = classes with items):
    m = min_c n_c over those classes (``per_class: null``, the default) or ``per_class``, and
    p_c = 1 / C' exactly, in every epoch. The draw depends only on (seed, epoch), so each epoch
    sees another balanced subset of the large classes and resume is exact.

    Args:
        per_class: m; null (default) = the smallest class count; an integer must not exceed it.
    """

    def __init__(
        self, labels, class_counts, seed: int = 0, per_class: Optional[PositiveInt] = None
    ):
        super().__init__(labels, class_counts, seed)
        if len(self.present) == 0:
            raise ValueError("undersample sampler needs at least one labelled item")
        smallest = int(self.counts[self.present].min())
        if per_class is None:
            self.per_class = smallest
        else:
            self.per_class = _require_int(per_class, "per_class", 1)
            if self.per_class > smallest:
                raise ConfigError(
                    f"'{_KEY}per_class' = {self.per_class} exceeds the smallest "
                    f"class ({smallest} items): undersampling cannot balance it. "
                    f"Use at most {smallest}, or null for that."
                )

    def __len__(self) -> int:
        return self.per_class * len(self.present)

    def class_distribution(self, epoch: int = 0) -> np.ndarray:
        p = np.zeros(self.num_classes)
        p[self.present] = 1.0 / len(self.present)
        return p

    def global_order(self, epoch: int) -> np.ndarray:
        rng = epoch_rng(self.seed, epoch)
        m = self.per_class
        picked = [
            self.class_indices[c][
                np.argsort(rng.random(len(self.class_indices[c])), kind="stable")[:m]
            ]
            for c in self.present
        ]
        items = np.concatenate(picked).astype(np.int64)
        return items[rng.permutation(len(items))]


def build_sampler(
    name: str, labels, class_counts, facts: RunFacts = RunFacts(), **options
) -> BaseSampler:
    """Build a registered sampler for a run; unknown options raise a ConfigError naming them."""
    # SAMPLERS holds BaseSampler subclasses only; Registry.get is typed as returning any callable
    cls = cast(Type[BaseSampler], SAMPLERS.get(name))
    if "seed" in options:  # a direct call may fix the seed
        facts = dataclasses.replace(facts, seed=int(options.pop("seed")))
    SAMPLERS.check_kwargs(name, options, key_prefix=_KEY)
    return cls.from_facts(labels, class_counts, facts, **options)
