"""Log lines a client cannot forge and that never show a secret.

Every record's message has its control characters escaped (an image id with a newline cannot start a fake log
line; a NUL cannot cut one) and the server's secrets (API token, PACS password and token) replaced by `***`.
"""

import logging
import re

CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]|\n|\r")
MASK = "***"


def escape_controls(text: str) -> str:
    return CONTROL.sub(lambda m: repr(m.group())[1:-1], text)


class SafeLogFilter(logging.Filter):
    def __init__(self, secrets=()):
        super().__init__("radregion-safe-log")
        self.secrets = [s for s in secrets if s]

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a broken format string: leave it to the handler to report
            return True
        clean = escape_controls(message)
        for secret in self.secrets:
            clean = clean.replace(secret, MASK)
        if clean != message:
            record.msg, record.args = clean, ()
        return True


def install_safe_logging(secrets=()) -> SafeLogFilter:
    """Add the filter to every handler configured now (root and named loggers); replaces an earlier one."""
    safe = SafeLogFilter(secrets)
    loggers = [logging.getLogger()] + [logging.getLogger(name) for name in list(logging.root.manager.loggerDict)]
    for handler in {h for lg in loggers if isinstance(lg, logging.Logger) for h in lg.handlers}:
        for old in [f for f in handler.filters if isinstance(f, SafeLogFilter)]:
            handler.removeFilter(old)
        handler.addFilter(safe)
    return safe


def scrub_log_files(secrets):
    """Overwrite secrets already written to the log files (same length, in place: other writers keep appending)."""
    secrets = [s.encode() for s in secrets if s]
    files = {
        getattr(h, "baseFilename", None)
        for lg in [logging.getLogger()] + [logging.getLogger(n) for n in list(logging.root.manager.loggerDict)]
        if isinstance(lg, logging.Logger)
        for h in lg.handlers
    }
    for name in filter(None, files):
        try:
            with open(name, "r+b") as handle:
                data = handle.read()
                for secret in secrets:
                    start = data.find(secret)
                    while start >= 0:
                        handle.seek(start)
                        handle.write(b"*" * len(secret))
                        start = data.find(secret, start + len(secret))
        except OSError:
            continue
