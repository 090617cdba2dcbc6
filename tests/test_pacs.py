"""Issue 8: radiographs from a real Orthanc over DICOMweb; labels kept locally; corrections written back safely."""

import csv
import hashlib
import json
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

# (true region, photometric, header) for DICOM copies of shared PNGs; some headers deliberately wrong or missing.
PNG_CASES = [
    ("Knee", "MONOCHROME2", {"body_part": "KNEE", "study_description": "XR KNEE 2 VIEWS"}),
    ("Knee", "MONOCHROME1", {"body_part": "CHEST", "study_description": "XR CHEST PA"}),  # wrong
    ("Chest", "MONOCHROME1", {"study_description": "CHEST PA", "series_description": "PA"}),  # no BodyPart
    ("Abdomen", "MONOCHROME2", {"body_part": "FOOT", "series_description": "AP"}),  # wrong
    ("Hand", "MONOCHROME2", {"body_part": "HAND", "series_description": "HAND PA"}),
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
        path = array_to_dicom(pixels, folder / f"case{i}.dcm", photometric=photometric, modality="CR",
                              patient_id=f"PACS{i}", **header)
        truth[pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID] = region
    mammo = array_to_dicom(np.zeros((64, 64), np.uint8), folder / "mammo.dcm", modality="MG", body_part="BREAST")
    return {"truth": truth, "mammo": pydicom.dcmread(mammo, stop_before_pixels=True).SOPInstanceUID,
            "files": sorted(folder.glob("*.dcm"))}


@pytest.fixture
def pacs(orthanc, tmp_path, unifesp, real_dicoms):
    """Orthanc filled with the real J2K CR files and the PNG copies; .stored = {SOP: (orthanc id, file sha256)}."""
    made = png_dicoms(tmp_path / "made", unifesp)
    orthanc.stored = {}
    for path in list(real_dicoms) + made["files"]:
        answer = orthanc.upload(path)
        sop = pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID
        orthanc.stored[sop] = (answer["ID"], sha256(Path(path).read_bytes()))
    orthanc.truth = made["truth"]
    orthanc.mammo = made["mammo"]
    orthanc.real = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID: p.name for p in real_dicoms}
    return orthanc


def stored_hash(orthanc, sop) -> str:
    """Bytes of the instance as Orthanc keeps it."""
    r = requests.get(f"{orthanc.url}/instances/{orthanc.stored[sop][0]}/file", auth=orthanc.auth, timeout=30)
    r.raise_for_status()
    return sha256(r.content)


def datastore(orthanc, root: Path, **kwargs) -> RadRegionDICOMwebDatastore:
    kwargs.setdefault("username", orthanc.username)
    kwargs.setdefault("password", orthanc.password)
    return RadRegionDICOMwebDatastore(orthanc.dicomweb_url, root / "cache", label_dir=root / "labels",
                                      retries=1, backoff=0.1, **kwargs)


def label_file(tmp_path, region, annotator="dr.test", comment="") -> str:
    path = tmp_path / f"label-{region}-{time.monotonic_ns()}.json"
    path.write_text(json.dumps({"region": region, "annotator": annotator, "comment": comment}))
    return str(path)


def find_instances(orthanc, **query) -> list:
    r = requests.post(f"{orthanc.url}/tools/find", auth=orthanc.auth, timeout=30,
                      json={"Level": "Instance", "Query": query, "Expand": True})
    r.raise_for_status()
    return r.json()


