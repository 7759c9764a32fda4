"""The preflight of `make run` / `make test` / `.ci/run`, run as they run it (a bare `python3 FILE`), with its
view of the machine narrowed to a directory of our own: no system package is touched."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dumont import preflight

SCRIPT = Path(preflight.__file__)


def run_preflight(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=60,
                          env=env or {**os.environ, "PATH": "/nonexistent"})


def tool_dir(tmp_path: Path, *, without: set[str], profile: str = "run") -> Path:
    """A directory that holds every tool of `profile` (as a stub) except `without`: the preflight's view."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in preflight.tools_for(profile):
        if tool.command not in without:
            stub = bin_dir / tool.command
            stub.write_text("#!/bin/sh\nexit 0\n")
            stub.chmod(0o755)
    return bin_dir


def test_the_code_runs_every_tool_the_preflight_checks_for_and_no_other():
    # what the code runs, found by reading it: a new tool in the code must be added to the preflight
    repo = SCRIPT.parent.parent
    sources = "\n".join(p.read_text() for d in ("machines", "instances", "snapshots", "agent", "dumont")
                        for p in (repo / d).rglob("*.py") if p.name != "preflight.py")
    for command in ("sshd", "rsync", "restic", "zstd", "tar", "python3"):
        assert command in sources, command
    assert "-e \\\"{ssh}\\\"" in sources or '-e "{ssh}"' in sources  # rsync's transport: the ssh client
    assert {t.command for t in preflight.tools_for("run")} == {"sshd", "ssh", "rsync", "restic", "python3", "tar",
                                                              "zstd"}
    assert {t.command for t in preflight.tools_for("test")} - {t.command for t in preflight.tools_for("run")} == {
        "chromium", "chromedriver"}


@pytest.mark.parametrize("hidden", ["restic", "sshd"])
def test_a_missing_tool_stops_everything_with_its_name_and_the_install_command(tmp_path, hidden):
    bin_dir = tool_dir(tmp_path, without={hidden})

    result = run_preflight("run", "--no-install", "--search-path", str(bin_dir))

    assert result.returncode == 1
    package = {"restic": "restic", "sshd": "openssh-server"}[hidden]
    assert f"  {hidden} " in result.stderr and f"package {package}" in result.stderr
    assert f"sudo apt-get install -y {package}\n" in result.stderr
    assert result.stderr.count("\n  ") == 2, "one line for the tool, one for the command: nothing else missing"


def test_everything_present_passes_silently_and_tests_need_chromium_too(tmp_path):
    bin_dir = tool_dir(tmp_path, without=set())
    ok = run_preflight("run", "--no-install", "--search-path", str(bin_dir))
    assert (ok.returncode, ok.stdout, ok.stderr) == (0, "", "")

    for_tests = run_preflight("test", "--no-install", "--search-path", str(bin_dir))
    assert for_tests.returncode == 1
    assert "sudo apt-get install -y chromium chromium-driver" in for_tests.stderr


def test_on_macos_the_message_names_the_homebrew_formulas(tmp_path):
    bin_dir = tool_dir(tmp_path, without={"restic", "rsync", "chromium"}, profile="test")
    result = run_preflight("test", "--no-install", "--system", "darwin", "--search-path", str(bin_dir))
    assert result.returncode == 1
    assert "brew install rsync restic && brew install --cask chromium" in result.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="installs only as root or with passwordless sudo")
def test_as_root_it_installs_the_missing_packages_with_apt_and_goes_on(tmp_path):
    bin_dir = tool_dir(tmp_path, without={"restic", "zstd"})
    calls = tmp_path / "apt-calls"
    # a stand-in apt-get in the preflight's view: records its arguments and "installs" the two tools
    fake_apt = bin_dir / "apt-get"
    fake_apt.write_text(f"""#!/bin/sh
echo "$@" >> {calls}
case "$1" in install) for t in restic zstd; do printf '#!/bin/sh\\n' > {bin_dir}/$t; /bin/chmod +x {bin_dir}/$t; done;; esac
""")
    fake_apt.chmod(0o755)

    result = run_preflight("run", "--search-path", str(bin_dir))

    assert result.returncode == 0, result.stderr
    assert calls.read_text().splitlines() == ["update -qq", "install -y -qq --no-install-recommends restic zstd"]
    assert "installing restic zstd" in result.stdout


@pytest.mark.skipif(os.geteuid() != 0, reason="installs only as root or with passwordless sudo")
def test_an_install_that_fails_still_ends_with_the_message(tmp_path):
    bin_dir = tool_dir(tmp_path, without={"rsync"})
    (bin_dir / "apt-get").write_text("#!/bin/sh\necho 'E: Unable to locate package rsync' >&2\nexit 100\n")
    (bin_dir / "apt-get").chmod(0o755)

    result = run_preflight("run", "--search-path", str(bin_dir))

    assert result.returncode == 1
    assert "Unable to locate package rsync" in result.stderr
    assert "sudo apt-get install -y rsync" in result.stderr


def test_the_real_machine_passes(tmp_path):
    """This machine (a developer's, CI's after its own preflight) has every tool the tests use."""
    result = run_preflight("test", "--no-install", env=dict(os.environ))
    assert result.returncode == 0, result.stderr
    assert shutil.which("chromedriver")


def test_an_interpreter_that_cannot_create_the_virtualenv_names_its_venv_package(tmp_path):
    bin_dir = tool_dir(tmp_path, without=set())
    # a python3.11 like Debian's without python3.11-venv: no ensurepip
    fake_python = bin_dir / "python3.11"
    fake_python.write_text(f"#!/bin/sh\ncase \"$2\" in *ensurepip*) exit 1;; esac\nexec {sys.executable} \"$@\"\n")
    fake_python.chmod(0o755)
    version = f"{sys.version_info.major}.{sys.version_info.minor}"

    result = run_preflight("run", "--no-install", "--search-path", str(bin_dir), "--python", str(fake_python),
                           "--venv", str(tmp_path / "no-venv-yet"))

    assert result.returncode == 1
    assert f"sudo apt-get install -y python{version}-venv" in result.stderr
    # once the virtualenv exists, the interpreter's venv support no longer matters
    (tmp_path / "venv" / "bin").mkdir(parents=True)
    (tmp_path / "venv" / "bin" / "python").touch()
    assert run_preflight("run", "--no-install", "--search-path", str(bin_dir), "--python", str(fake_python),
                         "--venv", str(tmp_path / "venv")).returncode == 0
