"""Download and prepare the NSD data Dynadiff needs (SPEC §1).

    python prepare_data.py --nsd_bucket "s3://natural-scenes-dataset" --path ./nsddata
    python prepare_data.py --synthetic --path ./mini_nsd            # no download: a synthetic mini-NSD
    python prepare_data.py --skip-download --path ./nsddata --images test

Steps: (1) download from S3 the time series and designs of the task runs, the
``roi/`` folders, ``nsd_expdesign.mat`` and ``nsd_stimuli.hdf5`` of the chosen
subjects (resumable: run the same command again after an interruption);
(2) write ``test_images_ids.npy`` and ``nsd_stimuli/{k}.png``.

``--images`` chooses the PNGs: ``subjects`` (default: every image one of the
chosen subjects saw, which covers their training and test images), ``test``
(the 1000 shared test images only, enough for evaluation) or ``all`` (the 73000).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from dynadiff.data.nsd import N_SESSIONS, SUBJECTS

logger = logging.getLogger("prepare_data")


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
    parser.add_argument("--subjects", type=int, nargs="+", default=list(SUBJECTS), choices=SUBJECTS, metavar="S",
                        help=f"NSD subjects, among {list(SUBJECTS)} (default: all four)")
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
    parser.add_argument("--verbose", "-v", action="store_true", help="debug logging")
    return parser


def _join_aws_args(argv: list[str]) -> list[str]:
    """``--aws_args --no-sign-request`` → ``--aws_args=--no-sign-request``.

    argparse takes a value that starts with '--' and holds no space for an
    option of its own; the original command line passed it as a separate word.
    """
    out, i = [], 0
    while i < len(argv):
        if argv[i] == "--aws_args" and i + 1 < len(argv):
            out.append(f"--aws_args={argv[i + 1]}")
            i += 2
        else:
            out.append(argv[i])
            i += 1
    return out


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(_join_aws_args(sys.argv[1:] if argv is None else list(argv)))
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if args.verbose:
        logging.getLogger("botocore").setLevel(logging.INFO)

    from dynadiff.data.download import DownloadError, download_nsd, parse_aws_args, parse_bucket_url

    if args.synthetic and (args.nsd_bucket or args.skip_download or args.download_only):
        parser.error("--synthetic writes the data itself: it cannot be combined with --nsd_bucket, "
                     "--skip-download or --download-only")
    download = not (args.synthetic or args.skip_download)
    if download and not args.nsd_bucket:
        parser.error("--nsd_bucket is required to download (e.g. --nsd_bucket s3://natural-scenes-dataset); "
                     "use --skip-download to prepare files already under --path, or --synthetic")
    if args.workers is not None and args.workers < 1:
        parser.error(f"--workers must be >= 1, got {args.workers}")
    if args.max_bandwidth is not None and args.max_bandwidth <= 0:
        parser.error(f"--max-bandwidth must be positive, got {args.max_bandwidth}")
    if args.sessions is not None and any(not 1 <= s <= N_SESSIONS for s in args.sessions):
        parser.error(f"--sessions must be in 1..{N_SESSIONS}, got {args.sessions}")
    subjects = sorted(set(args.subjects))
    if download:
        try:
            parse_bucket_url(args.nsd_bucket)
            aws = parse_aws_args(args.aws_args)
        except ValueError as e:
            parser.error(str(e))

    from dynadiff.data.nsd import NsdDataError
    from dynadiff.data.stimuli import prepare_stimuli

    try:
        if args.synthetic:
            from dynadiff.data.synthetic import write_synthetic_nsd

            info = write_synthetic_nsd(args.path, subjects=subjects, seed=args.seed)
            logger.info("synthetic mini-NSD written to %s (subjects %s, %d images); use it with: %s",
                        args.path, info["subjects"], info["n_images"], " ".join(info["overrides"]))
        elif download:
            download_nsd(
                args.nsd_bucket, args.path, subjects=subjects, sessions=args.sessions, aws_args=aws,
                workers=args.workers or 16, max_bandwidth=args.max_bandwidth,
            )
        if not args.download_only:
            prepare_stimuli(args.path, images=args.images, subjects=subjects, workers=args.workers or os.cpu_count())
    except (DownloadError, NsdDataError) as e:
        logger.error("%s", e)
        return 1
    except KeyboardInterrupt:
        logger.error("interrupted: run the same command again to resume")
        return 130
    logger.info("done: NSD data in %s", args.path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
