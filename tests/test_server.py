"""The MONAI Label app, end to end: a real `monailabel start_server` on 127.0.0.1 with real radiographs.

Tests run in file order on one server (module scope): scores and strategies before any label, then labels,
training, bad files, restarts and concurrent clients.
"""

import json
import shutil
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests

from fixtures.server import EXTENSIONLESS_DICOM
from radregion_harness import AUTH, start_server

SWAP = {"Chest": "Knee", "Knee": "Chest", "Abdomen": "Pelvis", "Pelvis": "Abdomen"}
RESULT_KEYS = {
    "prediction",
    "region",
    "confidence",
    "ood_score",
    "out_of_domain",
    "pacs_label",
    "agrees_with_pacs",
    "model_version",
}


def infer(server, image_id, expect=200):
    answer = requests.post(
        f"{server.url}/infer/radregion", headers=AUTH, params={"image": image_id, "output": "json"}, timeout=120
    )
    assert answer.status_code == expect, answer.text
    return answer.json()


def save_label(server, image_id, label, expect=200):
    answer = requests.put(
        f"{server.url}/datastore/label",
        headers=AUTH,
        params={"image": image_id, "tag": "final"},
        files={"label": ("label.json", json.dumps(label), "application/json")},
        timeout=60,
    )
    assert answer.status_code == expect, answer.text
    return answer.json()


def read_label(server, image_id):
    answer = requests.get(f"{server.url}/datastore/label", params={"label": image_id, "tag": "final"}, timeout=60)
    assert answer.status_code == 200, answer.text
    return answer.json()


def model_info(server):
    return requests.get(f"{server.url}/info/", timeout=60).json()["models"]["radregion"]


