"""Which out-of-domain score, per fine-tuned backbone: the methods of `radregion.ood` and their pairwise combinations.

For each bundle, each score of `radregion.ood` (mahalanobis, knn, msp, energy, classifier) is fitted on the train
split's features (in-domain images; the classifier also on its `Others`) and scored on the test split; a
combination adds the two scores' ranks over the test images (label-free, so no test label chooses it). Prints,
per bundle and as a mean over the bundles, the test AUROC of telling the `Others` from in-domain images and the
share of `Others` above the score that flags 5% of the test in-domain images (the issue's "80% at 5% false alarms").
A lever measured for issue 12 (docs/results.md); `radregion fit-head` chooses one method per bundle out of fold.

    .venv/bin/python bench/ood_methods.py --train runs/model-s1/train.csv --test runs/model-s1/test.csv \
        runs/model-s1/model runs/s0/model ...
"""

import argparse
import itertools

import numpy as np
from scipy.stats import rankdata

from radregion.bundle import load_bundle
from radregion.datasets import read_labels_csv
from radregion.features import bundle_features
from radregion.head import out_of_domain_regions
from radregion.ood import METHODS, auroc, fit_ood

FALSE_ALARMS = 0.05


def scores(bundle, train_csv, test_csv) -> tuple[dict, np.ndarray]:
    """({method or pair: test scores}, test in-domain mask) for one bundle."""
    taxonomy = bundle.taxonomy()
    outside = out_of_domain_regions(taxonomy, ())
    train, test = read_labels_csv(train_csv, taxonomy=taxonomy), read_labels_csv(test_csv, taxonomy=taxonomy)
    train_x, _, _ = bundle_features(bundle, [it.path for it in train], progress=False)
    test_x, _, _ = bundle_features(bundle, [it.path for it in test], progress=False)
    train_in = np.array([not set(it.labels) & outside for it in train])
    test_in = np.array([not set(it.labels) & outside for it in test])
    regions = np.array([it.labels[0] for it in train])[train_in]
    out = {
        method: fit_ood(train_x[train_in], regions, method, outliers=train_x[~train_in]).score(test_x)
        for method in METHODS
    }
    ranks = {method: rankdata(s) for method, s in out.items()}
    for a, b in itertools.combinations(METHODS, 2):
        out[f"{a}+{b}"] = ranks[a] + ranks[b]
    return out, test_in


def flagged_at(in_domain, out_of_domain, false_alarms=FALSE_ALARMS) -> float:
    return float((np.asarray(out_of_domain) > np.quantile(in_domain, 1 - false_alarms)).mean())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", metavar="BUNDLE")
    parser.add_argument("--train", required=True, metavar="CSV", help="the split the bundles were trained on")
    parser.add_argument("--test", required=True, metavar="CSV", help="held-out patients, with `Others` images")
    args = parser.parse_args(argv)
    table: dict[str, list] = {}
    for path in args.models:
        bundle = load_bundle(path)
        per_method, test_in = scores(bundle, args.train, args.test)
        cells = []
        for name, s in per_method.items():
            figures = (auroc(s[test_in], s[~test_in]), flagged_at(s[test_in], s[~test_in]))
            table.setdefault(name, []).append(figures)
            cells.append(f"{name} {figures[0]:.3f}/{figures[1]:.2f}")
        chosen = (bundle.ood or {}).get("method")
        print(f"{path} ({bundle.version}, its own choice {chosen}): " + ", ".join(cells), flush=True)
    print(f"\nover {len(args.models)} bundles: AUROC mean (min), `Others` flagged at {FALSE_ALARMS:.0%} mean (min)")
    for name, rows in table.items():
        a, f = np.array(rows).T
        print(f"{name:>24}: {a.mean():.3f} ({a.min():.3f})  {f.mean():.2f} ({f.min():.2f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
