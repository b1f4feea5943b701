"""Worker processes share one copy of the index and the ad table (DESIGN.md, "shared memory").

ANNOY maps ``ads.ann`` read-only and the tables open with ``np.load(mmap_mode="r")``, so the kernel
keeps one copy in the page cache for every process. Two real processes load the same published
release and touch every page; the kernel's own accounting (/proc/<pid>/smaps) must then show those
mappings as clean shared pages, each process charged about half of them (PSS ≈ RSS / 2).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from candidates.index import build_index
from candidates.store import publish_embeddings
from candidates.synthetic import two_tower_like

pytestmark = pytest.mark.skipif(
    not Path("/proc/self/smaps").exists(), reason="needs Linux /proc/<pid>/smaps"
)

WORKER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    import numpy as np
    from candidates.service import CandidateService
    service = CandidateService.load(Path(sys.argv[1]), Path(sys.argv[2]), prefault=True)
    np.asarray(service.embeddings.ads.vectors).sum()  # reads every page of the ad table
    assert len(service.candidates("user0", "placement0", 100).candidates) == 100
    print("ready", flush=True)
    sys.stdin.readline()  # hold the mappings until the parent has measured
    """
)


def mapping_memory(pid: int, path: Path) -> dict[str, int]:
    """Sum of the smaps fields (kB) over every mapping of ``path`` in process ``pid``."""
    totals: dict[str, int] = {}
    inside = False
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        head = line.split(maxsplit=1)[0]
        if not head.endswith(":"):  # a mapping header: "start-end perms offset dev inode path"
            inside = line.rstrip().endswith(str(path))
        elif inside and line.rstrip().endswith(" kB"):
            totals[head[:-1]] = totals.get(head[:-1], 0) + int(line.split()[1])
    return totals


def test_two_workers_share_one_copy_of_the_index(tmp_path: Path) -> None:
    data = two_tower_like(n_ads=150_000, n_users=100, n_placements=4, dim=16, seed=5)
    emb = publish_embeddings(tmp_path / "embeddings", "20240105", data.tables, data.fallbacks)
    index = build_index(
        emb, tmp_path / "index", n_trees=10, recall_queries=20, recall_floor=0.0, n_jobs=2
    )
    files = [index / "ads.ann", emb / "ads_vectors.npy"]
    assert (index / "ads.ann").stat().st_size > 20 * 2**20  # tens of MB, not a toy
    for path in files:  # freshly written pages count as Shared_Dirty until written back
        descriptor = os.open(path, os.O_RDONLY)
        os.fsync(descriptor)
        os.close(descriptor)

    workers = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, str(index), str(emb)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    try:
        for worker in workers:
            assert worker.stdout is not None and worker.stdout.readline().strip() == "ready"
        usage = {(w.pid, f.name): mapping_memory(w.pid, f) for w in workers for f in files}
    finally:
        for worker in workers:
            worker.communicate(input="\n", timeout=30)

    for (pid, name), memory in usage.items():
        size_kb = next(f for f in files if f.name == name).stat().st_size / 1024
        assert memory["Rss"] >= 0.95 * size_kb, (pid, name, memory)  # every page is mapped
        assert memory["Shared_Clean"] >= 0.95 * memory["Rss"], (pid, name, memory)
        assert memory["Private_Dirty"] == 0, (pid, name, memory)  # nobody holds a copy
        assert 0.4 * memory["Rss"] <= memory["Pss"] <= 0.6 * memory["Rss"], (pid, name, memory)
