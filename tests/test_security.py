"""The server's security holes (issue 13), each probed on a real `monailabel start_server` as a hospital's IT
reviewer would: paths outside the studies folder, writes without the token, CORS, secrets in logs, model
routes, bad uploads, images without content, malformed requests. Every test here failed on the code before.
"""

import io
import json
import os
import re
import shutil
import stat
import subprocess
import tarfile
import time
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

import dicom_factory
from fixtures.server import make_studies
from radregion_harness import APP_DIR, AUTH, REPO, RadRegionServer

TWIN = "twin"  # twin.png and twin.dcm side by side
NO_CONTENT = {  # file in the studies folder -> words the 422 must contain
    "blank.png": "blank image",
    "one_pixel.png": "too small",
    "sliver.png": "too small",
    "thin.png": "degenerate shape",
    "nan_rescale.dcm": "not numbers",
}


def _png(path, array):
    Image.fromarray(array).save(path)
    return path


def _png_of_zeros(width, height, bits=8, rows=100) -> bytes:
    """A grey PNG of zeros, a bomb of any size in a few KB: one deflate block of `rows` zero rows (filter byte 0
    and the row), ended by a full flush so that it can be repeated, then an empty final block and the Adler-32 of
    n zeros, (n mod 65521) << 16 | 1."""

    def chunk(kind, data):
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    deflate = zlib.compressobj(9, zlib.DEFLATED, -15)
    line = width * bits // 8 + 1
    block = deflate.compress(bytes(line * rows)) + deflate.flush(zlib.Z_FULL_FLUSH)
    final = zlib.compressobj(9, zlib.DEFLATED, -15).flush()
    adler = (((line * height) % 65521) << 16) | 1
    pixels = b"\x78\xda" + block * (height // rows) + final + adler.to_bytes(4, "big")
    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([bits, 0, 0, 0, 0])
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


def _noise(shape, seed=0):
    return np.random.default_rng(seed).integers(0, 255, shape, dtype=np.uint8)


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_bundle, unifesp, real_dicoms):
    """Studies with a link pointing out, two files of one stem, images without content; an `outside` folder
    the server must never touch; its temp folder (<studies>/.radregion/tmp, TMPDIR as the documented start
    commands set it) to prove it leaves nothing there."""
    root = tmp_path_factory.mktemp("security")
    studies = root / "studies"
    truth = make_studies(studies, unifesp, real_dicoms)
    pngs = sorted(studies.glob("*.png"))
    outside = root / "outside"
    outside.mkdir()
    shutil.copy(pngs[0], outside / "secret.png")
    (outside / "victim.txt").write_text("do not delete")
    (studies / "linked.png").symlink_to(outside / "secret.png")
    (studies / "alias.png").symlink_to(studies / pngs[7].name)  # a link that stays inside the folder
    shutil.copy(pngs[1], studies / f"{TWIN}.png")
    shutil.copy(real_dicoms[0], studies / f"{TWIN}.dcm")
    _png(studies / "blank.png", np.zeros((512, 512), np.uint8))
    _png(studies / "one_pixel.png", np.full((1, 1), 200, np.uint8))
    _png(studies / "sliver.png", _noise((1, 10000)))
    _png(studies / "thin.png", _noise((40, 2000)))
    dicom_factory.write(studies / "nan_rescale.dcm", RescaleSlope="NaN", RescaleIntercept="0")
    huge = np.zeros((13000, 13000), np.uint8)  # 169 MP, compresses to a small file
    huge[::97, :] = 255
    _png(studies / "huge.png", huge)
    del huge
    model = Path(shutil.copytree(tiny_bundle, root / "model"))
    server = RadRegionServer(studies, model, log_path=root / "server.log", extra_conf={"max_upload_mb": 2})
    server.root, server.outside, server.tmp, server.pngs, server.truth = root, outside, server.temp_dir(), pngs, truth
    try:
        server.start()
        yield server
    finally:
        server.stop()
        print(f"---- server log ({server.log_path}) ----\n{server.log_tail()}")


