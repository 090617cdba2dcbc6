"""`PUT /model/radregion` when the admin enables it (`--conf model_upload true`; off, the gate answers 403).

The upload (multipart field `file`) must be a safetensors file holding exactly the served model's tensors: the
same names, shapes and dtypes, every value finite. It is published with the served bundle's bundle.json
(taxonomy, cleaning, architecture) as the next generation, through the same checked publish as training
(`load_bundle` must accept it), so a rollback brings the previous model back. Anything else answers 422 and
nothing changes.
"""

import logging
import shutil

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse

from .errors import AppError

logger = logging.getLogger(__name__)
WEIGHTS = "model.safetensors"
META = "bundle.json"


class ModelUploadError(AppError):
    http_status = 422


def model_upload_app(app_instance, limit_bytes: int):
    """The ASGI app the gate hands `PUT /model/<name>` to."""
    context = app_instance.context

    async def app(scope, receive, send):
        request = Request(scope, receive)
        name = scope["path"].rstrip("/").split("/")[-1]
        if not app_instance.model_file(name, validate=False):
            return await JSONResponse({"detail": f"no model {name!r} on this server"}, 404)(scope, receive, send)
        try:
            async with request.form(max_part_size=limit_bytes) as form:
                upload = form.get("file")
                if upload is None or isinstance(upload, str):
                    raise ModelUploadError("send the weights as the multipart field `file` (model.safetensors)")
                data = await upload.read()
            record = await run_in_threadpool(publish_upload, context, data)
        except AppError as error:
            logger.warning(f"PUT {scope['path']}: {error.http_status} {error}")
            return await JSONResponse({"detail": str(error)}, error.http_status)(scope, receive, send)
        return await JSONResponse(
            {"model_version": record["version"], "generation": record["generation"], "replaced": record.get("replaced")}
        )(scope, receive, send)

    return app


def verify_weights(data: bytes, served: dict) -> dict:
    """The uploaded tensors, or ModelUploadError saying how they differ from the served ones."""
    import torch
    from safetensors.torch import load

    try:
        tensors = load(data)
    except Exception as error:  # safetensors raises its own types for garbage
        raise ModelUploadError(f"not a safetensors file ({str(error)[:200]})") from None
    missing, extra = sorted(set(served) - set(tensors)), sorted(set(tensors) - set(served))
    if missing or extra:
        raise ModelUploadError(
            f"the tensors differ from the served model's: missing {missing[:5]}, unexpected {extra[:5]}"
        )
    for name, tensor in tensors.items():
        want = served[name]
        if tuple(tensor.shape) != tuple(want.shape) or tensor.dtype != want.dtype:
            raise ModelUploadError(
                f"{name}: {tuple(tensor.shape)} {tensor.dtype}, the served model has {tuple(want.shape)} {want.dtype}"
            )
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ModelUploadError(f"{name}: values that are not finite")
    return tensors


def publish_upload(context, data: bytes) -> dict:
    from safetensors.torch import load_file

    from radregion.errors import RadiographError

    served_dir = context.models.current_folder()
    generation = context.models.record(served_dir).get("generation")
    verify_weights(data, load_file(str(served_dir / WEIGHTS)))
    staging = context.models.staging()
    try:
        shutil.copy(served_dir / META, staging / META)
        (staging / WEIGHTS).write_bytes(data)
        record = context.models.publish(staging, "uploaded over REST (PUT /model)", expect_generation=generation)
    except RadiographError as error:
        raise ModelUploadError(f"not a usable bundle with the served bundle.json ({error.problem})") from None
    except Exception as error:
        if type(error).__name__ == "PublishConflict":
            raise ModelUploadError(str(error)) from None
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # moved away when published
    context.predictor()  # load it now: the next request answers with it
    logger.info(f"model {record['version']} uploaded over REST: generation {record['generation']}")
    return record
