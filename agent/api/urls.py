from django.urls import path

from agent.api import views

urlpatterns = [
    path("agent/status", views.agent_status, name="agent-status"),
    path("agent/sync-credentials", views.sync_credentials, name="agent-sync-credentials"),
    path("health", views.health, name="health"),
]
