"""Fault injection for tests/test_server_faults.py: request fields read only when RADREGION_TEST_FAULTS=1.

`crash_at` (training): kill the server at that step of a publish. `hold_s` (inference): keep the worker busy that
many seconds, so a test can see what the server answers while an inference is in flight on any machine speed.
"""

import os
import time


def requested(request: dict, name: str):
    """The fault `name` asked for in `request`, or None (always None unless the server runs with test faults)."""
    return request.get(name) if os.environ.get("RADREGION_TEST_FAULTS") == "1" else None


def hold(request: dict) -> None:
    seconds = requested(request, "hold_s")
    if seconds:
        time.sleep(min(float(seconds), 30.0))
