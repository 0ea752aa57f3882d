"""Atomic, safely loadable checkpoints.

Resumable state is written with ``torch.save`` to a temp file, fsynced and renamed, and read back
with ``torch.load(weights_only=True)`` (no arbitrary unpickling); final weights as safetensors.
"""

from __future__ import annotations

import errno
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch
from safetensors.torch import load_file, save_file

from longtail.core.errors import LongtailError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: Path, write: Callable[[Path], object], exclusive: bool = False) -> None:
    """Call ``write(tmp)`` on a temp file in the same folder, fsync it, then rename it over
    ``path`` (``exclusive``: create ``path``, FileExistsError if it exists). The file gets the
    permissions of the user's umask, as any normal output. A full disk leaves the previous file
    in place and raises a LongtailError naming the path (whatever ``write`` returns is ignored)."""
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(errno.ENOENT, "the folder does not exist", str(path.parent))
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        if exclusive:
            os.link(tmp, path)  # atomic and refuses an existing path
        else:
            os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as err:
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            kept = f"; the previous {path.name} is kept" if path.exists() else ""
            raise LongtailError(
                f"No space left on {path.parent} while writing {path.name}{kept}. "
                f"Free some space, then resume the run."
            ) from None
        raise
    finally:
        if tmp.exists():
            tmp.unlink()


def remove_stale_temporaries(folder: Path) -> List[Path]:
    """Delete the temp files that writes killed before their rename left in ``folder``
    (``.NAME.*.tmp``); only safe while holding the folder's lock. Returns what was removed."""
    removed = []
    for tmp in Path(folder).glob(".*.tmp"):
        if tmp.is_file():
            tmp.unlink()
            removed.append(tmp)
    return removed


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def finite_json(obj: Any) -> Any:
    """``obj`` with every non-finite float (NaN, inf) replaced by None: valid JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(v) for v in obj]
    return obj


def to_json(obj: Any, indent: Optional[int] = None) -> str:
    """Strict JSON (no NaN / Infinity tokens, which JSON does not have)."""
    return json.dumps(finite_json(obj), indent=indent, allow_nan=False)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, to_json(obj, indent=2) + "\n")


def save_checkpoint(path: Path, state: Dict[str, Any]) -> None:
    """Save a resumable state dict (tensors, numbers, strings, lists, dicts only)."""
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: Path) -> Dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint`, refusing anything but plain data."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise LongtailError(
            f"No checkpoint at {path}. Pass the folder of a run that has trained at "
            f"least one epoch."
        ) from None
    except Exception as err:  # corrupt or unsafe file
        raise LongtailError(
            f"Checkpoint {path} cannot be loaded safely ({err}). It is corrupt or was "
            f"not written by longtail; delete it or resume from another run."
        ) from None


def save_weights(path: Path, state_dict: Dict[str, torch.Tensor], metadata: Dict[str, str]) -> None:
    """Model weights as safetensors (contiguous CPU copies), atomically."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def load_weights(path: Path) -> Dict[str, torch.Tensor]:
    return load_file(str(path))
