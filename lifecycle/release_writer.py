"""Release writing (DESIGN.md, "Pairing"): combine D's published parts into one release.

A release is the unit serving loads and swaps (``serving/release.py`` reads and validates it); the
lifecycle writes it when the gate promotes D's challenger (``lifecycle/stages.py``, publish) and
for the challenger release the evaluation replays. Writing lives here, above serving, so that
``serving/`` only loads and serves releases (DESIGN.md, dependency rules).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import pandas as pd

from candidates.index import open_index
from candidates.service import PairingError, check_pairing
from candidates.store import read_embeddings
from deepclick.layout import MANIFEST, RANKER_COPY, RANKER_MANIFEST, RELEASE_FILE, SPEC_FILE
from deepclick.publish import (
    IntegrityError,
    NotPublishedError,
    Staging,
    publishing,
    read_manifest,
    sha256_file,
    verify,
)
from deepclick.settings import Settings
from models.feature_spec import ROLE_KEY, ROLE_TABLE, FeatureSpec, load_feature_spec
from serving.features import EntityTable, RankerInputs, write_entity_table
from serving.release import ENTITY_FILES, ROLES, ReleaseError, check_ranker_pairing, releases_dir

log = logging.getLogger(__name__)


def _relative(path: Path, root: Path) -> str:
    path = path.resolve()
    try:
        return path.relative_to(root.resolve()).as_posix()
    except ValueError:
        return str(path)


def _table_features(spec: FeatureSpec, inputs: RankerInputs, role: str) -> list[Any]:
    """The ranker's features of ``role`` that the role's entity table holds."""
    entity = next((e for e in spec.entities.values() if e.role == role), None)
    held = set(entity.features) if entity is not None else set()
    return [
        f
        for f in spec.features
        if f.role == role
        and f.name in inputs.dtypes
        and f.name in held
        and not f.is_id
        and not f.request_time
    ]


def publish_release(
    settings: Settings,
    features_folder: Path,
    embeddings_folder: Path,
    index_folder: Path,
    ranker_folder: Path,
    *,
    version: str | None = None,
    update_current: bool = True,
    parent: Path | None = None,
) -> Path:
    """Combine published components into ``<root>/releases/<version>`` and (by default) point
    ``releases/CURRENT`` at it; return the folder.

    ``version`` defaults to the feature spec's (the target day). ``parent`` (a folder directly
    under ``root``, default ``<root>/releases``) may hold releases that are never served, such as
    the challenger release the evaluation replays (``lifecycle/replay.py``). The components are
    checked first (checksums, index ↔ embeddings, ranker ↔ spec and embeddings); the entity
    tables are written from the features folder's ``entities/*`` with exactly the columns the
    ranker reads.

    Raises:
        ReleaseError: the components do not belong together; nothing is published.
    """
    features_folder, embeddings_folder = Path(features_folder), Path(embeddings_folder)
    index_folder, ranker_folder = Path(index_folder), Path(ranker_folder)
    root = settings.root
    spec = load_feature_spec(features_folder)
    where = "release"
    try:
        embeddings = read_embeddings(embeddings_folder)
        index = open_index(index_folder)
        ranker = verify(ranker_folder, RANKER_MANIFEST)
    except (IntegrityError, NotPublishedError, ValueError) as exc:
        raise ReleaseError(f"{where}: a component is unusable: {exc}") from None
    try:
        try:
            check_pairing(index, embeddings)
        except PairingError as exc:
            raise ReleaseError(f"{where}: {exc}") from None
        inputs = check_ranker_pairing(ranker, spec, embeddings.version, where)
    finally:
        index.close()
    spec_raw = json.loads((features_folder / SPEC_FILE).read_text())
    version = version or spec.version
    model_name = str(ranker.get("model_name") or ranker_folder.parent.name)
    ranker_version = str(ranker.get("version", ranker_folder.name))

    def validate(staging: Staging) -> None:
        for role in ROLES:
            EntityTable.open(staging.path / ENTITY_FILES[role], ROLE_KEY[role])

    parent = releases_dir(settings) if parent is None else Path(parent)
    if parent.resolve().parent != root.resolve():
        raise ReleaseError(
            f"{where}: releases live in a folder directly under {root}, not {parent}"
        )
    with publishing(parent, version, validate=validate, update_current=update_current) as staging:
        shutil.copyfile(features_folder / SPEC_FILE, staging.path / SPEC_FILE)
        shutil.copyfile(ranker_folder / RANKER_MANIFEST, staging.path / RANKER_COPY)
        counts: dict[str, int] = {}
        entities: dict[str, Any] = {}
        for role in ROLES:
            features = _table_features(spec, inputs, role)
            columns = [ROLE_KEY[role], *(f.name for f in features)]
            frame = pd.read_parquet(
                spec.table_path(f"entities/{ROLE_TABLE[role]}"), columns=columns
            )
            rows = write_entity_table(
                staging.path / ENTITY_FILES[role], frame, ROLE_KEY[role], features,
                spec.missing_value,
            )  # fmt: skip
            counts[ROLE_TABLE[role]] = rows
            entities[role] = {
                "file": ENTITY_FILES[role],
                "key": ROLE_KEY[role],
                "rows": rows,
                "columns": [f.name for f in features],
            }
        components = {
            "feature_spec": {
                "version": spec.version,
                "folder": _relative(features_folder, root),
                "manifest_sha256": sha256_file(features_folder / MANIFEST),
            },
            "embeddings": {
                "version": embeddings.version,
                "folder": _relative(embeddings_folder, root),
                "manifest_sha256": sha256_file(embeddings_folder / MANIFEST),
                "dim": embeddings.dim,
            },
            "index": {
                "version": str(read_manifest(index_folder).get("version")),
                "folder": _relative(index_folder, root),
                "manifest_sha256": sha256_file(index_folder / MANIFEST),
                "embedding_version": embeddings.version,
            },
            "ranker": {
                "model_name": model_name,
                "version": ranker_version,
                "folder": _relative(ranker_folder, root),
                "manifest_sha256": sha256_file(ranker_folder / RANKER_MANIFEST),
                "feature_spec_version": str(ranker.get("feature_spec_version")),
                "embedding_version": ranker.get("embedding_version"),
            },
        }
        release = {
            "version": version,
            **components,
            "entities": entities,
            "timezone": spec_raw.get("timezone") or settings.serving.timezone,
        }
        (staging.path / RELEASE_FILE).write_text(json.dumps(release, indent=2) + "\n")
        staging.manifest.update(
            {
                "stage": "release",
                "inputs": {name: c["version"] for name, c in components.items()},
                "counts": counts,
            }
        )
    log.info("published release %s (%s)", version, release)
    return parent / version
