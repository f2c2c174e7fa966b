"""Decode each trial's image while the scanner is still running, and watch them arrive in a browser.

    python live.py --watch DIR (--design TSV | --onsets FILE | --events TSV) --out OUT [--serve] [options] [K=V ...]
    python live.py --replay RUN.nii.gz (--design TSV | --events TSV) --out OUT [--speed X] [--serve] ...
    python live.py --serve --out OUT          # only the page of an earlier session's folder

--watch: volumes arrive as files in DIR, one 3-D NIfTI per volume (.nii or .nii.gz), numbered (the last digits of
the name; --first-number N is volume 0), each read once complete. --replay: a recorded 4-D run written into
OUT/replay_volumes/ one volume per TR (or --speed X times faster), the folder the same watcher reads. Trials come
from NSD's design TSV (--design), from onset lines appended to a file as the experiment runs (--onsets: "VOLUME
[NSD_ID]" per line, "end" when no trial follows), or from a BIDS events.tsv (--events: onsets in seconds, each
trial labelled by the image its --image-column names; the window is then sampled at the checkpoint's seconds after
the onset on the run's own grid, any TR, by linear interpolation). --tr: seconds per volume; --replay reads it from
the run's NIfTI header (an explicit --tr that disagrees is an error), else NSD's 4/3.

Each trial is decoded as soon as its window (the checkpoint's, volumes t+3 .. t+8 for the published ones) is
complete, normalised with the volumes acquired so far only (docs/live.md: no volume from the future). Outputs in
OUT: {trial}.png, {trial}_truth.png where the image shown is known (its NSD id and the NSD folder, or its name
and --stimuli), latency.csv (one line per trial: when its last volume was written, when its image was),
trials.json. --serve: a page on localhost shows them as they arrive. The checkpoint, Versatile Diffusion folder
and config keys are eval.py's.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from pathlib import Path

from dynadiff.cli import ConfigError, setup_logging, validate, value_overrides
from dynadiff.commands import default_config

logger = logging.getLogger("dynadiff.live")
DEFAULT_CONFIG = default_config("config.yaml")
FLAG_KEYS = {"subject": "data.nsd_dataset_config.subject", "vd_cache_dir": "versatilediffusion_config.vd_cache_dir",
             "checkpoint": "checkpoint", "device": "device", "nsddata_path": "data.nsd_dataset_config.nsddata_path"}


def parse_args(argv=None) -> argparse.Namespace:
    from dynadiff.data.preprocess import TR

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = p.add_mutually_exclusive_group()
    source.add_argument("--watch", type=Path, metavar="DIR", help="folder the volumes arrive in")
    source.add_argument("--replay", type=Path, metavar="RUN", help="a recorded 4-D run (.nii.gz) played back")
    onsets = p.add_mutually_exclusive_group()
    onsets.add_argument("--design", type=Path, metavar="TSV", help="NSD's design TSV of the run (fixed up front)")
    onsets.add_argument("--onsets", type=Path, metavar="FILE", help="onset lines 'VOLUME [NSD_ID]', read as they come")
    onsets.add_argument("--events", type=Path, metavar="TSV", help="a BIDS events.tsv of the run: onsets in seconds, "
                        "the image of each trial in --image-column (rows without one are not trials)")
    p.add_argument("--image-column", default="stim_file", metavar="NAME",
                   help="--events: the column naming the image (default BIDS's stim_file)")
    p.add_argument("--stimuli", type=Path, metavar="DIR", help="--events: the folder of the images the events name "
                   "(the ground truth shown beside each reconstruction)")
    p.add_argument("--out", type=Path, required=True, help="output folder (kept trials are not decoded again)")
    p.add_argument("--serve", action="store_true", help="serve the page of OUT on localhost (Ctrl-C ends it)")
    p.add_argument("--port", type=int, default=8765, help="the page's port (0: any free one; default 8765)")
    p.add_argument("--host", default="127.0.0.1", help="the page's address (default 127.0.0.1: this machine only)")
    p.add_argument("--speed", type=float, default=1.0, help="--replay: X times faster than the scanner")
    p.add_argument("--replay-gz", action="store_true", help="--replay: write .nii.gz volumes (default .nii)")
    p.add_argument("--steps", type=int, default=10, help="sampling steps per image (default 10; eval.py: 20)")
    p.add_argument("--mask", type=Path, help="the subject's mask, 3-D NIfTI (> 0); default its nsdgeneral in the "
                   "NSD folder")
    p.add_argument("--prior-run", type=Path, metavar="RUN", help="an earlier 4-D run of the subject whose detrended "
                   "variance seeds the scale of each voxel (docs/live.md)")
    p.add_argument("--first-number", type=int, default=0, help="--watch: the number of the first volume's file")
    p.add_argument("--n-volumes", type=int, help="--watch: the run's length in volumes, when known")
    p.add_argument("--tr", type=float, help=f"seconds per volume (default: --replay, the run's NIfTI header; else "
                   f"NSD's {TR:.4f})")
    p.add_argument("--give-up-trs", type=float, default=0.0,
                   help="end the session after this many TRs without a new volume (default 0: never)")
    p.add_argument("--subject", type=int,
                   help="NSD subject: 1, 2, 5 or 7 (default: from the config, 1); with a BIDS source, the "
                   "participant whose label ends with it")
    p.add_argument("--checkpoint", type=Path, help="checkpoint folder or .safetensors (default checkpoints/subjXX)")
    p.add_argument("--vd_cache_dir", type=Path, help="local Versatile Diffusion folder (Hugging Face layout)")
    p.add_argument("--nsddata_path", type=Path, help="the NSD folder: the mask and the stimuli (ground truth)")
    p.add_argument("--device", help="auto, cpu, cuda, cuda:1 ...")
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="base YAML config")
    p.add_argument("--verbose", action="store_true")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, applied last")
    args = p.parse_intermixed_args(argv)
    if (args.watch or args.replay) and not (args.design or args.onsets or args.events):
        p.error("--watch and --replay need the trials: --design TSV, --onsets FILE or --events TSV")
    if args.replay and args.onsets:
        p.error("--replay plays a run with its --design or --events")
    if args.stimuli is not None and args.events is None:
        p.error("--stimuli names the images of --events: give --events TSV")
    if not (args.watch or args.replay or args.serve):
        p.error("give --watch DIR or --replay RUN (or --serve alone, to show an earlier session's folder)")
    if args.steps < 1 or args.speed <= 0 or (args.tr is not None and args.tr <= 0):
        p.error("--steps, --speed and --tr must be positive")
    return args


def resolve_config(args: argparse.Namespace):
    """eval.py's configuration, its checkpoint's brain module and window applied, the inputs checked."""
    from dynadiff.config import EvalConfig
    from dynadiff.decoder import CheckpointInfo, default_checkpoint
    from dynadiff.evaluation import EvaluationError, resolve_device
    from dynadiff.models.vd import check_vd_folder
    from dynadiff.resolve import eval_tree, given_keys, with_checkpoint

    tree = eval_tree(args.config, value_overrides(args, FLAG_KEYS), args.overrides)
    cfg = validate(EvalConfig, tree)
    resolve_device(cfg.device)
    subject = cfg.data.nsd_dataset_config.subject
    checkpoint = CheckpointInfo.read(cfg.checkpoint or default_checkpoint(subject))
    checkpoint.layout(subject)
    try:
        check_vd_folder(cfg.versatilediffusion_config.vd_cache_dir)
    except (FileNotFoundError, ValueError) as e:
        raise EvaluationError(str(e)) from e
    return with_checkpoint(tree, checkpoint, given_keys(args.overrides))


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_logging(args.verbose)
    from dynadiff.data.nsd import NsdDataError
    from dynadiff.evaluation import EvaluationError
    from dynadiff.live.watch import LiveInputError

    server = None
    try:
        if args.serve:
            from dynadiff.live.server import ServeError, start_server

            args.out.mkdir(parents=True, exist_ok=True)
            try:
                server = start_server(args.out, host=args.host, port=args.port)
            except ServeError as e:
                logger.error("%s", e)
                return 1
            print(f"Live page: {server.url}", flush=True)
        if args.watch or args.replay:
            summary = run_session(args)
            print(json.dumps(summary, indent=1), flush=True)
            if summary["waiting"]:
                logger.error("%d trial(s) were still waiting for their volumes when the session ended: %s",
                             len(summary["waiting"]), ", ".join(summary["waiting"]))
                return 1
        if server is not None:
            print(f"The page stays at {server.url}: Ctrl-C to stop.", flush=True)
            try:
                threading.Event().wait()
            except KeyboardInterrupt:  # the way to end a page that outlives its session: not an error
                return 0
    except (ConfigError, EvaluationError, NsdDataError, LiveInputError, FileExistsError) as e:
        logger.error("%s", e)
        return 2 if isinstance(e, ConfigError) else 1
    except KeyboardInterrupt:
        logger.error("interrupted: the trials decoded so far are in %s (run the same command again to go on: they "
                     "are not decoded again)", args.out)
        return 130
    finally:
        if server is not None:
            server.close()
    return 0


def run_session(args: argparse.Namespace) -> dict:

    from dynadiff.data import nsd
    from dynadiff.data.dataset import load_mask, load_masked_run
    from dynadiff.data.preprocess import window_bounds, window_times
    from dynadiff.live.causal import Prior
    from dynadiff.live.decoder import WindowDecoder, stimuli_loader, truth_loader
    from dynadiff.live.record import LiveRecord
    from dynadiff.live.replay import Replay, prepare_folder
    from dynadiff.live.session import LiveSession, Timing
    from dynadiff.live.watch import LiveInputError, OnsetStream, VolumeWatcher, design_onsets, events_onsets

    for option, path in (("--out", args.out), ("--watch", args.watch)):
        if path is not None and path.exists() and not path.is_dir():
            raise LiveInputError(f"{option} {path} is a file, not a folder")
    tr = run_tr(args)
    events = None
    if args.events is not None:
        events = events_onsets(args.events, args.image_column)
        _check_stimuli(args.stimuli, events, args.events)
    cfg = resolve_config(args)
    nsd_cfg = cfg.data.nsd_dataset_config
    root = Path(nsd_cfg.nsddata_path)
    if args.mask is not None:
        mask = _read_mask(args.mask)
    else:
        if not nsd.roi_path(root, nsd_cfg.subject).is_file():
            raise LiveInputError(f"no mask: {nsd.roi_path(root, nsd_cfg.subject)} does not exist; give the subject's "
                                 "mask with --mask NIFTI, or the NSD folder with --nsddata_path")
        mask = load_mask(root, nsd_cfg.subject)
    start, stop = window_bounds(0, nsd_cfg.offset, nsd_cfg.duration)
    times = window_times(nsd_cfg.offset, nsd_cfg.duration)  # seconds after an onset in seconds (--events)
    if events is not None:
        onsets = events
    else:
        onsets = design_onsets(args.design) if args.design else OnsetStream(args.onsets)
    prior = None
    if args.prior_run is not None:
        _check_run(args.prior_run, mask, "--prior-run")
        prior = Prior.from_run(load_masked_run(args.prior_run, mask, n_volumes=_n_volumes(args.prior_run)))
        logger.info("voxel scales seeded by %s (weight %g volumes)", args.prior_run, prior.weight)
    replay, n_volumes = None, args.n_volumes
    if args.replay is not None:
        _check_run(args.replay, mask, "--replay")
        folder = prepare_folder(args.out / "replay_volumes")
        replay = Replay(args.replay, folder, speed=args.speed, tr=tr, compressed=args.replay_gz)
        n_volumes = replay.n_volumes
        watch = folder
    else:
        watch = args.watch
        if not watch.is_dir():
            logger.warning("%s does not exist yet: waiting for it", watch)
    decoder = WindowDecoder(cfg, int(mask.sum()), stop - start, steps=args.steps)
    if events is not None:
        truth = stimuli_loader(args.stimuli, decoder.image_size)
    else:
        truth = truth_loader(root if root.is_dir() else None, decoder.image_size)
    record = LiveRecord(args.out, tr)
    watcher = VolumeWatcher(watch, mask, first_number=args.first_number, incomplete_s=2 * tr)
    session = LiveSession(watcher, onsets, (start, stop), decoder, record, tr, truth=truth, prior=prior,
                          n_volumes=n_volumes, timing=Timing(give_up_trs=args.give_up_trs),
                          source_failed=None if replay is None else lambda: replay.error and "the replay stopped",
                          times_s=times)
    if events is not None:
        logger.info("live: %d trials of %s, window t+%.2f .. t+%.2f s sampled on the run's grid (TR %g s), %d "
                    "sampling steps, %d voxels; watching %s", len(events), args.events, times[0], times[-1], tr,
                    args.steps, int(mask.sum()), watch)
    else:
        logger.info("live: window volumes t%+d .. t%+d, %d sampling steps, %d voxels; watching %s", start, stop - 1,
                    args.steps, int(mask.sum()), watch)
    if replay is not None:
        replay.start()
    previous = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, lambda *_: session.stop())
    try:
        summary = session.run()
    finally:
        signal.signal(signal.SIGTERM, previous)
        if replay is not None:
            replay.stop()
            replay.join()
    if replay is not None and replay.error is not None:
        raise LiveInputError(f"replay of {args.replay} stopped: {replay.error}")
    summary["window"] = [start, stop]
    if events is not None:
        summary["window_s"] = [round(float(t), 6) for t in times]
    summary["tr_s"] = tr
    summary["steps"] = args.steps
    return summary


def run_tr(args: argparse.Namespace) -> float:
    """Seconds per volume: ``--tr``; for ``--replay``, the run's NIfTI header's (an explicit ``--tr`` that differs
    from it by more than 1 ms is a one-line error); else NSD's 4/3."""
    from dynadiff.data.preprocess import TR
    from dynadiff.live.watch import LiveInputError

    from dynadiff.data.bids import TR_TOLERANCE_S, tr_of_header

    header = tr_of_header(_nifti(args.replay, "--replay").header) if args.replay is not None else None
    if header is not None and args.tr is not None and abs(args.tr - header) > TR_TOLERANCE_S:
        raise LiveInputError(f"--tr {args.tr:g} s disagrees with the NIfTI header of {args.replay} ({header:g} s per "
                             "volume): leave --tr out to use the header's, or fix the header")
    if args.tr is not None:
        return args.tr
    if header is not None:
        return header
    if args.events is not None:
        logger.warning("--events: no --tr given, NSD's %.4f s per volume assumed (give the scanner's with --tr)", TR)
    return TR


