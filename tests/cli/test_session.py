"""The command line against a real web server (no worker): login, tokens that expire and are refreshed by
themselves (also by several processes at once), the API's errors as one line, `--json`, and a lost
connection retried until the server answers."""

from __future__ import annotations

import concurrent.futures
import json
import os
import stat
import subprocess
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pexpect
import pytest
import requests
from rest_framework_simplejwt.tokens import RefreshToken

from dumont_cli.client import token_expiry
from tests.cli.helpers import CLI, dumont
from tests.factories import make_instance
from tests.harness import REPO_ROOT, free_port, subprocess_env, wait_until, web_server
from tests.instances.test_metrics import status_event

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]
PASSWORD = "correct-horse-battery"
# the refresh token rotates (a new lifetime at each refresh): 30 s is longer than any gap between two
# commands of one test, even on two loaded cores, and short enough for the expiry test to wait out
ACCESS_SECONDS, REFRESH_SECONDS = 3, 30


@pytest.fixture(scope="module")
def server(django_db_setup, django_db_blocker, tmp_path_factory):
    """One web server for the module, with short token lifetimes."""
    with django_db_blocker.unblock():
        env = subprocess_env(JWT_ACCESS_SECONDS=str(ACCESS_SECONDS), JWT_REFRESH_SECONDS=str(REFRESH_SECONDS))
    with web_server(tmp_path_factory.mktemp("web"), env=env) as url:
        yield url


@pytest.fixture
def env(tmp_path):
    return {**os.environ, "DUMONT_CONFIG_DIR": str(tmp_path / "config"), "TERM": "dumb"}


def session_of(env) -> dict:
    return json.loads((Path(env["DUMONT_CONFIG_DIR"]) / "session.json").read_text())


def login(server, user, env) -> dict:
    dumont("login", "--url", server, "--username", user.username, env={**env, "DUMONT_PASSWORD": PASSWORD})
    return session_of(env)


def refresh_accepted(server, refresh: str) -> bool:
    return requests.post(f"{server}/api/v1/auth/refresh", json={"refresh": refresh}, timeout=10).status_code == 200


def test_login_keeps_the_session_private_and_access_tokens_renew_themselves(server, user, env):
    first = login(server, user, env)
    config = Path(env["DUMONT_CONFIG_DIR"])
    assert stat.S_IMODE((config / "session.json").stat().st_mode) == 0o600
    assert stat.S_IMODE(config.stat().st_mode) == 0o700
    assert first["url"] == server and first["username"] == user.username

    wait_until(lambda: time.time() > token_expiry(first["access"]), timeout=ACCESS_SECONDS + 5,
               what="the access token to expire")
    assert json.loads(dumont("ls", "--json", env=env).stdout) == []
    renewed = session_of(env)
    assert renewed["access"] != first["access"] and renewed["refresh"] != first["refresh"]
    assert not refresh_accepted(server, first["refresh"])  # rotated: the old one is spent


def test_processes_refreshing_at_once_share_one_refresh(server, user, env):
    first = login(server, user, env)
    wait_until(lambda: time.time() > token_expiry(first["access"]), timeout=ACCESS_SECONDS + 5,
               what="the access token to expire")
    # ssh, scp and rsync may each start a proxy at the same moment: a refresh token works once only
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        runs = list(pool.map(lambda _: dumont("ls", "--json", env=env, check=False), range(4)))
    assert [r.returncode for r in runs] == [0, 0, 0, 0], [r.stderr for r in runs]


def test_an_expired_session_says_to_log_in_again(server, user, env):
    first = login(server, user, env)
    wait_until(lambda: time.time() > token_expiry(first["refresh"]), timeout=REFRESH_SECONDS + 5,
               what="the refresh token to expire")
    expired = dumont("ls", env=env, check=False)
    assert expired.returncode == 1 and expired.stdout == ""
    assert expired.stderr.count("\n") == 1 and "session expired" in expired.stderr and "dumont login" in expired.stderr


def test_logout_revokes_the_refresh_token(server, user, env):
    session = login(server, user, env)
    dumont("logout", env=env)
    assert not (Path(env["DUMONT_CONFIG_DIR"]) / "session.json").exists()
    assert not refresh_accepted(server, session["refresh"])
    assert dumont("ls", env=env, check=False).stderr == "Error: not logged in: run `dumont login --url URL --username NAME`\n"


def test_login_asks_for_the_password_and_uses_the_xdg_config_dir(server, user, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "DUMONT_CONFIG_DIR"}
    env.update(XDG_CONFIG_HOME=str(tmp_path / "xdg"), TERM="dumb")
    child = pexpect.spawn(CLI[0], [*CLI[1:], "login", "--url", server, "--username", user.username],
                          cwd=str(REPO_ROOT), env=env, encoding="utf-8", timeout=60)
    child.expect("Password: ")
    child.sendline(PASSWORD)
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0, child.before
    assert json.loads((tmp_path / "xdg" / "dumont" / "session.json").read_text())["username"] == user.username


