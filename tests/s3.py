"""A real S3 server for the tests: moto's, on 127.0.0.1, with one new bucket per test."""

from __future__ import annotations

import logging
import re
import uuid
from dataclasses import dataclass, field
from pathlib import Path

KEY_ID = "AKIATESTKEYID0000001"
SECRET = "s3cr3t-Value-That-Must-Not-Leak"


def start_server(port: int = 0):
    """A started ``ThreadedMotoServer`` and its endpoint URL. Its objects live in moto's in-process
    backend, so a server started again on the same port serves the same buckets."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    host, bound = server.get_host_and_port()
    return server, f"http://{host}:{bound}"


@dataclass
class Bucket:
    endpoint: str
    name: str
    options: dict = field(default_factory=dict)

    @classmethod
    def create(cls, endpoint: str, hint: str) -> Bucket:
        import boto3

        name = (re.sub(r"[^a-z0-9]+", "-", hint.lower())[:40].strip("-") + "-" + uuid.uuid4().hex[:8]).strip("-")
        boto3.client(
            "s3", endpoint_url=endpoint, aws_access_key_id=KEY_ID, aws_secret_access_key=SECRET, region_name="us-east-1"
        ).create_bucket(Bucket=name)
        return cls(endpoint, name, {"endpoint_url": endpoint, "key": KEY_ID, "secret": SECRET})

    def url(self, prefix: str = "export") -> str:
        return f"s3://{self.name}/{prefix}"

    @property
    def env(self) -> dict[str, str]:
        """The standard AWS environment that points a process at this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": KEY_ID,
            "AWS_SECRET_ACCESS_KEY": SECRET,
            "AWS_REGION": "us-east-1",
        }

    @property
    def fs(self):
        import s3fs

        return s3fs.S3FileSystem(skip_instance_cache=True, **self.options)

    def names(self, prefix: str = "export") -> list[str]:
        fs = self.fs
        try:
            return sorted(p.rsplit("/", 1)[-1] for p in fs.ls(f"{self.name}/{prefix}", refresh=True))
        except FileNotFoundError:
            return []

    def download(self, prefix: str, dest: Path) -> Path:
        """Every object under ``prefix`` into the local folder ``dest``."""
        dest.mkdir(parents=True, exist_ok=True)
        fs = self.fs
        for name in self.names(prefix):
            (dest / name).write_bytes(fs.cat_file(f"{self.name}/{prefix}/{name}"))
        return dest