def wait_for_scores(server, timeout=240):
    """The scoring method runs in a background process after start and after each model change."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = model_info(server)
        total = requests.get(f"{server.url}/datastore/", params={"output": "stats"}, timeout=60).json()["total"]
        scores = info["scores"]
        if scores["model_version"] == info["model_version"] and scores["images"] + scores["unreadable"] >= total:
            return info
        requests.post(f"{server.url}/scoring/radregion_scores", headers=AUTH, timeout=60)  # 429 while one runs: fine
        time.sleep(1)
    raise AssertionError(f"scores not ready after {timeout} s; log:\n{server.log_tail()}")


def next_image(server, strategy):
    answer = requests.post(f"{server.url}/activelearning/{strategy}", headers=AUTH, json={}, timeout=60)
    assert answer.status_code == 200, answer.text
    return answer.json()


@pytest.fixture(scope="module")
def expected(radregion_server, tiny_bundle):
    """What the engine itself says about every studies file (the server must agree)."""
    from radregion.inference import Predictor

    files = sorted(p for p in radregion_server.studies.iterdir() if p.is_file() and not p.name.startswith("."))
    files = [p for p in files if p.suffix in (".png", ".dcm") or p.name == EXTENSIONLESS_DICOM]
    predictor = Predictor(tiny_bundle, workers=0)
    return {(p.stem if p.suffix else p.name): pred for p, pred in zip(files, predictor.predict(files))}


def test_info_lists_the_bundle_regions_and_version(radregion_server, tiny_bundle):
    from radregion.bundle import load_bundle

    bundle = load_bundle(tiny_bundle)
    info = requests.get(f"{radregion_server.url}/info/", timeout=60).json()
    model = info["models"]["radregion"]
    assert model["labels"] == bundle.regions
    assert model["model_version"] == bundle.version
    assert model["type"] == "classification"
    assert set(info["strategies"]) == {"uncertain", "disagreement", "ood", "diverse", "random"}
    assert "radregion" in info["trainers"] and "radregion_scores" in info["scoring"]
    # the shipped model is copied, never written: training publishes into <studies>/.radregion/model
    assert (radregion_server.studies / ".radregion" / "model" / "bundle.json").is_file()


def test_datastore_lists_png_dcm_and_extensionless_dicom(radregion_server):
    listing = requests.get(f"{radregion_server.url}/datastore/", params={"output": "all"}, timeout=60).json()
    ids = set(listing["objects"])
    assert set(radregion_server.truth) <= ids
    assert {"RG1_J2KI", "RG3_J2KI", EXTENSIONLESS_DICOM} <= ids
    assert len(ids) == len(radregion_server.truth) + 3  # nothing else (no .radregion, labels, datastore json)


def test_infer_png_matches_the_engine(radregion_server, expected):
    image_id = next(iter(radregion_server.truth))
    result = infer(radregion_server, image_id)
    assert RESULT_KEYS <= set(result)
    engine = expected[image_id]
    scores = [p["score"] for p in result["prediction"]]
    assert scores == sorted(scores, reverse=True) and abs(sum(scores) - 1) < 1e-3
    assert result["prediction"][0]["label"] == result["region"] == engine.region
    assert result["confidence"] == pytest.approx(engine.confidence, abs=1e-4)
    assert result["ood_score"] == pytest.approx(engine.ood_score, rel=1e-3)
    assert result["pacs_label"] is None and result["agrees_with_pacs"] is None  # a PNG has no header
    assert result["model_version"] == model_info(radregion_server)["model_version"]
    labels = model_info(radregion_server)["labels"]
    assert all(labels[p["idx"]] == p["label"] for p in result["prediction"])


@pytest.mark.parametrize("image_id", ["RG1_J2KI", EXTENSIONLESS_DICOM])
def test_infer_real_jpeg2000_dicom(radregion_server, expected, image_id):
    result = infer(radregion_server, image_id)
    engine = expected[image_id]
    assert result["region"] == engine.region
    assert result["pacs_label"] == engine.pacs_label
    if image_id == "RG1_J2KI":
        assert result["pacs_label"] == "Chest"  # BodyPartExamined CHEST
    assert result["agrees_with_pacs"] == (result["region"] == result["pacs_label"])


def test_strategies_hand_out_unlabelled_images_in_their_order(radregion_server, expected):
    wait_for_scores(radregion_server)
    ids = sorted(expected)
    served = []

    def walk(strategy, order, n):
        """The queue's order, skipping what any queue handed out before (unless nothing else is left)."""
        got, want = [], []
        for _ in range(n):
            got.append(next_image(radregion_server, strategy)["id"])
            want.append(next((i for i in order if i not in served), order[0]))
            served.append(want[-1])
        assert got == want, strategy

    def margin(p):
        top = sorted(p.probabilities.values())
        return top[-1] - top[-2]

    uncertain = sorted(ids, key=lambda i: (margin(expected[i]), i))
    walk("uncertain", uncertain, 4)
    ood = sorted(ids, key=lambda i: (-expected[i].ood_score, i))
    walk("ood", ood, 4)
    assert set(served[4:]).isdisjoint(served[:4])  # ood skipped what uncertain had just handed out
    disagree = sorted(
        (i for i in ids if expected[i].pacs_label and expected[i].pacs_label != expected[i].region),
        key=lambda i: (-expected[i].confidence, i),
    )
    if disagree:
        walk("disagreement", disagree, len(disagree))
    assert all(
        expected[i].pacs_label is None or expected[i].pacs_label == expected[i].region for i in set(ids) - set(disagree)
    )
    # diverse: picks among the most uncertain and never the same image twice in a row
    diverse = [next_image(radregion_server, "diverse")["id"] for _ in range(5)]
    assert len(set(diverse)) == 5 and set(diverse) <= set(uncertain[:50])
    first = next_image(radregion_server, "random")
    assert first["id"] in ids


