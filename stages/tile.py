"""DVC stage `tile`: the raw dataset -> the train/val split + the training windows with their instance label maps."""

import dataclasses
import logging

from nucleiseg.core.config import read_params
from nucleiseg.core.errors import main_guard
from nucleiseg.core.io import atomic_path, write_json
from nucleiseg.core.runtime import default_workers
from nucleiseg.core.stage_args import stage_paths
from nucleiseg.data.layout import check_dataset, source_record, split_ids, train_ids
from nucleiseg.data.tile_store import write_split

log = logging.getLogger("tile")


@main_guard
def main() -> None:
    paths = stage_paths(__doc__, "raw", "split", "tiles")
    params = read_params()
    cfg = params.tile
    split = split_ids(train_ids(paths.raw), params.data.val_images, params.seed, params.data.fold)
    # Only the train images are tiled (and so read) here: the val and test images are checked now, not
    # when the train or infer stage first reads them.
    check_dataset(paths.raw, split["val"], default_workers() + 1)
    with atomic_path(paths.tiles) as tiles_dir:
        train = write_split(paths.raw, split["train"], tiles_dir, "train", cfg.size, cfg.overlap, cfg.min_visible, default_workers() + 1)
        summary = {"data": source_record(paths.raw), "train": train, "val_images": split["val"], "tile": dataclasses.asdict(cfg)}
        write_json(tiles_dir / "summary.json", summary)
    write_json(paths.split, split)
    log.info("tiles of %s: %d windows, %d instances from %d images; val images: %s", summary["data"]["source"], train["windows"],
             train["instances"], train["images"], ", ".join(split["val"]))


if __name__ == "__main__":
    main()
