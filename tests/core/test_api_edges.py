"""Inputs the API once answered with a 500 or with an answer its schema does not promise (found by
fuzzing the schema: tests/core/test_api_contract.py)."""

import pytest
import yaml
from rest_framework.test import APIClient

from snapshots.models import Snapshot, SnapshotRestore
from tests.factories import make_instance

pytestmark = pytest.mark.django_db


@pytest.mark.parametrize(("method", "path"), [
    ("delete", "/api/v1/snapshots/abc"),
    ("post", "/api/v1/snapshots/abc/restore"),
    ("get", "/api/v1/snapshots/1.5"),
    ("get", "/api/v1/snapshot-restores/abc"),
    ("post", "/api/v1/instances/abc/wake"),
    ("get", "/api/v1/snapshots/" + "9" * 30),
])
def test_an_id_that_is_not_a_number_is_a_json_404(api, method, path):
    response = getattr(api, method)(path)
    assert response.status_code == 404 and response.json()["error"] == "not_found"


def test_a_failed_instance_whose_name_is_taken_again_can_be_destroyed(user, api):
    failed = make_instance(user, status="failed", name="box")
    make_instance(user, status="running", name="box")
    response = api.delete(f"/api/v1/instances/{failed.pk}")
    assert response.status_code == 202 and response.json()["status"] == "destroying"


@pytest.mark.parametrize("query", ["page_size=null", "page_size=0", "page_size=501", "page_size=-1"])
def test_a_page_size_outside_the_documented_range_is_a_400_naming_it(api, query):
    response = api.get(f"/api/v1/instances?{query}")
    assert response.status_code == 400 and list(response.json()["fields"]) == ["page_size"]


@pytest.mark.parametrize("path", ["/api/v1/snapshots", "/api/v1/snapshot-restores"])
def test_the_instance_filter_answers_alike_for_another_users_id_and_a_missing_one(user, api, other_user, path):
    theirs = make_instance(other_user, status="running")
    mine = make_instance(user, status="running")
    snapshot = Snapshot.objects.create(owner=other_user, instance=theirs, reason="manual", status="verified")
    SnapshotRestore.objects.create(owner=other_user, instance=theirs, snapshot=snapshot)
    missing = api.get(f"{path}?instance=999999999")
    other = api.get(f"{path}?instance={theirs.pk}")
    assert missing.status_code == other.status_code == 200
    assert missing.json() == other.json() and other.json()["results"] == []
    assert api.get(f"{path}?instance={mine.pk}").status_code == 200
    bad = api.get(f"{path}?instance=[1,2]")
    assert bad.status_code == 400 and list(bad.json()["fields"]) == ["instance"]


def test_events_answer_the_plain_list_the_schema_promises(user, api):
    instance = make_instance(user, status="running")
    answer = api.get(f"/api/v1/instances/{instance.pk}/events")
    assert answer.status_code == 200 and isinstance(answer.json(), list)
    schema = yaml.safe_load(APIClient().get("/api/v1/schema").content)
    promised = schema["paths"]["/api/v1/instances/{id}/events"]["get"]["responses"]["200"]
    assert promised["content"]["application/json"]["schema"]["type"] == "array"


def test_the_schema_refuses_negative_prices_and_documents_error_answers():
    schema = yaml.safe_load(APIClient().get("/api/v1/schema").content)
    price = schema["components"]["schemas"]["InstanceCreateRequest"]["properties"]["max_price_per_hour"]
    assert price["minimum"] == 0
    offers = {p["name"]: p for p in schema["paths"]["/api/v1/offers"]["get"]["parameters"]}
    assert offers["max_price"]["schema"]["minimum"] == 0
    delete = schema["paths"]["/api/v1/snapshots/{id}"]["delete"]["responses"]
    assert {"400", "401", "404", "409", "429"} <= set(delete)
    assert delete["404"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Error"}
