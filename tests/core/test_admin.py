"""Every admin page an operator opens renders, and secrets never appear in it."""

import pytest
from django.contrib import admin
from django.urls import reverse

from machines.models import ProviderAccount
from tests.factories import make_instance, make_user

pytestmark = pytest.mark.django_db


@pytest.fixture
def operator(client):
    staff = make_user("operator")
    staff.is_staff = staff.is_superuser = True
    staff.save()
    client.force_login(staff)
    return client


def test_every_model_changelist_and_change_page_render(operator):
    owner = make_user()
    instance = make_instance(owner, status="running")
    ProviderAccount.objects.create(owner=owner, provider="vastai", name="k", api_key="secret-vast-key-0123456789")
    for model in admin.site._registry:
        meta = model._meta
        url = reverse(f"admin:{meta.app_label}_{meta.model_name}_changelist")
        response = operator.get(url)
        assert response.status_code == 200, url
        assert b"secret-vast-key" not in response.content
    response = operator.get(reverse("admin:instances_instance_change", args=[instance.pk]))
    assert response.status_code == 200
    account = ProviderAccount.objects.get()
    page = operator.get(reverse("admin:machines_provideraccount_change", args=[account.pk]))
    assert page.status_code == 200 and b"secret-vast-key" not in page.content


def test_savings_page_renders_with_the_vendored_chart(operator):
    response = operator.get(reverse("admin:instances_savings") + "?days=7")
    assert response.status_code == 200
    html = response.content.decode()
    assert "chart-4.6.1.umd.min.js" in html and "Net savings" in html and "cdn" not in html.lower()


def test_the_hibernate_action_requests_a_hibernation_and_refuses_what_cannot_hibernate(operator, settings):
    owner = make_user()
    running = make_instance(owner, status="running", name="busy-box")
    gone = make_instance(owner, status="destroyed", name="gone-box")
    url = reverse("admin:instances_instance_changelist")
    response = operator.post(url, {"action": "hibernate_selected", "_selected_action": [running.pk, gone.pk]},
                             follow=True)
    assert response.status_code == 200
    shown = [str(m) for m in response.context["messages"]]
    assert any("hibernation requested for 1: busy-box" in m for m in shown)
    assert any(m.startswith("not hibernated: gone-box") for m in shown)
    assert running.events.filter(kind="hibernate", message="hibernation requested").exists()
