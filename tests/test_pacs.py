"""Issue 8: radiographs from a real Orthanc over DICOMweb; labels kept locally; corrections written back safely."""

import csv
import hashlib
import io
import json
import re
import sys
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
import requests
from PIL import Image

from radregion.dicomwrite import array_to_dicom
from radregion.errors import RadiographError

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "apps" / "radregion"))

from lib.datastore.dicomweb import PACSError, RadRegionDICOMwebDatastore  # noqa: E402
from lib.writeback import WRITEBACK_MARKER  # noqa: E402

# (true region, photometric, header) for DICOM copies of shared PNGs (CR unless said); some headers deliberately
# wrong or missing.
PNG_CASES = [
    ("Knee", "MONOCHROME2", {"body_part": "KNEE", "study_description": "XR KNEE 2 VIEWS"}),
    ("Knee", "MONOCHROME1", {"body_part": "CHEST", "study_description": "XR CHEST PA"}),  # wrong
    ("Chest", "MONOCHROME1", {"study_description": "CHEST PA", "series_description": "PA"}),  # no BodyPart
    ("Abdomen", "MONOCHROME2", {"body_part": "FOOT", "series_description": "AP"}),  # wrong
    ("Hand", "MONOCHROME2", {"body_part": "HAND", "series_description": "HAND PA", "modality": "DX"}),
]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def png_dicoms(folder: Path, unifesp: Path) -> dict:
    """DICOM copies of single-label shared PNGs (PNG_CASES) plus one MG image; {SOPInstanceUID: true region}."""
    folder.mkdir(parents=True, exist_ok=True)
    by_region = {}
    with open(unifesp / "labels.csv", newline="") as f:
        for row in csv.DictReader(f):
            by_region.setdefault(row["labels"], []).append(unifesp / row["image"])
    truth, used = {}, {}
    for i, (region, photometric, header) in enumerate(PNG_CASES):
        png = by_region[region][used.get(region, 0)]
        used[region] = used.get(region, 0) + 1
        pixels = np.asarray(Image.open(png).convert("L"))
        if photometric == "MONOCHROME1":
            pixels = 255 - pixels  # bone bright in the PNG: stored inverted, as a MONOCHROME1 CR is
        path = array_to_dicom(
            pixels,
            folder / f"case{i}.dcm",
            photometric=photometric,
            patient_id=f"PACS{i}",
            **{"modality": "CR", **header},
        )
        truth[pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID] = region
    mammo = array_to_dicom(np.zeros((64, 64), np.uint8), folder / "mammo.dcm", modality="MG", body_part="BREAST")
    return {
        "truth": truth,
        "mammo": pydicom.dcmread(mammo, stop_before_pixels=True).SOPInstanceUID,
        "files": sorted(folder.glob("*.dcm")),
    }


@pytest.fixture
def pacs(orthanc, tmp_path, unifesp, real_dicoms):
    """Orthanc with the real J2K CR files and the PNG copies; .stored = {SOP: (orthanc id, sha256, study, series)}."""
    made = png_dicoms(tmp_path / "made", unifesp)
    orthanc.stored, orthanc.paths = {}, {}
    for path in list(real_dicoms) + made["files"]:
        answer = orthanc.upload(path)
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        orthanc.paths[ds.SOPInstanceUID] = Path(path)
        orthanc.stored[ds.SOPInstanceUID] = (
            answer["ID"],
            sha256(Path(path).read_bytes()),
            ds.StudyInstanceUID,
            ds.SeriesInstanceUID,
        )
    orthanc.truth = made["truth"]
    orthanc.mammo = made["mammo"]
    orthanc.real = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID: p.name for p in real_dicoms}
    return orthanc


def stored_hash(orthanc, sop) -> str:
    """sha256 of the instance's bytes as WADO-RS returns them (stored transfer syntax, multipart unwrapped)."""
    _, _, study, series = orthanc.stored[sop]
    r = requests.get(
        f"{orthanc.dicomweb_url}/studies/{study}/series/{series}/instances/{sop}",
        auth=orthanc.auth,
        headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'},
        timeout=30,
    )
    r.raise_for_status()
    boundary = re.search(r'boundary="?([^";]+)"?', r.headers["Content-Type"]).group(1).encode()
    parts = [p for p in r.content.split(b"--" + boundary) if p.strip() not in (b"", b"--")]
    assert len(parts) == 1, "one instance"
    return sha256(parts[0].split(b"\r\n\r\n", 1)[1].removesuffix(b"\r\n"))


def datastore(orthanc, root: Path, **kwargs) -> RadRegionDICOMwebDatastore:
    kwargs.setdefault("username", orthanc.username)
    kwargs.setdefault("password", orthanc.password)
    return RadRegionDICOMwebDatastore(
        orthanc.dicomweb_url, root / "cache", label_dir=root / "labels", retries=1, backoff=0.1, **kwargs
    )


