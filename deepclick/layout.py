"""Where everything lives under the state root (DESIGN.md, "Publishing"; STYLE.md, item 12).

One place answers where a stage's folder is, what a day's version string looks like and which file
is a manifest: every stage, the lifecycle, the CLI and the demo ask this module instead of joining
path pieces themselves. It imports nothing of the project and no third-party library, so any
layer may import it (serving workers included) without loading TensorFlow or Spark.

Layout of ``<root>`` (docs/contracts.md):

    raw/                                  generated or copied source logs
    warehouse/events/date=YYYY-MM-DD/     canonical events (+ quarantine/)
    warehouse/features/<version>/         feature spec, entity tables, training/eval sets
    artifacts/{towers,embeddings,index}/<version>/
    model_repository/<model>/<version>/   every exported ranker
    tfserving_repository/<model>/<version>/  champions only (what TF Serving watches)
    evaluations/<version>/  challengers/<version>/  releases/<version>/
    runs/<version>/                       the run ledger of day D
    registry/decisions.jsonl              every promotion and refusal (+ registry/gates/<version>/)
    reports/                              human-readable reports
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

# --------------------------------------------------------------------------- file names

MANIFEST = "manifest.json"
"""The manifest of every published folder (``deepclick.publish``)."""
CURRENT = "CURRENT"
"""The pointer file naming a parent folder's current version."""
PARTITION_MANIFEST = "_manifest.json"
"""The manifest of one ``date=`` partition of the events (``_`` so Spark skips it)."""
SPEC_FILE = "feature_spec.json"
"""The feature spec inside a features folder and a release."""
RANKER_MANIFEST = "deepclick_manifest.json"
"""The exported ranker's manifest (TF Serving owns the version folder's other names)."""
RELEASE_FILE = "release.json"
"""A release's description of the components it combines."""
RANKER_COPY = "ranker_manifest.json"
"""A release's copy of its ranker's manifest (remote-ranker workers have no model files)."""

# --------------------------------------------------------------------------- folder names

RAW = "raw"
WAREHOUSE = "warehouse"
ARTIFACTS = "artifacts"
MODEL_REPOSITORY = "model_repository"
TFSERVING_REPOSITORY = "tfserving_repository"
RELEASES = "releases"
CHALLENGERS = "challengers"
EVALUATIONS = "evaluations"
GATES = "gates"
RUNS = "runs"
REGISTRY = "registry"
REPORTS = "reports"


def version_for(date: dt.date | str) -> str:
    """The version name of everything built for one day: ``YYYYMMDD`` (an integer, as TF Serving
    requires for model versions, and sortable)."""
    day = dt.date.fromisoformat(date) if isinstance(date, str) else date
    return day.strftime("%Y%m%d")


def parse_date(text: str | dt.date) -> dt.date:
    """A ``YYYY-MM-DD`` day; the error names the value and the expected form."""
    if isinstance(text, dt.date):
        return text
    try:
        return dt.date.fromisoformat(text)
    except ValueError:
        raise ValueError(f"date {text!r} is not a day in the form YYYY-MM-DD") from None


# --------------------------------------------------------------------------- folders of a root


def raw_dir(root: Path) -> Path:
    return root / RAW


def raw_source(root: Path, dataset: str) -> Path:
    """Where ``deepclick simulate`` (and the daily run's default source) keeps a dataset's logs."""
    return raw_dir(root) / dataset


def truth_dir(root: Path, dataset: str) -> Path:
    """The simulator's ground truth beside a generated dataset's logs."""
    return raw_source(root, dataset) / "_truth"


def warehouse(root: Path) -> Path:
    return root / WAREHOUSE


def events_dir(root: Path) -> Path:
    return warehouse(root) / "events"


def quarantine_dir(root: Path) -> Path:
    return warehouse(root) / "quarantine"


def artifacts(root: Path) -> Path:
    return root / ARTIFACTS


