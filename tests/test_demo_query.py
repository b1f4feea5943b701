"""The demo's queries of the ranking API (lifecycle/demo.py) wait for the worker they reach.

``deepclick serve --workers 2`` starts two processes that each load the release on their own:
``/readyz`` answered by one says nothing about the other, and a keep-alive connection to the one
still loading got ``503 no release is loaded yet`` for every request, which the demo printed as
empty answers (the fresh-clone demo of 571a7ed). Here a real server whose release arrives a
moment after start-up stands in for that worker.
"""

from __future__ import annotations

import threading

import httpx
from serving_world import World, running_server

from lifecycle.demo import rank_when_ready
from serving.app import create_app
from serving.release import LoadedRelease
from serving.reloader import ReleaseHolder

BODY = {"user_id": "u00010", "placement_id": "p003", "num_ads": 3}


def test_a_worker_still_loading_is_waited_for_and_its_503_says_when_to_retry(
    world: World, loaded: LoadedRelease
) -> None:
    holder = ReleaseHolder()
    app = create_app(world.settings(), holder=holder, watch=False)
    with running_server(app) as url, httpx.Client(base_url=url) as client:
        refused = client.post("/v1/rank", json=BODY)
        assert refused.status_code == 503 and refused.headers["Retry-After"] == "1"
        threading.Timer(0.5, holder.swap, args=(loaded,)).start()
        answer = rank_when_ready(client, BODY, timeout_s=30)
    assert [ad["ad_id"] for ad in answer["ads"]] and "error" not in answer


def test_a_worker_that_never_loads_is_reported_not_printed_as_an_empty_answer(
    world: World,
) -> None:
    app = create_app(world.settings(), holder=ReleaseHolder(), watch=False)
    with running_server(app) as url, httpx.Client(base_url=url) as client:
        answer = rank_when_ready(client, BODY, timeout_s=1.5)
    assert answer == {"error": "HTTP 503: no release is loaded yet"}
