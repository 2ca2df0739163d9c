"""Training: samples and augmentation, the loop, hooks, the train stage."""
