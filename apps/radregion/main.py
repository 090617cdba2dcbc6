"""RadRegion MONAI Label app: predicts the anatomical region of every radiograph, ranks images for review,
stores confirmed labels and retrains the head from them.

    monailabel start_server --app apps/radregion --studies STUDIES [--conf model MODEL_BUNDLE] [--conf key value]

Without --conf model the server uses the bundle installed with the package (apps/radregion/model).

Options: apps/radregion/README.md. All model work goes through the engine (lib/radregion).
"""

import logging
import os
import sys
import threading

from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.exception import ImageNotFoundException

from lib.activelearning.disagreement import Disagreement
from lib.activelearning.diverse import Diverse
from lib.activelearning.ood import OutOfDomain
from lib.activelearning.random import RandomStrategy
from lib.activelearning.uncertain import Uncertain
from lib.api_token import load_api_token
from lib.config import SECRET_KEYS, AppConfig, ConfigError
from lib.context import ModelNotFoundError, RadRegionContext, read_json, write_json
from lib.errors import AppError, install_http_errors
from lib.infers.audit_batch import AuditBatchInfer
from lib.infers.radregion import RadRegionInfer
from lib.lifecycle import bind_to_server
from lib.logsafe import install_safe_logging, scrub_log_files
from lib.model_api import install_model_routes
from lib.names import is_plain_name, show
from lib.offload import install_offload
from lib.scoring.radregion_scores import RadRegionScores
from lib.security import install_security
from lib.trainers.radregion import RadRegionTrainer

logger = logging.getLogger(__name__)
MODEL = "radregion"


