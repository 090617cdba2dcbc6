"""Infer latency through DICOMweb: first request (WADO-RS fetch + decode + model) and cached (second request).

Starts a local Orthanc with the DICOMweb plugin and a real MONAI Label server on its DICOMweb URL, uploads the
real JPEG 2000 CR files and DICOM copies of shared PNGs, and times POST /infer/radregion from the client side.
Also times the bare WADO-RS fetch (what the server's datastore does on a first request: retrieve the stored bytes,
write the .dcm; no model).

    .venv/bin/python bench/pacs_latency.py [--pngs 12] [--model BUNDLE]

Without --model it uses the default model ($RADREGION_MODEL, else the shipped model). Orthanc and the server are
started by radregion_harness, as the tests start them.
"""

import argparse
import csv
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pydicom
import requests
from dicomweb_client.api import DICOMwebClient
from PIL import Image

from radregion.atomic import atomic_write
from radregion.bundle import resolve_model
from radregion.dicomwrite import array_to_dicom
from radregion.errors import RadiographError
from radregion_harness import OrthancServer, RadRegionServer

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("RADREGION_SHARED_DATA", REPO.parent / "shared" / "data"))
STORED_BYTES = (("application/dicom", "*"),)  # any transfer syntax: the stored file, never a transcode


def make_dicoms(folder: Path, count: int) -> list:
    rows = list(csv.DictReader(open(DATA / "unifesp" / "labels.csv", newline="")))[:count]
    paths = []
    for i, row in enumerate(rows):
        pixels = np.asarray(Image.open(DATA / "unifesp" / row["image"]).convert("L"))
        paths.append(array_to_dicom(pixels, folder / f"png{i}.dcm", modality="CR", patient_id=f"B{i}"))
    return paths


def fetch_times(pacs, kind: dict, folder: Path) -> dict:
    """Seconds per instance of a bare WADO-RS fetch (retrieve, then write the .dcm atomically), by kind."""
    session = requests.Session()
    session.auth = pacs.auth
    client = DICOMwebClient(pacs.dicomweb_url, session=session)
    folder.mkdir(parents=True)
    times = {}
    for item in client.search_for_instances():
        study, series, sop = (item[tag]["Value"][0] for tag in ("0020000D", "0020000E", "00080018"))
        start = time.perf_counter()
        ds = client.retrieve_instance(study, series, sop, media_types=STORED_BYTES)
        with atomic_write(folder / f"{sop}.dcm") as handle:
            ds.save_as(handle, write_like_original=True)
        times.setdefault(kind[sop], []).append(time.perf_counter() - start)
    return times


def summary(name, seconds):
    ms = sorted(1000 * s for s in seconds)
    p90 = ms[min(len(ms) - 1, int(round(0.9 * (len(ms) - 1))))]
    print(f"{name:<56} n={len(ms):3d}  median {statistics.median(ms):8.1f} ms  p90 {p90:8.1f} ms  max {ms[-1]:8.1f} ms")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pngs", type=int, default=12, help="DICOM copies of shared PNGs to upload")
    parser.add_argument("--model", help="bundle folder")
    args = parser.parse_args()
    try:
        model = resolve_model(args.model)
    except RadiographError as error:
        parser.error(str(error))

    with tempfile.TemporaryDirectory(prefix="pacs-bench-") as tmp:
        root = Path(tmp)
        pacs = OrthancServer(root / "orthanc").start()
        server = None
        try:
            files = sorted(DATA.joinpath("dicom").glob("*.dcm")) + make_dicoms(root / "made", args.pngs)
            kind = {}
            for path in files:
                pacs.upload(path)
                sop = pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID
                kind[sop] = "JPEG 2000 CR ~1900 px" if path.parent.name == "dicom" else "PNG copy 320 px"
            fetch = fetch_times(pacs, kind, root / "fetch-only")

            os.environ["MONAI_LABEL_AUTO_UPDATE_SCORING"] = "false"  # no background prefetch: first = first
            os.environ["RADREGION_CACHE"] = str(root / "image-cache")  # nor a cleaned image from an earlier run
            state = root / "state"
            server = RadRegionServer(
                pacs.dicomweb_url,
                model,
                log_path=root / "server.log",
                extra_conf={"state_dir": state, "username": pacs.username},
                env={"MONAI_LABEL_DATASTORE_PASSWORD": pacs.password},
            ).start()
            first, cached, prefetched = {}, {}, 0
            for sop in sorted(kind):
                prefetched += any(state.rglob(f"{sop}.dcm"))
                for bucket in (first, cached):
                    start = time.perf_counter()
                    answer = requests.post(
                        f"{server.url}/infer/radregion",
                        params={"image": sop, "output": "json"},
                        timeout=600,
                        headers=server.auth,
                    )
                    answer.raise_for_status()
                    bucket.setdefault(kind[sop], []).append(time.perf_counter() - start)

            print(f"Orthanc {pacs.url} (DICOMweb plugin), {len(kind)} CR instances; model {model}")
            for name in sorted(fetch):
                summary(f"WADO-RS fetch only, {name}", fetch[name])
            for name in sorted(first):
                summary(f"infer, first (fetch+decode+model), {name}", first[name])
                summary(f"infer, cached, {name}", cached[name])
            if prefetched:
                print(f"note: {prefetched} images were already cached before their first request")
        finally:
            if server is not None:
                server.stop()
            pacs.stop()


if __name__ == "__main__":
    main()
