"""Batch run `POST /batch/infer/radregion`: score the whole datastore, write the audit CSV of `radregion audit`.

Given label = the confirmed label when there is one, else the archive (PACS) label. The issue score and flag come
from the engine's audit (radregion.audit.issues); images without a given label get a suggestion only.
"""

import logging
import time
from pathlib import Path

import numpy as np
from monailabel.interfaces.tasks.batch_infer import BatchInferTask

from radregion.audit.issues import find_label_issues, issue_scores
from radregion.audit.writer import write_audit_csv

from ..context import read_label
from ..names import BadNameError, inside, is_plain_name, show

logger = logging.getLogger(__name__)


class AuditBatchInfer(BatchInferTask):
    def __init__(self, context):
        self.context = context

    def __call__(self, request, datastore, infer=None):
        start = time.time()
        path = self.output_path(request.get("output"))
        image_ids = sorted(self.get_images(request, datastore))
        table = self.context.refresh_scores(datastore, image_ids)
        rows = audit_rows(table, image_ids, datastore)
        write_audit_csv(rows, path)
        flagged = sum(1 for r in rows if r["is_issue"])
        result = {
            "csv": str(path),
            "images": len(rows),
            "issues": flagged,
            "out_of_domain": sum(1 for r in rows if r["out_of_domain"]),
            "unreadable": sum(1 for i in image_ids if i in table.errors),
            "model_version": table.version,
            "seconds": round(time.time() - start, 2),
        }
        logger.info(f"batch audit: {result}")
        return result

    def output_path(self, requested) -> Path:
        """The admin's `audit_csv` (or <state_dir>/audit.csv); a request may only name a file in the state folder."""
        if not requested:
            return Path(self.context.config.audit_csv or self.context.state_dir / "audit.csv")
        path = self.context.state_dir / str(requested)
        if (
            not is_plain_name(requested)
            or not str(requested).endswith(".csv")
            or not inside(self.context.state_dir, path)
        ):
            raise BadNameError(f"output {show(requested)}: a .csv file name in the server's state folder")
        return path


def audit_rows(table, image_ids, datastore) -> list:
    ids = [i for i in image_ids if table.index(i) is not None]
    rows = [table.index(i) for i in ids]
    probs = table.probabilities[rows] if rows else np.zeros((0, len(table.regions)), np.float32)
    given, confirmed_ood = [], []
    for image_id, k in zip(ids, rows):
        label = read_label(datastore, image_id)
        given.append(label.get("region") if label else table.pacs_label[k])
        confirmed_ood.append(bool(label and label.get("out_of_domain")))  # an annotator's out-of-domain finding
    index = {r: n for n, r in enumerate(table.regions)}
    y = np.array([index.get(g, -1) for g in given], dtype=np.int64)
    ood = (table.out_of_domain[rows] if rows else np.zeros(0, bool)) | np.array(confirmed_ood, bool)
    scores = issue_scores(y, probs) if len(ids) else np.zeros(0)
    flags = find_label_issues(y, probs, out_of_domain=ood) if len(ids) else np.zeros(0, bool)
    predicted = table.predicted()
    out = []
    for n, (image_id, k) in enumerate(zip(ids, rows)):
        out.append(
            {
                "image": image_id,
                "given_label": given[n],
                "suggested_label": predicted[k],
                "issue_score": float(scores[n]),
                "is_issue": bool(flags[n]),
                "ood_score": float(table.ood_score[k]),
                "out_of_domain": bool(ood[n]),
            }
        )
    for image_id in image_ids:
        if image_id in table.errors:
            out.append(
                {
                    "image": image_id,
                    "given_label": None,
                    "suggested_label": None,
                    "issue_score": None,
                    "is_issue": False,
                    "ood_score": None,
                    "out_of_domain": None,
                }
            )
    return out