class RadRegionApp(MONAILabelApp):
    def __init__(self, app_dir, studies, conf):
        try:
            self.app_config = AppConfig.from_conf(conf)
        except ConfigError as error:
            scrub_log_files([conf.get(key) for key in SECRET_KEYS])  # MONAI Label logged the conf already
            refuse_start(error)
        if self.app_config.threads > 0:
            import torch

            torch.set_num_threads(self.app_config.threads)
        task_process = bind_to_server()  # a training/scoring child dies with the server
        try:
            self.context = RadRegionContext(self.app_config, studies, server=not task_process)
            self.api_token, token_source = load_api_token(self.context.state_dir)
            secrets = [self.api_token, self.app_config.pacs_secret("password"), self.app_config.pacs_secret("token")]
        except (ModelNotFoundError, ConfigError) as error:
            refuse_start(error)
        install_safe_logging(secrets)
        logger.info(f"API token: {token_source}")
        self._label_lock = threading.Lock()
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="RadRegion",
            description="Anatomical region of every radiograph in the archive",
            version="1.0",
        )

    def init_datastore(self):
        if self.studies.startswith(("http://", "https://")):
            return self._init_pacs_datastore()
        from lib.datastore.local import RadRegionDatastore

        return RadRegionDatastore(self.studies, taxonomy_fn=self.context.taxonomy)

    def _init_pacs_datastore(self):
        from lib.datastore.dicomweb import RadRegionDICOMwebDatastore

        conf = self.conf
        modalities = tuple(m for m in conf.get("modalities", "CR,DX").split(",") if m.strip())
        return RadRegionDICOMwebDatastore(
            self.studies.rstrip("/"),
            self.context.state_dir / "pacs",
            modalities=modalities,
            username=conf.get("username") or os.environ.get("MONAI_LABEL_DATASTORE_USERNAME") or None,
            password=self.app_config.pacs_secret("password"),
            token=self.app_config.pacs_secret("token"),
            writeback=conf.get("writeback", "off"),
            taxonomy=self.context.taxonomy,
            model_answer=self._model_answer,
        )

    def _model_answer(self, image_id):
        """The published model's scored answer for an image (for the PACS decision log); None when not scored."""
        table = self.context.current_scores()
        k = table.index(image_id) if table is not None else None
        if k is None:
            return None
        probabilities = table.probabilities[k]
        return {
            "region": table.regions[int(probabilities.argmax())],
            "confidence": round(float(probabilities.max()), 4),
            "out_of_domain": bool(table.out_of_domain[k]),
            "ood_score": round(float(table.ood_score[k]), 4),
            "model_version": table.version,
        }

    def init_infers(self):
        return {MODEL: RadRegionInfer(self.context)}

    def init_trainers(self):
        return {MODEL: RadRegionTrainer(self.context)}

    def init_strategies(self):
        return {
            "uncertain": Uncertain(self.context),
            "disagreement": Disagreement(self.context),
            "ood": OutOfDomain(self.context),
            "diverse": Diverse(self.context),
            "random": RandomStrategy(self.context),
        }

    def init_scoring_methods(self):
        return {"radregion_scores": RadRegionScores(self.context)}

    def init_batch_infer(self):
        return AuditBatchInfer(self.context)

    def server_mode(self, mode: bool):
        super().server_mode(mode)
        if mode:
            install_http_errors()
            from lib.writeback import install_export_route, install_label_delete_route

            install_export_route(self, getattr(self, "api_token", None))  # the PACS decision log, for the admin
            install_label_delete_route(self)  # a removal that undoes a first label says so, and who undid it
            install_security(
                self,
                self.api_token,
                self.app_config,
                dataset_archive=lambda limit: self.datastore().get_dataset_archive(limit),
                training_list=lambda: self.datastore().datalist(full_path=False),
            )
            install_model_routes(self, MODEL)
            install_offload()  # last: the outermost middleware, every request on a worker thread

    def info(self):
        """MONAI Label adds info()["config"]["train"] to every training request: the generation of the model served
        now, so a run publishes only if no newer model (another run, a rollback) came first."""
        info = super().info()
        info.setdefault("config", {}).setdefault("train", {})["base_generation"] = self.context.models.generation()
        return info

    def next_sample(self, request):
        """MONAI Label's answer without the image's path on the server: the id says which image."""
        result = super().next_sample(request)
        result.pop("path", None)
        return result

    def infer(self, request, datastore=None):
        """Images by datastore id only (query or `params`): never a path. Unknown, malformed and outside ids
        get the same 404."""
        image = request.get("image")
        if not isinstance(image, str) or not image:
            raise AppError(
                "no image given: POST /infer/radregion?image=ID" if not image else "image must be an image id (text)"
            )
        datastore = datastore or self.datastore()
        uri = datastore.get_image_uri(image) if is_plain_name(image) else ""
        if not uri:
            raise ImageNotFoundException(f"image {show(image)} not found in the datastore")
        return super().infer({**request, "image": uri, "_image_id": image}, datastore)

    def async_scoring(self, method, params=None):
        """MONAI Label rescores after every request; start the (subprocess) scoring only when the current
        model has images left to score."""
        if not method and self.scores_complete():
            return {}
        return super().async_scoring(method, params)

    def scores_complete(self) -> bool:
        try:
            table = self.context.current_scores(fallback=False)
            return table is not None and all(i in table for i in self.datastore().list_images())
        except Exception as error:  # a PACS that is down: let the scoring task report it
            logger.warning(f"cannot check the scores: {error}")
            return False

    def on_save_label(self, image_id, label_id):
        """Counts new confirmed labels; retrains after every `auto_train_every` of them."""
        every = self.app_config.auto_train_every
        if every <= 0:
            return {}
        counter_file = self.context.state_dir / "auto_train.json"
        with self._label_lock:
            count = int(read_json(counter_file).get("new_labels", 0)) + 1
            start = count >= every
            write_json(counter_file, {"new_labels": 0 if start else count, "every": every})
        if start:
            logger.info(f"{count} new confirmed labels: starting training")
            self.async_training(MODEL, enqueue=True)
        return {"auto_train": {"new_labels": 0 if start else count, "every": every, "started": start}}


def refuse_start(error):
    """An admin's mistake, not a bug: one clear line and exit 2 instead of uvicorn's lifespan traceback."""
    logger.error(str(error))
    print(f"\nERROR: {error}\n", file=sys.stderr, flush=True)
    os._exit(2)
