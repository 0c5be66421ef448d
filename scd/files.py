"""Writing files without ever losing the user's: one atomic writer, output checks made before any
work, files that appear only once they hold something, and a lock per output.

The rules every writer in scd follows:
- a file is written under a temporary name beside its destination and renamed over it when done
  (or, for a streamed video, when its first frame is in), so a failure leaves what was there;
- new files get the mode the umask gives (0666 & ~umask), like any other program's;
- an output that is an input (the same file, through any symlink), a folder, or anything but a
  regular file (a device such as /dev/null, a FIFO) is refused before work starts;
- only a file this run created is ever removed;
- a lock file beside the output stops two runs from writing it at once.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from pathlib import Path
from typing import Callable

from scd.errors import OutputError, SCDError

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; outputs are not locked there
    fcntl = None


def _reason(err: OSError) -> str:
    return err.strerror.lower() if err.strerror else str(err)


def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it: put it straight back
    os.umask(mask)
    return mask


def _temporary_beside(path: Path, tag: str) -> tuple[int, Path]:
    """Create a new, empty file next to `path` (same folder, so a rename is atomic), with the mode
    the umask gives; returns its open descriptor and its path."""
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.{tag}")
        try:
            return os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666), tmp
        except FileExistsError:
            continue


def atomic_write(path, write: Callable[[Path], None], error: type[SCDError] = OutputError, what: str = "") -> Path:
    """Write `path` in one step: `write(tmp)` fills a temporary file beside it, which is then renamed
    over `path` (through a symlink, onto its target). A failure leaves `path` as it was and no
    temporary file. Raises `error` naming the file when it cannot be written."""
    path = Path(os.path.realpath(path))
    label = f"{what} {path}" if what else str(path)
    if path.exists() and not path.is_file():  # never replace a folder, a device (/dev/null) or a FIFO
        raise error(f"cannot write {label}: it is not a regular file")
    tmp = None
    try:
        fd, tmp = _temporary_beside(path, "tmp")
        os.close(fd)
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # some writers (safetensors) recreate the file as 0600
        os.replace(tmp, path)
        tmp = None
    except OSError as err:
        raise error(f"cannot write {label}: {_reason(err)}") from None
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
    return path


def write_text(path, text: str, error: type[SCDError] = OutputError, what: str = "") -> Path:
    """`atomic_write` of UTF-8 text."""
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"), error, what)


def check_output(path, what: str = "output", inputs=()) -> Path:
    """Refuse, before any work, an output that cannot or must not be written: its folder missing or
    read-only, a folder or anything but a regular file at its place, a read-only file, or one of
    `inputs` (the same file through any symlink). Returns the real path to write."""
    given = Path(path)
    real = Path(os.path.realpath(given))
    for source in inputs:
        if source is not None and _same_file(real, source):
            raise OutputError(f"the {what} {given} is the input {source} (the same file): writing it would destroy "
                              f"the input; choose another {what} path")
    if real.exists():
        if real.is_dir():
            raise OutputError(f"the {what} {given} is a folder: give a file path")
        if not real.is_file():
            raise OutputError(f"the {what} {given} is not a regular file (a device, FIFO or socket): "
                              "give a file path")
        if not os.access(real, os.W_OK):
            raise OutputError(f"cannot write {what} {given}: the file is read-only")
    folder = real.parent
    if not folder.exists():
        raise OutputError(f"cannot write {what} {given}: the folder {folder} does not exist; create it first")
    if not folder.is_dir():
        raise OutputError(f"cannot write {what} {given}: {folder} is not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write {what} {given}: permission denied in {folder}")
    return real


def check_output_folder(path, what: str = "folder") -> Path:
    """Refuse a folder output that cannot be made or written: a file at its place, or its nearest
    existing parent not a writable folder. Returns its real path (it is not created here)."""
    given = Path(path)
    real = Path(os.path.realpath(given))
    if real.exists() and not real.is_dir():
        raise OutputError(f"the {what} {given} is a file, not a folder: give a folder path")
    existing = real
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise OutputError(f"cannot make the {what} {given}: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write the {what} {given}: permission denied in {existing}")
    return real


def check_distinct(**paths) -> None:
    """Refuse two outputs (or an output and an input) that are one file: {name: path or None}."""
    seen: dict[str, str] = {}
    for name, path in paths.items():
        if path is None:
            continue
        real = os.path.realpath(path)
        if real in seen:
            raise OutputError(f"the {name} and the {seen[real]} are the same file {path}: give them different paths")
        seen[real] = name


def _same_file(a: Path, b) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet): compare where they point
        return os.path.realpath(a) == os.path.realpath(b)


class OutputLock:
    """An exclusive lock on an output path, held while a run writes it: a second run is refused
    with a message instead of silently overwriting the first one's work. The lock is an advisory
    `flock` on `.NAME.lock` beside the output; the kernel releases it when its holder dies (even by
    `kill -9`), so a crashed run never blocks the next one."""

    def __init__(self, path, what: str = "output"):
        self.path = Path(os.path.realpath(path))
        self.lock_path = self.path.with_name(f".{self.path.name}.lock")
        self.what = what
        self._fd = None

    def acquire(self) -> OutputLock:
        if fcntl is None or self._fd is not None:
            return self
        while True:
            try:
                fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
            except OSError as err:
                raise OutputError(f"cannot write {self.what} {self.path}: {_reason(err)}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 32).decode("ascii", "replace").strip() or "another process"
                os.close(fd)
                raise OutputError(f"{self.path} is being written by another scd run (process {holder}): "
                                  f"wait for it to finish or choose another {self.what} path") from None
            try:  # the previous holder may have removed the file between our open and our lock
                current = os.stat(self.lock_path).st_ino
            except FileNotFoundError:
                current = None
            if current == os.fstat(fd).st_ino:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.lock_path.unlink(missing_ok=True)  # while still held, so no one locks a removed file
        finally:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


class PendingFile:
    """A file that takes the place of `path` only once it holds something: written under a hidden
    temporary name beside `path`, renamed over it by `publish()` (the descriptor stays valid, so
    writing continues into the published file). Until then `path` is untouched; `discard()` removes
    the temporary file, the only file it ever removes. Unbuffered: every write is in the file at once."""

    def __init__(self, path, what: str = "output"):
        self.path = Path(os.path.realpath(path))
        self.what = what
        try:
            fd, self.tmp = _temporary_beside(self.path, "partial")
        except OSError as err:
            raise OutputError(f"cannot write {what} {path}: {_reason(err)}") from None
        self.file = os.fdopen(fd, "r+b", buffering=0)
        self.published = False

    def publish(self) -> None:
        if not self.published:
            os.replace(self.tmp, self.path)
            self.published = True

    def discard(self) -> None:
        """Close and remove the file unless it was published."""
        if not self.file.closed:
            self.file.close()
        if not self.published:
            Path(self.tmp).unlink(missing_ok=True)


def file_sha256(path: Path) -> str:
    """The sha256 of a file, read in blocks of 1 MiB."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
