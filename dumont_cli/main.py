"""The `dumont` commands (Click), tables and charts (Rich). Progress goes to stderr, results to stdout."""

from __future__ import annotations

import json
import math
import os
import re
import sys
import time
from pathlib import Path

import click

from dumont_cli import __version__
from dumont_cli.client import Api, CliError
from dumont_cli.config import ConfigDir, default_config_dir
from dumont_cli.output import err, out
from dumont_cli.sshproxy import host_alias, include_in, proxy, ssh_config_text, ssh_options, ssh_user

GONE = {"failed", "destroying", "destroyed"}
BANDS = {"excellent": "green", "good": "cyan", "fair": "yellow", "poor": "red", "unknown": "dim"}


class Cli(click.Group):
    """Every failure is one line on stderr and exit code 1 (the API's own message where there is one)."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except CliError as exc:
            raise click.ClickException(str(exc)) from None


def api_of(ctx: click.Context) -> Api:
    return ctx.find_object(State).api


class State:
    def __init__(self, config_dir: Path):
        self.config = ConfigDir(config_dir)
        self._api: Api | None = None

    @property
    def api(self) -> Api:
        if self._api is None:
            self._api = Api(self.config)
        return self._api


json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON (for scripts) instead of a table.")
wait_option = click.option("--wait/--no-wait", default=True, show_default=True,
                           help="Wait (showing progress) until it is done, or return at once.")


def human_bytes(count: float) -> str:
    from dumont_cli.progress import human_bytes

    return human_bytes(count)


def new_table(*columns: str, **options):
    from rich.table import Table

    return Table(*columns, **options)


def emit_json(data) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


def follow(api: Api, instance: dict, *, until: set[str], fails: set[str] = frozenset(), title: str,
           errors_fail: bool = False, settle=None) -> dict:
    from dumont_cli.progress import Follower

    Follower(api, instance).wait(until=until, fails=(GONE - until) | set(fails), console=err.real, title=title,
                                 errors_fail=errors_fail, settle=settle)
    return api.get(f"/api/v1/instances/{instance['id']}")


def race_over(event: dict) -> bool:
    """The race's last word: its losers are destroyed (it comes just after the winner is running)."""
    return event["kind"] == "race" and "losers" in (event.get("data") or {})


def ssh_line(instance: dict) -> str:
    ssh = instance.get("ssh") or {}
    if not ssh:
        return ""
    return f"ssh dumont-{instance['name']}    (or: ssh -p {ssh['port']} {ssh['user']}@{ssh['host']})"


@click.group(cls=Cli, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config-dir", type=click.Path(path_type=Path), default=default_config_dir, show_default=False,
              help="Where the session and known_hosts live (default: $DUMONT_CONFIG_DIR, else the XDG config dir).")
@click.version_option(__version__, prog_name="dumont")
@click.pass_context
def cli(ctx: click.Context, config_dir: Path):
    """Dumont Cloud: GPU machines that hibernate when idle and wake when you connect."""
    ctx.obj = State(config_dir)


# ---- session -------------------------------------------------------------------------------


@cli.command()
@click.option("--url", envvar="DUMONT_URL", default="http://127.0.0.1:8000", show_default=True,
              help="The control plane's URL ($DUMONT_URL).")
@click.option("--username", envvar="DUMONT_USERNAME", prompt=True, help="Username or email.")
@click.option("--password", envvar="DUMONT_PASSWORD", prompt=True, hide_input=True,
              help="Password ($DUMONT_PASSWORD; asked when not given).")
@click.pass_obj
def login(state: State, url: str, username: str, password: str):
    """Log in; the refresh token is kept (mode 0600) and access tokens are renewed by themselves."""
    Api(state.config, url=url, session=None).login(username, password)
    out.print(f"logged in to {url} as {username} (session in {state.config.session_file})")


@cli.command()
@click.pass_obj
def logout(state: State):
    """Revoke the stored refresh token and forget the session."""
    state.api.logout()
    out.print("logged out")


# ---- offers and launch ---------------------------------------------------------------------


