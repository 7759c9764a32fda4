"""The API keeps its contract under any input: schemathesis generates requests from our own OpenAPI
schema (drf-spectacular's) and sends them, as a normal user, to the real application (in-process WSGI,
the real database): no answer may be a server error or break the schema (status, content type,
headers, body). Bounded: API_FUZZ_EXAMPLES examples per operation, about three minutes on 2 cores.

One test looping over the operations, not schemathesis' pytest parametrization: under pytest 9 its
items share one node id, and xdist would run only one of them."""

import os

import pytest
import schemathesis
from django.core import signals
from django.db import close_old_connections
from hypothesis import HealthCheck, given, settings
from rest_framework_simplejwt.tokens import RefreshToken
from schemathesis import checks

from dumont.wsgi import application
from tests.factories import make_instance, make_user

EXAMPLES = int(os.environ.get("API_FUZZ_EXAMPLES", "25"))
# Not "a schema-valid request is accepted": rules the schema cannot say (an unknown provider, "give a
# username or an email") are 4xx answers by design, documented as such.
CONTRACT = [checks.not_a_server_error, checks.status_code_conformance, checks.content_type_conformance,
            checks.response_headers_conformance, checks.response_schema_conformance]


@pytest.fixture
def in_process(db, settings):
    settings.THROTTLE_API_PER_USER = ""  # this test is the hammer
    settings.THROTTLE_LOGIN_PER_ADDRESS = settings.THROTTLE_LOGIN_PER_USERNAME = ""
    # providers answer at once (nothing listens; the local marketplace is off): the API's answer to an
    # unreachable provider is part of the contract too, and retries with timeouts would not fit the bound
    settings.LOCAL_MARKETPLACE_ENABLED = False
    settings.VASTAI_API_URL = settings.RUNPOD_API_URL = settings.GCP_COMPUTE_API_URL = "http://127.0.0.1:9/"
    settings.PROVIDER_TIMEOUT_SECONDS = 2
    # as Django's test client does: the test's transaction (its connection) outlives each request
    signals.request_started.disconnect(close_old_connections)
    signals.request_finished.disconnect(close_old_connections)
    yield
    signals.request_started.connect(close_old_connections)
    signals.request_finished.connect(close_old_connections)


def test_every_operation_keeps_its_contract(in_process):
    user = make_user()
    make_instance(user, status="running")
    make_instance(user, status="failed")
    headers = {"Authorization": f"Bearer {RefreshToken.for_user(user).access_token}"}
    schema = schemathesis.openapi.from_wsgi("/api/v1/schema", application)
    failures, tested = [], []
    for result in schema.get_all_operations():
        operation = result.ok()

        @given(case=operation.as_strategy())
        @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        def exercise(case):
            case.call_and_validate(headers=headers, checks=CONTRACT)

        try:
            exercise()
        except Exception as exc:  # every operation is tried; all their failures are reported together
            failures.append(f"{operation.label}: {exc}")
        tested.append(operation.label)
    assert len(tested) >= 35  # every route of the schema, not a few
    assert not failures, "\n\n".join(failures)
