"""The API token that every write (and, off loopback, every request) must carry as `Authorization: Bearer ...`.

From $RADREGION_API_TOKEN when set; otherwise generated once into <state_dir>/api_token, a file only its owner
can read (0600). The log names the file, never the token.
"""

import logging
import os
import secrets
import stat
from pathlib import Path

from .config import ConfigError

logger = logging.getLogger(__name__)
ENV = "RADREGION_API_TOKEN"
FILE_NAME = "api_token"
MIN_LENGTH = 16


def load_api_token(state_dir) -> tuple[str, str]:
    """(token, where it came from: "$RADREGION_API_TOKEN" or the file's path)."""
    value = os.environ.get(ENV, "").strip()
    if value:
        if len(value) < MIN_LENGTH:
            raise ConfigError(
                f"${ENV} is too short ({len(value)} characters; at least {MIN_LENGTH}): "
                f"unset it to have one generated, or use `python -c 'import secrets; "
                f"print(secrets.token_urlsafe(32))'`"
            )
        return value, f"${ENV}"
    path = Path(state_dir) / FILE_NAME
    if not path.exists():
        _create(path)
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        os.chmod(path, 0o600)
        logger.warning(f"{path} was readable by others (mode {mode:o}): set to 0600")
    value = path.read_text(encoding="utf-8").strip()
    if len(value) < MIN_LENGTH:
        raise ConfigError(f"{path}: the API token in it is too short; delete the file to have a new one generated")
    return value, str(path)


def _create(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another server process made it first
        return
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(secrets.token_urlsafe(32) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    logger.info(f"generated a new API token in {path} (mode 0600)")
