"""S3-compatible object storage (AWS S3, R2, MinIO, SeaweedFS): one place for clients, errors and
streams, used by the ``s3://`` source, URL lists and hf data files on S3, and the loader.

Where the store is and who you are come from the standard AWS places only: ``AWS_ENDPOINT_URL``
(or ``AWS_ENDPOINT_URL_S3``), ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` /
``AWS_SESSION_TOKEN``, ``AWS_DEFAULT_REGION``, ``AWS_PROFILE`` and ``~/.aws/{config,credentials}``.
An ``endpoint`` argument (``data.s3_endpoint``) may name an S3-compatible store's URL: it is an
address, never a secret, so it may live in params.yaml; credentials never do.

Everything here goes through botocore, synchronously: page-by-page listing, per-object GETs
with its ``standard`` retry mode (back-off with jitter on 503 SlowDown, throttling and dropped
connections), and streamed GETs for the loader's shards, URL lists and stats.json (no asyncio
client in a process that forks dataloader workers: see :func:`process_client`). Only hf data
files on S3 go through s3fs, which ``datasets`` opens itself from ``storage_options``. Both come
with ``pip install -e '.[s3]'`` and are imported only when an ``s3://`` URL is used.
"""

from __future__ import annotations

import contextlib
import time
from typing import Iterator

SCHEME = "s3://"
INSTALL = "pip install -e '.[s3]' (s3fs, dvc-s3)"


class StoreError(ValueError):
    """The store refused or could not be reached: the message names the URL and the reason.
    ``abort_stage``: the store is down (unreachable, 5xx after the retries), so every later unit
    would fail the same way: the runner hands out no more (:mod:`ldm_vae.runner`)."""

    abort_stage = False


def is_s3(url) -> bool:
    return isinstance(url, str) and url.startswith(SCHEME)


def split_url(url: str) -> tuple[str, str]:
    """'s3://bucket/a/b' -> ('bucket', 'a/b')."""
    bucket, _, key = url[len(SCHEME):].partition("/")
    if not bucket:
        raise StoreError(f"{url!r}: an S3 URL is s3://BUCKET[/PREFIX]")
    return bucket, key


def client(endpoint: str = "", connect_timeout: float = 5.0, read_timeout: float = 30.0, retries: int = 3,
           connections: int = 16):
    """A botocore S3 client: endpoint from the argument or the AWS variables, credentials from the
    AWS chain, bounded waits, ``retries`` retries in botocore's standard mode, a pool of
    ``connections`` (one per fetching thread)."""
    try:
        import botocore.config
        import botocore.session
    except ImportError as e:
        raise StoreError(f"s3:// URLs need botocore: {INSTALL}") from e
    config = botocore.config.Config(connect_timeout=connect_timeout, read_timeout=read_timeout,
                                    retries={"max_attempts": retries + 1, "mode": "standard"},
                                    max_pool_connections=connections)
    session = botocore.session.get_session()
    # LastModified stays the store's text: parsing it (dateutil) was 55% of planning a listing
    # (100,000 keys: 10 of 18 s), and nothing here reads it.
    session.get_component("response_parser_factory").set_parser_defaults(timestamp_parser=str)
    return session.create_client("s3", endpoint_url=endpoint or None, config=config)


def storage_options(endpoint: str = "") -> dict:
    """fsspec/s3fs options (datasets' ``storage_options``): only the endpoint, when one is given;
    s3fs reads the rest from the AWS variables and files."""
    return {"client_kwargs": {"endpoint_url": endpoint}} if endpoint else {}


def explain(url: str, e: BaseException, endpoint: str = "") -> StoreError:
    """A StoreError naming ``url`` and, in words, why the store refused (or was not reached)."""
    code = _code(e)
    where = endpoint or "AWS's default (AWS_ENDPOINT_URL is not set)"
    reasons = {
        "NoSuchBucket": "the bucket does not exist",
        "AccessDenied": "access denied: these credentials may not read it",
        "AllAccessDisabled": "access denied",
        "InvalidAccessKeyId": "the access key is not known to the store (AWS_ACCESS_KEY_ID)",
        "SignatureDoesNotMatch": "the secret key is wrong (AWS_SECRET_ACCESS_KEY)",
        "InvalidToken": "the session token is wrong or expired (AWS_SESSION_TOKEN)",
        "ExpiredToken": "the session token has expired (AWS_SESSION_TOKEN)",
        "NoSuchKey": "no such object",
        "NoCredentials": "no credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY or AWS_PROFILE",
        "Unreachable": f"cannot reach the store's endpoint ({where}): {e}",
    }
    text = reasons.get(code) or f"{code}: {e}"
    error = StoreError(f"{url}: {text}"[:600])
    error.abort_stage = code == "Unreachable" or (status_of(e) or 0) >= 500
    return error