def test_save_and_read_back_labels(radregion_server):
    image_id = next(iter(radregion_server.truth))
    save_label(radregion_server, image_id, {"region": "Abdomen", "annotator": "dr-a", "comment": "checked"})
    label = read_label(radregion_server, image_id)
    assert (label["region"], label["annotator"], label["comment"], label["out_of_domain"]) == (
        "Abdomen",
        "dr-a",
        "checked",
        False,
    )
    save_label(radregion_server, "RG3_J2KI", {"region": "Others"})
    assert read_label(radregion_server, "RG3_J2KI")["out_of_domain"] is True  # `Others` is out of domain
    stats = requests.get(f"{radregion_server.url}/datastore/", params={"output": "stats"}, timeout=60).json()
    assert stats["completed"] == 2
    # labelled images leave the queues
    for _ in range(6):
        assert next_image(radregion_server, "random")["id"] not in (image_id, "RG3_J2KI")


def test_unknown_region_is_422_with_the_valid_names(radregion_server):
    image_id = list(radregion_server.truth)[1]
    answer = save_label(radregion_server, image_id, {"region": "Elbw"}, expect=422)
    assert "Elbw" in answer["detail"] and "Elbow" in answer["valid_regions"]
    assert save_label(radregion_server, image_id, "not json", expect=422)["detail"]
    answer = requests.put(
        f"{radregion_server.url}/datastore/label",
        headers=AUTH,
        params={"image": image_id, "tag": "final"},
        files={"label": ("label.json", b"{oops")},
        timeout=60,
    )
    assert answer.status_code == 422 and "not JSON" in answer.json()["detail"]
    assert (
        requests.get(
            f"{radregion_server.url}/datastore/label", params={"label": image_id, "tag": "final"}, timeout=60
        ).status_code
        == 404
    )  # nothing half-saved
    assert save_label(radregion_server, "no-such-image", {"region": "Chest"}, expect=404)["detail"]


def test_train_publishes_a_new_head_that_infer_uses(radregion_server, tiny_bundle, unifesp):
    from radregion.bundle import image_ids, load_bundle

    regions = load_bundle(tiny_bundle).regions
    before = model_info(radregion_server)["model_version"]
    answer = requests.post(
        f"{radregion_server.url}/train/radregion", headers=AUTH, params={"run_sync": "true"}, timeout=300
    )
    assert answer.status_code == 422 and "at least" in answer.json()["detail"]  # 1 in-domain label: refused
    assert model_info(radregion_server)["model_version"] == before
    for image_id, region in radregion_server.truth.items():
        save_label(radregion_server, image_id, {"region": region, "annotator": "trainer"})
    answer = requests.post(
        f"{radregion_server.url}/train/radregion", headers=AUTH, params={"run_sync": "true"}, timeout=300
    )
    assert answer.status_code == 200, answer.text
    result = answer.json()
    assert result["published"] is True, result
    assert result["validation"]["new"] >= result["validation"]["current"]
    assert result["n_images"]["confirmed"] == len(radregion_server.truth)
    # a confirmed image the model was trained on replaces its stored row (known by file content, on any device)
    studies = [unifesp / "images" / f"{i}.png" for i in radregion_server.truth]
    studies_in_head = np.isin(image_ids(studies), load_bundle(tiny_bundle).training_set().images)
    assert studies_in_head.sum() > 0  # the fixture's studies share an image with the tiny head's training set
    assert result["n_images"]["stored_replaced_by_confirmed"] == studies_in_head.sum()
    info = model_info(radregion_server)
    assert info["model_version"] == result["model_version"] != before
    assert info["labels"] == regions  # every region of the model, not only the confirmed ones
    hits = 0
    for image_id, region in radregion_server.truth.items():
        answer = infer(radregion_server, image_id)
        assert answer["model_version"] == result["model_version"]
        hits += answer["region"] == region
    assert hits >= len(radregion_server.truth) - 1
    stats = requests.get(f"{radregion_server.url}/info/", timeout=60).json()["train_stats"]["radregion"]
    assert stats["model_version"] == result["model_version"] and stats["previous_version"] == before
    wait_for_scores(radregion_server)  # strategies follow the new model
    assert next_image(radregion_server, "uncertain")["model_version"] == result["model_version"]


