"""DVC stage `download`: data.source -> data/raw/ (Drive zip, local zip/folder, or synthetic) + data/raw/SOURCE.json."""

import dataclasses

from nucleiseg.core.config import read_params
from nucleiseg.core.errors import main_guard
from nucleiseg.data.download import fetch_dataset


@main_guard
def main() -> None:
    params = read_params()
    synthetic = {**dataclasses.asdict(params.data.synthetic), "seed": params.seed}
    fetch_dataset(params.data.source, "data/raw", sha256=params.data.sha256, synthetic_options=synthetic)


if __name__ == "__main__":
    main()
