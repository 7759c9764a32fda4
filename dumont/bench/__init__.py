"""Benchmarks and the plumbing that tests and benchmarks share: not part of the product.

- `instances.py`, `agent.py`, `snapshots.py`: the benchmarks of each app (`python manage.py benchmark <name>`;
  each module exposes `BENCHMARKS = {"name": Benchmark subclass}`).
- `loadgen.py`: the open-loop heartbeat load generator (the `heartbeats` benchmark).
- `marketplace.py`: a local marketplace in a subprocess, for tests and benchmarks (`running_marketplace`).
"""
