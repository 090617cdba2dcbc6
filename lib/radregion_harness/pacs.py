"""A real Orthanc (Debian's /usr/sbin/Orthanc + DICOMweb plugin) on 127.0.0.1, its storage in a given folder."""

import json
import subprocess
import time
from pathlib import Path

import requests

from radregion_harness.server import free_ports

ORTHANC = Path("/usr/sbin/Orthanc")
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
MISSING_ORTHANC = "Orthanc or its DICOMweb plugin is missing: apt-get install orthanc orthanc-dicomweb (see .ci/run)"


def orthanc_installed() -> bool:
    return ORTHANC.exists() and DICOMWEB_PLUGIN.exists()


class OrthancServer:
    """One Orthanc process with its own storage folder, ports and a basic-auth test user.

    `stop()` and `start()` keep the storage, so a restart finds the same instances.
    """

    username = "radregion"
    password = "test-secret"

    def __init__(self, root: Path):
        self.root = Path(root)
        self.storage = self.root / "storage"
        self.http_port, self.dicom_port = free_ports(2)
        self.log_path = self.root / "orthanc.log"
        self.config_path = self.root / "orthanc.json"
        self.process = None
        self._write_config()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        return f"{self.url}/dicom-web"

    @property
    def auth(self) -> tuple:
        return (self.username, self.password)

    def _write_config(self):
        self.storage.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "RadRegionTestPACS",
            "StorageDirectory": str(self.storage),
            "IndexDirectory": str(self.storage),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": "RADREGIONTEST",
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": True,
            "RegisteredUsers": {self.username: self.password},
            "Plugins": [str(DICOMWEB_PLUGIN)],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": True, "Ssl": False},
            "SaveJobs": False,
            "ConcurrentJobs": 1,
            "HttpThreadsCount": 8,
            "StorageCompression": False,
        }
        self.config_path.write_text(json.dumps(config, indent=2))

    def start(self, timeout: float = 30.0) -> "OrthancServer":
        if self.process is not None and self.process.poll() is None:
            return self
        if not orthanc_installed():
            raise RuntimeError(MISSING_ORTHANC)
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen([str(ORTHANC), str(self.config_path)], stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"Orthanc exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                if requests.get(f"{self.url}/system", auth=self.auth, timeout=1).ok:
                    return self
            except requests.ConnectionError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"Orthanc did not answer {self.url}/system within {timeout:.0f} s:\n{self.log_tail()}")

    def stop(self, kill: bool = False):
        """Clean shutdown (about 3 s); `kill=True` for a crash, or when the storage is thrown away anyway."""
        if self.process is None:
            return
        if self.process.poll() is None:
            if kill:
                self.process.kill()
            else:
                self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def log_tail(self, n: int = 30) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def upload(self, path) -> dict:
        """Store one DICOM file through Orthanc's REST API; returns Orthanc's answer."""
        r = requests.post(f"{self.url}/instances", data=Path(path).read_bytes(), auth=self.auth, timeout=30)
        r.raise_for_status()
        return r.json()

    def instance_count(self) -> int:
        r = requests.get(f"{self.url}/statistics", auth=self.auth, timeout=10)
        r.raise_for_status()
        return int(r.json()["CountInstances"])
