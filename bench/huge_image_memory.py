"""Peak memory of reading one huge image the way the server and the cache do (`read_radiograph` with
max_size = READ_OVERSAMPLE x 224), per size and format, each read in a fresh subprocess; and where the decoded-bytes
limit ($RADREGION_MAX_DECODED_MB) refuses. Memory only, no timing.

    .venv/bin/python bench/huge_image_memory.py [--sizes 25,100,169] [--formats png8,png16,jpeg,dicom16]

"RSS growth" is the rise of the process's resident high-water mark (VmHWM, reset before the read) above the
resident size before it: everything the read allocated, numpy and decoders alike. Linux only.
"""

import argparse
import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from radregion.cache import READ_OVERSAMPLE
from radregion.dicomwrite import array_to_dicom
from radregion.pixels import MAX_DECODED_BYTES

MEASURE = """
import json, sys
import numpy as np
from PIL import Image
from radregion.errors import RadiographError
from radregion.io import read_radiograph

def status(field):  # kB figures of /proc/self/status
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field + ":"))

path, warm, max_size = sys.argv[1], sys.argv[2], int(sys.argv[3])
read_radiograph(warm, max_size=max_size)  # imports and first-call allocations out of the figure
open("/proc/self/clear_refs", "w").write("5")  # reset the RSS high-water mark (VmHWM)
before = status("VmRSS")
try:
    image = read_radiograph(path, max_size=max_size).image
    result = {"shape": list(image.shape)}
except RadiographError as error:
    result = {"refused": error.problem}
print(json.dumps({**result, "rss_growth_mb": (status("VmHWM") - before) / 1024}))
"""


def make_image(kind: str, megapixels: float, folder: Path) -> tuple[Path, int]:
    """A square test image of about `megapixels` (dark with bright lines: compresses well) and its decoded bytes
    at full size (1 byte a pixel at 8 bits, 2 at 16)."""
    side = int(math.sqrt(megapixels * 1e6))
    bits = 16 if kind.endswith("16") else 8
    dtype = np.uint16 if bits == 16 else np.uint8
    image = np.zeros((side, side), dtype)
    image[::97] = 4000 if bits == 16 else 255
    image[:, ::89] = 2000 if bits == 16 else 128
    path = folder / f"{kind}-{side}.{'dcm' if kind.startswith('dicom') else 'jpg' if kind == 'jpeg' else 'png'}"
    if kind.startswith("dicom"):
        array_to_dicom(image, path, bits_stored=bits)
    else:
        Image.fromarray(image).save(path, quality=90) if kind == "jpeg" else Image.fromarray(image).save(path)
    return path, image.nbytes


def measure(path: Path, warm: Path, max_size: int) -> dict:
    command = [sys.executable, "-c", MEASURE, str(path), str(warm), str(max_size)]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="25,100,169", help="megapixels, comma-separated")
    parser.add_argument("--formats", default="png8,png16,jpeg,dicom16")
    parser.add_argument("--size", type=int, default=224, help="model input size (max_size = READ_OVERSAMPLE x it)")
    args = parser.parse_args()
    max_size = READ_OVERSAMPLE * args.size
    print(f"decoded-bytes limit {MAX_DECODED_BYTES / 2**20:.0f} MiB; read with max_size={max_size}")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        warm = folder / "warm.png"
        Image.fromarray(np.arange(256 * 256, dtype=np.uint16).reshape(256, 256)).save(warm)
        for megapixels in (float(s) for s in args.sizes.split(",")):
            for kind in args.formats.split(","):
                path, decoded = make_image(kind, megapixels, folder)
                figures = measure(path, warm, max_size)
                outcome = f"refused ({figures['refused']})" if "refused" in figures else f"read {figures['shape']}"
                print(
                    f"{megapixels:5.0f} MP {kind:8s} file {path.stat().st_size / 2**20:6.1f} MiB, full-size pixels "
                    f"{decoded / 2**20:5.0f} MiB: RSS growth {figures['rss_growth_mb']:6.0f} MiB, {outcome}"
                )
                path.unlink()


if __name__ == "__main__":
    main()
