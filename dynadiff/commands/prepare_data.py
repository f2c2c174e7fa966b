"""Download and prepare the NSD data Dynadiff needs (docs/behaviour.md §1).

    python prepare_data.py --nsd_bucket "s3://natural-scenes-dataset" --path ./nsddata
    python prepare_data.py --synthetic --path ./mini_nsd            # no download: a synthetic mini-NSD
    python prepare_data.py --skip-download --path ./nsddata --images test
    python prepare_data.py --skip-download --path ./nsddata --subjects 1 2 5 7 --infra-yaml custom_infra.yaml
    python prepare_data.py --bids ./my_study --derivatives ./my_study/derivatives/fmriprep --windows all
    python prepare_data.py --openneuro ds004496 --path ./nod --subjects 01 --openneuro-derivatives fmriprep
    python prepare_data.py --synthetic --format bids --tr 2 --path ./mini_bids   # the synthetic data as BIDS

BIDS datasets (docs/bids.md): ``--bids DIR`` lists every chosen participant's trials, which checks the dataset
(events, images, TRs, mask) before any run is loaded, and says what each subject has; with ``--windows`` it then
caches their windows as for NSD. ``--openneuro`` downloads a public OpenNeuro dataset (resumable, as NSD's
download); ``--synthetic --format bids`` writes the synthetic data as BIDS, raw and fMRIPrep-style derivatives.

Steps: (1) download from S3 the time series and designs of the task runs, the
``roi/`` folders, ``nsd_expdesign.mat`` and ``nsd_stimuli.hdf5`` of the chosen
subjects (resumable: run the same command again after an interruption);
(2) write ``test_images_ids.npy`` and ``nsd_stimuli/{k}.png``; (3) with
``--windows`` or ``--infra-yaml``, fill the exca cache of the fMRI windows
(``{cache}/dynadiff.config.NsdDatasetConfig.run_windows,1/...``) that eval.py
and train.py read, for every chosen subject at once.

``--path`` is checked before anything is written: ``--synthetic`` writes only
into an empty or new folder, or one it wrote before (its ``.dynadiff-synthetic``
file), which it then empties first; a download needs a folder it can write to,
not a synthetic one; ``--skip-download`` needs an existing folder.

``--images`` chooses the PNGs: ``subjects`` (default: every image one of the
chosen subjects saw, which covers their training and test images), ``test``
(the 1000 shared test images only, enough for evaluation) or ``all`` (the 73000).

``--windows`` chooses the split(s): ``test`` (what eval.py reads), ``train``
(what train.py reads) or ``all`` (both; the default with ``--infra-yaml``).
The data config is config/config.yaml's ``data.nsd_dataset_config`` with
``--path``, the subject and ``--sessions``, so its cache is the one eval.py and
train.py use with the same ``--cache`` and ``nsddata_path`` (given the same
way, e.g. both relative to the same directory); the cache key of a run's
windows holds the size and modification time of its files, so windows of data
that was since rewritten (e.g. by ``--synthetic``) are computed again. Without
``--infra-yaml`` the
windows are computed in this process (one thread per subject); with it, as
exca jobs with the resources of its ``task_infra_data`` section (e.g. one SLURM
job array per subject, all subjects submitted at once). ``--cache`` wins over
that section's ``folder``, as in eval.py. A failed job: the other jobs are
waited for (their windows stay cached), then a report per subject, exit 1;
the same command again computes only what is missing.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import sys
import threading
import time
import typing as tp
from pathlib import Path

from dynadiff.commands import default_config
from dynadiff.data import nsd
from dynadiff.data.nsd import N_SESSIONS, SUBJECTS

logger = logging.getLogger("prepare_data")
DEFAULT_CONFIG = default_config("config.yaml")  # eval.py's: data.nsd_dataset_config defaults
INFRA_TARGETS = {"task_infra_data": "data.nsd_dataset_config.infra"}  # custom_infra.yaml section -> config key
WINDOW_SPLITS = {"test": ("test",), "train": ("train",), "all": ("test", "train")}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Download the NSD files Dynadiff needs from S3 and prepare the stimulus PNGs.",
    )
    parser.add_argument("--nsd_bucket", help='NSD bucket, "s3://bucket[/prefix]" (e.g. s3://natural-scenes-dataset)')
    parser.add_argument("--path", default="./nsddata", help="local NSD folder (default: ./nsddata)")
    parser.add_argument(
        "--aws_args",
        default="",
        help='AWS CLI options, as one string: --no-sign-request, --profile NAME, --endpoint-url URL, --region NAME '
        '(e.g. --aws_args="--profile nsd"). Without credentials, requests are anonymous.',
    )
    parser.add_argument("--subjects", nargs="+", default=None, metavar="S",
                        help=f"NSD subjects, among {list(SUBJECTS)} (default: all four); with --bids, participants by "
                        "the number their label ends with (default: all); with --openneuro, participant labels "
                        "(01, CSI1; default: all)")
    parser.add_argument("--sessions", type=int, nargs="+", default=None, metavar="N",
                        help=f"download only these sessions (1..{N_SESSIONS}); default: all")
    parser.add_argument("--workers", type=int, default=None,
                        help="parallel downloads (default 16) and PNG-writing processes (default: CPU count)")
    parser.add_argument("--images", choices=("subjects", "test", "all"), default="subjects",
                        help="stimulus PNGs to write: those the chosen subjects saw (default; covers their "
                        "training and test images), the shared test images only, or all 73000")
    parser.add_argument("--max-bandwidth", type=float, default=None, metavar="BYTES_PER_S",
                        help="cap the total download speed (bytes per second; default: no cap)")
    steps = parser.add_mutually_exclusive_group()
    steps.add_argument("--skip-download", action="store_true", help="only prepare files already under --path")
    steps.add_argument("--download-only", action="store_true", help="download, do not prepare the PNGs")
    parser.add_argument("--synthetic", action="store_true",
                        help="write a synthetic mini-NSD into --path instead of downloading, then prepare it")
    parser.add_argument("--seed", type=int, default=0, help="seed of --synthetic (default: 0)")
    parser.add_argument("--hrf-peak-s", type=float, default=5.0, metavar="SECONDS",
                        help="--synthetic: seconds from a trial's onset to the peak of its BOLD response (default 5)")
    parser.add_argument("--windows", choices=tuple(WINDOW_SPLITS), default=None,
                        help="then compute the fMRI windows of every chosen subject into the cache eval.py (test) "
                        "and train.py (train) read; all: both (default: not done, except with --infra-yaml: all)")
    parser.add_argument("--infra-yaml", type=Path, default=None, metavar="PATH",
                        help="compute the windows as cluster jobs with the resources of the task_infra_data "
                        "section of this file (custom_infra.yaml); implies --windows all unless given")
    parser.add_argument("--cache", type=Path, default=None, metavar="DIR",
                        help="cache folder of the windows, as eval.py's --cache (default ./cache; "
                        "wins over a folder in --infra-yaml)")
    parser.add_argument("--verbose", "-v", action="store_true", help="debug logging")
    bids = parser.add_argument_group("BIDS datasets (docs/bids.md)")
    bids.add_argument("--bids", type=Path, metavar="DIR",
                      help="a BIDS dataset instead of NSD: check every chosen participant's trials; with --windows, "
                      "cache their windows")
    bids.add_argument("--derivatives", type=Path, metavar="DIR",
                      help="--bids: fMRIPrep's output folder (its desc-preproc runs and brain masks are read)")
    bids.add_argument("--space", help="--bids --derivatives: the space of the runs read (e.g. T1w)")
    bids.add_argument("--task", help="--bids: only the runs of this task (default: every run with events)")
    bids.add_argument("--runs", type=int, nargs="+", metavar="N", help="--bids: only these run numbers (default: all; "
                      "--sessions chooses sessions by the number their label ends with)")
    bids.add_argument("--mask", metavar="NIFTI",
                      help="--bids: a mask or atlas on the BOLD's grid ({subject} in the path: the participant label)")
    bids.add_argument("--mask-labels", type=int, nargs="+", metavar="N", help="--bids --mask: the atlas labels kept "
                      "(default: every value > 0)")
    bids.add_argument("--image-column", metavar="NAME", help="--bids: the events.tsv column naming each trial's image "
                      "(default: stim_file)")
    bids.add_argument("--stimuli", type=Path, metavar="DIR", help="--bids: the images' folder (default: DIR/stimuli)")
    bids.add_argument("--test-images", type=Path, metavar="FILE", help="--bids: the test images, one name per line "
                      "(default: the images shown more than once)")
    bids.add_argument("--openneuro", metavar="DSNNNNNN",
                      help="download this public OpenNeuro dataset (s3://openneuro.org, anonymous) into --path")
    bids.add_argument("--openneuro-derivatives", nargs="+", metavar="PIPELINE", default=None,
                      help="--openneuro: also these derivatives (e.g. fmriprep)")
    bids.add_argument("--format", choices=("nsd", "bids"), default="nsd",
                      help="--synthetic: NSD's layout (default) or BIDS (raw and fMRIPrep-style derivatives)")
    bids.add_argument("--tr", type=float, default=None, metavar="SECONDS",
                      help="--synthetic --format bids: seconds per volume (default 4/3, NSD's)")
    return parser


BIDS_FLAGS = {"derivatives": "derivatives", "space": "space", "task": "task", "runs": "runs", "mask": "mask",
              "mask_labels": "mask_labels", "image_column": "image_column", "stimuli": "stimuli",
              "test_images": "test_images"}  # flag (attribute) -> BidsSource field


def bids_source(args: argparse.Namespace) -> dict | None:
    """The ``data.nsd_dataset_config.bids`` mapping of ``--bids`` and its flags (None without ``--bids``)."""
    if args.bids is None:
        return None
    out = {"root": str(Path(args.bids).absolute())}
    for flag, field in BIDS_FLAGS.items():
        value = getattr(args, flag)
        if value is not None:
            out[field] = str(Path(value).absolute()) if isinstance(value, Path) else value
    return out


def _join_aws_args(argv: list[str]) -> list[str]:
    """``--aws_args --no-sign-request`` → ``--aws_args=--no-sign-request``: the original command line passed the
    value as a separate word, which argparse would take for an option of its own."""
    from dynadiff.cli import join_option_values

    return join_option_values(argv, ("--aws_args",))


def window_splits(args: argparse.Namespace) -> tuple[str, ...]:
    """Splits whose windows to compute: ``--windows``, else both with ``--infra-yaml``, else none."""
    choice = args.windows or ("all" if args.infra_yaml is not None else None)
    return WINDOW_SPLITS[choice] if choice else ()


def windows_config(args: argparse.Namespace, subject: int, split: str, sessions: list[int] | None):
    """The subject's ``NsdDatasetConfig`` as eval.py builds it (same exca cache uid and folder).

    Precedence as eval.py: config/config.yaml < ``--infra-yaml`` < flags (``--path``, ``--cache``, ...).
    Raises :class:`dynadiff.cli.ConfigError` for a bad YAML or value.
    """
    from dynadiff.cli import apply_overrides, load_yaml
    from dynadiff.config import EvalConfig

    overrides = []
    if args.infra_yaml is not None:
        from dynadiff.infra import infra_overrides

        overrides += infra_overrides(args.infra_yaml, INFRA_TARGETS)
    key = "data.nsd_dataset_config"
    overrides += [f"{key}.nsddata_path={json.dumps(str(args.path))}", f"{key}.subject={subject}",
                  f"{key}.split={split}", f"{key}.sessions={json.dumps(sessions)}"]
    if args.bids is not None:
        overrides.append(f"{key}.bids={json.dumps(bids_source(args))}")
    if args.cache is not None:
        overrides.append(f"{key}.infra.folder={json.dumps(str(args.cache))}")
    return apply_overrides(EvalConfig, load_yaml(DEFAULT_CONFIG), overrides).data.nsd_dataset_config


@dataclasses.dataclass(frozen=True)
class _Shown:
    """An item as failure reports list it: its uid (``jobs.missing_items`` only reads ``.uid``)."""

    uid: str

    def __str__(self) -> str:
        return self.uid


@dataclasses.dataclass
class _SubjectWindows:
    subject: int
    cfg: object  # NsdDatasetConfig that runs the map (its own infra)
    items: list  # RunEvents of every split, in split order
    per_split: dict  # split -> (runs, events)
    error: str = ""  # what failed, for the user
    data_error: bool = False  # the failure is the data's (a file to fix), not a job's
    exception: BaseException | None = None  # an unexpected error, re-raised by the main thread


def plan_windows(args: argparse.Namespace, subjects: list[int], splits: tuple[str, ...],
                 sessions: list[int] | None) -> list[_SubjectWindows]:
    """Per subject: the config and the items of every split. Raises NsdDataError for missing files."""
    from dynadiff.data.dataset import list_trials

    plans = []
    for subject in subjects:
        items, per_split, cfg = [], {}, None
        for split in splits:
            split_cfg = windows_config(args, subject, split, sessions)
            split_items, trials = list_trials(split_cfg)
            if cfg is None:  # split is left out of the cache uid: one map call for all the splits
                cfg = split_cfg
            items += split_items
            per_split[split] = (len(split_items), len(trials))
        plans.append(_SubjectWindows(subject, cfg, items, per_split))
    return plans


def _run_subject(plan: _SubjectWindows) -> None:
    """Compute (or submit and wait for) the subject's missing windows; a job failure goes to ``plan.error``."""
    from dynadiff import jobs
    from dynadiff.data.nsd import NsdDataError

    infra = plan.cfg.infra
    before = jobs.snapshot(infra)
    try:
        plan.cfg.run_windows(plan.items)  # returns once every item is cached (the results are not read)
    except jobs.JOB_ERRORS as e:
        shown = [_Shown(item.uid) for item in plan.items]
        plan.error = jobs.failure_report(infra, f"subject {plan.subject}: data preparation (fMRI windows)", before,
                                         shown, error=e, noun="run item")
    except NsdDataError as e:  # computed in this process (cluster null)
        plan.error, plan.data_error = f"subject {plan.subject}: {e}", True
    except BaseException as e:  # noqa: BLE001 - handed to the main thread
        plan.exception = e


