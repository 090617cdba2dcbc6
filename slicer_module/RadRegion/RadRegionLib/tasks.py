"""Server calls off the UI thread: a worker thread runs them, the UI thread collects the results.

Qt widgets may only be touched on the UI thread, and Slicer's PythonQt has no cross-thread signals from Python
threads. So the panel submits a blocking call here and a QTimer on the UI thread calls `poll()`, which runs each
finished call's `on_done(future)` on the UI thread, where it may update the widgets. Calls run one at a time, in
the order given, so a session is never changed by two calls at once.
"""

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, List, Optional, Tuple

POLL_MS = 40  # how often the UI thread looks for finished calls


class BackgroundCalls:
    def __init__(self, name: str = "radregion"):
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._pending: List[Tuple[Future, Optional[Callable[[Future], None]]]] = []
        self._lock = threading.Lock()

    @property
    def busy(self) -> bool:
        """A call is running or waiting, or its result has not been handed to the UI yet."""
        with self._lock:
            return bool(self._pending)

    def submit(self, call: Callable, on_done: Optional[Callable[[Future], None]] = None) -> Future:
        future = self._executor.submit(call)
        with self._lock:
            self._pending.append((future, on_done))
        return future

    def poll(self) -> int:
        """On the UI thread: hand finished calls to their `on_done`, in submission order. Returns how many."""
        handed = 0
        while True:
            with self._lock:
                if not self._pending or not self._pending[0][0].done():
                    return handed
                future, on_done = self._pending.pop(0)
            handed += 1
            if on_done is not None:
                on_done(future)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False)
