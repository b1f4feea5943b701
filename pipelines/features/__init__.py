"""The features stage: ``nodes`` (pure Spark transforms), ``runner`` (``run_features``) and
``spec`` (the feature spec, importable without Spark by models and serving)."""
