"""Writes that never follow a symbolic link out of the directory they belong to.

An ``output_dir`` on a shared filesystem, or unpacked from someone's tarball, may hold a link
where a run writes (``xgb_summary.json -> ~/.bashrc``): a plain ``open(path, "w")`` would then
overwrite the link's target. Every file of ours is written here instead:

- a new file is created with ``O_CREAT | O_EXCL | O_NOFOLLOW``, which fails on anything already
  there, a link included, so nothing is ever written through one;
- a file that must keep its name (``xgb_summary.json``, ``latest``, ``xgb_run.json``) is written to
  such a new file next to it, fsynced, and renamed over the name: a reader sees the old file or the
  new one, and a rename replaces a name, it never writes through it;
- a directory is made with ``mkdir``, which never follows a link either.

Where a path we must use is a link, the write is refused with :class:`LinkRefused`, an ``OSError``
whose message is one line naming the link and its target; the link and its target are left as
they are. (The run checks its ``output_dir`` for such links before it writes anything:
run/output_dir.py.)
"""

import errno
import os
import secrets
from pathlib import Path
from typing import BinaryIO, Iterable, Optional

NEW_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


class LinkRefused(OSError):
    """A path a run writes is a symbolic link. ``strerror`` is one line naming the link."""

    def __init__(self, link: Path):
        try:
            target = os.readlink(link)
        except OSError:
            target = "?"
        super().__init__(
            errno.ELOOP, f"{link} is a symbolic link (to {target}); nothing is written through a link", str(link)
        )

    def __str__(self) -> str:
        return self.strerror


def refuse_link(path: Path) -> None:
    """Raise :class:`LinkRefused` if ``path`` is a symbolic link (dangling or not)."""
    if path.is_symlink():
        raise LinkRefused(path)


def first_link(paths: Iterable[Path]) -> Optional[Path]:
    """The first of ``paths`` that is a symbolic link (None: none is)."""
    return next((p for p in paths if p.is_symlink()), None)


def create_new_file(path: Path) -> BinaryIO:
    """Open ``path`` for binary writing; only a new file: anything already there (a link too)
    raises (:class:`LinkRefused` for a link, ``FileExistsError`` otherwise). Mode as ``open``
    gives (0666 less the umask)."""
    try:
        fd = os.open(path, NEW_FILE_FLAGS, 0o666)
    except FileExistsError:
        refuse_link(path)
        raise
    return os.fdopen(fd, "wb")


def fsync_dir(path: Path) -> None:
    """Make the names in directory ``path`` (new files, renames) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    """Make every file under directory ``path``, and the directories' names, durable (before a
    rename publishes them: a crash never shows empty files)."""
    for root, _, files in os.walk(path):
        for name in files:
            with open(Path(root) / name, "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(Path(root))


def write_atomically(path: Path, data: bytes) -> Path:
    """Replace ``path`` with a file holding ``data``: written to a new file in the same
    directory, fsynced, renamed over ``path``. Raises :class:`LinkRefused` if ``path`` is a link
    (nothing is written); on any error the temporary file is removed. Returns ``path``."""
    refuse_link(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        with create_new_file(tmp) as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def make_dir(path: Path) -> Path:
    """``mkdir path``; an existing directory is fine, a link there raises :class:`LinkRefused`.
    The parent must exist. Returns ``path``."""
    try:
        os.mkdir(path)
    except FileExistsError:
        refuse_link(path)
        if not path.is_dir():
            raise
    return path
