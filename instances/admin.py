from django.contrib import admin, messages
from django.template.response import TemplateResponse
from django.urls import path

from dumont.core.errors import DomainError
from instances import metrics, services
from instances.models import (
    Instance,
    InstanceEvent,
    OperatorAlert,
    StandbyConfig,
    StandbyMachine,
    UnreachableMachine,
)
from machines.models import MachineAttempt


class MachineAttemptInline(admin.TabularInline):
    """The launch races of this instance, round by round."""

    model = MachineAttempt
    fields = ["round", "host_id", "offer_id", "provider_instance_id", "price_per_hour", "outcome", "failure_stage",
              "seconds_to_ready", "cost", "detail", "created_at", "destroyed_at"]
    readonly_fields = fields
    ordering = ["round", "id"]
    extra = 0
    can_delete = False

    def has_add_permission(self, request, obj=None):
        return False


class InstanceEventInline(admin.TabularInline):
    model = InstanceEvent
    fields = ["created_at", "kind", "message", "data"]
    readonly_fields = fields
    extra = 0
    can_delete = False
    ordering = ["-id"]

    def has_add_permission(self, request, obj=None):
        return False


@admin.register(Instance)
class InstanceAdmin(admin.ModelAdmin):
    change_list_template = "admin/instances/instance_changelist.html"

    def get_urls(self):
        savings = path("savings/", self.admin_site.admin_view(self.savings_view), name="instances_savings")
        return [savings, *super().get_urls()]

    def savings_view(self, request):
        """The fleet's real savings, with a daily chart (Chart.js, served from our static files)."""
        try:
            days = min(max(int(request.GET.get("days", 30)), 1), 366)
        except ValueError:
            days = 30
        report = metrics.savings_report(days=days)
        chart_data = {"labels": [d["date"] for d in report["daily"]],
                      "values": [float(d["net_savings"]) for d in report["daily"]]}
        context = {**self.admin_site.each_context(request), "report": report, "chart_data": chart_data,
                   "title": "Real savings"}
        return TemplateResponse(request, "admin/instances/savings.html", context)

    list_display = ["id", "name", "owner", "provider", "status", "gpu_name", "num_gpus", "host_id",
                    "price_per_hour", "status_changed_at", "created_at"]
    list_filter = ["status", "provider", "gpu_name", "interruptible"]
    search_fields = ["name", "owner__username", "owner__email", "provider_instance_id", "host_id"]
    list_select_related = ["owner"]
    inlines = [MachineAttemptInline, InstanceEventInline]
    actions = ["hibernate_selected"]
    # status changes only through the state machine (services), never by editing the row
    readonly_fields = ["status", "status_reason", "status_changed_at", "provider_instance_id", "host_id",
                       "ssh_host", "ssh_port", "ssh_user", "ssh_host_key", "price_per_hour",
                       "machine_started_at", "created_at", "updated_at"]

    @admin.action(description="Hibernate selected instances (verified snapshot, then the machine is destroyed)")
    def hibernate_selected(self, request, queryset):
        """The same request as POST /api/v1/instances/{id}/hibernate, for each instance that can hibernate."""
        requested, refused = [], []
        for instance in queryset.order_by("pk"):
            try:
                services.instance_hibernate_request(instance=instance)
                requested.append(instance.name)
            except DomainError as exc:
                refused.append(f"{instance.name}: {exc.detail}")
        if requested:
            self.message_user(request, f"hibernation requested for {len(requested)}: {', '.join(requested)}",
                              messages.SUCCESS)
        if refused:
            self.message_user(request, f"not hibernated: {'; '.join(refused)}", messages.WARNING)


@admin.register(InstanceEvent)
class InstanceEventAdmin(admin.ModelAdmin):
    list_display = ["id", "instance", "kind", "message", "created_at"]
    list_filter = ["kind"]
    search_fields = ["message", "instance__name"]
    readonly_fields = ["instance", "kind", "message", "data", "created_at"]

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False


@admin.register(StandbyConfig)
class StandbyConfigAdmin(admin.ModelAdmin):
    list_display = ["owner", "enabled", "provider", "zone", "machine_type", "spot", "sync_interval_seconds",
                    "auto_failover", "auto_recovery", "updated_at"]
    list_filter = ["enabled", "provider", "spot"]
    search_fields = ["owner__username"]


@admin.register(StandbyMachine)
class StandbyMachineAdmin(admin.ModelAdmin):
    """Read-only: standbys change through instances/standby.py. The mirror key is never shown."""

    list_display = ["id", "instance", "provider", "status", "ssh_host", "ssh_port", "price_per_hour", "last_sync_at",
                    "syncs", "created_at", "destroyed_at"]
    list_filter = ["status", "provider"]
    search_fields = ["instance__name", "provider_instance_id", "label"]
    list_select_related = ["instance"]
    exclude = ["mirror_private_key"]
    readonly_fields = ["instance", "provider", "provider_account", "zone", "machine_type", "spot", "status", "error",
                       "label", "provider_instance_id", "ssh_host", "ssh_port", "ssh_user", "ssh_host_key",
                       "price_per_hour", "mirror_public_key", "last_sync_at", "last_sync_seconds", "last_sync_error",
                       "syncs", "created_at", "ready_at", "destroyed_at"]

    def has_add_permission(self, request):
        return False


@admin.register(OperatorAlert)
class OperatorAlertAdmin(admin.ModelAdmin):
    """What only an operator can judge: fleet-wide silence, a machine unreachable past its grace, a
    hibernation that keeps failing. Resolve one by setting its resolved time."""

    list_display = ["created_at", "kind", "message", "instance", "resolved_at"]
    list_filter = ["kind", ("resolved_at", admin.EmptyFieldListFilter)]
    readonly_fields = ["kind", "key", "message", "data", "instance", "created_at"]
    ordering = ["-id"]


@admin.register(UnreachableMachine)
class UnreachableMachineAdmin(admin.ModelAdmin):
    """Silent machines kept because they may hold unsaved work (instances/lost.py)."""

    list_display = ["id", "instance", "provider", "provider_instance_id", "host_id", "state", "checks", "created_at",
                    "flagged_at", "resolved_at"]
    list_filter = ["state", "provider"]
    readonly_fields = ["instance", "provider", "provider_account", "provider_instance_id", "host_id", "ssh_host",
                       "ssh_port", "ssh_user", "ssh_host_key", "price_per_hour", "reason", "checks", "last_checked_at",
                       "flagged_at", "created_at"]
