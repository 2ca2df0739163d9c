"""DVC stage `tile`: data/raw/ -> data/split.json + data/tiles/ (overlapping windows, COCO RLE)."""

import logging

from nucleiseg.config import load_params, tile_config
from nucleiseg.data import load_train_sample, split_ids, train_ids
from nucleiseg.errors import NucleisegError, main_guard
from nucleiseg.io import atomic_path, write_json
from nucleiseg.tiling import tile_split

log = logging.getLogger("tile")


@main_guard
def main() -> None:
    params = load_params()
    cfg = tile_config(params)
    ids = train_ids("data/raw")
    val_images = int((params.get("data") or {}).get("val_images", 4))
    if val_images < 1:
        raise NucleisegError("params.yaml: data.val_images must be >= 1: validation and the evaluate stage score the held-out images")
    split = split_ids(ids, val_images, int(params.get("seed", 0)))
    with atomic_path("data/tiles") as tiles_dir:
        summary = {}
        for name, names in split.items():
            samples = (load_train_sample("data/raw", image_id) for image_id in names)
            summary[name] = tile_split(samples, tiles_dir, name, cfg.size, cfg.overlap, cfg.min_visible)
            summary[name]["images"] = len(names)
        write_json(tiles_dir / "summary.json", summary)
    write_json("data/split.json", split)
    log.info("tiles: %s", summary)


if __name__ == "__main__":
    main()
