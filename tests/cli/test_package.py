"""The client package as a user's laptop gets it: `pip install .` ships dumont_cli only, with its own
dependencies, and it imports nothing of Django; every command answers --help."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from email.parser import Parser

import click
import pytest
from click.testing import CliRunner

from dumont_cli.main import cli, minutes_of
from tests.harness import REPO_ROOT

COMMANDS = ["login", "logout", "offers", "up", "ls", "status", "events", "ssh", "pause", "resume", "hibernate",
            "wake", "keep-awake", "snapshots", "snapshot", "restore", "standby status", "standby enable",
            "standby disable", "failover", "failback", "savings", "down", "ssh-key add", "ssh-key ls",
            "ssh-config", "proxy"]
LISTINGS = ["offers", "ls", "status", "events", "snapshots", "standby status", "savings", "ssh-key ls"]


def all_commands(group: click.Group, prefix: str = "") -> list[str]:
    names = []
    for name, command in group.commands.items():
        names += all_commands(command, f"{prefix}{name} ") if isinstance(command, click.Group) else [prefix + name]
    return names


def test_every_command_has_help_and_every_listing_has_json():
    assert sorted(all_commands(cli)) == sorted(COMMANDS)
    runner = CliRunner()
    for command in COMMANDS:
        result = runner.invoke(cli, [*command.split(), "--help"])
        assert result.exit_code == 0 and "Usage: " in result.output, (command, result.output)
        assert "--json" in result.output or command not in LISTINGS, command


def test_the_client_imports_nothing_of_the_server():
    loaded = subprocess.run(
        [sys.executable, "-c", "import sys, dumont_cli.main; "
         "print(sorted({m.split('.')[0] for m in sys.modules} & {'django', 'rest_framework', 'celery', 'dumont', "
         "'instances', 'machines', 'snapshots', 'agent', 'paramiko'}))"],
        cwd=REPO_ROOT, capture_output=True, text=True, check=True, env={"PATH": "/usr/bin:/bin"},
    )
    assert loaded.stdout == "[]\n"


def test_pip_install_ships_the_client_only(tmp_path):
    # built from a copy: a setuptools build writes build/ and *.egg-info next to its sources
    source = tmp_path / "source"
    source.mkdir()
    shutil.copy(REPO_ROOT / "pyproject.toml", source)
    shutil.copytree(REPO_ROOT / "dumont_cli", source / "dumont_cli", ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "--wheel-dir", str(tmp_path / "wheel"), str(source)], check=True, capture_output=True)
    (wheel,) = (tmp_path / "wheel").glob("*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        info = next(n for n in names if n.endswith(".dist-info/METADATA")).rsplit("/", 1)[0]
        metadata = Parser().parsestr(archive.read(f"{info}/METADATA").decode())
        entry_points = archive.read(f"{info}/entry_points.txt").decode()
    assert {n.split("/")[0] for n in names} == {"dumont_cli", info}
    assert "dumont = dumont_cli.main:cli" in entry_points
    requires = {r.split(">")[0].split("=")[0].strip().lower() for r in metadata.get_all("Requires-Dist")}
    assert requires == {"click", "rich", "requests", "tenacity"}


@pytest.mark.parametrize(("duration", "minutes"), [("60m", 60), ("2h", 120), ("1d", 1440), ("90s", 2), ("45", 45),
                                                   ("0", 0), ("off", 0)])
def test_keep_awake_durations(duration, minutes):
    assert minutes_of(duration) == minutes


def test_a_bad_duration_is_refused():
    with pytest.raises(click.BadParameter):
        minutes_of("soon")
