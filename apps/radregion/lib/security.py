"""The gate in front of MONAI Label's routes: who may call what, how big a body may be, which routes are off.

- Token: every request that is not a read (anything but GET/HEAD/OPTIONS), the model weights, the logs and the
  dataset export need `Authorization: Bearer <API token>`; when the server listens on anything but loopback,
  every request does.
- CORS: only the configured origins (`--conf cors_origins`), none by default; no credentials.
- Off: sessions (their uploads unpack archives), the DICOM proxy, the OHIF viewer, whole-slide inference,
  `DELETE /model`, and `PUT /model` unless the admin enables model upload (then verified before it is served).
- Bodies: image uploads up to `max_upload_mb`, labels up to `max_label_kb`, anything else 1 MiB (413 above);
  small forms are checked before MONAI Label parses them (`params`/`info` must be JSON objects; inference
  takes an image id, not an uploaded file or a session).
- `GET /datastore/dataset` is served from a temporary zip that is deleted once sent.
- `GET /datastore/?output=train` names the files relative to the studies folder (MONAI Label answers their paths);
  image info and next-image answers do too (the datastores' `get_image_info`).
"""

import hmac
import ipaddress
import json
import logging
import os
import sys
from urllib.parse import parse_qs

from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse

logger = logging.getLogger(__name__)
READ_METHODS = ("GET", "HEAD", "OPTIONS")
FORM_LIMIT = 1 << 20  # bodies of routes that take no file: forms with a few JSON fields
FORM_TYPES = (b"multipart/form-data", b"application/x-www-form-urlencoded")
JSON_FORM_FIELDS = ("params", "info")


class _TooLarge(Exception):
    pass


def bound_host(argv=None) -> str:
    """The address uvicorn listens on: `--host`/`-i` of `monailabel start_server` (MONAI Label's default
    is 0.0.0.0)."""
    argv = list(sys.argv if argv is None else argv)
    for i, arg in enumerate(argv):
        if arg in ("--host", "-i") and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--host="):
            return arg.split("=", 1)[1]
    return "0.0.0.0"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class RequestGate:
    """Pure ASGI middleware (no body buffering except small forms)."""

    def __init__(
        self, app, token: str, loopback: bool, config, dataset_archive=None, model_upload=None, training_list=None
    ):
        self.app = app
        self.token = token.encode()
        self.loopback = loopback
        self.config = config
        self.dataset_archive = dataset_archive  # callable(limit_cases) -> zip path
        self.model_upload = model_upload  # async callable(request) -> response, or None
        self.training_list = training_list  # callable() -> the training items, named relative to the studies

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        method, path = scope["method"].upper(), scope["path"].rstrip("/") or "/"
        if self._needs_token(method, path) and not self._has_token(scope):
            response = JSONResponse(
                {
                    "detail": "missing or wrong API token: send `Authorization: Bearer <token>` "
                    "(the server's RADREGION_API_TOKEN or its api_token file)"
                },
                status_code=401,
                headers={"WWW-Authenticate": "Bearer"},
            )
            return await response(scope, receive, send)
        refusal = self._refusal(method, path, scope)
        if refusal:
            return await JSONResponse({"detail": refusal[1]}, status_code=refusal[0])(scope, receive, send)
        if method == "GET" and path == "/datastore/dataset" and self.dataset_archive:
            return await self._dataset(scope, receive, send)
        if method == "GET" and path == "/datastore" and self.training_list and _query(scope).get("output") == ["train"]:
            return await JSONResponse(await run_in_threadpool(self.training_list))(scope, receive, send)
        limit = self._body_limit(method, path)
        length = _content_length(scope)
        if length is not None and length > limit:
            return await _too_large(limit)(scope, receive, send)
        if method == "PUT" and path.startswith("/model/") and self.model_upload:
            return await self._guarded(self.model_upload, scope, receive, send, limit)
        if method not in READ_METHODS and _is_form(scope) and length is not None and length <= FORM_LIMIT:
            body = await _read_body(receive, limit)
            problem = await _form_problem(scope, body, path)
            if problem:
                return await JSONResponse({"detail": problem}, status_code=400)(scope, receive, send)
            return await self.app(scope, _replay(body), send)
        return await self._guarded(self.app, scope, receive, send, limit)

    # ---- rules ------------------------------------------------------------------------------------------
    def _needs_token(self, method: str, path: str) -> bool:
        if not self.loopback or method not in READ_METHODS:
            return True
        parts = path.split("/")
        if len(parts) == 3 and parts[1] == "model":
            return True  # GET /model/<name>: the weights
        return path in ("/logs", "/logs/gpu", "/datastore/dataset")

    def _has_token(self, scope) -> bool:
        for name, value in scope.get("headers", []):
            if name == b"authorization":
                scheme, _, given = value.partition(b" ")
                return scheme.lower() == b"bearer" and hmac.compare_digest(given.strip(), self.token)
        return False

    def _refusal(self, method: str, path: str, scope):
        if path == "/session" or path.startswith("/session/"):
            return 403, "sessions are off in RadRegion: add images with PUT /datastore/image, infer them by id"
        if path.startswith("/proxy/"):
            return 403, "the DICOM proxy is off in RadRegion"
        if path == "/ohif" or path.startswith("/ohif/"):
            return 404, "the OHIF viewer is not part of RadRegion"
        if path.startswith(("/infer/wsi/", "/infer/wsi_v2/")):
            return 404, "whole-slide inference is not part of RadRegion"
        if path.startswith("/model/") and method == "DELETE":
            return 403, "deleting the model over REST is off (the published model lives in the state folder)"
        if path.startswith("/model/") and method == "PUT" and not self.model_upload:
            return 403, "model upload over REST is off (the admin enables it with --conf model_upload true)"
        if path.startswith("/infer/") and method == "POST":
            if _query(scope).get("session_id"):
                return 400, "sessions are off in RadRegion: infer an image of the datastore by id (?image=ID)"
        return None

    def _body_limit(self, method: str, path: str) -> int:
        if method == "PUT" and path in ("/datastore/image", "/datastore"):
            return self.config.max_upload_mb << 20
        if method == "PUT" and path.startswith("/model/"):
            return self.config.max_upload_mb << 20
        if method == "PUT" and path == "/datastore/label":
            return self.config.max_label_kb << 10
        return FORM_LIMIT

    # ---- handlers ---------------------------------------------------------------------------------------
    async def _guarded(self, app, scope, receive, send, limit):
        """Run `app` with the body counted: a streamed body over `limit` is answered 413."""
        received = 0
        started = replaced = False

        async def counted():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise _TooLarge()
            return message

        async def tracked(message):
            nonlocal started, replaced
            if message["type"] == "http.response.start" and received > limit and not started:
                replaced = True  # the body parser turned our 413 into its own error answer: say what happened
                await _too_large(limit)(scope, receive, send)
            if replaced:
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await app(scope, counted, tracked)
        except _TooLarge:
            if not started:
                await _too_large(limit)(scope, receive, send)
        except Exception as error:  # a parser wrapped our exception: still the body's size
            if received > limit and not started:
                await _too_large(limit)(scope, receive, send)
            else:
                raise error

    async def _dataset(self, scope, receive, send):
        query = _query(scope)
        try:
            limit = int(query.get("limit_cases", ["0"])[0]) or None
        except ValueError:
            return await JSONResponse({"detail": "limit_cases must be a number"}, 400)(scope, receive, send)
        try:
            path = await run_in_threadpool(self.dataset_archive, limit)
        except AssertionError:  # MONAI Label's "nothing to include"
            return await JSONResponse({"detail": "no labelled images to export"}, 404)(scope, receive, send)
        response = FileResponse(
            path, media_type="application/zip", filename="dataset.zip", background=BackgroundTask(_remove, path)
        )
        try:
            await response(scope, receive, send)
        finally:
            _remove(path)


