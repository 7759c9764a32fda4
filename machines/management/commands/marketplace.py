"""`manage.py marketplace serve|status|set-host|faults|time-scale|gpu-util|crash`: the local GPU marketplace.

A thin wrapper over `python -m machines.providers.local` that fills in this deployment's URL and state
directory (LOCAL_MARKETPLACE_URL, DUMONT_DATA_DIR/marketplace).
"""

import sys
from urllib.parse import urlsplit

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from machines.providers.local import cli


class Command(BaseCommand):
    help = __doc__

    def add_arguments(self, parser):
        parser.add_argument("args", nargs="*", help="e.g. `status`, `serve --time-scale 0.1`, `set-host NAME ...`")

    def run_from_argv(self, argv):
        # pass everything after "marketplace" straight to the marketplace's own argparse
        self.handle(*argv[2:])

    def handle(self, *args, **options):
        argv = list(args) or ["status"]
        command = argv[0]
        state_dir = str(settings.DUMONT_DATA_DIR / "marketplace")
        if "--state-dir" not in argv and command not in ("-h", "--help"):
            argv += ["--state-dir", state_dir]
        if command == "serve" and "--port" not in argv:
            argv += ["--port", str(urlsplit(settings.LOCAL_MARKETPLACE_URL).port or cli.DEFAULT_PORT)]
        elif command not in ("serve", "-h", "--help") and "--url" not in argv:
            argv += ["--url", settings.LOCAL_MARKETPLACE_URL]
        code = cli.main(argv)
        if code:
            raise CommandError(f"marketplace {command} failed", returncode=code)
        sys.stdout.flush()
