"""The real CR DICOMs as an outside check: what each model says of the three files in ../shared/data/dicom (a chest
and two encodings of one distal tibia, from another archive and scanner than the UNIFESP training images).

Prints, per model, the region, confidence and out-of-domain flag of each file. `tests/test_shipped_model.py` holds
the shipped model to Chest and Lower Leg or Ankle; this script compares candidate models on the same files
(docs/results.md, "The real CR DICOMs as an outside check").

    .venv/bin/python bench/real_dicoms.py --model runs/s0/model --model runs/s1/model
"""

import argparse
import os
from pathlib import Path

from radregion.bundle import default_model_path, load_bundle
from radregion.inference import Predictor

SHARED = Path(os.environ.get("RADREGION_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", help="bundle; repeat for several (default: the shipped model)")
    args = parser.parse_args(argv)
    files = sorted((SHARED / "dicom").glob("*.dcm"))
    if not files:
        raise SystemExit(f"no DICOM files in {SHARED / 'dicom'}")
    for model in args.model or [str(default_model_path())]:
        predictor = Predictor(load_bundle(model), workers=0)
        said = [
            f"{Path(p.path).name} {p.region} {p.confidence:.2f}{' out-of-domain' if p.out_of_domain else ''}"
            if p.error is None
            else f"{Path(p.path).name} unreadable: {p.error}"
            for p in predictor.predict([str(f) for f in files])
        ]
        print(f"{model} ({predictor.version}): " + "; ".join(said))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
