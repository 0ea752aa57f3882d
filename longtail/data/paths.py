"""Data-root resolution (--data-root > $LONGTAIL_DATA > user cache), the local mirror, md5-checked downloads.

Missing files: the local mirror the user names with $LONGTAIL_MIRROR (a folder holding
``materialize.py``; never searched for), else the official URL, fetched with pooch (a temp file
in the destination folder, its md5 checked, then renamed), else DataError. Processes that fetch
into one root at once take turns through a filelock lock file (fcntl on POSIX, msvcrt on Windows).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import pooch
from filelock import FileLock

from longtail.core.errors import DataError

ENV_VAR = "LONGTAIL_DATA"
MIRROR_KEYS = (
    "cifar10",
    "mnist",
    "fashion-mnist",
)  # what materialize.py can write (no full cifar100)
DOWNLOAD_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Remote:
    """One official file: where to fetch it from, where it goes, and its published md5."""

    url: str
    path: Path
    md5: str


def resolve_data_root(cli_root: str | Path | None = None) -> Path:
    """``--data-root`` if given, else ``$LONGTAIL_DATA``, else ``($XDG_CACHE_HOME or ~/.cache)/longtail``."""
    if cli_root is not None and str(cli_root) != "":
        return Path(cli_root).expanduser()
    env = os.environ.get(ENV_VAR, "")
    if env:
        return Path(env).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME", "") or str(Path.home() / ".cache")
    return Path(cache).expanduser() / "longtail"


def md5_file(path: Path) -> str:
    """Hex md5 of a file (``pooch.file_hash``, read in chunks)."""
    return str(pooch.file_hash(str(path), alg="md5"))


def check_md5(path: Path, expected: str, fix: str) -> None:
    """Raise DataError if ``path``'s md5 differs from ``expected``; ``fix`` says what to do."""
    actual = md5_file(path)
    if actual != expected:
        raise DataError(
            f"{path} has md5 {actual}, but the official file has md5 {expected}: it is truncated, "
            f"corrupt or not the official file. {fix}"
        )


# ---------------------------------------------------------------------------------- local mirror
MIRROR_VAR = "LONGTAIL_MIRROR"


def find_mirror() -> Path | None:
    """The local dataset mirror named by ``$LONGTAIL_MIRROR`` (a folder with ``materialize.py``),
    else None. It is never searched for: the library runs no script the user did not name."""
    named = os.environ.get(MIRROR_VAR, "")
    if not named:
        return None
    folder = Path(named).expanduser()
    if not (folder / "materialize.py").is_file():
        raise DataError(
            f"{MIRROR_VAR}={named} names no dataset mirror: {folder / 'materialize.py'} does not "
            f"exist. Point {MIRROR_VAR} at the mirror folder (the one holding materialize.py), or "
            f"unset it to download the official files."
        )
    return folder


def materialize_from_mirror(root: Path, key: str) -> str | None:
    """Run ``materialize.py ROOT key`` from the local mirror.

    Returns None on success (or when no mirror / no such key, i.e. nothing was tried), else a note
    saying why the mirror failed, for the final error message.
    """
    mirror = find_mirror()
    if mirror is None or key not in MIRROR_KEYS:
        return None
    print(
        f"longtail: {key} is not under {root}; materialising it from the local mirror {mirror}",
        flush=True,
    )
    root.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        [sys.executable, str(mirror / "materialize.py"), str(root), key],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        return f"the local mirror {mirror} failed (exit {proc.returncode}: {tail[0]})"
    return None


# -------------------------------------------------------------------------------------- download
class _Fetch:
    """A pooch downloader: HTTP(S) with a timeout, ``file://`` as a local copy (a mirror on disk,
    the tests' "server"), anything else as pooch chooses (FTP, SFTP, DOI). ``done`` is set once
    the bytes are in the temp file, so a ValueError after it is pooch's hash check."""

    def __init__(self, url: str, timeout: float, progress: bool):
        scheme = urllib.parse.urlparse(url).scheme.lower()
        self.inner: Any
        if scheme in ("http", "https"):
            self.inner = pooch.HTTPDownloader(progressbar=progress, timeout=timeout)
        elif scheme == "file":
            self.inner = None
        else:
            self.inner = pooch.choose_downloader(url, progressbar=progress)
        self.done = False

    def __call__(self, url: str, output_file: Any, pooch_instance: Any) -> None:
        if self.inner is None:
            source = urllib.request.url2pathname(urllib.parse.urlparse(url).path)
            shutil.copyfile(source, output_file)
        else:
            self.inner(url, output_file, pooch_instance)
        self.done = True


