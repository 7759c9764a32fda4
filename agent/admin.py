from django.contrib import admin

from agent.models import AgentCredential, Heartbeat


@admin.register(AgentCredential)
class AgentCredentialAdmin(admin.ModelAdmin):
    list_display = ["instance", "created_at", "rotated_at"]
    fields = ["instance", "created_at", "rotated_at"]  # the secret is never shown
    readonly_fields = fields

    def has_add_permission(self, request):
        return False


@admin.register(Heartbeat)
class HeartbeatAdmin(admin.ModelAdmin):
    list_display = ["id", "instance", "gpu_util", "agent_state", "agent_time", "received_at"]
    list_filter = ["received_at"]
    search_fields = ["instance__name"]
    readonly_fields = ["instance", "gpu_util", "gpu_metrics", "sync", "agent_state", "agent_time", "received_at", "nonce"]
    date_hierarchy = "received_at"

    def has_add_permission(self, request):
        return False
