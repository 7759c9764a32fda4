from django.urls import path

from agent.api import views

urlpatterns = [
    path("agent/status", views.agent_status, name="agent-status"),
    path("health", views.health, name="health"),
]