def test_train_on_swapped_labels_publishes_only_when_not_worse(radregion_server, tiny_bundle):
    """Swapped regions (Chest <-> Knee, Abdomen <-> Pelvis) on every image: published only if the two checks say
    not worse, and then the confirmed labels win on their images while every region stays.
    (tests/test_server_faults.py has labels that make the model worse, and the model kept.)"""
    from radregion.bundle import load_bundle

    before = model_info(radregion_server)["model_version"]
    for image_id, region in radregion_server.truth.items():
        save_label(radregion_server, image_id, {"region": SWAP[region], "annotator": "trainer"})
    answer = requests.post(
        f"{radregion_server.url}/train/radregion", headers=AUTH, params={"run_sync": "true"}, timeout=300
    )
    assert answer.status_code == 200, answer.text
    result = answer.json()
    not_worse = (
        result["validation"]["new"] >= result["validation"]["current"]
        and result["heldout"]["new"] >= result["heldout"]["current"] - 0.01
    )
    assert result["published"] is not_worse and result["status"] == ("published" if not_worse else "kept"), result
    info = model_info(radregion_server)
    assert info["model_version"] == (result["model_version"] if not_worse else before)
    assert info["labels"] == load_bundle(tiny_bundle).regions
    if not_worse:
        hits = sum(infer(radregion_server, i)["region"] == SWAP[r] for i, r in radregion_server.truth.items())
        assert hits >= len(radregion_server.truth) - 1  # the confirmed labels win on their own images
    stats = requests.get(f"{radregion_server.url}/info/", timeout=60).json()["train_stats"]["radregion"]
    assert stats["status"] == result["status"] and stats["reason"] == result["reason"]


def test_batch_run_writes_the_audit_csv(radregion_server):
    import csv

    answer = requests.post(
        f"{radregion_server.url}/batch/infer/radregion",
        headers=AUTH,
        params={"images": "all", "run_sync": "true"},
        timeout=300,
    )
    assert answer.status_code == 200, answer.text
    result = answer.json()
    with open(result["csv"], newline="") as f:
        rows = list(csv.DictReader(f))
    from radregion.audit.writer import AUDIT_COLUMNS

    assert tuple(rows[0]) == AUDIT_COLUMNS
    by_id = {row["image"]: row for row in rows}
    assert set(by_id) == set(radregion_server.truth) | {"RG1_J2KI", "RG3_J2KI", EXTENSIONLESS_DICOM}
    for image_id, region in radregion_server.truth.items():
        assert by_id[image_id]["given_label"] == SWAP[region]  # the confirmed label wins
    assert by_id["RG1_J2KI"]["given_label"] == "Chest"  # no confirmed label: the archive's
    assert result["images"] == len(rows) and result["model_version"] == model_info(radregion_server)["model_version"]


def test_corrupt_or_unsupported_files_are_4xx_and_the_server_keeps_serving(radregion_server, tmp_path):
    url = radregion_server.url
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 50)
    answer = requests.put(
        f"{url}/datastore/image",
        headers=AUTH,
        params={"image": "broken"},
        files={"file": ("broken.png", bad.read_bytes())},
        timeout=60,
    )
    assert answer.status_code == 422 and answer.json()["image"] == "broken", answer.text  # decoded before stored
    assert "unreadable PNG" in answer.json()["problem"]
    shutil.copy(bad, radregion_server.studies / "broken.png")  # put there by hand: found unusable at inference
    radregion_server.get_json("/datastore/?output=stats")
    deadline = time.monotonic() + 30
    while (
        answer := requests.post(
            f"{url}/infer/radregion", headers=AUTH, timeout=60, params={"image": "broken", "output": "json"}
        )
    ).status_code == 404:
        assert time.monotonic() < deadline, "the datastore never listed broken.png"
        time.sleep(0.5)
    assert answer.status_code == 422 and answer.json()["image"] == "broken", answer.text
    assert answer.json()["problem"]
    answer = requests.put(f"{url}/datastore/image", headers=AUTH, files={"file": ("notes.txt", b"hello")}, timeout=60)
    assert answer.status_code == 422 and "unknown format" in answer.json()["detail"], answer.text
    answer = requests.post(
        f"{url}/infer/radregion",
        headers=AUTH,
        params={"output": "json"},
        files={"file": ("notes.txt", b"not an image")},
        timeout=60,
    )
    assert 400 <= answer.status_code < 500 and answer.json()["detail"], answer.text
    assert infer(radregion_server, "nope", expect=404)["detail"]
    assert infer(radregion_server, "RG1_J2KI")["region"]  # still serving


