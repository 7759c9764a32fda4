"""Verified means verified by the control plane (issue #13, items 4, 7 and 8): the control plane's own
restic lists a new snapshot (the machine's restic could lie), a hibernation's snapshot is also read back
(`restic check --read-data-subset`), the newest snapshot is the one that captured the workspace last,
a periodic snapshot must be the instance's own, and an empty workspace is a valid snapshot."""

from __future__ import annotations

import json
import shutil
import subprocess
from datetime import timedelta

import pytest
from django.utils import timezone

from dumont.s3server import Credentials
from machines.keys import control_plane_key_path
from machines.ssh import connect
from snapshots import restic, services, storage
from snapshots.models import Snapshot, SnapshotRepository
from snapshots.selectors import snapshot_latest_verified
from tests.factories import make_instance, make_user
from tests.harness import wait_until
from tests.snapshots.helpers import install_restic_wrapper, make_workspace

pytestmark = pytest.mark.django_db

FAKE_ID = "deadbeef" * 8


def _running_instance(owner):
    return make_instance(owner, status="running")


def test_a_machine_whose_restic_lies_about_its_backup_never_gets_a_verified_snapshot(machines):
    owner = make_user()
    machine = machines.start()
    make_workspace(machine.workspace, weights_mb=0, source_files=3)
    summary = json.dumps({"message_type": "summary", "snapshot_id": FAKE_ID[:8], "total_files_processed": 3})
    listing = json.dumps([{"id": FAKE_ID, "short_id": FAKE_ID[:8], "time": "2026-01-01T00:00:00Z",
                           "hostname": "x", "tags": []}])
    # backs up nothing, claims success, and lists the snapshot it never made
    install_restic_wrapper(machine, f'''case " $* " in
  *" backup "*) echo '{summary}'; exit 0;;
  *" snapshots "*) echo '{listing}'; exit 0;;
esac
exec {shutil.which("restic")} "$@"''')

    snapshot = services.snapshot_take(owner=owner, instance_id=_running_instance(owner).pk, target=machine.target)

    assert snapshot.status == Snapshot.Status.FAILED
    assert "not listed in the repository" in snapshot.error
    assert snapshot_latest_verified(instance_id=snapshot.instance_id) is None


def test_a_hibernation_snapshot_is_read_back_and_a_damaged_repository_fails_it(machines, settings):
    owner = make_user()
    instance = _running_instance(owner)
    machine = machines.start()
    make_workspace(machine.workspace, weights_mb=2, source_files=5)
    settings.SNAPSHOT_VERIFY_READ_SUBSET = "100%"

    good = services.snapshot_take(owner=owner, instance_id=instance.pk, target=machine.target, read_back=True)
    assert good.status == Snapshot.Status.VERIFIED
    assert good.stats["read_back_subset"] == "100%" and good.stats["read_back_seconds"] > 0
    assert good.captured_at is not None and good.captured_at <= good.finished_at

    # a pack the backup wrote goes bad in storage: the read-back catches it before any destroy
    prefix = SnapshotRepository.objects.get(owner=owner).prefix
    s3 = storage.client()
    bucket = settings.SNAPSHOT_S3_BUCKET
    packs = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/data/")["Contents"]]
    body = s3.get_object(Bucket=bucket, Key=packs[0])["Body"].read()
    s3.put_object(Bucket=bucket, Key=packs[0], Body=body[:-64] + b"\0" * 64)
    (machine.workspace / "new.txt").write_text("a change, so a new snapshot\n")

    bad = services.snapshot_take(owner=owner, instance_id=instance.pk, target=machine.target, read_back=True)
    assert bad.status == Snapshot.Status.FAILED, bad.error
    assert "check" in bad.error


def test_an_empty_workspace_is_a_verified_empty_snapshot_and_restores_as_nothing(machines):
    owner = make_user()
    instance = _running_instance(owner)
    machine = machines.start()

    snapshot = services.snapshot_take(owner=owner, instance_id=instance.pk, target=machine.target,
                                      reason=Snapshot.Reason.HIBERNATE, read_back=True)

    assert snapshot.status == Snapshot.Status.VERIFIED, snapshot.error
    assert snapshot.stats == {"empty": True} and snapshot.restic_snapshot_id == "" and snapshot.file_count == 0
    other = machines.start()
    restore = services.snapshot_restore(owner=owner, instance_id=instance.pk, target=other.target)
    assert restore.status == restore.Status.SUCCEEDED and restore.snapshot_id == snapshot.pk
    assert list(other.workspace.iterdir()) == []


def _agent_sync(machine, instance_id: int, owner) -> str:
    """Run what the agent runs for its periodic sync; returns the short id it reports."""
    command, env, _ = services.sync_config(owner=owner, instance_id=instance_id, target=machine.target)
    with connect(machine.target, control_plane_key_path()) as session:
        restic.restic_ensure(session, local_binary=services.restic_binary())
        result = session.run(command, env=env, timeout=120)
    assert result.ok, result.stderr
    summary = [json.loads(line) for line in result.stdout.splitlines() if '"summary"' in line][-1]
    return summary["snapshot_id"]