def put_image(server, image_id, name, data, headers=AUTH):
    params = {"image": image_id} if image_id is not None else {}
    return requests.put(
        f"{server.url}/datastore/image",
        params=params,
        headers=headers,
        files={"file": (name, data, "application/octet-stream")},
        timeout=120,
    )


def put_label(server, image_id, label, tag="final", headers=AUTH, params=None):
    data = {"params": params} if params is not None else None
    return requests.put(
        f"{server.url}/datastore/label",
        params={"image": image_id, "tag": tag},
        headers=headers,
        data=data,
        files={"label": ("label.json", label, "application/json")},
        timeout=60,
    )


def infer(server, image=None, params=None):
    query = {"output": "json", **({"image": image} if image is not None else {})}
    data = {"params": params} if params is not None else None
    return requests.post(f"{server.url}/infer/radregion", params=query, data=data, headers=AUTH, timeout=120)


def listing(server):
    return set(requests.get(f"{server.url}/datastore/", params={"output": "all"}, timeout=60).json()["objects"])


def files_under(folder):
    return sorted(str(p.relative_to(folder)) for p in Path(folder).rglob("*"))


# ---- nothing outside the studies folder ------------------------------------------------------------------


def test_image_upload_under_a_path_id_writes_nothing_outside(env):
    png = env.pngs[2].read_bytes()
    before = files_under(env.root)
    for image_id in ["../outside/x", str(env.outside / "abs"), "..", ".hidden", "a/b"]:
        answer = put_image(env, image_id, "x.png", png)
        assert answer.status_code == 400 and "invalid image id" in answer.json()["detail"], (image_id, answer.text)
    assert files_under(env.root) == before


def test_label_tag_outside_the_labels_folder_is_refused(env):
    image = env.pngs[0].stem
    before = files_under(env.root)
    for tag in ["../../outside/t", str(env.outside / "t"), "..", "a/b"]:
        answer = put_label(env, image, json.dumps({"region": "Chest"}), tag=tag)
        assert answer.status_code == 400 and "invalid label tag" in answer.json()["detail"], (tag, answer.text)
    assert files_under(env.root) == before


def test_delete_with_a_path_id_deletes_nothing_outside(env):
    for image_id in ["../outside/victim", "../outside/victim.txt", str(env.outside / "victim.txt")]:
        answer = requests.delete(f"{env.url}/datastore/image", params={"id": image_id}, headers=AUTH, timeout=60)
        assert 400 <= answer.status_code < 500, answer.text
        answer = requests.delete(
            f"{env.url}/datastore/label", params={"id": image_id, "tag": "final"}, headers=AUTH, timeout=60
        )
        assert 400 <= answer.status_code < 500, answer.text
    assert (env.outside / "victim.txt").read_text() == "do not delete"


def test_a_link_pointing_out_of_the_studies_folder_is_not_an_image(env):
    assert "linked" not in listing(env)
    assert requests.get(f"{env.url}/datastore/image", params={"image": "linked"}, timeout=60).status_code == 404
    assert infer(env, "linked").status_code == 404
    answer = requests.delete(f"{env.url}/datastore/image", params={"id": "linked"}, headers=AUTH, timeout=60)
    assert answer.status_code == 404
    assert (env.outside / "secret.png").is_file() and (env.root / "studies" / "linked.png").is_symlink()


def test_deleting_a_link_deletes_the_link_not_its_target(env):
    target = env.studies / env.pngs[7].name
    before = target.read_bytes()
    assert "alias" in listing(env)
    answer = requests.delete(f"{env.url}/datastore/image", params={"id": "alias"}, headers=AUTH, timeout=60)
    assert answer.status_code == 200, answer.text
    assert not (env.studies / "alias.png").is_symlink() and target.read_bytes() == before
    assert env.pngs[7].stem in listing(env) and "alias" not in listing(env)


