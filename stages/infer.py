"""DVC stage `infer`: models/model.pt -> predictions/val.json, predictions/test.json (whole images, stitched)."""

import json
import logging

from tqdm import tqdm

from nucleiseg import coco
from nucleiseg.config import infer_config, load_params, train_config
from nucleiseg.data import load_test_index, read_rgb, train_image_path
from nucleiseg.engine import resolve_device
from nucleiseg.errors import main_guard
from nucleiseg.evaluation import val_image_ids
from nucleiseg.io import atomic_path, read_json
from nucleiseg.model import load_trained
from nucleiseg.predictor import Predictor

log = logging.getLogger("infer")


def predict_all(predictor, items, desc):
    """COCO results for (image_id, path) items."""
    results = []
    for image_id, path in tqdm(items, desc=desc, unit="image"):
        image = read_rgb(path)
        instances = predictor.predict(image)
        results += coco.results(image_id, instances, *image.shape[:2])
    return results


@main_guard
def main() -> None:
    params = load_params()
    device = resolve_device(train_config(params).device)
    model, _ = load_trained("models/model.pt", device)
    predictor = Predictor(model, infer_config(params), device)
    val_names = read_json("data/split.json")["val"]
    val_items = [(image_id, train_image_path("data/raw", name)) for name, image_id in val_image_ids(val_names).items()]
    test_items = [(img.id, img.path) for img in load_test_index("data/raw")]
    with atomic_path("predictions") as out:
        out.mkdir()
        for split, items in (("val", val_items), ("test", test_items)):
            results = predict_all(predictor, items, f"infer {split}")
            (out / f"{split}.json").write_text(json.dumps(results))
            log.info("%s: %d instances on %d images", split, len(results), len(items))


if __name__ == "__main__":
    main()
