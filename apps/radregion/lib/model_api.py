"""REST for the published models (published.py): what was published, and a way back.

    POST /model/radregion/rollback   serve again the model the current one replaced (a write: needs the API token)
    GET  /model/radregion/history    the generations on disk, newest first, and the current one

A rollback is itself a publish (the next generation), so a training that started before it cannot undo it, and a
second rollback goes one model further back. The scores of the restored model are refreshed in the background.
"""

import logging

from .errors import AppError
from .published import NothingToRollBack

logger = logging.getLogger(__name__)


class RollbackError(AppError):
    http_status = 409


class UnknownModel(AppError):
    http_status = 404


def install_model_routes(app_instance, model_name: str):
    from monailabel.app import app

    def check(model: str):
        if model != model_name:
            raise UnknownModel(f"no model {model!r} (this server has {model_name!r})")

    def rollback(model: str):
        check(model)
        try:
            record = app_instance.context.rollback()
        except NothingToRollBack as error:
            raise RollbackError(str(error)) from None
        logger.info(
            f"rollback: serving {record['version']} again (generation {record['generation']}, "
            f"was {record.get('rolled_back_from')})"
        )
        app_instance.async_scoring(None)
        return {
            "model_version": record["version"],
            "generation": record["generation"],
            "rolled_back_from": record.get("rolled_back_from"),
            "restores": record.get("restores"),
            "published_at": record.get("published_at"),
        }

    def history(model: str):
        check(model)
        models = app_instance.context.models
        return {"current": models.current(), "generations": models.history()}

    paths = {getattr(r, "path", None) for r in app.router.routes}
    if "/model/{model}/rollback" not in paths:
        app.add_api_route(
            "/model/{model}/rollback",
            rollback,
            methods=["POST"],
            summary="Serve again the model the current one replaced",
        )
        app.add_api_route(
            "/model/{model}/history",
            history,
            methods=["GET"],
            summary="Published generations of the model, newest first",
        )
