"""Launch a real RadRegion server / a real Orthanc on 127.0.0.1 for tests and benchmarks.

- `RadRegionServer`, `start_server`: a `monailabel start_server` process running this checkout's app
  (apps/radregion) on a studies folder or a DICOMweb URL, with the API token `API_TOKEN` (`AUTH` is its header).
- `OrthancServer`: Debian's Orthanc with the DICOMweb plugin, its own storage folder, ports and a basic-auth user.

Nothing in the engine (lib/radregion), the server (apps/) or the Slicer module imports this package
(tests/test_architecture.py checks); it imports nothing of theirs either: it starts them as processes.
"""

from radregion_harness.pacs import MISSING_ORTHANC, OrthancServer, orthanc_installed
from radregion_harness.server import API_TOKEN, APP_DIR, AUTH, REPO, RadRegionServer, free_port, start_server

__all__ = [
    "API_TOKEN",
    "APP_DIR",
    "AUTH",
    "MISSING_ORTHANC",
    "REPO",
    "OrthancServer",
    "RadRegionServer",
    "free_port",
    "orthanc_installed",
    "start_server",
]
