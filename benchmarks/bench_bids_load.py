"""Loading and cleaning a run: a BIDS run against an NSD run of the same size (issue 21).

Writes one synthetic subject with real-size volumes (81x104x83, ~15k visual voxels, 226 volumes; ``--runs``
runs of session 1) twice, from the same seed: in NSD's layout, and as BIDS at NSD's TR (raw int16 runs, and
fMRIPrep-style float32 ``desc-preproc`` runs). Then, in fresh subprocesses taking turns (``--repeats`` each),
the windows of every event of those runs are computed as the data configs compute them
(``dynadiff.data.dataset.compute_run_windows``: each run streamed, masked, detrended and z-scored once, then
every window cut, or for BIDS sampled at the window's seconds):

- ``nsd``: the NSD layout (slicing volumes);
- ``bids-raw``: the BIDS raw runs with the nsdgeneral mask (interpolation, exact on the grid);
- ``bids-derivatives``: the float32 preprocessed runs (twice the bytes of int16 to read).

Listing the trials (pybids indexing the dataset, headers and events) is timed apart: it happens once per
data config, not per run. Prints seconds per run (median over the repeats), peak RSS, the ratios to NSD, and
checks the windows agree. Usage::

    .venv/bin/python benchmarks/bench_bids_load.py [--runs 2] [--repeats 3]
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHAPE = (81, 104, 83)  # NSD's 1.8 mm grid

CHILD = r"""
import json, resource, sys, time
import numpy as np
from pathlib import Path
from dynadiff.config import BidsSource, NsdDatasetConfig
from dynadiff.data import nsd
from dynadiff.data.dataset import compute_run_windows, list_trials

root, mode = Path(sys.argv[1]), sys.argv[2]
if mode == "nsd":
    cfg = NsdDatasetConfig(nsddata_path=root / "nsd", subject=1, split="train", sessions=[1])
    runs = [r for r in nsd.list_runs(1, [1]) if r.timeseries_path(cfg.nsddata_path).exists()]
    t0 = time.perf_counter()
    items = []
    for run in runs:
        volumes, _ = nsd.events_of_design(nsd.load_design(run.design_path(cfg.nsddata_path), 225))
        items.append(nsd.RunEvents(run, tuple(int(v) for v in volumes)))
else:
    b = root / "bids"
    deriv = b / "derivatives" / "fmriprep"
    source = dict(root=b, test_images=b / "code" / "test_images.txt",
                  mask=str(deriv / "sub-{subject}/anat/sub-{subject}_space-T1w_desc-nsdgeneral_mask.nii.gz"))
    if mode == "bids-derivatives":
        source["derivatives"] = deriv
    t0 = time.perf_counter()
    items = []
    for split in ("test", "train"):
        cfg = NsdDatasetConfig(subject=1, split=split, sessions=[1], bids=BidsSource(**source))
        items += list_trials(cfg)[0]
    by_run = {}
    for item in items:  # both splits' events of a run together, in time order, as NSD's design lists them
        by_run.setdefault(item.run.uid, (item.run, []))[1].extend(item.volumes)
    items = [nsd.RunEvents(run, tuple(sorted(onsets))) for _, (run, onsets) in sorted(by_run.items())]
listing = time.perf_counter() - t0
t0 = time.perf_counter()
windows = list(compute_run_windows(cfg, items))
elapsed = time.perf_counter() - t0
np.save(root / f"windows_{mode}.npy", np.concatenate(windows))
print(json.dumps({"seconds": elapsed, "listing_s": listing, "runs": len(items),
                  "events": int(sum(len(w) for w in windows)), "voxels": int(windows[0].shape[1]),
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""

WRITE = r"""
import sys
from dynadiff.data.synthetic import write_synthetic_nsd
from dynadiff.data.synthetic_bids import write_synthetic_bids
root, runs = sys.argv[1], int(sys.argv[2])
params = dict(sessions=(1,), runs_per_session=runs, n_unique=(62 * runs - 40) // 3, n_test=20,
              volume_shapes={1: %r}, visual_fraction=0.05, seed=0)  # about NSD's 15.7k visual voxels
write_synthetic_nsd(root + "/nsd", subjects=(1,), **params)
write_synthetic_bids(root + "/bids", subjects=(1,), **params)
""" % (SHAPE,)


def run_child(root: Path, mode: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, str(root), mode], capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{mode} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=2, help="runs written and loaded (session 1)")
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per way, taking turns")
    args = parser.parse_args()
    modes = ("nsd", "bids-raw", "bids-derivatives")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", WRITE, str(root), str(args.runs)], check=True, capture_output=True)
        print(f"wrote {args.runs} real-size runs ({'x'.join(map(str, SHAPE))}x226) in NSD's layout and as BIDS "
              f"in {time.perf_counter() - t0:.0f} s")
        results: dict[str, list[dict]] = {m: [] for m in modes}
        for _ in range(args.repeats):
            for mode in modes:
                results[mode].append(run_child(root, mode))
        import numpy as np

        ref = np.load(root / "windows_nsd.npy")
        for mode in modes[1:]:
            diff = float(np.abs(np.load(root / f"windows_{mode}.npy") - ref).max())
            print(f"{mode}: windows equal NSD's to {diff:.1e} (max abs difference)")
    first = results["nsd"][0]
    print(f"\n{first['runs']} runs, {first['events']} events, {first['voxels']} voxels; median of {args.repeats} "
          "fresh processes each\n")
    print("| path | s / run (load + clean + windows) | listing the trials | peak RSS | ratio to NSD |")
    print("| --- | ---: | ---: | ---: | ---: |")
    base = statistics.median(r["seconds"] for r in results["nsd"]) / first["runs"]
    for mode in modes:
        per_run = statistics.median(r["seconds"] for r in results[mode]) / first["runs"]
        listing = statistics.median(r["listing_s"] for r in results[mode])
        rss = statistics.median(r["peak_rss_mb"] for r in results[mode])
        print(f"| {mode} | {per_run:.2f} | {listing:.2f} s | {rss:.0f} MB | {per_run / base:.2f}x |")


if __name__ == "__main__":
    main()
