"""The server under load and faults, on a real `monailabel start_server` (127.0.0.1, real radiographs, the tiny
bundle): requests off the event loop, queues, retraining that keeps every region, published generations,
rollback, crashes in the middle of a publish, task processes that die with the server, leftovers cleaned at start.

The tests of the module server run in file order (each starts from what the previous one left).
"""

import json
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import psutil
import pytest
import requests

from fixtures.server import make_studies
from radregion_harness import APP_DIR, RadRegionServer

sys.path.insert(0, str(APP_DIR))
from lib.published import ModelStore, NothingToRollBack, PublishConflict  # noqa: E402

BIG_PNGS = 4  # 16-bit PNGs large enough that decoding them takes a while
HOLD_S = 4  # seconds each of their inferences holds its worker (RADREGION_TEST_FAULTS)


# ---- helpers --------------------------------------------------------------------------------------------------
def info(server):
    answer = requests.get(f"{server.url}/info/", headers=server.auth, timeout=120)
    assert answer.status_code == 200, answer.text
    return answer.json()


def model(server):
    return info(server)["models"]["radregion"]


def save_label(server, image_id, region):
    answer = requests.put(
        f"{server.url}/datastore/label",
        params={"image": image_id, "tag": "final"},
        headers=server.auth,
        timeout=120,
        files={"label": ("label.json", json.dumps({"region": region, "annotator": "faults"}))},
    )
    assert answer.status_code == 200, answer.text


def train(server, timeout=600, **params):
    return requests.post(
        f"{server.url}/train/radregion",
        params={"run_sync": "true"},
        json=params or None,
        headers=server.auth,
        timeout=timeout,
    )


def next_image(server, strategy):
    answer = requests.post(f"{server.url}/activelearning/{strategy}", json={}, headers=server.auth, timeout=120)
    assert answer.status_code == 200, answer.text
    return answer.json()


def state(server) -> Path:
    return server.studies / ".radregion"


def server_process(server) -> psutil.Process:
    """The `monailabel.main` process (the `monailabel` shell script execs it)."""
    script = psutil.Process(server.process.pid)
    for process in [script] + script.children(recursive=True):
        if "monailabel.main" in " ".join(process.cmdline()):
            return process
    raise AssertionError("no monailabel.main process")


def task_processes(server, method):
    main = server_process(server)
    return [
        c
        for c in main.children()
        if "monailabel.interfaces.utils.app" in " ".join(c.cmdline()) and method in c.cmdline()
    ]