def test_wrong_password_and_api_errors_are_one_line_and_exit_1(server, user, env):
    wrong = dumont("login", "--url", server, "--username", user.username, env={**env, "DUMONT_PASSWORD": "nope"},
                   check=False)
    assert (wrong.returncode, wrong.stderr) == (1, "Error: No active account found with the given credentials\n")

    login(server, user, env)
    make_instance(user, name="busy", status="running")
    conflict = dumont("wake", "busy", env=env, check=False)
    assert (conflict.returncode, conflict.stderr) == (1, "Error: Cannot wake an instance that is running.\n")
    invalid = dumont("up", "no spaces", "--no-wait", env=env, check=False)
    assert invalid.returncode == 1 and invalid.stderr.count("\n") == 1
    assert "name: Letters, digits, '.', '_' and '-' only." in invalid.stderr
    no_standby = dumont("failover", "busy", env=env, check=False)
    assert (no_standby.returncode, no_standby.stderr) == (
        1, "Error: This instance has no standby with a mirror yet; enable standby and wait for its first sync.\n")
    missing = dumont("status", "ghost", env=env, check=False)
    assert (missing.returncode, missing.stderr) == (1, "Error: no instance named 'ghost'\n")


def test_listings_print_json_for_scripts(server, user, other_user, env):
    login(server, user, env)
    alpha = make_instance(user, name="alpha", status="hibernated", gpu_name="RTX 4090")
    now = datetime.now(UTC)  # hibernated for two days: savings on three dates
    status_event(alpha, now - timedelta(days=2, hours=1), "launching", "running", price_per_hour="0.40")
    status_event(alpha, now - timedelta(days=2), "hibernating", "hibernated", price_per_hour="0.40")
    make_instance(user, name="beta", status="paused")
    make_instance(user, name="gone", status="destroyed")
    make_instance(other_user, name="not-mine", status="running")
    listed = json.loads(dumont("ls", "--json", env=env).stdout)
    assert sorted((i["name"], i["status"]) for i in listed) == [("alpha", "hibernated"), ("beta", "paused")]
    everything = json.loads(dumont("ls", "--all", "--json", env=env).stdout)
    assert {i["name"] for i in everything} == {"alpha", "beta", "gone"}
    status = json.loads(dumont("status", "alpha", "--json", env=env).stdout)
    assert status["name"] == "alpha" and status["status"] == "hibernated" and status["ssh"] is None
    assert [e["data"]["to"] for e in status["events"]] == ["running", "hibernated"]
    assert json.loads(dumont("snapshots", "alpha", "--json", env=env).stdout) == []
    assert json.loads(dumont("ssh-key", "ls", "--json", env=env).stdout) == []
    savings = json.loads(dumont("savings", "--days", "7", "--json", env=env).stdout)
    assert savings["days"] == 7 and len(savings["daily"]) == 3
    assert 19.0 < float(savings["totals"]["net_savings"]) < 19.3  # 48 h x $0.40
    assert json.loads(dumont("standby", "status", "--json", env=env).stdout)["enabled"] is False
    assert "standby enabled: local" in dumont("standby", "enable", "--provider", "local", "--sync-interval", "120",
                                              env=env).stdout
    assert json.loads(dumont("standby", "status", "--json", env=env).stdout)["enabled"] is True
    dumont("standby", "disable", env=env)
    assert json.loads(dumont("standby", "status", "--json", env=env).stdout)["enabled"] is False
    offers = json.loads(dumont("offers", "--json", env=env).stdout)
    assert set(offers) == {"offers", "errors"}
    config = dumont("ssh-config", env=env).stdout
    assert "Host dumont-alpha\n    User root\n    ProxyCommand " in config  # asleep: its user is kept
    assert "proxy alpha\n    HostKeyAlias dumont-alpha\n" in config and "Host dumont-*\n" in config
    assert "dumont-gone" not in config and "not-mine" not in config
    chart = dumont("savings", "--days", "7", env=env).stdout
    assert "daily net savings" in chart and f"{savings['daily'][1]['date']}  $9.60" in chart


def test_a_lost_connection_is_retried_with_backoff_and_said_so(user, tmp_path):
    port = free_port()
    config = tmp_path / "config"
    config.mkdir(mode=0o700)
    refresh = RefreshToken.for_user(user)
    (config / "session.json").write_text(json.dumps({"url": f"http://127.0.0.1:{port}", "username": user.username,
                                                      "refresh": str(refresh), "access": str(refresh.access_token)}))
    make_instance(user, name="later", status="hibernated")
    env = {**os.environ, "DUMONT_CONFIG_DIR": str(config), "DUMONT_RETRIES": "8"}
    client = subprocess.Popen([*CLI, "ls", "--json"], cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        said = client.stderr.readline()  # nothing listens yet: the first attempt fails at once
        assert said.startswith("dumont: connection to the API lost (ConnectionError); retrying in 1s (attempt 2 of 8)")
        with web_server(tmp_path, env=subprocess_env(), port=port):
            out, rest = client.communicate(timeout=120)
    finally:
        client.kill()
    assert client.returncode == 0, rest
    assert [i["name"] for i in json.loads(out)] == ["later"]
