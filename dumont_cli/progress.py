"""Following an instance's events until it reaches a status, with a live view on stderr: the launch race
(rounds, machines booting, the winner, losers destroyed), the restore (bytes), the agent.

On a terminal the view is a Rich `Live` table with a spinner; elsewhere (a pipe, an editor's Remote-SSH
log) the same events are plain lines."""

from __future__ import annotations

import time
from collections.abc import Callable

from rich.console import Console, Group
from rich.live import Live
from rich.spinner import Spinner
from rich.table import Table

from dumont_cli.client import Api, CliError

POLL_SECONDS = 0.5
SETTLE_SECONDS = 30
MACHINE_STATES = {"won": "[green]won[/]", "lost": "[dim]destroyed (lost)[/]"}


def human_bytes(count: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(count) < 1000 or unit == "TB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    return f"{count:.1f} TB"  # pragma: no cover


class ProgressView:
    """What the events say so far, as one renderable."""

    def __init__(self, title: str):
        self.title = title
        self.phase = "waiting for the control plane"
        self.machines: dict[int, dict] = {}

    def update(self, event: dict) -> str | None:
        """Take one event in; returns the line worth keeping on screen, if any."""
        kind, data, message = event["kind"], event.get("data") or {}, event["message"]
        if kind in ("race", "wake") and "attempts" in data:
            for attempt in data["attempts"]:
                self.machines[attempt["attempt"]] = {"round": data.get("round"), "host": attempt["host"],
                                                     "price": attempt.get("price"), "state": "booting"}
            self.phase = f"round {data.get('round')}: {len(data['attempts'])} machines booting"
        elif kind == "attempt" and data.get("attempt") in self.machines:
            self.machines[data["attempt"]]["state"] = f"[red]{data.get('outcome')}[/] ({data.get('stage') or '-'})"
        elif "seconds_to_ready" in data and data.get("attempt") in self.machines:
            self.machines[data["attempt"]]["state"] = MACHINE_STATES["won"]
            self.phase = f"{data.get('host')} won after {data['seconds_to_ready']:.1f}s"
        elif kind == "race" and "losers" in data:
            for loser in data["losers"]:
                if loser in self.machines:
                    self.machines[loser]["state"] = MACHINE_STATES["lost"]
        elif kind == "restore" and "duration_seconds" in data:
            size = data.get("size_bytes") or 0
            self.phase = "starting the agent"
            message = (f"restored {human_bytes(size)} in {data['duration_seconds']:.1f}s"
                       + (f" ({data['mb_per_second']} MB/s)" if data.get("mb_per_second") else ""))
        elif kind == "restore" and "size_bytes" in data:
            self.phase = f"restoring {human_bytes(data['size_bytes'])} from the snapshot"
            message = f"{message}: {human_bytes(data['size_bytes'])} to restore"
        elif kind == "snapshot" and "percent" in data:
            done = data.get("bytes_done") or 0
            self.phase = f"snapshot: {data['percent']:.0f}%" + (f", {human_bytes(done)}" if done else "")
            return None  # progress, not news
        elif kind == "status":
            self.phase = f"{data.get('to')}"
        return f"[dim]{event['created_at'][11:19]}[/] [bold]{kind}[/] {message}"

    def __rich__(self):
        parts = []
        if self.machines:
            table = Table(title=self.title, title_justify="left", expand=False)
            for column in ("round", "host", "$/h", "machine"):
                table.add_column(column)
            for machine in self.machines.values():
                table.add_row(str(machine["round"]), machine["host"], str(machine["price"] or ""), machine["state"])
            parts.append(table)
        parts.append(Spinner("dots", text=self.phase))
        return Group(*parts)


class Follower:
    """Polls `events?after=` (one request per poll) and keeps the instance's status from its status events."""

    def __init__(self, api: Api, instance: dict):
        self.api = api
        self.instance_id = instance["id"]
        self.status = instance["status"]
        self.reason = instance.get("status_reason") or ""
        self.after = instance.get("last_event_id") or 0
        self.events: list[dict] = []

    def poll(self) -> list[dict]:
        events = self.api.get(f"/api/v1/instances/{self.instance_id}/events", after=self.after)
        for event in events:
            self.after = event["id"]
            if event["kind"] == "status":
                self.status = (event.get("data") or {}).get("to", self.status)
                self.reason = event["message"]
        self.events.extend(events)
        return events

    def wait(self, *, until: set[str], fails: set[str], console: Console, title: str,
             errors_fail: bool = False, settle: Callable[[dict], bool] | None = None) -> list[dict]:
        """Show the events until the status is in `until` (returns the events), or until a transition into
        `fails` (or, with `errors_fail`, an error event): CliError with the control plane's reason.
        `settle`: once there, also wait (a little) for the event it accepts, e.g. the race's losers destroyed."""
        view = ProgressView(title)
        live = Live(view, console=console, refresh_per_second=8, transient=True) if console.is_terminal else None
        settled = settle is None
        settle_deadline = None
        try:
            if live:
                live.start()
            while True:
                for event in self.poll():
                    line = view.update(event)
                    if line:
                        console.print(line, highlight=False)
                    moved_to = (event.get("data") or {}).get("to") if event["kind"] == "status" else None
                    if moved_to in fails or (errors_fail and event["kind"] == "error"):
                        raise CliError(f"instance is {self.status}: {event['message']}")
                    settled = settled or settle(event)
                if self.status in until:
                    settle_deadline = settle_deadline or time.monotonic() + SETTLE_SECONDS
                    if settled or time.monotonic() > settle_deadline:
                        return self.events
                if live:
                    live.refresh()
                time.sleep(POLL_SECONDS)
        finally:
            if live:
                live.stop()
            if view.machines and live:
                console.print(view.__rich__().renderables[0])  # the race table stays on screen