def wait_task_done(server, timeout=600):
    """The last training task of MONAI Label has finished (any outcome)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        answer = requests.get(f"{server.url}/train/", headers=server.auth, timeout=60)
        if answer.status_code == 200 and answer.json().get("status") not in ("SUBMITTED", "RUNNING"):
            return answer.json()
        time.sleep(1)
    raise AssertionError(f"training still running after {timeout} s; log:\n{server.log_tail()}")


def leftovers(server) -> list:
    root = state(server)
    current = ModelStore(root).current().get("generation", 0)
    out = [p.name for p in (root / "models").iterdir() if p.name.startswith(".")]
    out += [p.name for p in (root / "models").glob("g*") if int(p.name[1:7]) > current]
    out += [p.name for p in root.iterdir() if p.name.startswith((".train-", ".model.", ".staging-"))]
    out += [str(p) for p in server.studies.rglob("*.tmp")]
    return out


def six_true_labels(server) -> dict:
    """Save 6 true labels, two of each of three regions; returns {image_id: region}."""
    chosen = {}
    for image_id, region in server.truth.items():
        if sum(r == region for r in chosen.values()) < 2 and len(set(chosen.values()) | {region}) <= 3:
            chosen[image_id] = region
        if len(chosen) == 6:
            break
    for image_id, region in chosen.items():
        save_label(server, image_id, region)
    return chosen


def write_big_png(path: Path, seed: int, size=2400):
    from PIL import Image

    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 40000, size, dtype=np.float32)[None, :] + np.linspace(0, 20000, size)[:, None]
    image = (ramp + rng.integers(0, 4000, (size, size))).astype(np.uint16)
    Image.fromarray(image).save(path)


# ---- the published-model store, in-process (real files) ------------------------------------------------------
def test_a_run_from_an_older_generation_never_replaces_a_newer_model(tmp_path, tiny_bundle):
    store = ModelStore(tmp_path)
    first = store.staging()
    first.rmdir()
    shutil.copytree(tiny_bundle, first)
    assert store.publish(first, "shipped")["generation"] == 1
    started_from = store.generation()
    newer = store.staging()
    newer.rmdir()
    shutil.copytree(tiny_bundle, newer)
    store.publish(newer, "another run finished first")
    late = store.staging()
    late.rmdir()
    shutil.copytree(tiny_bundle, late)
    with pytest.raises(PublishConflict, match="newer model"):
        store.publish(late, "the older run", expect_generation=started_from)
    assert store.generation() == 2 and not late.exists()
    assert [r["generation"] for r in store.history()] == [2, 1]


def test_start_recovers_a_model_stranded_by_the_old_two_rename_publish(tmp_path, tiny_bundle):
    """The layout before generations: a crash between its two renames left no `model`, the last published model
    in `.model.old-*`; the next start must serve that one, not fall back to the shipped model."""
    shutil.copytree(tiny_bundle, tmp_path / ".model.old-abc123")
    (tmp_path / ".train-xyz").mkdir()
    (tmp_path / ".audit.csv.0123456789ab.tmp").write_text("half")
    store = ModelStore(tmp_path)
    done = store.recover()
    assert store.current()["recovered_from"] == ".model.old-abc123", done
    assert (tmp_path / "model" / "bundle.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".publish.lock", "model", "models"]
    with pytest.raises(NothingToRollBack):
        store.rollback()


def test_start_adopts_a_plain_model_folder(tmp_path, tiny_bundle):
    shutil.copytree(tiny_bundle, tmp_path / "model")
    store = ModelStore(tmp_path)
    store.recover()
    assert (tmp_path / "model").is_symlink() and store.generation() == 1
    from radregion.bundle import load_bundle

    assert load_bundle(tmp_path / "model").version == load_bundle(tiny_bundle).version


# ---- the module server --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def faults_server(tmp_path_factory, tiny_bundle, unifesp, real_dicoms):
    """Scoring only on request (so the queues can be seen before it), test faults enabled, big 16-bit PNGs."""
    root = tmp_path_factory.mktemp("faults")
    truth = make_studies(root / "studies", unifesp, real_dicoms)
    for n in range(BIG_PNGS):
        write_big_png(root / "studies" / f"big{n}.png", seed=n)
    model_dir = Path(shutil.copytree(tiny_bundle, root / "model"))
    server = RadRegionServer(
        root / "studies",
        model_dir,
        log_path=root / "server.log",
        env={"MONAI_LABEL_AUTO_UPDATE_SCORING": "false", "RADREGION_TEST_FAULTS": "1"},
    )
    server.truth = truth
    try:
        server.start()
        yield server
    finally:
        server.kill()
        print(f"---- monailabel server log ({server.log_path}) ----\n{server.log_tail()}")


def test_info_and_label_saves_answer_while_images_decode(faults_server):
    """Requests run off the event loop: /info/ and a label save sent while big images are being inferred are
    answered before any of those images (on the event loop they waited behind every one of them). Each inference
    also holds its worker HOLD_S seconds (a test fault), so the order does not depend on this machine's speed."""
    done = {}

    def infer(n):
        answer = requests.post(
            f"{faults_server.url}/infer/radregion",
            params={"image": f"big{n}", "output": "json"},
            data={"params": json.dumps({"hold_s": HOLD_S})},
            headers=faults_server.auth,
            timeout=600,
        )
        done[f"infer{n}"] = time.monotonic()
        return answer.status_code

    image_id = next(iter(faults_server.truth))
    start = time.monotonic()
    with ThreadPoolExecutor(BIG_PNGS) as pool:
        statuses = [pool.submit(infer, n) for n in range(BIG_PNGS)]
        time.sleep(0.5)  # the infers are in the server
        info(faults_server)
        done["info"] = time.monotonic()
        save_label(faults_server, image_id, faults_server.truth[image_id])
        done["label"] = time.monotonic()
        assert [s.result() for s in statuses] == [200] * BIG_PNGS
    first_infer = min(v for k, v in done.items() if k.startswith("infer"))
    assert first_infer - start >= HOLD_S, "the hold_s fault was not applied"
    assert done["info"] < first_infer and done["label"] < first_infer, done
    requests.delete(
        f"{faults_server.url}/datastore/label",
        params={"id": image_id, "tag": "final"},
        headers=faults_server.auth,
        timeout=60,
    )


