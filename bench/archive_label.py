"""Archive-label speed: header records/s through Taxonomy.archive_label (four fields each), and the time to load
and validate a built-in taxonomy. A PACS listing of 100,000 instances is labelled from headers in these terms.

    .venv/bin/python bench/archive_label.py [--taxonomy unifesp22] [--records 20000]
"""

import argparse
import csv
import time
from pathlib import Path

from radregion.taxonomy import Taxonomy, load_taxonomy

HEADERS = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "archive_headers.csv"  # the tests' strings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--taxonomy", default="unifesp22")
    parser.add_argument("--records", type=int, default=20000)
    args = parser.parse_args()

    taxonomy = load_taxonomy(args.taxonomy)
    definition = taxonomy.to_dict()
    start = time.perf_counter()
    for _ in range(20):
        Taxonomy.from_dict(definition)
    print(f"load + validate {taxonomy.name}: {(time.perf_counter() - start) / 20 * 1000:.1f} ms")

    with open(HEADERS, newline="", encoding="utf-8") as handle:
        texts = [row["text"] for row in csv.DictReader(handle)]
    records = [
        {
            "BodyPartExamined": texts[i % len(texts)],
            "StudyDescription": texts[(i * 7) % len(texts)],
            "SeriesDescription": texts[(i * 13) % len(texts)],
            "ProtocolName": texts[(i * 29) % len(texts)],
        }
        for i in range(args.records)
    ]
    start = time.perf_counter()
    conflicts = sum(bool(taxonomy.archive_label(meta).conflicts) for meta in records)
    seconds = time.perf_counter() - start
    print(
        f"archive_label: {len(records) / seconds:,.0f} records/s (4 fields each, {len(records)} records, "
        f"{conflicts} with conflicts), one core"
    )


if __name__ == "__main__":
    main()
