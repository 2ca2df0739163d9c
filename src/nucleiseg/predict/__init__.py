"""Whole-image prediction: windows, post-processing, stitching, the predictor."""