def test_queues_serve_provisionally_while_scoring_has_not_finished(faults_server):
    answer = next_image(faults_server, "uncertain")
    assert answer["provisional"] is True and answer["id"], answer
    assert answer["scoring"]["scored"] < answer["scoring"]["images"]
    scoring = requests.post(
        f"{faults_server.url}/scoring/radregion_scores",
        params={"run_sync": "true"},
        headers=faults_server.auth,
        timeout=600,
    )
    assert scoring.status_code == 200, scoring.text
    answer = next_image(faults_server, "uncertain")
    assert answer["provisional"] is False and answer["score"] is not None, answer


def test_queues_never_hand_out_an_image_another_queue_just_served(faults_server):
    served = [next_image(faults_server, s).get("id") for s in ("uncertain", "ood", "diverse", "uncertain", "ood")]
    served = [i for i in served if i]
    assert len(served) == 5 and len(set(served)) == 5, served
    with ThreadPoolExecutor(6) as pool:  # concurrent requests never get the same image either
        concurrent = list(pool.map(lambda _: next_image(faults_server, "uncertain")["id"], range(6)))
    assert len(set(concurrent)) == 6 and not set(concurrent) & set(served), concurrent


def test_train_with_6_confirmed_labels_keeps_all_21_regions(faults_server, tiny_bundle):
    from radregion.bundle import load_bundle

    shipped = load_bundle(tiny_bundle)
    assert len(shipped.regions) == 21
    before = model(faults_server)["model_version"]
    chosen = six_true_labels(faults_server)
    answer = train(faults_server)
    assert answer.status_code == 200, answer.text
    result = answer.json()
    assert result["published"] is True and result["status"] == "published", result
    assert result["regions"] == 21 and result["n_images"]["confirmed"] == 6
    assert result["n_images"]["stored"] == len(shipped.training_set().targets)
    assert result["validation"]["n_images"] == result["n_images"]["validation"] >= 1
    assert result["validation"]["new"] >= result["validation"]["current"]
    assert result["heldout"]["new"] >= result["heldout"]["current"] - 0.01
    assert "6 confirmed" in result["reason"]
    served = model(faults_server)
    assert served["model_version"] == result["model_version"] != before
    assert served["labels"] == shipped.regions  # every region, in the taxonomy's order
    published = load_bundle(state(faults_server) / "model")
    assert published.regions == shipped.regions and published.version == result["model_version"]
    assert published.training_set().features.shape == shipped.training_set().features.shape  # the same base
    stats = info(faults_server)["train_stats"]["radregion"]
    assert stats["status"] == "published" and stats["reason"] == result["reason"]
    # a region nobody confirmed is still predicted by the new head
    unconfirmed = sorted(set(shipped.regions) - set(chosen.values()))
    ts = published.training_set()
    rows = np.flatnonzero(np.isin(ts.targets, [shipped.regions.index(r) for r in unconfirmed]))
    predicted = published.head().predict(ts.features[rows])
    assert len(set(predicted)) >= len(unconfirmed) // 2
    faults_server.published_labels = chosen


def test_train_keeps_the_model_when_confirmed_labels_make_it_worse(faults_server):
    """Swapped regions (Chest <-> Knee, Abdomen <-> Pelvis) on all 12 PNGs contradict the model's own training
    data: heads fitted with them lose macro recall on its patient-grouped folds, so the model stays."""
    swap = {"Chest": "Knee", "Knee": "Chest", "Abdomen": "Pelvis", "Pelvis": "Abdomen"}
    before = model(faults_server)["model_version"]
    for image_id, region in faults_server.truth.items():
        save_label(faults_server, image_id, swap[region])
    answer = train(faults_server)
    assert answer.status_code == 200, answer.text
    result = answer.json()
    assert result["status"] == "kept" and result["published"] is False, result
    assert result["heldout"]["new"] < result["heldout"]["current"] - 0.01, result
    assert "original training data" in result["reason"] and str(result["heldout"]["n_images"]) in result["reason"]
    assert model(faults_server)["model_version"] == before
    stats = info(faults_server)["train_stats"]["radregion"]
    assert stats["status"] == "kept" and stats["reason"] == result["reason"]
    for image_id in faults_server.truth:  # back to the 6 true labels of the test before
        requests.delete(
            f"{faults_server.url}/datastore/label",
            params={"id": image_id, "tag": "final"},
            headers=faults_server.auth,
            timeout=60,
        )
    for image_id, region in faults_server.published_labels.items():
        save_label(faults_server, image_id, region)