def label_file(tmp_path, region, annotator="dr.test", comment="") -> str:
    path = tmp_path / f"label-{region}-{time.monotonic_ns()}.json"
    path.write_text(json.dumps({"region": region, "annotator": annotator, "comment": comment}))
    return str(path)


def find_instances(orthanc, **query) -> list:
    r = requests.post(
        f"{orthanc.url}/tools/find",
        auth=orthanc.auth,
        timeout=30,
        json={"Level": "Instance", "Query": query, "Expand": True},
    )
    r.raise_for_status()
    return r.json()


def test_lists_fetches_labels_and_writes_back(pacs, tmp_path, shared_data):
    store = datastore(pacs, tmp_path, writeback="stow")
    images = store.list_images()
    assert set(images) == set(pacs.stored) - {pacs.mammo}, "CR and DX: the MG image is filtered out"

    # archive labels from the headers, through the taxonomy
    rg1 = next(sop for sop, name in pacs.real.items() if name == "RG1_J2KI.dcm")
    assert store.get_image_info(rg1)["pacs_label"] == "Chest"
    wrong_knee, missing_chest = list(pacs.truth)[1], list(pacs.truth)[2]
    assert store.get_image_info(wrong_knee)["pacs_label"] == "Chest"
    assert store.get_image_info(missing_chest)["pacs_label"] == "Chest"  # from the StudyDescription

    # first use fetches with WADO-RS and caches; the J2K pixel data arrives as stored
    path = Path(store.get_image_uri(rg1))
    assert path.exists() and path.parent == tmp_path / "cache" / "images"
    original = pydicom.dcmread(shared_data / "dicom" / "RG1_J2KI.dcm")
    cached = pydicom.dcmread(path)
    assert cached.SOPInstanceUID == rg1 and cached.PixelData == original.PixelData
    assert cached.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID
    assert store.status()["pacs"]["cached_images"] == 1

    # a correction (Knee, archive says Chest) is stored locally and written back as a new instance
    before = {sop: stored_hash(pacs, sop) for sop in pacs.stored}
    assert before == {sop: h for sop, (_, h, _, _) in pacs.stored.items()}, "WADO-RS gives the uploaded bytes"
    store.save_label(wrong_knee, label_file(tmp_path, "Knee", comment="header says chest"), "final", {})
    store.save_label(missing_chest, label_file(tmp_path, "Chest"), "final", {})  # agrees: nothing sent
    store.writeback.wait(60)
    store.save_label(wrong_knee, label_file(tmp_path, "Knee", comment="header says chest"), "final", {})  # again
    assert store.get_label(wrong_knee, "final")["region"] == "Knee"
    log = [json.loads(line) for line in (tmp_path / "labels" / "writeback.jsonl").read_text().splitlines()]
    assert [(e["image"], e["status"], e["body_part"]) for e in log] == [
        (wrong_knee, "queued", "KNEE"),
        (wrong_knee, "stored", "KNEE"),
    ]
    log = log[1:]
    copies = find_instances(pacs, SOPInstanceUID=log[0]["new_sop"])
    assert len(copies) == 1 and pacs.instance_count() == len(pacs.stored) + 1
    copy = pydicom.dcmread(
        io.BytesIO(requests.get(f"{pacs.url}/instances/{copies[0]['ID']}/file", auth=pacs.auth, timeout=30).content)
    )
    assert copy.BodyPartExamined == "KNEE" and copy.SeriesDescription.startswith(WRITEBACK_MARKER)
    assert copy.SOPInstanceUID != wrong_knee and copy.SeriesInstanceUID != log[0]["series"]
    assert copy.StudyInstanceUID == log[0]["study"]
    # marked as derived: image type, a series number of its own, what changed, and the source instance
    original = pydicom.dcmread(pacs.paths[wrong_knee], stop_before_pixels=True)
    assert copy.ImageType[0] == "DERIVED" and original.ImageType[0] == "ORIGINAL"
    assert copy.SeriesNumber == original.SeriesNumber + 1000
    assert "BodyPartExamined corrected to KNEE" in copy.DerivationDescription
    assert wrong_knee in copy.DerivationDescription
    assert copy.SourceImageSequence[0].ReferencedSOPInstanceUID == wrong_knee
    assert copy.SourceImageSequence[0].ReferencedSOPClassUID == original.SOPClassUID
    # the decision log: who, when, what the archive and the model said, the decision, what was written where
    decisions = [json.loads(line) for line in (tmp_path / "labels" / "decisions.jsonl").read_text().splitlines()]
    knee = [d for d in decisions if d["image"] == wrong_knee and d["event"] != "written"]
    assert [d["event"] for d in knee] == ["label", "confirm"], "the same label again changes and writes nothing"
    first = knee[0]
    assert first["who"] == "dr.test" and first["time"].endswith("Z") and first["decision"]["region"] == "Knee"
    assert first["archive"]["region"] == "Chest" and first["archive"]["BodyPartExamined"] == "CHEST"
    assert first["patient"] == original.PatientID and first["previous"] is None
    assert first["written"] == {
        "mode": "stow",
        "to": pacs.dicomweb_url,
        "status": "queued",
        "sop": log[0]["new_sop"],
        "series": log[0]["new_series"],
        "study": log[0]["study"],
    }
    written = [d for d in decisions if d["event"] == "written"]
    assert [(w["decision"], w["status"], w["sop"]) for w in written] == [(first["id"], "stored", log[0]["new_sop"])]
    agrees = next(d for d in decisions if d["image"] == missing_chest)
    assert agrees["written"]["status"] == "none" and agrees["written"]["why"] == "the archive already names Chest"
    assert {sop: stored_hash(pacs, sop) for sop in pacs.stored} == before, "originals never change"

    # the new instance is never listed; labels and the cache survive a restart of both ends
    store.refresh()
    assert set(store.list_images()) == set(images)
    pacs.stop()
    pacs.start()
    again = datastore(pacs, tmp_path, writeback="stow")
    assert set(again.list_images()) == set(images)
    assert set(again.get_labeled_images()) == {wrong_knee, missing_chest}
    assert again.get_label(wrong_knee, "final")["comment"] == "header says chest"
    assert again.get_image_uri(rg1) == str(path)


