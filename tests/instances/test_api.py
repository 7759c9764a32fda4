import pytest

from instances.states import Status, transition
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
