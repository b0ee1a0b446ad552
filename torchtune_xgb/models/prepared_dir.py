"""The directory ``tune-xgb prepare`` writes: what in it is prepare's own, and one prepare at a time.

A finished conversion carries a marker (``MARKER_NAME``) listing every file it wrote. A rebuild
(``--force``, an older format, an incomplete copy) replaces the directory only when it holds
nothing else, so a README or another model put next to the files is never removed; otherwise it
is refused, before anything is removed, with one line naming what is there.
"""

import errno
import fcntl
import json
import logging
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, List

from torchtune_xgb.errors import ConfigError

MARKER_NAME = ".torchtune_xgb_prepared.json"  # leading dot: torchtune's copy_files skips it

log = logging.getLogger(__name__)


def _not_written_by_prepare(out: Path) -> List[str]:
    """What ``out`` holds that no prepare wrote there: everything but the files its marker lists
    (and the marker itself); directories end with ``/``."""
    try:
        marker = json.loads((out / MARKER_NAME).read_text())
        listed = marker.get("files") if isinstance(marker, dict) else None
    except (OSError, ValueError):
        listed = None
    ours = {MARKER_NAME, *(name for name in listed if isinstance(name, str))} if isinstance(listed, list) else set()
    return sorted(
        entry.name + ("/" if entry.is_dir() and not entry.is_symlink() else "")
        for entry in out.iterdir()
        if not (entry.name in ours and entry.is_file() and not entry.is_symlink())
    )


def refuse_unknown_files(out: Path) -> None:
    """Raise a one-line ConfigError if ``out`` exists and is not a directory holding only what a
    prepare wrote (nothing is removed here)."""
    if not os.path.lexists(out):
        return
    if not out.is_dir():
        raise ConfigError(f"{out} exists and is not a directory; pass another --output")
    unknown = _not_written_by_prepare(out)
    if unknown:
        shown = ", ".join(unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        raise ConfigError(
            f"{out} holds {shown}, which tune-xgb prepare did not write; move them out of it or pass another --output"
        )


@contextmanager
def one_prepare_at_a_time(out: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``out``'s parent directory (no lock file is left behind);
    wait, saying so, while another prepare holds it. Without ``flock`` (some network and FUSE
    filesystems) prepares are not serialized: run one at a time there."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(out.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.warning(f"waiting for another tune-xgb prepare writing into {out.parent}")
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as err:
            if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise
            log.warning(f"{out.parent}: no flock on this filesystem; run one tune-xgb prepare at a time there")
        yield
    finally:
        os.close(fd)  # releases the lock
