"""Online feature lookup: the ranker's inputs for one user, one placement and N candidate ads.

The release (``serving.release``) carries the entity feature tables the ranker needs as Arrow IPC
files, sorted by id and written so that every column maps straight onto numpy without a copy:
the id and every categorical feature as fixed-width UTF-8 bytes (``fixed_size_binary``, numpy
``S<n>``), numeric features as float32, missing values already replaced by the spec's marker or
default. :class:`EntityTable` opens one with ``pyarrow.memory_map``: every worker process maps the
same file, the page cache holds one copy, and an id is found by binary search over the mapped ids
(``np.searchsorted``), never through a per-process dict.

:class:`FeatureAssembler` builds one ``rank`` request from those tables, the request and the
embeddings (docs/contracts.md §3 and §4):

- user and context features (sent once): the entity's row; for an unknown entity (cold start)
  the features the request supplies, else the spec's defaults (categorical: the missing marker,
  numeric: the training default). Features no entity table holds (event-sourced ones) come from
  the request or their default, and the request-time features ``ctx__hour`` / ``ctx__dow`` from
  the request time in the release's time zone;
- ad features (sent per candidate): each candidate's row of the ads table;
- the two-tower scores ``sim_user_ad`` / ``sim_context_ad`` when the ranker takes them, from the
  mmapped vectors with the same fallbacks as ``models.ranker.similarity.EmbeddingSimilarity``
  (fallback vector for an unknown user or placement, zero for an unknown ad).

Nothing here trains or embeds; it only reads mapped files.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from zoneinfo import ZoneInfo

import numpy as np
import pandas as pd
import pyarrow as pa

from candidates.service import CandidateResult, QueryParts
from deepclick.errors import DeepclickError
from deepclick.sorted_ids import sorted_rows
from models.feature_spec import ROLE_KEY, Feature, FeatureSpec
from models.ranker.inputs import CANDIDATE_INDEX, SIMILARITY_INPUTS, NumericStats

Dtype = Literal["string", "float32"]
REQUEST_ROLES = ("user", "context")


class EntityTableError(DeepclickError, ValueError):
    """An entity table file breaks the release's rules; the message names the file and rule."""


class RequestFieldError(DeepclickError, ValueError):
    """A request field does not fit the release's feature spec or the server's limits (→ 422);
    ``field_path`` names it the way pydantic does (``("body", "user_features", name)``)."""

    def __init__(self, field_path: tuple[str, ...], message: str) -> None:
        super().__init__(message)
        self.field_path = field_path


# --------------------------------------------------------------------------- entity tables


def encode_fixed(values: Sequence[str], what: str) -> np.ndarray:
    """Strings as fixed-width UTF-8 bytes (``S<n>``). NUL is refused: numpy strips trailing NULs,
    so such a value would not round-trip."""
    encoded = [str(v).encode("utf-8") for v in values]
    for raw in encoded:
        if b"\x00" in raw:
            raise EntityTableError(f"{what}: value {raw!r} contains NUL")
    width = max((len(raw) for raw in encoded), default=1) or 1
    return np.array(encoded, dtype=f"S{width}")


def _fixed_array(values: np.ndarray) -> pa.Array:
    width = values.dtype.itemsize
    data = pa.py_buffer(np.ascontiguousarray(values).tobytes())
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(width), len(values), [None, data])


