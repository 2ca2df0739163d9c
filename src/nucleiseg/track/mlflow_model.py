"""The MLflow model a training run logs, as models-from-code: this file + the tensor-only model file.

`track.runs.log_model` logs it with `mlflow.pyfunc.log_model(python_model=<this file>,
artifacts={"model": models/model.pt}, code_paths=[the nucleiseg package])`: the run's "Logged
models" entry holds the weights (`artifacts/model.pt`, tensors and plain data) and code, and
nothing pickled.

`nucleiseg predict --model runs:/<id>/model` never runs this file: it downloads artifacts/model.pt
alone and loads it with torch.load(weights_only=True). `mlflow.pyfunc.load_model("runs:/<id>/model")`
(or `mlflow models serve`) does run it and the package code logged with it, as any pyfunc model
runs its code: use that only for runs whose store you trust.

    model = mlflow.pyfunc.load_model("runs:/<id>/model")
    results = model.predict(["slide.png", "other.tif"])   # COCO results, image_id = position 1..n
"""

from __future__ import annotations

import mlflow
from mlflow.pyfunc import PythonModel


class NucleiSegModel(PythonModel):
    """Image paths in, COCO results out (RLE masks; every detection >= the detection floor), with
    the infer settings the model was validated with, on the best device here."""

    def load_context(self, context):
        from nucleiseg.core.runtime import resolve_device
        from nucleiseg.model.maskrcnn import load_trained, saved_infer_config
        from nucleiseg.predict.predictor import Predictor

        path = context.artifacts["model"]
        device = resolve_device("auto")
        model, ckpt = load_trained(path, device)
        self.predictor = Predictor(model, saved_infer_config(ckpt, path), device)

    def predict(self, context, model_input: list[str], params=None):
        from nucleiseg.core import coco
        from nucleiseg.data.layout import read_rgb

        results = []
        for image_id, path in enumerate(model_input, start=1):
            image = read_rgb(path)
            results += coco.results(image_id, self.predictor.predict(image), *image.shape[:2])
        return results


mlflow.models.set_model(NucleiSegModel())