def test_infer_takes_ids_only_and_answers_one_message_for_everything_unknown(env):
    outside_png = str(env.outside / "secret.png")
    probes = {
        "/etc/passwd": infer(env, "/etc/passwd"),
        "../../x": infer(env, "../../x"),
        outside_png: infer(env, outside_png),
        "no-such-image": infer(env, "no-such-image"),
        "/no/such/file.png": infer(env, "/no/such/file.png"),
    }
    probes["params"] = infer(env, "no-such-image", params=json.dumps({"image": outside_png}))
    for probe, answer in probes.items():
        assert answer.status_code == 404, (probe, answer.text)
        assert set(answer.json()) == {"detail", "error"}, answer.text
        assert answer.json()["detail"].endswith("not found in the datastore"), answer.text
    real = infer(env, env.pngs[0].stem)
    assert real.status_code == 200 and real.json()["prediction"], real.text


def test_session_uploads_that_unpack_archives_are_off(env):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        data = b"escaped"
        member = tarfile.TarInfo("../../../escaped.txt")
        member.size = len(data)
        tar.addfile(member, io.BytesIO(data))
    before = files_under(env.root)
    answer = requests.put(
        f"{env.url}/session/",
        params={"uncompress": "true"},
        headers=AUTH,
        files={"files": ("x.tar.gz", buffer.getvalue())},
        timeout=60,
    )
    assert answer.status_code == 403 and "sessions are off" in answer.json()["detail"]
    assert files_under(env.root) == before and not (APP_DIR / "escaped.txt").exists()


def test_routes_radregion_does_not_use_are_off(env):
    for method, path in [
        ("GET", "/proxy/dicom/qido/studies"),
        ("GET", "/ohif/index.html"),
        ("GET", "/ohif/"),
        ("POST", "/infer/wsi/radregion"),
        ("POST", "/infer/wsi_v2/radregion"),
        ("GET", "/session/x"),
        ("DELETE", "/session/x"),
    ]:
        answer = requests.request(method, f"{env.url}{path}", headers=AUTH, timeout=60)
        assert answer.status_code in (403, 404) and answer.json()["detail"], (path, answer.text)


def test_batch_run_writes_its_csv_only_in_the_state_folder(env):
    target = env.outside / "audit.csv"
    answer = requests.post(
        f"{env.url}/batch/infer/radregion",
        params={"run_sync": "true"},
        headers=AUTH,
        json={"output": str(target)},
        timeout=300,
    )
    assert answer.status_code == 400, answer.text
    assert not target.exists()


# ---- the token, CORS, secrets ---------------------------------------------------------------------------


def test_every_write_needs_the_token(env):
    image = env.pngs[0].stem
    label = json.dumps({"region": "Chest"})
    wrong = {"Authorization": "Bearer wrong-token-of-some-length"}
    calls = [
        lambda h: put_label(env, image, label, headers=h),
        lambda h: requests.delete(f"{env.url}/datastore/label", params={"id": image, "tag": "final"}, headers=h),
        lambda h: requests.delete(f"{env.url}/datastore/image", params={"id": image}, headers=h),
        lambda h: put_image(env, "new-id", "x.png", env.pngs[3].read_bytes(), headers=h),
        lambda h: requests.post(f"{env.url}/train/radregion", params={"run_sync": "true"}, headers=h, timeout=60),
        lambda h: requests.delete(f"{env.url}/train/", headers=h, timeout=60),
        lambda h: requests.post(f"{env.url}/scoring/radregion_scores", headers=h, timeout=60),
        lambda h: requests.post(f"{env.url}/infer/radregion", params={"image": image}, headers=h, timeout=60),
        lambda h: requests.put(
            f"{env.url}/model/radregion", files={"file": ("m.safetensors", b"x")}, headers=h, timeout=60
        ),
        lambda h: requests.get(f"{env.url}/model/radregion", headers=h, timeout=60),
        lambda h: requests.get(f"{env.url}/logs/", headers=h, timeout=60),
        lambda h: requests.get(f"{env.url}/datastore/dataset", headers=h, timeout=60),
    ]
    for n, call in enumerate(calls):
        for headers in ({}, wrong, {"Authorization": AUTH["Authorization"].replace("Bearer", "Basic")}):
            answer = call(headers)
            assert answer.status_code == 401, (n, headers, answer.text)
            assert answer.headers.get("WWW-Authenticate") == "Bearer"
    assert image in listing(env), "nothing was deleted"
    assert requests.get(f"{env.url}/info/", timeout=60).status_code == 200, "reads stay open on loopback"