def _code(e: BaseException) -> str:
    import botocore.exceptions as bx

    if isinstance(e, bx.ClientError):
        code = str(e.response.get("Error", {}).get("Code", "ClientError"))
        return {"404": "NoSuchKey", "403": "AccessDenied"}.get(code, code)  # HEAD answers carry only the status
    if isinstance(e, (bx.NoCredentialsError, bx.PartialCredentialsError)):
        return "NoCredentials"
    if isinstance(e, (bx.EndpointConnectionError, bx.ConnectTimeoutError, bx.ReadTimeoutError,
                      bx.ConnectionClosedError, bx.ProxyConnectionError)):
        return "Unreachable"
    return type(e).__name__


def status_of(e: BaseException) -> int | None:
    """The HTTP status of a botocore ClientError (None for a network failure)."""
    import botocore.exceptions as bx

    if isinstance(e, bx.ClientError):
        return e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return None


def iter_objects(s3, url: str, start_after: str = "", page_size: int = 1000) -> Iterator[dict]:
    """{Key, ETag, Size} of every object under ``url``'s prefix after ``start_after``, in key order,
    one page (``page_size`` keys) at a time: a listing of any length is never held."""
    bucket, prefix = split_url(url)
    kwargs = {"Bucket": bucket, "Prefix": prefix, "PaginationConfig": {"PageSize": page_size}}
    if start_after:
        kwargs["StartAfter"] = start_after
    with _refusals(url, s3):
        for page in s3.get_paginator("list_objects_v2").paginate(**kwargs):
            yield from page.get("Contents", ())


@contextlib.contextmanager
def _refusals(url: str, s3) -> Iterator[None]:
    """botocore's errors inside become a StoreError naming ``url`` (:func:`explain`)."""
    import botocore.exceptions as bx

    try:
        yield
    except (bx.ClientError, bx.BotoCoreError) as e:
        raise explain(url, e, s3.meta.endpoint_url) from e


def get_bytes(s3, bucket: str, key: str, max_bytes: int, deadline: float, retries: int = 3,
              backoff: float = 1.0) -> bytes:
    """One object's bytes. botocore retries the request itself (5xx, SlowDown, refused
    connections); a body cut or stalled mid-way is retried here, ``retries`` times with jittered
    back-off from ``backoff`` seconds, while it fits before ``deadline`` (``time.monotonic()``).
    Raises ``TooLarge`` past ``max_bytes`` (declared or read) and ``TimeoutError`` past the deadline."""
    import random

    for attempt in range(retries + 1):
        try:
            return _get_once(s3, bucket, key, max_bytes, deadline)
        except _cut_errors() as e:
            wait = backoff * 2 ** attempt * random.uniform(0.75, 1.25)
            if attempt == retries or time.monotonic() + wait > deadline:
                raise StoreError(f"s3://{bucket}/{key}: the store stopped sending (the body was cut or stalled "
                                 f"{attempt + 1} times): {e}"[:400]) from e
            time.sleep(wait)
    raise AssertionError("unreachable")


def _cut_errors() -> tuple:
    import botocore.exceptions as bx
    import urllib3.exceptions as ux

    return (bx.ResponseStreamingError, bx.IncompleteReadError, bx.ReadTimeoutError, bx.ConnectionClosedError,
            ux.ProtocolError, ux.ReadTimeoutError)


def _get_once(s3, bucket: str, key: str, max_bytes: int, deadline: float) -> bytes:
    resp = s3.get_object(Bucket=bucket, Key=key)
    body = resp["Body"]
    try:
        if resp.get("ContentLength", 0) > max_bytes:
            raise TooLarge(f"{resp['ContentLength']} bytes > data.max_bytes {max_bytes}")
        out = bytearray()
        for chunk in body.iter_chunks(1 << 16):
            out += chunk
            if len(out) > max_bytes:
                raise TooLarge(f"more than data.max_bytes {max_bytes}")
            if time.monotonic() > deadline:
                raise TimeoutError("over data.fetch_deadline")
        if resp.get("ContentLength") is not None and len(out) != resp["ContentLength"]:
            import botocore.exceptions as bx

            raise bx.IncompleteReadError(actual_bytes=len(out), expected_bytes=resp["ContentLength"])
        return bytes(out)
    finally:
        body.close()


class TooLarge(Exception):
    pass


