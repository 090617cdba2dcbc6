"""RadRegion's Slicer-free half: REST client, review state, parsing of server answers.

Standard library only, Python 3.9+: it runs in Slicer's Python and in plain Python alike.
"""

from .client import RadRegionClient, RequestRejected, ServerError, ServerUnreachable
from .results import CaseResult, ServerSummary, parse_infer, parse_summary, train_status_text
from .review import Decision, Outbox, QUEUES, ReviewSession, server_work_dir

__all__ = [
    "RadRegionClient",
    "ServerError",
    "ServerUnreachable",
    "RequestRejected",
    "CaseResult",
    "ServerSummary",
    "parse_infer",
    "parse_summary",
    "train_status_text",
    "Decision",
    "Outbox",
    "QUEUES",
    "ReviewSession",
    "server_work_dir",
]