@cli.command()
@click.option("--gpu", "gpu_name", help='GPU model, e.g. "RTX 4090".')
@click.option("--num-gpus", type=int)
@click.option("--max-price", type=float, help="Most $/h.")
@click.option("--region")
@json_option
@click.pass_obj
def offers(state: State, gpu_name, num_gpus, max_price, region, as_json):
    """The deploy wizard: offers of every provider you can use, with each host's reliability."""
    data = state.api.get("/api/v1/offers", gpu_name=gpu_name, num_gpus=num_gpus, max_price=max_price, region=region)
    if as_json:
        return emit_json(data)
    table = new_table("provider", "GPU", "n", "$/h", "region", "host", "reliability", "success", "tries")
    for offer in data["offers"]:
        band = offer["reliability_band"]
        rate = offer["success_rate"]
        table.add_row(offer["provider"], offer["gpu_name"], str(offer["num_gpus"]), offer["price_per_hour"],
                      offer["region"], offer["host_id"],
                      "[red]blacklisted[/]" if offer["blacklisted"] else f"[{BANDS.get(band, 'white')}]{band}[/]",
                      "-" if rate is None else f"{rate:.0%}", str(offer["attempts"]))
    out.print(table)
    for problem in data.get("errors") or []:
        err.print(f"[yellow]{problem['provider']}: {problem['detail']}[/]")


@cli.command()
@click.argument("name")
@click.option("--gpu", "gpu_name", default="", help='GPU model, e.g. "RTX 4090" (default: any).')
@click.option("--num-gpus", type=int, default=1, show_default=True)
@click.option("--max-price", type=str, help="Most $/h per machine.")
@click.option("--disk", "disk_gb", type=int, default=50, show_default=True, help="Disk, GB.")
@click.option("--image", default="pytorch/pytorch:latest", show_default=True)
@click.option("--region", default="")
@click.option("--provider", default="local", show_default=True)
@click.option("--account", "provider_account", type=int, help="Provider account id (see the API).")
@click.option("--interruptible", is_flag=True, help="Rent interruptible (spot) machines.")
@wait_option
@json_option
@click.pass_obj
def up(state: State, name, gpu_name, num_gpus, max_price, disk_gb, image, region, provider, provider_account,
       interruptible, wait, as_json):
    """Launch an instance: a race of several machines, the first that answers SSH wins."""
    body = {"name": name, "gpu_name": gpu_name, "num_gpus": num_gpus, "disk_gb": disk_gb, "image": image,
            "region": region, "provider": provider, "interruptible": interruptible}
    if max_price:
        body["max_price_per_hour"] = max_price
    if provider_account:
        body["provider_account"] = provider_account
    instance = state.api.post("/api/v1/instances", body)
    if wait:
        err.print(f"launching {name} (instance {instance['id']}): a race for a machine")
        instance = follow(state.api, instance, until={"running"}, title=f"{name}: launch race", settle=race_over)
    if as_json:
        return emit_json(instance)
    out.print(f"{name} is {instance['status']}" + (f": {ssh_line(instance)}" if instance.get("ssh") else ""))


# ---- listing -------------------------------------------------------------------------------


@cli.command(name="ls")
@click.option("--all", "show_all", is_flag=True, help="Include destroyed instances.")
@json_option
@click.pass_obj
def list_instances(state: State, show_all, as_json):
    """Your instances."""
    instances = [i for i in state.api.all_pages("/api/v1/instances") if show_all or i["status"] != "destroyed"]
    if as_json:
        return emit_json(instances)
    table = new_table("name", "id", "status", "GPU", "$/h", "ssh", "since")
    for i in instances:
        ssh = i.get("ssh") or {}
        table.add_row(i["name"], str(i["id"]), i["status"], i["gpu_name"] or "any",
                      (i.get("machine") or {}).get("price_per_hour") or "",
                      f"{ssh['host']}:{ssh['port']}" if ssh else "", i["status_changed_at"][:19].replace("T", " "))
    out.print(table)


@cli.command()
@click.argument("name")
@json_option
@click.pass_obj
def status(state: State, name, as_json):
    """One instance: its state, machine, SSH line and latest events."""
    instance = state.api.get(f"/api/v1/instances/{state.api.instance(name)['id']}")
    if as_json:
        return emit_json(instance)
    out.print(f"[bold]{instance['name']}[/] (#{instance['id']}): [bold]{instance['status']}[/] {instance['status_reason']}")
    if instance.get("ssh"):
        out.print(f"  {ssh_line(instance)}")
    if instance.get("keep_awake_until"):
        out.print(f"  kept awake until {instance['keep_awake_until']}")
    for event in instance.get("events", [])[-10:]:
        out.print(f"  [dim]{event['created_at'][:19]}[/] {event['kind']}: {event['message']}")


@cli.command()
@click.argument("name")
@click.option("--follow", "-f", "follow_", is_flag=True, help="Keep printing new events (Ctrl-C stops).")
@json_option
@click.pass_obj
def events(state: State, name, follow_, as_json):
    """An instance's events (its audit log and progress feed)."""
    instance = state.api.instance(name)
    after = 0
    while True:
        batch = state.api.get(f"/api/v1/instances/{instance['id']}/events", after=after)
        for event in batch:
            after = event["id"]
            if as_json:
                click.echo(json.dumps(event))  # JSON lines: one event per line
            else:
                out.print(f"[dim]{event['created_at'][:19]}[/] [bold]{event['kind']}[/] {event['message']}")
        if not follow_:
            return
        if not batch:
            time.sleep(1)


