"""Mask R-CNN: building it from config and the model-file format."""
