"""REST client for the RadRegion MONAI Label server (standard library only).

Routes are MONAI Label 0.8.5's own (monailabel/endpoints/*.py); docs/architecture.md lists the answers.
"""

import json
import os
import re
import socket
import tempfile
import uuid
from typing import Optional
from urllib.error import HTTPError, URLError
from urllib.parse import quote, unquote, urlencode, urlsplit
from urllib.request import Request, urlopen

MODEL = "radregion"
FINAL = "final"


class ServerError(Exception):
    """Anything that went wrong talking to the server; the message says what in words."""


class ServerUnreachable(ServerError):
    """No answer from the server: it is down, the URL is wrong, or the network is."""


class RequestRejected(ServerError):
    """The server answered with an error status; .status and .detail carry it."""

    def __init__(self, message: str, status: int, detail):
        super().__init__(message)
        self.status = status
        self.detail = detail


TOKEN_ENV = "RADREGION_API_TOKEN"


class RadRegionClient:
    """One server: `RadRegionClient("http://127.0.0.1:8000", token=None)`; no token: $RADREGION_API_TOKEN."""

    def __init__(self, url: str, token: Optional[str] = None, timeout: float = 30.0):
        url = (url or "").strip()
        if not url:
            raise ValueError("no server URL given (for example http://127.0.0.1:8000)")
        if "://" not in url:
            url = "http://" + url
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"not a server URL: {url!r} (expected http://host:port)")
        self.url = url.rstrip("/")
        self.token = token or os.environ.get(TOKEN_ENV) or None  # the server's API token (writes need it)
        self.timeout = timeout

    # -- the routes -------------------------------------------------------------------------------------------

    def info(self) -> dict:
        return self._json("GET", "/info/")

    def next_case(self, queue: str) -> Optional[str]:
        """Image id of the next case in an active-learning queue, or None when the queue is empty."""
        return self.next_sample(queue).get("id") or None

    def next_sample(self, queue: str) -> dict:
        """The queue's whole answer: `id`, and e.g. `provisional` (true while the server is still scoring)."""
        answer = self._json("POST", f"/activelearning/{quote(queue)}", body=b"{}", content_type="application/json")
        return answer if isinstance(answer, dict) else {}

    def infer(self, image: str, model: str = MODEL) -> dict:
        body, content_type = encode_multipart({"params": "{}"})
        # the first inference loads the model: allow it more time than a plain request
        return self._json(
            "POST",
            f"/infer/{quote(model)}",
            {"image": image, "output": "json"},
            body=body,
            content_type=content_type,
            timeout=max(self.timeout, 120.0),
        )

    def download_image(self, image: str, dest_dir: str) -> str:
        """Save the image file into dest_dir (atomically) and return its path."""
        headers, data = self._request("GET", "/datastore/image", {"image": image})
        name = _attachment_name(headers.get("Content-Disposition")) or image
        os.makedirs(dest_dir, exist_ok=True)
        name = _safe_name(name)
        if data[128:132] == b"DICM" and not name.lower().endswith((".dcm", ".dicom")):
            name += ".dcm"  # extension-less DICOM: Slicer picks its reader by the extension
        path = os.path.join(dest_dir, name)
        atomic_write(path, data)
        return path

    def submit_label(
        self,
        image: str,
        region: Optional[str],
        out_of_domain: bool = False,
        annotator: str = "",
        comment: str = "",
        tag: str = FINAL,
        extra: Optional[dict] = None,
    ) -> dict:
        """`extra`: more fields of the label JSON (an undo's `undo_of`, `undone_by`, `saved_at`)."""
        label = {"region": region, "out_of_domain": bool(out_of_domain), "annotator": annotator, "comment": comment}
        label.update({k: v for k, v in (extra or {}).items() if v not in (None, "")})
        body, content_type = encode_multipart(
            {"params": json.dumps(label)},
            files={"label": ("label.json", json.dumps(label).encode("utf-8"), "application/json")},
        )
        return self._json("PUT", "/datastore/label", {"image": image, "tag": tag}, body=body, content_type=content_type)

    def get_label(self, image: str, tag: str = FINAL) -> Optional[dict]:
        """The label JSON saved for an image, or None when it has none."""
        try:
            return self._json("GET", "/datastore/label", {"label": image, "tag": tag})
        except RequestRejected as error:
            if error.status == 404:
                return None
            raise

    def delete_label(self, image: str, tag: str = FINAL, undo_of: str = "", undone_by: str = "") -> None:
        """`undo_of` (the decision taken back) and `undone_by`: an undo of the image's first label, so the server's
        decision log records it as an undo and who undid it."""
        query = {"id": image, "tag": tag}
        query.update({k: v for k, v in (("undo_of", undo_of), ("undone_by", undone_by)) if v})
        self._json("DELETE", "/datastore/label", query)

    def stats(self) -> dict:
        """Datastore counts: {"total", "completed", "label_tags": {tag: n}}."""
        return self._json("GET", "/datastore/", {"output": "stats"})

    def train(self, model: str = MODEL) -> dict:
        return self._json("POST", f"/train/{quote(model)}", body=b"{}", content_type="application/json")

    def rollback(self, model: str = MODEL) -> dict:
        """Serve again the model the current one replaced (the server keeps every published generation)."""
        return self._json("POST", f"/model/{quote(model)}/rollback", body=b"{}", content_type="application/json")

    def train_status(self) -> Optional[dict]:
        """The latest training task, or None when there has been none."""
        try:
            return self._json("GET", "/train/")
        except RequestRejected as error:
            if error.status == 404:
                return None
            raise

    # -- plumbing ---------------------------------------------------------------------------------------------

    def _json(self, method, path, query=None, body=None, content_type=None, timeout=None):
        _, data = self._request(method, path, query, body, content_type, timeout)
        if not data:
            return None
        try:
            return json.loads(data.decode("utf-8"))
        except ValueError:
            raise ServerError(
                f"{method} {path}: the server at {self.url} did not answer JSON (is this a RadRegion server?)"
            ) from None

    def _request(self, method, path, query=None, body=None, content_type=None, timeout=None):
        """(headers, body bytes); every failure becomes a ServerError that says what happened."""
        url = self.url + path + ("?" + urlencode(query) if query else "")
        request = Request(url, data=body, method=method)
        request.add_header("Accept", "application/json")
        if content_type:
            request.add_header("Content-Type", content_type)
        if self.token:
            request.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urlopen(request, timeout=timeout or self.timeout) as response:
                return response.headers, response.read()
        except HTTPError as error:
            detail = _error_detail(error)
            raise RequestRejected(_rejection_text(method, path, error.code, detail), error.code, detail) from None
        except (URLError, ConnectionError, socket.timeout, OSError) as error:
            reason = getattr(error, "reason", error)
            if isinstance(reason, (socket.timeout, TimeoutError)):
                raise ServerUnreachable(
                    f"no answer from the RadRegion server at {self.url} within "
                    f"{timeout or self.timeout:.0f} s ({method} {path})"
                ) from None
            raise ServerUnreachable(f"cannot reach the RadRegion server at {self.url} ({reason})") from None


