"""The snapshot routes: 202s with a queued task, 404 for anyone else's objects, 409 naming a status.

Taking and restoring a snapshot are instance routes (`POST /instances/{id}/snapshots`, `POST
/instances/{id}/restore`); the older `POST /snapshots` and `POST /snapshots/{id}/restore` stay as aliases:
both are tested (`route`)."""

from __future__ import annotations

import pytest

from instances.models import InstanceEvent
from snapshots import tasks
from snapshots.models import Snapshot, SnapshotRepository, SnapshotRestore
from tests.factories import make_instance
from tests.snapshots.helpers import make_workspace, manifest

pytestmark = pytest.mark.django_db


def _instance_on(owner, machine, *, status: str = "running"):
    return make_instance(owner, status=status, ssh_host="127.0.0.1", ssh_port=machine.handle.port,
                         ssh_host_key=machine.handle.host_public_key)


def _finished_snapshot(owner, instance, *, status: str = Snapshot.Status.VERIFIED) -> Snapshot:
    """A row as a finished task leaves it (for routes that refuse before any machine is touched)."""
    return Snapshot.objects.create(owner=owner, instance=instance, status=status, restic_snapshot_id="ab" * 32,
                                   ssh_host="127.0.0.1", ssh_port=22, ssh_host_key="ssh-ed25519 AAAA")


ROUTES = pytest.mark.parametrize("route", ["instance", "alias"])


def _take(api, instance_id: int, route: str):
    if route == "instance":
        return api.post(f"/api/v1/instances/{instance_id}/snapshots", format="json")
    return api.post("/api/v1/snapshots", {"instance": instance_id}, format="json")


def _restore(api, snapshot_id: int, instance_id: int, route: str):
    if route == "instance":
        return api.post(f"/api/v1/instances/{instance_id}/restore", {"snapshot": snapshot_id}, format="json")
    return api.post(f"/api/v1/snapshots/{snapshot_id}/restore", {"instance": instance_id}, format="json")


@pytest.fixture(scope="module")
def source(machines):
    machine = machines.start()
    make_workspace(machine.workspace, weights_mb=1, source_files=10)
    return machine


@ROUTES
def test_snapshot_then_restore_through_the_api(user, api, source, machines, django_capture_on_commit_callbacks, route):
    instance = _instance_on(user, source)
    with django_capture_on_commit_callbacks() as queued:
        response = _take(api, instance.pk, route)
    assert response.status_code == 202, response.json()
    body = response.json()
    assert body["status"] == "pending" and body["instance"] == instance.pk and body["verified"] is False
    assert len(queued) == 1  # the task is sent once the row is committed

    tasks.take_snapshot(body["id"])  # what a worker runs (tests/snapshots/test_tasks.py runs a real one)

    detail = api.get(f"/api/v1/snapshots/{body['id']}").json()
    assert detail["status"] == "verified" and detail["verified"] is True, detail["error"]
    assert detail["progress"]["percent"] == 100 and detail["file_count"] > 10 and detail["duration_seconds"] > 0
    messages = list(InstanceEvent.objects.filter(instance=instance).values_list("message", flat=True))
    assert messages[0] == f"snapshot {body['id']} requested"
    assert messages[-1].startswith(f"snapshot {body['id']} verified")
    password = SnapshotRepository.objects.get(owner=user).password
    listing = api.get(f"/api/v1/snapshots?instance={instance.pk}")
    assert [s["id"] for s in listing.json()["results"]] == [body["id"]]
    assert password not in listing.content.decode() and password not in str(InstanceEvent.objects.values("data"))

    finished = Snapshot.objects.get(pk=body["id"]).finished_at
    tasks.take_snapshot(body["id"])  # delivered twice: nothing happens twice
    assert Snapshot.objects.get(pk=body["id"]).finished_at == finished

    target_machine = machines.start()
    target = _instance_on(user, target_machine)
    with django_capture_on_commit_callbacks() as queued:
        response = _restore(api, body["id"], target.pk, route)
    assert response.status_code == 202, response.json()
    restore = response.json()
    assert restore["status"] == "pending" and restore["snapshot"] == body["id"] and len(queued) == 1

    tasks.restore_snapshot(restore["id"])

    done = api.get(f"/api/v1/snapshot-restores/{restore['id']}").json()
    assert done["status"] == SnapshotRestore.Status.SUCCEEDED, done["error"]
    assert manifest(target_machine.workspace) == manifest(source.workspace)
    assert InstanceEvent.objects.filter(instance=target, kind="restore").count() == 3  # requested, started, done
    started = InstanceEvent.objects.get(instance=target, kind="restore", message__endswith="started")
    assert started.data["size_bytes"] == Snapshot.objects.get(pk=body["id"]).size_bytes > 0  # what the CLI shows


