"""`python -m machines.providers.local serve|status|set-host|faults|gpu-util|crash` (also wrapped by
`manage.py marketplace`)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from urllib.parse import urlsplit

from machines.providers.local.control import MarketplaceControl, MarketplaceError

DEFAULT_STATE_DIR = Path(".dumont/marketplace")
DEFAULT_PORT = 8790


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "serve":
        from machines.providers.local.server import serve

        logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        serve(
            host=args.host,
            port=args.port,
            state_dir=Path(args.state_dir),
            catalogue=Path(args.catalogue) if args.catalogue else None,
            time_scale=args.time_scale,
            seed=args.seed,
        )
        return 0
    try:
        control = MarketplaceControl(_url(args))
        if args.command == "status":
            _print_status(control.state())
        elif args.command == "set-host":
            changes = {
                "boot_median": args.boot_median,
                "boot_sigma": args.boot_sigma,
                "p_stuck_loading": args.p_stuck_loading,
                "p_exited": args.p_exited,
                "p_ssh_never_answers": args.p_ssh_never_answers,
                "price_per_hour": args.price,
                "capacity": args.capacity,
                "reliability": args.reliability,
            }
            print(
                json.dumps(control.set_host(args.name, **{k: v for k, v in changes.items() if v is not None}))
            )
        elif args.command == "faults":
            changes = {
                "rate_429": args.rate_429,
                "rate_500": args.rate_500,
                "rate_slow": args.rate_slow,
                "slow_seconds": args.slow_seconds,
                "min_gap_s": args.min_gap,
            }
            print(json.dumps(control.set_faults(**{k: v for k, v in changes.items() if v is not None})))
        elif args.command == "time-scale":
            control.set_time_scale(args.value)
        elif args.command == "gpu-util":
            control.set_gpu_util(args.instance_id, args.value)
        elif args.command == "crash":
            control.crash(args.instance_id)
    except (MarketplaceError, OSError) as exc:
        print(f"marketplace: {exc}", file=sys.stderr)
        return 1
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m machines.providers.local", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the marketplace service")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument(
        "--port", type=int, default=_configured_port(),
        help="0 = any free port (see state-dir/server.json); default: LOCAL_MARKETPLACE_URL's port, else 8790",
    )
    serve.add_argument("--state-dir", default=str(DEFAULT_STATE_DIR))
    serve.add_argument("--catalogue", help="hosts YAML (default: the shipped catalogue.yaml)")
    serve.add_argument("--time-scale", type=float, help="multiplier on every boot time (e.g. 0.01)")
    serve.add_argument("--seed", type=int, help="seed for boot times and failures")
    serve.add_argument("--log-level", default="INFO")

    def client(name: str, help: str) -> argparse.ArgumentParser:  # noqa: A002
        p = sub.add_parser(name, help=help)
        p.add_argument("--url", help="marketplace URL (default: $DUMONT_MARKETPLACE_URL, $LOCAL_MARKETPLACE_URL "
                                     "or the state dir's)")
        p.add_argument("--state-dir", default=str(DEFAULT_STATE_DIR))
        return p

    client("status", "print hosts and machines")
    host = client("set-host", "change a host's behaviour (applies to new rentals)")
    host.add_argument("name")
    host.add_argument("--boot-median", type=float, help="seconds, before time_scale")
    host.add_argument("--boot-sigma", type=float, help="lognormal sigma; 0 = fixed boot time")
    host.add_argument("--p-stuck-loading", type=float)
    host.add_argument("--p-exited", type=float)
    host.add_argument("--p-ssh-never-answers", type=float)
    host.add_argument("--price", type=float, help="$/h")
    host.add_argument("--capacity", type=int)
    host.add_argument("--reliability", type=float)
    faults = client("faults", "inject API faults")
    faults.add_argument("--rate-429", type=float)
    faults.add_argument("--rate-500", type=float)
    faults.add_argument("--rate-slow", type=float)
    faults.add_argument("--slow-seconds", type=float)
    faults.add_argument("--min-gap", type=float, help="seconds between two calls to one endpoint, else 429")
    scale = client("time-scale", "set the boot-time multiplier")
    scale.add_argument("value", type=float)
    util = client("gpu-util", "set a machine's GPU utilization (0..100)")
    util.add_argument("instance_id", type=int)
    util.add_argument("value", type=float)
    crash = client("crash", "make a running machine vanish")
    crash.add_argument("instance_id", type=int)
    return parser


def _url(args: argparse.Namespace) -> str:
    if args.url:
        return args.url
    for name in ("DUMONT_MARKETPLACE_URL", "LOCAL_MARKETPLACE_URL"):
        if os.environ.get(name):
            return os.environ[name]
    info = Path(args.state_dir) / "server.json"
    if info.exists():
        return json.loads(info.read_text())["url"]
    return f"http://127.0.0.1:{DEFAULT_PORT}"


def _configured_port() -> int:
    """Where the control plane expects the marketplace (LOCAL_MARKETPLACE_URL), so that both agree."""
    url = os.environ.get("LOCAL_MARKETPLACE_URL")
    return (urlsplit(url).port if url else None) or DEFAULT_PORT


def _print_status(state: dict) -> None:
    print(f"time_scale {state['time_scale']}   spend ${state['billing']['total_usd']:.4f}")
    print(
        f"{'HOST':<22}{'MACHINE':>8}  {'GPU':<14}{'N':>2}{'$/H':>7}{'BOOT':>7}{'SIGMA':>6}"
        f"{'STUCK':>6}{'EXIT':>6}{'DEAD':>6}{'FREE':>5}"
    )
    for h in state["hosts"]:
        print(
            f"{h['name']:<22}{h['machine_id']:>8}  {h['gpu_name']:<14}{h['num_gpus']:>2}{h['price_per_hour']:>7.3f}"
            f"{h['boot_median']:>7.1f}{h['boot_sigma']:>6.2f}{h['p_stuck_loading']:>6.2f}{h['p_exited']:>6.2f}"
            f"{h['p_ssh_never_answers']:>6.2f}{h['free_slots']:>5}"
        )
    live = [i for i in state["instances"] if i["status"] != "destroyed"]
    print(f"\n{len(live)} machines ({len(state['instances']) - len(live)} destroyed)")
    for i in live:
        print(
            f"  {i['id']:>9} {i['status']:<10} {i['host']:<22} port {i['ssh_port'] or '-':<6}"
            f" ${i['billing']['total_usd']:.5f}  {i['label'] or ''}"
        )