# ---- lifecycle -----------------------------------------------------------------------------


def _action(state: State, name: str, action: str, *, until: set[str], fails: set[str] = frozenset(),
            wait: bool, body: dict | None = None, errors_fail: bool = False) -> None:
    instance = state.api.post(f"/api/v1/instances/{state.api.instance(name)['id']}/{action}", body)
    if wait and instance["status"] not in until:
        instance = follow(state.api, instance, until=until, fails=fails, title=f"{name}: {action}",
                          errors_fail=errors_fail)
    out.print(f"{name} is {instance['status']}" + (f": {ssh_line(instance)}" if instance["status"] == "running"
                                                  and instance.get("ssh") else ""))


@cli.command()
@click.argument("name")
@wait_option
@click.pass_obj
def pause(state: State, name, wait):
    """Stop the machine (the provider keeps its disk)."""
    _action(state, name, "pause", until={"paused"}, wait=wait, errors_fail=True)


@cli.command()
@click.argument("name")
@wait_option
@click.pass_obj
def resume(state: State, name, wait):
    """Start a paused machine again."""
    _action(state, name, "resume", until={"running"}, wait=wait, errors_fail=True)


@cli.command()
@click.argument("name")
@wait_option
@click.pass_obj
def hibernate(state: State, name, wait):
    """Snapshot (verified), then destroy the machine: nothing is paid but storage."""
    _action(state, name, "hibernate", until={"hibernated"}, fails={"running"}, wait=wait)


@cli.command()
@click.argument("name")
@click.option("--gpu", "gpu_name", help="Wake on another GPU model.")
@click.option("--max-price", type=str)
@wait_option
@click.pass_obj
def wake(state: State, name, gpu_name, max_price, wait):
    """Bring a hibernated instance back: race, restore the latest snapshot, start the agent."""
    body = {k: v for k, v in {"gpu_name": gpu_name, "max_price_per_hour": max_price}.items() if v}
    _action(state, name, "wake", until={"running"}, fails={"hibernated"}, wait=wait, body=body)


@cli.command()
@click.argument("name")
@wait_option
@click.pass_obj
def failover(state: State, name, wait):
    """Move the instance onto its CPU standby (a drill); `failback` returns to a GPU."""
    _action(state, name, "failover", until={"failover"}, fails={"running"}, wait=wait)


@cli.command()
@click.argument("name")
@wait_option
@click.pass_obj
def failback(state: State, name, wait):
    """From the standby back to a GPU machine."""
    _action(state, name, "failback", until={"running"}, fails={"failover"}, wait=wait)


@cli.command()
@click.argument("name")
@wait_option
@click.pass_obj
def down(state: State, name, wait):
    """Destroy the instance and release its machines (its snapshots stay)."""
    instance = state.api.instance(name)
    instance = state.api.request("DELETE", f"/api/v1/instances/{instance['id']}")
    if wait:
        instance = follow(state.api, instance, until={"destroyed"}, title=f"{name}: down")
    out.print(f"{name} is {instance['status']}")


def minutes_of(duration: str) -> int:
    match = re.fullmatch(r"\s*(\d+)\s*([smhd]?)\s*", duration.lower())
    if not match and duration.lower() in ("off", "none"):
        return 0
    if not match:
        raise click.BadParameter("say 90s, 60m, 2h, 1d or 0 (off)", param_hint="DURATION")
    seconds = int(match[1]) * {"s": 1, "": 60, "m": 60, "h": 3600, "d": 86400}[match[2]]
    return math.ceil(seconds / 60)


@cli.command(name="keep-awake")
@click.argument("name")
@click.argument("duration")
@click.pass_obj
def keep_awake(state: State, name, duration):
    """No auto-hibernation for DURATION (60m, 2h, 1d; 0 lifts it)."""
    instance = state.api.post(f"/api/v1/instances/{state.api.instance(name)['id']}/keep-awake",
                              {"minutes": minutes_of(duration)})
    until = instance.get("keep_awake_until")
    out.print(f"{name} kept awake until {until}" if until else f"{name} may hibernate when idle")


# ---- snapshots -----------------------------------------------------------------------------