def write_entity_table(
    path: Path,
    frame: pd.DataFrame,
    key: str,
    features: Sequence[Feature],
    missing_value: str,
) -> int:
    """Write ``frame``'s ``key`` and ``features`` columns as one Arrow record batch, sorted by
    key, in the zero-copy layout :class:`EntityTable` maps. Returns the row count.

    Raises:
        EntityTableError: a column is missing, a key is empty or duplicated.
    """
    missing = [c for c in (key, *(f.name for f in features)) if c not in frame.columns]
    if missing:
        raise EntityTableError(f"{path.name}: the entity table lacks column(s) {missing}")
    ids = encode_fixed(frame[key].astype(str).tolist(), f"{path.name}:{key}")
    if len(ids) and (ids == b"").any():
        raise EntityTableError(f"{path.name}: empty {key}")
    order = np.argsort(ids, kind="stable")
    ids = ids[order]
    if len(ids) > 1 and (dup := np.flatnonzero(ids[1:] == ids[:-1])).size:
        raise EntityTableError(f"{path.name}: duplicate {key} {bytes(ids[dup[0]]).decode()!r}")
    columns: dict[str, pa.Array] = {key: _fixed_array(ids)}
    for feature in features:
        column = frame[feature.name].iloc[order]
        if feature.kind == "categorical":
            text = column.astype(object).where(column.notna(), missing_value).astype(str)
            text = text.where(text != "", missing_value)
            columns[feature.name] = _fixed_array(encode_fixed(text.tolist(), feature.name))
        else:
            default = NumericStats.of(feature).default
            values = pd.to_numeric(column, errors="coerce").fillna(default)
            columns[feature.name] = pa.array(values.to_numpy(np.float32), type=pa.float32())
    table = pa.Table.from_pydict(columns)
    path.parent.mkdir(parents=True, exist_ok=True)
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_batch(table.combine_chunks().to_batches(max_chunksize=max(1, len(ids)))[0])
    return len(ids)


def _column_view(array: pa.Array, what: str) -> np.ndarray:
    """A read-only numpy view of one mapped column (no copy)."""
    if array.null_count:
        raise EntityTableError(f"{what}: nulls are not allowed (fill at publish time)")
    if pa.types.is_fixed_size_binary(array.type):
        width = array.type.byte_width
        return np.frombuffer(
            array.buffers()[1], dtype=f"S{width}", count=len(array), offset=array.offset * width
        )
    if pa.types.is_float32(array.type):
        return array.to_numpy(zero_copy_only=True)
    raise EntityTableError(f"{what}: type {array.type} (expected fixed_size_binary or float32)")


@dataclass(frozen=True)
class EntityTable:
    """One entity's features, memory-mapped: sorted ids and one column view per feature."""

    path: Path
    key: str
    ids: np.ndarray
    columns: Mapping[str, np.ndarray]

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    @classmethod
    def open(cls, path: Path, key: str, *, check_sorted: bool = True) -> EntityTable:
        """Map ``path``; refuse a file that is not one batch, lacks ``key`` or is unsorted."""
        if not path.is_file():
            raise EntityTableError(f"{path} is missing")
        try:
            reader = pa.ipc.open_file(pa.memory_map(str(path), "r"))
        except (pa.ArrowInvalid, OSError) as exc:
            raise EntityTableError(f"{path} is not a readable Arrow IPC file: {exc}") from None
        if reader.num_record_batches == 0:
            arrays = {f.name: pa.array([], type=f.type) for f in reader.schema}
        elif reader.num_record_batches == 1:
            batch = reader.get_batch(0)
            arrays = {name: batch.column(name) for name in batch.schema.names}
        else:
            raise EntityTableError(f"{path}: {reader.num_record_batches} batches, expected one")
        if key not in arrays:
            raise EntityTableError(f"{path}: no key column {key!r} (columns: {list(arrays)})")
        views = {name: _column_view(a, f"{path}:{name}") for name, a in arrays.items()}
        ids = views.pop(key)
        if ids.dtype.kind != "S":
            raise EntityTableError(f"{path}: key {key!r} must be fixed-width bytes")
        if check_sorted and len(ids) > 1 and not bool(np.all(ids[1:] > ids[:-1])):
            raise EntityTableError(f"{path}: ids must be sorted and unique (binary search)")
        return cls(path, key, ids, views)

    def rows(self, ids: Sequence[str] | np.ndarray) -> np.ndarray:
        """Row of each id, -1 when absent (vectorised binary search)."""
        return sorted_rows(self.ids, [str(i).encode("utf-8") for i in ids])

    def row(self, entity_id: str) -> int | None:
        row = int(self.rows([entity_id])[0])
        return None if row < 0 else row