def test_rollback_serves_the_previous_model_again(faults_server, tiny_bundle):
    from radregion.bundle import load_bundle

    shipped = load_bundle(tiny_bundle).version
    trained = model(faults_server)["model_version"]
    url = f"{faults_server.url}/model/radregion/rollback"
    assert requests.post(url, timeout=60).status_code == 401  # a write: the API token is required
    answer = requests.post(url, headers=faults_server.auth, timeout=60)
    assert answer.status_code == 200, answer.text
    result = answer.json()
    assert result["model_version"] == shipped and result["rolled_back_from"] == trained
    assert model(faults_server)["model_version"] == shipped
    image_id = next(iter(faults_server.truth))
    inferred = requests.post(
        f"{faults_server.url}/infer/radregion",
        params={"image": image_id, "output": "json"},
        headers=faults_server.auth,
        timeout=120,
    ).json()
    assert inferred["model_version"] == shipped
    history = requests.get(
        f"{faults_server.url}/model/radregion/history", headers=faults_server.auth, timeout=60
    ).json()
    assert history["current"]["generation"] == 3 and history["current"]["restores"].endswith(shipped)
    again = requests.post(url, headers=faults_server.auth, timeout=60)
    assert again.status_code == 409 and "no earlier" in again.json()["detail"]
    assert (
        requests.post(f"{faults_server.url}/model/nope/rollback", headers=faults_server.auth, timeout=60).status_code
        == 404
    )


def test_a_training_requested_before_a_newer_model_never_replaces_it(faults_server):
    answer = train(faults_server)  # publishes generation 4 (the labels of the test before)
    assert answer.status_code == 200 and answer.json()["published"], answer.text
    answer = requests.post(f"{faults_server.url}/train/radregion", headers=faults_server.auth, timeout=60)
    assert answer.status_code == 200, answer.text  # a task process: it starts in seconds
    rollback = requests.post(f"{faults_server.url}/model/radregion/rollback", headers=faults_server.auth, timeout=60)
    assert rollback.status_code == 200, rollback.text
    newer = rollback.json()
    wait_task_done(faults_server)
    stats = info(faults_server)["train_stats"]["radregion"]
    assert stats["status"] == "kept" and "newer model" in stats["reason"], stats
    assert model(faults_server)["model_version"] == newer["model_version"]
    assert ModelStore(state(faults_server)).generation() == newer["generation"] == 5


@pytest.mark.parametrize(
    "step,served", [("publish:written", "before"), ("publish:renamed", "before"), ("publish:linked", "new")]
)
def test_a_crash_in_the_middle_of_a_publish_serves_the_last_published_model(faults_server, step, served):
    """The training process is killed (SIGKILL) at each step of its publish: the server keeps serving the last
    published model (the new one once the link was swapped); leftovers go at the next start (test below)."""
    before = model(faults_server)["model_version"]
    generation = ModelStore(state(faults_server)).generation()
    answer = requests.post(
        f"{faults_server.url}/train/radregion", json={"crash_at": step}, headers=faults_server.auth, timeout=60
    )
    assert answer.status_code == 200, answer.text
    task = wait_task_done(faults_server)
    assert task["status"] == "ERROR", task  # killed
    store = ModelStore(state(faults_server))
    after = model(faults_server)["model_version"]
    if served == "before":
        assert after == before and store.generation() == generation
    else:
        assert store.generation() == generation + 1 and after == store.current()["version"] != before


def test_start_cleans_what_crashes_left_and_serves_the_last_published_model(faults_server):
    store = ModelStore(state(faults_server))
    published = store.current()
    assert leftovers(faults_server)  # the crashes above left some
    (state(faults_server) / ".train-stale").mkdir()
    (faults_server.studies / "labels" / "final" / ".x.json.0123456789ab.tmp").write_text("{")
    faults_server.kill()
    faults_server.start()
    assert leftovers(faults_server) == []
    assert model(faults_server)["model_version"] == published["version"]
    assert ModelStore(state(faults_server)).current() == published


def test_a_training_process_dies_with_the_server(faults_server):
    answer = requests.post(f"{faults_server.url}/train/radregion", headers=faults_server.auth, timeout=60)
    assert answer.status_code == 200, answer.text
    deadline = time.monotonic() + 120
    while not task_processes(faults_server, "train") and time.monotonic() < deadline:
        time.sleep(0.2)
    children = task_processes(faults_server, "train")
    assert children, faults_server.log_tail()
    generation = ModelStore(state(faults_server)).generation()
    server_process(faults_server).kill()  # kill -9 of the server process alone
    gone, alive = psutil.wait_procs(children, timeout=60)
    assert not alive, [c.cmdline() for c in alive]
    faults_server.kill()
    time.sleep(2)
    assert ModelStore(state(faults_server)).generation() == generation  # nothing published after the server died
    faults_server.start()
    assert leftovers(faults_server) == []


