"""Peak memory of stimulus extraction for two brick sizes: it must not grow with the brick.

    .venv/bin/python benchmarks/bench_stimuli_rss.py                 # 200 and 2000 images, 2 workers
    .venv/bin/python benchmarks/bench_stimuli_rss.py --sizes 100 1000 --workers 4

For each size, a temporary ``nsd_stimuli.hdf5`` with ``imgBrick`` (n, 425, 425, 3)
uint8 is written (smooth random images, written in slices), then
:func:`dynadiff.data.stimuli.extract_stimuli` runs in a fresh Python process that
reports its own peak RSS and the largest peak RSS of its worker processes
(``VmHWM`` of ``/proc/self/status``: ``ru_maxrss`` of a fresh process would
include the RSS of the process that forked it; workers: ``getrusage`` of the
children). As a reference, another fresh process reads the whole brick at once
(what streaming avoids) and reports its peak RSS. Linux only.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SIZE = 425

_PEAK = """
def peak_kib():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
"""

_EXTRACT = _PEAK + """
import json, resource, sys, time
from dynadiff.data.stimuli import extract_stimuli
brick, out, workers, chunk_rows = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
t = time.perf_counter()
summary = extract_stimuli(brick, out, workers=workers, chunk_rows=chunk_rows)
print(json.dumps({
    "seconds": time.perf_counter() - t,
    "written": summary.written,
    "self_kib": peak_kib(),
    "children_kib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,
}))
"""

_NAIVE = _PEAK + """
import json, sys
import h5py, numpy as np
with h5py.File(sys.argv[1], "r") as f:
    brick = f["imgBrick"][:]
print(json.dumps({"self_kib": peak_kib(), "nbytes": int(brick.nbytes)}))
"""


_WRITE = """
import sys
import h5py, numpy as np
path, n, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rng = np.random.default_rng(0)
with h5py.File(path, "w") as f:  # (n, size, size, 3) uint8: upsampled 17x17 colour noise + mild noise
    ds = f.create_dataset("imgBrick", shape=(n, size, size, 3), dtype=np.uint8)
    for start in range(0, n, 20):
        m = min(20, n - start)
        coarse = rng.integers(0, 220, size=(m, 17, 17, 3), dtype=np.uint8)
        block = np.repeat(np.repeat(coarse, size // 17, axis=1), size // 17, axis=2)
        ds[start : start + m] = block + rng.integers(0, 35, size=block.shape, dtype=np.uint8)
print("{}")
"""


def run_json(code: str, *args) -> dict:
    proc = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "TQDM_DISABLE": "1"})
    if proc.returncode != 0:
        raise RuntimeError(f"subprocess failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs=2, default=[200, 2000], help="numbers of images of the two bricks")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--chunk-rows", type=int, default=32)
    parser.add_argument("--tmp", type=Path, default=None, help="folder for the temporary bricks")
    args = parser.parse_args()

    rows = []
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        for n in args.sizes:
            brick = Path(tmp) / f"bricks_{n}.hdf5"
            t = time.perf_counter()
            run_json(_WRITE, brick, n, SIZE)  # in another process: this one stays small
            made = time.perf_counter() - t
            result = run_json(_EXTRACT, brick, Path(tmp) / f"png_{n}", args.workers, args.chunk_rows)
            if result["written"] != n:
                raise RuntimeError(f"expected {n} PNGs, got {result['written']}")
            naive = run_json(_NAIVE, brick)
            rows.append((n, brick.stat().st_size, made, result, naive))
            brick.unlink()

    print(f"stimulus extraction, {args.workers} worker process(es), chunk_rows={args.chunk_rows}")
    print(f"{'images':>7} {'brick':>9} {'extract s':>10} {'main MiB':>9} {'worker MiB':>11} {'whole-read MiB':>15}")
    for n, nbytes, _, r, naive in rows:
        print(f"{n:>7} {nbytes / 2**20:>8.0f}M {r['seconds']:>10.1f} {r['self_kib'] / 1024:>9.1f} "
              f"{r['children_kib'] / 1024:>11.1f} {naive['self_kib'] / 1024:>15.1f}")
    (n0, _, _, r0, v0), (n1, _, _, r1, v1) = rows
    peak0 = max(r0["self_kib"], r0["children_kib"])
    peak1 = max(r1["self_kib"], r1["children_kib"])
    print(f"peak RSS ratio {n1} / {n0} images: {peak1 / peak0:.2f} (streamed; flat = 1.00)  "
          f"vs {v1['self_kib'] / v0['self_kib']:.2f} reading the whole brick; brick size ratio {n1 / n0:.1f}")


if __name__ == "__main__":
    main()
