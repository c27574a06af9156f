"""Run directories: checked before anything is written, and locked while a run uses them.

Two trainings in one workdir would overwrite each other's checkpoints and interleave their
metrics, so a run holds an advisory lock on `<workdir>/.lock` from start to exit. The lock is an
`fcntl.flock` on that file, which the kernel releases when the process ends however it ends
(exit, exception, kill -9), so a lock left by a crashed run is never in the way: the file
stays, its pid and host are only read to say who holds a lock that is still live.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import tempfile

LOCK_NAME = ".lock"


def check_workdir(workdir: str | os.PathLike, *, create: bool = True) -> str:
    """Checks that `workdir` is (or can become) a writable directory, creating it if asked.

    Args:
      workdir: the run directory.
      create: create it (and its parents) if absent; if False, a missing workdir is an error
        (what evaluation wants: a mistyped path must not leave a new empty folder behind).

    Returns:
      the workdir as a string.

    Raises:
      ValueError: one line naming the path, what is wrong with it and the fix.
    """
    path = os.fspath(workdir)
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"workdir {path!r} is a file, not a directory; pass another --workdir")
    if not os.path.exists(path):
        if not create:
            raise ValueError(f"workdir {path!r} does not exist; check the --workdir path")
        try:
            os.makedirs(path, exist_ok=True)
        except OSError as err:
            raise ValueError(
                f"cannot create workdir {path!r} ({err.strerror}); pass a --workdir in a "
                "writable place"
            ) from None
    if create:
        try:
            tempfile.TemporaryFile(dir=path).close()
        except OSError as err:
            raise ValueError(
                f"workdir {path!r} is not writable ({err.strerror}); fix its permissions or pass "
                "another --workdir"
            ) from None
    return path


def remove_if_unused(workdir: str | os.PathLike) -> bool:
    """Removes a workdir that holds nothing but a lock file and empty folders.

    For a run refused before it wrote anything (bad data, say), so a fresh workdir is not left
    behind half made.

    Returns:
      True if the workdir was removed.
    """
    path = os.fspath(workdir)
    for root, dirs, files in os.walk(path, topdown=False):
        if any(not (root == path and f == LOCK_NAME) for f in files):
            return False
        if any(os.listdir(os.path.join(root, d)) for d in dirs):
            return False
    for root, dirs, _ in os.walk(path, topdown=False):
        for d in dirs:
            os.rmdir(os.path.join(root, d))
    if os.path.exists(os.path.join(path, LOCK_NAME)):
        os.remove(os.path.join(path, LOCK_NAME))
    os.rmdir(path)
    return True


class WorkdirLock:
    """An exclusive advisory lock on a run directory, held until `release()` or process exit.

    Example:
      with WorkdirLock(workdir):
          ...  # train; a second run on the same workdir gets a ValueError meanwhile
    """

    def __init__(self, workdir: str | os.PathLike, *, active: bool = True) -> None:
        """Takes the lock.

        Args:
          workdir: an existing, writable directory (see `check_workdir`).
          active: False makes this a no-op (the other processes of one multi-process run, whose
            process 0 holds the lock).

        Raises:
          ValueError: another live process holds the lock (names its pid and host).
        """
        self.path = os.path.join(os.fspath(workdir), LOCK_NAME)
        self._fd: int | None = None
        if not active:
            return
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            holder = _read_holder(self._fd)
            os.close(self._fd)
            self._fd = None
            if err.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            raise ValueError(
                f"workdir {os.fspath(workdir)!r} is in use by another run ({holder}, lock file "
                f"{self.path}); wait for it to finish or pass another --workdir"
            ) from None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)

    def release(self) -> None:
        """Releases the lock (the lock file stays; it holds no lock once released)."""
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> WorkdirLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read_holder(fd: int) -> str:
    text = os.pread(fd, 200, 0).decode(errors="replace").strip()
    return text or "pid unknown"