def test_the_server_starts_without_conf_model_from_the_installed_package(tmp_path, unifesp, real_dicoms):
    """No --conf model: the bundle installed with the package (`radregion_model`, apps/radregion/model)."""
    from importlib.util import find_spec

    from radregion.bundle import load_bundle

    shipped = Path(find_spec("radregion_model").submodule_search_locations[0])
    if not (shipped / "bundle.json").is_file():
        pytest.fail(f"no shipped bundle in {shipped}")

    class NoModelConf(RadRegionServer):
        def command(self):
            cmd = super().command()
            i = cmd.index("model")
            return cmd[: i - 1] + cmd[i + 2 :]

    studies = tmp_path / "studies"
    make_studies(studies, unifesp, real_dicoms[:1])
    server = NoModelConf(
        studies, tmp_path / "unused", log_path=tmp_path / "server.log", env={"MONAI_LABEL_AUTO_UPDATE_SCORING": "false"}
    )
    assert "--conf model" not in " ".join(server.command())
    try:
        server.start()
        assert model(server)["model_version"] == load_bundle(shipped).version
        assert len(model(server)["labels"]) == len(load_bundle(shipped).regions)
    finally:
        server.stop()


# ---- a model with a held-out set ------------------------------------------------------------------------------
HELD_OUT_PER_CLASS = 3


@pytest.fixture(scope="module")
def held_out_server(tmp_path_factory, tiny_bundle, unifesp, real_dicoms):
    """The tiny bundle's head refitted on its own images with a held-out set of other patients' images (none in
    the studies folder either), as `radregion fit-head --held-out` stores one; a server on it."""
    from radregion.bundle import load_bundle
    from radregion.datasets import read_labels_csv, sample_per_class
    from radregion.fitting import train_head

    from fixtures.bundle import TINY_PER_CLASS

    root = tmp_path_factory.mktemp("held_out")
    truth = make_studies(root / "studies", unifesp, real_dicoms)
    items = read_labels_csv(unifesp / "labels.csv")
    train = sample_per_class(items, TINY_PER_CLASS, seed=0)  # the tiny bundle's own images
    taken = {it.group for it in train} | {it.group for it in items if it.path.stem in truth}
    held = sample_per_class([it for it in items if it.group not in taken], HELD_OUT_PER_CLASS, seed=0)
    bundle = train_head(
        load_bundle(Path(tiny_bundle).parent / "pretrained"),
        train,
        root / "model",
        data=f"{TINY_PER_CLASS} per region of {unifesp / 'labels.csv'} (seed 0)",
        command="tests/test_server_faults.py",
        held_out=held,
        held_out_data=f"{HELD_OUT_PER_CLASS} per region of other patients",
    )
    with RadRegionServer(root / "studies", shutil.copytree(bundle.path, root / "served")) as server:
        server.truth, server.bundle = truth, bundle
        yield server
    print(f"---- monailabel server log ({server.log_path}) ----\n{server.log_tail()}")


def test_training_checks_the_new_head_on_the_models_held_out_set(held_out_server):
    """A model with a held-out set: the current and the new head are compared on it (not on the training set's
    folds), and the status says so and on how many images of how many patients."""
    from radregion.bundle import load_bundle
    from radregion.evaluate import macro_recall

    server, base = held_out_server, held_out_server.bundle
    held, regions = base.held_out(), base.regions
    six_true_labels(server)
    answer = train(server)
    assert answer.status_code == 200, answer.text
    result = answer.json()
    check = result["heldout"]
    assert check["method"] == "held_out_set" and check["metric"] == "macro_recall", check
    assert check["n_images"] == len(held) and check["n_patients"] == len(np.unique(held.groups)) > 1
    truths = held.truths(regions)
    assert check["current"] == round(macro_recall(base.head().predict(held.features), truths, regions), 4)
    assert f"the model's held-out set ({len(held)} images of {check['n_patients']} patient(s))" in result["reason"]
    assert result["published"] is True and result["status"] == "published", result
    published = load_bundle(state(server) / "model")
    assert published.version == result["model_version"] != base.version
    assert check["new"] == round(macro_recall(published.head().predict(held.features), truths, regions), 4)
    assert np.array_equal(published.held_out().features, held.features)  # the next training checks the same set
    assert np.array_equal(published.held_out().targets, held.targets)
    stats = info(server)["train_stats"]["radregion"]
    assert stats["heldout"] == check and stats["reason"] == result["reason"]