def test_paged_listing_and_unknown_region_refused(pacs, tmp_path, monkeypatch):
    import lib.datastore.dicomweb as dicomweb

    monkeypatch.setattr(dicomweb, "PAGE_SIZE", 3)  # 7 CR instances in pages of 3, 3, 1; then DX and MG
    store = datastore(pacs, tmp_path, modalities="CR, DX, MG")
    assert set(store.list_images()) == set(pacs.stored)
    sop = list(pacs.truth)[0]
    with pytest.raises(RadiographError, match="unknown region 'Kneee'.*Knee"):
        store.save_label(sop, label_file(tmp_path, "Kneee"), "final", {})
    assert store.get_labeled_images() == []


def test_csv_export_instead_of_stow(pacs, tmp_path):
    store = datastore(pacs, tmp_path, writeback="csv")
    abdomen = list(pacs.truth)[3]  # header says FOOT
    store.save_label(abdomen, label_file(tmp_path, "Abdomen", annotator="ana"), "final", {})
    rows = list(csv.DictReader(open(tmp_path / "labels" / "writeback.csv", newline="")))
    assert [
        (r["SOPInstanceUID"], r["archive_BodyPartExamined"], r["BodyPartExamined"], r["annotator"]) for r in rows
    ] == [(abdomen, "FOOT", "ABDOMEN", "ana")]
    assert pacs.instance_count() == len(pacs.stored), "csv mode sends nothing to the PACS"


def test_wrong_credentials_name_the_url_and_the_problem(pacs, tmp_path):
    store = datastore(pacs, tmp_path, password="wrong")
    with pytest.raises(PACSError) as error:
        store._query()
    assert pacs.dicomweb_url in str(error.value) and "401" in str(error.value)
    assert store.list_images() == []  # nothing cached yet: an empty, working listing


def test_pacs_down_serves_the_cache_and_says_why(pacs, tmp_path):
    store = datastore(pacs, tmp_path, writeback="stow", list_ttl=0)
    images = store.list_images()
    wrong_knee = list(pacs.truth)[1]
    cached_sop = images[0]
    uncached_sop = next(i for i in images if i not in (cached_sop, wrong_knee))
    cached = store.get_image_uri(cached_sop)
    store.get_image_uri(wrong_knee)  # cached: the write-back below fails at STOW-RS itself, not at fetching
    pacs.stop(kill=True)  # a crash

    assert store.list_images() == images  # the last listing, from disk
    assert store.get_image_uri(cached_sop) == cached
    with pytest.raises(PACSError) as error:
        store.get_image_uri(uncached_sop)
    assert pacs.dicomweb_url in str(error.value) and "cannot connect" in str(error.value)
    assert "after 2 attempts" in str(error.value), "retries are bounded (retries=1)"
    assert store.status()["pacs"]["reachable"] is False

    # a correction made while the PACS is away is kept, logged as failed, and sent once it is back
    store.save_label(wrong_knee, label_file(tmp_path, "Knee"), "final", {})
    assert store.get_label(wrong_knee, "final")["region"] == "Knee"
    assert store.writeback.wait(60)
    assert [e["status"] for e in store.writeback.entries()] == ["queued", "failed"]
    assert f"{pacs.dicomweb_url}: STOW-RS: cannot connect" in store.writeback.entries()[-1]["error"]
    pacs.start()
    store.refresh()
    assert store.writeback.wait(60)
    assert [e["status"] for e in store.writeback.entries()] == ["queued", "failed", "queued", "stored"]
    assert pacs.instance_count() == len(pacs.stored) + 1
    assert store.status()["pacs"]["reachable"] is True