def test_the_latest_snapshot_is_the_one_that_captured_last_not_the_one_recorded_last(machines):
    owner = make_user()
    instance = _running_instance(owner)
    machine = machines.start()
    make_workspace(machine.workspace, weights_mb=0, source_files=3)
    services.repository_ensure(owner=owner)
    periodic_id = _agent_sync(machine, instance.pk, owner)  # the agent syncs...
    (machine.workspace / "later.txt").write_text("written after the periodic sync\n")
    hibernation = services.snapshot_take(owner=owner, instance_id=instance.pk, target=machine.target,
                                         reason=Snapshot.Reason.HIBERNATE)
    # ...and its report is recorded only afterwards
    periodic = services.snapshot_record_periodic(owner=owner, instance_id=instance.pk,
                                                 report={"snapshot_id": periodic_id, "exit_code": 0, "duration": 1})

    assert periodic.status == Snapshot.Status.VERIFIED and periodic.finished_at > hibernation.finished_at
    assert periodic.captured_at < hibernation.captured_at
    assert snapshot_latest_verified(instance_id=instance.pk) == hibernation
    # a release keeps the newest: the hibernation's, never the older sync recorded later
    services.snapshots_keep_latest(owner=owner, instance_id=instance.pk)
    assert Snapshot.objects.get(pk=hibernation.pk).status == Snapshot.Status.VERIFIED
    assert Snapshot.objects.get(pk=periodic.pk).status == Snapshot.Status.DELETED


def test_a_periodic_snapshot_reported_by_one_instance_but_taken_by_another_is_refused(machines):
    owner = make_user()
    mine, other = _running_instance(owner), _running_instance(owner)
    machine = machines.start()
    make_workspace(machine.workspace, weights_mb=0, source_files=3)
    services.repository_ensure(owner=owner)
    others_id = _agent_sync(machine, other.pk, owner)

    recorded = services.snapshot_record_periodic(owner=owner, instance_id=mine.pk,
                                                 report={"snapshot_id": others_id, "exit_code": 0})

    assert recorded.status == Snapshot.Status.FAILED and "not this instance's" in recorded.error
    assert recorded.forgotten_at is not None  # retention never forgets the other instance's snapshot
    assert snapshot_latest_verified(instance_id=mine.pk) is None


def test_retention_never_forgets_the_newest_verified_hibernation_snapshot(settings):
    settings.SNAPSHOT_KEEP_HIBERNATE = 0
    settings.SNAPSHOT_KEEP_PERIODIC = 5
    owner = make_user()
    instance = _running_instance(owner)
    now = timezone.now()
    made = []
    for minutes, reason in [(30, "hibernate"), (20, "hibernate"), (10, "periodic"), (5, "periodic")]:
        made.append(Snapshot.objects.create(owner=owner, instance=instance, reason=reason, status="verified",
                                            restic_snapshot_id=f"{minutes:08x}" * 8,
                                            captured_at=now - timedelta(minutes=minutes), finished_at=now))
    old_hibernation, newest_hibernation, *_ = made
    expired = services._expired(list(Snapshot.objects.filter(instance=instance).order_by(*Snapshot.NEWEST_FIRST)))
    assert expired == [old_hibernation]
    assert newest_hibernation not in expired


def test_the_read_back_is_not_stopped_by_a_lock_a_backup_still_holds(tmp_path):
    """A hibernation resumed after its worker was killed finds the dead run's restic still backing up (or its
    lock left behind): the control plane's read-back must not fail on that lock."""
    binary = services.restic_binary()
    repository = restic.Repository(str(tmp_path / "repo"), "a-password", Credentials("", ""))
    tuning = restic.Tuning(connections=2, command_timeout=120)
    runner = restic.LocalRunner(binary, cache_dir=tmp_path / "cache")
    restic.init(runner, repository, tuning)
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), **repository.env()}
    subprocess.run([binary, "backup", "--stdin", "--stdin-filename", "first"], input=b"data", env=env, check=True,
                   capture_output=True)
    # a backup that keeps its lock while its input stays open
    holder = subprocess.Popen([binary, "backup", "--stdin", "--stdin-filename", "slow"], stdin=subprocess.PIPE,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        wait_until(lambda: any((tmp_path / "repo" / "locks").iterdir()), timeout=30, what="the backup's lock")
        locked = subprocess.run([binary, "check"], env=env, capture_output=True, text=True)
        assert locked.returncode != 0 and "locked" in locked.stderr  # what the read-back used to run into

        assert restic.check_read_data(runner, repository, tuning, subset="100%") >= 0
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
