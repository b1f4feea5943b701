"""The funnel's rule (candidates/funnel.py): the popularity prior at serving, the cold-start share,
and the refusal of an index whose candidates hold fewer clicks than as many popular ads."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from candidates.funnel import FunnelParams, FunnelRefused, funnel_check, popularity_prior
from candidates.index import FRESH_FILE, CandidateIndexError, build_index, open_index
from candidates.service import CandidateService
from candidates.store import publish_embeddings
from deepclick.publish import current_version
from pipelines.build_index import candidates_check

DIM = 4
# Planted catalogue: 6 popular ads along e1 (orthogonal to every user), 6 niche ads along e0 (what
# the users match) with a few clicks, one brand-new ad matching best of all, one brand-new ad that
# matches less than the niche ads (the usual new ad: the towers never saw its id), 20 filler ads.
POPULAR = [f"pop{i}" for i in range(6)]
NICHE = [f"niche{i}" for i in range(6)]
COLD = "cold"
FRESH_WEAK = "new_weak"
FILLER = [f"fill{i:02d}" for i in range(20)]
CLICKS = {**{ad: 1000.0 - 100 * i for i, ad in enumerate(POPULAR)}, **dict.fromkeys(NICHE, 1.0)}
TRAINED = [*CLICKS, *FILLER]
"""Ads with rows in the training window; the two new ones have none."""


def catalogue() -> tuple[list[str], np.ndarray]:
    ids, vectors = [], []
    for i, ad in enumerate(POPULAR):
        ids.append(ad)
        vectors.append([0.0, 1.0 - 0.01 * i, 0.0, 0.0])
    for i, ad in enumerate(NICHE):
        ids.append(ad)
        vectors.append([1.0 - 0.01 * i, 0.0, 0.0, 0.0])
    ids.append(COLD)
    vectors.append([1.5, 0.0, 0.0, 0.0])
    ids.append(FRESH_WEAK)
    vectors.append([0.3, 0.0, 0.0, 0.0])
    for i, ad in enumerate(FILLER):
        ids.append(ad)
        vectors.append([0.0, 0.0, 0.5, 0.01 * i])
    order = np.argsort(ids)
    return [ids[i] for i in order], np.asarray(vectors, dtype=np.float32)[order]


@pytest.fixture(scope="module")
def embeddings(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("funnel")
    ad_ids, ad_vectors = catalogue()
    tables = {
        "ads": (ad_ids, ad_vectors),
        "users": (["u0", "u1"], np.array([[1, 0, 0, 0], [1, 0, 0, 0.1]], dtype=np.float32)),
        "placements": (["p0"], np.zeros((1, DIM), dtype=np.float32)),
    }
    fallbacks = {"user": np.zeros(DIM), "placement": np.zeros(DIM)}
    return publish_embeddings(root / "embeddings", "20240105", tables, fallbacks)


def build(
    embeddings: Path,
    parent: Path,
    version: str,
    funnel: FunnelParams,
    check=None,
    trained: list[str] | None = None,
) -> Path:
    return build_index(
        embeddings,
        parent,
        n_trees=5,
        search_k=1000,
        clicks=CLICKS,
        trained_ads=trained,
        funnel=funnel,
        check=check,
        version=version,
    )


def test_funnel_check_counts_clicks_found_by_candidates_and_by_popular_ads() -> None:
    # 4 clicks; K=1 candidates find a, b, d (3/4); the 1 most clicked ad "a" finds 1/4.
    # K=2: candidates find a, b (2/4); the 2 most clicked ("a", "x") find a, x (2/4): a tie passes.
    candidates = {1: [["a"], ["b"], ["c"], ["d"]], 2: [["a", "c"], ["b", "c"], ["c", "d"], ["c"]]}
    result = funnel_check(candidates, ["a", "x"], ["a", "b", "x", "d"])
    assert result["recall"] == {"1": 0.75, "2": 0.5}
    assert result["popularity"] == {"1": 0.25, "2": 0.5}
    assert result["ratio"] == {"1": 3.0, "2": 1.0}
    assert (result["decision"], result["losing_ks"]) == ("pass", [])
    losing = funnel_check({2: candidates[2]}, ["a", "x"], ["a", "b", "x", "d"], tolerance=0.0)
    assert losing["decision"] == "pass"
    worse = funnel_check({2: [["c"]] * 4}, ["a", "x"], ["a", "b", "x", "d"])
    assert (worse["decision"], worse["losing_ks"]) == ("refuse", [2])
    # Paired noise: 1000 clicks, the 500 popular ads find 500 of them, the candidates the same
    # minus `lost`. Losing 10 (0.010, se 0.0031) is beyond 1.645 se: refused; losing 2 (0.002,
    # se 0.0014) is within it: noise. The strict rule (z = 0) refuses both.
    clicks = [f"p{i}" for i in range(500)] + [f"o{i}" for i in range(500)]
    top = [f"p{i}" for i in range(500)]
    for lost, decision in ((10, "refuse"), (2, "pass")):
        found = [[ad] if i >= lost and ad.startswith("p") else [] for i, ad in enumerate(clicks)]
        result = funnel_check({500: found}, top, clicks, z=1.645)
        assert result["decision"] == decision, (lost, result)
        assert funnel_check({500: found}, top, clicks, z=0.0)["decision"] == "refuse"
    assert result["within_noise_ks"] == [500]
    few = funnel_check({2: [["c"]] * 4}, ["a", "x"], ["a", "b", "x", "d"], min_clicks=5)
    assert few["decision"] == "insufficient_evidence"


def test_funnel_check_counts_fresh_slots_apart_from_the_comparison_with_popularity() -> None:
    # K=2, fresh ad "f" (no training rows, so never among the popular ads). Lists 0-2 spend one
    # slot on it, list 3 none; the popular ads get as many slots as each list's other ads:
    # 1, 1, 1, 2.
    candidates = {2: [["a", "f"], ["c", "f"], ["a", "f"], ["b", "c"]]}
    clicked = ["a", "f", "x", "b"]
    result = funnel_check(candidates, ["a", "x"], clicked, fresh={"f"})
    # The whole list finds a, f, b (3/4); the 2 most clicked find a, x (2/4).
    assert (result["recall"], result["popularity"]) == ({"2": 0.75}, {"2": 0.5})
    # Judged on the same slots: the lists' other ads find a, b (2/4); one popular ad per fresh
    # list and two for list 3 find a (1/4). Without counting apart, list 2 would lose "x".
    assert result["judged"] == {"2": {"candidates": 0.5, "popularity": 0.25}}
    assert result["fresh"] == {"clicks": 1, "recall": {"2": 1.0}, "slots": {"2": 0.75}}
    assert result["decision"] == "pass"
    # A list that spends its slot on the fresh ad and misses what a popular ad on the same one
    # slot would find still loses.
    worse = funnel_check({2: [["c", "f"]] * 4}, ["a", "x"], clicked, fresh={"f"})
    assert (worse["decision"], worse["losing_ks"]) == ("refuse", [2])


def test_fresh_share_gives_ads_without_training_rows_their_own_slots(
    embeddings: Path, tmp_path: Path
) -> None:
    # The towers never saw a new ad's id, so it rarely matches well: similarity alone (the
    # explore share) takes the best match, the new ad that matches less never gets in.
    explore = build(
        embeddings, tmp_path / "a", "v1", FunnelParams(1.0, explore_share=0.5), trained=TRAINED
    )
    fresh = build(
        embeddings, tmp_path / "b", "v1", FunnelParams(1.0, fresh_share=0.5), trained=TRAINED
    )
    open_service = lambda folder: CandidateService.load(folder, embeddings, popular_quota=0.0)  # noqa: E731
    assert set(open_service(explore).candidates("u0", "p0", 4).ad_ids) == {
        *POPULAR[:2],
        COLD,
        "niche0",
    }
    # fresh_share 0.5 of 4 = 2 slots for the ads without training rows, best match first.
    result = open_service(fresh).candidates("u0", "p0", 4)
    assert set(result.ad_ids) == {*POPULAR[:2], COLD, FRESH_WEAK}
    index = open_index(fresh)
    assert sorted(index.ad_ids[index.fresh].astype(str)) == [COLD, FRESH_WEAK]
    assert index.manifest["funnel"]["fresh_ads"] == 2
    assert index.funnel == FunnelParams(1.0, 1.0, 0.0, 0.5)
    # Excluded fresh ads leave their slot to the next one; an index built without knowing the
    # training ads has no fresh rows and no fresh slots.
    excluded = open_service(fresh).candidates("u0", "p0", 4, exclude={FRESH_WEAK})
    assert FRESH_WEAK not in excluded.ad_ids
    unknown = build(embeddings, tmp_path / "c", "v1", FunnelParams(1.0, fresh_share=0.5))
    assert len(open_index(unknown).fresh) == 0
    assert set(open_service(unknown).candidates("u0", "p0", 4).ad_ids) == set(POPULAR[:4])


def test_index_with_a_corrupt_fresh_file_is_refused(embeddings: Path, tmp_path: Path) -> None:
    folder = build(
        embeddings, tmp_path / "a", "v1", FunnelParams(1.0, fresh_share=0.5), trained=TRAINED
    )
    np.save(folder / FRESH_FILE, np.array([0, 10_000]), allow_pickle=False)
    with pytest.raises(CandidateIndexError, match=f"{FRESH_FILE}.*rows of the index"):
        open_index(folder, verify_checksums=False)


def test_the_operator_cannot_give_most_of_a_list_to_fresh_slots() -> None:
    """The funnel check judges a list without its fresh slots, so a share near 1 would pass any
    index unjudged: the setting is an exploration budget with a ceiling."""
    from pydantic import ValidationError

    from deepclick.settings import IndexSettings

    assert IndexSettings(fresh_share=0.2).fresh_share == 0.2
    with pytest.raises(ValidationError, match="fresh_share"):
        IndexSettings(fresh_share=0.5)


def test_prior_is_log_clicks_plus_smoothing_per_ad_row() -> None:
    prior = popularity_prior([b"a", b"b", "c"], {"a": 9.0, "c": 0.0}, 1.0)
    np.testing.assert_allclose(prior, np.log([10.0, 1.0, 1.0]), rtol=1e-6)
    with pytest.raises(ValueError, match="prior_smoothing"):
        FunnelParams(prior_smoothing=0.0)


def test_prior_brings_popular_ads_in_and_cold_start_keeps_its_share(
    embeddings: Path, tmp_path: Path
) -> None:
    similarity = build(embeddings, tmp_path / "a", "v1", FunnelParams(prior_weight=0.0))
    prior = build(embeddings, tmp_path / "b", "v1", FunnelParams(prior_weight=1.0))
    explore = build(
        embeddings, tmp_path / "c", "v1", FunnelParams(prior_weight=1.0, explore_share=0.25)
    )
    open_service = lambda folder: CandidateService.load(folder, embeddings, popular_quota=0.0)  # noqa: E731
    # Similarity only: the new ad and the niche ads, never the popular ones.
    assert set(open_service(similarity).candidates("u0", "p0", 4).ad_ids) == {
        COLD,
        "niche0",
        "niche1",
        "niche2",
    }
    # user·ad is at most 1.5 and log(1000 + 1) - log(2) ≈ 6.2: the prior puts the 4 most clicked
    # ads first, and the new ad (0 clicks) is gone.
    assert set(open_service(prior).candidates("u0", "p0", 4).ad_ids) == set(POPULAR[:4])
    # explore_share 0.25 of 4 = 1 slot by similarity alone: the new ad keeps a way in.
    result = open_service(explore).candidates("u0", "p0", 4)
    assert set(result.ad_ids) == {*POPULAR[:3], COLD}
    assert open_index(explore).funnel == FunnelParams(1.0, 1.0, 0.25)


def test_index_losing_to_popularity_is_refused_and_the_previous_one_keeps_serving(
    embeddings: Path, tmp_path: Path
) -> None:
    # Day D: three clicks on popular ads, one on a niche ad, all from u0 on p0.
    queries = [("u0", "p0")] * 4
    clicked = ["pop0", "pop1", "pop2", "niche0"]
    popular = sorted(CLICKS, key=lambda a: -CLICKS[a])

    def check():
        return candidates_check(
            embeddings,
            queries,
            clicked,
            popular,
            [2, 4],
            popular_quota=0.0,
            tolerance=0.0,
            z=0.0,
            min_clicks=1,
            refuse=True,
            date="2024-01-05",
        )

    parent = tmp_path / "index"
    served = build(embeddings, parent, "v1", FunnelParams(prior_weight=1.0), check())
    checked = open_index(served).manifest["funnel"]["check"]
    # K=4: the 4 most clicked hold pop0-2 (3/4); prior candidates are the same 4 ads.
    assert checked["decision"] == "pass" and checked["recall"]["4"] == 0.75
    # Similarity only: K=2 gives cold, niche0 (1 of 4 clicks) against pop0, pop1 (2 of 4).
    refused = r"K=2: 0\.2500 vs 0\.5000, K=4: 0\.2500 vs 0\.7500.*keeps serving"
    with pytest.raises(FunnelRefused, match=refused):
        build(embeddings, parent, "v2", FunnelParams(prior_weight=0.0), check())
    assert current_version(parent) == "v1"
    assert not (parent / "v2").exists()


def test_the_check_reads_fresh_ads_whose_ids_are_not_ascii(tmp_path: Path) -> None:
    """Ids are UTF-8 bytes in the index (contracts §4); a real log's new ad may be named "néo"."""
    ads = ["néo", "pop"]
    tables = {
        "ads": (ads, np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float32)),
        "users": (["u0"], np.array([[1.0, 0.0]], dtype=np.float32)),
        "placements": (["p0"], np.zeros((1, 2), dtype=np.float32)),
    }
    fallbacks = {"user": np.zeros(2), "placement": np.zeros(2)}
    embeddings = publish_embeddings(tmp_path / "embeddings", "20240105", tables, fallbacks)
    check = candidates_check(
        embeddings,
        [("u0", "p0")],
        ["néo"],
        ["pop"],
        [2],
        popular_quota=0.0,
        tolerance=0.0,
        z=0.0,
        min_clicks=1,
        refuse=True,
        date="2024-01-05",
    )
    folder = build_index(
        embeddings,
        tmp_path / "index",
        n_trees=2,
        clicks={"pop": 5.0},
        trained_ads=["pop"],
        funnel=FunnelParams(1.0, fresh_share=0.5),
        check=check,
        version="v1",
    )
    assert open_index(folder).manifest["funnel"]["check"]["fresh"]["clicks"] == 1
