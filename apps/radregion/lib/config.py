"""The app's `--conf` options, parsed once. Every option is documented in apps/radregion/README.md."""

import hashlib
import logging
import os
from dataclasses import dataclass, fields
from pathlib import Path

logger = logging.getLogger(__name__)
TRUE = ("1", "true", "yes", "on")
OTHER_KEYS = ("server_mode", "modalities", "username", "password", "token", "writeback")  # MONAI Label's, PACS


@dataclass(frozen=True)
class AppConfig:
    model: str = ""                  # shipped bundle (read-only); copied into <state_dir>/model at first start
    state_dir: str = ""              # writable state; default <studies>/.radregion (DICOMweb: ~/.radregion/<url hash>)
    device: str = "auto"             # auto | cpu | cuda | cuda:N
    batch_size: int = 32             # images per forward pass (scoring, batch run)
    workers: int = 2                 # decode threads
    cache: bool = True               # keep cleaned images in the engine's image cache ($RADREGION_CACHE)
    threads: int = 0                 # torch CPU threads (0 = torch's default: one per core)
    taxonomy: str = ""               # label validation; default: the bundle's taxonomy
    auto_train_every: int = 0        # retrain after every N new confirmed labels (0 = never)
    fine_tune: bool = False          # refused: the server fits heads only (fine-tune with `radregion fit-head`)
    val_fraction: float = 0.25       # patient-grouped validation split of the confirmed labels
    min_labels: int = 4              # fewer confirmed labels: training refuses
    heldout_tolerance: float = 0.01  # allowed drop of the held-out macro recall of the original data (refit noise)
    diverse_pool: int = 50           # `diverse` picks among this many most uncertain images
    skip_served_s: int = 300         # a strategy does not hand out the same image again within this time
    audit_csv: str = ""              # batch run output; default <state_dir>/audit.csv

    @classmethod
    def from_conf(cls, conf: dict) -> "AppConfig":
        values = {}
        known = {f.name: f for f in fields(cls)}
        for key, raw in (conf or {}).items():
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
                    raise ValueError(f"--conf {key} {raw!r}: expected a number") from None
            else:
                values[key] = str(raw)
        return cls(**values)

    def state_path(self, studies: str) -> Path:
        if self.state_dir:
            return Path(self.state_dir).expanduser().resolve()
        if studies.startswith(("http://", "https://")):
            digest = hashlib.sha1(studies.rstrip("/").encode()).hexdigest()[:12]
            return Path(os.path.expanduser("~/.radregion")) / digest
        return Path(studies) / ".radregion"
