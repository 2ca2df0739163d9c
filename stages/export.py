"""DVC stage `export`: the test predictions -> answer.json + answer.zip in the submission folder (CodaLab format)."""

import logging

from nucleiseg.core.errors import main_guard
from nucleiseg.core.io import atomic_path, read_json
from nucleiseg.core.stage_args import stage_paths
from nucleiseg.data.layout import load_test_index
from nucleiseg.export.answer import build_answer, write_answer

log = logging.getLogger("export")


@main_guard
def main() -> None:
    paths = stage_paths(__doc__, "predictions", "raw", "out")
    answer = build_answer(read_json(paths.predictions), load_test_index(paths.raw), paths.predictions)
    with atomic_path(paths.out) as out:
        out.mkdir()
        write_answer(answer, out / "answer.json", out / "answer.zip")
    log.info("%s: %d nuclei", paths.out / "answer.json", len(answer))


if __name__ == "__main__":
    main()
