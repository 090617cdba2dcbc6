"""Server latency: p50/p95 of `POST /infer/radregion` for a PNG and a 2k x 2k JPEG 2000 DICOM (cold = the image
was never decoded, warm = cleaned image in the image cache), throughput and p95 with 1 and 8 concurrent clients,
each with and without label saves running at the same time (one client saving labels back to back), and the
server's overhead per image against the engine's Predictor (what `radregion predict` runs) on the same files.

    .venv/bin/python bench/server_latency.py [--model BUNDLE] [--requests 30] [--clients 8] [--per-client 25]

Without --model it uses the default model ($RADREGION_MODEL, else the shipped model). The server (started by
radregion_harness, as the tests start it) runs with OMP_NUM_THREADS=1 unless set.
"""

import argparse
import os
import shutil
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from radregion.errors import RadiographError
from radregion_harness import AUTH, start_server

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("RADREGION_SHARED_DATA", REPO.parent / "shared" / "data"))
DICOM_2K = SHARED / "dicom" / "RG1_J2KI.dcm"  # 1955 x 1841, JPEG 2000 lossy


TASK_SECONDS = []  # the infer task's own time per request, as the server reports it


def percentiles(seconds):
    ms = sorted(s * 1000 for s in seconds)
    return statistics.median(ms), ms[min(len(ms) - 1, int(round(0.95 * (len(ms) - 1))))]


def distinct_copies(source: Path, folder: Path, n: int, stem: str) -> list:
    """n byte-distinct copies (DICOM preamble / PNG trailing bytes differ) so that each one is a cache miss."""
    data = source.read_bytes()
    out = []
    for k in range(n):
        path = folder / f"{stem}{k:03d}{source.suffix}"
        tag = f"bench-{k:06d}".encode()
        if source.suffix == ".dcm":
            path.write_bytes(tag + data[len(tag) :])  # preamble bytes, ignored by readers
        else:
            path.write_bytes(data + tag)  # after IEND, ignored by PNG readers
        out.append(path)
    return out


def session_with_token():
    import requests

    session = requests.Session()
    session.headers.update(AUTH)  # every POST needs the API token the benchmark's servers get
    return session


