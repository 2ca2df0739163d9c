"""DVC stage `infer`: the trained model -> val.json and test.json in the predictions folder (whole images,
stitched; every detection above infer.score_floor, for AP; the evaluate stage chooses the operating point).
Without val images (data.fold: all) only test.json."""

import json
import logging

from nucleiseg.core.config import read_params
from nucleiseg.core.errors import main_guard
from nucleiseg.core.io import atomic_path, read_json
from nucleiseg.core.runtime import resolve_device
from nucleiseg.core.stage_args import stage_paths
from nucleiseg.data.layout import load_test_index, train_image_path, val_image_ids
from nucleiseg.model.maskrcnn import load_trained
from nucleiseg.predict.predictor import Predictor, predict_files

log = logging.getLogger("infer")


@main_guard
def main() -> None:
    paths = stage_paths(__doc__, "model", "raw", "split", "out")
    params = read_params()
    device = resolve_device(params.device)
    model, _ = load_trained(paths.model, device)
    predictor = Predictor(model, params.infer, device)
    val_names = read_json(paths.split)["val"]
    items = {}
    if val_names:  # none with data.fold: all (the final model): only test predictions
        items["val"] = [(image_id, train_image_path(paths.raw, name)) for name, image_id in val_image_ids(val_names).items()]
    items["test"] = [(img.id, img.path) for img in load_test_index(paths.raw)]
    with atomic_path(paths.out) as out:
        out.mkdir()
        for split, split_items in items.items():
            results = predict_files(predictor, split_items, f"infer {split}")
            (out / f"{split}.json").write_text(json.dumps(results))
            log.info("%s: %d instances on %d images", split, len(results), len(split_items))


if __name__ == "__main__":
    main()
