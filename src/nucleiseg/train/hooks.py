"""Whole-image validation during training: the infer stage's predictor and the evaluate stage's
metrics on the held-out images, so the best epoch is chosen on what evaluate reports."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nucleiseg.core import coco
from nucleiseg.core.config import EvaluateConfig, InferConfig
from nucleiseg.data.layout import Sample
from nucleiseg.evaluate.evaluator import evaluate, val_records
from nucleiseg.predict.predictor import Predictor


@dataclass
class WholeImageValidator:
    samples: list[Sample]
    infer: InferConfig
    evaluate: EvaluateConfig
    device: torch.device

    def __call__(self, model: torch.nn.Module) -> dict:
        """Val metrics of `model` (left in eval mode: the caller switches back to training)."""
        model.eval()
        predictor = Predictor(model, self.infer, self.device)
        records = val_records(self.samples)
        results = []
        for sample, record in zip(self.samples, records):
            results += coco.results(record.id, predictor.predict(sample.image), record.height, record.width)
        ev = evaluate(records, results, self.evaluate.max_dets_all, self.evaluate.operating_metric, score_floor=self.infer.score_floor)
        return ev.metrics
