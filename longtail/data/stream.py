"""Streaming input: batches of an image set that stays on disk, decoded by worker processes.

A torch ``DataLoader`` whose batch sampler is the epoch's batch plan (the sampler's global order,
this rank's positions) decodes each file with Pillow (JPEG draft mode when asked: the DCT-domain
downscale to at least ``draft`` pixels a side; simplejpeg for JPEGs when installed), applies an
optional per-sample transform whose random choices come from (seed, epoch, position), and
collates a uint8 (or float) batch. Nothing but the list of paths is held in memory; the order
and the choices depend on (seed, epoch) alone, so resume is exact and the worker count changes
nothing. Without a transform the batch is the decoded pixels, which the train loader augments on
the device exactly as it augments an in-memory set (the two paths give identical batches).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image

from longtail.core.errors import DataError
from longtail.data.transforms import sample_rng

try:  # a faster JPEG decoder, used when installed (optional)
    import simplejpeg  # type: ignore[import-not-found]
except ImportError:  # pragma: no cover - depends on the environment
    simplejpeg = None

# (PIL image, per-sample generator) -> tensor [C, H, W] (uint8: normalised on the device)
Transform = Callable[[Image.Image, np.random.Generator], torch.Tensor]


def sample_generator(seed: int, epoch: int, position: int) -> np.random.Generator:
    """The random source of one sample's augmentation: a function of (seed, epoch, position)."""
    return np.random.Generator(
        np.random.PCG64(np.random.SeedSequence([seed, epoch, position, 0x57]))
    )


def decode(path: Path, mode: str = "RGB", draft: Optional[int] = None) -> Image.Image:
    """One image file as a PIL image in ``mode`` ("RGB" or "L"). ``draft``: let a JPEG decode at
    the smallest 1/2^k scale whose sides stay >= ``draft`` (much faster for large files)."""
    suffix = path.suffix.lower()
    if simplejpeg is not None and suffix in (".jpg", ".jpeg") and mode == "RGB":
        data = path.read_bytes()
        try:
            if draft:
                array = simplejpeg.decode_jpeg(
                    data, colorspace="RGB", min_height=draft, min_width=draft
                )
            else:
                array = simplejpeg.decode_jpeg(data, colorspace="RGB")
            return Image.fromarray(array)
        except ValueError:
            pass  # not a baseline JPEG simplejpeg reads (CMYK, ...): Pillow below
    with Image.open(path) as im:
        if draft and im.format == "JPEG":
            im.draft(mode, (draft, draft))
        return im.convert(mode)


def to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL image -> uint8 [C, H, W]."""
    array = np.asarray(image, dtype=np.uint8)
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


class _Items(torch.utils.data.Dataset):
    """Item ``(epoch, position, index)``: file ``index`` decoded (and transformed, seeded by
    ``(seed, epoch, position)``)."""

    def __init__(
        self,
        root: Path,
        paths: Sequence[str],
        transform: Optional[Transform],
        seed: int,
        mode: str,
        draft: Optional[int],
    ):
        self.root, self.paths, self.transform = Path(root), paths, transform
        self.seed, self.mode, self.draft = seed, mode, draft

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key: Tuple[int, int, int]) -> torch.Tensor:
        epoch, position, index = key
        path = self.root / self.paths[index]
        try:
            image = decode(path, self.mode, self.draft)
        except FileNotFoundError:
            raise DataError(
                f"{path} is listed but missing: run `longtail data check` on the data root."
            ) from None
        except (OSError, ValueError, SyntaxError) as err:
            raise DataError(
                f"{path} cannot be decoded ({err}): replace or remove it "
                f"(`longtail data check` lists every such file)."
            ) from None
        if self.transform is None:
            return to_tensor(image)
        return self.transform(image, sample_rng(self.seed, epoch, position))


def _stack(items: List[torch.Tensor]) -> torch.Tensor:
    shapes = {tuple(t.shape) for t in items}
    if len(shapes) > 1:
        raise DataError(
            f"The images of one batch differ in size ({', '.join(map(str, sorted(shapes)[:3]))}): "
            f"choose a transform that resizes them (data.transform, e.g. imagenet_train)."
        )
    return torch.stack(items)


def _one_thread(_: int) -> None:
    torch.set_num_threads(1)  # the workers share the cores: one intra-op thread each


class FileBatches:
    """Batches of files under ``root`` decoded by ``num_workers`` processes (0: in this one).

    Args:
        root: the image root; paths: each image's path relative to it.
        transform: per-sample transform (None: the decoded pixels, uint8, all of one size).
        mode: "RGB" or "L"; draft: the JPEG draft size (None: full decode).
    """

    def __init__(
        self,
        root: Path,
        paths: Sequence[str],
        *,
        transform: Optional[Transform] = None,
        seed: int = 0,
        mode: str = "RGB",
        draft: Optional[int] = None,
        num_workers: int = 2,
        prefetch_factor: int = 4,
        pin_memory: bool = False,
    ):
        self.items = _Items(root, paths, transform, seed, mode, draft)
        self.num_workers, self.prefetch_factor = int(num_workers), int(prefetch_factor)
        self.pin_memory = pin_memory

    def __len__(self) -> int:
        return len(self.items)

    def batches(
        self,
        epoch: int,
        index_batches: Sequence[np.ndarray],
        position_batches: Sequence[np.ndarray],
    ) -> Iterator[torch.Tensor]:
        """One tensor per batch of ``index_batches`` (file indices), in order; ``position_batches``:
        the samples' positions in the epoch's order (their random choices' key)."""
        plan = [
            [(epoch, int(p), int(i)) for p, i in zip(pos, idx)]
            for pos, idx in zip(position_batches, index_batches)
        ]
        extra: dict[str, Any] = {}
        if self.num_workers > 0:
            extra = {"prefetch_factor": self.prefetch_factor, "worker_init_fn": _one_thread}
        loader = torch.utils.data.DataLoader(
            self.items,
            batch_sampler=plan,
            num_workers=self.num_workers,
            collate_fn=_stack,
            pin_memory=self.pin_memory,
            **extra,
        )
        yield from loader
