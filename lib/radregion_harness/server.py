"""A real `monailabel start_server` process running the RadRegion app of this checkout on 127.0.0.1.

`start_server(studies, model, ...)` starts one and waits until `/info/` answers; `RadRegionServer(...)` gives
control of its life (`.start()`, `.stop()`, `.kill()`, `.restart()`, the log). `studies` is a folder or an
http(s):// DICOMweb URL; `model` a bundle folder.

Every server started here gets the API token `API_TOKEN` ($RADREGION_API_TOKEN, set for this process on import,
so a client started from it, such as the Slicer module's RadRegionLib, finds it too); writes send `AUTH`
(`Authorization: Bearer ...`), or `server.auth`.
"""

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]  # the source checkout (an editable install: `pip install -e .`)
APP_DIR = REPO / "apps" / "radregion"
VENV_BIN = REPO / ".venv" / "bin"

API_TOKEN = os.environ.setdefault("RADREGION_API_TOKEN", secrets.token_urlsafe(24))
AUTH = {"Authorization": f"Bearer {API_TOKEN}"}


def free_ports(n: int) -> list[int]:
    """`n` distinct free ports on 127.0.0.1: every socket stays bound until all are chosen (one at a time, the
    system can hand out the same port twice: an Orthanc once got its DICOM port as its HTTP port and stopped)."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(n)]
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]


def free_port() -> int:
    return free_ports(1)[0]


class RadRegionServer:
    """One `monailabel start_server` process; `.start()`/`.stop()`/`.kill()` keep the same port and studies."""

    def __init__(
        self,
        studies,
        model,
        port=None,
        extra_conf=None,
        log_path=None,
        startup_timeout=240.0,
        env=None,
        host="127.0.0.1",
    ):
        self.studies = studies if str(studies).startswith(("http://", "https://")) else Path(studies)
        self.model = Path(model)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.extra_conf = dict(extra_conf or {})
        self.env = dict(env or {})  # overrides of the server's environment; None removes a variable
        self.host = host
        token = self.env.get("RADREGION_API_TOKEN", API_TOKEN)
        self.auth = {"Authorization": f"Bearer {token}"} if token else {}
        default_log = Path(os.environ.get("TMPDIR", "/tmp")) / f"radregion-server-{self.port}.log"
        self.log_path = Path(log_path) if log_path else default_log
        self.startup_timeout = startup_timeout
        self.process = None

    def command(self) -> list:
        if not (APP_DIR / "main.py").is_file():
            raise RuntimeError(f"{APP_DIR}: no RadRegion app here (the harness runs a source checkout's app)")
        monailabel = VENV_BIN / "monailabel"
        if not monailabel.exists():
            monailabel = Path(sys.executable).parent / "monailabel"
        cmd = [
            str(monailabel),
            "start_server",
            "--app",
            str(APP_DIR),
            "--studies",
            str(self.studies),
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--conf",
            "model",
            str(self.model),
        ]
        for key, value in self.extra_conf.items():
            cmd += ["--conf", str(key), str(value)]
        return cmd

    def start(self):
        if self.running:
            return self
        self.launch()
        self._wait_ready()
        return self

    def launch(self):
        """Start the process without waiting for it to answer."""
        env = dict(os.environ)
        env["MONAILABEL_PYEXE"] = sys.executable  # the monailabel script runs `python -m monailabel.main`
        env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
        env.setdefault("MONAI_LABEL_TRACKING_ENABLED", "false")
        env.setdefault("OMP_NUM_THREADS", "1")  # a shared, loaded test machine: spinning OpenMP threads cost 20x
        temp = self.temp_dir()
        if temp is not None:  # as the documented start commands do: MONAI Label's start-up files stay inside too
            temp.mkdir(mode=0o700, parents=True, exist_ok=True)
            env["TMPDIR"] = str(temp)
            env["MPLCONFIGDIR"] = str(temp.parent / "matplotlib")  # imported by MONAI Label: its font cache
        for key, value in self.env.items():
            if value is None:
                env.pop(key, None)
            else:
                env[key] = value
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            log.write(f"\n==== start {' '.join(self.command())}\n".encode())
            self.process = subprocess.Popen(
                self.command(), stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(REPO), start_new_session=True
            )
        return self

    def temp_dir(self):
        """<state folder>/tmp, where TMPDIR points (the app puts its temp files there and empties it at start); None
        for a PACS without --conf state_dir (its state folder is named by a hash of the URL)."""
        if self.extra_conf.get("state_dir"):
            return Path(self.extra_conf["state_dir"]) / "tmp"
        return None if isinstance(self.studies, str) else self.studies / ".radregion" / "tmp"

    def _wait_ready(self):
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"monailabel server exited with {self.process.returncode} while starting; "
                    f"log {self.log_path}:\n{self.log_tail()}"
                )
            try:
                request = urllib.request.Request(self.url + "/info/", headers=self.auth)
                with urllib.request.urlopen(request, timeout=5) as answer:
                    if answer.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(0.5)
        self.kill()
        raise RuntimeError(
            f"monailabel server not ready after {self.startup_timeout:.0f} s; log {self.log_path}:\n{self.log_tail()}"
        )

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout=30.0):
        """Graceful stop (SIGTERM), then SIGKILL if it hangs."""
        if not self.running:
            return
        self._signal_group(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self):
        """kill -9, as a crash would (the whole process group: the script and its `monailabel.main` child)."""
        if self.running:
            self._signal_group(signal.SIGKILL)
            self.process.wait(30)

    def _signal_group(self, sig):
        try:
            os.killpg(self.process.pid, sig)  # start_new_session: the group id is the script's pid
        except ProcessLookupError:
            pass

    def restart(self):
        self.stop()
        return self.start()

    def log_tail(self, lines=80) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def get_json(self, path, timeout=120):
        with urllib.request.urlopen(
            urllib.request.Request(self.url + path, headers=self.auth), timeout=timeout
        ) as answer:
            return json.loads(answer.read())

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def start_server(studies, model, port=None, extra_conf=None, log_path=None, env=None) -> RadRegionServer:
    """Start the real server and wait until `/info/` answers; raises with the log tail if it does not."""
    return RadRegionServer(studies, model, port=port, extra_conf=extra_conf, log_path=log_path, env=env).start()
