"""What every task of the app shares: the published model, its predictor, the cached scores, the state folder.

The shipped model (--conf model) stays read-only; training publishes into <state_dir>/model. The predictor is
built once and rebuilt only when a new bundle appears there (a folder rename by `save_bundle`).
"""

import json
import logging
import shutil
import tempfile
import threading
from pathlib import Path

from radregion.atomic import atomic_write
from radregion.errors import RadiographError

from .config import AppConfig
from .scores import ScoreStore, ScoreTable

logger = logging.getLogger(__name__)


class ModelNotFoundError(RuntimeError):
    """The server cannot start without a model: the message says which folder and what to do."""


class RadRegionContext:
    def __init__(self, config: AppConfig, studies: str):
        self.config = config
        self.state_dir = config.state_path(studies)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.model_dir = self.state_dir / "model"
        self.scores = ScoreStore(self.state_dir / "scores")
        self._lock = threading.RLock()
        self._predictor = None
        self._taxonomy = None
        self._install_model()

    # ---- model --------------------------------------------------------------------------------------
    def _install_model(self):
        """Copy the shipped bundle into the state folder unless a model derived from it is already there."""
        from radregion.bundle import _replace_folder, load_bundle

        if not self.config.model:
            raise ModelNotFoundError("RadRegion needs a model: start the server with --conf model PATH "
                                     "(a bundle folder with bundle.json and model.safetensors)")
        shipped_path = Path(self.config.model).expanduser().resolve()
        try:
            shipped = load_bundle(shipped_path)
        except RadiographError as error:
            raise ModelNotFoundError(
                f"RadRegion cannot start: no usable model bundle at {shipped_path} ({error}). "
                f"Train or copy one there (`radregion fit-head ... --output {shipped_path}`) "
                f"or pass another with --conf model PATH") from None
        if not shipped.has_head:
            raise ModelNotFoundError(f"RadRegion cannot start: the bundle at {shipped_path} has no classification "
                                     f"head (fit one with `radregion fit-head`)")
        source_file = self.state_dir / "model_source.json"
        source = read_json(source_file)
        if source.get("version") == shipped.version and (self.model_dir / "bundle.json").is_file():
            try:
                load_bundle(self.model_dir)
                return
            except RadiographError as error:
                logger.warning(f"published model unusable ({error}); reinstalling the shipped one")
        elif source:
            logger.warning(f"shipped model changed ({source.get('version')} -> {shipped.version}): "
                           f"replacing the published model {self.model_dir}")
        tmp = Path(tempfile.mkdtemp(dir=self.state_dir, prefix=".model.copy-"))
        try:
            shutil.copytree(shipped_path, tmp / "model")
            _replace_folder(tmp / "model", self.model_dir)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        with atomic_write(source_file, "w") as f:
            json.dump({"path": str(shipped_path), "version": shipped.version}, f)
        logger.info(f"installed model {shipped.version} from {shipped_path} into {self.model_dir}")

    def predictor(self):
        """The engine Predictor of the published model; swapped in place when a new bundle was published."""
        from radregion.inference import Predictor

        with self._lock:
            if self._predictor is None:
                self._predictor = Predictor(self.model_dir, device=self.config.device, workers=self.config.workers,
                                            cache=self.config.cache)
                logger.info(f"model {self._predictor.version} loaded from {self.model_dir}")
            elif self._predictor.reload_if_changed():
                logger.info(f"new model {self._predictor.version} published: loaded")
            return self._predictor

    def bundle(self):
        from radregion.bundle import load_bundle

        return load_bundle(self.model_dir)

    @property
    def version(self) -> str:
        return self.predictor().version

    def taxonomy(self):
        if self._taxonomy is None:
            if self.config.taxonomy:
                from radregion.taxonomy import load_taxonomy

                self._taxonomy = load_taxonomy(self.config.taxonomy)
            else:
                self._taxonomy = self.bundle().taxonomy()
        return self._taxonomy

    # ---- scores -------------------------------------------------------------------------------------
    def current_scores(self, fallback=True) -> ScoreTable | None:
        """Scores of the published model; with `fallback`, the newest older ones while a refresh is pending."""
        table = self.scores.load(self.version)
        return table if table is not None or not fallback else self.scores.latest()

    def refresh_scores(self, datastore, image_ids=None) -> ScoreTable:
        """Score the images (default: all) that the current model has not scored yet; saves the table."""
        predictor = self.predictor()
        with self._lock:
            table = self.scores.load(predictor.version) or ScoreTable(predictor.version, predictor.regions)
            wanted = datastore.list_images() if image_ids is None else image_ids
            missing = [i for i in wanted if i not in table]
            if not missing:
                return table
            paths, known = [], []
            for image_id in missing:
                try:
                    uri = datastore.get_image_uri(image_id)
                except Exception as error:  # a remote datastore may fail per image
                    table.errors[image_id] = str(error)
                    continue
                if not uri:
                    table.errors[image_id] = "image not found in the datastore"
                    continue
                paths.append(uri)
                known.append(image_id)
            predictions = list(predictor.predict(paths, batch_size=self.config.batch_size))
            table.add(predictions, known)
            self.scores.save(table)
            self.scores.prune({predictor.version})
            logger.info(f"scored {len(known)} images with model {predictor.version} "
                        f"({len(table)} scored, {len(table.errors)} unreadable)")
            return table


def read_json(path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}


def read_label(datastore, image_id, tag="final") -> dict | None:
    """The stored JSON label of an image (any datastore: through its label URI), None when there is none."""
    uri = datastore.get_label_uri(image_id, tag)
    try:
        return json.loads(Path(uri).read_text()) if uri else None
    except (OSError, ValueError):
        return None


def write_json(path, data):
    with atomic_write(path, "w") as f:
        json.dump(data, f, indent=2)