def test_lists_fetches_labels_and_writes_back(pacs, tmp_path):
    store = datastore(pacs, tmp_path, writeback="stow")
    images = store.list_images()
    assert set(images) == set(pacs.stored) - {pacs.mammo}, "CR only: the MG image is filtered out"

    # archive labels from the headers, through the taxonomy
    rg1 = next(sop for sop, name in pacs.real.items() if name == "RG1_J2KI.dcm")
    assert store.get_image_info(rg1)["pacs_label"] == "Chest"
    wrong_knee, missing_chest = list(pacs.truth)[1], list(pacs.truth)[2]
    assert store.get_image_info(wrong_knee)["pacs_label"] == "Chest"
    assert store.get_image_info(missing_chest)["pacs_label"] == "Chest"  # from the StudyDescription

    # first use fetches with WADO-RS and caches; the J2K pixel data arrives as stored
    path = Path(store.get_image_uri(rg1))
    assert path.exists() and path.parent == tmp_path / "cache" / "images"
    original = pydicom.dcmread(REPO.parent / "shared" / "data" / "dicom" / "RG1_J2KI.dcm")
    cached = pydicom.dcmread(path)
    assert cached.SOPInstanceUID == rg1 and cached.PixelData == original.PixelData
    assert cached.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID
    assert store.status()["pacs"]["cached_images"] == 1

    # a correction (Knee, archive says Chest) is stored locally and written back as a new instance
    before = {sop: stored_hash(pacs, sop) for sop in pacs.stored}
    assert before == {sop: h for sop, (_, h) in pacs.stored.items()}
    store.save_label(wrong_knee, label_file(tmp_path, "Knee", comment="header says chest"), "final", {})
    store.save_label(missing_chest, label_file(tmp_path, "Chest"), "final", {})  # agrees: nothing sent
    store.writeback.wait(60)
    store.save_label(wrong_knee, label_file(tmp_path, "Knee", comment="header says chest"), "final", {})  # again
    assert store.get_label(wrong_knee, "final")["region"] == "Knee"
    log = [json.loads(line) for line in (tmp_path / "labels" / "writeback.jsonl").read_text().splitlines()]
    assert [(e["image"], e["status"], e["body_part"]) for e in log] == [
        (wrong_knee, "queued", "KNEE"), (wrong_knee, "stored", "KNEE")]
    log = log[1:]
    copies = find_instances(pacs, SOPInstanceUID=log[0]["new_sop"])
    assert len(copies) == 1 and pacs.instance_count() == len(pacs.stored) + 1
    copy = pydicom.dcmread(__import__("io").BytesIO(requests.get(
        f"{pacs.url}/instances/{copies[0]['ID']}/file", auth=pacs.auth, timeout=30).content))
    assert copy.BodyPartExamined == "KNEE" and copy.SeriesDescription.startswith(WRITEBACK_MARKER)
    assert copy.SOPInstanceUID != wrong_knee and copy.SeriesInstanceUID != log[0]["series"]
    assert copy.StudyInstanceUID == log[0]["study"]
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


def test_unknown_region_is_refused_with_the_valid_names(pacs, tmp_path):
    store = datastore(pacs, tmp_path)
    sop = list(pacs.truth)[0]
    with pytest.raises(RadiographError, match="unknown region 'Kneee'.*Knee"):
        store.save_label(sop, label_file(tmp_path, "Kneee"), "final", {})
    assert store.get_labeled_images() == []


def test_csv_export_instead_of_stow(pacs, tmp_path):
    store = datastore(pacs, tmp_path, writeback="csv")
    abdomen = list(pacs.truth)[3]  # header says FOOT
    store.save_label(abdomen, label_file(tmp_path, "Abdomen", annotator="ana"), "final", {})
    rows = list(csv.DictReader(open(tmp_path / "labels" / "writeback.csv", newline="")))
    assert [(r["SOPInstanceUID"], r["archive_BodyPartExamined"], r["BodyPartExamined"], r["annotator"])
            for r in rows] == [(abdomen, "FOOT", "ABDOMEN", "ana")]
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
    cached_sop, uncached_sop = images[0], images[1]
    cached = store.get_image_uri(cached_sop)
    wrong_knee = list(pacs.truth)[1]
    pacs.stop()

    assert store.list_images() == images  # the last listing, from disk
    assert store.get_image_uri(cached_sop) == cached
    started = time.monotonic()
    with pytest.raises(PACSError) as error:
        store.get_image_uri(uncached_sop)
    assert pacs.dicomweb_url in str(error.value) and "cannot connect" in str(error.value)
    assert time.monotonic() - started < 20, "bounded retries"
    assert store.status()["pacs"]["reachable"] is False

    # a correction made while the PACS is away is kept, logged as failed, and sent once it is back
    store.save_label(wrong_knee, label_file(tmp_path, "Knee"), "final", {})
    assert store.get_label(wrong_knee, "final")["region"] == "Knee"
    assert store.writeback.wait(60)
    assert [e["status"] for e in store.writeback.entries()] == ["queued", "failed"]
    assert "cannot connect" in store.writeback.entries()[-1]["error"]
    pacs.start()
    store.refresh()
    assert store.writeback.wait(60)
    assert [e["status"] for e in store.writeback.entries()] == ["queued", "failed", "queued", "stored"]
    assert pacs.instance_count() == len(pacs.stored) + 1
    assert store.status()["pacs"]["reachable"] is True


