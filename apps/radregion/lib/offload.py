"""Requests off the event loop.

MONAI Label's endpoints are `async def` functions that decode images, run the model and write files without
ever awaiting, so the server's one event loop served requests strictly one after another: a 16-bit PNG froze
`GET /info/` for seconds and 8 clients got no more throughput than one. `OffloadMiddleware` runs the rest of the
ASGI stack of every HTTP request (routing, auth, the endpoint, error handlers) on a worker thread with its own
event loop; the server's loop only relays the request and response messages.

Two pools: `heavy` requests (inference, batch runs, training, scoring, active learning, image uploads) share a
few threads, so a burst of images queues instead of starving the machine; everything else (info, labels,
datastore listings) has its own threads and never waits behind an image.
"""

import asyncio
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor

logger = logging.getLogger(__name__)

HEAVY_PREFIXES = ("/infer", "/batch", "/train", "/scoring", "/activelearning", "/session", "/wsi")
HEAVY_REQUESTS = {("PUT", "/datastore/image")}


def is_heavy(method: str, path: str) -> bool:
    path = "/" + path.strip("/")
    return (method, path) in HEAVY_REQUESTS or path.startswith(HEAVY_PREFIXES)


class OffloadMiddleware:
    """ASGI middleware: each HTTP request runs on a pool thread; that thread keeps one event loop for all of its
    requests (anyio's worker threads and FastAPI's context live there)."""

    def __init__(self, app, heavy_threads: int = 0, light_threads: int = 8):
        self.app = app
        heavy_threads = heavy_threads or max(2, min(4, os.cpu_count() or 2))
        self.pools = {
            True: ThreadPoolExecutor(heavy_threads, thread_name_prefix="radregion-heavy"),
            False: ThreadPoolExecutor(light_threads, thread_name_prefix="radregion-light"),
        }
        self._local = threading.local()

    def _loop(self):
        loop = getattr(self._local, "loop", None)
        if loop is None or loop.is_closed():
            loop = self._local.loop = asyncio.new_event_loop()
        return loop

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        server_loop = asyncio.get_running_loop()

        async def thread_receive():
            return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(receive(), server_loop))

        async def thread_send(message):
            await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(send(message), server_loop))

        def run():
            loop = self._loop()
            asyncio.set_event_loop(loop)
            loop.run_until_complete(self.app(scope, thread_receive, thread_send))

        pool = self.pools[is_heavy(scope.get("method", ""), scope.get("path", ""))]
        await server_loop.run_in_executor(pool, run)


def install_offload(app=None):
    """Add the middleware to MONAI Label's FastAPI app (once; the stack is rebuilt on the next request)."""
    if app is None:
        from monailabel.app import app
    if any(m.cls is OffloadMiddleware for m in app.user_middleware):
        return
    app.middleware_stack = None
    app.add_middleware(OffloadMiddleware)
    logger.info("requests run on worker threads (heavy: infer, batch, train, scoring, active learning, uploads)")
