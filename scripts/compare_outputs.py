"""Compare what two checkouts of dynadiff write, file for file: the demo (its eval.py and timecourse.py outputs, the
trained checkpoint, the sample grids) and a live.py replay on the demo's decoder.

    python scripts/compare_outputs.py --before /tmp/base [--after .] [--work /tmp/compare] [--full]

Each checkout runs with its own ``.venv`` (``./setup.sh`` there first), one after the other, into the same work
folder (paths are part of the configurations, so both must use the same ones); the files of the first run are
kept aside and compared with the second's. Exit status 0 when every compared file is byte-for-byte equal and the
demo printed the same metrics; else 1, listing the differences. ``--full``: the demo's real settings (about 8
minutes on 2 cores per checkout) instead of ``--fast`` (a minute or two).

Compared: every PNG, ``metrics.json``/``.md``, ``run.json`` and ``config.yaml`` of the evaluation folders;
``timecourse.json``/``.csv`` and the pictures of the time course; the checkpoints' ``model.safetensors`` (tensors
and metadata); the sample grids; the live replay's images. Run ids and exca cache folders are digests of the files'
modification times, so they differ between any two runs: folders are matched without their id, and the keys that
name a run (digests, run ids, output folders) are left out of JSON, YAML and safetensors metadata. Not compared:
files that hold times (``log.csv``, ``latency.csv``, ``trials.json``, ``demo_results.json``) and caches' internals.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

COMPARED = re.compile(r".*(\.png|metrics\.json|metrics\.md|run\.json|config\.yaml|timecourse\.json|timecourse\.csv|"
                      r"model\.safetensors)$")
SKIPPED_PARTS = {"cache", "replay_volumes", "nsddata", "versatile_diffusion"}  # inputs and caches, not outputs
METRIC_LINE = re.compile(r"^\| (PixCorr|SSIM|2-way identification, pixels) \|")


def run(repo: Path, work: Path, full: bool) -> str:
    """The demo, then a live replay of its first test run, with ``repo``'s code; returns the demo's printed table."""
    python = repo / ".venv" / "bin" / "python"
    if work.exists():
        shutil.rmtree(work)
    demo = [str(python), str(repo / "demo.py"), "--output", str(work / "demo"), *([] if full else ["--fast"])]
    out = subprocess.run(demo, cwd=repo, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"{repo}: demo failed:\n{out.stderr[-3000:]}")
    table = "\n".join(line for line in out.stdout.splitlines() if METRIC_LINE.match(line))
    demo_dir = work / "demo"
    nsd = demo_dir / "nsddata"
    runs = sorted(nsd.rglob("timeseries_session*_run*.nii.gz"))
    designs = sorted(nsd.rglob("design_session*_run*.tsv"))
    checkpoint = next(iter(sorted((demo_dir / "train" / "checkpoints").rglob("model.safetensors"))))
    config = (demo_dir / "train" / "config.yaml").read_text()
    size = re.search(r"image_size: (\d+)", config).group(1)
    tokens = re.search(r"n_tokens: (\d+)", config).group(1)
    live = [str(python), str(repo / "live.py"), "--replay", str(runs[0]), "--design", str(designs[0]), "--speed", "1000",
            "--out", str(work / "live"), "--checkpoint", str(checkpoint), "--vd_cache_dir",
            str(demo_dir / "versatile_diffusion"), "--nsddata_path", str(nsd), "--device", "cpu", "--steps", "2",
            f"versatilediffusion_config.image_size={size}", f"brain_modules_config.n_tokens={tokens}"]
    out = subprocess.run(live, cwd=repo, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"{repo}: live.py failed:\n{out.stderr[-3000:]}")
    return table


# run ids and exca cache folders are digests of the checkpoint's and the data's modification times: they differ
# between any two runs, so folders are compared by their name without the id, and these keys are left out
RUN_ID = re.compile(r"_[0-9a-f]{8}(?=/|$)")
VOLATILE_KEYS = re.compile(r"digest|run_id|^uid$|output_dir|latest_link")


def _stable(value):
    """A JSON or YAML value without the keys that name a run (digests of modification times)."""
    if isinstance(value, dict):
        return {k: _stable(v) for k, v in value.items() if not VOLATILE_KEYS.search(str(k))}
    if isinstance(value, list):
        return [_stable(v) for v in value]
    return value


def content(path: Path) -> bytes:
    """What is compared of a file: its bytes; a JSON or YAML file's values without the run-naming keys; a
    safetensors file's tensors and metadata (its training config without them)."""
    if path.suffix == ".json":
        return json.dumps(_stable(json.loads(path.read_text())), sort_keys=True).encode()
    if path.suffix == ".yaml":
        import yaml

        return json.dumps(_stable(yaml.safe_load(path.read_text())), sort_keys=True, default=str).encode()
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), "np") as f:
            meta = {k: _stable(json.loads(v)) if v.startswith(("{", "[")) else v
                    for k, v in (f.metadata() or {}).items()}
            h = hashlib.sha256(json.dumps(meta, sort_keys=True).encode())
            for key in sorted(f.keys()):
                h.update(key.encode() + f.get_tensor(key).tobytes())
        return h.digest()
    return path.read_bytes()


def digests(root: Path) -> dict[str, str]:
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if (p.is_file() and COMPARED.match(p.name) and not SKIPPED_PARTS & set(rel.parts) and ".part" not in p.name
                and not any(part.startswith("dynadiff.config.") for part in rel.parts)):
            out[RUN_ID.sub("_*", str(rel))] = hashlib.sha256(content(p)).hexdigest()
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--before", type=Path, required=True, help="the checkout to compare with (its .venv set up)")
    p.add_argument("--after", type=Path, default=Path(__file__).resolve().parents[1], help="default: this checkout")
    p.add_argument("--work", type=Path, default=Path("/tmp/dynadiff_compare"))
    p.add_argument("--full", action="store_true", help="the demo's real settings instead of --fast")
    args = p.parse_args(argv)
    tables, files = {}, {}
    for side, repo in (("before", args.before.resolve()), ("after", args.after.resolve())):
        print(f"{side}: {repo}", flush=True)
        tables[side] = run(repo, args.work / "run", args.full)
        files[side] = digests(args.work / "run")
    problems = []
    if tables["before"] != tables["after"]:
        problems.append(f"the demo printed other metrics:\n{tables['before']}\n---\n{tables['after']}")
    for name in sorted(set(files["before"]) | set(files["after"])):
        a, b = files["before"].get(name), files["after"].get(name)
        if a != b:
            problems.append(f"{name}: {'missing' if b is None else 'new' if a is None else 'differs'}")
    print(tables["after"])
    if problems:
        print(f"{len(problems)} difference(s):\n" + "\n".join(problems))
        return 1
    print(f"{len(files['after'])} files equal, byte for byte, and the same printed metrics "
          f"({sum('.png' in n for n in files['after'])} images)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
