"""What filesystem a path lies on: SQLite's WAL mode is safe only where every process shares one host.

WAL keeps its index in shared memory (the -shm file, mmapped), which processes on different hosts of a
network filesystem do not share: two nodes writing one registry in WAL mode can corrupt it. On such a
filesystem the registry uses SQLite's rollback journal and its POSIX locks instead, which a lock-capable
mount (NFSv4, NFSv3 with lockd, Lustre with -o flock, GPFS, BeeGFS) honours across hosts.
"""

from pathlib import Path

# How long a writer waits for another's lock before it fails (read at each use: tests shorten it).
BUSY_TIMEOUT_MS = 30_000

NETWORK_FILESYSTEMS = frozenset({
    "nfs", "nfs4", "lustre", "gpfs", "cifs", "smb3", "smbfs", "beegfs", "fuse.beegfs", "ceph", "fuse.ceph",
    "glusterfs", "fuse.glusterfs", "fuse.sshfs", "afs", "9p", "pvfs2", "orangefs", "panfs", "wekafs",
    "fuse.juicefs", "fuse.gcsfuse", "fuse.s3fs", "fuse.mountpoint-s3",
})
MOUNTINFO = Path("/proc/self/mountinfo")


def filesystem_type(path: Path, mountinfo: str | None = None) -> str | None:
    """The type of the filesystem holding `path` (which need not exist yet), from the kernel's mount
    table (`mountinfo`: its text, for tests); None where there is none to read (not Linux)."""
    if mountinfo is None:
        try:
            mountinfo = MOUNTINFO.read_text()
        except OSError:
            return None
    path = Path(path).resolve()  # symlinks of the part that exists resolved, the rest as written
    best, kind = None, None
    for line in mountinfo.splitlines():
        fields = line.split(" ")
        if " - " not in line or len(fields) < 5:
            continue
        point = Path(fields[4].replace("\\040", " "))
        fs = line.split(" - ", 1)[1].split(" ")[0]
        if path.is_relative_to(point) and (best is None or len(point.parts) >= len(best.parts)):
            best, kind = point, fs
    return kind


def is_network(path: Path, mountinfo: str | None = None) -> bool:
    return filesystem_type(path, mountinfo) in NETWORK_FILESYSTEMS
