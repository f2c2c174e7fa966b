"""The S3 side of a download: ``--aws_args`` and ``--nsd_bucket`` parsing, the boto3 client, listing.

``--aws_args`` takes the few AWS CLI options listed in :data:`SUPPORTED_AWS_ARGS`, mapped onto boto3
(:class:`AwsOptions`); without credentials the client sends anonymous (unsigned) requests. A refused
request gets a hint on what to check (:func:`_access_hint`).
"""

from __future__ import annotations

import dataclasses
import logging
import re
import shlex
import typing as tp

from dynadiff.data.download.errors import DownloadError
from dynadiff.data.nsd import NSD_BUCKET_URL

# The package's name, as before the split: log lines keep reading 'dynadiff.data.download: ...'.
logger = logging.getLogger(__package__)

DEFAULT_BUCKET = NSD_BUCKET_URL
SUPPORTED_AWS_ARGS = ("--no-sign-request", "--profile NAME", "--endpoint-url URL", "--region NAME")
_BUCKET_NAME = re.compile(r"[a-zA-Z0-9.\-_]{1,255}")


@dataclasses.dataclass(frozen=True)
class AwsOptions:
    """The AWS CLI options we understand, mapped onto boto3."""

    unsigned: bool = False  # --no-sign-request
    profile: str | None = None  # --profile
    endpoint_url: str | None = None  # --endpoint-url
    region: str | None = None  # --region


def parse_aws_args(text: str | None) -> AwsOptions:
    """Parse an AWS-CLI-like option string (``--aws_args``) into :class:`AwsOptions`.

    Raises ``ValueError`` naming the offending option and listing the supported ones.
    """
    try:
        tokens = shlex.split(text or "")
    except ValueError as e:
        raise ValueError(f"cannot parse --aws_args {text!r}: {e}") from e
    supported = ", ".join(SUPPORTED_AWS_ARGS)
    values: dict[str, tp.Any] = {}
    names = {"--profile": "profile", "--endpoint-url": "endpoint_url", "--region": "region"}
    i = 0
    while i < len(tokens):
        name, eq, value = tokens[i].partition("=")
        if name == "--no-sign-request":
            if eq:
                raise ValueError("--no-sign-request in --aws_args takes no value")
            values["unsigned"] = True
            i += 1
        elif name in names:
            if not eq:
                if i + 1 >= len(tokens) or tokens[i + 1].startswith("--"):
                    raise ValueError(f"{name} in --aws_args needs a value")
                value = tokens[i + 1]
                i += 1
            if not value:
                raise ValueError(f"{name} in --aws_args needs a non-empty value")
            values[names[name]] = value
            i += 1
        else:
            raise ValueError(f"unsupported option {tokens[i]!r} in --aws_args; supported options: {supported}")
    return AwsOptions(**values)


def parse_bucket_url(url: str, option: str = "--nsd_bucket") -> tuple[str, str]:
    """``s3://bucket[/prefix]`` → (bucket, prefix ending with '/' or empty); ``option`` names it in errors."""
    match = re.fullmatch(r"s3://([^/]+)(?:/(.*))?", url.strip())
    if match is None or not match.group(1):
        raise ValueError(f"{option} should look like s3://bucket[/prefix], got {url!r}")
    if not _BUCKET_NAME.fullmatch(match.group(1)):  # what botocore accepts (it would fail with a long message)
        raise ValueError(f"{option}: {match.group(1)!r} is not a bucket name (letters, digits, '.', '-' and '_' "
                         f"only, e.g. {NSD_BUCKET_URL}), got {url!r}")
    prefix = (match.group(2) or "").strip("/")
    return match.group(1), f"{prefix}/" if prefix else ""


def make_s3_client(options: AwsOptions, max_connections: int = 16):
    """A boto3 S3 client; anonymous (unsigned) when asked or when no credentials are configured.

    The EC2 instance-metadata lookup (one of the places botocore looks for
    credentials) gets a 1 s timeout and a single attempt, so a machine outside
    AWS never hangs on it.
    """
    import boto3
    import botocore.session
    from botocore import UNSIGNED
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError, ProfileNotFound

    core = botocore.session.get_session()
    core.set_config_variable("metadata_service_timeout", 1)
    core.set_config_variable("metadata_service_num_attempts", 1)
    try:
        session = boto3.Session(botocore_session=core, profile_name=options.profile)
        unsigned = options.unsigned
        if not unsigned:
            credentials = session.get_credentials()
            if credentials is None:
                logger.info("no AWS credentials configured: using anonymous (unsigned) requests")
                unsigned = True
        region = options.region or session.region_name or "us-east-1"
        config = Config(
            signature_version=UNSIGNED if unsigned else None,
            max_pool_connections=max(10, max_connections),
            retries={"max_attempts": 3, "mode": "standard"},
            connect_timeout=10,
            read_timeout=60,
        )
        return session.client("s3", region_name=region, endpoint_url=options.endpoint_url, config=config)
    except ProfileNotFound as e:
        raise DownloadError(f"AWS profile {options.profile!r} not found (from --aws_args --profile): {e}") from e
    except BotoCoreError as e:
        raise DownloadError(f"cannot set up the S3 client: {e}") from e


def _list_prefix(client, bucket: str, prefix: str) -> dict[str, tuple[int, str]]:
    """key → (size, etag) of every object under a prefix."""
    return _list(client, bucket, prefix)[0]


def _list_level(client, bucket: str, prefix: str) -> tuple[dict[str, tuple[int, str]], list[str]]:
    """One level under a prefix ending with '/', as ``ls`` shows it: (key → (size, etag) of the objects directly
    under it, names of its sub-folders without the trailing '/'). Folder markers (keys ending with '/') are left out."""
    files, folders = _list(client, bucket, prefix, delimiter="/")
    files = {k: v for k, v in files.items() if not k.endswith("/")}
    return files, sorted(f[len(prefix) :].rstrip("/") for f in folders)


def _list(client, bucket: str, prefix: str, delimiter: str = "") -> tuple[dict[str, tuple[int, str]], list[str]]:
    """(key → (size, etag) of the objects under a prefix, common prefixes when ``delimiter`` is given)."""
    from botocore.exceptions import BotoCoreError, ClientError

    found, folders = {}, []
    request = {"Bucket": bucket, "Prefix": prefix, **({"Delimiter": delimiter} if delimiter else {})}
    try:
        for page in client.get_paginator("list_objects_v2").paginate(**request):
            for item in page.get("Contents", []):
                found[item["Key"]] = (int(item["Size"]), item.get("ETag", "").strip('"'))
            folders += [item["Prefix"] for item in page.get("CommonPrefixes", [])]
    except ClientError as e:
        err = e.response.get("Error", {})
        raise DownloadError(
            f"cannot list s3://{bucket}/{prefix}: {err.get('Code', '?')} {err.get('Message', '')}".rstrip()
            + _access_hint(err.get("Code"))
        ) from e
    except BotoCoreError as e:
        raise DownloadError(f"cannot list s3://{bucket}/{prefix}: {e}") from e
    return found, folders


def _access_hint(code) -> str:
    if code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "403"):
        return " (check your AWS credentials, or pass --aws_args \"--no-sign-request\" for anonymous access)"
    if code == "NoSuchBucket":
        return " (check --nsd_bucket)"
    return ""