def test_model_cannot_be_replaced_deleted_or_downloaded_without_the_admin(env):
    weights = env.model / "model.safetensors"
    before = weights.read_bytes()
    published = env.studies / ".radregion" / "model" / "model.safetensors"
    served = published.read_bytes()
    answer = requests.put(
        f"{env.url}/model/radregion", headers=AUTH, timeout=60, files={"file": ("model.safetensors", b"not weights")}
    )
    assert answer.status_code == 403 and "model upload over REST is off" in answer.json()["detail"]
    answer = requests.delete(f"{env.url}/model/radregion", headers=AUTH, timeout=60)
    assert answer.status_code == 403
    assert weights.read_bytes() == before and published.read_bytes() == served
    assert requests.get(f"{env.url}/model/radregion", timeout=60).status_code == 401


def test_cors_allows_no_origin_by_default(env):
    evil = "https://evil.example"
    answer = requests.get(f"{env.url}/info/", headers={"Origin": evil, "Cookie": "a=b"}, timeout=60)
    assert "access-control-allow-origin" not in {k.lower() for k in answer.headers}
    preflight = requests.options(
        f"{env.url}/datastore/label",
        timeout=60,
        headers={
            "Origin": evil,
            "Access-Control-Request-Method": "PUT",
            "Access-Control-Request-Headers": "authorization",
        },
    )
    assert preflight.headers.get("access-control-allow-origin") not in (evil, "*")
    assert "access-control-allow-credentials" not in {k.lower() for k in preflight.headers}


def small_studies(env, folder) -> Path:
    folder.mkdir()
    for png in env.pngs[:2]:
        shutil.copy(png, folder / png.name)
    return folder


def test_a_password_on_the_command_line_is_refused_and_never_logged(env, tiny_bundle, tmp_path):
    secret = f"pacs-secret-{os.getpid()}-{time.time_ns()}"
    server = RadRegionServer(
        small_studies(env, tmp_path / "studies"),
        tiny_bundle,
        log_path=tmp_path / "server.log",
        extra_conf={"password": secret},
    )
    with pytest.raises(RuntimeError, match="exited with 2"):
        server.start()
    log = server.log_path.read_text(errors="replace")
    assert "MONAI_LABEL_DATASTORE_PASSWORD" in log and "password_file" in log
    assert secret not in (APP_DIR / "logs" / "app.log").read_text(errors="replace"), "GET /logs/ serves app.log"


def test_off_loopback_every_request_needs_the_token_which_is_generated_into_an_admin_only_file(
    env, tiny_bundle, tmp_path
):
    """Also: CORS for a configured origin, and a model upload the admin enabled is verified before served."""
    state = tmp_path / "state"
    server = RadRegionServer(
        small_studies(env, tmp_path / "studies"),
        tiny_bundle,
        host="0.0.0.0",
        log_path=tmp_path / "server.log",
        env={"RADREGION_API_TOKEN": None},
        extra_conf={"state_dir": state, "cors_origins": "https://viewer.example", "model_upload": "true"},
    )
    token_file = state / "api_token"
    try:
        server.launch()
        deadline = time.monotonic() + 240
        while not token_file.exists() and server.running and time.monotonic() < deadline:
            time.sleep(0.5)
        token = token_file.read_text().strip()
        assert len(token) >= 32 and stat.S_IMODE(token_file.stat().st_mode) == 0o600
        server.auth = {"Authorization": f"Bearer {token}"}
        server._wait_ready()
        log = server.log_path.read_text(errors="replace")
        assert str(token_file) in log and token not in log
        for path in ("/info/", "/datastore/", "/datastore/image?image=" + env.pngs[0].stem):
            assert requests.get(f"{server.url}{path}", timeout=60).status_code == 401, path
        assert requests.get(f"{server.url}/info/", headers=server.auth, timeout=60).status_code == 200
        allowed = requests.get(
            f"{server.url}/info/", timeout=60, headers={**server.auth, "Origin": "https://viewer.example"}
        )
        assert allowed.headers.get("access-control-allow-origin") == "https://viewer.example"
        check_model_upload(server, state)
    finally:
        server.stop()