@ROUTES
def test_anyone_elses_instance_or_snapshot_is_a_404(user, api, other_user, other_api, source, route):
    mine = _instance_on(user, source)
    snapshot = _finished_snapshot(user, mine)
    theirs = _instance_on(other_user, source)

    assert _take(other_api, mine.pk, route).status_code == 404
    assert other_api.get(f"/api/v1/snapshots/{snapshot.pk}").status_code == 404
    assert other_api.delete(f"/api/v1/snapshots/{snapshot.pk}").status_code == 404
    restore = _restore(other_api, snapshot.pk, theirs.pk, route)
    assert restore.status_code == 404
    onto_theirs = _restore(api, snapshot.pk, theirs.pk, route)
    assert onto_theirs.status_code == 404 and onto_theirs.json()["error"] == "not_found"
    assert other_api.get("/api/v1/snapshots").json()["count"] == 0
    assert Snapshot.objects.get(pk=snapshot.pk).status == Snapshot.Status.VERIFIED
    assert not SnapshotRestore.objects.exists()


@ROUTES
def test_an_instance_that_is_not_running_is_a_409_naming_its_status(user, api, source, route):
    hibernated = _instance_on(user, source, status="hibernated")
    snapshot = _finished_snapshot(user, _instance_on(user, source))

    response = _take(api, hibernated.pk, route)
    assert response.status_code == 409
    assert response.json()["status"] == "hibernated" and "hibernated" in response.json()["detail"]
    response = _restore(api, snapshot.pk, hibernated.pk, route)
    assert response.status_code == 409 and response.json()["status"] == "hibernated"
    assert not Snapshot.objects.filter(instance=hibernated).exists()


def test_one_snapshot_at_a_time_per_instance_and_only_finished_verified_ones_are_restored(user, api, source):
    instance = _instance_on(user, source)
    first = api.post("/api/v1/snapshots", {"instance": instance.pk}, format="json")
    assert first.status_code == 202
    second = api.post("/api/v1/snapshots", {"instance": instance.pk}, format="json")
    assert second.status_code == 409 and "already in progress" in second.json()["detail"]

    pending = api.delete(f"/api/v1/snapshots/{first.json()['id']}")
    assert pending.status_code == 409 and pending.json()["status"] == "pending"
    failed = _finished_snapshot(user, instance, status=Snapshot.Status.FAILED)
    response = api.post(f"/api/v1/snapshots/{failed.pk}/restore", {"instance": instance.pk}, format="json")
    assert response.status_code == 409 and response.json()["status"] == "failed"


def test_delete_hides_a_finished_snapshot_at_once(user, api, source, django_capture_on_commit_callbacks):
    snapshot = _finished_snapshot(user, _instance_on(user, source))
    with django_capture_on_commit_callbacks() as queued:
        assert api.delete(f"/api/v1/snapshots/{snapshot.pk}").status_code == 204
    assert len(queued) == 1  # retention forgets it in restic
    assert api.get(f"/api/v1/snapshots/{snapshot.pk}").status_code == 404
    assert api.get("/api/v1/snapshots").json()["count"] == 0
    assert api.delete(f"/api/v1/snapshots/{snapshot.pk}").status_code == 404
    assert Snapshot.objects.get(pk=snapshot.pk).status == Snapshot.Status.DELETED


def test_bad_input_is_a_400_naming_the_field_and_no_token_is_a_401(user, api, client, source):
    response = api.post("/api/v1/snapshots", {"instance": "x"}, format="json")
    assert response.status_code == 400 and "instance" in response.json()["fields"]
    instance = _instance_on(user, source)
    response = api.post(f"/api/v1/instances/{instance.pk}/restore", {"snapshot": "x"}, format="json")
    assert response.status_code == 400 and "snapshot" in response.json()["fields"]
    assert client.get("/api/v1/snapshots").status_code == 401
    assert client.post(f"/api/v1/instances/{instance.pk}/snapshots").status_code == 401
