"""HTTP answers for the app's errors: bad input is a 4xx with a message, never a 500 with a traceback.

MONAI Label 0.8.5 registers no exception handlers, so an exception in a task or the datastore becomes a bare
500. `install_http_errors()` adds handlers to its FastAPI app once the server runs the app.
"""

import json
import logging

from fastapi.exceptions import HTTPException
from fastapi.responses import JSONResponse
from monailabel.interfaces.exception import ImageNotFoundException, LabelNotFoundException, MONAILabelException

from radregion.errors import RadiographError

logger = logging.getLogger(__name__)


class AppError(Exception):
    """An error of the app with its HTTP status."""

    http_status = 400


class TrainingError(AppError):
    """Training refused or failed; the published model is unchanged."""

    http_status = 422


class ConflictError(AppError):
    """The request would replace something that exists (an image under an id already taken)."""

    http_status = 409


def _malformed_json(request, exc: json.JSONDecodeError):
    logger.warning(f"{request.method} {request.url.path}: 400 malformed JSON ({exc})")
    return JSONResponse(status_code=400, content={"detail": f"malformed JSON in the request ({exc})"})


def _too_deep(request, exc: RecursionError):
    logger.warning(f"{request.method} {request.url.path}: 400 nested too deeply")
    return JSONResponse(status_code=400, content={"detail": "the request's JSON is nested too deeply"})


def _http_error(request, exc: HTTPException):
    """MONAI Label answers some bad requests with 500 (an infer without an image): they are the caller's."""
    status = exc.status_code
    if status == 500 and str(exc.detail).startswith("Neither Image"):
        status, exc.detail = 400, "no image given: POST /infer/radregion?image=ID"
    return JSONResponse(status_code=status, content={"detail": exc.detail}, headers=getattr(exc, "headers", None))


def _radiograph_error(request, exc: RadiographError):
    status = getattr(exc, "http_status", None) or (502 if type(exc).__name__ == "PACSError" else 422)
    body = {"detail": str(exc), "image": exc.path, "problem": exc.problem}
    if getattr(exc, "valid_regions", None):
        body["valid_regions"] = exc.valid_regions
    logger.warning(f"{request.method} {request.url.path}: {status} {exc}")
    return JSONResponse(status_code=status, content=body)


def _app_error(request, exc: AppError):
    logger.warning(f"{request.method} {request.url.path}: {exc.http_status} {exc}")
    return JSONResponse(status_code=exc.http_status, content={"detail": str(exc)})


def _monailabel_error(request, exc: MONAILabelException):
    status = 404 if isinstance(exc, (ImageNotFoundException, LabelNotFoundException)) else 400
    logger.warning(f"{request.method} {request.url.path}: {status} {exc.msg}")
    return JSONResponse(status_code=status, content={"detail": exc.msg, "error": exc.error.value})


def install_http_errors():
    from monailabel.app import app

    app.add_exception_handler(RadiographError, _radiograph_error)
    app.add_exception_handler(AppError, _app_error)
    app.add_exception_handler(MONAILabelException, _monailabel_error)
    app.add_exception_handler(json.JSONDecodeError, _malformed_json)
    app.add_exception_handler(RecursionError, _too_deep)
    app.add_exception_handler(HTTPException, _http_error)
    app.middleware_stack = None  # already built at startup: rebuild with the handlers on the next request
