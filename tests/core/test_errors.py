import pytest
from django.test import Client

pytestmark = pytest.mark.django_db


def test_unknown_api_route_is_a_json_404(api):
    response = api.get("/api/v1/no-such-thing")
    assert response.status_code == 404
    assert response["Content-Type"] == "application/json"
    assert response.json()["error"] == "not_found"


def test_malformed_json_is_a_400_not_a_500(api):
    response = api.generic("PUT", "/api/v1/standby", "{not json", content_type="application/json")
    assert response.status_code == 400
    assert response.json()["error"] == "parse_error"


def test_wrong_method_is_a_json_405(api):
    response = api.delete("/api/v1/standby")
    assert response.status_code == 405
    assert response.json()["error"] == "method_not_allowed"


def test_openapi_schema_and_docs_are_served_without_internet_assets():
    client = Client()
    schema = client.get("/api/v1/schema", HTTP_ACCEPT="application/vnd.oai.openapi+json")
    assert schema.status_code == 200
    assert "/api/v1/instances" in schema.json()["paths"]
    docs = client.get("/api/docs")
    assert docs.status_code == 200
    html = docs.content.decode()
    assert "swagger-ui" in html and "cdn.jsdelivr" not in html and "unpkg.com" not in html