def prepare_windows(plans: list[_SubjectWindows]) -> int:
    """Fill the windows cache of every subject concurrently (one thread, so one exca map, per subject)."""
    import submitit

    from dynadiff import jobs

    infra0 = plans[0].cfg.infra
    to_compute = []
    for plan in plans:
        infra = plan.cfg.infra
        todo = len(jobs.missing_items(infra, plan.items)) if infra.mode == "cached" else len(plan.items)
        splits = ", ".join(f"{split}: {runs} runs" for split, (runs, _) in plan.per_split.items())
        logger.info("subject %d: %d run items (%s): %d cached, %d to compute", plan.subject, len(plan.items), splits,
                    len(plan.items) - todo, todo)
        if todo and infra.mode == "read-only":
            logger.error("subject %d: %d run items are not cached and the infra mode is read-only: set mode to "
                         "cached (or leave it out) in the task_infra_data section", plan.subject, todo)
            return 1
        if todo:
            to_compute.append(plan)
    if to_compute:
        where = "in this process" if infra0.cluster is None else f"as jobs on cluster {infra0.cluster!r}"
        logger.info("computing the windows of subject(s) %s %s (cache %s)", [p.subject for p in to_compute], where,
                    infra0.folder)
    start = time.monotonic()
    threads = [threading.Thread(target=_run_subject, args=(plan,), name=f"windows-subj{plan.subject:02d}", daemon=True)
               for plan in to_compute]
    # exca hides the SLURM_* (and similar) variables at each submission with submitit's clean_env, which pops them
    # from os.environ: threads submitting at once could pop the same one twice. Hidden here once, for all of them,
    # the threads' clean_env find nothing to pop.
    submitting = to_compute and infra0.cluster not in (None, "threadpool", "processpool")
    with submitit.helpers.clean_env() if submitting else contextlib.nullcontext():
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    for plan in plans:
        if plan.exception is not None:
            raise plan.exception
    failed = [plan for plan in plans if plan.error]
    for plan in plans:
        if plan.error:
            continue
        splits = "; ".join(f"{split}: {runs} runs, {events} events" for split, (runs, events) in plan.per_split.items())
        logger.info("subject %d: windows cached (%s) in %s", plan.subject, splits, plan.cfg.infra.uid_folder())
    if failed:
        for plan in failed:
            logger.error("%s", plan.error)
        data_only = all(plan.data_error for plan in failed)
        if len(plans) > 1 or not data_only:  # one subject's bad file: its line alone says what to do
            again = ("once the file(s) named above are fixed, run the same command again" if data_only
                     else "Run the same command again")
            logger.error("windows of subject(s) %s incomplete. %s to compute only what is missing.",
                         [p.subject for p in failed], again)
        return 1
    logger.info("windows of %d subject(s) ready in %.0f s", len(plans), time.monotonic() - start)
    return 0


