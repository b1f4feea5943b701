"""The ranker's training batches stay within memory at scale.

The 10M daily run with the window FM was killed by the kernel's OOM killer (19.4 GB) in the
ranker stage: every fit's ``tf.data`` shuffle buffer held each of its 2.3M rows as its own
tensors (about 150 bytes per scalar feature), for the FM's integer codes and again for the
network's inputs. The buffer now holds row indices and each batch gathers its rows, which gives
the very same batches in the very same order.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from typing import Any

import numpy as np

from models.ranker.train import training_dataset

ROWS = 300_000
FEATURES = 20

# Peak RSS growth of one shuffled epoch over ROWS x FEATURES int64 codes, in a fresh process
# (pytest's own memory would hide it). Rows as buffer elements took about 0.95 GB here.
_EPOCH_PEAK = textwrap.dedent(
    f"""
    import json, resource
    import numpy as np
    from models.ranker.train import training_dataset

    codes = {{f"f{{i}}": np.arange({ROWS}, dtype=np.int64) % 997 for i in range({FEATURES})}}
    labels = (np.arange({ROWS}) % 31 == 0).astype(np.float32)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for _ in training_dataset(codes, labels, 1024, seed=7):
        pass
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({{"growth_mb": (after - before) / 1024}}))
    """
)


def test_one_shuffled_epoch_does_not_hold_every_row_as_tensors() -> None:
    done = subprocess.run(
        [sys.executable, "-c", _EPOCH_PEAK], capture_output=True, text=True, check=True
    )
    growth_mb = json.loads(done.stdout.strip().splitlines()[-1])["growth_mb"]
    data_mb = ROWS * (FEATURES + 1) * 8 / 2**20  # the arrays themselves: 48 MB
    assert growth_mb < 6 * data_mb, f"one epoch grew the process by {growth_mb:.0f} MB"


def one_epoch(data: Any) -> tuple[np.ndarray, list[str], np.ndarray]:
    """The codes, names and labels of one pass over ``data``, in batch order."""
    batches = list(data)
    return (
        np.concatenate([b[0]["code"].numpy() for b in batches]),
        [n.decode() for b in batches for n in b[0]["name"].numpy()],
        np.concatenate([b[1].numpy() for b in batches]),
    )


def test_batches_are_a_seeded_permutation_reshuffled_each_epoch() -> None:
    rows = 5_000
    inputs = {
        "code": np.arange(rows, dtype=np.int64),
        "name": np.array([f"v{i}" for i in range(rows)], dtype=object),
    }
    labels = np.arange(rows, dtype=np.float32)
    data = training_dataset(inputs, labels, 256, seed=7)

    codes, names, order = one_epoch(data)
    assert sorted(codes.tolist()) == list(range(rows))  # every row once
    assert (order == codes).all()  # labels travel with their rows
    assert names == [f"v{c}" for c in codes]
    assert not (codes == np.arange(rows)).all()  # shuffled
    again, _, _ = one_epoch(data)
    assert not (again == codes).all()  # reshuffled each epoch
    same_seed, _, _ = one_epoch(training_dataset(inputs, labels, 256, seed=7))
    assert (same_seed == codes).all()  # reproducible from the seed


def test_without_a_seed_the_rows_keep_their_order() -> None:
    inputs = {"code": np.arange(1_000, dtype=np.int64), "name": np.array(["x"] * 1_000)}
    data = training_dataset(inputs, np.zeros(1_000, dtype=np.float32), 300, seed=None)
    assert one_epoch(data)[0].tolist() == list(range(1_000))
