"""Request and response bodies of the ranking API.

Validation happens here, before any work: ids are bounded strings, counts are bounded integers
(``strict``: ``"5"`` or ``5.0`` for ``num_ads`` is a 422, not a silent conversion), unknown fields
are refused, and nothing a client sends is ever a path — ids are only looked up by binary search
in mapped tables. Limits that depend on settings (``num_candidates`` ≤ ``max_candidates``, the
length of ``exclude_ad_ids``) and features that depend on the release's feature spec are checked by
the route and reported the same way (422 naming the field).
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictFloat,
    StrictInt,
    StrictStr,
)

MAX_ADS = 100
MAX_ID_CHARS = 128
MAX_FEATURES = 64


def _encodable(text: str) -> str:
    """Refuse lone surrogates (``"\\ud800"`` is valid JSON but not text): ids are encoded to
    UTF-8 for lookups, which would fail with a 500 on them."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode text (no lone surrogates)") from None
    return text


Text = Annotated[StrictStr, AfterValidator(_encodable)]
EntityId = Annotated[Text, Field(min_length=1, max_length=MAX_ID_CHARS)]
FiniteFloat = Annotated[StrictFloat, Field(allow_inf_nan=False)]
FeatureValue = Text | StrictInt | FiniteFloat


class RankRequest(BaseModel):
    """Rank ads for one user on one placement."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"user_id": "u00001", "placement_id": "p001", "num_ads": 10}]
        },
    )

    user_id: EntityId
    placement_id: EntityId
    user_features: dict[Text, FeatureValue] | None = Field(
        None,
        max_length=MAX_FEATURES,
        description="features of an unknown user (cold start), by feature-spec name",
    )
    context_features: dict[Text, FeatureValue] | None = Field(
        None,
        max_length=MAX_FEATURES,
        description="features of an unknown placement, or event features the tables lack",
    )
    num_ads: StrictInt = Field(10, ge=1, le=MAX_ADS, description="ads to return")
    num_candidates: StrictInt | None = Field(
        None, ge=1, description="candidates to score (default and maximum: server settings)"
    )
    exclude_ad_ids: list[EntityId] = Field(
        default_factory=list, description="ads that must not be returned (e.g. already shown)"
    )
    request_time: dt.datetime | None = Field(
        None, description="time of the request (ISO 8601; naive = UTC); default now"
    )


class RankedAd(BaseModel):
    ad_id: str
    pctr: float | None = Field(description="calibrated click probability; null when degraded")
    score: float = Field(description="what the list is sorted by: pctr, or retrieval score")
    retrieval_score: float = Field(description="two-tower similarity (user + context)·ad")
    source: Literal["ann", "popular"]


class ReleaseVersions(BaseModel):
    release: str
    feature_spec: str
    embeddings: str
    index: str
    ranker: str
    ranker_model: str


class StageTimings(BaseModel):
    """Milliseconds spent in each stage of the request."""

    lookup: float
    retrieve: float
    features: float
    predict: float
    sort: float
    total: float


class RankResponse(BaseModel):
    ads: list[RankedAd]
    versions: ReleaseVersions
    backend: str
    candidates_considered: int
    fallbacks: list[str] = Field(description="fallbacks applied (cold start, defaults)")
    degraded: bool = Field(description="true: the ranker timed out or failed")
    reason: str | None = Field(None, description="why degraded, or why the list is empty")
    timings_ms: StageTimings


class Problem(BaseModel):
    """An error answer: the status says what kind, ``detail`` says why."""

    detail: str | list[dict]


class ReleaseInfo(BaseModel):
    versions: ReleaseVersions
    folder: str
    backend: str
    signature: str
    ads: int
    entities: dict[str, int]
    timezone: str
    load_seconds: float
    warmup: dict
    note: str | None = None


class Readiness(BaseModel):
    status: Literal["ready", "degraded", "not ready"] = Field(
        description="degraded: the ranker does not answer, requests get retrieval order (200)"
    )
    release: str | None = None
    detail: str | None = None
    note: str | None = Field(
        None, description="why the release served is not plainly CURRENT's (fallback, degraded)"
    )