def check_model_upload(server, state):
    from safetensors.torch import load_file, save

    def upload(data, headers=server.auth):
        return requests.put(
            f"{server.url}/model/radregion",
            headers=headers,
            timeout=120,
            files={"file": ("model.safetensors", data, "application/octet-stream")},
        )

    def served_version():
        return requests.get(f"{server.url}/info/", headers=server.auth, timeout=60).json()["models"]["radregion"][
            "model_version"
        ]

    before = served_version()
    tensors = load_file(str(state / "model" / "model.safetensors"))
    assert upload(save(tensors), headers={}).status_code == 401
    other = requests.put(
        f"{server.url}/model/other",
        headers=server.auth,
        timeout=60,
        files={"file": ("model.safetensors", save(tensors))},
    )
    assert other.status_code == 404, other.text
    wrong_shape = {**tensors, "head.weight": tensors["head.weight"][:3].clone()}
    not_finite = {**tensors, "head.bias": tensors["head.bias"] * float("nan")}
    extra = {**tensors, "backdoor": tensors["head.bias"].clone()}
    for data, words in [
        (b"not weights", "not a safetensors"),
        (save(wrong_shape), "head.weight"),
        (save(not_finite), "not finite"),
        (save(extra), "unexpected"),
    ]:
        answer = upload(data)
        assert answer.status_code == 422 and words in answer.json()["detail"], answer.text
        assert served_version() == before
    flipped = {**tensors, "head.weight": -tensors["head.weight"]}
    answer = upload(save(flipped))
    assert answer.status_code == 200, answer.text
    assert answer.json()["model_version"] != before and served_version() == answer.json()["model_version"]


def test_answers_name_files_by_id_and_relative_name_never_by_server_path(env):
    image = env.pngs[8].stem
    assert put_label(env, image, json.dumps({"region": env.truth[image]})).status_code == 200
    answers = {
        "image info": requests.get(f"{env.url}/datastore/image/info", params={"image": image}, timeout=60),
        "label info": requests.get(
            f"{env.url}/datastore/label/info", params={"label": image, "tag": "final"}, timeout=60
        ),
        **{
            f"listing {output}": requests.get(f"{env.url}/datastore/", params={"output": output}, timeout=60)
            for output in ("stats", "all", "train")
        },
        **{
            f"next {strategy}": requests.post(
                f"{env.url}/activelearning/{strategy}", json={}, headers=AUTH, timeout=120
            )
            for strategy in ("random", "uncertain", "disagreement", "ood", "diverse")
        },
        "infer": infer(env, image),
        "info": requests.get(f"{env.url}/info/", timeout=60),
    }
    folders = {str(env.root), os.path.realpath(env.root)}
    for what, answer in answers.items():
        assert answer.status_code == 200, (what, answer.text)
        leaks = [answer.text[max(0, i - 300) : i + 100] for i in (answer.text.find(f) for f in folders) if i >= 0]
        assert leaks == [], what
    info = answers["image info"].json()
    assert info["name"] == f"{image}.png" and "path" not in info
    assert answers["next random"].json()["id"] and "path" not in answers["next random"].json()
    train = {item["image"]: item for item in answers["listing train"].json()}
    assert train[f"{image}.png"]["label"] == f"labels/final/{image}.json", train