def test_server_against_orthanc_end_to_end(pacs, tmp_path, tiny_bundle):
    """MONAI Label server on Orthanc's DICOMweb URL: infer, correct, restart both, PACS down."""
    from radregion_harness import RadRegionServer

    state = tmp_path / "state"
    server = RadRegionServer(
        pacs.dicomweb_url,
        tiny_bundle,
        log_path=tmp_path / "server.log",
        extra_conf={"state_dir": state, "username": pacs.username, "writeback": "stow"},
        env={"MONAI_LABEL_DATASTORE_PASSWORD": pacs.password},
    )  # secrets never on the command line
    api = server.url
    images = sorted(set(pacs.stored) - {pacs.mammo})
    wrong_knee, abdomen = list(pacs.truth)[1], list(pacs.truth)[3]
    before = {sop: stored_hash(pacs, sop) for sop in pacs.stored}
    try:
        server.start()
        stats = requests.get(f"{api}/datastore/", params={"output": "stats"}, timeout=60).json()
        assert stats["total"] == len(images)

        from radregion.inference import Predictor

        local = dict(zip(images, Predictor(tiny_bundle, workers=0).predict([pacs.paths[s] for s in images])))
        for sop in images:  # through DICOMweb, the same answers as the engine on the uploaded files
            answer = requests.post(
                f"{api}/infer/radregion", params={"image": sop, "output": "json"}, timeout=300, headers=server.auth
            )
            assert answer.status_code == 200, answer.text
            result = answer.json()
            assert (result["region"], result["pacs_label"]) == (local[sop].region, local[sop].pacs_label)
            assert result["confidence"] == pytest.approx(local[sop].confidence, abs=1e-3)
        assert local[wrong_knee].pacs_label == "Chest" and local[abdomen].pacs_label == "Feet"
        image = requests.get(f"{api}/datastore/image", params={"image": images[0]}, timeout=60)
        assert image.status_code == 200 and pydicom.dcmread(io.BytesIO(image.content)).SOPInstanceUID == images[0]

        for sop, region in ((wrong_knee, "Knee"), (abdomen, "Abdomen")):
            answer = requests.put(
                f"{api}/datastore/label",
                params={"image": sop, "tag": "final"},
                timeout=120,
                headers=server.auth,
                files={"label": ("l.json", json.dumps({"region": region, "annotator": "e2e"}))},
            )
            assert answer.status_code == 200, answer.text
        bad = requests.put(
            f"{api}/datastore/label",
            params={"image": abdomen, "tag": "final"},
            timeout=60,
            headers=server.auth,
            files={"label": ("l.json", json.dumps({"region": "Abdomenn"}))},
        )
        assert bad.status_code == 422 and "Abdomen" in bad.text

        # restart both ends
        server.stop()
        pacs.stop()
        pacs.start()
        server.start()
        for sop, region in ((wrong_knee, "Knee"), (abdomen, "Abdomen")):
            label = requests.get(f"{api}/datastore/label", params={"label": sop, "tag": "final"}, timeout=60)
            assert label.status_code == 200 and label.json()["region"] == region
        stats = requests.get(f"{api}/datastore/", params={"output": "stats"}, timeout=60).json()
        assert stats["total"] == len(images), "written-back copies are not listed"
        train = requests.get(f"{api}/datastore/", params={"output": "train"}, timeout=60).json()
        assert sorted((Path(t["image"]).stem, t["region"]) for t in train) == sorted(
            [(wrong_knee, "Knee"), (abdomen, "Abdomen")]
        )
        log = [json.loads(line) for line in next(state.rglob("writeback.jsonl")).read_text().splitlines()]
        log = [e for e in log if e["status"] != "queued"]
        assert sorted((e["image"], e["status"], e["body_part"]) for e in log) == sorted(
            [(wrong_knee, "stored", "KNEE"), (abdomen, "stored", "ABDOMEN")]
        )
        for entry in log:
            copies = find_instances(pacs, SOPInstanceUID=entry["new_sop"])
            assert len(copies) == 1 and copies[0]["MainDicomTags"]["SOPInstanceUID"] == entry["new_sop"]
        assert pacs.instance_count() == len(pacs.stored) + 2
        assert {sop: stored_hash(pacs, sop) for sop in pacs.stored} == before, "originals never change"

        # PACS down: cached images and inference keep working; an uncached one is a clear 502
        uncached = images[-1]
        next(state.rglob(f"{uncached}.dcm")).unlink()
        pacs.stop(kill=True)
        assert requests.get(f"{api}/datastore/image", params={"image": images[0]}, timeout=60).status_code == 200
        answer = requests.post(
            f"{api}/infer/radregion", params={"image": images[0], "output": "json"}, timeout=300, headers=server.auth
        )
        assert answer.status_code == 200, answer.text
        down = requests.get(f"{api}/datastore/image", params={"image": uncached}, timeout=120)
        assert down.status_code == 502 and pacs.dicomweb_url in down.json()["detail"], down.text
        assert "cannot connect" in down.json()["detail"]

        # and a server (re)started while the PACS is down still serves what it has
        server.stop()
        server.start()
        deadline = time.monotonic() + 60
        while True:  # the listing is refreshed in the background: its failure shows up shortly
            stats = requests.get(f"{api}/datastore/", params={"output": "stats"}, timeout=60).json()
            assert stats["total"] == len(images), stats
            if stats["pacs"]["reachable"] is False or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert stats["pacs"]["reachable"] is False and pacs.dicomweb_url in stats["pacs"]["error"], stats
        assert requests.get(f"{api}/datastore/image", params={"image": images[0]}, timeout=60).status_code == 200
        label = requests.get(f"{api}/datastore/label", params={"label": wrong_knee, "tag": "final"}, timeout=60)
        assert label.status_code == 200 and label.json()["region"] == "Knee"
    finally:
        server.stop()
        print(server.log_tail())