def encode_multipart(fields: dict, files: Optional[dict] = None):
    """multipart/form-data body: fields {name: text}, files {name: (filename, bytes, content type)}."""
    boundary = uuid.uuid4().hex
    lines = []
    for name, value in fields.items():
        lines += [
            f"--{boundary}".encode(),
            f'Content-Disposition: form-data; name="{name}"'.encode(),
            b"",
            str(value).encode("utf-8"),
        ]
    for name, (filename, data, content_type) in (files or {}).items():
        lines += [
            f"--{boundary}".encode(),
            f'Content-Disposition: form-data; name="{name}"; filename="{filename}"'.encode(),
            f"Content-Type: {content_type}".encode(),
            b"",
            data,
        ]
    lines += [f"--{boundary}--".encode(), b""]
    return b"\r\n".join(lines), f"multipart/form-data; boundary={boundary}"


def atomic_write(path: str, data: bytes) -> None:
    """Write to a temp file in the same folder, then rename: readers never see half a file."""
    folder = os.path.dirname(os.path.abspath(path))
    handle, temp = tempfile.mkstemp(dir=folder, prefix=".tmp-")
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp, path)
    except BaseException:
        if os.path.exists(temp):
            os.remove(temp)
        raise


def _error_detail(error: HTTPError):
    try:
        body = error.read().decode("utf-8", "replace")
    except OSError:
        return error.reason
    try:
        return json.loads(body).get("detail", body)
    except (ValueError, AttributeError):
        return body.strip() or error.reason


def _rejection_text(method, path, status, detail) -> str:
    if isinstance(detail, list):  # FastAPI validation errors
        detail = "; ".join(
            f"{'.'.join(str(p) for p in d.get('loc', ()))}: {d.get('msg', '')}" if isinstance(d, dict) else str(d)
            for d in detail
        )
    what = {
        401: "not authorised (check the token)",
        403: "forbidden for this user (check the token)",
        404: "not found",
        422: "refused",
        429: "busy",
    }.get(status, "failed")
    return f"{method} {path} {what} (HTTP {status}): {detail}"


def _attachment_name(disposition: Optional[str]) -> Optional[str]:
    if not disposition:
        return None
    match = re.search(r"filename\*=(?:UTF-8'')?([^;]+)", disposition) or re.search(
        r'filename="?([^";]+)"?', disposition
    )
    return unquote(match.group(1).strip()) if match else None


def _safe_name(name: str) -> str:
    name = os.path.basename(name.replace("\\", "/"))
    return re.sub(r"[^A-Za-z0-9._-]", "_", name) or "image"
