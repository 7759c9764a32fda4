"""Preflight: the OS tools Dumont runs, found (or installed) before any process starts.

    python3 dumont/preflight.py run|test [--no-install] [--search-path DIRS] [--python PYTHON]

`make run`, `make test` and `.ci/run` call it first. It looks for every OS program the code really runs
(TOOLS below; `test` adds headless Chromium and its driver). What is missing is installed with apt when it
may be (root, or `sudo -n` works); otherwise it stops with one message naming each missing tool and the
exact command that installs it (Homebrew names on macOS). Exit 0: everything is there; 1: something is not.

Standard library only, run as a file (not `-m dumont.preflight`, which would import the Celery app): it runs
before the virtualenv exists.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

# sshd lives in sbin, which is not on every user's PATH; sshd.py looks in the same places
SBIN_DIRS = ("/usr/local/sbin", "/usr/sbin", "/sbin")


@dataclasses.dataclass(frozen=True)
class Tool:
    command: str  # what the code runs
    apt: str  # the Debian/Ubuntu package that ships it
    brew: str  # the Homebrew formula ("" = macOS ships it)
    why: str
    tests_only: bool = False


TOOLS = (
    Tool("sshd", "openssh-server", "", "every local-marketplace machine is a real sshd"),
    Tool("ssh", "openssh-client", "openssh", "the standby mirror (rsync over ssh); `dumont ssh` and its tests"),
    Tool("rsync", "rsync", "rsync", "the standby mirror"),
    Tool("restic", "restic", "restic", "snapshots (backup, restore, retention)"),
    Tool("python3", "python3", "python", "DumontAgent on local-marketplace machines"),
    Tool("tar", "tar", "", "benchmark snapshot (the tar | zstd reference)"),
    Tool("zstd", "zstd", "zstd", "benchmark snapshot (the tar | zstd reference)"),
    Tool("chromium", "chromium", "--cask chromium", "the operator-UI test (headless)", tests_only=True),
    Tool("chromedriver", "chromium-driver", "chromedriver", "the operator-UI test (selenium)", tests_only=True),
)


def default_search_path() -> str:
    dirs = os.environ.get("PATH", "").split(os.pathsep)
    return os.pathsep.join([d for d in dirs if d] + [d for d in SBIN_DIRS if d not in dirs])


def tools_for(profile: str) -> tuple[Tool, ...]:
    return tuple(t for t in TOOLS if profile == "test" or not t.tests_only)


def missing_tools(tools: tuple[Tool, ...], search_path: str) -> list[Tool]:
    return [t for t in tools if shutil.which(t.command, path=search_path) is None]


def venv_missing(python: str, venv: Path) -> Tool | None:
    """Debian's python3.11 cannot create a virtualenv without python3-venv (no ensurepip)."""
    interpreter = shutil.which(python)
    if (venv / "bin" / "python").exists() or interpreter is None:
        return None  # nothing to create, or no such interpreter (make falls back to python3)
    probe = subprocess.run([interpreter, "-c", "import ensurepip, venv"], capture_output=True)
    if probe.returncode == 0:
        return None
    version = subprocess.run([interpreter, "-c", "import sys; print(*sys.version_info[:2], sep='.')"],
                             capture_output=True, text=True).stdout.strip()
    return Tool(f"{python} -m venv", f"python{version}-venv", "", "make creates .venv with it")


def install_command(packages: list[str], system: str) -> str:
    if system == "darwin":
        casks = [p.split()[-1] for p in packages if p.startswith("--cask ")]
        formulas = [p for p in packages if p and not p.startswith("--cask ")]
        parts = [f"brew install {' '.join(formulas)}"] if formulas else []
        parts += [f"brew install --cask {' '.join(casks)}"] if casks else []
        return " && ".join(parts)
    return f"sudo apt-get install -y {' '.join(packages)}"


def _privilege(search_path: str) -> list[str] | None:
    """[] as root, ["sudo", "-n"] when sudo works without a password, None when we may not install."""
    if os.geteuid() == 0:
        return []
    sudo = shutil.which("sudo", path=search_path)
    if sudo and subprocess.run([sudo, "-n", "true"], capture_output=True).returncode == 0:
        return [sudo, "-n"]
    return None


def apt_install(packages: list[str], search_path: str) -> bool:
    """Install with apt when allowed; False when we may not (or apt is not there)."""
    apt = shutil.which("apt-get", path=search_path)
    prefix = _privilege(search_path)
    if apt is None or prefix is None:
        return False
    print(f"[preflight] installing {' '.join(packages)} (apt-get)", flush=True)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for args in (["update", "-qq"], ["install", "-y", "-qq", "--no-install-recommends", *packages]):
        result = subprocess.run([*prefix, apt, *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True)
        if result.returncode != 0:
            print(f"[preflight] apt-get {args[0]} failed: {result.stderr.strip()[-1000:]}", file=sys.stderr)
            return False
    return True


def report(missing: list[Tool], system: str) -> str:
    packages = [t.brew if system == "darwin" else t.apt for t in missing]
    width = max(len(t.command) for t in missing)
    lines = ["Nothing was started: these OS tools are missing here:"]
    for tool, package in zip(missing, packages, strict=True):
        shipped = f"package {package}" if package else "ships with macOS: check your PATH"
        lines.append(f"  {tool.command:<{width}}  ({shipped}): {tool.why}")
    to_install = [p for p in dict.fromkeys(packages) if p]
    if to_install:
        lines += ["Install them, then run the same command again:", f"  {install_command(to_install, system)}"]
    return "\n".join(lines)


def preflight(profile: str, *, search_path: str | None = None, install: bool = True, python: str | None = None,
              venv: Path | None = None, system: str | None = None) -> int:
    search_path = search_path if search_path is not None else default_search_path()
    system = (system or platform.system()).lower()
    tools = tools_for(profile)
    missing = missing_tools(tools, search_path)
    needs_venv = venv_missing(python, venv) if python and venv else None
    if needs_venv and system == "linux":
        missing.append(needs_venv)
    if missing and install and system == "linux" and apt_install(list(dict.fromkeys(t.apt for t in missing)),
                                                                 search_path):
        missing = missing_tools(tools, search_path)
        if needs_venv and venv_missing(python, venv):
            missing.append(needs_venv)
    if missing:
        print(report(missing, system), file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("profile", choices=("run", "test"))
    parser.add_argument("--no-install", action="store_true", help="only check and explain, never run apt")
    parser.add_argument("--search-path", help="where to look for tools (default: $PATH and the sbin dirs)")
    parser.add_argument("--python", help="the interpreter that will create the virtualenv")
    parser.add_argument("--venv", type=Path, help="the virtualenv it will create (checked only while absent)")
    parser.add_argument("--system", help=argparse.SUPPRESS)  # linux / darwin, for tests
    args = parser.parse_args(argv)
    return preflight(args.profile, search_path=args.search_path, install=not args.no_install, python=args.python,
                     venv=args.venv, system=args.system)


if __name__ == "__main__":
    sys.exit(main())