def _remove(path):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _too_large(limit: int) -> JSONResponse:
    size = f"{limit >> 20} MiB" if limit >= 1 << 20 else f"{limit >> 10} KiB"
    return JSONResponse({"detail": f"request body too large: the limit for this call is {size}"}, status_code=413)


def _query(scope) -> dict:
    return parse_qs(scope.get("query_string", b"").decode("latin-1"))


def _content_length(scope):
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def _is_form(scope) -> bool:
    for name, value in scope.get("headers", []):
        if name == b"content-type":
            return value.split(b";")[0].strip().lower() in FORM_TYPES
    return False


async def _read_body(receive, limit) -> bytes:
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunks.append(message.get("body", b""))
        size += len(chunks[-1])
        if size > limit or not message.get("more_body", False):
            break
    return b"".join(chunks)


def _replay(body: bytes):
    sent = False

    async def receive():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return {"type": "http.disconnect"}

    return receive


async def _form_problem(scope, body: bytes, path: str):
    """What is wrong with a small form, in words; None when MONAI Label can have it."""
    request = Request(scope, _replay(body))
    try:
        form = await request.form()
    except Exception as error:
        return f"malformed form body ({error})"
    try:
        for field in JSON_FORM_FIELDS:
            raw = form.get(field)
            if raw is None or not isinstance(raw, str) or not raw.strip():
                continue
            try:
                value = json.loads(raw)
            except (ValueError, RecursionError) as error:
                return f"`{field}` is not valid JSON ({str(error)[:120]})"
            if not isinstance(value, dict):
                return f'`{field}` must be a JSON object like {{"key": "value"}}, got {type(value).__name__}'
            if path.startswith("/infer/") and "image" in value and not isinstance(value["image"], str):
                return "`params.image` must be an image id (text)"
        if path.startswith("/infer/") and any(form.get(f) is not None for f in ("file", "label")):
            return (
                "inference takes an image of the datastore by id (?image=ID): add the file first with "
                "PUT /datastore/image"
            )
    finally:
        await form.close()
    return None


def install_security(app_instance, token: str, config, dataset_archive=None, training_list=None):
    """Put the CORS rule and the gate in front of MONAI Label's FastAPI app (replacing its allow-all CORS)."""
    from monailabel.app import app

    from .model_upload import model_upload_app

    model_upload = model_upload_app(app_instance, config.max_upload_mb << 20) if config.model_upload else None
    host = bound_host()
    loopback = is_loopback(host)
    app.user_middleware = [m for m in app.user_middleware if m.cls not in (CORSMiddleware, RequestGate)]
    app.user_middleware.insert(
        0,
        Middleware(
            RequestGate,
            token=token,
            loopback=loopback,
            config=config,
            dataset_archive=dataset_archive,
            model_upload=model_upload,
            training_list=training_list,
        ),
    )
    app.user_middleware.insert(
        0,
        Middleware(
            CORSMiddleware,
            allow_origins=config.origins,
            allow_credentials=False,
            allow_methods=["GET", "HEAD", "POST", "PUT", "DELETE"],
            allow_headers=["Authorization", "Content-Type"],
        ),
    )
    app.middleware_stack = None  # rebuilt on the next request
    logger.info(
        f"listening on {host}: API token required for "
        f"{'every request' if not loopback else 'writes, the model weights, logs and dataset export'}; "
        f"CORS origins: {', '.join(config.origins) or 'none'}; "
        f"model upload: {'on (verified)' if model_upload else 'off'}"
    )
