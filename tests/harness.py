"""The end-to-end tests' process helpers (they live in dumont/processes.py: benchmarks use them too)."""

from dumont.processes import (  # noqa: F401 (re-exported for the tests)
    REPO_ROOT,
    celery_beat,
    celery_process,
    celery_worker,
    free_port,
    stop_process_group,
    subprocess_env,
    wait_until,
    web_server,
)
