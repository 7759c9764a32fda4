"""The local GPU marketplace: a vast.ai-compatible service with real machines (sshd on loopback).

Importing this package registers the `local` provider; `python -m machines.providers.local serve`
runs the service (see cli.py).
"""

from machines.providers.local.provider import LocalProvider  # noqa: F401  (registers "local")
