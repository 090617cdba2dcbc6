"""What every task of the app shares: the published model, its predictor, the cached scores, the state folder.

The shipped model (--conf model, else the bundle installed with the package as `radregion_model`) stays
read-only; it is published into <state_dir>/models as the first generation and training publishes the next ones
(published.py). The predictor is built once and rebuilt when the `model` link points at another generation.

Temp files (MONAI Label's upload copies, dataset zips, the log config it writes at start when TMPDIR points here as
the documented start commands do) go to <state_dir>/tmp, never to the system's temp folder: the server and its task
processes set TMPDIR and Python's `tempfile.tempdir` to it; the server empties it at start.
"""

import json
import logging
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

from radregion.atomic import atomic_write, remove_temp_files
from radregion.errors import RadiographError

from .config import AppConfig
from .published import ModelStore
from .scores import ScoreStore, ScoreTable

logger = logging.getLogger(__name__)
SAVE_EVERY_S = 5.0


class ModelNotFoundError(RuntimeError):
    """The server cannot start without a model: the message says which folder and what to do."""


class RadRegionContext:
    def __init__(self, config: AppConfig, studies: str, server: bool = True):
        """`server`: the server process (settles crash leftovers, installs the shipped model); False in the task
        processes MONAI Label starts (training, scoring, batch runs), which use what the server published."""
        self.config = config
        self.state_dir = config.state_path(studies)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.model_dir = self.state_dir / "model"  # a link to the current generation (published.py)
        self.models = ModelStore(self.state_dir)
        self.scores = ScoreStore(self.state_dir / "scores")
        self.tmp_dir = self.state_dir / "tmp"
        self._lock = threading.RLock()  # the score table of this process (read, extend, save)
        self._model_lock = threading.Lock()  # the predictor (never held while images are scored)
        self._predictor = None
        self._predictor_folder = None
        self._unloadable = None
        self._taxonomy = None
        if server:
            self._clean_start(studies)
        self._use_own_temp_folder()
        if server:
            self._install_model()
        elif self.models.current_folder() is None:
            raise ModelNotFoundError(f"no published model at {self.model_dir}: the server installs one at start")

    def _clean_start(self, studies: str):
        """Leftovers of a crash: unfinished publishes and trainings, temp files of interrupted label writes."""
        done = self.models.recover()
        if not studies.startswith(("http://", "https://")):
            removed = remove_temp_files(studies, recursive=False) + remove_temp_files(Path(studies) / "labels")
            if removed:
                done.append(f"removed {len(removed)} temp file(s) of interrupted label writes")
        if self.tmp_dir.is_dir():
            stale = list(self.tmp_dir.iterdir())
            for path in stale:
                shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
            if stale:
                logger.info(f"start-up: emptied the temp folder {self.tmp_dir} ({len(stale)} entries)")
        for line in done:
            logger.warning(f"start-up: {line}")

    def _use_own_temp_folder(self):
        """Every temp file of this process and the tasks it starts goes to <state_dir>/tmp."""
        self.tmp_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.environ["TMPDIR"] = str(self.tmp_dir)
        tempfile.tempdir = str(self.tmp_dir)

    # ---- model --------------------------------------------------------------------------------------
    def _install_model(self):
        """Publish the shipped bundle unless the published model derives from this very shipped bundle."""
        from radregion.bundle import load_bundle

        shipped_path = shipped_model_path(self.config)
        try:
            shipped = load_bundle(shipped_path)
        except RadiographError as error:
            raise ModelNotFoundError(
                f"RadRegion cannot start: no usable model bundle at {shipped_path} ({error}). "
                f"Train or copy one there (`radregion fit-head ... --output {shipped_path}`) "
                f"or pass another with --conf model PATH"
            ) from None
        if not shipped.has_head:
            raise ModelNotFoundError(
                f"RadRegion cannot start: the bundle at {shipped_path} has no classification "
                f"head (fit one with `radregion fit-head`)"
            )
        source_file = self.state_dir / "model_source.json"
        source = read_json(source_file)
        if self.models.current_folder() is not None:
            if source.get("version") == shipped.version:
                return
            logger.warning(
                f"shipped model changed ({source.get('version')} -> {shipped.version}): "
                f"publishing it over {self.models.current().get('version')} (rollback restores that)"
            )
        staging = self.models.staging()
        os.rmdir(staging)
        shutil.copytree(shipped_path, staging, ignore=shutil.ignore_patterns("__init__.py", "__pycache__", "*.pyc"))
        self.models.publish(staging, f"shipped model {shipped.version} from {shipped_path}")
        with atomic_write(source_file, "w") as f:
            json.dump({"path": str(shipped_path), "version": shipped.version}, f)
        logger.info(f"installed model {shipped.version} from {shipped_path} into {self.model_dir}")

    def rollback(self) -> dict:
        """Serve again the model the current one replaced (a new generation); NothingToRollBack if none."""
        record = self.models.rollback("rollback requested over REST")
        self.predictor()
        return record

    def predictor(self):
        """The engine Predictor of the published model; replaced when another generation is published."""
        from radregion.inference import Predictor

        with self._model_lock:
            folder = self.models.current_folder()
            if folder is None or folder == self._predictor_folder or folder == self._unloadable:
                if self._predictor is None:
                    raise ModelNotFoundError(f"no usable published model at {self.model_dir}")
                return self._predictor
            try:
                predictor = Predictor(
                    folder, device=self.config.device, workers=self.config.workers, cache=self.config.cache
                )
            except (RadiographError, ValueError, OSError) as error:
                if self._predictor is None:
                    raise
                self._unloadable = folder
                logger.error(
                    f"published model {folder} cannot be loaded ({error}): still serving {self._predictor.version}"
                )
                return self._predictor
            logger.info(f"model {predictor.version} loaded from {folder}")
            self._predictor, self._predictor_folder = predictor, folder
            return predictor

    def bundle(self):
        from radregion.bundle import load_bundle

        return load_bundle(self.models.current_folder() or self.model_dir)

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
            # saved every few seconds: the queues serve from a partial table while scoring runs
            done, saved_at = [], time.monotonic()
            for image_id, prediction in zip(known, predictor.predict(paths, batch_size=self.config.batch_size)):
                done.append((image_id, prediction))
                if time.monotonic() - saved_at > SAVE_EVERY_S:
                    table.add([p for _, p in done], [i for i, _ in done])
                    self.scores.save(table)
                    done, saved_at = [], time.monotonic()
            table.add([p for _, p in done], [i for i, _ in done])
            self.scores.save(table)
            self.scores.prune({predictor.version})
            logger.info(
                f"scored {len(known)} images with model {predictor.version} "
                f"({len(table)} scored, {len(table.errors)} unreadable)"
            )
            return table


def shipped_model_path(config: AppConfig) -> Path:
    """--conf model, else the bundle installed with the package (`radregion_model`: apps/radregion/model)."""
    if config.model:
        return Path(config.model).expanduser().resolve()
    from radregion.bundle import shipped_model_path as installed_model

    shipped = installed_model()
    if shipped is None:
        raise ModelNotFoundError(
            "RadRegion needs a model: no bundle was installed with this package "
            "(`radregion_model`); start the server with --conf model PATH (a bundle folder "
            "with bundle.json and model.safetensors)"
        )
    return shipped


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
