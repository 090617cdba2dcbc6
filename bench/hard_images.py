"""Which held-out images do many models get wrong? The part of the test error no recipe change removes.

Reads the `predictions.csv` of several `radregion evaluate` runs on one labelled test CSV and counts, per in-domain
test image (matched by file name: runs on another machine wrote other folders), the models whose predicted region
is not among its archive labels. Prints each model's top-1, how many
images at least 100 / 90 / 75 / 50 / 25 % of the models get wrong, the top-1 of the models' majority vote, and the
images wrong for at least half of them (archive label, what the models said) to look at one by one.
A measurement for issue 12 (docs/results.md).

    .venv/bin/python bench/hard_images.py --labels runs/model-s1/test.csv runs/*/evaluation/predictions.csv
"""

import argparse
import csv
from collections import Counter
from pathlib import Path


from radregion.datasets import read_labels_csv
from radregion.evaluate import summarise
from radregion.head import out_of_domain_regions
from radregion.taxonomy import load_taxonomy


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("predictions", nargs="+", metavar="CSV", help="predictions.csv of `radregion evaluate`")
    parser.add_argument("--labels", required=True, metavar="CSV", help="the test CSV the models were evaluated on")
    parser.add_argument("--taxonomy", default="unifesp22")
    args = parser.parse_args(argv)
    taxonomy = load_taxonomy(args.taxonomy)
    outside = out_of_domain_regions(taxonomy, ())
    truth = {
        it.path.name: set(it.labels)
        for it in read_labels_csv(args.labels, taxonomy=taxonomy)
        if not set(it.labels) & outside
    }
    said: dict[str, Counter] = {name: Counter() for name in truth}
    regions = sorted({region for labels in truth.values() for region in labels})
    for predictions in args.predictions:
        with open(predictions, newline="", encoding="utf-8") as handle:
            rows = {Path(row["path"]).name: row["region"] for row in csv.DictReader(handle)}
        if missing := [name for name in truth if name not in rows]:
            parser.error(f"{predictions}: {len(missing)} test images not predicted, e.g. {missing[0]}")
        for name in truth:
            said[name][rows[name]] += 1
        top1 = summarise([rows[name] for name in truth], list(truth.values()), regions, n_boot=0)["top1"]
        print(f"{predictions}: top-1 {top1:.3f}")
    n = len(args.predictions)
    wrong = {name: sum(c for region, c in said[name].items() if region not in truth[name]) for name in truth}
    print(f"\n{n} models, {len(truth)} in-domain test images; images wrong for at least")
    for share in (1.0, 0.9, 0.75, 0.5, 0.25):
        print(f"  {share:>4.0%} of the models: {sum(w >= share * n for w in wrong.values())}")
    print(f"  one model: {sum(w > 0 for w in wrong.values())}")
    majority = [said[name].most_common(1)[0][0] for name in truth]
    print(f"majority vote top-1: {summarise(majority, list(truth.values()), regions, n_boot=0)['top1']:.3f}")
    print("\nwrong for at least half of the models (archive label -> what the models said):")
    for name, w in sorted(wrong.items(), key=lambda item: -item[1]):
        if w >= 0.5 * n:
            votes = ", ".join(f"{region} {c}" for region, c in said[name].most_common(3))
            print(f"  {w:>3}/{n} {name}: {'|'.join(sorted(truth[name]))} -> {votes}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
