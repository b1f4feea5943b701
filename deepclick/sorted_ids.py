"""Sorted-id tables: the one rule by which every mapped table finds an id's row.

Embedding tables (``candidates.store``), the release's entity feature tables
(``serving.features``), the ranker's similarity inputs (``models.ranker.similarity``) and the ALS
factors all keep their ids sorted as fixed-width UTF-8 bytes (numpy ``S<n>``) with row i belonging
to id i, so a lookup is a binary search over a mapped array: no per-process dict of strings, one
copy of the pages for every worker. This module is the lookup, so all of them agree on it
(an empty id, an id with NUL or one wider than the table is never found).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def sorted_rows(ids: np.ndarray, keys: Sequence[bytes] | np.ndarray) -> np.ndarray:
    """Row of each UTF-8 ``key`` in the sorted fixed-width ``ids``, -1 when absent. Keys longer
    than the width (or empty, or with NUL) cannot be stored ids, so they are never found."""
    out = np.full(len(keys), -1, dtype=np.int64)
    if not len(ids) or not len(keys):
        return out
    width = ids.dtype.itemsize
    if isinstance(keys, np.ndarray) and keys.dtype.kind == "S":  # numpy keeps no trailing NUL
        lengths = np.char.str_len(keys)
        fits = (lengths > 0) & (lengths <= width)
        probe = keys.astype(ids.dtype)
    else:
        fits = np.array([0 < len(k) <= width and b"\x00" not in k for k in keys])
        probe = np.array(keys, dtype=ids.dtype)  # over-long keys are truncated; `fits` masks them
    pos = np.minimum(np.searchsorted(ids, probe), len(ids) - 1)
    found = fits & (ids[pos] == probe)
    out[found] = pos[found]
    return out
