"""`radregion inspect`: what RadRegion sees in each file: metadata, archive label, size, cleaning result."""

import json
import sys
from pathlib import Path

import numpy as np

from radregion.errors import RadiographError


def register(subparsers):
    parser = subparsers.add_parser(
        "inspect",
        help="show metadata, archive label and cleaning result of radiographs",
        description="Print the metadata, the region the archive's header claims, the image size and the "
        "cleaning result of each file. Bad files get one line each; the exit status is 1 if any failed.",
    )
    parser.add_argument("files", nargs="+", metavar="FILE", help="DICOM, PNG, JPEG, NRRD, MHA or NIfTI files")
    parser.add_argument("--size", type=int, default=224, metavar="N", help="cleaned image size (default 224)")
    parser.add_argument("--save-png", metavar="DIR", help="write each cleaned image to DIR/<name>.png")
    parser.add_argument("--json", action="store_true", help="print one JSON list instead of text")
    return parser


def run(args) -> int:
    from radregion.cleaning import CleaningSettings

    settings = CleaningSettings(size=args.size)
    save_dir = Path(args.save_png) if args.save_png else None
    records, failed, used_names = [], 0, set()
    for name in args.files:
        try:
            record = inspect_file(name, settings)
            if save_dir is not None:
                record["saved_png"] = str(_save_png(record.pop("cleaned"), save_dir, Path(name), used_names))
            record.pop("cleaned", None)
        except RadiographError as error:
            failed += 1
            record = {"path": str(name), "error": error.problem}
            if not args.json:
                print(f"error: {error}", file=sys.stderr)
        records.append(record)
        if not args.json and "error" not in record:
            print(_as_text(record), flush=True)
    if args.json:
        print(json.dumps(records, indent=2))
    return 1 if failed else 0


def inspect_file(path, settings) -> dict:
    """Everything `inspect` reports for one file, plus the cleaned uint8 image under "cleaned"."""
    from radregion.cache import READ_OVERSAMPLE
    from radregion.cleaning import clean, find_field
    from radregion.io import read_radiograph
    from radregion.taxonomy import load_taxonomy

    radiograph = read_radiograph(path, max_size=READ_OVERSAMPLE * settings.size)
    meta = radiograph.meta
    image = radiograph.image
    rows, columns = meta.get("Rows", image.shape[0]), meta.get("Columns", image.shape[1])
    top, bottom, left, right = find_field(image) if settings.crop_borders else (0, *image.shape[:1], 0, image.shape[1])
    scale_y, scale_x = rows / image.shape[0], columns / image.shape[1]
    crop = [round(top * scale_y), round(bottom * scale_y), round(left * scale_x), round(right * scale_x)]
    cleaned = np.rint(clean(image, settings) * 255.0).astype(np.uint8)
    label = load_taxonomy("unifesp22").archive_label(meta)
    return {
        "path": str(path),
        "format": meta["format"],
        "metadata": {k: v for k, v in meta.items() if k not in ("path", "format")},
        "archive_label": {
            "region": label.region,
            "field": label.field,
            "matched": label.matched,
            "conflicts": [list(c) for c in label.conflicts],
        },
        "image_size": [int(rows), int(columns)],
        "decoded_size": list(image.shape),
        "crop_box": crop,  # top, bottom, left, right in original pixels (half-open)
        "field_fraction": round((crop[1] - crop[0]) * (crop[3] - crop[2]) / (rows * columns), 3),
        "cleaned_size": list(cleaned.shape),
        "cleaned_mean": round(float(cleaned.mean()) / 255.0, 3),
        "cleaned": cleaned,
    }


def _as_text(record: dict) -> str:
    label = record["archive_label"]
    if label["region"]:
        claim = f"{label['region']} ({label['field']}: {label['matched']!r})"
    elif label["conflicts"]:
        claim = "conflict: " + "; ".join(f"{f} says {r or '?'} ({t!r})" for f, r, t in label["conflicts"])
    else:
        claim = "none" + (f" ({label['field']}: {label['matched']})" if label["field"] else "")
    rows, columns = record["image_size"]
    top, bottom, left, right = record["crop_box"]
    lines = [record["path"], f"  {'format':<26}{record['format']}"]
    lines += [f"  {key:<26}{value}" for key, value in record["metadata"].items()]
    lines += [
        f"  {'archive label':<26}{claim}",
        f"  {'image size':<26}{rows} rows x {columns} columns",
        f"  {'exposed field (crop box)':<26}rows {top}-{bottom}, columns {left}-{right} "
        f"({record['field_fraction']:.0%} of the image)",
        f"  {'cleaned':<26}{record['cleaned_size'][0]} x {record['cleaned_size'][1]}, mean {record['cleaned_mean']}",
    ]
    if "saved_png" in record:
        lines.append(f"  {'saved':<26}{record['saved_png']}")
    return "\n".join(lines)


def _save_png(cleaned: np.ndarray, folder: Path, source: Path, used_names: set) -> Path:
    from PIL import Image

    from radregion.atomic import atomic_write

    stem = source.name[: -len(".nii.gz")] if source.name.lower().endswith(".nii.gz") else source.stem or source.name
    name, counter = f"{stem}.png", 2
    while name in used_names:
        name, counter = f"{stem}-{counter}.png", counter + 1
    used_names.add(name)
    target = folder / name
    with atomic_write(target) as handle:
        Image.fromarray(cleaned).save(handle, format="PNG")
    return target
