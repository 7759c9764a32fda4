"""The deploy wizard's offers, from the real local marketplace (and a provider that is down)."""

from decimal import Decimal

import pytest

from dumont.bench.marketplace import running_marketplace
from machines import reliability
from machines.models import ProviderAccount

pytestmark = pytest.mark.django_db


@pytest.fixture(scope="module")
def market(tmp_path_factory):
    with running_marketplace(tmp_path_factory.mktemp("offers")) as handle:
        yield handle


@pytest.fixture(autouse=True)
def _use_market(settings, market):
    settings.LOCAL_MARKETPLACE_ENABLED = True
    settings.LOCAL_MARKETPLACE_URL = market.url


def test_offers_are_filtered_and_carry_our_reliability_record(api):
    response = api.get("/api/v1/offers?gpu_name=RTX 4090&num_gpus=1&max_price=0.5")
    assert response.status_code == 200, response.json()
    body = response.json()
    offers = body["offers"]
    assert offers and body["errors"] == []
    assert {o["gpu_name"] for o in offers} == {"RTX 4090"}
    assert max(Decimal(o["price_per_hour"]) for o in offers) <= Decimal("0.5")
    assert all(o["provider"] == "local" and o["account"] is None and o["host_id"] for o in offers)
    # no history yet: every host is judged by the provider's own score, ranked per expected success
    assert {o["reliability_band"] for o in offers} == {"unknown"} and not any(o["blacklisted"] for o in offers)
    expected = [Decimal(o["price_per_hour"]) / Decimal(str(o["provider_reliability"])) for o in offers]
    assert expected == sorted(expected)


def test_blacklisted_hosts_are_marked_and_listed_last(api):
    first = api.get("/api/v1/offers?gpu_name=RTX 4090").json()["offers"][0]
    reliability.blacklist_add(provider="local", host_id=first["host_id"], reason="test", hours=1)
    offers = api.get("/api/v1/offers?gpu_name=RTX 4090").json()["offers"]
    assert offers[-1]["host_id"] == first["host_id"] and offers[-1]["blacklisted"]
    assert not any(o["blacklisted"] for o in offers[:-1])


def test_region_filter_matches_the_country(api):
    offers = api.get("/api/v1/offers?region=DE").json()["offers"]
    assert offers and all(o["region"].endswith("DE") for o in offers)


def test_bad_query_names_the_field(api):
    response = api.get("/api/v1/offers?max_price=cheap&num_gpus=-1")
    assert response.status_code == 400
    assert set(response.json()["fields"]) == {"max_price", "num_gpus"}


def test_a_provider_that_is_down_is_reported_beside_the_others(api, user, settings):
    settings.VASTAI_API_URL = "http://127.0.0.1:9/api/v0/"  # nothing listens on the discard port
    ProviderAccount.objects.create(owner=user, provider="vastai", name="down", api_key="vast-key-123456789")
    body = api.get("/api/v1/offers?gpu_name=RTX 4090").json()
    assert body["offers"], "the local offers must still be listed"
    assert [e["provider"] for e in body["errors"]] == ["vastai"]
    assert "vast-key-123456789" not in str(body)


def test_disabled_local_marketplace_lists_nothing(api, settings):
    settings.LOCAL_MARKETPLACE_ENABLED = False
    assert api.get("/api/v1/offers").json() == {"offers": [], "errors": []}
