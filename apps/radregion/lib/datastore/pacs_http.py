"""HTTP to a PACS: a session with auth, timeouts and bounded retries, and errors that say what happened."""

import pydicom.errors
import requests
import urllib3
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from radregion.errors import RadiographError


class PACSError(RadiographError):
    """The PACS could not be reached or refused a request: `path` is the URL, `problem` what happened."""

    def __init__(self, url, problem, http_status=502):
        super().__init__(url, problem)
        self.http_status = http_status  # what the server answers: 502 upstream trouble, 404 no such instance


class _TimeoutAdapter(HTTPAdapter):
    def __init__(self, timeout, **kwargs):
        self.timeout = timeout
        super().__init__(**kwargs)

    def send(self, request, **kwargs):
        if kwargs.get("timeout") is None:
            kwargs["timeout"] = self.timeout
        return super().send(request, **kwargs)


def pacs_session(username=None, password=None, token=None, timeout=(3.05, 30.0), retries=2, backoff=0.5):
    """requests.Session with auth, a default timeout and bounded retries with exponential backoff."""
    session = requests.Session()
    retry = Retry(
        total=retries,
        connect=retries,
        read=retries,
        status=retries,
        backoff_factor=backoff,
        status_forcelist=(429, 502, 503, 504),
        allowed_methods=None,
        raise_on_status=False,
    )
    adapter = _TimeoutAdapter(timeout, max_retries=retry)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    if token:
        session.headers["Authorization"] = f"Bearer {token}"
    elif username is not None:
        session.auth = (username, password or "")
    return session


HTTP_HINTS = {
    401: "check the username/password or token",
    403: "this user may not read or store here",
    404: "is the URL the DICOMweb root, e.g. http://pacs:8042/dicom-web?",
}


def describe(exc: Exception, attempts: int) -> str:
    if isinstance(exc, requests.HTTPError) and exc.response is not None:
        r = exc.response
        hint = HTTP_HINTS.get(r.status_code)
        return f"HTTP {r.status_code} {r.reason}" + (f" ({hint})" if hint else "")
    reason = getattr(exc.args[0], "reason", None) if exc.args else None  # urllib3's, after its retries
    refused = isinstance(reason, urllib3.exceptions.NewConnectionError)  # a ConnectTimeoutError subclass
    if not refused and (isinstance(exc, requests.Timeout) or isinstance(reason, urllib3.exceptions.TimeoutError)):
        return f"timed out ({attempts} attempts)"
    if isinstance(exc, requests.ConnectionError):
        return f"cannot connect after {attempts} attempts (is the PACS running and the URL right?)"
    if isinstance(exc, pydicom.errors.InvalidDicomError):
        return f"the answer is not a DICOM file ({exc})"
    return f"{type(exc).__name__}: {exc}"