# --------------------------------------------------------------------------- ranker inputs


@dataclass(frozen=True)
class RankerInputs:
    """The ranker's inputs as its export manifest declares them: names, dtypes, and which the
    ``rank`` signature takes once per request (``shared``) or once per candidate."""

    dtypes: Mapping[str, Dtype]
    shared: tuple[str, ...]
    candidates: tuple[str, ...]

    @classmethod
    def from_manifest(cls, manifest: Mapping[str, Any]) -> RankerInputs:
        try:
            described = manifest["signatures"]["rank"]["inputs"]
            shared = tuple(manifest["rank"]["shared"])
            candidates = tuple(manifest["rank"]["candidates"])
        except (KeyError, TypeError) as exc:
            raise EntityTableError(
                f"ranker manifest lacks the rank signature description ({exc!r})"
            ) from None
        dtypes: dict[str, Dtype] = {
            n: "string" if d["dtype"] == "string" else "float32" for n, d in described.items()
        }
        if set(dtypes) != set(shared) | set(candidates):
            raise EntityTableError(
                "ranker manifest: rank inputs differ from rank.shared + rank.candidates"
            )
        return cls(dtypes, shared, candidates)

    @property
    def uses_similarity(self) -> bool:
        return all(n in self.dtypes for n in SIMILARITY_INPUTS)


@dataclass(frozen=True)
class Gathered:
    """One ranker request: shared inputs as ``[1]`` arrays, candidate inputs as ``[N]`` arrays
    (strings as ``S<n>`` bytes, numbers float32), and the fallbacks applied to build them."""

    common: dict[str, np.ndarray]
    candidates: dict[str, np.ndarray]
    fallbacks: tuple[str, ...] = field(default=())


@dataclass(frozen=True)
class EntityLookup:
    """Where the request's user and placement were found: rows of the entity tables (None when
    unknown) and of the embedding tables (None: the fallback vector applies)."""

    user_row: int | None
    placement_row: int | None
    user_vector_row: int | None
    placement_vector_row: int | None


def request_time_features(when: dt.datetime | None, zone: str) -> dict[str, str]:
    """``ctx__hour`` (0-23) and ``ctx__dow`` (0 = Monday) of ``when`` in ``zone``, as the ingest
    stage computes them; naive times are UTC, ``None`` is now."""
    moment = when or dt.datetime.now(dt.UTC)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    local = moment.astimezone(ZoneInfo(zone))
    return {"ctx__hour": str(local.hour), "ctx__dow": str(local.weekday())}


