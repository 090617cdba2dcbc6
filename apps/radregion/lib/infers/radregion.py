"""Infer task `radregion`: one radiograph -> region, probabilities, out-of-domain score and archive agreement."""

import logging
import time

from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType

from radregion.errors import RadiographError

from .. import faults

logger = logging.getLogger(__name__)


class RadRegionInfer(InferTask):
    def __init__(self, context):
        self.context = context
        predictor = context.predictor()
        super().__init__(
            type=InferType.CLASSIFICATION,
            labels=list(predictor.regions),
            dimension=2,
            description="Anatomical region of a radiograph (frozen backbone + linear head, out-of-domain score)",
        )

    def info(self):
        predictor = self.context.predictor()
        self.labels = list(predictor.regions)
        scores = self.context.scores.load(predictor.version)
        return {
            **super().info(),
            "model_version": predictor.version,
            "scores": {
                "model_version": predictor.version if scores else None,
                "images": len(scores) if scores else 0,
                "unreadable": len(scores.errors) if scores else 0,
            },
        }

    def is_valid(self) -> bool:
        return True

    def get_path(self, validate=True):
        return str(self.context.model_dir / "model.safetensors")

    def __call__(self, request):
        start = time.time()
        path = request.get("image")
        image_id = request.get("_image_id") or path
        if not path or not isinstance(path, str):
            raise RadiographError(image_id or "(no image)", "image not found in the datastore")
        predictor = self.context.predictor()
        faults.hold(request)
        prediction = next(iter(predictor.predict([path], batch_size=1)))
        if prediction.error:
            problem = prediction.error
            prefix = f"{path}: "
            problem = problem[len(prefix) :] if problem.startswith(prefix) else problem
            raise RadiographError(image_id, problem)
        result = to_result(prediction, predictor, latency=time.time() - start)
        result["header"] = header_context(path)
        return None, result


HEADER_CONTEXT = (
    "BodyPartExamined",
    "StudyDescription",
    "SeriesDescription",
    "ProtocolName",
    "StudyDate",
    "SeriesDate",
    "Modality",
    "ViewPosition",
    "ImageLaterality",
)


def header_context(path) -> dict:
    """What an annotator reads in the header before deciding (DICOM only; {} for other files or a bad header)."""
    from radregion.dicomread import read_header
    from radregion.io import is_dicom

    try:
        if not is_dicom(path):
            return {}
        ds = read_header(path)
    except (RadiographError, OSError):
        return {}
    return {k: str(ds.get(k)).strip() for k in HEADER_CONTEXT if ds.get(k) not in (None, "")}


def to_result(prediction, predictor, latency=None) -> dict:
    ranked = sorted(prediction.probabilities.items(), key=lambda kv: kv[1], reverse=True)
    index = {region: i for i, region in enumerate(predictor.regions)}
    result = {
        "prediction": [{"idx": index[r], "label": r, "score": round(float(s), 6)} for r, s in ranked],
        "region": prediction.region,
        "confidence": float(prediction.confidence),
        "ood_score": float(prediction.ood_score),
        "out_of_domain": bool(prediction.out_of_domain),
        "pacs_label": prediction.pacs_label,
        "agrees_with_pacs": prediction.agrees_with_pacs,
        "pacs_labels": list(prediction.pacs_labels),
        "model_version": predictor.version,
    }
    if latency is not None:
        result["latencies"] = {"total": round(latency, 4)}
    return result
