"""Raw column values → the numpy arrays the models' raw inputs take (numpy and pandas only).

Both models take raw values (strings for categorical features, float32 for numeric ones) and do
their own lookups and standardisation in the graph (:mod:`models.preprocessing`). What stays on the
host is turning a table column, a list or a request field into such an array; the towers and the
ranker (and serving, which imports no TensorFlow) do it here, the same way.
"""

from __future__ import annotations

import numpy as np
import pandas as pd


def text_values(values: object, missing_value: str = "") -> np.ndarray:
    """A column as an object array of ``str``: null and ``""`` → ``missing_value``.

    Integer-valued floats are written without ``.0``: a pandas int column with nulls turns float,
    and ``13.0`` must still find the vocabulary entry ``13``. The graph maps ``""`` to the spec's
    missing marker itself, so ``""`` (the default) and the marker give the same row.
    """
    series = values if isinstance(values, pd.Series) else pd.Series(values)
    if pd.api.types.is_float_dtype(series.dtype):
        finite = series.dropna()
        if (finite == finite.round()).all():
            series = series.astype("Int64")
    mask = series.isna().to_numpy()
    text = series.astype(str).to_numpy(dtype=object)
    text[mask] = missing_value
    text[text == ""] = missing_value
    return text


def number_values(values: object) -> np.ndarray:
    """A column as float32: null or unparseable → NaN, which the graph maps to the feature's
    default."""
    series = values if isinstance(values, pd.Series) else pd.Series(values)
    return pd.to_numeric(series, errors="coerce").to_numpy(dtype=np.float32, na_value=np.nan)
