"""Data time of a time course: a 16-offset sweep against one offset, and against windows cached per offset.

Writes a synthetic NSD subject with real-size volumes (81x104x83x226, ~15.7k nsdgeneral voxels), then, each in a
fresh subprocess with an empty cache:

- ``sweep, 1 offset``: ``SweepData`` (the cleaned runs, cached by ``RunSeriesConfig``) and every test image's
  6-TR window at offset +3 (eval.py's);
- ``sweep, 16 offsets``: the same for offsets -3 .. 12 (timecourse.py's default);
- ``per-offset windows``: eval.py's windows once per offset (``NsdDatasetConfig.run_windows`` with the offset's
  ``offset``/``duration``, the events whose window fits their run): each offset caches its own windows, so every run is loaded and cleaned again. Each
  offset costs one full pass over the data, so it is timed on ``--timed-offsets`` offsets and scaled to 16.

One session of 12 runs (the dataset lists a session's runs). Prints the wall time and the number of runs loaded
of each. Usage::

    .venv/bin/python benchmarks/bench_timecourse_data.py [--timed-offsets 4]
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

root, cache, mode, timed = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
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
    from dynadiff.data import nsd
    from dynadiff.data.dataset import list_trials
    for k in offsets[:timed]:
        offset, duration = window_seconds(k, k + 6)
        cfg_k = cfg.infra.clone_obj(offset=offset, duration=duration)  # model_copy would keep cfg's cache uid
        items, _ = list_trials(cfg_k, check_windows=False)
        items = [nsd.RunEvents(it.run, tuple(t for t in it.volumes if 0 <= t + k and t + k + 6 <= 225), it.stamp)
                 for it in items]
        for w in cfg_k.run_windows([it for it in items if it.volumes]):
            windows += len(w)
print(json.dumps({"seconds": time.perf_counter() - t0, "loads": len(loads), "runs": len(set(loads)),
                  "windows": int(windows)}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--timed-offsets", type=int, default=4, help="per-offset windows: offsets timed (of 16)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "nsd"
        t0 = time.perf_counter()
        # 62 trials per run as in NSD; onsets from volume 2: offset -3 leaves some events out (counted, not padded)
        n_unique = (62 * 12 - 40) // 3
        write = (
            "import sys; from dynadiff.data.synthetic import write_synthetic_nsd; "
            "from dynadiff.data.stimuli import write_test_ids; "
            "i = write_synthetic_nsd(sys.argv[1], subjects=(1,), sessions=(1,), "
            f"n_test=20, n_unique={n_unique}, volume_shapes={{1: (81, 104, 83)}}, visual_fraction=0.0503); "
            "write_test_ids(sys.argv[1]); print(i['n_voxels'][1])"
        )
        n_voxels = subprocess.run([sys.executable, "-c", write, str(root)], capture_output=True, text=True,
                                  check=True).stdout.split()[-1]
        print(f"wrote 12 real-size runs ({n_voxels} nsdgeneral voxels) in {time.perf_counter() - t0:.0f} s")
        results = {}
        for mode, label in (("sweep1", "sweep, 1 offset"), ("sweep16", "sweep, 16 offsets"),
                            ("per_offset", "per-offset windows, 16 offsets")):
            cache = Path(tmp) / f"cache_{mode}"
            proc = subprocess.run([sys.executable, "-c", CHILD, str(root), str(cache), mode, str(args.timed_offsets)],
                                  capture_output=True,
                                  text=True)
            if proc.returncode:
                sys.exit(f"{label} failed:\n{proc.stderr[-3000:]}")
            results[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
            r = results[mode]
            if mode == "per_offset":  # scaled from the timed offsets to 16 (each a full pass over the data)
                r = results[mode] = {k: v * 16 / args.timed_offsets for k, v in r.items()}
                label += f" (timed on {args.timed_offsets}, x{16 / args.timed_offsets:g})"
            print(f"{label:46s} {r['seconds']:7.1f} s   runs loaded {r['loads']:5.0f}   windows {r['windows']:5.0f}")
    print(f"16 offsets / 1 offset (sweep): {results['sweep16']['seconds'] / results['sweep1']['seconds']:.2f}x; "
          f"per-offset windows / sweep, 16 offsets: "
          f"{results['per_offset']['seconds'] / results['sweep16']['seconds']:.1f}x")


if __name__ == "__main__":
    main()
