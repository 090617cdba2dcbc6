"""`radregion split`: a patient-grouped, region-stratified train/test split of a labels CSV."""

from pathlib import Path

from radregion.datasets import patient_split, read_labels_csv, write_labels_csv


def register(subparsers):
    parser = subparsers.add_parser(
        "split", help="split a labels CSV by patient into train and test CSVs",
        description="Split a labels CSV by patient (never by image), stratified by region, seeded. "
                    "Writes OUTPUT/train.csv and OUTPUT/test.csv with absolute image paths.")
    parser.add_argument("--labels", required=True, metavar="CSV")
    parser.add_argument("--images-root", metavar="DIR", help="default: the CSV's folder")
    parser.add_argument("--test-fraction", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", required=True, metavar="DIR")
    return parser


def run(args) -> int:
    items = read_labels_csv(args.labels, args.images_root)
    train, test = patient_split(items, args.test_fraction, args.seed)
    output = Path(args.output)
    for name, part in (("train", train), ("test", test)):
        rows = [{"image": str(Path(i.path).resolve()), "labels": i.labels, "PatientID": i.patient_id} for i in part]
        write_labels_csv(rows, output / f"{name}.csv")
    patients = {i.group for i in train}, {i.group for i in test}
    print(f"train: {len(train)} images, {len(patients[0])} patients -> {output / 'train.csv'}")
    print(f"test:  {len(test)} images, {len(patients[1])} patients -> {output / 'test.csv'}")
    return 0
