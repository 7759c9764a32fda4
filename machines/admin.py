from django.contrib import admin
from django.utils import timezone

from machines.models import MachineAttempt, MachineBlacklist, MachineStats, ProviderAccount, SSHKey


@admin.register(ProviderAccount)
class ProviderAccountAdmin(admin.ModelAdmin):
    list_display = ["id", "owner", "provider", "name", "key_hint", "created_at"]
    list_filter = ["provider"]
    search_fields = ["name", "owner__username"]
    # the key itself is never shown or edited here
    fields = ["owner", "provider", "name", "key_hint", "created_at"]
    readonly_fields = ["owner", "provider", "key_hint", "created_at"]

    def has_add_permission(self, request):
        return False  # accounts are added through the API, which encrypts and validates the key


@admin.register(SSHKey)
class SSHKeyAdmin(admin.ModelAdmin):
    list_display = ["id", "owner", "name", "fingerprint", "created_at"]
    search_fields = ["name", "owner__username", "fingerprint"]
    readonly_fields = ["fingerprint", "created_at"]


@admin.register(MachineAttempt)
class MachineAttemptAdmin(admin.ModelAdmin):
    list_display = ["id", "instance", "round", "provider", "host_id", "offer_id", "outcome", "failure_stage",
                    "seconds_to_ready", "price_per_hour", "cost", "created_at"]
    list_filter = ["outcome", "failure_stage", "provider", "round"]
    search_fields = ["host_id", "offer_id", "provider_instance_id", "label"]
    readonly_fields = [field.name for field in MachineAttempt._meta.fields]

    def has_add_permission(self, request):
        return False


@admin.register(MachineStats)
class MachineStatsAdmin(admin.ModelAdmin):
    list_display = ["provider", "host_id", "attempts", "successes", "failures", "consecutive_failures",
                    "success_rate", "median_seconds_to_ready", "last_attempt_at"]
    list_filter = ["provider"]
    search_fields = ["host_id"]
    readonly_fields = [field.name for field in MachineStats._meta.fields]


@admin.register(MachineBlacklist)
class MachineBlacklistAdmin(admin.ModelAdmin):
    list_display = ["id", "provider", "host_id", "source", "reason", "until", "lifted_at", "created_at"]
    list_filter = ["source", "provider"]
    search_fields = ["host_id", "reason"]
    readonly_fields = ["created_by", "created_at", "lifted_by", "lifted_at"]
    actions = ["lift"]

    @admin.action(description="Lift the selected blacklist entries")
    def lift(self, request, queryset):
        lifted = queryset.active().update(lifted_at=timezone.now(), lifted_by=request.user)
        self.message_user(request, f"{lifted} entr{'y' if lifted == 1 else 'ies'} lifted.")

    def save_model(self, request, obj, form, change):
        if not change:
            obj.source = MachineBlacklist.Source.MANUAL
            obj.created_by = request.user
        super().save_model(request, obj, form, change)
