"""nucleiseg: Mask R-CNN nuclei instance segmentation on H&E images, as a DVC + MLflow pipeline."""

__version__ = "0.1.0"