class _TokenOrSlowPACS:
    """A minimal real DICOMweb endpoint on 127.0.0.1: QIDO answers [] to `Bearer good-token`, 401 otherwise;
    with `.delay` set it answers that many seconds late (a slow PACS)."""

    def __init__(self):
        import http.server
        import threading

        outer = self
        self.delay = 0.0
        self.requests = 0

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                outer.requests += 1
                time.sleep(outer.delay)
                if self.headers.get("Authorization") != "Bearer good-token":
                    self.send_response(401)
                    self.end_headers()
                    return
                body = b"[]"
                self.send_response(200)
                self.send_header("Content-Type", "application/dicom+json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                try:
                    self.wfile.write(body)
                except BrokenPipeError:
                    pass  # the client gave up waiting: that is the point of the slow case

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/dicom-web"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def token_pacs():
    server = _TokenOrSlowPACS()
    yield server
    server.close()


def test_bearer_token_and_a_slow_pacs(token_pacs, tmp_path):
    good = RadRegionDICOMwebDatastore(token_pacs.url, tmp_path / "a", token="good-token", retries=0)
    assert good._query() == {}
    bad = RadRegionDICOMwebDatastore(token_pacs.url, tmp_path / "b", token="bad-token", retries=0)
    with pytest.raises(PACSError, match="401.*token"):
        bad._query()

    token_pacs.delay = 2.0
    slow = RadRegionDICOMwebDatastore(
        token_pacs.url, tmp_path / "c", token="good-token", timeout=(1.0, 0.5), retries=2, backoff=0.05
    )
    token_pacs.requests = 0
    with pytest.raises(PACSError) as error:
        slow._query()
    assert token_pacs.url in str(error.value) and "timed out (3 attempts)" in str(error.value)
    assert token_pacs.requests == 3, "bounded retries"


# -- issue 14: a truthful PACS trail ------------------------------------------------------------------------------


def label_json(tmp_path, **fields) -> str:
    path = tmp_path / f"label-{time.monotonic_ns()}.json"
    path.write_text(json.dumps(fields))
    return str(path)


def live_copies(store, image) -> dict:
    """{region: write-back entry} of the copies of `image` that stand (stored, not superseded)."""
    return {region: e for (i, region), e in store.writeback.latest().items() if i == image and e["status"] == "stored"}


def test_knee_ankle_undo_knee_leaves_one_knee_decision_and_supersedes_the_ankle_copy(pacs, tmp_path):
    store = datastore(pacs, tmp_path, writeback="stow")
    wrong_knee = list(pacs.truth)[1]  # the archive says CHEST
    count = pacs.instance_count()

    store.save_label(wrong_knee, label_json(tmp_path, region="Knee", annotator="first"), "final", {})
    assert store.writeback.wait(60)
    store.save_label(wrong_knee, label_json(tmp_path, region="Ankle", annotator="second"), "final", {})
    assert store.writeback.wait(60)
    ankle = live_copies(store, wrong_knee)["Ankle"]
    assert set(live_copies(store, wrong_knee)) == {"Ankle"}, "the Ankle decision superseded the Knee copy"

    # undo (what the panel sends): the earlier label back, naming the decision it takes back and who undid it
    store.save_label(
        wrong_knee,
        label_json(tmp_path, region="Knee", annotator="first", undo_of="d-ankle", undone_by="second"),
        "final",
        {},
    )
    # and the annotator, shown the restored Knee label, confirms Knee
    store.save_label(wrong_knee, label_json(tmp_path, region="Knee", annotator="second"), "final", {})
    assert store.writeback.wait(60)

    decisions = [d for d in store.writeback.decisions(wrong_knee) if d["event"] != "written"]
    assert [(d["event"], d["decision"]["region"], d["who"]) for d in decisions] == [
        ("label", "Knee", "first"),
        ("label", "Ankle", "second"),
        ("undo", "Knee", "second"),
        ("confirm", "Knee", "second"),
    ]
    undo = decisions[2]
    assert undo["undo_of"] == "d-ankle" and undo["previous"]["region"] == "Ankle"
    assert [s["region"] for s in undo["supersedes"]] == ["Ankle"] and undo["supersedes"][0]["sop"] == ankle["new_sop"]
    assert undo["written"]["status"] == "stored" and "current again" in undo["written"]["why"]
    changes = [d for d in decisions if d["event"] != "confirm"]
    standing = store.writeback.current_decisions()[wrong_knee]
    assert (
        standing["decision"]["region"] == "Knee"
        and sum(1 for d in changes if d["decision"]["region"] == "Knee" and d["event"] == "label") == 1
    ), "one Knee decision; the undo restored it, the confirmation changed nothing"

    live = live_copies(store, wrong_knee)
    assert set(live) == {"Knee"}, f"one copy stands, the Knee one: {live}"
    ankle_line = store.writeback.latest()[(wrong_knee, "Ankle")]
    assert ankle_line["status"] == "superseded" and ankle_line["was"] == "stored"
    assert ankle_line["superseded_by"] == undo["id"]
    assert pacs.instance_count() == count + 2, "Knee stored once (restored, not stored again), Ankle once"
    # the superseded copy is still never listed as an image
    store.refresh()
    assert ankle["new_sop"] not in store.list_images() and live["Knee"]["new_sop"] not in store.list_images()

    # removing the label: recorded, and the Knee copy superseded too
    store.remove_label(wrong_knee, "final")
    last = store.writeback.decisions(wrong_knee)[-1]
    assert last["event"] == "remove" and last["decision"] is None and last["previous"]["region"] == "Knee"
    assert live_copies(store, wrong_knee) == {}


def test_undo_of_a_first_label_is_an_undo_by_the_one_who_undid_it(pacs, tmp_path):
    """The panel undoes an image's first label with DELETE ...&undo_of=&undone_by= (no earlier label to restore):
    the log names the undo and who undid it, and the copy the label had written is superseded."""
    store = datastore(pacs, tmp_path, writeback="stow")
    wrong_knee = list(pacs.truth)[1]  # the archive says CHEST
    store.save_label(wrong_knee, label_json(tmp_path, region="Knee", annotator="first"), "final", {})
    assert store.writeback.wait(60)
    knee = live_copies(store, wrong_knee)["Knee"]
    labelled = store.writeback.decisions(wrong_knee)[0]
    store.remove_label(wrong_knee, "final", sent={"undo_of": "d-knee", "undone_by": "first"})
    undo = store.writeback.decisions(wrong_knee)[-1]
    assert (undo["event"], undo["who"], undo["decision"], undo["undo_of"]) == ("undo", "first", None, "d-knee")
    assert undo["previous"]["region"] == "Knee" and undo["written"]["why"] == "label removed"
    assert undo["supersedes"] == [{"region": "Knee", "was": "stored", "sop": knee["new_sop"]}]
    assert store.writeback.current_decisions()[wrong_knee]["id"] == undo["id"] != labelled["id"]
    assert live_copies(store, wrong_knee) == {} and store.get_label(wrong_knee, "final") is None


def test_out_of_domain_findings_in_the_decision_log_and_the_csv(pacs, tmp_path):
    store = datastore(pacs, tmp_path, writeback="csv")
    image = list(pacs.truth)[3]  # header says FOOT
    store.save_label(
        image,
        label_json(tmp_path, region=None, out_of_domain=True, annotator="ana", comment="calibration phantom"),
        "final",
        {},
    )
    decision = store.writeback.decisions(image)[-1]
    assert decision["decision"]["out_of_domain"] is True and decision["who"] == "ana"
    assert decision["written"]["status"] == "exported" and decision["written"]["why"] == "out of domain"
    rows = list(csv.DictReader(open(tmp_path / "labels" / "writeback.csv", newline="")))
    assert [
        (r["SOPInstanceUID"], r["out_of_domain"], r["region"], r["archive_BodyPartExamined"], r["status"]) for r in rows
    ] == [(image, "true", "", "FOOT", "current")]

    store.save_label(image, label_json(tmp_path, region="Abdomen", annotator="ana"), "final", {})
    rows = list(csv.DictReader(open(tmp_path / "labels" / "writeback.csv", newline="")))
    assert [(r["out_of_domain"], r["region"], r["status"]) for r in rows] == [
        ("true", "", "superseded"),
        ("false", "Abdomen", "current"),
    ]

    stow = datastore(pacs, tmp_path / "stow", writeback="stow")  # a STOW-RS site: logged, nothing stored
    stow.save_label(image, label_json(tmp_path, out_of_domain=True, annotator="ana"), "final", {})
    assert stow.writeback.decisions(image)[-1]["written"]["why"] == "out of domain: no body part to write"
    assert pacs.instance_count() == len(pacs.stored)


def test_multi_region_archive_string_agrees_with_any_of_its_regions(pacs, tmp_path, tiny_bundle):
    """ "HAND WRIST" names two regions: a prediction of either agrees (the first one alone used to be compared)."""
    from radregion.inference import Predictor

    predictor = Predictor(tiny_bundle, workers=0)
    plain = next(iter(pacs.truth))
    region = next(iter(predictor.predict([pacs.paths[plain]]))).region
    taxonomy = predictor.taxonomy
    other = next(r for r in taxonomy.in_domain if r != region and taxonomy.body_part_term(r))
    named = f"{taxonomy.body_part_term(other)} {taxonomy.body_part_term(region) or region.upper()}"
    ds = pydicom.dcmread(pacs.paths[plain])
    ds.BodyPartExamined = named
    for keyword in ("StudyDescription", "SeriesDescription", "ProtocolName"):  # the body part alone decides
        if keyword in ds:
            delattr(ds, keyword)
    two = tmp_path / "two.dcm"
    ds.save_as(two)
    prediction = next(iter(predictor.predict([two])))
    assert prediction.region == region and prediction.pacs_label == other
    assert prediction.pacs_labels == (other, region) and prediction.agrees_with_pacs is True

    store = datastore(pacs, tmp_path)
    assert store.taxonomy.archive_label({"BodyPartExamined": "HAND WRIST"}).regions == ("Hand", "Wrist")
    from lib.infers.radregion import to_result

    answer = to_result(prediction, predictor)
    assert answer["pacs_labels"] == [other, region] and answer["agrees_with_pacs"] is True

    # the disagreement queue agrees too: the image is not a suspected archive error, before and after a save
    from lib.activelearning.disagreement import Disagreement
    from lib.scores import ScoreTable

    disagrees = next(iter(predictor.predict([pacs.paths[list(pacs.truth)[1]]])))  # archive CHEST
    table = ScoreTable(predictor.version, predictor.regions)
    table.add([prediction, disagrees], ["two", "one"])
    for kept in (table, ScoreTable.load(table.save(tmp_path / "scores.npz"))):
        assert kept.pacs_labels[0] == (other, region) and kept.agrees_with_archive(0) is True
        queued = [kept.ids[k] for k, _ in Disagreement(None).rank(kept, [0, 1], None)]
        assert queued == (["one"] if disagrees.region != "Chest" else []), queued


def test_panel_on_a_pacs_knee_ankle_undo_knee_the_admin_export_and_a_pacs_that_is_down(pacs, tmp_path, tiny_bundle):
    """Real server on Orthanc, driven by the panel's RadRegionLib: Knee -> Ankle -> undo -> Knee ends with one
    standing Knee decision and the Ankle copy superseded; the admin exports the log; infer while the PACS is down
    (on a server started while it is down) is a 502 with the PACS's reason."""
    from radregion_harness import RadRegionServer

    sys.path.insert(0, str(REPO / "slicer_module" / "RadRegion"))
    from RadRegionLib import RadRegionClient, ReviewSession

    state = tmp_path / "state"
    secret = {"MONAI_LABEL_DATASTORE_PASSWORD": pacs.password}  # never on the command line
    server = RadRegionServer(
        pacs.dicomweb_url,
        tiny_bundle,
        log_path=tmp_path / "server.log",
        extra_conf={"state_dir": state, "username": pacs.username, "writeback": "stow"},
        env=secret,
    )
    api, auth = server.url, server.auth
    wrong_knee = list(pacs.truth)[1]  # the archive says CHEST
    count = pacs.instance_count()
    try:
        server.start()
        first = ReviewSession(RadRegionClient(api), str(tmp_path / "first"), annotator="first")
        second = ReviewSession(RadRegionClient(api), str(tmp_path / "second"), annotator="second")
        first.connect()
        second.connect()
        deadline = time.monotonic() + 240  # the model's answer in the log comes from the scores
        while time.monotonic() < deadline:
            scores = first.client.info()["models"]["radregion"]["scores"]
            if scores["images"] + scores["unreadable"] >= first.client.stats()["total"]:
                break
            time.sleep(2)

        first.open_case(wrong_knee)
        first.choose("Knee")
        first.submit(load_next=False)
        case = second.open_case(wrong_knee)
        assert case.existing["region"] == "Knee" and case.existing["annotator"] == "first"
        second.choose("Ankle")
        with pytest.raises(ValueError, match="already labelled Knee by first"):
            second.submit(load_next=False)
        second.submit(load_next=False)
        second.undo()
        assert second.client.get_label(wrong_knee)["annotator"] == "first", "undo restored the earlier label"
        second.choose("Knee")
        second.submit(load_next=False)

        def export(**params):
            answer = requests.get(f"{api}/radregion/decisions", params=params, headers=auth, timeout=60)
            assert answer.status_code == 200, answer.text
            return [json.loads(line) for line in answer.text.splitlines()]

        deadline = time.monotonic() + 120
        while sum(1 for d in export(image=wrong_knee) if d["event"] == "written") < 2 and time.monotonic() < deadline:
            time.sleep(1)
        log = export(image=wrong_knee)
        decisions = [d for d in log if d["event"] != "written"]
        assert [(d["event"], d["decision"]["region"], d["who"]) for d in decisions] == [
            ("label", "Knee", "first"),
            ("label", "Ankle", "second"),
            ("undo", "Knee", "second"),
            ("confirm", "Knee", "second"),
        ]
        assert all(d["model"] and d["model"]["region"] and d["model"]["model_version"] for d in decisions)
        assert all(d["archive"]["region"] == "Chest" for d in decisions)
        assert [(w["status"], w["to"]) for w in log if w["event"] == "written"] == [("stored", pacs.dicomweb_url)] * 2
        assert decisions[2]["supersedes"][0]["region"] == "Ankle"
        standing = export(image=wrong_knee, current="true")
        assert len(standing) == 1 and standing[0]["decision"]["region"] == "Knee", standing
        steps = [json.loads(line) for line in next(state.rglob("writeback.jsonl")).read_text().splitlines()]
        latest = {e["region"]: e for e in steps if e["image"] == wrong_knee}
        assert latest["Ankle"]["status"] == "superseded" and latest["Knee"]["status"] == "stored"
        assert pacs.instance_count() == count + 2
        # the log names patients: the token is needed even on loopback
        assert requests.get(f"{api}/radregion/decisions", timeout=60).status_code == 401

        # an out-of-domain finding: in the decision log and in the batch audit's CSV
        phantom = list(pacs.truth)[3]
        first.open_case(phantom)
        first.mark_out_of_domain()
        first.submit(comment="calibration phantom", load_next=False)
        finding = export(image=phantom)[-1]
        assert finding["event"] == "label" and finding["decision"]["out_of_domain"] is True
        assert finding["who"] == "first" and finding["decision"]["comment"] == "calibration phantom"
        audit = requests.post(
            f"{api}/batch/infer/radregion", params={"images": "all", "run_sync": "true"}, headers=auth, timeout=300
        )
        assert audit.status_code == 200, audit.text
        rows = {r["image"]: r for r in csv.DictReader(open(audit.json()["csv"], newline=""))}
        assert rows[phantom]["out_of_domain"] == "true"
        # undoing the image's first label removes it: an undo, by the one who undid it
        first.undo()
        assert first.client.get_label(phantom) is None
        undone = export(image=phantom)[-1]
        assert (undone["event"], undone["who"], undone["decision"]) == ("undo", "first", None), undone
        assert undone["undo_of"] and undone["previous"]["out_of_domain"] is True

        # an id the PACS does not have is a 404; the PACS down is a 502 that says why
        answer = requests.post(
            f"{api}/infer/radregion", params={"image": "1.2.3.4.5.6.7", "output": "json"}, headers=auth, timeout=120
        )
        assert answer.status_code == 404, answer.text
        server.stop()
        pacs.stop(kill=True)
        fresh = RadRegionServer(
            pacs.dicomweb_url,
            tiny_bundle,
            log_path=tmp_path / "fresh.log",
            extra_conf={"state_dir": tmp_path / "fresh", "username": pacs.username},
            env=secret,
        )
        try:
            fresh.start()  # started while the PACS is down: nothing listed, nothing cached
            answer = requests.post(
                f"{fresh.url}/infer/radregion",
                params={"image": wrong_knee, "output": "json"},
                headers=fresh.auth,
                timeout=300,
            )
            assert answer.status_code == 502, answer.text
            assert pacs.dicomweb_url in answer.json()["detail"] and "cannot connect" in answer.json()["detail"]
        finally:
            fresh.stop()
            print(fresh.log_tail())
    finally:
        server.stop()
        pacs.start()
        print(server.log_tail())
