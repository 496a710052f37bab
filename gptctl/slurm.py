"""Inside a SLURM allocation, the node count, this node's rank and node 0's address come from SLURM.

They are defaults: options given on the command line or in --config still win.
"""

import re

_RANGE_GROUP = re.compile(r"([^,\[]+)(?:\[([^\]]+)\])?")


def expand_nodelist(nodelist: str) -> list[str]:
    """SLURM's compressed host list, e.g. "gpu[01-03,07],login1" -> gpu01, gpu02, gpu03, gpu07, login1."""
    hosts = []
    for match in _RANGE_GROUP.finditer(nodelist):
        prefix, ranges = match.group(1).lstrip(","), match.group(2)
        if not prefix:
            continue
        if ranges is None:
            hosts.append(prefix)
            continue
        for part in ranges.split(","):
            first, _, last = part.partition("-")
            width = len(first)  # keep zero padding: 01-03 -> 01, 02, 03
            for n in range(int(first), int(last or first) + 1):
                hosts.append(f"{prefix}{n:0{width}d}")
    return hosts


def launch_defaults(env: dict[str, str]) -> dict[str, object]:
    """nnodes, node_rank and master_addr for a job step of a multi-node SLURM allocation; {} elsewhere."""
    if "SLURM_JOB_ID" not in env or int(env.get("SLURM_NNODES", "1")) <= 1:
        return {}
    hosts = expand_nodelist(env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST", ""))
    defaults: dict[str, object] = {"nnodes": int(env["SLURM_NNODES"]), "node_rank": int(env.get("SLURM_NODEID", "0"))}
    if hosts:
        defaults["master_addr"] = hosts[0]
    return defaults