def download_file(
    url: str,
    dest: Path,
    md5: str,
    timeout: float = DOWNLOAD_TIMEOUT_S,
    progress: bool = True,
) -> None:
    """Fetch ``url`` to ``dest`` with pooch: a temp file in ``dest``'s folder, its md5 checked,
    then renamed to ``dest`` (``progress``: a tqdm bar on stderr).

    Network errors propagate as ``OSError`` (requests' errors are OSErrors); an md5 mismatch
    deletes the file and raises DataError. No partial file is ever left at ``dest`` or beside it.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fetch = _Fetch(url, timeout, progress)
    try:
        pooch.retrieve(
            url,
            known_hash=f"md5:{md5}",
            fname=dest.name,
            path=dest.parent,
            downloader=fetch,
        )
    except ValueError as err:
        if not fetch.done:  # not the hash: an unknown protocol, a bad URL
            raise
        raise DataError(
            f"Downloaded {url} but it is not the official file ({err}); the file was deleted "
            f"and not saved as {dest}. The download was corrupted or the server sent something "
            f"else: re-run to try again, or place the official file at {dest} yourself."
        ) from None


# ---------------------------------------------------------------------------------- orchestration
def obtain(
    key: str,
    root: Path,
    ready: Callable[[], bool],
    remotes: Sequence[Remote],
    download: bool,
    expected: str,
    what: str,
) -> None:
    """Make a dataset present under ``root``: already there, else local mirror, else download.

    Args:
        key: dataset key for the mirror (``cifar10``, ``mnist``, ...).
        ready: returns True once the needed files are present.
        remotes: official files to fetch when missing (only the absent ones are fetched).
        expected: the path(s) to name if everything fails, as a phrase.
        what: human name for messages, e.g. ``"CIFAR-10 (train)"``.
    """
    if ready():
        return
    if not download and find_mirror() is None:  # nothing will be written: no lock, no folder
        return _obtain_locked(key, root, ready, remotes, download, expected, what)
    with _root_lock(root):  # several processes (pytest-xdist, DDP ranks) may ask at once
        _obtain_locked(key, root, ready, remotes, download, expected, what)


@contextlib.contextmanager
def _root_lock(root: Path) -> Iterator[None]:
    """An exclusive lock on ``root/.longtail.lock`` (filelock: cross-platform; no-op where the
    root is read-only)."""
    lock = FileLock(str(root / ".longtail.lock"))
    try:
        root.mkdir(parents=True, exist_ok=True)
        lock.acquire()
    except OSError:
        yield
        return
    try:
        yield
    finally:
        lock.release()


def _obtain_locked(
    key: str,
    root: Path,
    ready: Callable[[], bool],
    remotes: Sequence[Remote],
    download: bool,
    expected: str,
    what: str,
) -> None:
    if ready():  # another process finished it while we waited for the lock
        return
    notes: list[str] = []
    note = materialize_from_mirror(root, key)
    if note:
        notes.append(note)
    if ready():
        return
    if download:
        for remote in remotes:
            if remote.path.exists():
                continue
            try:
                download_file(remote.url, remote.path, remote.md5)
            except (OSError, urllib.error.URLError, ValueError) as err:
                notes.append(f"downloading {remote.url} failed ({err})")
                break
        if ready():
            return
    else:
        notes.append("downloading is disabled (download=False)")
    why = "; ".join(notes) or "nothing could be fetched"
    raise DataError(
        f"{what} is not available: expected {expected}. {why[0].upper() + why[1:]}. "
        f"Provide it by pointing --data-root DIR (or the environment variable {ENV_VAR}) at a folder "
        f"that holds it, by placing the official files at the path above, by naming a local "
        f"mirror with {MIRROR_VAR}=DIR (a folder with materialize.py), or by re-running with "
        f"network access so it can be downloaded."
    )
