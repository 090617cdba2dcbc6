"""Reading speed and memory: images/s for read + clean of the real CR DICOMs and the shared PNGs, and the peak
memory of reading one synthetic 8000 x 8000 16-bit DICOM (measured in a fresh subprocess).

    .venv/bin/python bench/io.py [--size 224] [--pngs 300] [--repeats 3] [--large 8000]
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from radregion.cache import READ_OVERSAMPLE
from radregion.cleaning import CleaningSettings, clean
from radregion.dicomwrite import array_to_dicom
from radregion.io import read_radiograph

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def rate(paths, settings, max_size) -> float:
    start = time.perf_counter()
    for path in paths:
        clean(read_radiograph(path, max_size=max_size).image, settings)
    return len(paths) / (time.perf_counter() - start)


def peak_memory(path: Path, max_size) -> dict:
    """In a fresh subprocess: growth of the RSS high-water mark and tracemalloc peak for one read + clean."""
    code = f"""
import json, tracemalloc
from radregion.io import read_radiograph
from radregion.cache import READ_OVERSAMPLE
from radregion.cleaning import CleaningSettings, clean

def status(field):  # kB figures of /proc/self/status
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field + ":"))

clean(read_radiograph({str(DATA / "dicom" / "RG3_J2KR.dcm")!r}, max_size=64).image, CleaningSettings(size=64))
open("/proc/self/clear_refs", "w").write("5")  # reset the RSS high-water mark (VmHWM)
before = status("VmRSS")
tracemalloc.start()
image = read_radiograph({str(path)!r}, max_size={max_size!r}).image
clean(image, CleaningSettings())
peak = tracemalloc.get_traced_memory()[1]
print(json.dumps({{"rss_growth_mb": (status("VmHWM") - before) / 1024, "tracemalloc_peak_mb": peak / 2**20,
                  "shape": list(image.shape)}}))
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--pngs", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--large", type=int, default=8000, help="side of the synthetic 16-bit DICOM")
    args = parser.parse_args()
    settings = CleaningSettings(size=args.size)
    clean(read_radiograph(DATA / "dicom" / "RG3_J2KR.dcm", max_size=64).image, settings)  # imports, warm-up

    dicoms = sorted((DATA / "dicom").glob("*.dcm")) * args.repeats
    print(
        f"real CR DICOMs (JPEG 2000, ~1800 px): read + clean, max_size={READ_OVERSAMPLE * args.size}: "
        f"{rate(dicoms, settings, READ_OVERSAMPLE * args.size):.2f} images/s"
    )
    print(
        f"real CR DICOMs (JPEG 2000, ~1800 px): read + clean, full size:     "
        f"{rate(dicoms, settings, None):.2f} images/s"
    )
    pngs = sorted((DATA / "unifesp" / "images").glob("*.png"))[: args.pngs]
    print(f"UNIFESP PNGs (8-bit, 320 px), {len(pngs)} files: read + clean: {rate(pngs, settings, None):.1f} images/s")

    with tempfile.TemporaryDirectory() as folder:
        side = args.large
        rows = np.arange(side, dtype=np.uint32)[:, None]
        image = ((rows * 7 + np.arange(side, dtype=np.uint32)[None, :] * 3) % 60000).astype(np.uint16)
        path = array_to_dicom(image, Path(folder) / "large.dcm", bits_stored=16)
        del image
        size_mb = path.stat().st_size / 2**20
        for max_size in (READ_OVERSAMPLE * args.size, None):
            figures = peak_memory(path, max_size)
            print(
                f"{side}x{side} 16-bit DICOM ({size_mb:.0f} MB), read max_size={max_size} + clean: "
                f"RSS growth {figures['rss_growth_mb']:.0f} MB, tracemalloc peak "
                f"{figures['tracemalloc_peak_mb']:.0f} MB, decoded {figures['shape']}"
            )
    print("(RSS growth: peak resident memory during the read + clean above the level before it; Linux only)")


if __name__ == "__main__":
    main()