# ---- uploads ---------------------------------------------------------------------------------------------


def test_bad_uploads_are_refused_before_they_are_stored_and_leave_no_temp_file(env):
    png = env.pngs[3].read_bytes()
    bomb = _png_of_zeros(30000, 30000)  # 900 MP: 858 MiB to decode; Pillow's own guard refuses it
    bomb16 = _png_of_zeros(17000, 17000, bits=16)  # 289 MP at 16 bits: 551 MiB, above pixels.MAX_DECODED_BYTES
    temp_before = files_under(env.tmp)
    studies_before = files_under(env.studies)
    bad = {
        "text.png": (b"this is not an image\n" * 10, 422, "not PNG"),
        "empty.png": (b"", 422, "empty file"),
        "truncated.png": (png[: len(png) // 3], 422, "unreadable PNG"),
        "zeros.dcm": (bytes(1 << 20), 422, "not a DICOM file"),
        "bomb.png": (bomb, 422, "too large"),
        "bomb16.png": (bomb16, 422, "too large"),
        "big.dcm": (bytes(3 << 20), 413, "too large"),
    }
    for name, (data, status, words) in bad.items():
        answer = put_image(env, Path(name).stem + "-upload", name, data)
        assert answer.status_code == status and words in answer.json()["detail"], (name, answer.text)
        assert str(env.tmp) not in answer.text
    assert files_under(env.studies) == studies_before
    assert files_under(env.tmp) == temp_before, "MONAI Label's temp copies of refused uploads are removed"


def test_an_upload_never_replaces_an_image_and_twins_are_two_images(env):
    original = env.pngs[4]
    before = original.read_bytes()
    answer = put_image(env, original.stem, "other.png", env.pngs[5].read_bytes())
    assert answer.status_code == 409 and "already exists" in answer.json()["detail"]
    assert original.read_bytes() == before
    ids = listing(env)
    assert {TWIN, f"{TWIN}.dcm"} <= ids or {TWIN, f"{TWIN}.png"} <= ids, sorted(ids)
    bodies = {
        requests.get(f"{env.url}/datastore/image", params={"image": i}, timeout=60).content
        for i in ids
        if i.startswith(TWIN)
    }
    assert bodies == {(env.studies / f"{TWIN}.png").read_bytes(), (env.studies / f"{TWIN}.dcm").read_bytes()}
    fresh = put_image(env, "fresh-upload", "fresh.png", env.pngs[5].read_bytes())
    assert fresh.status_code == 200 and (env.studies / "fresh-upload.png").read_bytes() == env.pngs[5].read_bytes()


def test_label_size_is_limited(env):
    image = env.pngs[0].stem
    big_comment = json.dumps({"region": "Chest", "comment": "x" * (20 << 20)})
    answer = put_label(env, image, big_comment)
    assert answer.status_code == 413, answer.text
    body, content_type = requests.models.RequestEncodingMixin._encode_files(
        {"label": ("label.json", big_comment, "application/json")}, {}
    )
    chunked = requests.put(
        f"{env.url}/datastore/label",
        params={"image": image, "tag": "final"},
        timeout=60,
        headers={**AUTH, "Content-Type": content_type},
        data=(body[k : k + 65536] for k in range(0, len(body), 65536)),
    )  # no Content-Length
    assert chunked.status_code == 413, chunked.text
    answer = put_label(env, image, json.dumps({"region": "Chest", "comment": "x" * 10000}))
    assert answer.status_code == 422 and "comment too long" in answer.json()["detail"]


def test_dataset_export_leaves_no_zip_behind(env):
    image = env.pngs[6].stem
    assert put_label(env, image, json.dumps({"region": "Knee"})).status_code == 200
    before = files_under(env.tmp)
    answer = requests.get(f"{env.url}/datastore/dataset", headers=AUTH, timeout=120)
    assert answer.status_code == 200, answer.text
    assert any(name.endswith(".json") for name in zipfile.ZipFile(io.BytesIO(answer.content)).namelist())
    time.sleep(0.5)  # the removal runs after the response is sent
    assert files_under(env.tmp) == before


# ---- images with no content ------------------------------------------------------------------------------


def test_a_169_megapixel_png_is_read_downscaled_and_predicted_as_the_engine_does(env, tiny_bundle):
    """Decoded at 8 bits and averaged down strip by strip (bench/huge_image_memory.py: about 190 MiB), not refused."""
    from radregion.inference import Predictor

    answer = infer(env, "huge")
    assert answer.status_code == 200, answer.text
    engine = next(Predictor(tiny_bundle, workers=0).predict([env.studies / "huge.png"]))
    assert engine.error is None, engine.error
    result = answer.json()
    assert result["region"] == engine.region
    assert result["confidence"] == pytest.approx(engine.confidence, abs=1e-4)
    assert result["ood_score"] == pytest.approx(engine.ood_score, rel=1e-3)


@pytest.mark.parametrize("name", sorted(NO_CONTENT))
def test_images_without_content_answer_422_naming_the_problem(env, name):
    image_id = Path(name).stem
    answer = infer(env, image_id)
    assert answer.status_code == 422, answer.text
    assert NO_CONTENT[name] in answer.json()["problem"], answer.text
    assert answer.json()["image"] == image_id


# ---- malformed requests ----------------------------------------------------------------------------------


def test_malformed_requests_answer_4xx_with_a_message(env):
    image = env.pngs[0].stem
    answers = {
        "params not JSON": infer(env, image, params="{not json"),
        "params a list": infer(env, image, params="[1, 2]"),
        "params a number": infer(env, image, params="5"),
        "params image not text": infer(env, image, params=json.dumps({"image": ["a"]})),
        "no image": infer(env),
        "label params not JSON": put_label(env, image, json.dumps({"region": "Chest"}), params="{oops"),
        "label nested 100000 deep": put_label(env, image, "[" * 100000 + "]" * 100000),
        "label nested 10000 deep": put_label(env, image, '{"region": ' * 5000 + '"Chest"' + "}" * 5000),
        "label info not JSON": requests.put(
            f"{env.url}/datastore/label/info",
            headers=AUTH,
            timeout=60,
            params={"label": image, "tag": "final"},
            data={"info": "{x"},
        ),
    }
    for what, answer in answers.items():
        assert 400 <= answer.status_code < 500, (what, answer.status_code, answer.text)
        assert answer.json().get("detail"), (what, answer.text)


def test_ids_are_escaped_in_the_log(env):
    forged = "x\n[2026-01-01 00:00:00] [1] [MainThread] [INFO] (forged:1) - FORGED LINE"
    for image_id in (forged, "nul\x00byte"):
        put_label(env, image_id, json.dumps({"region": "Chest"}))
        infer(env, image_id)
    time.sleep(0.5)
    log = env.log_path.read_text(errors="replace")
    assert not any(line.startswith("[2026-01-01") for line in log.splitlines())
    assert "\x00" not in log


# ---- how the server is started -------------------------------------------------------------------------


def test_a_server_run_writes_nothing_outside_its_folders(env, tiny_bundle, tmp_path, monkeypatch):
    """Uploads (kept and refused), inference, next images, a dataset download and a training on a server started
    as the documented commands start it (TMPDIR = <studies>/.radregion/tmp): the system temp folder and the home
    folder it inherits get nothing, everything new lies in its studies and cache folders, and its temp folder is
    empty again at the end (MONAI Label's start-up log config included)."""
    system_tmp, home, studies, cache = (tmp_path / name for name in ("system-tmp", "home", "studies", "cache"))
    system_tmp.mkdir()
    home.mkdir()
    monkeypatch.setenv("TMPDIR", str(system_tmp))
    monkeypatch.setenv("HOME", str(home))
    studies.mkdir()
    for png in env.pngs:
        shutil.copy(png, studies / png.name)
    before = files_under(tmp_path)
    server = RadRegionServer(
        studies, tiny_bundle, log_path=tmp_path / "server.log", env={"RADREGION_CACHE": str(cache)}
    )
    with server:
        assert put_image(server, "upload-1", "upload.png", env.pngs[0].read_bytes()).status_code == 200
        assert put_image(server, "refused-1", "refused.png", b"not a png").status_code == 422
        assert infer(server, env.pngs[1].stem).status_code == 200
        answer = requests.post(f"{server.url}/activelearning/random", json={}, headers=AUTH, timeout=120)
        assert answer.status_code == 200, answer.text
        for png in env.pngs:
            assert put_label(server, png.stem, json.dumps({"region": env.truth[png.stem]})).status_code == 200
        assert requests.get(f"{server.url}/datastore/dataset", headers=AUTH, timeout=120).status_code == 200
        answer = requests.post(f"{server.url}/train/radregion", params={"run_sync": "true"}, headers=AUTH, timeout=600)
        assert answer.status_code == 200, answer.text
        time.sleep(0.5)  # the zip is removed after the response is sent
        left_in_temp = files_under(server.temp_dir())
    assert files_under(system_tmp) == [] and files_under(home) == []
    assert left_in_temp == []
    new = sorted(set(files_under(tmp_path)) - set(before))
    assert any(name.startswith("cache/") for name in new) and any(
        name.startswith("studies/.radregion/") for name in new
    )
    assert [name for name in new if name.split("/")[0] not in ("studies", "cache", "server.log")] == []
    dry = subprocess.run(["make", "-n", "serve"], cwd=REPO, capture_output=True, text=True).stdout
    assert "TMPDIR=" in dry and ".radregion/tmp" in dry and "MPLCONFIGDIR=" in dry, dry
    for doc in (APP_DIR / "README.md", REPO / "docs" / "pacs.md"):
        commands = re.findall(
            r"TMPDIR=[^\n]*MPLCONFIGDIR=(?:[^\n]*\\\n)*[^\n]*monailabel start_server", doc.read_text()
        )
        assert commands, doc.name


def test_every_documented_start_command_binds_loopback():
    dry = subprocess.run(["make", "-n", "serve"], cwd=REPO, capture_output=True, text=True)
    assert "--host 127.0.0.1" in dry.stdout, dry.stdout + dry.stderr
    for doc in [REPO / "README.md", APP_DIR / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        text = doc.read_text()
        commands = re.findall(r"monailabel start_server(?= --| \\)(?:[^\n]*\\\n)*[^\n]*", text)  # not prose
        for command in commands:
            assert "--host 127.0.0.1" in command, (doc.name, command)


def test_app_readme_and_pacs_doc_describe_the_security_model():
    for doc in (APP_DIR / "README.md", REPO / "docs" / "pacs.md"):
        text = doc.read_text()
        assert "## Security model" in text, doc
        for words in ("RADREGION_API_TOKEN", "Authorization: Bearer", "api_token", "TLS", "cors_origins"):
            assert words in text, (doc.name, words)


def test_a_pacs_image_id_cannot_name_a_file_outside_its_cache(tmp_path):
    """DICOMweb datastore: the id is a file name in the image cache (and part of a WADO-RS URL)."""
    import sys

    sys.path.insert(0, str(APP_DIR))
    from lib.datastore.dicomweb import RadRegionDICOMwebDatastore
    from lib.names import BadNameError

    outside = tmp_path / "outside.dcm"
    dicom_factory.write(outside)
    store = RadRegionDICOMwebDatastore("http://127.0.0.1:9", tmp_path / "cache", retries=0)
    for image_id in ("../../outside", str(tmp_path / "outside"), "a/b", "x\ny"):
        with pytest.raises(BadNameError):
            store.get_image_uri(image_id)
