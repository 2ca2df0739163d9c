"""Whole-image validation during training: the infer stage's predictor and the evaluate stage's
metrics on the held-out images, so the best epoch is chosen on what evaluate reports."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import coco
from .config import EvaluateConfig, InferConfig
from .data import Sample, val_image_ids
from .evaluation import evaluate
from .predictor import Predictor


@dataclass
class WholeImageValidator:
    samples: list[Sample]
    infer: InferConfig
    evaluate: EvaluateConfig
    device: torch.device

    def records(self) -> list[coco.ImageRecord]:
        ids = val_image_ids([s.name for s in self.samples])
        return [coco.ImageRecord(ids[s.name], f"{s.name}.png", *s.image.shape[:2], s.instances) for s in self.samples]

    def __call__(self, model: torch.nn.Module) -> dict:
        """Val metrics of `model` (left in eval mode: the caller switches back to training)."""
        model.eval()
        predictor = Predictor(model, self.infer, self.device)
        ids = val_image_ids([s.name for s in self.samples])
        results = []
        for sample in self.samples:
            results += coco.results(ids[sample.name], predictor.predict(sample.image), *sample.image.shape[:2])
        ev = evaluate(self.records(), results, self.evaluate.max_dets_all, self.evaluate.operating_metric, score_floor=self.infer.score_threshold)
        return ev.metrics
