"""TEMPORARY re-export while the features stage is being written; the lead moves the module here."""

from pipelines.features.spec import *  # noqa: F403
from pipelines.features.spec import (  # noqa: F401
    MISSING,
    REQUEST_TIME_FEATURES,
    ROLE_KEY,
    ROLES,
    EntitySpec,
    Feature,
    FeatureSpec,
    FeatureSpecError,
    load_feature_spec,
)
