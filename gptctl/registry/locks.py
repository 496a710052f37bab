"""One lock per directory, held by the one process that writes it (the trainer of a run directory, the
`data prepare` of a data root).

Two signs of life, because a home may be shared by several hosts (a cluster filesystem):
- an flock: the OS drops it when its holder dies, on its host at once; across hosts (NFS) only once the
  server's lease on the dead client runs out, and some filesystems have none (Lustre without -o flock);
- a heartbeat: the holder touches the lock file every HEARTBEAT_S seconds, and the file says who holds it.
  A holder is dead when its file's mtime stands still for longer than that. Whoever watches compares the
  file's mtime with itself, never with its own clock, so hosts whose clocks disagree agree on it.
"""

import errno
import fcntl
import json
import os
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

LOCK_NAME = ".lock"
HEARTBEAT_S = 10.0
# How long a requeued job watches a lock held on another host before it takes over one whose heartbeat
# stopped (the node died): well past a beat, so that a slow filesystem is not taken for a dead holder.
TAKEOVER_WAIT_S = 4 * HEARTBEAT_S
STALE_AFTER_S = 6 * HEARTBEAT_S  # a run whose lock has not beaten for this long is stale, seen from any host
_NO_FLOCK = (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL)


class DirectoryLock:
    def __init__(self, directory: Path):
        self.path = directory / LOCK_NAME
        self.fd: int | None = None
        self._stop = threading.Event()
        self._beating: threading.Thread | None = None

    def acquire(self, wait_s: float = 0.0, say=lambda message: None) -> bool:
        """Take the lock; False while a live process holds it. A holder on this host is alive while its flock
        is; one on another host while its heartbeat goes on: watched for up to `wait_s` seconds (`say` tells
        why the wait), then a lock whose heartbeat stood still is taken over (its node died)."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            holder = self.holder()
            if holder.get("host") in (None, socket.gethostname()) or wait_s <= 0:
                return False  # on this host a held flock is a live holder
            say(f"the lock of {self.path.parent} is held by pid {holder.get('pid')} on {holder.get('host')}; "
                f"watching its heartbeat for up to {wait_s:.0f} s")
            dead = self._inode()
            if not self._heartbeat_stopped(wait_s) or (fd := self._take_over(dead)) is None:
                return False
        except OSError as exc:  # a filesystem without flock: the heartbeat alone tells a live holder
            os.close(fd)
            if exc.errno not in _NO_FLOCK:
                raise
            holder = self.holder()
            if holder and not self._is_dead_here(holder) and (
                    heartbeat_age(self.path.parent) < STALE_AFTER_S if wait_s <= 0 else not self._heartbeat_stopped(wait_s)):
                return False
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        self.fd = fd
        try:  # who holds it, for watchers on other hosts; the lock holds without it (a full disk)
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode(), 0)
        except OSError:
            pass
        self._start_heartbeat()
        return True

    def release(self) -> None:
        self._stop.set()
        if self._beating is not None:
            self._beating.join()
            self._beating = None
        if self.fd is not None:
            try:
                os.ftruncate(self.fd, 0)  # no holder named: where flocks fail, the next taker need not wait
            except OSError:
                pass
            os.close(self.fd)
            self.fd = None

    def holder(self) -> dict:
        """Who the lock file says holds it ({} when it says nothing: an older gptctl wrote a bare pid)."""
        try:
            info = json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return {}
        return info if isinstance(info, dict) else {}

    def _start_heartbeat(self) -> None:
        self._stop.clear()
        self._beating = threading.Thread(target=self._beat, name="lock-heartbeat", daemon=True)
        self._beating.start()

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.fd)  # times=None: the filesystem's own clock (a network server's)
            except OSError:
                pass  # a full or flaky disk: a missed beat; a lasting silence is what watchers judge

    def _heartbeat_stopped(self, wait_s: float) -> bool:
        """Watch the lock file for `wait_s` seconds: False as soon as its mtime moves (or its flock is free,
        then the caller tries again), True when it stood still the whole time."""
        try:
            first = self.path.stat().st_mtime_ns
        except FileNotFoundError:
            return True
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            time.sleep(min(1.0, wait_s / 4))
            try:
                if self.path.stat().st_mtime_ns != first:
                    return False
            except FileNotFoundError:
                return True
        return True

    def _inode(self) -> int | None:
        try:
            return self.path.stat().st_ino
        except FileNotFoundError:
            return None

    def _take_over(self, dead: int | None) -> int | None:
        """A new lock file in place of the one (inode `dead`) a dead node still holds: its flock stays with the
        old file. Two jobs taking over at once are serialised by a second lock file, which no dead node holds;
        the one that finds the file already replaced lets the other have it (None)."""
        guard = os.open(self.path.with_name(LOCK_NAME + ".takeover"), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(guard, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return None
            if self._inode() != dead:
                return None
            fd, tmp = tempfile.mkstemp(prefix=".lock-", dir=self.path.parent)
            os.fchmod(fd, 0o644)  # as the lock it replaces: other users of a shared home read it
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.replace(tmp, self.path)
        finally:
            os.close(guard)
        print(f"warning: took over the lock of {self.path.parent}: its holder's heartbeat stopped", file=sys.stderr)
        return fd

    @staticmethod
    def _is_dead_here(holder: dict) -> bool:
        if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
            return False
        try:
            os.kill(holder["pid"], 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False


def run_is_locked(run_dir: Path) -> bool:
    """Whether a process on this host (or any, where the filesystem shares flocks) holds the run's lock."""
    path = run_dir / LOCK_NAME
    if not path.exists():
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError as exc:
        if exc.errno not in _NO_FLOCK:
            raise
        return heartbeat_age(run_dir) < STALE_AFTER_S
    finally:
        os.close(fd)
    return False


def heartbeat_age(run_dir: Path) -> float:
    """Seconds since the run's lock last beat, by the filesystem's clock (a file made now in the same
    directory), so that it means the same from every host; infinite without a lock file."""
    try:
        beat = (run_dir / LOCK_NAME).stat().st_mtime
    except OSError:
        return float("inf")
    try:
        with tempfile.NamedTemporaryFile(prefix=".clock-", dir=run_dir) as probe:
            now = os.fstat(probe.fileno()).st_mtime
    except OSError:  # a read-only home: this host's clock is the best there is
        now = time.time()
    return max(now - beat, 0.0)
