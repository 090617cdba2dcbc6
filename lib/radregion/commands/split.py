"""`radregion split`: a patient-grouped, region-stratified train/test split of a labels CSV."""

from pathlib import Path

from radregion.datasets import patient_split, read_labels_csv, write_labels_csv


def register(subparsers):
    parser = subparsers.add_parser(
        "split",
        help="split a labels CSV by patient into train and test CSVs",
        description="Split a labels CSV by patient (by image only where --by-image allows it), stratified by "
        "region, seeded. Writes OUTPUT/train.csv and OUTPUT/test.csv with absolute image paths.",
    )
    parser.add_argument("--labels", required=True, metavar="CSV")
    parser.add_argument("--images-root", metavar="DIR", help="default: the CSV's folder")
    parser.add_argument("--test-fraction", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", required=True, metavar="DIR")
    parser.add_argument(
        "--by-image",
        action="store_true",
        help="accept rows without PatientID, each image its own group (a patient's images may then "
        "land on both sides); without it such rows are an error",
    )
    return parser


def run(args) -> int:
    from radregion.errors import RadiographError

    items = read_labels_csv(args.labels, args.images_root)
    anonymous = [row for row, item in enumerate(items, start=2) if not item.patient_id]  # row 1 is the header
    if anonymous and not args.by_image:
        rows = ", ".join(map(str, anonymous[:5])) + (f" and {len(anonymous) - 5} more" if len(anonymous) > 5 else "")
        raise RadiographError(
            args.labels,
            f"no PatientID in {len(anonymous)} of {len(items)} rows (row {rows}): "
            "a split by image can put one patient's images in train and test; add a "
            "PatientID column, or pass --by-image to split those rows by image",
        )
    train, test = patient_split(items, args.test_fraction, args.seed)
    output = Path(args.output)
    for name, part in (("train", train), ("test", test)):
        rows = [{"image": str(Path(i.path).resolve()), "labels": i.labels, "PatientID": i.patient_id} for i in part]
        write_labels_csv(rows, output / f"{name}.csv")
    patients = {i.group for i in train}, {i.group for i in test}
    print(f"train: {len(train)} images, {len(patients[0])} patients -> {output / 'train.csv'}")
    print(f"test:  {len(test)} images, {len(patients[1])} patients -> {output / 'test.csv'}")
    return 0
