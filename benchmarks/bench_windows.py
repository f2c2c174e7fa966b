"""Window preparation: our per-run path vs a per-event path like the original's.

Writes a synthetic NSD subject with real-size volumes (81x104x83x226, ~15.7k
nsdgeneral voxels, ~62 events per run, as in NSD), then in fresh subprocesses:

- per-run (ours): load each run once, streaming volumes and masking them before
  any float conversion, clean in float32, cut every event's window;
- per-event (the original's recipe): for every event, reload the whole run as
  float64 (``get_fdata``), mask it, clean it with ``nilearn.signal.clean``
  (detrend, zscore_sample), cut that event's window.

Prints wall time per run and peak RSS of each path, and their ratios. The
per-event path costs the same for every event of a run, so by default it is
timed on ``--events`` events per run and scaled to the run's event count
(``--full`` times all of them). Usage::

    .venv/bin/python benchmarks/bench_windows.py [--runs 2] [--events 4] [--full]
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import json, resource, sys, time
import numpy as np
from pathlib import Path
from dynadiff.data import nsd
from dynadiff.data.dataset import load_mask, load_masked_run
from dynadiff.data.preprocess import TR, detrend_zscore, extract_windows

root, mode, max_events = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
runs = [r for r in nsd.list_runs(1, [1]) if r.timeseries_path(root).exists()]
t0 = time.perf_counter()
mask = load_mask(root, 1)
n_events, n_done, out = 0, 0, []
for run in runs:
    volumes, _ = nsd.events_of_design(nsd.load_design(run.design_path(root), 225))
    n_events += len(volumes)
    if mode == "per_run":
        out.append(extract_windows(detrend_zscore(load_masked_run(run.timeseries_path(root), mask)), volumes))
        n_done += len(volumes)
    else:
        import nibabel as nib
        from nilearn.signal import clean
        for t in volumes[:max_events]:
            data = nib.load(run.timeseries_path(root)).get_fdata()  # float64 4D, reloaded per event
            x = clean(data[mask][:, :225].T, detrend=True, standardize="zscore_sample", high_pass=None, t_r=TR)
            out.append(x.T[:, t + 3 : t + 9].astype(np.float32))
            n_done += 1
elapsed = time.perf_counter() - t0
print(json.dumps({"seconds": elapsed, "events_done": n_done, "events": n_events, "runs": len(runs),
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def run_child(root: Path, mode: str, max_events: int) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, str(root), mode, str(max_events)],
                          capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=2, help="runs to write and process")
    parser.add_argument("--events", type=int, default=4, help="per-event path: events timed per run")
    parser.add_argument("--full", action="store_true", help="time the per-event path on every event")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        # 62 trials per run as in NSD: 20 test images (3/2/1 repetitions) + unique images x 3.
        # Written in a subprocess: a child forked from a big parent inherits its peak RSS.
        n_unique = max(1, (62 * args.runs - 40) // 3)
        write = (
            "import sys; from dynadiff.data.synthetic import write_synthetic_nsd; "
            f"i = write_synthetic_nsd(sys.argv[1], subjects=(1,), sessions=(1,), runs_per_session={args.runs}, "
            f"n_test=20, n_unique={n_unique}, volume_shapes={{1: (81, 104, 83)}}, visual_fraction=0.0503); "
            "print(i['n_voxels'][1])"
        )
        n_voxels = subprocess.run([sys.executable, "-c", write, str(root)], capture_output=True, text=True,
                                  check=True).stdout.split()[-1]
        print(f"wrote {args.runs} real-size runs ({n_voxels} nsdgeneral voxels) in {time.perf_counter() - t0:.0f} s")
        ours = run_child(root, "per_run", 0)
        orig = run_child(root, "per_event", 10**9 if args.full else args.events)
    per_event_s = orig["seconds"] / orig["events_done"]
    orig_run_s = per_event_s * orig["events"] / orig["runs"]
    ours_run_s = ours["seconds"] / ours["runs"]
    print(f"events per run: {ours['events'] / ours['runs']:.0f}")
    print(f"per-run (ours):      {ours_run_s:7.2f} s/run   peak RSS {ours['peak_rss_mb']:7.0f} MB")
    print(f"per-event (original): {orig_run_s:7.2f} s/run   peak RSS {orig['peak_rss_mb']:7.0f} MB   "
          f"({per_event_s:.2f} s/event x {orig['events'] / orig['runs']:.0f} events"
          f", measured on {orig['events_done']})")
    print(f"speed-up: {orig_run_s / ours_run_s:.1f}x   peak RSS ratio (ours/original): "
          f"{ours['peak_rss_mb'] / orig['peak_rss_mb']:.2f}")


if __name__ == "__main__":
    main()
