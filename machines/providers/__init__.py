"""Provider adapters. Importing this package registers every adapter with the registry in base.py."""

from machines.providers import gcp, local, runpod, vastai  # noqa: F401  (registration side effect)
from machines.providers.base import get_provider, provider_names, register_provider  # noqa: F401
