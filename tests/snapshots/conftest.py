"""Shared, expensive fixtures of the snapshot tests: one real S3 server (rclone) per xdist worker,
the control plane's SSH key, and settings pointing at them. Machines are real sshd servers."""

from __future__ import annotations

import dataclasses
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from dumont.s3server import Credentials, S3Server, start_s3_server
from machines.ssh import generate_keypair
from tests.snapshots.helpers import Machines

BUCKET = "dumont-test"


@dataclasses.dataclass(frozen=True)
class S3:
    server: S3Server
    admin: Credentials
    scope_secret: str

    @property
    def endpoint(self) -> str:
        return self.server.endpoint


@pytest.fixture(scope="session")
def s3(tmp_path_factory) -> Iterator[S3]:
    root = tmp_path_factory.mktemp("s3")
    admin = Credentials(f"test-admin-{secrets.token_hex(4)}", secrets.token_hex(20))
    scope_secret = secrets.token_hex(20)
    server = start_s3_server(root, admin=admin, scope_secret=scope_secret)
    try:
        yield S3(server, admin, scope_secret)
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def control_key(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("control-plane") / "id_ed25519"
    generate_keypair(path)
    return path


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("dumont-data")


def snapshot_settings_env(s3: S3, control_key: Path, data_dir: Path) -> dict[str, str]:
    """The same settings as environment variables, for worker subprocesses."""
    return {
        "SNAPSHOT_S3_ENDPOINT": s3.endpoint,
        "SNAPSHOT_FAST_S3_ENDPOINT": s3.server.fast_endpoint,
        "SNAPSHOT_S3_BUCKET": BUCKET,
        "SNAPSHOT_S3_REGION": "auto",
        "SNAPSHOT_S3_ACCESS_KEY_ID": s3.admin.access_key_id,
        "SNAPSHOT_S3_SECRET_ACCESS_KEY": s3.admin.secret_access_key,
        "SNAPSHOT_MACHINE_CREDENTIALS": "scoped",
        "SNAPSHOT_S3_SCOPE_SECRET": s3.scope_secret,
        "SNAPSHOT_RESTIC_CONNECTIONS": "8",
        "SNAPSHOT_PROGRESS_EVENT_SECONDS": "0",
        "DUMONT_DATA_DIR": str(data_dir),
        "DUMONT_SSH_KEY_PATH": str(control_key),
    }


@pytest.fixture(autouse=True)
def snapshot_settings(settings, s3: S3, control_key: Path, data_dir: Path) -> S3:
    settings.SNAPSHOT_S3_ENDPOINT = s3.endpoint
    settings.SNAPSHOT_FAST_S3_ENDPOINT = s3.server.fast_endpoint
    settings.SNAPSHOT_S3_BUCKET = BUCKET
    settings.SNAPSHOT_S3_REGION = "auto"
    settings.SNAPSHOT_S3_ACCESS_KEY_ID = s3.admin.access_key_id
    settings.SNAPSHOT_S3_SECRET_ACCESS_KEY = s3.admin.secret_access_key
    settings.SNAPSHOT_MACHINE_CREDENTIALS = "scoped"
    settings.SNAPSHOT_S3_SCOPE_SECRET = s3.scope_secret
    settings.SNAPSHOT_RESTIC_CONNECTIONS = 8
    settings.SNAPSHOT_PROGRESS_EVENT_SECONDS = 0
    settings.DUMONT_DATA_DIR = data_dir
    settings.DUMONT_SSH_KEY_PATH = control_key
    return s3


@pytest.fixture(scope="module")
def machines(tmp_path_factory, control_key: Path) -> Iterator[Machines]:
    factory = Machines(tmp_path_factory.mktemp("machines"), control_key)
    try:
        yield factory
    finally:
        factory.stop_all()
        shutil.rmtree(factory.root, ignore_errors=True)