def nsd_subjects(parser: argparse.ArgumentParser, given: list[str] | None) -> list[int]:
    """``--subjects`` as NSD subject numbers (default: all four), sorted; a usage error for any other."""
    if given is None:
        return list(SUBJECTS)
    out = set()
    for text in given:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value not in SUBJECTS:
            parser.error(f"argument --subjects: invalid choice: {text} (choose from {', '.join(map(str, SUBJECTS))})")
        out.add(value)
    return sorted(out)


def main_bids(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """``--openneuro`` (download), ``--synthetic --format bids`` (write), then ``--bids`` (check, windows)."""
    from dynadiff.data import bids
    from dynadiff.data.download import DownloadError

    modes = [name for name, on in (("--bids", args.bids is not None), ("--openneuro", args.openneuro is not None),
                                   ("--synthetic", args.synthetic)) if on]
    if len(modes) > 1:
        parser.error(f"{' and '.join(modes)} cannot be combined: --openneuro downloads a dataset, --synthetic writes "
                     "one, --bids reads one (run them one after the other)")
    if args.format == "bids" and not args.synthetic:
        parser.error("--format chooses the layout --synthetic writes: add --synthetic")
    nsd_only = [flag for flag, on in (("--nsd_bucket", args.nsd_bucket), ("--skip-download", args.skip_download),
                                      ("--download-only", args.download_only), ("--images", args.images != "subjects"))
                if on]
    if nsd_only:
        parser.error(f"{', '.join(nsd_only)}: NSD's options, not for {modes[0] if modes else '--format bids'}")
    if args.tr is not None and not args.synthetic:
        parser.error("--tr is the TR of the synthetic data: it needs --synthetic --format bids")
    if args.tr is not None and not 0.1 <= args.tr <= 10:  # also refuses nan
        parser.error(f"--tr must be within [0.1, 10] seconds, got {args.tr}")
    if args.seed < 0:
        parser.error(f"--seed must be >= 0, got {args.seed}")
    if not 0 < args.hrf_peak_s <= 20:
        parser.error(f"--hrf-peak-s must be within (0, 20] seconds, got {args.hrf_peak_s}")
    if args.openneuro is not None:
        if args.windows or args.infra_yaml is not None or args.cache is not None:
            parser.error("--openneuro only downloads: compute the windows next, with --bids (the command it prints)")
        try:
            from dynadiff.data.download import download_openneuro

            download_openneuro(args.openneuro, Path(args.path), subjects=args.subjects,
                               derivatives=args.openneuro_derivatives, workers=args.workers or 16,
                               max_bandwidth=args.max_bandwidth)
        except (DownloadError, bids.BidsDataError, ValueError) as e:
            logger.error("%s", e)
            return 1
        except KeyboardInterrupt:
            logger.error("interrupted: run the same command again to resume")
            return 130
        deriv = "".join(f" --derivatives {Path(args.path) / 'derivatives' / d}" for d in
                        (args.openneuro_derivatives or [])[:1])
        logger.info("done: %s in %s; check it and cache its windows with: python prepare_data.py --bids %s%s "
                    "--windows all (docs/bids.md: the mask and test images of each dataset)", args.openneuro,
                    args.path, args.path, deriv)
        return 0
    if args.synthetic:
        from dynadiff.data.synthetic_bids import write_synthetic_bids

        subjects = nsd_subjects(parser, args.subjects)
        try:  # refuses a folder it may not write into before writing anything
            info = write_synthetic_bids(args.path, subjects=subjects, seed=args.seed, hrf_peak_s=args.hrf_peak_s,
                                        **({"tr": args.tr} if args.tr is not None else {}))
        except bids.BidsDataError as e:
            logger.error("%s", e)
            return 1
        except nsd.NsdDataError as e:
            logger.error("--path: %s", e)
            return 1
        logger.info("synthetic data written as BIDS to %s (subjects %s, TR %.4g s); use it with: %s", args.path,
                    info["subjects"], info["tr"], " ".join(info["overrides"]))
        root = Path(args.path).absolute()
        args.bids, args.derivatives = root, root / "derivatives" / "fmriprep"
        args.mask = str(args.derivatives / "sub-{subject}/anat/sub-{subject}_space-T1w_desc-nsdgeneral_mask.nii.gz")
        args.test_images = root / "code" / "test_images.txt"
        if not window_splits(args):
            return 0
    return check_bids(args, parser)


def check_bids(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """List every chosen participant's trials (which checks the dataset), say what each has, then the windows."""
    from dynadiff.data import bids

    splits = window_splits(args)
    sessions = sorted(set(args.sessions)) if args.sessions is not None else None

    def steps() -> int:
        source = windows_config(args, 0, "test", sessions).bids
        layout = bids.open_layout(source)
        if args.subjects is None:
            numbers = [bids.label_number(label) for label in sorted(layout.get_subjects())]
            subjects = sorted(n for n in numbers if n is not None)
        else:
            try:
                subjects = sorted({int(s) for s in args.subjects})
            except ValueError:
                parser.error(f"--subjects with --bids: the numbers the participant labels end with, got "
                             f"{args.subjects}")
        if not subjects:
            raise bids.BidsDataError(f"{args.bids} has no participant whose label ends with a number")
        for subject in subjects:
            logger.info("subject %d: %s", subject, bids.describe(windows_config(args, subject, "test", sessions)))
        if splits:
            code = prepare_windows(plan_windows(args, subjects, splits, sessions))
            if code:
                return code
        logger.info("done: BIDS dataset %s checked%s", args.bids,
                    f", windows cached ({', '.join(splits)})" if splits else "")
        return 0

    return exit_status(steps, "interrupted: run the same command again to compute only what is missing")


def exit_status(step: tp.Callable[[], int], interrupted: str) -> int:
    """``step()``'s exit status, or the error's: 1 for a data or download error, 2 for a configuration one (its
    line logged), 130 for Ctrl-C (``interrupted`` logged: what the same command does next)."""
    from dynadiff.cli import ConfigError
    from dynadiff.data.download import DownloadError

    try:
        return step()
    except (DownloadError, nsd.NsdDataError) as e:
        logger.error("%s", e)
        return 1
    except ConfigError as e:
        logger.error("%s", e)
        return 2
    except KeyboardInterrupt:
        logger.error("%s", interrupted)
        return 130


def check_path(args: argparse.Namespace, download: bool) -> None:
    """Raise NsdDataError when ``--path`` cannot be used by the chosen steps; checked before anything is written."""
    if args.synthetic:
        from dynadiff.data.synthetic import check_target

        check_target(args.path)
    elif download:
        nsd.check_download_target(args.path)
    else:
        nsd.check_data_root(args.path)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(_join_aws_args(sys.argv[1:] if argv is None else list(argv)))
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if args.verbose:
        logging.getLogger("botocore").setLevel(logging.INFO)

    from dynadiff.data.download import download_nsd, parse_aws_args, parse_bucket_url

    if args.bids is not None or args.openneuro is not None or args.format == "bids":
        return main_bids(args, parser)
    bids_only = [f"--{flag.replace('_', '-')}" for flag in [*BIDS_FLAGS, "openneuro_derivatives", "tr"]
                 if getattr(args, flag) is not None]
    if bids_only:
        parser.error(f"{', '.join(bids_only)}: BIDS options, for --bids, --openneuro or --synthetic --format bids")
    subjects = nsd_subjects(parser, args.subjects)
    if args.synthetic and (args.nsd_bucket or args.skip_download or args.download_only):
        parser.error("--synthetic writes the data itself: it cannot be combined with --nsd_bucket, "
                     "--skip-download or --download-only")
    download = not (args.synthetic or args.skip_download)
    if download and not args.nsd_bucket:
        parser.error("--nsd_bucket is required to download (e.g. --nsd_bucket s3://natural-scenes-dataset); "
                     "use --skip-download to prepare files already under --path, or --synthetic")
    if args.workers is not None and args.workers < 1:
        parser.error(f"--workers must be >= 1, got {args.workers}")
    if args.max_bandwidth is not None and not 0 < args.max_bandwidth < float("inf"):  # also refuses nan
        parser.error(f"--max-bandwidth must be a positive number of bytes per second, got {args.max_bandwidth}")
    if args.seed < 0:
        parser.error(f"--seed must be >= 0, got {args.seed}")
    if not 0 < args.hrf_peak_s <= 20:  # also refuses nan
        parser.error(f"--hrf-peak-s must be within (0, 20] seconds, got {args.hrf_peak_s}")
    if args.hrf_peak_s != 5.0 and not args.synthetic:
        parser.error("--hrf-peak-s shapes the synthetic mini-NSD: it needs --synthetic")
    if args.sessions is not None and any(not 1 <= s <= N_SESSIONS for s in args.sessions):
        parser.error(f"--sessions must be in 1..{N_SESSIONS}, got {args.sessions}")
    if args.download_only and (args.windows or args.infra_yaml is not None):
        parser.error("--download-only only downloads: the windows (--windows, --infra-yaml) need the prepared "
                     "data; drop --download-only, or compute them later with --skip-download")
    splits = window_splits(args)
    if args.cache is not None and not splits:
        parser.error("--cache is the cache of the fMRI windows: add --windows (or --infra-yaml)")
    if download:
        try:
            parse_bucket_url(args.nsd_bucket)
            aws = parse_aws_args(args.aws_args)
        except ValueError as e:
            parser.error(str(e))

    from dynadiff.cli import ConfigError
    from dynadiff.data.nsd import NsdDataError, check_writable_folder
    from dynadiff.data.stimuli import prepare_stimuli

    # A bad YAML, --path or value fails now, before anything is written (the --cache folder included) or downloaded.
    if args.infra_yaml is not None:
        from dynadiff.infra import load_infra_yaml

        try:
            load_infra_yaml(args.infra_yaml)
        except ConfigError as e:
            logger.error("%s", e)
            return 2
    try:
        check_path(args, download)
    except NsdDataError as e:
        logger.error("--path: %s", e)
        return 1
    if splits:
        try:
            if args.cache is not None:  # exca wants the folder's parent to exist
                check_writable_folder(args.cache)
                args.cache.mkdir(parents=True, exist_ok=True)
        except (NsdDataError, OSError) as e:
            logger.error("--cache: %s", e)
            return 2
        try:
            windows_config(args, subjects[0], splits[0], args.sessions)
        except ConfigError as e:
            logger.error("%s", e)
            return 2
        import exca  # noqa: F401 - its import sets the level below: imported first, so that ours stays

        # exca logs a failed computation's traceback as a warning; the failure report says what to do instead
        logging.getLogger("exca").setLevel(logging.DEBUG if args.verbose else logging.ERROR)
    def steps() -> int:
        sessions = sorted(set(args.sessions)) if args.sessions is not None else None
        if args.synthetic:
            from dynadiff.data.synthetic import write_synthetic_nsd

            info = write_synthetic_nsd(args.path, subjects=subjects, seed=args.seed, hrf_peak_s=args.hrf_peak_s)
            logger.info("synthetic mini-NSD written to %s (subjects %s, %d images); use it with: %s",
                        args.path, info["subjects"], info["n_images"], " ".join(info["overrides"]))
            if sessions is None:  # its sessions only (the same for every subject)
                sessions = sorted({s for subject in subjects for s in info["sessions"][subject]})
        elif download:
            download_nsd(
                args.nsd_bucket, args.path, subjects=subjects, sessions=args.sessions, aws_args=aws,
                workers=args.workers or 16, max_bandwidth=args.max_bandwidth,
            )
        if not args.download_only:
            prepare_stimuli(args.path, images=args.images, subjects=subjects, workers=args.workers or os.cpu_count())
        if splits:
            code = prepare_windows(plan_windows(args, subjects, splits, sessions))
            if code:
                return code
        logger.info("done: NSD data in %s", args.path)
        return 0

    return exit_status(steps, "interrupted: run the same command again to resume")


if __name__ == "__main__":
    sys.exit(main())
