"""The release: the unit serving loads and swaps (DESIGN.md, "Pairing").

A release is a published folder ``<root>/releases/<version>/`` (written by
``lifecycle.release_writer.publish_release`` through ``deepclick.publish``: staging folder, atomic
rename, ``releases/CURRENT``) holding

- ``release.json``: the feature spec, embeddings, index and ranker it combines — each with its
  version, its folder (relative to ``root`` when inside it, so the state folder can be mounted
  elsewhere, as ``deploy/compose.yaml`` does) and the SHA-256 of its manifest, which catches a
  component republished after the release was made; plus the TF Serving model name and version;
- ``feature_spec.json`` and ``ranker_manifest.json``: copies, so a release is validated without the
  features folder, and a remote-ranker worker needs no local model files;
- ``entities/{users,placements,ads}.arrow``: the entity feature tables the ranker reads, sorted by
  id, mmapped by every worker (``serving.features``).

:func:`load_release` re-checks everything a request will rely on — checksums, the pairings
(index ↔ embeddings version, ids and vectors; ranker ↔ feature spec and embeddings versions),
dimensions, table layouts, an exhaustive search of the ANNOY file in a child process
(``serving.index_probe``: a corrupt forest segfaults there, not here) — and runs one warmup
prediction through the configured backend. A
broken or mismatched release raises :class:`ReleaseError` naming the rule; nothing half-loaded is
ever served.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from candidates.service import CandidateService, PairingError, check_pairing
from candidates.store import Embeddings
from deepclick import layout
from deepclick.errors import DeepclickError
from deepclick.layout import RANKER_COPY, RANKER_MANIFEST, RELEASE_FILE, RELEASES
from deepclick.publish import (
    MANIFEST,
    IntegrityError,
    NotPublishedError,
    current_version,
    sha256_file,
    verify,
)
from deepclick.settings import (
    IndexSettings,
    PredictorSettings,
    ServingSettings,
    Settings,
)
from models.feature_spec import (
    ROLE_KEY,
    ROLE_TABLE,
    FeatureSpec,
    load_feature_spec,
)
from models.ranker.inputs import SIMILARITY_INPUTS

from .backends import RankerBackend, RankerError, RankerRef, create_backend
from .batching import BatchingBackend
from .features import (
    EntityTable,
    EntityTableError,
    FeatureAssembler,
    Gathered,
    RankerInputs,
)
from .index_probe import IndexProbeError, probe_index

log = logging.getLogger(__name__)

ROLES = ("user", "context", "ad")
INDEX_PROBE_MIN_S = 60.0
"""Least time the child process gets to search a candidate index (a 1M-ad forest takes seconds)."""
ENTITY_FILES = {role: f"entities/{ROLE_TABLE[role]}.arrow" for role in ROLES}


class ReleaseError(DeepclickError, ValueError):
    """A release that must not be served; the message names the component and the rule."""


class ReleaseWarmupError(ReleaseError):
    """The release is consistent but its ranker did not answer the warmup prediction (for a
    remote ranker, TF Serving may not have loaded that version yet: worth retrying).

    ``release`` is the release, fully loaded except for the ranker's answer: a process that
    serves nothing yet serves it degraded (retrieval order) rather than not at all (issue 12,
    item 3); otherwise the caller closes it."""

    def __init__(self, message: str, release: LoadedRelease | None = None) -> None:
        super().__init__(message)
        self.release = release


def releases_dir(settings: Settings) -> Path:
    return layout.releases_dir(settings.root)


def current_release_folder(root: Path) -> Path | None:
    """``<root>/releases/<CURRENT>``, or None when no release was published."""
    version = current_version(root / RELEASES)
    return None if version is None else root / RELEASES / version


def _resolve(text: str, root: Path) -> Path:
    path = Path(text)
    return path if path.is_absolute() else root / path


# --------------------------------------------------------------------------- shared checks


def check_ranker_pairing(
    ranker: dict[str, Any], spec: FeatureSpec, embeddings_version: str, where: str
) -> RankerInputs:
    """Refuse a ranker trained on another feature spec or other embeddings than the release's,
    or one whose inputs the spec does not describe; return its inputs."""
    expected_spec = ranker.get("feature_spec_version")
    if str(expected_spec) != spec.version:
        raise ReleaseError(
            f"{where}: the ranker expects feature spec {expected_spec!r}, the release has "
            f"{spec.version!r}; export a ranker trained on these features"
        )
    try:
        inputs = RankerInputs.from_manifest(ranker)
    except EntityTableError as exc:
        raise ReleaseError(f"{where}: {exc}") from None
    if inputs.uses_similarity:
        trained_on = ranker.get("embedding_version")
        if str(trained_on) != embeddings_version:
            raise ReleaseError(
                f"{where}: the ranker takes two-tower scores from embeddings {trained_on!r} but "
                f"the release's embeddings are {embeddings_version!r}; pair it with those "
                "embeddings or retrain"
            )
    unknown = [n for n in inputs.dtypes if n not in spec.names and n not in SIMILARITY_INPUTS]
    if unknown:
        raise ReleaseError(f"{where}: ranker inputs {unknown} are not in feature spec")
    return inputs


def _check_pairing(index: Any, embeddings: Embeddings, where: str) -> None:
    try:
        check_pairing(index, embeddings)
    except PairingError as exc:
        raise ReleaseError(f"{where}: {exc}") from None


# --------------------------------------------------------------------------- loading


@dataclass(frozen=True)
class LoadedRelease:
    """Everything one release serves with, opened and validated. Never changes once loaded; the
    reloader swaps whole objects, and requests keep the one they started with."""

    folder: Path
    version: str
    key: str
    """Identity of the published folder (version + manifest digest): a changed key = new release."""
    manifest: dict[str, Any]
    spec: FeatureSpec
    candidates: CandidateService
    features: FeatureAssembler
    backend: RankerBackend
    probe: Gathered
    """A one-candidate request of real inputs, for readiness checks."""
    load_seconds: float
    warmup: dict[str, Any] = field(default_factory=dict)

    @property
    def versions(self) -> dict[str, str]:
        m = self.manifest
        return {
            "release": self.version,
            "feature_spec": str(m["feature_spec"]["version"]),
            "embeddings": str(m["embeddings"]["version"]),
            "index": str(m["index"]["version"]),
            "ranker": str(m["ranker"]["version"]),
            "ranker_model": str(m["ranker"]["model_name"]),
        }

    def describe(self) -> dict[str, Any]:
        return {
            "versions": self.versions,
            # Relative to the state root: absolute server paths are not the client's business.
            "folder": f"{RELEASES}/{self.folder.name}",
            **self.backend.describe(),
            "ads": len(self.candidates.index),
            "entities": {r: len(t) for r, t in self.features.tables.items()},
            "timezone": self.features.timezone,
            "load_seconds": round(self.load_seconds, 3),
            "warmup": self.warmup,
        }

    def close(self) -> None:
        """Free the backend's own resources. Mapped files are unmapped by the garbage collector
        once no request holds this release, so a retired release is never unmapped under a
        request that still reads it."""
        self.backend.close()


def release_key(folder: Path) -> str:
    """``<version>:<digest of manifest.json>`` — changes whenever the folder is republished."""
    manifest = folder / MANIFEST
    if not manifest.is_file():
        raise NotPublishedError(f"{folder} has no {MANIFEST}: it was never published")
    return f"{folder.name}:{sha256_file(manifest)[:16]}"


def _component(release: dict[str, Any], name: str, root: Path, manifest_name: str) -> Path:
    try:
        entry = release[name]
        folder = _resolve(str(entry["folder"]), root)
        expected = str(entry["manifest_sha256"])
    except (KeyError, TypeError):
        raise ReleaseError(f"release.json: {name} lacks folder or manifest_sha256") from None
    manifest = folder / manifest_name
    if not manifest.is_file():
        raise ReleaseError(f"release.json names {name} folder {folder}, which is not published")
    if sha256_file(manifest) != expected:
        raise ReleaseError(
            f"{name} folder {folder} was republished after this release was made (its manifest "
            "no longer matches release.json): publish a new release"
        )
    return folder


def load_release(
    folder: Path,
    settings: Settings | None = None,
    *,
    warmup: bool = True,
) -> LoadedRelease:
    """Open, validate and warm up the release in ``folder`` (``<root>/releases/<version>``;
    component folders named relative to ``root`` resolve against ``folder``'s grandparent).

    ``settings`` gives the backend (``predictor``), the popular quota (``index``) and the serving
    sizes; defaults apply without it.

    Raises:
        ReleaseError: a checksum, manifest, pairing, dimension or table check failed.
        ReleaseWarmupError: everything is consistent but the ranker did not answer the warmup.
    """
    started = time.perf_counter()
    folder = Path(folder).resolve()
    predictor = settings.predictor if settings else PredictorSettings()
    index_settings = settings.index if settings else IndexSettings()
    serving = settings.serving if settings else ServingSettings()
    root = folder.parent.parent
    try:
        key = release_key(folder)
        verify(folder)
        release = json.loads((folder / RELEASE_FILE).read_text())
        spec = load_feature_spec(folder)
        ranker_manifest = json.loads((folder / RANKER_COPY).read_text())
    except (IntegrityError, NotPublishedError, OSError, ValueError) as exc:
        raise ReleaseError(f"release {folder}: {exc}") from None
    where = f"release {folder.name}"
    embeddings_folder = _component(release, "embeddings", root, MANIFEST)
    index_folder = _component(release, "index", root, MANIFEST)
    try:
        probe_index(index_folder, timeout_s=max(serving.warmup_timeout_s, INDEX_PROBE_MIN_S))
    except IndexProbeError as exc:
        raise ReleaseError(f"{where}: {exc}") from None
    try:
        service = CandidateService.load(
            index_folder,
            embeddings_folder,
            popular_quota=index_settings.popular_quota,
            search=serving.candidate_search,
        )
    except (PairingError, IntegrityError, NotPublishedError, ValueError, OSError) as exc:
        raise ReleaseError(f"{where}: {exc}") from None
    if str(release["embeddings"]["version"]) != service.embeddings.version:
        raise ReleaseError(f"{where}: embeddings folder holds another version than release.json")
    inputs = check_ranker_pairing(ranker_manifest, spec, service.embeddings.version, where)
    ranker_entry = release["ranker"]
    if sha256_file(folder / RANKER_COPY) != ranker_entry.get("manifest_sha256"):
        raise ReleaseError(f"{where}: {RANKER_COPY} differs from the ranker named in release.json")
    if predictor.backend == "in_process":
        ranker_folder = _component(release, "ranker", root, RANKER_MANIFEST)
    else:
        ranker_folder = _resolve(str(ranker_entry.get("folder", "")), root)
    try:
        tables = {
            role: EntityTable.open(folder / ENTITY_FILES[role], ROLE_KEY[role]) for role in ROLES
        }
        assembler = FeatureAssembler(
            spec,
            inputs,
            tables,
            service.embeddings,
            timezone=str(release.get("timezone") or serving.timezone),
        )
    except (EntityTableError, ValueError) as exc:
        raise ReleaseError(f"{where}: {exc}") from None
    ref = RankerRef(str(ranker_entry["model_name"]), str(ranker_entry["version"]), ranker_folder)
    try:
        backend = create_backend(ref, predictor)
    except (OSError, ValueError, RankerError) as exc:
        raise ReleaseError(f"{where}: the ranker cannot be loaded: {exc}") from None
    try:  # each ad's rows of the ranker's candidate table, once (no per-request string hashing)
        assembler.index_ads(backend.candidate_index)
        for role in ("user", "context"):  # and every known user's and placement's id
            backend.remember_values(ROLE_KEY[role], assembler.tables[role].ids)
    except (EntityTableError, RankerError, ValueError) as exc:
        backend.close()
        raise ReleaseError(f"{where}: the ads' ranker rows cannot be computed: {exc}") from None
    if serving.batch_max_rows:
        backend = BatchingBackend(
            backend, max_rows=serving.batch_max_rows, max_wait_ms=serving.batch_max_wait_ms
        )
    version = str(release.get("version", folder.name))
    try:
        probe = _probe_request(service, assembler, serving)
    except (EntityTableError, ValueError) as exc:
        backend.close()
        raise ReleaseError(f"{where}: the warmup request cannot be built: {exc}") from None

    def loaded(warmed: dict[str, Any]) -> LoadedRelease:
        return LoadedRelease(
            folder=folder,
            version=version,
            key=key,
            manifest=release,
            spec=spec,
            candidates=service,
            features=assembler,
            backend=backend,
            probe=probe[1],
            load_seconds=time.perf_counter() - started,
            warmup=warmed,
        )

    if not warmup:
        return loaded({})
    try:
        warmed = _warm_up(version, probe, backend, serving)
    except ReleaseWarmupError as exc:
        raise ReleaseWarmupError(str(exc), loaded({"error": str(exc)})) from None
    return loaded(warmed)


def _probe_request(
    service: CandidateService, assembler: FeatureAssembler, serving: ServingSettings
) -> tuple[Gathered, Gathered]:
    """The default number of candidates for the first known user and placement through
    retrieval and features (the warmup request), and its first candidate alone (the readiness
    probe)."""
    tables = assembler.tables
    user = tables["user"].ids[0].decode() if len(tables["user"]) else "__warmup__"
    placement = tables["context"].ids[0].decode() if len(tables["context"]) else "__warmup__"
    k = min(serving.default_candidates, len(service.index))
    result = service.candidates(user, placement, k)
    lookup = assembler.lookup(user, placement)
    gathered = assembler.gather(user, placement, result.ad_ids, lookup=lookup)
    probe = Gathered(gathered.common, {k_: v[:1] for k_, v in gathered.candidates.items()})
    return gathered, probe


def _warm_up(
    version: str,
    requests: tuple[Gathered, Gathered],
    backend: RankerBackend,
    serving: ServingSettings,
) -> dict[str, Any]:
    """Rank the warmup request and the probe through the backend — it traces the model for real
    request shapes and proves the ranker answers."""
    gathered, probe = requests
    started = time.perf_counter()
    try:
        scores = backend.predict(
            gathered.common, gathered.candidates, timeout_s=serving.warmup_timeout_s
        )
        backend.predict(probe.common, probe.candidates, timeout_s=serving.warmup_timeout_s)
    except RankerError as exc:
        raise ReleaseWarmupError(
            f"release {version}: the {backend.kind} ranker {backend.ranker.model_name}/"
            f"{backend.ranker.version} did not answer the warmup prediction: {exc}"
        ) from None
    if not np.all(np.isfinite(scores)):
        raise ReleaseWarmupError(f"release {version}: warmup pctr not finite")
    return {
        "candidates": int(scores.size),
        "seconds": round(time.perf_counter() - started, 3),
        "mean_pctr": float(scores.mean()) if scores.size else None,
    }