def _check_stimuli(folder: Path | None, events, path: Path) -> None:
    """Every image the events name is in ``folder`` (when given): a one-line LiveInputError otherwise."""
    from dynadiff.live.watch import LiveInputError

    if folder is None:
        return
    if not folder.is_dir():
        raise LiveInputError(f"--stimuli {folder} is not a folder: give the folder of the images {path} names")
    missing = sorted({o.image for o in events if not (folder / o.image).is_file()})
    if missing:
        raise LiveInputError(f"{path} names image {missing[0]!r}, absent from --stimuli {folder}"
                             f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}: give the folder "
                             "that holds them (the names are relative to it)")


def _read_mask(path: Path):
    import nibabel as nib
    import numpy as np

    from dynadiff.live.watch import LiveInputError

    try:
        data = np.asanyarray(nib.load(str(path)).dataobj)
    except Exception as e:  # noqa: BLE001 - nibabel raises several types
        raise LiveInputError(f"cannot read the mask {path}: {e}") from None
    if data.ndim != 3:
        raise LiveInputError(f"the mask {path} should be a 3-D volume, got shape {data.shape}")
    return data > 0


def _nifti(path: Path, option: str):
    """The NIfTI image (header) of ``path``; a one-line LiveInputError where it cannot be read."""
    import nibabel as nib

    from dynadiff.live.watch import LiveInputError

    try:
        return nib.load(str(path))
    except FileNotFoundError:
        raise LiveInputError(f"{option} {path} does not exist") from None
    except Exception as e:  # noqa: BLE001 - nibabel raises several types
        raise LiveInputError(f"{option} {path} is not a readable NIfTI file ({type(e).__name__}: {e})") from None


def _check_run(path: Path, mask, option: str) -> None:
    """A 4-D NIfTI run whose volumes have the mask's shape; a one-line LiveInputError otherwise."""
    from dynadiff.live.watch import LiveInputError

    shape = _nifti(path, option).shape
    if len(shape) != 4 or tuple(shape[:3]) != mask.shape:
        raise LiveInputError(f"{option} {path} has shape {shape}: expected a 4-D run of volumes {mask.shape} "
                             "(the mask's)")


def _n_volumes(path: Path) -> int:
    import nibabel as nib

    return int(nib.load(str(path)).shape[3])


if __name__ == "__main__":
    sys.exit(main())