@cli.command()
@click.argument("name")
@json_option
@click.pass_obj
def snapshots(state: State, name, as_json):
    """An instance's snapshots, newest first."""
    rows = state.api.all_pages("/api/v1/snapshots", instance=state.api.instance(name)["id"])
    if as_json:
        return emit_json(rows)
    table = new_table("id", "status", "reason", "size", "files", "seconds", "created")
    for s in rows:
        table.add_row(str(s["id"]), s["status"], s["reason"], human_bytes(s["size_bytes"] or 0),
                      str(s["file_count"] or ""), str(s["duration_seconds"] or ""), s["created_at"][:19])
    out.print(table)


def _poll(state: State, path: str, done: set[str], what: str) -> dict:
    with err.real.status(what) as spinner:
        while (row := state.api.get(path))["status"] not in done:
            progress = row.get("progress") or {}
            if progress.get("percent") is not None:
                spinner.update(f"{what}: {progress['percent']:.0f}%")
            time.sleep(0.5)
    return row


@cli.command()
@click.argument("name")
@wait_option
@click.option("--fast", is_flag=True, help="Also store the fast path (a hibernation always does).")
@click.pass_obj
def snapshot(state: State, name, wait, fast):
    """Take a snapshot of a running instance now (with --fast, its fast path too: what a wake restores fastest)."""
    row = state.api.post("/api/v1/snapshots", {"instance": state.api.instance(name)["id"], "fast": fast})
    if wait:
        row = _poll(state, f"/api/v1/snapshots/{row['id']}", {"verified", "failed", "deleted"}, f"snapshot {row['id']}")
    if row["status"] == "failed":
        raise CliError(f"snapshot {row['id']} failed: {row['error']}")
    out.print(f"snapshot {row['id']} {row['status']}" + (f", {human_bytes(row['size_bytes'])}" if row["size_bytes"] else ""))


@cli.command()
@click.argument("snapshot_id", type=int, metavar="SNAPSHOT")
@click.argument("name")
@wait_option
@click.pass_obj
def restore(state: State, snapshot_id, name, wait):
    """Restore SNAPSHOT into the running instance NAME."""
    row = state.api.post(f"/api/v1/snapshots/{snapshot_id}/restore", {"instance": state.api.instance(name)["id"]})
    if wait:
        row = _poll(state, f"/api/v1/snapshot-restores/{row['id']}", {"succeeded", "failed"},
                    f"restoring snapshot {snapshot_id}")
    if row["status"] == "failed":
        raise CliError(f"restore {row['id']} failed: {row['error']}")
    out.print(f"restore {row['id']} {row['status']}")


# ---- standby, savings, keys ------------------------------------------------------------------


@cli.group()
def standby():
    """CPU standby machines that mirror your workspace (failover)."""


@standby.command(name="status")
@json_option
@click.pass_obj
def standby_status(state: State, as_json):
    """Each live instance with its standby and the mirror's lag."""
    data = state.api.get("/api/v1/standby/status")
    if as_json:
        return emit_json(data)
    out.print(f"standby {'enabled' if data['enabled'] else 'disabled'}")
    table = new_table("name", "status", "standby", "machine", "last sync", "lag (s)")
    for row in data["instances"]:
        machine = row["standby"] or {}
        table.add_row(row["name"], row["status"], machine.get("status", "-"),
                      f"{machine['ssh_host']}:{machine['ssh_port']}" if machine.get("ssh_host") else "",
                      (machine.get("last_sync_at") or "")[:19],
                      "" if row["lag_seconds"] is None else f"{row['lag_seconds']:.0f}")
    out.print(table)


@standby.command(name="enable")
@click.option("--provider")
@click.option("--zone")
@click.option("--machine-type")
@click.option("--disk", "disk_gb", type=int)
@click.option("--spot/--no-spot", default=None)
@click.option("--sync-interval", "sync_interval_seconds", type=int, help="Seconds between mirror syncs.")
@click.option("--auto-failover/--no-auto-failover", default=None)
@click.pass_obj
def standby_enable(state: State, **settings):
    """Turn standby on (settings given are changed, others kept)."""
    body = {"enabled": True, **{k: v for k, v in settings.items() if v is not None}}
    config = state.api.request("PUT", "/api/v1/standby", json=body)
    out.print(f"standby enabled: {config['provider']} {config['zone']} {config['machine_type']}")


@standby.command(name="disable")
@click.pass_obj
def standby_disable(state: State):
    """Turn standby off (standby machines are destroyed)."""
    state.api.request("PUT", "/api/v1/standby", json={"enabled": False})
    out.print("standby disabled")