def events_partition(root: Path, date: dt.date) -> Path:
    """The canonical events of one day (a Spark ``date=`` partition)."""
    return events_dir(root) / f"date={date.isoformat()}"


def features_dir(root: Path) -> Path:
    return warehouse(root) / "features"


def towers_dir(root: Path) -> Path:
    return artifacts(root) / "towers"


def embeddings_dir(root: Path) -> Path:
    return artifacts(root) / "embeddings"


def ranker_towers_dir(root: Path) -> Path:
    """Towers refitted away from serving: those whose scores the ranker trains on, when the
    served towers learn from the whole window (``lifecycle.refit_towers``)."""
    return artifacts(root) / "ranker_towers"


def ranker_embeddings_dir(root: Path) -> Path:
    """The vectors of :func:`ranker_towers_dir`'s towers: the ranker's training inputs only."""
    return artifacts(root) / "ranker_embeddings"


def index_dir(root: Path) -> Path:
    return artifacts(root) / "index"


def model_repository(root: Path) -> Path:
    """Every exported ranker, ``<model>/<version>/`` (the TF Serving layout)."""
    return root / MODEL_REPOSITORY


def releases_dir(root: Path) -> Path:
    return root / RELEASES


def challengers_dir(root: Path) -> Path:
    """Releases of challengers, built to be replayed, never served."""
    return root / CHALLENGERS


def evaluations_dir(root: Path) -> Path:
    return root / EVALUATIONS


def runs_dir(root: Path) -> Path:
    return root / RUNS


def registry_dir(root: Path) -> Path:
    return root / REGISTRY


def tfserving_repository(root: Path) -> Path:
    return root / TFSERVING_REPOSITORY


def reports_dir(root: Path, date: dt.date) -> Path:
    """Human-readable reports about day D (``deepclick evaluate``, ``replay``)."""
    return root / REPORTS / version_for(date)


def retrieval_reports_dir(root: Path, date: dt.date) -> Path:
    """``deepclick retrieval-eval``'s report of day D."""
    return root / REPORTS / "retrieval" / version_for(date)


def mlflow_dir(root: Path) -> Path:
    """The embedded MLflow store: its SQLite database and artifact folder."""
    return root / "mlflow"


class DayLayout:
    """Every folder the daily run reads or writes for day D, under one root.

    The stage table, the CLI and the demo all ask these properties; a published folder is
    ``<parent>/<version>`` with ``version = version_for(D)``.
    """

    def __init__(self, root: Path, date: dt.date, model_name: str = "ranker") -> None:
        self.root = Path(root)
        self.date = date
        self.version = version_for(date)
        self.model_name = model_name

    @property
    def events(self) -> Path:
        return events_partition(self.root, self.date)

    @property
    def features(self) -> Path:
        return features_dir(self.root) / self.version

    @property
    def eval_rows(self) -> Path:
        """D's evaluation rows inside the features folder."""
        return self.features / "eval"

    @property
    def towers(self) -> Path:
        return towers_dir(self.root) / self.version

    @property
    def embeddings(self) -> Path:
        return embeddings_dir(self.root) / self.version

    @property
    def ranker_towers(self) -> Path:
        return ranker_towers_dir(self.root) / self.version

    @property
    def ranker_embeddings(self) -> Path:
        return ranker_embeddings_dir(self.root) / self.version

    @property
    def index(self) -> Path:
        return index_dir(self.root) / self.version

    @property
    def ranker(self) -> Path:
        return model_repository(self.root) / self.model_name / self.version

    @property
    def evaluation(self) -> Path:
        return evaluations_dir(self.root) / self.version

    @property
    def gate(self) -> Path:
        return registry_dir(self.root) / GATES / self.version

    @property
    def challenger_release(self) -> Path:
        return challengers_dir(self.root) / self.version

    @property
    def run(self) -> Path:
        """D's run ledger folder."""
        return runs_dir(self.root) / self.version

    @property
    def reports(self) -> Path:
        return reports_dir(self.root, self.date)
