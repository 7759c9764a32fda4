import pytest

from instances.models import Instance
from instances.states import Status, transition
from machines.models import ProviderAccount
from tests.factories import make_instance

pytestmark = pytest.mark.django_db


def test_list_filters_by_status_and_paginates(user, api):
    running = [make_instance(user, status=Status.RUNNING) for _ in range(3)]
    make_instance(user, status=Status.HIBERNATED)
    response = api.get("/api/v1/instances?status=running&page_size=2")
    body = response.json()
    assert response.status_code == 200
    assert body["count"] == 3 and len(body["results"]) == 2 and body["next"]
    assert {item["status"] for item in body["results"]} == {"running"}
    page2 = api.get(body["next"]).json()
    assert {i["id"] for i in body["results"] + page2["results"]} == {i.pk for i in running}


def test_unknown_status_filter_is_a_400_naming_the_field(api):
    response = api.get("/api/v1/instances?status=sleeping")
    assert response.status_code == 400
    assert "status" in response.json()["fields"]


def test_detail_carries_the_events_in_order_and_the_machine(user, api):
    instance = make_instance(user, status=Status.LAUNCHING)
    transition(instance.pk, Status.RUNNING, message="won the race", provider_instance_id="77", ssh_host="127.0.0.1",
               ssh_port=2222, host_id="h1")
    body = api.get(f"/api/v1/instances/{instance.pk}").json()
    assert body["status"] == "running"
    assert body["machine"]["provider_instance_id"] == "77" and body["machine"]["ssh_port"] == 2222
    assert [e["message"] for e in body["events"]] == ["won the race"]


def test_instance_without_machine_shows_null_machine(user, api):
    instance = make_instance(user)
    assert api.get(f"/api/v1/instances/{instance.pk}").json()["machine"] is None


def test_standby_validation_names_the_field(api):
    response = api.put("/api/v1/standby", {"sync_interval_seconds": 5}, format="json")
    assert response.status_code == 400
    assert "sync_interval_seconds" in response.json()["fields"]
    assert api.get("/api/v1/standby").json()["sync_interval_seconds"] == 300


def test_create_validates_and_names_the_field(api):
    response = api.post("/api/v1/instances", {"name": "bad name;rm", "num_gpus": 0, "disk_gb": -1}, format="json")
    assert response.status_code == 400
    assert set(response.json()["fields"]) == {"name", "num_gpus", "disk_gb"}
    assert not Instance.objects.exists()


def test_create_is_202_pending_with_an_event(api, user, settings):
    settings.LOCAL_MARKETPLACE_ENABLED = True
    response = api.post("/api/v1/instances", {"name": "train-1", "gpu_name": "RTX 4090", "max_price_per_hour": "0.5"},
                        format="json")
    assert response.status_code == 202, response.json()
    body = response.json()
    assert body["status"] == "pending" and body["provider"] == "local" and body["machine"] is None
    instance = Instance.objects.get(pk=body["id"])
    assert instance.owner == user and [e.message for e in instance.events.all()] == ["instance created"]
    duplicate = api.post("/api/v1/instances", {"name": "train-1"}, format="json")
    assert duplicate.status_code == 409


def test_create_needs_an_own_account_of_the_right_provider(api, other_user):
    foreign = ProviderAccount.objects.create(owner=other_user, provider="vastai", name="x", api_key="k" * 20)
    missing = api.post("/api/v1/instances", {"name": "a", "provider": "vastai"}, format="json")
    assert missing.status_code == 400 and "provider_account" in missing.json()["fields"]
    stolen = api.post("/api/v1/instances", {"name": "a", "provider": "vastai", "provider_account": foreign.pk},
                      format="json")
    assert stolen.status_code == 404
    unknown = api.post("/api/v1/instances", {"name": "a", "provider": "aws"}, format="json")
    assert unknown.status_code == 400 and unknown.json()["error"] == "invalid_provider"
    assert not Instance.objects.exists()


def test_disabled_local_marketplace_refuses_launches(api, settings):
    settings.LOCAL_MARKETPLACE_ENABLED = False
    response = api.post("/api/v1/instances", {"name": "a"}, format="json")
    assert response.status_code == 400 and response.json()["error"] == "provider_disabled"


@pytest.mark.parametrize(
    ("status", "action", "method"),
    [(Status.PENDING, "pause", "post"), (Status.PAUSED, "pause", "post"), (Status.RUNNING, "resume", "post"),
     (Status.HIBERNATED, "resume", "post"), (Status.DESTROYED, "", "delete"), (Status.DESTROYING, "", "delete")],
)
def test_actions_that_do_not_fit_the_state_are_409_naming_it(user, api, status, action, method):
    instance = make_instance(user, status=status)
    response = getattr(api, method)(f"/api/v1/instances/{instance.pk}{'/' + action if action else ''}")
    assert response.status_code == 409
    assert response.json()["status"] == status
    assert Instance.objects.get(pk=instance.pk).status == status


def test_destroy_marks_destroying_at_once(user, api):
    instance = make_instance(user, status=Status.FAILED)
    response = api.delete(f"/api/v1/instances/{instance.pk}")
    assert response.status_code == 202 and response.json()["status"] == "destroying"


@pytest.mark.parametrize(("method", "suffix"), [("post", "/pause"), ("post", "/resume"), ("delete", ""),
                                                  ("get", "/events")])
def test_other_users_cannot_act_on_an_instance(user, other_api, method, suffix):
    instance = make_instance(user, status=Status.RUNNING)
    response = getattr(other_api, method)(f"/api/v1/instances/{instance.pk}{suffix}")
    assert response.status_code == 404
    assert Instance.objects.get(pk=instance.pk).status == Status.RUNNING


def test_list_finds_an_instance_by_its_exact_name_only_among_the_owners(user, other_user, api):
    destroyed = make_instance(user, name="train", status=Status.DESTROYED)
    live = make_instance(user, name="train", status=Status.HIBERNATED)  # a destroyed one's name is free again
    make_instance(user, name="train-2", status=Status.RUNNING)
    make_instance(other_user, name="train", status=Status.RUNNING)
    body = api.get("/api/v1/instances?name=train").json()
    assert [i["id"] for i in body["results"]] == [live.pk, destroyed.pk]
    assert body["results"][0]["ssh_user"] == "root" and body["results"][0]["ssh"] is None  # kept while asleep


def test_instances_carry_their_latest_event_id_to_follow_from(user, api):
    instance = make_instance(user, status=Status.LAUNCHING)
    assert api.get("/api/v1/instances").json()["results"][0]["last_event_id"] is None
    transition(instance.pk, Status.RUNNING, message="won the race")
    latest = instance.events.latest("id").pk
    assert api.get("/api/v1/instances").json()["results"][0]["last_event_id"] == latest
    assert api.get(f"/api/v1/instances/{instance.pk}").json()["last_event_id"] == latest
    paused = api.post(f"/api/v1/instances/{instance.pk}/hibernate").json()  # a service's own instance
    assert paused["last_event_id"] == instance.events.latest("id").pk > latest
    assert api.get(f"/api/v1/instances/{instance.pk}/events?after={latest}").json()[0]["message"] == \
        "hibernation requested"