def test_restart_and_kill_keep_every_label(radregion_server):
    def labels():
        stats = requests.get(f"{radregion_server.url}/datastore/", params={"output": "all"}, timeout=60).json()
        ids = sorted(i for i, obj in stats["objects"].items() if obj["labels"].get("final"))
        return {i: read_label(radregion_server, i) for i in ids}

    before, version = labels(), model_info(radregion_server)["model_version"]
    assert len(before) == len(radregion_server.truth) + 1
    radregion_server.stop()
    radregion_server.start()
    assert labels() == before
    assert model_info(radregion_server)["model_version"] == version  # the published model survives too
    radregion_server.kill()  # kill -9 while idle
    radregion_server.start()
    assert labels() == before
    leftovers = [p for p in radregion_server.studies.rglob("*.tmp")]
    assert not leftovers


def test_eight_concurrent_clients(radregion_server):
    ids = list(radregion_server.truth)[:6] + ["RG1_J2KI", EXTENSIONLESS_DICOM]
    reference = {i: infer(radregion_server, i)["region"] for i in ids}

    def client(n):
        session = requests.Session()
        out = []
        for k in range(25):
            image_id = ids[(n + k) % len(ids)]
            answer = session.post(
                f"{radregion_server.url}/infer/radregion",
                headers=AUTH,
                params={"image": image_id, "output": "json"},
                timeout=120,
            )
            out.append((answer.status_code, image_id, answer.json().get("region")))
        return out

    with ThreadPoolExecutor(8) as pool:
        results = [r for rs in pool.map(client, range(8)) for r in rs]
    assert len(results) == 200
    assert all(status == 200 for status, _, _ in results)
    assert all(region == reference[i] for _, i, region in results)


def test_concurrent_label_saves_and_deletes_never_fail(radregion_server):
    """Requests and MONAI Label's file watcher change the datastore at once (a DELETE once raced it into a 500)."""
    ids = list(radregion_server.truth)[:4]
    before = {
        i: requests.get(f"{radregion_server.url}/datastore/label", params={"label": i, "tag": "final"}, timeout=60)
        for i in ids
    }
    before = {i: answer.json() for i, answer in before.items() if answer.status_code == 200}

    def churn(image_id):
        session, statuses = requests.Session(), []
        for k in range(10):
            answer = session.put(
                f"{radregion_server.url}/datastore/label",
                headers=AUTH,
                params={"image": image_id, "tag": "final"},
                files={"label": ("label.json", json.dumps({"region": "Chest"}))},
                timeout=120,
            )
            statuses.append(answer.status_code)
            answer = session.delete(
                f"{radregion_server.url}/datastore/label",
                headers=AUTH,
                params={"id": image_id, "tag": "final"},
                timeout=120,
            )
            statuses.append(answer.status_code)
        return statuses

    with ThreadPoolExecutor(4) as pool:
        statuses = [s for ss in pool.map(churn, ids) for s in ss]
    assert statuses == [200] * 80, statuses
    for image_id, label in before.items():  # as the next tests expect
        save_label(radregion_server, image_id, label)


def test_missing_model_fails_at_start_with_a_clear_message(tmp_path):
    empty = tmp_path / "model"
    empty.mkdir()
    with pytest.raises(RuntimeError) as error:
        start_server(tmp_path / "studies", empty, log_path=tmp_path / "log")
    assert "no usable model bundle" in str(error.value) and str(empty.resolve()) in str(error.value)
