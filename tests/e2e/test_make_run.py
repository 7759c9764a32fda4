"""`make run` as a second checkout on the same machine meets it: only PORT (and the database and Redis)
set apart, while the ports that PORT derives for the S3 server and the marketplace are already taken by
someone else. Every process must still find the others where `make run` put them."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys

import pytest
import requests
from django_celery_beat.models import PeriodicTask

from dumont.celery import _beat_schedule
from tests.harness import REPO_ROOT, free_port, stop_process_group, subprocess_env, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]


def test_make_run_side_by_side_derives_or_picks_its_ports_and_tells_every_process(tmp_path):
    port = free_port()
    env = subprocess_env(PORT=str(port), DUMONT_DATA_DIR=str(tmp_path / "data"))
    for name in ("SNAPSHOT_S3_ENDPOINT", "SNAPSHOT_FAST_S3_ENDPOINT", "LOCAL_MARKETPLACE_URL",
                 "AGENT_CONTROL_PLANE_URL", "LOG_LEVEL"):
        env.pop(name, None)
    log_path = tmp_path / "make-run.log"
    with socket.socket() as other_checkout, socket.socket() as other_fast, open(log_path, "wb") as log:
        try:
            other_checkout.bind(("127.0.0.1", port + 1))  # "another checkout's S3 server"
            other_fast.bind(("127.0.0.1", port + 4))  # and its fast-path endpoint
        except OSError:
            pytest.skip(f"port {port + 1} or {port + 4} is taken already")
        other_checkout.listen(1)
        other_fast.listen(1)
        process = subprocess.Popen([sys.executable, "-m", "dumont.devrun"], cwd=REPO_ROOT, env=env, stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        try:
            def announced() -> re.Match | None:
                assert process.poll() is None, log_path.read_text()
                return re.search(r"s3 (http://\S+)\s+marketplace (http://\S+)", log_path.read_text())

            match = wait_until(announced, timeout=120, what="make run to announce its URLs")
            s3_url, market_url = match[1], match[2]
            assert s3_url != f"http://127.0.0.1:{port + 1}" and f"port {port + 1} (S3 server) is taken" in (
                log_path.read_text())
            assert market_url == f"http://127.0.0.1:{port + 2}"
            fast = wait_until(lambda: re.search(r"fast path on (http://\S+)", log_path.read_text()), timeout=60,
                              what="the S3 server to say where its fast path listens")
            fast_url = fast[1]
            assert fast_url != f"http://127.0.0.1:{port + 4}" and (
                f"port {port + 4} (S3 server, fast path) is taken" in log_path.read_text())

            def everything_answers() -> bool:
                assert process.poll() is None, log_path.read_text()
                try:
                    return (requests.get(f"http://127.0.0.1:{port}/api/v1/health", timeout=2).ok
                            and requests.get(f"{market_url}/_market/health/", timeout=2).ok
                            and requests.get(s3_url, timeout=2).status_code in (200, 403)
                            # unsigned: refused (the control plane's key only), but by rclone
                            and requests.get(fast_url, timeout=2).status_code in (400, 403))
                except requests.RequestException:
                    return False

            wait_until(everything_answers, timeout=120, what="web, marketplace and S3 to answer")
            # the processes were told: the web process lists the offers of the marketplace it was handed
            web = f"http://127.0.0.1:{port}/api/v1"
            token = requests.post(f"{web}/auth/login", json={"username": "admin", "password": "admin"},
                                  timeout=10).json()["access"]
            offers = requests.get(f"{web}/offers", headers={"Authorization": f"Bearer {token}"}, timeout=30).json()
            assert offers["errors"] == [] and offers["offers"]
            assert {o["provider"] for o in offers["offers"]} == {"local"}
            # stop only once beat has written its schedule: a Ctrl-C while it is still starting closes its
            # database connection under that write, and celery logs the traceback (not a routine line, but
            # not this test's subject either)
            names = set(_beat_schedule())
            wait_until(lambda: names <= set(PeriodicTask.objects.values_list("name", flat=True)), timeout=120,
                       what="beat to write its schedule")
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGINT)  # Ctrl-C: honcho stops every process
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    pass
            stop_process_group(process)
    text = log_path.read_text()
    assert "Task " not in text and "Sending due task" not in text, "routine lines in quiet mode"
