"""Data time of a time course: a 16-offset sweep against one offset, and against windows cached per offset.

Writes a synthetic NSD subject with real-size volumes (81x104x83x226, ~15.7k nsdgeneral voxels), then, each in a
fresh subprocess with an empty cache:

- ``sweep, 1 offset``: ``SweepData`` (the cleaned runs, cached by ``RunSeriesConfig``) and every test image's
  6-TR window at offset +3 (eval.py's);
- ``sweep, 16 offsets``: the same for offsets -3 .. 12 (timecourse.py's default);
- ``per-offset windows``: eval.py's data path once per offset (``NsdDatasetConfig.build()`` with the offset's
  ``offset``/``duration``): each offset caches its own windows, so every run is loaded and cleaned again.

Prints the wall time and the number of runs loaded of each. Usage::

    .venv/bin/python benchmarks/bench_timecourse_data.py [--runs 3]
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import json, sys, time
from pathlib import Path
import numpy as np
from dynadiff.config import NsdDatasetConfig
from dynadiff.data import dataset
from dynadiff.data.preprocess import window_seconds
from dynadiff.timecourse import SweepData, plan

root, cache, mode = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
loads = []
real = dataset.load_masked_run
dataset.load_masked_run = lambda path, *a, **k: loads.append(str(path)) or real(path, *a, **k)
cfg = NsdDatasetConfig(nsddata_path=root, subject=1, sessions=[1], infra={"folder": str(cache)})
offsets = [3] if mode == "sweep1" else list(range(-3, 13))
t0 = time.perf_counter()
windows = 0
if mode.startswith("sweep"):
    data = SweepData(cfg)
    for p in plan(data, offsets, 6, len(data.samples)):
        for i in p.images:
            windows += float(data.window(i, p.offset, 6).sum()) != 0.0
else:
    for k in offsets:
        offset, duration = window_seconds(k, k + 6)
        ds = cfg.model_copy(update={"offset": offset, "duration": duration}).build()
        for i in range(len(ds)):
            windows += float(ds.brain(i).sum()) != 0.0
print(json.dumps({"seconds": time.perf_counter() - t0, "loads": len(loads), "runs": len(set(loads)),
                  "windows": int(windows)}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3, help="runs to write (each has test events)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "nsd"
        t0 = time.perf_counter()
        # 62 trials per run as in NSD; onsets from volume 2: offset -3 leaves some events out (counted, not padded)
        n_unique = max(1, (62 * args.runs - 40) // 3)
        write = (
            "import sys; from dynadiff.data.synthetic import write_synthetic_nsd; "
            "from dynadiff.data.stimuli import write_test_ids; "
            f"i = write_synthetic_nsd(sys.argv[1], subjects=(1,), sessions=(1,), runs_per_session={args.runs}, "
            f"n_test=20, n_unique={n_unique}, volume_shapes={{1: (81, 104, 83)}}, visual_fraction=0.0503); "
            "write_test_ids(sys.argv[1]); print(i['n_voxels'][1])"
        )
        n_voxels = subprocess.run([sys.executable, "-c", write, str(root)], capture_output=True, text=True,
                                  check=True).stdout.split()[-1]
        print(f"wrote {args.runs} real-size runs ({n_voxels} nsdgeneral voxels) in {time.perf_counter() - t0:.0f} s")
        results = {}
        for mode, label in (("sweep1", "sweep, 1 offset"), ("sweep16", "sweep, 16 offsets"),
                            ("per_offset", "per-offset windows, 16 offsets")):
            cache = Path(tmp) / f"cache_{mode}"
            proc = subprocess.run([sys.executable, "-c", CHILD, str(root), str(cache), mode], capture_output=True,
                                  text=True, check=True)
            results[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
            r = results[mode]
            print(f"{label:32s} {r['seconds']:7.1f} s   runs loaded {r['loads']:3d} ({r['runs']} distinct)   "
                  f"windows {r['windows']}")
    print(f"16 offsets / 1 offset (sweep): {results['sweep16']['seconds'] / results['sweep1']['seconds']:.2f}x; "
          f"per-offset windows / sweep, 16 offsets: "
          f"{results['per_offset']['seconds'] / results['sweep16']['seconds']:.1f}x")


if __name__ == "__main__":
    main()
