"""Proving an ANNOY file safe to search before a serving process maps it (issue 12, item 1).

ANNOY trusts every byte of ``ads.ann``: a file whose size and checksums are right but whose nodes
are garbage (a buggy or hostile builder that recomputed the manifest) makes ``get_nns_by_vector``
read outside the mapping, and the *process* dies with a segmentation fault — no exception to catch.
So the release loader opens and searches a candidate index in a child process first
(:func:`probe_index`): every tree is walked to its leaves by a search that visits all nodes, and a
sample of items is searched the way requests search. A child killed by a signal, stuck past its
deadline or failing a check is a refusal; the serving process never touches a file that a child
could not search.

Run as ``python -m serving.index_probe <index folder>`` (that is what :func:`probe_index` does);
it imports only ``candidates.index`` (numpy and annoy), so it starts in a fraction of a second.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np

from deepclick.errors import DeepclickError

SAMPLE_QUERIES = 32
"""Items searched like requests are, besides the full walk."""
EXIT_REFUSED = 3


class IndexProbeError(DeepclickError, ValueError):
    """The index crashed, hung or failed a check when searched in a child process."""


def search_everything(folder: Path, *, seed: int = 0) -> int:
    """Open ``folder`` and search it exhaustively; return the number of searches. Runs in the
    child: a corrupt forest kills this process, not the caller."""
    from candidates.index import open_index

    index = open_index(folder, verify_checksums=False)
    try:
        n = len(index)
        if n == 0:
            return 0
        rng = np.random.default_rng(seed)
        rows = rng.choice(n, size=min(SAMPLE_QUERIES, n), replace=False)
        # search_k above the node count: every node of every tree is visited.
        everything = int(index.manifest["counts"]["ann_nodes"]) * 2 + n
        found = index.annoy.get_nns_by_vector(index.annoy.get_item_vector(int(rows[0])), n,
                                              search_k=everything)  # fmt: skip
        if any(not 0 <= row < n for row in found):
            raise ValueError(f"the full search returned rows outside 0..{n - 1}")
        for row in rows:
            hits = index.search(index.item_vector(int(row)), min(100, n))
            if any(not 0 <= hit < n for hit in hits):
                raise ValueError(f"a search returned rows outside 0..{n - 1}")
        return 1 + len(rows)
    finally:
        index.close()


def probe_index(folder: Path, *, timeout_s: float) -> None:
    """Search ``folder``'s index in a child process; return when it succeeded.

    Raises:
        IndexProbeError: the child died by a signal (a segfault: the forest is corrupt), ran past
            ``timeout_s`` (a corrupt forest can loop) or refused the index; the message says which.
    """
    package_root = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    command = [sys.executable, "-X", "faulthandler", "-m", "serving.index_probe", str(folder)]
    try:
        child = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout_s, env=env, check=False
        )
    except subprocess.TimeoutExpired:
        raise IndexProbeError(
            f"index {folder}: a child process searching it did not finish within {timeout_s:.0f} s "
            "(a corrupt forest can loop forever); rebuild the index"
        ) from None
    if child.returncode == 0:
        return
    if child.returncode < 0:
        name = signal.Signals(-child.returncode).name
        raise IndexProbeError(
            f"index {folder}: searching it killed a child process with {name}: ads.ann is "
            "corrupt even though its checksums match the manifest; rebuild the index"
        )
    last = (child.stderr.strip().splitlines() or ["no message"])[-1]
    raise IndexProbeError(f"index {folder}: refused by a child process that searched it: {last}")


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m serving.index_probe <index folder>", file=sys.stderr)
        return 2
    try:
        search_everything(Path(args[0]))
    except (OSError, ValueError) as exc:
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    return 0


if __name__ == "__main__":
    sys.exit(main())
