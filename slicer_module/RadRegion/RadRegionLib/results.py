"""Turn the server's answers into what the panel shows: top-5 bars, agreement with the archive, warnings."""

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

MODEL = "radregion"


@dataclass
class CaseResult:
    """What the model says about one image (from POST /infer/radregion?output=json)."""

    image: str
    region: Optional[str]
    confidence: float
    top: List[Tuple[str, float]]  # best first, at most 5
    scores: Dict[str, float] = field(default_factory=dict)  # every region the server scored
    ood_score: Optional[float] = None
    out_of_domain: bool = False
    pacs_label: Optional[str] = None
    agrees_with_pacs: Optional[bool] = None
    model_version: Optional[str] = None
    regions: List[str] = field(default_factory=list)  # every region the server scored, in the server's order
    pacs_labels: List[str] = field(default_factory=list)  # every region the archive names ("HAND WRIST": 2)
    header: Dict[str, str] = field(default_factory=dict)  # BodyPartExamined, descriptions, dates of the file

    @property
    def archive_text(self) -> str:
        """The archive's region(s): "Hand / Wrist" for a header that names two."""
        names = self.pacs_labels or ([self.pacs_label] if self.pacs_label else [])
        return " / ".join(names)

    @property
    def header_text(self) -> str:
        """The header an annotator reads before deciding, one item a line (empty for files without one)."""
        h = self.header
        lines = []
        if h.get("BodyPartExamined"):
            lines.append(f"Body part: {h['BodyPartExamined']}")
        for key, words in (("StudyDescription", "Study"), ("SeriesDescription", "Series")):
            if h.get(key):
                lines.append(f"{words}: {h[key]}")
        date = _date_text(h.get("StudyDate") or h.get("SeriesDate") or h.get("ContentDate"))
        view = " ".join(str(h[k]) for k in ("Modality", "ViewPosition", "ImageLaterality") if h.get(k))
        if date or view:
            lines.append(" · ".join(x for x in (date, view) if x))
        return "\n".join(lines)

    @property
    def prediction_text(self) -> str:
        if not self.region:
            return "No prediction"
        return f"{self.region} ({self.confidence:.0%})"

    @property
    def agreement_text(self) -> str:
        if not self.pacs_label:
            return "The archive has no region label for this image"
        if self.agrees_with_pacs is None:
            return f"Archive: {self.archive_text}"
        verdict = "agrees with the model" if self.agrees_with_pacs else "DISAGREES with the model"
        return f"Archive: {self.archive_text}, {verdict}"

    @property
    def ood_warning(self) -> str:
        """Empty when the image looks like a body region; otherwise a warning in words."""
        if not self.out_of_domain:
            return ""
        score = f" (score {self.ood_score:.2f})" if self.ood_score is not None else ""
        return f"Out of domain{score}: this image may show no body region (scan, fluoroscopy, test object)"


@dataclass
class ServerSummary:
    """What the panel shows after connecting."""

    url: str
    app_name: str = ""
    model_version: Optional[str] = None
    regions: List[str] = field(default_factory=list)
    queues: List[str] = field(default_factory=list)
    total: int = 0
    confirmed: int = 0

    @property
    def text(self) -> str:
        version = self.model_version or "unknown"
        return (
            f"Connected to {self.app_name or 'server'} at {self.url}: model {version}, "
            f"{len(self.regions)} regions, {self.confirmed} of {self.total} images confirmed"
        )


def parse_infer(answer: dict, image: str = "", top: int = 5) -> CaseResult:
    """Parse the infer answer; the prediction list may come in any order."""
    answer = answer or {}
    predictions = [p for p in answer.get("prediction") or [] if isinstance(p, dict)]
    ranked = sorted(((str(p.get("label")), float(p.get("score", 0.0))) for p in predictions), key=lambda item: -item[1])
    in_order = sorted(predictions, key=lambda p: p.get("idx", 0) if isinstance(p.get("idx"), int) else 0)
    pacs_label = answer.get("pacs_label") or None
    pacs_labels = [str(r) for r in answer.get("pacs_labels") or [] if r] or ([pacs_label] if pacs_label else [])
    region = answer.get("region") or (ranked[0][0] if ranked else None)
    confidence = answer.get("confidence")
    if confidence is None:
        confidence = dict(ranked).get(region, 0.0) if region else 0.0
    return CaseResult(
        image=image or str(answer.get("image", "")),
        region=region,
        confidence=float(confidence),
        top=ranked[:top],
        scores=dict(ranked),
        ood_score=_float_or_none(answer.get("ood_score")),
        out_of_domain=bool(answer.get("out_of_domain", False)),
        pacs_label=pacs_label,
        agrees_with_pacs=answer.get("agrees_with_pacs"),
        model_version=answer.get("model_version"),
        regions=[str(p.get("label")) for p in in_order],
        pacs_labels=pacs_labels,
        header={str(k): str(v) for k, v in (answer.get("header") or {}).items() if v not in (None, "")},
    )


def parse_summary(url: str, info: dict, stats: Optional[dict] = None, model: str = MODEL) -> ServerSummary:
    """Model version, regions, queues and counts from GET /info/ (and GET /datastore/?output=stats)."""
    info = info or {}
    model_info = (info.get("models") or {}).get(model) or {}
    labels = model_info.get("labels") or info.get("labels") or []
    if isinstance(labels, dict):  # MONAI Label also allows {name: index}
        labels = [name for name, _ in sorted(labels.items(), key=lambda item: item[1])]
    stats = stats or info.get("datastore") or {}
    return ServerSummary(
        url=url,
        app_name=str(info.get("name", "")),
        model_version=model_info.get("model_version"),
        regions=[str(name) for name in labels],
        queues=list((info.get("strategies") or {}).keys()),
        total=int(stats.get("total", 0)),
        confirmed=int(stats.get("completed", (stats.get("label_tags") or {}).get("final", 0))),
    )


def train_status_text(status: Optional[dict]) -> str:
    """One line about the latest training task (GET /train/)."""
    if not status:
        return "Not trained in this server session yet"
    state = str(status.get("status", "unknown")).upper()
    if state in ("SUBMITTED", "RUNNING"):
        return f"Training {state.lower()} since {status.get('start_ts', '?')}"
    if state == "DONE":
        return f"Last training finished at {status.get('end_ts', '?')}"
    details = [line for line in status.get("details") or [] if str(line).strip()]
    last = f": {str(details[-1]).strip()}" if details else ""
    return f"Last training {state.lower()} at {status.get('end_ts', '?')}{last}"


def _date_text(value) -> str:
    """DICOM DA (20261130) as 2026-11-30; anything else as it is."""
    text = str(value or "").strip()
    if len(text) == 8 and text.isdigit():
        return f"{text[:4]}-{text[4:6]}-{text[6:]}"
    return text


def _float_or_none(value):
    return None if value is None else float(value)
