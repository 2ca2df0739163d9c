"""DVC stage `export`: predictions/test.json -> submission/answer.json + answer.zip (CodaLab format)."""

import logging

from nucleiseg.core.errors import main_guard
from nucleiseg.core.io import atomic_path, read_json
from nucleiseg.data.layout import load_test_index
from nucleiseg.export.answer import build_answer, write_answer

log = logging.getLogger("export")


@main_guard
def main() -> None:
    answer = build_answer(read_json("predictions/test.json"), load_test_index("data/raw"))
    with atomic_path("submission") as out:
        out.mkdir()
        write_answer(answer, out / "answer.json", out / "answer.zip")
    log.info("submission/answer.json: %d nuclei", len(answer))


if __name__ == "__main__":
    main()