def process_client(endpoint: str = "", **settings):
    """This process's botocore client for ``endpoint`` and ``settings`` (:func:`client`'s), one per
    process id and AWS settings (botocore's clients are thread-safe; making one takes ~0.1 s).
    Synchronous on purpose: an asyncio client (s3fs) in a process that forks dataloader workers
    shares its epoll instance with them, and a worker that drops its inherited copy of the
    connections unregisters the parent's sockets: the parent's next request then waited out a
    15 s timeout (measured, 8 loaders in a row: 50 s)."""
    import os

    aws = tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("AWS_")))
    key = (os.getpid(), aws, endpoint, tuple(sorted(settings.items())))
    if key not in _CLIENTS:
        for other in [k for k in _CLIENTS if k[0] != key[0]]:
            del _CLIENTS[other]  # a fork's parent's: its connections are never shared
        _CLIENTS[key] = client(endpoint, **{"read_timeout": 60.0, **settings})
    return _CLIENTS[key]


_CLIENTS: dict = {}


def open_read(url: str, endpoint: str = ""):
    """A binary stream of an ``s3://`` object (read front to back: a shard, a URL list,
    stats.json); a StoreError names the URL when the store refuses."""
    bucket, key = split_url(url)
    s3 = process_client(endpoint)
    with _refusals(url, s3):
        return s3.get_object(Bucket=bucket, Key=key)["Body"]


def load_json(ref):
    """A JSON document given as a dict (returned as is), a local path or an ``s3://`` URL."""
    import json
    from pathlib import Path

    if isinstance(ref, dict):
        return ref
    if is_s3(str(ref)):
        with open_read(str(ref)) as f:
            return json.loads(f.read())
    return json.loads(Path(ref).read_text())


def glob(pattern: str, endpoint: str = "", suffix: str = "") -> list[str]:
    """``s3://`` URLs matching a glob (``*`` ``?`` ``[...]``; ``*`` also crosses '/'), or every
    object ending in ``suffix`` under a prefix ending in '/', sorted; a plain URL as it is."""
    import fnmatch
    import re

    wild = re.search(r"[*?\[]", pattern)
    if not wild and not pattern.endswith("/"):
        return [pattern]
    fixed = pattern[: wild.start()] if wild else pattern
    bucket, _ = split_url(fixed)
    found = [f"s3://{bucket}/{o['Key']}" for o in iter_objects(process_client(endpoint), fixed)]
    if wild:
        return sorted(u for u in found if fnmatch.fnmatchcase(u, pattern))
    return sorted(u for u in found if u.endswith(suffix))


def publish(folder, url: str, endpoint: str = "") -> list[str]:
    """Upload a stage's output folder to ``url`` under the same relative names (what a trainer on
    another machine streams: ``latent_loader("s3://.../train/", stats="s3://.../stats.json")``).
    The runner's records (``.done/``) and temporary files stay behind; objects already there with
    the same size are skipped, so a re-run after a cut finishes the upload. Returns the URLs."""
    from pathlib import Path

    from tqdm import tqdm

    root, s3 = Path(folder), process_client(endpoint)
    files = sorted(p for p in root.rglob("*") if p.is_file() and not any(
        part.startswith(".") for part in p.relative_to(root).parts) and not p.name.endswith(".tmp"))
    if not files:
        raise StoreError(f"{folder}: nothing to publish")
    dest = url.rstrip("/")
    done = []
    for p in tqdm(files, desc=f"publish {dest}", unit="file", mininterval=1.0):
        target = f"{dest}/{p.relative_to(root).as_posix()}"
        bucket, key = split_url(target)
        with _refusals(target, s3):
            if _size(s3, bucket, key) != p.stat().st_size:
                with open(p, "rb") as f:
                    s3.put_object(Bucket=bucket, Key=key, Body=f)
        done.append(target)
    return done


def _size(s3, bucket: str, key: str) -> int | None:
    """An object's size, None when it does not exist."""
    try:
        return s3.head_object(Bucket=bucket, Key=key)["ContentLength"]
    except Exception as e:
        if status_of(e) == 404:
            return None
        raise


if __name__ == "__main__":  # python -m ldm_vae.s3 publish data/latents s3://bucket/run1/latents
    import argparse

    ap = argparse.ArgumentParser(description="Upload an output folder (latents) to S3 under the same names.")
    ap.add_argument("command", choices=["publish"])
    ap.add_argument("folder")
    ap.add_argument("url")
    ap.add_argument("--endpoint", default="", help="an S3-compatible store's URL (default: AWS_ENDPOINT_URL)")
    args = ap.parse_args()
    try:
        print(f"published {len(publish(args.folder, args.url, args.endpoint))} files to {args.url}")
    except StoreError as e:
        raise SystemExit(f"publish: {e}")
