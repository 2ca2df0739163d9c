"""DVC stage `download`: data.source -> the raw dataset folder (Drive zip, local zip/folder, or synthetic) + its SOURCE.json."""

import dataclasses

from nucleiseg.core.config import read_params
from nucleiseg.core.errors import main_guard
from nucleiseg.core.stage_args import stage_paths
from nucleiseg.data.download import fetch_dataset


@main_guard
def main() -> None:
    paths = stage_paths(__doc__, "out")
    params = read_params()
    synthetic = {**dataclasses.asdict(params.data.synthetic), "seed": params.seed}
    fetch_dataset(params.data.source, paths.out, sha256=params.data.sha256, synthetic_options=synthetic)


if __name__ == "__main__":
    main()
