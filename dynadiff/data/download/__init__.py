"""Download the NSD files Dynadiff needs from S3 (docs/behaviour.md §1), or an OpenNeuro dataset, resumably.

One module a job:

- :mod:`.plan`: which objects to fetch and where each goes (``needed_files``, ``plan_download``);
- :mod:`.s3`: ``--aws_args`` / ``--nsd_bucket`` parsing, the boto3 client, bucket listing;
- :mod:`.objects`: the resumable, retried, verified download of one object (``download_object``);
- :mod:`.manifest`: resume state, i.e. which local files are complete, and the manifest of verified ones;
- :mod:`.progress`: progress-bar updates and the run's :class:`DownloadSummary`;
- :mod:`.run`: the whole download as ``prepare_data.py`` runs it: the one fetch loop (``run_download``) and NSD's
  download (``download_nsd``);
- :mod:`.openneuro`: an OpenNeuro dataset (BIDS) from ``s3://openneuro.org`` (``download_openneuro``), same loop;
- :mod:`.errors`: :class:`DownloadError` and the exceptions that steer a run.

Resuming: a local file with the object's size (and its MD5 when the ETag is a
plain MD5, i.e. not a multipart upload) is kept. A file is written to a
temporary name beside its final one (``.<name>.part``) and renamed only once
complete and verified, so an interrupted run never leaves a truncated file
under a final name. Files checked by hash are recorded in a small manifest
(``.nsd_download_manifest.json``, keyed by path, size, mtime and ETag) so that
the next run does not hash them again.

The names below are those other code imports from ``dynadiff.data.download``.
"""

# _Cancelled and _RateLimiter are private, re-exported for tests/data/test_download.py ("as": meant).
from dynadiff.data.download.errors import DownloadError
from dynadiff.data.download.errors import _Cancelled as _Cancelled
from dynadiff.data.download.manifest import MANIFEST_FILE
from dynadiff.data.download.objects import PART_SUFFIX, download_object
from dynadiff.data.download.objects import _RateLimiter as _RateLimiter
from dynadiff.data.download.openneuro import OPENNEURO_BUCKET_URL, download_openneuro
from dynadiff.data.download.plan import (
    RemoteObject,
    check_relative_key,
    needed_files,
    plan_download,
)
from dynadiff.data.download.progress import DownloadSummary
from dynadiff.data.download.run import download_nsd
from dynadiff.data.download.s3 import (
    DEFAULT_BUCKET,
    SUPPORTED_AWS_ARGS,
    AwsOptions,
    make_s3_client,
    parse_aws_args,
    parse_bucket_url,
)
from dynadiff.files import part_path

__all__ = [
    "DEFAULT_BUCKET",
    "MANIFEST_FILE",
    "OPENNEURO_BUCKET_URL",
    "PART_SUFFIX",
    "SUPPORTED_AWS_ARGS",
    "AwsOptions",
    "DownloadError",
    "DownloadSummary",
    "RemoteObject",
    "check_relative_key",
    "download_nsd",
    "download_object",
    "download_openneuro",
    "make_s3_client",
    "needed_files",
    "parse_aws_args",
    "parse_bucket_url",
    "part_path",
    "plan_download",
]
