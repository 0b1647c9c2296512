"""The writer lock, house-wide: one writer per store stage (`slf_utils.store`) and one `grid run` per results folder
(`slf_utils.grid`). An advisory `fcntl.flock` on a file that names its holder; the kernel releases it when the
holder dies, and a dead holder's lock on this host is taken over. See docs/store.md, "One writer per stage"."""

from __future__ import annotations

import fcntl
import json
import os
import re
import socket
import sys
import time
from pathlib import Path

HOST = re.sub(r"[^A-Za-z0-9.-]", "-", socket.gethostname()) or "host"  # file-name safe: temp names carry it


class StoreLocked(RuntimeError):
    """Another process holds the writer lock; the message names it and says how to clear a stale lock. (Named for
    the store, its first user; the grid's lock raises it too.)"""


def alive(pid) -> bool:
    """Whether a process of this host runs (a zombie, dead but not yet reaped, does not)."""
    try:
        os.kill(int(pid), 0)
    except PermissionError:  # exists, another user's
        return True
    except (OSError, TypeError, ValueError):
        return False
    try:
        return Path(f"/proc/{int(pid)}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


_held: dict = {}  # lock path -> [pid, fd, holders]: instances of one process share a lock


class WriterLock:
    """An exclusive, advisory lock on `path` (`fcntl.flock`: the kernel releases it when the process dies). The file
    records the holder (host, pid, command); a refused process gets them in the message. Reentrant within a
    process. `with WriterLock(path, what):` or `acquire()`/`release()`."""

    def __init__(self, path, what: str):
        self.path, self.what, self.held = Path(path), what, False

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()

    def __del__(self):
        self.release()

    def _holder(self) -> dict:
        try:
            return json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return {}

    def acquire(self, wait_s: float = 2.0):
        """Take the lock or raise StoreLocked. Waits up to `wait_s` (a `check` may be probing it for a moment)."""
        if self.held:
            return self
        got = _held.get(str(self.path))
        if got and got[0] == os.getpid():
            got[2] += 1
            self.held = True
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + wait_s
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                info = self._holder()
                same = _same_file(fd, self.path)
                os.close(fd)
                if same and info.get("host") == HOST and not alive(info.get("pid")):
                    # stale: its holder died and a forked child of it keeps the flock; a new file is a new lock
                    self.path.unlink(missing_ok=True)
                    continue
                if time.monotonic() < deadline:
                    time.sleep(0.05)
                    continue
                raise StoreLocked(self._refusal(info)) from None
            if not _same_file(fd, self.path):  # another process took a stale lock over meanwhile: try again
                os.close(fd)
                continue
            info = {"host": HOST, "pid": os.getpid(), "command": " ".join(sys.argv)[:300], "what": self.what}
            info["since"] = time.strftime("%Y-%m-%d %H:%M:%S")
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(info).encode(), 0)
            _held[str(self.path)] = [os.getpid(), fd, 1]
            self.held = True
            return self

    def _refusal(self, info) -> str:
        who = f"pid {info.get('pid', '?')} on {info.get('host', '?')} ({info.get('command', '?')!r}, since "
        who += f"{info.get('since', '?')}: {info.get('what', '?')})"
        return (
            f"{self.what}: refused, {who} holds {self.path}. One writer at a time: wait for it to finish or stop it. "
            f"If that process no longer exists (its host crashed), remove {self.path} and retry; on this host a "
            "dead holder's lock is taken over by itself."
        )

    def release(self):
        if not self.held:
            return
        self.held = False
        got = _held.get(str(self.path))
        if not got or got[0] != os.getpid():
            return
        got[2] -= 1
        if got[2] == 0:
            del _held[str(self.path)]
            fcntl.flock(got[1], fcntl.LOCK_UN)
            os.close(got[1])


def _same_file(fd, path) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def lock_busy(path) -> bool:
    """Whether another process holds the lock at `path` (taken and released at once if free)."""
    got = _held.get(str(path))
    if (got and got[0] == os.getpid()) or not Path(path).exists():
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