@cli.command()
@click.option("--days", type=int, default=30, show_default=True)
@json_option
@click.pass_obj
def savings(state: State, days, as_json):
    """Dollars actually saved by hibernation, with the daily series as a chart."""
    data = state.api.get("/api/v1/metrics/savings/real", days=days)
    if as_json:
        return emit_json(data)
    totals = data["totals"]
    table = new_table("hours hibernated", "gross", "storage", "race", "net", "projected month", title=f"last {days} days")
    table.add_row(totals["hours_hibernated"], f"${totals['gross_savings']}", f"${totals['storage_cost']}",
                  f"${totals['race_cost']}", f"[bold green]${totals['net_savings']}[/]", f"${data['projected_month']}")
    out.print(table)
    daily = [(d["date"], float(d["net_savings"])) for d in data["daily"]]
    if daily:
        from rich.bar import Bar

        top = max([abs(v) for _, v in daily] + [1e-9])
        chart = new_table("day", "net saved", "", box=None, title="daily net savings")
        for day, value in daily:
            chart.add_row(day, f"${value:.2f}", Bar(size=top, begin=0, end=max(value, 0), width=40, color="green"))
        out.print(chart)


@cli.group(name="ssh-key")
def ssh_key():
    """Public keys installed on your machines (so you can SSH in)."""


@ssh_key.command(name="add")
@click.argument("path", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--name", help="A name for it (default: the file's name).")
@click.pass_obj
def ssh_key_add(state: State, path: Path, name):
    """Add the public key in PATH (e.g. ~/.ssh/id_ed25519.pub)."""
    key = state.api.post("/api/v1/ssh-keys", {"name": name or path.stem, "public_key": path.read_text().strip()})
    out.print(f"added {key['name']} ({key['fingerprint']}); machines launched from now on accept it")


@ssh_key.command(name="ls")
@json_option
@click.pass_obj
def ssh_key_ls(state: State, as_json):
    """Your public keys."""
    keys = state.api.all_pages("/api/v1/ssh-keys")
    if as_json:
        return emit_json(keys)
    table = new_table("id", "name", "fingerprint", "added")
    for key in keys:
        table.add_row(str(key["id"]), key["name"], key["fingerprint"], key["created_at"][:19])
    out.print(table)


# ---- SSH -----------------------------------------------------------------------------------


@cli.command(name="ssh-config")
@click.option("--write", is_flag=True, help="Write it into the config dir and Include it from your ssh config.")
@click.option("--ssh-config", "user_config", type=click.Path(path_type=Path), default=Path("~/.ssh/config"),
              show_default=True, help="The ssh config that gets the Include line (with --write).")
@click.pass_obj
def ssh_config(state: State, write, user_config: Path):
    """An OpenSSH config so that `ssh dumont-NAME` (scp, rsync, Remote-SSH) works in any state: it wakes
    a hibernated instance, resumes a paused one, and connects with the host key the control plane pinned."""
    instances = [i for i in state.api.all_pages("/api/v1/instances") if i["status"] not in GONE]
    text = ssh_config_text(state.config, instances)
    if not write:
        return click.echo(text, nl=False)
    from dumont_cli.config import write_private

    write_private(state.config.ssh_config, text)
    user_config = user_config.expanduser()
    added = include_in(user_config, state.config.ssh_config)
    out.print(f"wrote {state.config.ssh_config}" + (f"; included from {user_config}" if added else
                                                     f" (already included from {user_config})"))


@cli.command(name="ssh", context_settings={"ignore_unknown_options": True})
@click.argument("name")
@click.option("-i", "--identity", type=click.Path(path_type=Path), help="Private key file for ssh.")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
@click.pass_obj
def ssh(state: State, name, identity, command):
    """SSH into NAME (waking it if it sleeps); `dumont ssh NAME -- cmd args` runs a command."""
    instance = state.api.instance(name)
    args = ["ssh"]
    for key, value in ssh_options(state.config, instance["name"]).items():
        args += ["-o", f"{key}={value}"]
    if user := ssh_user(instance):
        args += ["-l", user]
    if identity:
        args += ["-i", str(identity), "-o", "IdentitiesOnly=yes"]
    args += [host_alias(instance["name"]), *command]  # as ssh itself: the remote shell reads the command
    sys.stdout.flush()
    os.execvp("ssh", args)  # noqa: S606 (ssh replaces us: its terminal, its exit code)


@cli.command(name="proxy")
@click.argument("name")
@click.pass_obj
def proxy_command(state: State, name):
    """The ssh ProxyCommand of `dumont ssh-config`: wakes NAME if needed, then joins stdin/stdout to its
    SSH port. Progress goes to stderr."""
    proxy(state.api, state.config, name)
