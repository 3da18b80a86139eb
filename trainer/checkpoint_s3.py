"""A mirror of the run's checkpoints in S3 (`train.checkpoint_s3`): upload after each
complete save, download the newest one to resume where the run folder has none.

Layout under `s3://bucket/prefix` (as on disk):

    step_00000400/...     every file of the local checkpoint, trainer_state.json last
    latest                name of the newest complete upload (written after its files)

Rank 0 transfers, as it publishes checkpoints on disk: like DeepSpeed, the run folder
is on a filesystem all nodes share. A failed upload warns and training goes on (the
checkpoint on disk is complete); the next save uploads its own checkpoint again.

A download trusts nothing it lists: `latest` must name a `step_<8 digits>` tag and every
key under it a checkpoint file name, or the whole download is refused with one line.
"""
from __future__ import annotations

import logging
import os
import shutil
import socket
from pathlib import Path
from typing import Optional

from data.storage import S3Options, s3_client, split_s3
from trainer.checkpoint_files import STATE_FILE, TMP_PREFIX, check_tag, checkpoint_file_path, write_latest

log = logging.getLogger(__name__)


def _key(prefix: str, *parts: str) -> str:
    return "/".join(p.strip("/") for p in (prefix, *parts) if p.strip("/"))


def upload_checkpoint(root: str, tag: str, url: str, opts: S3Options, keep_last: int) -> bool:
    """Upload `root/tag`, then point `latest` at it and delete uploads beyond `keep_last`.
    Returns False (after one warning line) when S3 could not be reached or refused."""
    from boto3.exceptions import S3UploadFailedError
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, prefix = split_s3(url)
    folder = Path(root) / tag
    # trainer_state.json marks a checkpoint complete on disk; uploaded last, it does so in S3 too.
    files = sorted((p for p in folder.rglob("*") if p.is_file()), key=lambda p: (p.name == STATE_FILE, str(p)))
    try:
        client = s3_client(opts, boto_retries=True)
        for path in files:
            client.upload_file(str(path), bucket, _key(prefix, tag, path.relative_to(folder).as_posix()))
        client.put_object(Bucket=bucket, Key=_key(prefix, "latest"), Body=tag.encode())
        _prune(client, bucket, prefix, keep_last)
    except (BotoCoreError, ClientError, S3UploadFailedError) as e:
        log.warning("checkpoint %s not uploaded to %s: %s; it is complete on disk, the next save "
                    "uploads again", tag, url, str(e).splitlines()[0])
        return False
    log.info("checkpoint %s uploaded to %s (%d files)", tag, url, len(files))
    return True


def _remote_tags(client, bucket: str, prefix: str) -> list[str]:
    tags = []
    for page in client.get_paginator("list_objects_v2").paginate(
            Bucket=bucket, Prefix=_key(prefix, "step_") if prefix else "step_", Delimiter="/"):
        tags += [p["Prefix"].rstrip("/").rsplit("/", 1)[-1] for p in page.get("CommonPrefixes", [])]
    return sorted(tags)


def _prune(client, bucket: str, prefix: str, keep_last: int) -> None:
    for tag in _remote_tags(client, bucket, prefix)[:-keep_last]:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=_key(prefix, tag) + "/"):
            keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
            if keys:
                client.delete_objects(Bucket=bucket, Delete={"Objects": keys, "Quiet": True})


def remote_latest(url: str, opts: S3Options) -> Optional[str]:
    """The tag `latest` names in S3, or None when nothing was uploaded there yet."""
    from botocore.exceptions import ClientError

    bucket, prefix = split_s3(url)
    try:
        client = s3_client(opts, boto_retries=True)
        body = client.get_object(Bucket=bucket, Key=_key(prefix, "latest"))["Body"].read()
    except ClientError as e:
        if e.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
            return None
        raise ValueError(f"train.checkpoint_s3={url}: cannot read its `latest`: {e}") from None
    return check_tag(body.decode(errors="replace").strip(), f"train.checkpoint_s3={url}: its `latest`")


def download_checkpoint(url: str, opts: S3Options, tag: str, root: str) -> None:
    """Download `tag` into `root/tag` (through a temp folder) and point the local `latest` at it.

    Every key under the tag must be a checkpoint file name (`checkpoint_file_path`), checked
    for all keys before the first download: a key with a separator, `..` or an unknown name
    refuses the whole checkpoint with one line, so nothing is written outside `root/tag`."""
    source = f"train.checkpoint_s3={url}"
    check_tag(tag, f"{source}: its `latest`")
    bucket, prefix = split_s3(url)
    client = s3_client(opts, boto_retries=True)
    tmp = Path(root) / f"{TMP_PREFIX}download-{socket.gethostname()}-{os.getpid()}"
    files = _checkpoint_keys(client, bucket, prefix, tag, root, source)
    if STATE_FILE not in files:
        raise ValueError(f"{source}: `latest` names {tag!r}, which has no "
                         f"{STATE_FILE} there (an incomplete upload); point `latest` at a complete one")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name, key in files.items():
        client.download_file(bucket, key, str(tmp / name))  # `name`: a checked file name, no separator
    if (Path(root) / tag).exists():
        shutil.rmtree(Path(root) / tag)  # an incomplete folder: no `latest` pointed at it
    os.rename(tmp, Path(root) / tag)
    write_latest(root, tag)
    log.info("downloaded checkpoint %s from %s (%d files)", tag, url, len(files))


def _checkpoint_keys(client, bucket: str, prefix: str, tag: str, root: str, source: str) -> dict[str, str]:
    """file name -> key of every object under `tag`; ValueError (one line) on any key that is
    not a checkpoint file directly under it."""
    base = _key(prefix, tag) + "/"
    files = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=base):
        for obj in page.get("Contents", []):
            name = obj["Key"][len(base):]
            checkpoint_file_path(root, tag, name, source)  # raises on anything but a known file name
            files[name] = obj["Key"]
    return files
