"""Candidate selection: nearest-neighbour search over ad embeddings plus popular ads.

Serving imports this package in every worker, so it depends on numpy, annoy, the standard library
and ``deepclick.publish`` only. ``store`` reads and writes the embedding tables (contracts §4),
``index`` builds, publishes and opens the ANNOY index (§5), ``popular`` ranks popular ads and
``service`` answers requests.
"""

from .index import DEFAULT_METRIC, CandidateIndex, CandidateIndexError, build_index, open_index
from .popular import PopularAds, rank_popular
from .service import (
    Candidate,
    CandidateResult,
    CandidateService,
    PairingError,
    check_pairing,
    paired_embeddings_folder,
)
from .store import (
    Embeddings,
    EmbeddingStoreError,
    EmbeddingTable,
    publish_embeddings,
    read_embeddings,
    read_table,
    write_table,
)

__all__ = [
    "DEFAULT_METRIC",
    "Candidate",
    "CandidateIndex",
    "CandidateIndexError",
    "CandidateResult",
    "CandidateService",
    "EmbeddingStoreError",
    "EmbeddingTable",
    "Embeddings",
    "PairingError",
    "PopularAds",
    "build_index",
    "check_pairing",
    "open_index",
    "paired_embeddings_folder",
    "publish_embeddings",
    "rank_popular",
    "read_embeddings",
    "read_table",
    "write_table",
]