class FeatureAssembler:
    """Builds ranker requests from one release's entity tables, spec and embeddings.

    Immutable after construction and safe for concurrent threads: it only reads mapped arrays.
    """

    def __init__(
        self,
        spec: FeatureSpec,
        inputs: RankerInputs,
        tables: Mapping[str, EntityTable],
        embeddings: Any,
        *,
        timezone: str = "UTC",
    ) -> None:
        """``tables`` maps role (``user``, ``context``, ``ad``) to its table; ``embeddings`` is a
        ``candidates.store.Embeddings`` (read only for the similarity inputs)."""
        self.spec = spec
        self.inputs = inputs
        self.tables = dict(tables)
        self.embeddings = embeddings
        self.timezone = timezone
        ZoneInfo(timezone)  # fail at load on an unknown zone, not per request
        self._features = {f.name: f for f in spec.features}
        unknown = [
            n for n in inputs.dtypes if n not in self._features and n not in SIMILARITY_INPUTS
        ]
        if unknown:
            raise EntityTableError(
                f"the ranker takes input(s) {unknown} that feature spec {spec.version} lacks"
            )
        for role in ("user", "context", "ad"):
            if role not in self.tables:
                raise EntityTableError(f"no entity table for role {role!r}")
        self._defaults = {
            f.name: (
                np.float32(NumericStats.of(f).default)
                if f.kind == "numeric"
                else spec.missing_value.encode("utf-8")
            )
            for f in spec.features
        }
        # Per role: inputs the entity table holds, and inputs only a request can supply.
        self._held: dict[str, list[str]] = {}
        self._from_request: dict[str, list[str]] = {}
        for role in ("user", "context", "ad"):
            names = [
                n
                for n in inputs.dtypes
                if n in self._features
                and self._features[n].role == role
                and not self._features[n].is_id
                and not self._features[n].request_time
            ]
            self._held[role] = [n for n in names if n in self.tables[role].columns]
            self._from_request[role] = [n for n in names if n not in self.tables[role].columns]
        self._request_time = [
            n for n in inputs.dtypes if n in self._features and self._features[n].request_time
        ]
        self._no_ad = np.zeros(int(embeddings.dim), dtype=np.float32)
        # Embeddings (= index) row -> ads table row, once: None when both hold the same ids.
        ad_ids = self.tables["ad"].ids
        same = len(ad_ids) == len(embeddings.ads.ids) and bool(
            np.array_equal(ad_ids, embeddings.ads.ids)
        )
        self._ad_rows = None if same else sorted_rows(ad_ids, np.asarray(embeddings.ads.ids))
        self._ad_index: np.ndarray | None = None

    # ---- candidate rows precomputed at load

    def ad_inputs(self) -> dict[str, np.ndarray]:
        """The ranker's per-candidate string inputs for every row of the ads table, as
        :meth:`gather` sends them for a known ad."""
        ads = self.tables["ad"]
        out: dict[str, np.ndarray] = {}
        for name in self.inputs.candidates:
            if self.inputs.dtypes[name] != "string":
                continue
            if name == ROLE_KEY["ad"]:
                out[name] = ads.ids
            elif name in ads.columns:
                out[name] = ads.columns[name]
            else:
                out[name] = np.repeat(np.array([self._defaults[name]]), len(ads))
        return out

    def index_ads(self, candidate_index: Callable[[dict[str, np.ndarray]], Any]) -> bool:
        """At release load, before the first request: remember each ad's rows of the ranker's
        candidate table (``candidate_index`` maps :meth:`ad_inputs` to ``[ads, k]`` int32, or
        None when the ranker cannot take them), so that :meth:`gather` adds the candidates'
        rows (:data:`~models.ranker.inputs.CANDIDATE_INDEX`) and the ranker hashes no ad string
        per request. Returns whether it did."""
        if not len(self.tables["ad"]):
            return False
        index = candidate_index(self.ad_inputs())
        if index is None:
            return False
        index = np.asarray(index, dtype=np.int32)
        if len(index) != len(self.tables["ad"]):
            raise EntityTableError(
                f"the ranker returned {len(index)} candidate rows for {len(self.tables['ad'])} ads"
            )
        self._ad_index = index
        return True

    # ---- request validation

    def suppliable(self, role: str) -> list[str]:
        """Feature names a request may supply for ``role`` (its non-id, non-request-time ones)."""
        return [
            f.name
            for f in self.spec.by_role(role)
            if not f.is_id and not f.request_time and f.name in self.inputs.dtypes
        ]

    def check_request_features(
        self, role: str, supplied: Mapping[str, Any] | None, field_name: str
    ) -> dict[str, Any]:
        """Validate request-supplied features of ``role`` against the spec; return them encoded.

        Raises:
            RequestFieldError: an unknown name, a request-time feature (send ``request_time``
                instead), or a value of the wrong kind (categorical: string or integer;
                numeric: a finite number).
        """
        out: dict[str, Any] = {}
        allowed = set(self.suppliable(role))
        for name, value in (supplied or {}).items():
            where = ("body", field_name, name)
            feature = self._features.get(name)
            if feature is not None and feature.request_time:
                raise RequestFieldError(
                    where, f"{name} is computed from request_time; send request_time instead"
                )
            if name not in allowed:
                raise RequestFieldError(
                    where,
                    f"{name!r} is not a {role} feature of this release "
                    f"(allowed: {', '.join(sorted(allowed)) or 'none'})",
                )
            if feature.kind == "categorical":
                if isinstance(value, bool) or not isinstance(value, str | int):
                    raise RequestFieldError(where, f"{name} is categorical: send a string")
                text = str(value)
                if not text or "\x00" in text or len(text) > 256:
                    raise RequestFieldError(where, f"{name}: 1-256 characters without NUL")
                out[name] = text.encode("utf-8")
            else:
                if isinstance(value, bool) or not isinstance(value, int | float):
                    raise RequestFieldError(where, f"{name} is numeric: send a number")
                if not math.isfinite(float(value)):
                    raise RequestFieldError(where, f"{name} must be finite")
                out[name] = np.float32(value)
        return out

    # ---- lookup and gather

    def lookup(
        self, user_id: str, placement_id: str, parts: QueryParts | None = None
    ) -> EntityLookup:
        """Rows of the request's user and placement; ``parts`` (the candidate stage's
        :meth:`~candidates.service.CandidateService.locate`) supplies the embedding rows it
        already found, so each table is searched once per request."""
        e = self.embeddings
        if parts is not None and "request" not in (parts.user_source, parts.placement_source):
            user_vector_row, placement_vector_row = parts.user_row, parts.placement_row
        else:
            user_vector_row, placement_vector_row = (
                e.users.row(user_id),
                e.placements.row(placement_id),
            )
        return EntityLookup(
            user_row=self.tables["user"].row(user_id),
            placement_row=self.tables["context"].row(placement_id),
            user_vector_row=user_vector_row,
            placement_vector_row=placement_vector_row,
        )

    def _role_values(
        self, role: str, row: int | None, supplied: Mapping[str, Any], fallbacks: list[str]
    ) -> dict[str, Any]:
        """One entity's feature values: its row, else request values, else defaults."""
        values: dict[str, Any] = {}
        table = self.tables[role]
        entity = "placement" if role == "context" else role
        used_request = used_default = False
        for name in self._held[role]:
            if row is not None:
                values[name] = table.columns[name][row]
            elif name in supplied:
                values[name], used_request = supplied[name], True
            else:
                values[name], used_default = self._defaults[name], True
        for name in self._from_request[role]:  # features no entity table holds
            if name in supplied:
                values[name], used_request = supplied[name], True
            else:
                values[name] = self._defaults[name]
        if used_request:
            fallbacks.append(f"{entity}_features_from_request")
        if used_default:
            fallbacks.append(f"{entity}_features_default")
        return values

    def gather(
        self,
        user_id: str,
        placement_id: str,
        ad_ids: Sequence[str] | CandidateResult,
        *,
        lookup: EntityLookup,
        request_time: dt.datetime | None = None,
        user_features: Mapping[str, Any] | None = None,
        context_features: Mapping[str, Any] | None = None,
    ) -> Gathered:
        """The ``rank`` request for ``ad_ids``; request features must be pre-validated with
        :meth:`check_request_features` (already encoded).

        Given the candidate stage's :class:`~candidates.service.CandidateResult`, the ads are its
        integer rows (index row = embeddings row, mapped once at load to the ads table's rows)
        and the similarity inputs are the halves of the score it already computed: no id is
        decoded, searched or re-scored here."""
        fallbacks: list[str] = []
        known: dict[str, Any] = {
            ROLE_KEY["user"]: user_id.encode("utf-8"),
            ROLE_KEY["context"]: placement_id.encode("utf-8"),
        }
        known.update(self._role_values("user", lookup.user_row, user_features or {}, fallbacks))
        known.update(
            self._role_values("context", lookup.placement_row, context_features or {}, fallbacks)
        )
        when = request_time_features(request_time, self.timezone)
        for name in self._request_time:
            known[name] = when.get(name, self.spec.missing_value).encode("utf-8")
        common: dict[str, np.ndarray] = {}
        for name in self.inputs.shared:
            value = known.get(name, self._defaults.get(name))
            if self.inputs.dtypes[name] == "string":
                common[name] = np.array([value], dtype="S")
            else:
                common[name] = np.array([value], dtype=np.float32)

        n = len(ad_ids)
        ads = self.tables["ad"]
        sims: dict[str, np.ndarray] = {}
        if isinstance(ad_ids, CandidateResult) and ad_ids.rows is not None:
            keys = ad_ids.keys
            rows = ad_ids.rows if self._ad_rows is None else self._ad_rows[ad_ids.rows]
            if self.inputs.uses_similarity and _same_vectors(ad_ids, lookup):
                sims = {
                    SIMILARITY_INPUTS[0]: np.asarray(ad_ids.user_ad, dtype=np.float32),
                    SIMILARITY_INPUTS[1]: np.asarray(ad_ids.context_ad, dtype=np.float32),
                }
        else:
            raw = ad_ids.keys if isinstance(ad_ids, CandidateResult) else ad_ids
            keys = np.array([k if isinstance(k, bytes) else k.encode("utf-8") for k in raw], "S")
            rows = sorted_rows(ads.ids, keys)
        missing = rows < 0
        if missing.any():
            fallbacks.append("ad_features_default")
        safe = np.maximum(rows, 0)
        candidates: dict[str, np.ndarray] = {}
        if self.inputs.uses_similarity and not sims:
            sims = self._similarity(lookup, keys)
        for name in self.inputs.candidates:
            if name in sims:
                candidates[name] = sims[name]
            elif name == ROLE_KEY["ad"]:
                candidates[name] = keys
            elif name in ads.columns and len(ads):
                column = ads.columns[name][safe]
                if missing.any():  # np.where widens S<n> if the default is longer
                    column = np.where(missing, self._defaults[name], column)
                candidates[name] = column
            else:  # an ad feature no table holds: its default for every candidate
                # np.repeat keeps the width of the bytes default; np.full(dtype="S") would cut
                # it to one byte.
                candidates[name] = np.repeat(np.array([self._defaults[name]]), n)
        if self._ad_index is not None and not missing.any():  # an unknown ad: strings only
            candidates[CANDIDATE_INDEX] = self._ad_index[safe]
        return Gathered(common, candidates, tuple(fallbacks))

    def _similarity(self, lookup: EntityLookup, keys: np.ndarray) -> dict[str, np.ndarray]:
        """``user·ad`` and ``context·ad`` per candidate (fallback vectors for unknown entities)."""
        e = self.embeddings
        user = (
            e.fallback_user
            if lookup.user_vector_row is None
            else np.asarray(e.users.vectors[lookup.user_vector_row])
        )
        place = (
            e.fallback_placement
            if lookup.placement_vector_row is None
            else np.asarray(e.placements.vectors[lookup.placement_vector_row])
        )
        if not len(keys):
            empty = np.zeros(0, dtype=np.float32)
            return {SIMILARITY_INPUTS[0]: empty, SIMILARITY_INPUTS[1]: empty}
        rows = sorted_rows(e.ads.ids, keys)
        vectors = np.asarray(e.ads.vectors[np.maximum(rows, 0)], dtype=np.float32)
        vectors[rows < 0] = self._no_ad
        return {
            SIMILARITY_INPUTS[0]: (vectors @ user).astype(np.float32),
            SIMILARITY_INPUTS[1]: (vectors @ place).astype(np.float32),
        }


def _same_vectors(found: CandidateResult, lookup: EntityLookup) -> bool:
    """Whether the candidate stage scored with the vectors the similarity inputs take: the
    table rows of ``lookup`` (or the fallbacks), not vectors a request supplied."""
    parts = found.parts
    return (
        parts is not None
        and found.user_ad is not None
        and found.context_ad is not None
        and "request" not in (parts.user_source, parts.placement_source)
        and (parts.user_row, parts.placement_row)
        == (lookup.user_vector_row, lookup.placement_vector_row)
    )
