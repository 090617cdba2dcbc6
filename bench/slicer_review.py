"""Annotator wait in the Slicer extension: what one key press costs through RadRegionLib against a real server.

Per case: Enter = submit the decision (PUT label) + next case (active learning) + its prediction (infer) + the image
download, p50/p95 per queue, without and with the panel's prefetch (the next case loaded in the background while
the annotator looks at the current one for --look-s seconds); then the time to deliver decisions that waited in
the outbox while the server was down.

    .venv/bin/python bench/slicer_review.py [--model BUNDLE] [--cases 25] [--outbox 20] [--look-s 1.0]

Without --model it uses the default model ($RADREGION_MODEL, else the shipped model). The server is started by
radregion_harness, as the tests start it.
"""

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from RadRegionLib import Decision, RadRegionClient, ReviewSession

from radregion.bundle import resolve_model
from radregion.errors import RadiographError
from radregion_harness import start_server

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("RADREGION_SHARED_DATA", REPO.parent / "shared" / "data"))


def percentiles(seconds):
    ms = sorted(s * 1000 for s in seconds)
    return statistics.median(ms), ms[min(len(ms) - 1, int(round(0.95 * (len(ms) - 1))))]


def wait_for_case(session, queue, limit_s=300):
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if session.next_case(queue):
            return
        time.sleep(2)
    raise RuntimeError(f"queue {queue} gave no case in {limit_s} s: {session.status_message}")


def review_loop(session, queue, cases, look_s=0.0):
    wait_for_case(session, queue)
    times = []
    for _ in range(cases):
        time.sleep(look_s)  # the annotator looks at the case (the prefetch works meanwhile)
        start = time.perf_counter()
        session.submit()  # Enter: confirm the prediction, load the next case
        times.append(time.perf_counter() - start)
        if session.current is None:
            break
    return times


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path)
    parser.add_argument("--cases", type=int, default=25)
    parser.add_argument("--outbox", type=int, default=20)
    parser.add_argument("--look-s", type=float, default=1.0, help="how long the annotator looks at each case")
    args = parser.parse_args()
    try:
        model = resolve_model(args.model)
    except RadiographError as error:
        parser.error(str(error))
    print(f"model: {model}")

    work = Path(tempfile.mkdtemp(prefix="radregion-bench-"))
    os.environ.setdefault("RADREGION_CACHE", str(work / "cache"))
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        studies = work / "studies"
        studies.mkdir()
        needed = 4 * args.cases + args.outbox + 8
        for png in sorted((SHARED / "unifesp" / "images").glob("*.png"))[:needed]:
            shutil.copy(png, studies / png.name)
        server = start_server(studies, model, log_path=work / "server.log")
        try:
            print(
                f"{'queue':<12}{'prefetch':<10}{'cases':>7}{'p50 ms':>9}{'p95 ms':>9}  "
                f"(Enter -> label saved, next case shown; {args.look_s:g} s look at each case)"
            )
            for prefetch in (False, True):
                session = ReviewSession(
                    RadRegionClient(server.url), str(work / f"slicer-{prefetch}"), annotator="bench", prefetch=prefetch
                )
                session.connect()
                for queue in ("random", "uncertain"):
                    times = review_loop(session, queue, args.cases, args.look_s)
                    p50, p95 = percentiles(times)
                    print(f"{queue:<12}{'on' if prefetch else 'off':<10}{len(times):>7}{p50:>9.0f}{p95:>9.0f}")
                session.close()

            wait_for_case(session, "random")
            server.stop()
            first = session.current.image
            session.submit()  # Enter while the server is down: the decision waits in the outbox
            others = [p.stem for p in sorted(studies.glob("*.png"), reverse=True) if p.stem != first]
            for image in others[: args.outbox - 1]:  # more decisions made during the outage
                session.outbox.append(Decision(image, region=session.regions[0], annotator="bench"))
            server.start()
            start = time.perf_counter()
            delivered = session.flush()
            elapsed = time.perf_counter() - start
            print(
                f"outbox after a server restart: {delivered} decisions delivered in {elapsed * 1000:.0f} ms "
                f"({elapsed / max(delivered, 1) * 1000:.1f} ms each)"
            )
        finally:
            server.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
