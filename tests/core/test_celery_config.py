import pytest
from django.conf import settings

from dumont.celery import app

# what a worker does at start: import every app's tasks.py
app.loader.import_default_modules()


def test_celery_is_configured_for_safe_long_tasks():
    conf = app.conf
    assert conf.task_acks_late is True
    assert conf.task_reject_on_worker_lost is True
    assert conf.worker_prefetch_multiplier == 1
    assert conf.task_serializer == "json" and conf.accept_content == ["json"] and conf.result_serializer == "json"
    assert conf.task_always_eager is False
    assert conf.broker_url == settings.REDIS_URL


def test_visibility_timeout_exceeds_every_time_limit_countdown_and_schedule():
    """Redis re-delivers an unacked task after the visibility timeout: anything longer runs twice."""
    visibility = app.conf.broker_transport_options["visibility_timeout"]
    limits = [app.conf.task_time_limit, app.conf.task_soft_time_limit, settings.CELERY_MAX_RETRY_DELAY]
    for name, task in app.tasks.items():
        if name.startswith("celery."):
            continue
        limits += [getattr(task, "time_limit", None) or 0, getattr(task, "soft_time_limit", None) or 0,
                   getattr(task, "default_retry_delay", 0) or 0]
    for entry in app.conf.beat_schedule.values():
        limits.append(entry.get("options", {}).get("expires", 0))
    assert app.conf.task_soft_time_limit < app.conf.task_time_limit
    assert max(limits) < visibility


def test_each_test_worker_has_its_own_redis_database_and_prefix():
    import os

    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if worker:
        assert settings.REDIS_URL.endswith(f"/{1 + int(worker[2:]) % 15}")
        assert settings.REDIS_KEY_PREFIX.endswith(worker)
        assert app.conf.broker_transport_options["global_keyprefix"] == f"{settings.REDIS_KEY_PREFIX}:"


def test_beat_schedule_is_defined_in_code_with_expiry():
    entry = app.conf.beat_schedule["prune-heartbeats"]
    assert entry["task"] == "agent.tasks.prune_heartbeats"
    assert entry["options"]["expires"] == settings.HEARTBEAT_PRUNE_INTERVAL_SECONDS
    assert entry["task"] in app.tasks


def test_each_xdist_worker_has_its_own_redis_database_and_key_prefix_and_so_do_its_subprocesses():
    """tests/conftest.py splits Redis per xdist worker; the e2e stack's worker/beat/web get the same split."""
    import os

    from dumont.celery import app
    from dumont.processes import subprocess_env

    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    if not worker.startswith("gw"):
        pytest.skip("runs under pytest-xdist (make test)")
    database = f"/{1 + int(worker[2:]) % 15}"
    assert settings.REDIS_URL.endswith(database) and settings.REDIS_KEY_PREFIX.endswith(f"-{worker}")
    assert app.conf.broker_url == settings.REDIS_URL == app.conf.result_backend
    assert app.conf.broker_transport_options["global_keyprefix"] == f"{settings.REDIS_KEY_PREFIX}:"
    env = subprocess_env()
    assert env["REDIS_URL"] == settings.REDIS_URL and env["REDIS_KEY_PREFIX"] == settings.REDIS_KEY_PREFIX
    assert "PYTEST_XDIST_WORKER" not in env  # the subprocess takes them as they are, not split again


def test_every_task_has_a_queue_and_every_queue_its_workers():
    import yaml

    from dumont import devrun
    from dumont.celery import DEFAULT_QUEUE, QUEUE_TASKS, QUEUES, app

    app.loader.import_default_modules()
    ours = {name for name in app.tasks if name.split(".")[0] in {"agent", "instances", "snapshots", "machines"}}
    routed = {task for tasks in QUEUE_TASKS.values() for task in tasks}
    assert routed <= ours  # no route names a task that does not exist
    assert {"agent.tasks.flush_heartbeats", "instances.tasks.lost_machine_sweep",
            "instances.tasks.reconcile"} <= set(QUEUE_TASKS["sweeps"])
    assert "snapshots.tasks.take_snapshot" not in QUEUE_TASKS["sweeps"]
    assert set(devrun.WORKERS) == set(QUEUES)
    compose = yaml.safe_load((devrun.REPO / "docker-compose.yml").read_text())["services"]
    consumed = {arg.split("=", 1)[1] for service in compose.values() for arg in service.get("command", [])
                if isinstance(arg, str) and arg.startswith("--queues=")}
    assert consumed == set(QUEUES) and DEFAULT_QUEUE in consumed