def test_server_against_orthanc_end_to_end(pacs, tmp_path, tiny_bundle):
    """MONAI Label server on Orthanc's DICOMweb URL: infer, correct, restart both, PACS down."""
    from fixtures.server import RadRegionServer

    state = tmp_path / "state"
    server = RadRegionServer(pacs.dicomweb_url, tiny_bundle, log_path=tmp_path / "server.log", extra_conf={
        "state_dir": state, "username": pacs.username, "password": pacs.password, "writeback": "stow"})
    api = server.url
    images = sorted(set(pacs.stored) - {pacs.mammo})
    wrong_knee, abdomen = list(pacs.truth)[1], list(pacs.truth)[3]
    before = {sop: stored_hash(pacs, sop) for sop in pacs.stored}
    try:
        server.start()
        stats = requests.get(f"{api}/datastore/", params={"output": "stats"}, timeout=60).json()
        assert stats["total"] == len(images)

        for sop in images:
            answer = requests.post(f"{api}/infer/radregion", params={"image": sop, "output": "json"}, timeout=300)
            assert answer.status_code == 200, answer.text
            result = answer.json()
            expected_pacs = {wrong_knee: "Chest", abdomen: "Feet"}.get(sop)
            if expected_pacs:
                assert result["pacs_label"] == expected_pacs
            assert result["region"] in requests.get(f"{api}/info/", timeout=60).json()["models"]["radregion"]["labels"]
        image = requests.get(f"{api}/datastore/image", params={"image": images[0]}, timeout=60)
        assert image.status_code == 200 and pydicom.dcmread(__import__("io").BytesIO(image.content)).SOPInstanceUID \
            == images[0]

        for sop, region in ((wrong_knee, "Knee"), (abdomen, "Abdomen")):
            answer = requests.put(f"{api}/datastore/label", params={"image": sop, "tag": "final"}, timeout=120,
                                  files={"label": ("l.json", json.dumps({"region": region, "annotator": "e2e"}))})
            assert answer.status_code == 200, answer.text
        bad = requests.put(f"{api}/datastore/label", params={"image": abdomen, "tag": "final"}, timeout=60,
                           files={"label": ("l.json", json.dumps({"region": "Abdomenn"}))})
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
        log = [json.loads(line) for line in next(state.rglob("writeback.jsonl")).read_text().splitlines()]
        log = [e for e in log if e["status"] != "queued"]
        assert sorted((e["image"], e["status"], e["body_part"]) for e in log) == sorted(
            [(wrong_knee, "stored", "KNEE"), (abdomen, "stored", "ABDOMEN")])
        for entry in log:
            copies = find_instances(pacs, SOPInstanceUID=entry["new_sop"])
            assert len(copies) == 1 and copies[0]["MainDicomTags"]["SOPInstanceUID"] == entry["new_sop"]
        assert pacs.instance_count() == len(pacs.stored) + 2
        assert {sop: stored_hash(pacs, sop) for sop in pacs.stored} == before, "originals never change"

        # PACS down: cached images and inference keep working; an uncached one is a clear 502
        uncached = images[-1]
        next(state.rglob(f"{uncached}.dcm")).unlink()
        pacs.stop()
        assert requests.get(f"{api}/datastore/image", params={"image": images[0]}, timeout=60).status_code == 200
        answer = requests.post(f"{api}/infer/radregion", params={"image": images[0], "output": "json"}, timeout=300)
        assert answer.status_code == 200, answer.text
        down = requests.get(f"{api}/datastore/image", params={"image": uncached}, timeout=120)
        assert down.status_code == 502 and pacs.dicomweb_url in down.json()["detail"], down.text
    finally:
        server.stop()
        print(server.log_tail())
