"""`python manage.py benchmark <name> [options]`: measure, print figures and ratios. Never a test.

The benchmarks live outside the product apps, in `dumont/bench/`: each module there that has benchmarks
exposes `BENCHMARKS = {"name": Benchmark subclass}`; a benchmark declares its own options (`add_arguments`)
and prints its figures (`run`).
"""

import importlib
import pkgutil

from django.core.management.base import BaseCommand, CommandError

from dumont import bench


def discover() -> dict:
    found = {}
    for module_info in pkgutil.iter_modules(bench.__path__):
        module = importlib.import_module(f"{bench.__name__}.{module_info.name}")
        found.update(getattr(module, "BENCHMARKS", {}))
    return found


class Benchmark:
    help = ""

    def __init__(self, command: BaseCommand):
        self.command = command
        self.stdout = command.stdout

    def add_arguments(self, parser) -> None:
        pass

    def run(self, **options) -> None:
        raise NotImplementedError


class Command(BaseCommand):
    help = "Run a benchmark and print its figures: " + ", ".join(sorted(discover()))

    def add_arguments(self, parser):
        subparsers = parser.add_subparsers(dest="benchmark", required=True)
        for name, benchmark_class in sorted(discover().items()):
            subparser = subparsers.add_parser(name, help=benchmark_class.help)
            benchmark_class(self).add_arguments(subparser)

    def handle(self, *args, benchmark=None, **options):
        benchmarks = discover()
        if benchmark not in benchmarks:
            raise CommandError(f"unknown benchmark {benchmark!r}; known: {', '.join(sorted(benchmarks))}")
        benchmarks[benchmark](self).run(**options)
