"""The CTR ranker (DESIGN.md, "models: ranker"): preprocessing from the feature spec, DCN-v2 or
DeepFM, calibration, the LR baseline, training, SavedModel export and the in-process predictor."""
