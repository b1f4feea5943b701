"""CandidateService: popular merge, exclusions, fallbacks, pairing and concurrent use."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields, replace
from pathlib import Path

import numpy as np
import pytest

from candidates.index import CandidateIndex, build_index
from candidates.popular import GLOBAL
from candidates.service import (
    CandidateResult,
    CandidateService,
    PairingError,
    paired_embeddings_folder,
)
from candidates.store import publish_embeddings
from candidates.synthetic import SyntheticEmbeddings, two_tower_like

VERSION = "20240105"
DIM = 32


@dataclass
class World:
    """A published planted catalogue and the lists planted into its popularity."""

    root: Path
    data: SyntheticEmbeddings
    service: CandidateService  # popular_quota = 0.25
    placement0: list[str]  # popular on placement0: ads that are far from user0
    placement1: list[str]  # user0's best ad first, then far ads
    overall: list[str]  # the overall list: other far ads
    fallback_cluster: set[str]  # the cluster the fallback user vector points at

    def query(self, user: int, placement: int) -> np.ndarray:
        return self.data.vectors("users")[user] + self.data.vectors("placements")[placement]

    def exact(self, query: np.ndarray, k: int) -> list[str]:
        return [f"ad{i}" for i in np.argsort(-(self.data.vectors("ads") @ query))[:k]]


def ids(rows: np.ndarray) -> list[str]:
    return [f"ad{i}" for i in rows]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    root = tmp_path_factory.mktemp("world")
    data = two_tower_like(
        n_ads=3000,
        n_users=200,
        n_placements=8,
        dim=DIM,
        clusters=300,
        spread=0.05,
        norm_sigma=0.05,
        placement_scale=0.1,
        seed=1,
    )
    ads = data.vectors("ads")
    users, placements = data.vectors("users"), data.vectors("placements")
    far = np.argsort(ads @ (users[0] + placements[0]))[:24]  # user0's worst ads: ANN never finds
    best_on_1 = int(np.argmax(ads @ (users[0] + placements[1])))
    placement0, overall = ids(far[:8]), ids(far[8:16])
    placement1 = [f"ad{best_on_1}", *ids(far[16:24])]
    rows = [("placement0", ad, 100 - r) for r, ad in enumerate(placement0)]
    rows += [("placement1", ad, 100 - r) for r, ad in enumerate(placement1)]
    rows += [(GLOBAL, ad, 100 - r) for r, ad in enumerate(overall)]
    cluster = 7
    fallbacks = {**data.fallbacks, "user": ads[data.ad_cluster == cluster].mean(axis=0)}
    emb = publish_embeddings(root / "embeddings", VERSION, data.tables, fallbacks)
    index = build_index(emb, root / "index", popularity=rows, n_trees=10, search_k=3000)
    service = CandidateService.load(index, emb, popular_quota=0.25)
    members = set(ids(np.flatnonzero(data.ad_cluster == cluster)))
    return World(root, data, service, placement0, placement1, overall, members)


def by_source(result: CandidateResult, source: str) -> list[str]:
    return [c.ad_id for c in result.candidates if c.source == source]


def test_quota_of_placement_popular_ads_merged_with_nearest_neighbours(world: World) -> None:
    result = world.service.candidates("user0", "placement0", 20)

    assert len(result.ad_ids) == 20 == len(set(result.ad_ids))
    assert by_source(result, "popular") == [a for a in result.ad_ids if a in world.placement0[:5]]
    assert set(by_source(result, "popular")) == set(world.placement0[:5])
    assert set(by_source(result, "ann")) == set(world.exact(world.query(0, 0), 15))
    assert (result.user_vector_source, result.placement_vector_source) == ("table", "table")
    assert result.fallbacks == ()


def test_scores_are_the_dot_product_with_the_query_best_first(world: World) -> None:
    result = world.service.candidates("user0", "placement0", 20)
    ads, query = world.data.vectors("ads"), world.query(0, 0)
    expected = [float(ads[int(c.ad_id[2:])] @ query) for c in result.candidates]
    assert [c.score for c in result.candidates] == pytest.approx(expected, rel=1e-5)
    assert expected == sorted(expected, reverse=True)


def test_popular_ad_already_found_by_ann_is_not_repeated(world: World) -> None:
    result = world.service.candidates("user0", "placement1", 20)
    best = world.placement1[0]
    assert result.ad_ids.count(best) == 1 and result.candidates[0].ad_id == best
    assert result.candidates[0].source == "ann"
    assert set(by_source(result, "popular")) == set(world.placement1[1:6])


def test_excluded_ads_never_appear_and_the_next_ones_fill_in(world: World) -> None:
    top = world.exact(world.query(0, 0), 17)
    exclude = {world.placement0[0], top[0], top[1]}
    result = world.service.candidates("user0", "placement0", 20, exclude=exclude)
    assert len(result.ad_ids) == 20 and not exclude & set(result.ad_ids)
    assert set(by_source(result, "popular")) == set(world.placement0[1:6])
    assert set(by_source(result, "ann")) == set(top[2:])


def test_placement_without_its_own_list_gets_the_overall_list(world: World) -> None:
    known = world.service.candidates("user0", "placement2", 20)
    assert set(by_source(known, "popular")) == set(world.overall[:5])
    assert known.placement_vector_source == "table" and known.fallbacks == ()

    unknown = world.service.candidates("user0", "new-placement", 20)
    assert set(by_source(unknown, "popular")) == set(world.overall[:5])
    assert unknown.placement_vector_source == "fallback" and unknown.fallbacks == ("placement",)


def test_unknown_user_gets_the_fallback_vector_and_says_so(world: World) -> None:
    service = CandidateService(world.service.index, world.service.embeddings, popular_quota=0.0)
    k = len(world.fallback_cluster)
    result = service.candidates("nobody", "placement0", k)
    assert set(result.ad_ids) == world.fallback_cluster  # the planted cluster it points at
    assert result.user_vector_source == "fallback" and result.fallbacks == ("user",)

    both = service.candidates(None, "new-placement", k)
    assert both.fallbacks == ("user", "placement")


def test_vectors_in_the_request_take_precedence(world: World) -> None:
    service = CandidateService(world.service.index, world.service.embeddings, popular_quota=0.0)
    k = len(world.fallback_cluster)
    cold = service.embeddings.fallback_user.copy()  # e.g. computed from the request's features
    result = service.candidates(
        "user0", "placement0", k, user_vector=cold, placement_vector=np.zeros(DIM, np.float32)
    )
    assert set(result.ad_ids) == world.fallback_cluster  # not user0's neighbours
    assert (result.user_vector_source, result.placement_vector_source) == ("request", "request")
    assert result.fallbacks == ()
    with pytest.raises(ValueError, match=r"users vector from the request must have shape \(32,\)"):
        service.candidates("user0", "placement0", 5, user_vector=np.zeros(3))


class StingyIndex(CandidateIndex):
    """Returns half of what is asked, as ANNOY may when search_k runs out before n are found."""

    def search(self, query: np.ndarray, n: int, search_k: int = -1) -> list[int]:
        return super().search(query, n, search_k)[: max(1, n // 2)]


def test_short_ann_answers_are_widened_before_popular_ads_fill_the_gap(world: World) -> None:
    index = world.service.index
    stingy = StingyIndex(**{f.name: getattr(index, f.name) for f in fields(index)})
    service = CandidateService(stingy, world.service.embeddings, popular_quota=0.25)
    result = service.candidates("user0", "placement0", 20)
    assert set(by_source(result, "ann")) == set(world.exact(world.query(0, 0), 15))
    assert set(by_source(result, "popular")) == set(world.placement0[:5])


def test_result_has_k_ads_while_the_catalogue_allows(world: World) -> None:
    exclude = {f"ad{i}" for i in range(0, 3000, 300)}  # 10 ads
    assert (
        len(world.service.candidates("user0", "placement0", 2990, exclude=exclude).ad_ids) == 2990
    )
    everything = world.service.candidates("user1", "placement3", 5000, exclude=exclude)
    assert len(everything.ad_ids) == len(set(everything.ad_ids)) == 2990
    assert world.service.candidates("user0", "placement0", 0).candidates == []


def test_concurrent_queries_match_sequential_ones(world: World) -> None:
    rng = np.random.default_rng(3)
    requests = [
        (f"user{rng.integers(0, 220)}", f"placement{rng.integers(0, 10)}", int(k))
        for k in rng.choice([10, 50, 200], 300)
    ]  # users 200-219 and placements 8-9 are unknown: fallbacks run concurrently too

    def ask(request: tuple[str, str, int]) -> CandidateResult:
        return world.service.candidates(*request, exclude={"ad1", "ad2"})

    sequential = [ask(r) for r in requests]
    with ThreadPoolExecutor(max_workers=8) as pool:
        concurrent = list(pool.map(ask, requests))
    assert concurrent == sequential


def test_index_and_embeddings_of_other_versions_are_refused(world: World, tmp_path: Path) -> None:
    index = world.root / "index" / VERSION
    assert paired_embeddings_folder(index, world.root / "embeddings") == (
        world.root / "embeddings" / VERSION
    )
    data = world.data
    newer = publish_embeddings(tmp_path / "a", "20240106", data.tables, data.fallbacks)
    with pytest.raises(PairingError, match="built from embeddings version '20240105', the folder"):
        CandidateService.load(index, newer)


def test_embeddings_of_another_dimension_are_refused(world: World, tmp_path: Path) -> None:
    wider = two_tower_like(n_ads=3000, n_users=10, n_placements=2, dim=DIM + 8, seed=1)
    folder = publish_embeddings(tmp_path, VERSION, wider.tables, wider.fallbacks)
    with pytest.raises(
        PairingError, match=r"dimension mismatch, index dim 32 vs embeddings dim 40"
    ):
        CandidateService.load(world.root / "index" / VERSION, folder)


def test_embeddings_with_other_ads_or_vectors_are_refused(world: World, tmp_path: Path) -> None:
    data = world.data
    ad_ids, ad_vectors = data.tables["ads"]
    renamed = replace(data, tables={**data.tables, "ads": (ad_ids.copy(), ad_vectors)})
    renamed.tables["ads"][0][5] = "zz5"
    folder = publish_embeddings(tmp_path / "a", VERSION, renamed.tables, data.fallbacks)
    with pytest.raises(PairingError, match=r"ads_ids.npy differs"):
        CandidateService.load(world.root / "index" / VERSION, folder)

    shifted = {**data.tables, "ads": (ad_ids, ad_vectors + 1.0)}
    folder = publish_embeddings(tmp_path / "b", VERSION, shifted, data.fallbacks)
    with pytest.raises(PairingError, match=r"ads.ann item 0 differs from row 0 of ads_vectors.npy"):
        CandidateService.load(world.root / "index" / VERSION, folder)
