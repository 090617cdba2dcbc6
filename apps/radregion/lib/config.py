"""The app's `--conf` options, parsed once. Every option is documented in apps/radregion/README.md."""

import hashlib
import logging
import os
from dataclasses import dataclass, fields
from pathlib import Path

logger = logging.getLogger(__name__)
TRUE = ("1", "true", "yes", "on")
OTHER_KEYS = ("server_mode", "modalities", "username", "writeback")  # MONAI Label's, PACS
# secrets never come from --conf: a command line is visible in `ps` and MONAI Label logs its conf
SECRET_KEYS = {
    "password": "MONAI_LABEL_DATASTORE_PASSWORD or --conf password_file PATH",
    "token": "RADREGION_PACS_TOKEN or --conf token_file PATH",
}


class ConfigError(ValueError):
    """A --conf option the server cannot start with; the message says what to do instead."""


@dataclass(frozen=True)
class AppConfig:
    model: str = ""  # shipped bundle (read-only); copied into <state_dir>/model at first start
    state_dir: str = ""  # writable state; default <studies>/.radregion (DICOMweb: ~/.radregion/<url hash>)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    batch_size: int = 32  # images per forward pass (scoring, batch run)
    workers: int = 2  # decode threads
    cache: bool = True  # keep cleaned images in the engine's image cache ($RADREGION_CACHE)
    threads: int = 0  # torch CPU threads (0 = torch's default: one per core)
    taxonomy: str = ""  # label validation; default: the bundle's taxonomy
    auto_train_every: int = 0  # retrain after every N new confirmed labels (0 = never)
    fine_tune: bool = False  # refused: the server fits heads only (fine-tune with `radregion fit-head`)
    val_fraction: float = 0.25  # patient-grouped validation split of the confirmed labels
    min_labels: int = 4  # fewer confirmed labels: training refuses
    heldout_tolerance: float = 0.01  # allowed drop of the held-out macro recall of the original data (refit noise)
    diverse_pool: int = 50  # `diverse` picks among this many most uncertain images
    skip_served_s: int = 300  # a strategy does not hand out the same image again within this time
    audit_csv: str = ""  # batch run output; default <state_dir>/audit.csv
    cors_origins: str = ""  # comma-separated browser origins allowed to call the server (none by default)
    model_upload: bool = False  # PUT /model/radregion accepted (verified before it is served)
    max_upload_mb: int = 200  # largest image upload
    max_label_kb: int = 64  # largest label upload
    password_file: str = ""  # PACS password, read from this file (else $MONAI_LABEL_DATASTORE_PASSWORD)
    token_file: str = ""  # PACS bearer token, read from this file (else $RADREGION_PACS_TOKEN)

    @classmethod
    def from_conf(cls, conf: dict) -> "AppConfig":
        values = {}
        known = {f.name: f for f in fields(cls)}
        for key, raw in (conf or {}).items():
            if key in SECRET_KEYS:
                raise ConfigError(
                    f"--conf {key}: secrets are not taken from the command line (visible in `ps` "
                    f"and in the logs); use {SECRET_KEYS[key]}"
                )
            field = known.get(key)
            if field is None:
                if key not in OTHER_KEYS:
                    logger.warning(f"--conf {key}: unknown option, ignored (see apps/radregion/README.md)")
                continue
            if field.type is bool:
                values[key] = str(raw).strip().lower() in TRUE
            elif field.type in (int, float):
                try:
                    values[key] = field.type(raw)
                except ValueError:
                    raise ConfigError(f"--conf {key} {raw!r}: expected a number") from None
            else:
                values[key] = str(raw)
        return cls(**values)

    @property
    def origins(self) -> list[str]:
        return [o.strip().rstrip("/") for o in self.cors_origins.split(",") if o.strip()]

    def pacs_secret(self, key: str) -> str | None:
        """The PACS `password` or `token`: from its --conf *_file, else from the environment."""
        file = self.password_file if key == "password" else self.token_file
        if file:
            try:
                return Path(file).expanduser().read_text(encoding="utf-8").strip() or None
            except OSError as error:
                raise ConfigError(f"--conf {key}_file {file}: cannot read it ({error.strerror or error})") from None
        env = "MONAI_LABEL_DATASTORE_PASSWORD" if key == "password" else "RADREGION_PACS_TOKEN"
        return os.environ.get(env) or None

    def state_path(self, studies: str) -> Path:
        if self.state_dir:
            return Path(self.state_dir).expanduser().resolve()
        if studies.startswith(("http://", "https://")):
            digest = hashlib.sha1(studies.rstrip("/").encode()).hexdigest()[:12]
            return Path(os.path.expanduser("~/.radregion")) / digest
        return Path(studies) / ".radregion"
