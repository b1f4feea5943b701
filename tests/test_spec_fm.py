"""``bench.spec_fm``'s pure parts: which features form each side, the fit's vocabularies (a
value the fit never saw reads as the feature's one unknown code, never trained) and the blend
with the ranker."""

from __future__ import annotations

import numpy as np
import pandas as pd
from feature_folder import write_feature_folder

from bench.spec_fm import (
    blend_with_ranker,
    hours,
    spec_sides,
    vocabularies,
    vocabulary_codes,
)
from models.ranker.fm import LEFT_OUT


def test_the_sides_leave_out_the_user_id_the_weekday_and_the_hour(tmp_path) -> None:
    spec = write_feature_folder(tmp_path / "f", users=50, ads=20, impressions_per_day=200).spec
    sides = spec_sides(spec)
    roles = {f.name: f.role for f in spec.categorical}
    assert sides["user"] and sides["ad"] and "ad_id" in sides["ad"]
    assert {roles[n] for n in sides["user"]} <= {"user", "context"}
    assert {roles[n] for n in sides["ad"]} == {"ad"}
    taken = {*sides["user"], *sides["ad"]}
    assert not taken & {*LEFT_OUT, "ctx__hour"}
    assert taken == set(roles) - {*LEFT_OUT, "ctx__hour"}


def test_codes_come_from_the_fit_and_an_unseen_value_reads_as_the_unknown_code() -> None:
    fit = pd.DataFrame({"a": ["x", "y", "x"], "b": [1, 1, 2]})
    scored = pd.DataFrame({"a": ["y", "z", None], "b": ["2", "1", "7"]})
    vocab = vocabularies(fit, ["a", "b"])
    assert [len(vocab[name]) for name in ("a", "b")] == [2, 2]
    np.testing.assert_array_equal(
        vocabulary_codes(fit, ["a", "b"], vocab), [[0, 0], [1, 0], [0, 1]]
    )
    # "z" and the missing value are unknown: code 2 = the vocabulary's size; 1 and "1" are one value
    np.testing.assert_array_equal(
        vocabulary_codes(scored, ["a", "b"], vocab), [[1, 1], [2, 0], [2, 2]]
    )


def test_the_blend_mixes_logits_and_keeps_each_end() -> None:
    ranker = np.array([0.01, 0.2, 0.5])
    fm_logit = np.array([2.0, -1.0, 0.0])
    np.testing.assert_allclose(blend_with_ranker(ranker, fm_logit, 0.0), ranker)
    np.testing.assert_allclose(
        blend_with_ranker(ranker, fm_logit, 1.0), 1 / (1 + np.exp(-fm_logit))
    )
    half = blend_with_ranker(ranker, fm_logit, 0.5)
    logit = np.log(ranker / (1 - ranker))
    np.testing.assert_allclose(np.log(half / (1 - half)), (logit + fm_logit) / 2)


def test_hours_wrap_into_the_day_and_default_to_zero() -> None:
    np.testing.assert_array_equal(hours(pd.DataFrame({"ctx__hour": ["3", "23", "x"]})), [3, 23, 0])
    np.testing.assert_array_equal(hours(pd.DataFrame({"other": [1, 2]})), [0, 0])
