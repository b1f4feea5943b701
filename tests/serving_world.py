"""Shared by the serving tests: one small, real world of releases, built once per test session.

The serving tests need every upstream artifact — a features folder, embeddings, an ANNOY index and
an exported ranker — combined into releases. Building them costs ~30 s (mostly importing and
running TensorFlow), so the session-scoped ``world`` fixture of ``tests/conftest.py`` calls
:func:`build_serving_world` once for every test module.

Planted structure, so tests can check answers rather than run code: users of group ``g`` and ads
of category ``g`` get nearby vectors (tests/feature_folder.py plants the same match in the clicks),
so retrieval returns same-category ads and the ranker's two-tower inputs carry the signal.

Releases (all under one ``root``):
- ``20240103``: features + embeddings ``20240103`` + index ``20240103`` + ranker ``20240103``
  (trained with the two-tower scores of those embeddings); CURRENT after the build;
- ``20240104``: the same, with index ``20240104`` (another seed) — the hot-reload target;
- ``20240105``: built from a copy of index ``20240103`` named ``20240105``; tests corrupt it.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import uvicorn
from fastapi import FastAPI
from feature_folder import FeatureFolder, write_feature_folder

from deepclick import layout
from deepclick.publish import set_current
from deepclick.settings import PredictorSettings, RankerSettings, ServingSettings, Settings

MODEL = "ranker"
DIM = 16
TINY_RANKER = RankerSettings(
    epochs=1, batch_size=512, embedding_dim=4, cross_layers=1, hidden_units=[16], baseline=False
)


@dataclass(frozen=True)
class World:
    root: Path
    features: FeatureFolder
    embeddings: Path
    index: Path
    ranker: Path
    release: Path
    second_release: Path
    spare_index: Path
    spare_release: Path

    def settings(self, **serving: object) -> Settings:
        """Settings rooted in the world (tests pass small reload intervals etc.). The ranker
        deadline and the request deadline are generous and the in-flight bound wide: the test
        machine is shared, and only the deadline and overload tests (with their own settings)
        may see a degraded answer or a 503."""
        serving = {"request_deadline_ms": 30_000, "max_in_flight": 64, **serving}
        return Settings(
            root=self.root,
            predictor=PredictorSettings(timeout_ms=10_000),
            serving=ServingSettings(**serving),  # type: ignore[arg-type]
        )

    def set_current(self, release: Path) -> None:
        set_current(self.root / "releases", release.name)

    @property
    def user_ids(self) -> list[str]:
        return list(self.features.truth.user_group)


def planted_embeddings(folder: FeatureFolder, seed: int = 0) -> tuple[dict, dict]:
    """Tables for ``candidates.store.publish_embeddings``; group g ↔ category g are close."""
    rng = np.random.default_rng(seed)
    truth = folder.truth
    centres = rng.standard_normal((truth.groups, DIM)).astype(np.float32)

    def around(groups: np.ndarray, noise: float) -> np.ndarray:
        out = centres[groups] + noise * rng.standard_normal((len(groups), DIM))
        return out.astype(np.float32)

    users = folder.table("entities/users")["user_id"].astype(str).to_numpy()
    ads = folder.table("entities/ads")["ad_id"].astype(str).to_numpy()
    places = folder.table("entities/placements")["placement_id"].astype(str).to_numpy()
    user_vectors = around(np.array([truth.user_group[u] for u in users]), 0.3)
    ad_vectors = around(np.array([truth.ad_category[a] for a in ads]), 0.3)
    place_vectors = (0.1 * rng.standard_normal((len(places), DIM))).astype(np.float32)
    tables = {
        "users": (users, user_vectors),
        "ads": (ads, ad_vectors),
        "placements": (places, place_vectors),
    }
    fallbacks = {"user": user_vectors.mean(axis=0), "placement": place_vectors.mean(axis=0)}
    return tables, fallbacks


def build_serving_world(base: Path) -> World:
    """Build the releases described above under ``base`` (once per session: conftest)."""
    from candidates.index import build_index
    from candidates.store import publish_embeddings, read_embeddings
    from lifecycle.release_writer import publish_release
    from models.ranker.export import export_ranker
    from models.ranker.similarity import EmbeddingSimilarity
    from models.ranker.train import train_ranker

    root = base / "var"
    settings = Settings(root=root)
    folder = write_feature_folder(
        root / "warehouse" / "features" / "20240103",
        users=300, placements=8, ads=400, new_ads=12, impressions_per_day=4000, train_days=2,
        seed=3,
    )  # fmt: skip
    version = folder.spec.version
    tables, fallbacks = planted_embeddings(folder)
    embeddings = publish_embeddings(root / "artifacts" / "embeddings", version, tables, fallbacks)
    popularity = folder.table("popularity")[["placement_id", "ad_id", "clicks"]]
    rows = list(popularity.itertuples(index=False, name=None))
    index_parent = root / "artifacts" / "index"
    index = build_index(embeddings, index_parent, popularity=rows, n_trees=10, recall_floor=0.0)
    second_index = build_index(
        embeddings, index_parent, popularity=rows, n_trees=12, seed=11, recall_floor=0.0,
        version="20240104", update_current=False,
    )  # fmt: skip
    spare_index = index_parent / "20240105"
    shutil.copytree(index, spare_index)

    similarity = EmbeddingSimilarity(read_embeddings(embeddings))
    trained = train_ranker(folder.spec, TINY_RANKER, similarity=similarity, progress=False)
    ranker = export_ranker(trained, layout.model_repository(settings.root), MODEL, version)

    release = publish_release(settings, folder.path, embeddings, index, ranker)
    second = publish_release(
        settings, folder.path, embeddings, second_index, ranker, version="20240104",
        update_current=False,
    )  # fmt: skip
    spare = publish_release(
        settings, folder.path, embeddings, spare_index, ranker, version="20240105",
        update_current=False,
    )  # fmt: skip
    return World(root, folder, embeddings, index, ranker, release, second, spare_index, spare)


# --------------------------------------------------------------------------- a real server


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextlib.contextmanager
def running_server(app: FastAPI, *, timeout_s: float = 60.0) -> Iterator[str]:
    """Serve ``app`` with a real uvicorn server on a loopback socket in a thread; yield its base
    URL; always stop it."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + timeout_s
        while not server.started:
            if time.monotonic() > deadline or not thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(15)
        sock.close()


def wait_ready(client: object, timeout_s: float = 60.0) -> dict:
    """Poll ``/readyz`` until 200 (the first release loads in the background)."""
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        last = client.get("/readyz")  # type: ignore[attr-defined]
        if last.status_code == 200:
            return last.json()
        time.sleep(0.05)
    raise AssertionError(f"not ready after {timeout_s} s: {last.json() if last else None}")
