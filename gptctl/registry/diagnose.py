"""What went wrong with the registry, in gptctl's words, with the real cause.

SQLite reports a full disk, a read-only file, a lock held too long and real damage alike as errors;
following "damaged, rebuild it" for a full disk would move a healthy registry aside and lose its pins,
W&B ids and resume-time changes. So only damage that an integrity check confirms (or a file that is not
a database) mentions `gptctl registry rebuild`; everything else names what to fix.
"""

import errno
import os
import shutil
import sqlite3
import tempfile
from pathlib import Path

from gptctl.registry import storage

REBUILD = "`gptctl registry rebuild`"
STATE_FILES = ("", "-wal", "-journal")  # the registry and the journals that hold its latest state

_READ_ONLY = (errno.EROFS, errno.EACCES, errno.EPERM)
# What SQLite says when the filesystem's locks fail it (NFS without lockd, some FUSE and CIFS mounts).
_NO_LOCKS = ("SQLITE_PROTOCOL", "SQLITE_IOERR_LOCK", "SQLITE_IOERR_RDLOCK", "SQLITE_IOERR_UNLOCK",
             "SQLITE_IOERR_CHECKRESERVEDLOCK", "SQLITE_IOERR_SHMLOCK", "SQLITE_IOERR_SHMMAP", "SQLITE_IOERR_SHMOPEN",
             "SQLITE_IOERR_SHMSIZE", "SQLITE_NOLFS")


def explain(exc: BaseException, path: Path) -> str:
    """One line naming the cause of `exc`, raised while using the registry file `path`."""
    name = getattr(exc, "sqlite_errorname", "") or ""
    code = getattr(exc, "errno", None)
    text = str(exc)
    if name.startswith("SQLITE_FULL") or code == errno.ENOSPC or "disk is full" in text or (
            name.startswith("SQLITE_IOERR") and _nearly_full(path)):  # e.g. no room to grow the -shm file
        return (f"no space left on the disk holding the registry {path} ({_free(path)} free); free some space and "
                "run the command again (the registry is intact)")
    if name.startswith("SQLITE_READONLY") or code in _READ_ONLY or "readonly database" in text:
        return (f"the registry {path} cannot be written ({_why_read_only(path)}); commands that only read it "
                "work; run this one where the home is writable, or point --home at a writable copy")
    if code == errno.ENAMETOOLONG or _too_long(path):
        return f"the registry's path is too long for the filesystem ({len(os.fsencode(str(path)))} bytes); use a shorter --home"
    if name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")) or "database is locked" in text:
        return (f"the registry {path} stayed locked by another process for over {storage.BUSY_TIMEOUT_MS / 1000:g} s (a long prune, "
                "rebuild or verify?); wait for it and run the command again")
    if name.startswith(_NO_LOCKS) or "locking protocol" in text:
        return (f"the filesystem holding the registry {path} does not give SQLite working locks ({text}); put the "
                "home on a local or lock-capable filesystem (see README: network filesystems)")
    if name == "SQLITE_CANTOPEN" or "unable to open database" in text:
        if not path.parent.is_dir():
            return f"the registry's directory {path.parent} does not exist or is not a directory; check --home"
        if not _writable(path.parent):
            return (f"the registry {path} cannot be opened: {_why_read_only(path)}; commands that only read it "
                    "work on a home that holds one; point --home at a writable directory")
        return f"the registry {path} cannot be opened ({text}); check the file's permissions and the disk"
    problem = integrity_problem(path)
    if problem is None:
        return (f"SQLite reported '{text}' on the registry {path}, but it passes an integrity check (quick_check); "
                "run the command again, and check the disk if it recurs")
    return (f"the registry {path} is damaged ({problem}); {REBUILD} moves it aside and re-creates it from the run "
            "directories")


def integrity_problem(path: Path) -> str | None:
    """None when `path` is a sound SQLite database (PRAGMA quick_check), else what is wrong with it. Checked
    on a copy of the file and its journal, so that neither locks nor a read-only home get in the way."""
    if not path.is_file():
        return None
    with tempfile.TemporaryDirectory(prefix="gptctl-check-") as tmp:
        copy = Path(tmp) / path.name
        try:
            for suffix in STATE_FILES:
                if Path(f"{path}{suffix}").is_file():
                    shutil.copyfile(f"{path}{suffix}", f"{copy}{suffix}")
        except OSError:
            return None  # not readable (permissions, a full /tmp): no verdict on damage
        try:
            conn = sqlite3.connect(copy)
            try:
                rows = conn.execute("PRAGMA quick_check").fetchall()
            finally:
                conn.close()
        except sqlite3.DatabaseError as exc:
            return str(exc)
    verdict = "; ".join(str(r[0]) for r in rows[:3])
    return None if verdict == "ok" else verdict


def is_damaged(exc: BaseException, path: Path) -> bool:
    """Whether `exc` comes from real damage: only then may a rebuild move the registry aside."""
    return explain(exc, path).startswith(f"the registry {path} is damaged")


def _nearly_full(path: Path) -> bool:
    try:
        return shutil.disk_usage(path.parent).free < 1 << 20
    except OSError:
        return False


def _free(path: Path) -> str:
    try:
        return f"{shutil.disk_usage(path.parent).free / 1e6:,.1f} MB"
    except OSError:
        return "unknown"


def _writable(directory: Path) -> bool:
    try:
        return os.access(directory, os.W_OK) and not os.statvfs(directory).f_flag & os.ST_RDONLY
    except OSError:
        return False


def _why_read_only(path: Path) -> str:
    try:
        if os.statvfs(path.parent).f_flag & os.ST_RDONLY:
            return "its filesystem is mounted read-only"
    except OSError:
        pass
    if path.exists() and not os.access(path, os.W_OK):
        return "the file is read-only for this user"
    return "its directory is not writable for this user"


def _too_long(path: Path) -> bool:
    try:
        limit = os.pathconf(path.parent if path.parent.exists() else "/", "PC_NAME_MAX")
    except (OSError, ValueError):
        limit = 255
    # SQLite takes paths of at most 512 bytes, its journal's name ("-journal") included
    return any(len(os.fsencode(part)) > limit for part in path.parts) or len(os.fsencode(str(path))) > 503


# Conditions of the disk a user can fix in a second: one line, no traceback, wherever they happen.
FIXABLE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENAMETOOLONG)
_FIXES = {
    errno.ENOSPC: "no space left on its disk; free some space and run the command again",
    errno.EDQUOT: "the disk quota is exceeded; free some space and run the command again",
    errno.EROFS: "its filesystem is mounted read-only; run this where it is writable",
    errno.EACCES: "permission denied; run this where you may write, or as the directory's owner",
    errno.EPERM: "operation not permitted; run this where you may write, or as the directory's owner",
    errno.ENAMETOOLONG: "the path is too long for the filesystem; use shorter names (--home, --data-root, --run-name)",
}


def explain_file_error(exc: OSError, registry: Path) -> str:
    """One line for a fixable OSError (FIXABLE_ERRNOS) on any of gptctl's files."""
    name = exc.filename and Path(exc.filename)
    if name and name.name.startswith(registry.name) and name.parent == registry.parent:
        return explain(exc, registry)
    return f"cannot write {exc.filename or 'a file'}: {_FIXES.get(exc.errno, exc.strerror)}"