def timed_infer(session, url, image_id):
    start = time.perf_counter()
    answer = session.post(f"{url}/infer/radregion", params={"image": image_id, "output": "json"}, timeout=300)
    elapsed = time.perf_counter() - start
    if answer.status_code != 200:
        raise RuntimeError(f"{image_id}: HTTP {answer.status_code} {answer.text[:200]}")
    TASK_SECONDS.append(answer.json().get("latencies", {}).get("total", float("nan")))
    return elapsed


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path)
    parser.add_argument("--requests", type=int, default=30)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--per-client", type=int, default=25)
    args = parser.parse_args()
    if args.requests < 2:
        parser.error("--requests must be 2 or more (the first one warms up the server)")
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch is imported: the engine here runs as the server does
    from radregion.bundle import resolve_model

    try:
        model = resolve_model(args.model)
    except RadiographError as error:
        parser.error(str(error))
    print(f"model: {model}")

    work = Path(tempfile.mkdtemp(prefix="radregion-bench-"))
    try:
        studies = work / "studies"
        studies.mkdir()
        png = sorted((SHARED / "unifesp" / "images").glob("*.png"))[0]
        n = args.requests
        pngs = distinct_copies(png, studies, n, "png")
        dicoms = distinct_copies(DICOM_2K, studies, n, "dcm")
        os.environ["MONAI_LABEL_AUTO_UPDATE_SCORING"] = "false"  # its scoring at start would cache every image
        os.environ["RADREGION_CACHE"] = str(work / "server-cache")
        server = start_server(studies, model, log_path=work / "server.log")
        os.environ["RADREGION_CACHE"] = str(work / "engine-cache")  # its own cache: cold misses there too
        try:
            from radregion.inference import Predictor

            model_dir = studies / ".radregion" / "model"
            engine = Predictor(model_dir, workers=0, cache=True)  # as the server: through the image cache
            engines = {"cold": engine, "warm": engine}
            session = session_with_token()
            timed_infer(session, server.url, "png000")  # first request: lazy imports, model warm-up
            list(engine.predict([pngs[0]]))

            def engine_time(kind, path):
                start = time.perf_counter()
                list(engines[kind].predict([path], batch_size=1))
                return time.perf_counter() - start

            # server and engine alternate image by image, so both see the same machine load
            table = {}
            for name, files in (("PNG 320 px", pngs), (f"DICOM J2K {DICOM_2K.stem}", dicoms)):
                for kind, subset in (("cold", files[1:]), ("warm", files)):
                    del TASK_SECONDS[:]
                    pairs = [(timed_infer(session, server.url, f.stem), engine_time(kind, f)) for f in subset]
                    table[f"{name} {kind}"] = (pairs, list(TASK_SECONDS))
            print(
                f"{'image':<26}{'p50':>8}{'p95':>8}{'in task':>9}{'engine':>8}{'overhead':>10}  "
                f"(ms per request, p50 unless said, {n} requests, one image each)"
            )
            for key, (pairs, task) in table.items():
                server_p50, server_p95 = percentiles([a for a, _ in pairs])
                print(
                    f"{key:<26}{server_p50:>8.1f}{server_p95:>8.1f}{percentiles(task)[0]:>9.1f}"
                    f"{percentiles([b for _, b in pairs])[0]:>8.1f}"
                    f"{statistics.median([(a - b) * 1000 for a, b in pairs]):>10.1f}"
                )

            ids = [f.stem for f in pngs[:8]] + [f.stem for f in dicoms[:8]]
            label_ids = [f.stem for f in pngs[8:]] or [f.stem for f in pngs]
            print(
                f"\n{'clients':>7} {'label saves':>11} {'images/s':>9} {'p50 ms':>7} {'p95 ms':>7} "
                f"{'saves/s':>8} {'save p95 ms':>11}  (warm PNG+DICOM, {args.per_client} requests per client)"
            )
            for saving in (False, True):
                for clients in sorted({1, args.clients}):
                    row = load(server.url, ids, label_ids, clients, args.per_client, saving)
                    print(
                        f"{clients:>7} {'yes' if saving else 'no':>11} {row['images_s']:>9.1f} {row['p50']:>7.0f} "
                        f"{row['p95']:>7.0f} {row['saves_s']:>8.1f} {row['save_p95']:>11.0f}"
                    )
            start = time.perf_counter()
            list(Predictor(model_dir, workers=0, cache=False).predict(pngs, batch_size=32))
            print(
                f"engine, one batch of {len(pngs)} PNGs (as `radregion predict` runs a folder): "
                f"{(time.perf_counter() - start) / len(pngs) * 1000:.1f} ms per image"
            )
        finally:
            server.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)


def load(url, ids, label_ids, clients, per_client, saving) -> dict:
    """`clients` threads x `per_client` infers; with `saving`, one more client saves labels back to back meanwhile."""
    import json

    stop, saves = threading.Event(), []

    def saver():
        s, k = session_with_token(), 0
        while not stop.is_set():
            image_id = label_ids[k % len(label_ids)]
            k += 1
            start = time.perf_counter()
            answer = s.put(
                f"{url}/datastore/label",
                params={"image": image_id, "tag": "final"},
                timeout=300,
                files={"label": ("label.json", json.dumps({"region": "Chest", "annotator": "bench"}))},
            )
            if answer.status_code != 200:
                raise RuntimeError(f"label save {image_id}: HTTP {answer.status_code} {answer.text[:200]}")
            saves.append(time.perf_counter() - start)

    def client(c):
        s = session_with_token()
        return [timed_infer(s, url, ids[(c + k) % len(ids)]) for k in range(per_client)]

    save_thread = threading.Thread(target=saver, daemon=True) if saving else None
    start = time.perf_counter()
    if save_thread:
        save_thread.start()
    with ThreadPoolExecutor(clients) as pool:
        latencies = [t for ts in pool.map(client, range(clients)) for t in ts]
    wall = time.perf_counter() - start
    stop.set()
    if save_thread:
        save_thread.join()
    p50, p95 = percentiles(latencies)
    return {
        "images_s": len(latencies) / wall,
        "p50": p50,
        "p95": p95,
        "saves_s": len(saves) / wall,
        "save_p95": percentiles(saves)[1] if saves else float("nan"),
    }


if __name__ == "__main__":
    main()
