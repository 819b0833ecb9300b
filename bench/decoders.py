"""Benchmark: the two decoder families pydicom can use, pylibjpeg (pylibjpeg-libjpeg,
-openjpeg, -rle) and GDCM (python-gdcm), on what modality_link decompresses (docs/design.md,
"Identity and transfer syntaxes").

Corpus: every compressed file of pydicom's test files, and one simulated 512x512 CT converted by
DCMTK (dcmcjpeg, dcmcjpls, dcmcrle) and by pydicom (JPEG 2000). For each file and each plugin:
does it decode (coverage), does it agree with the other plugin, and the best of --repeat decodes
(read + ``Dataset.decompress``, which is what the conversion does).

    python bench/decoders.py              # 512x512 CT, 5 repeats
    python bench/decoders.py --repeat 20
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom.uid import UID

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.support.transcode import TEST_FILES, VARIANTS, make, sim_ct  # noqa: E402

PLUGINS = ("pylibjpeg", "gdcm")


def decode(data: bytes, plugin: str) -> np.ndarray:
    ds = dcmread(io.BytesIO(data))
    ds.decompress(decoding_plugin=plugin, generate_instance_uid=False)
    return ds.pixel_array


def corpus(work: Path) -> list[tuple[str, bytes]]:
    files = []
    for f in sorted(TEST_FILES.glob("*.dcm")):
        try:
            ds = dcmread(f, stop_before_pixels=True)
            if UID(ds.file_meta.TransferSyntaxUID).is_compressed:
                files.append((f.name, f.read_bytes()))
        except Exception:
            continue
    src = sim_ct(work / "src")
    for v in VARIANTS:
        if v.tool == "dcmconv":
            continue
        files.append((f"CT512 {v.name}", make(v, src, work / f"{v.name}.dcm").read_bytes()))
    return files


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    with tempfile.TemporaryDirectory() as tmp:
        files = corpus(Path(tmp))
    totals = {p: 0.0 for p in PLUGINS}
    both = {p: 0.0 for p in PLUGINS}  # time on the files both decode
    ok = {p: 0 for p in PLUGINS}
    print(f"{'file':44} {'syntax':34} " + " ".join(f"{p:>12}" for p in PLUGINS) + "  agree")
    for name, data in files:
        ts = UID(dcmread(io.BytesIO(data), stop_before_pixels=True).file_meta.TransferSyntaxUID)
        arrays, times = {}, {}
        for p in PLUGINS:
            try:
                arrays[p] = decode(data, p)
            except Exception as exc:  # noqa: BLE001
                times[p] = f"FAIL {type(exc).__name__}"[:12]
                continue
            best = min(_timed(data, p) for _ in range(args.repeat))
            times[p] = best
            totals[p] += best
            ok[p] += 1
        for p in PLUGINS:
            if len(arrays) == len(PLUGINS):
                both[p] += times[p]
        agree = ""
        if len(arrays) == len(PLUGINS):
            a, b = arrays.values()
            agree = "yes" if a.shape == b.shape and np.array_equal(a, b) else \
                f"no (max diff {np.abs(a.astype(float) - b.astype(float)).max():.0f})" if a.shape == b.shape else "no (shape)"
        cells = " ".join(f"{t * 1000:10.2f}ms" if isinstance(t, float) else f"{t:>12}" for t in times.values())
        print(f"{name[:44]:44} {ts.name[:34]:34} {cells}  {agree}")
    print()
    for p in PLUGINS:
        print(f"{p:10}: decodes {ok[p]}/{len(files)}; total {totals[p] * 1000:.1f} ms; "
              f"on the files both decode {both[p] * 1000:.1f} ms")
    return 0


def _timed(data: bytes, plugin: str) -> float:
    t = time.perf_counter()
    decode(data, plugin)
    return time.perf_counter() - t


if __name__ == "__main__":
    sys.exit(main())
