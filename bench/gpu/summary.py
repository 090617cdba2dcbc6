"""One line per `radregion evaluate` output under a folder: top-1 with its 95% CI, macro recall, out-of-domain
AUROC and the fractions flagged.  python bench/gpu/summary.py FOLDER"""

import json
import sys
from pathlib import Path

root = Path(sys.argv[1])
for figures in sorted(root.glob("**/figures.json")):
    d = json.loads(figures.read_text())
    ood = d.get("out_of_domain") or {}
    low, high = d["ci95"]["top1"]
    print(
        f"{figures.parent.relative_to(root)}: top1 {d['top1']:.3f} ({low:.3f}-{high:.3f}) macro "
        f"{d['macro_recall']:.3f} ood_auroc {ood.get('auroc')} flagged_ood {ood.get('flagged_out_of_domain')} "
        f"flagged_in {ood.get('flagged_in_domain')} n={d['n_images']}"
    )
