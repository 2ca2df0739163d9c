"""DVC stage `download`: data.source -> data/raw/ (Drive zip, local zip/folder, or synthetic)."""

from nucleiseg.config import load_params
from nucleiseg.download import fetch_dataset
from nucleiseg.errors import NucleisegError, main_guard

SYNTHETIC_KEYS = {"n_train", "n_test", "size", "radius_range", "seam_lines"}


@main_guard
def main() -> None:
    params = load_params()
    data = params.get("data") or {}
    synthetic = dict(data.get("synthetic") or {})
    unknown = sorted(set(synthetic) - SYNTHETIC_KEYS)
    if unknown:
        raise NucleisegError(f"params.yaml: unknown key(s) {unknown} under 'data.synthetic'; known: {sorted(SYNTHETIC_KEYS)}")
    synthetic.setdefault("seed", params.get("seed", 0))
    fetch_dataset(data.get("source", "synthetic"), "data/raw", sha256=data.get("sha256"), synthetic_options=synthetic)


if __name__ == "__main__":
    main()
