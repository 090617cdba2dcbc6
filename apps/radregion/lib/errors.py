"""HTTP answers for the app's errors: bad input is a 4xx with a message, never a 500 with a traceback.

MONAI Label 0.8.5 registers no exception handlers, so an exception in a task or the datastore becomes a bare
500. `install_http_errors()` adds handlers to its FastAPI app once the server runs the app.
"""

import logging

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
    app.middleware_stack = None  # already built at startup: rebuild with the handlers on the next request
