"""``bench.spec_fm``'s pure parts: which features form each side, and codes shared by the fit
and the scored rows (a value the fit never saw gets a code of its own, never trained)."""

from __future__ import annotations

import numpy as np
import pandas as pd
from feature_folder import write_feature_folder

from bench.spec_fm import LEFT_OUT, hours, side_codes, spec_sides


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


def test_codes_are_shared_across_frames_and_a_new_value_gets_its_own() -> None:
    fit = pd.DataFrame({"a": ["x", "y", "x"], "b": ["1", "1", "2"]})
    scored = pd.DataFrame({"a": ["y", "z"], "b": ["2", "1"]})
    (fit_codes, scored_codes), sizes = side_codes([fit, scored], ["a", "b"])
    assert sizes == [3, 2]
    np.testing.assert_array_equal(fit_codes, [[0, 0], [1, 0], [0, 1]])
    np.testing.assert_array_equal(scored_codes, [[1, 1], [2, 0]])  # "z": code 2, unseen


def test_hours_wrap_into_the_day_and_default_to_zero() -> None:
    np.testing.assert_array_equal(hours(pd.DataFrame({"ctx__hour": ["3", "23", "x"]})), [3, 23, 0])
    np.testing.assert_array_equal(hours(pd.DataFrame({"other": [1, 2]})), [0, 0])
