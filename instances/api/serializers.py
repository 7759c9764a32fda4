from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from instances.models import Instance, InstanceEvent, StandbyConfig, StandbyMachine
from instances.selectors import instance_last_event_id
from instances.states import Status


class InstanceEventSerializer(serializers.ModelSerializer):
    class Meta:
        model = InstanceEvent
        fields = ["id", "kind", "message", "data", "created_at"]


class MachineSerializer(serializers.ModelSerializer):
    """The current machine, or null when none is rented."""

    class Meta:
        model = Instance
        fields = [
            "provider_instance_id", "host_id", "ssh_host", "ssh_port", "ssh_user", "ssh_host_key",
            "price_per_hour", "machine_started_at",
        ]


class SSHEndpointSerializer(serializers.Serializer):
    on = serializers.ChoiceField(choices=["gpu", "standby"], help_text="Which machine answers: the GPU or the standby.")
    host = serializers.CharField()
    port = serializers.IntegerField()
    user = serializers.CharField()
    host_key = serializers.CharField()


def ssh_endpoint(instance: Instance) -> dict | None:
    """Where the user SSHes now: the GPU machine, or during a failover/failback the CPU standby."""
    if instance.status in (Status.FAILOVER, Status.FAILBACK):
        standbys = getattr(instance, "live_standbys", None)
        if standbys is None:
            standbys = list(instance.standbys.filter(status=StandbyMachine.Status.READY))
        standby = next((s for s in standbys if s.status == StandbyMachine.Status.READY), None)
        if standby is None:
            return None
        return {"on": "standby", "host": standby.ssh_host, "port": standby.ssh_port, "user": standby.ssh_user,
                "host_key": standby.ssh_host_key}
    if not instance.provider_instance_id or not instance.ssh_host:
        return None
    return {"on": "gpu", "host": instance.ssh_host, "port": instance.ssh_port, "user": instance.ssh_user,
            "host_key": instance.ssh_host_key}


class InstanceSerializer(serializers.ModelSerializer):
    machine = serializers.SerializerMethodField()
    ssh = serializers.SerializerMethodField()
    last_event_id = serializers.SerializerMethodField(
        help_text="The newest event's id: follow what happens next with `events?after=<it>`.")

    class Meta:
        model = Instance
        fields = [
            "id", "name", "provider", "provider_account", "gpu_name", "num_gpus", "max_price_per_hour",
            "disk_gb", "image", "region", "interruptible", "status", "status_reason", "status_changed_at",
            "machine", "ssh", "ssh_user", "keep_awake_until", "last_event_id", "created_at", "updated_at",
        ]
        read_only_fields = fields

    def get_last_event_id(self, instance) -> int | None:
        # a listing reads the selector's annotation; one instance (after an action, too) is read afresh
        return instance_last_event_id(instance, annotated=self.parent is not None)

    def get_machine(self, instance) -> dict | None:
        if not instance.provider_instance_id:
            return None
        return MachineSerializer(instance).data

    @extend_schema_field(SSHEndpointSerializer(allow_null=True))
    def get_ssh(self, instance) -> dict | None:
        return ssh_endpoint(instance)


class InstanceDetailSerializer(InstanceSerializer):
    events = serializers.SerializerMethodField()

    class Meta(InstanceSerializer.Meta):
        fields = [*InstanceSerializer.Meta.fields, "events"]
        read_only_fields = fields

    def get_events(self, instance) -> list[dict]:
        return InstanceEventSerializer(self.context["events"], many=True).data


class StandbyConfigSerializer(serializers.ModelSerializer):
    # null until the user first saves a configuration (the defaults are shown until then)
    updated_at = serializers.DateTimeField(read_only=True, allow_null=True)

    class Meta:
        model = StandbyConfig
        fields = [
            "enabled", "provider", "zone", "machine_type", "disk_gb", "spot", "sync_interval_seconds",
            "auto_failover", "auto_recovery", "updated_at",
        ]
        read_only_fields = ["updated_at"]


class StandbyMachineSerializer(serializers.ModelSerializer):
    """A standby as its owner sees it (never its mirror key)."""

    class Meta:
        model = StandbyMachine
        fields = ["id", "status", "provider", "zone", "machine_type", "spot", "provider_instance_id", "ssh_host",
                  "ssh_port", "ssh_user", "ssh_host_key", "price_per_hour", "last_sync_at", "last_sync_seconds",
                  "last_sync_error", "syncs", "error", "created_at", "ready_at", "destroyed_at"]
        read_only_fields = fields


class StandbyInstanceSerializer(serializers.Serializer):
    instance = serializers.IntegerField(source="instance.pk")
    name = serializers.CharField(source="instance.name")
    status = serializers.CharField(source="instance.status")
    standby = StandbyMachineSerializer(allow_null=True)
    lag_seconds = serializers.FloatField(allow_null=True, help_text="Age of the mirror: seconds since the last good "
                                                                     "sync started (null: never synced).")


class StandbyStatusSerializer(serializers.Serializer):
    enabled = serializers.BooleanField()
    instances = StandbyInstanceSerializer(many=True)


class InstanceCreateSerializer(serializers.Serializer):
    name = serializers.RegexField(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$", max_length=100,
                                  error_messages={"invalid": "Letters, digits, '.', '_' and '-' only."})
    provider = serializers.CharField(max_length=32, default="local")
    provider_account = serializers.IntegerField(required=False, allow_null=True, min_value=1)
    gpu_name = serializers.CharField(max_length=64, required=False, allow_blank=True, default="")
    num_gpus = serializers.IntegerField(min_value=1, max_value=16, default=1)
    max_price_per_hour = serializers.DecimalField(max_digits=8, decimal_places=4, min_value=0, required=False,
                                                  allow_null=True, coerce_to_string=False)  # a number >= 0
    disk_gb = serializers.IntegerField(min_value=1, max_value=8192, default=50)
    image = serializers.CharField(max_length=255, default="pytorch/pytorch:latest")
    region = serializers.CharField(max_length=64, required=False, allow_blank=True, default="")
    interruptible = serializers.BooleanField(default=False)


class EventQuerySerializer(serializers.Serializer):
    after = serializers.IntegerField(required=False, min_value=0)
    limit = serializers.IntegerField(required=False, min_value=1, max_value=1000, default=500)


class DaysSerializer(serializers.Serializer):
    days = serializers.IntegerField(required=False, min_value=1, max_value=366, default=30)


def _money():
    return serializers.DecimalField(max_digits=14, decimal_places=6)


def _hours():
    return serializers.DecimalField(max_digits=14, decimal_places=4)


class SavingsTotalsSerializer(serializers.Serializer):
    hours_hibernated = _hours()
    gross_savings = _money()
    storage_cost = _money()
    race_cost = _money()
    net_savings = _money()


class InstanceSavingsSerializer(SavingsTotalsSerializer):
    instance = serializers.IntegerField()
    gpu_name = serializers.CharField()


class GpuSavingsSerializer(serializers.Serializer):
    gpu_name = serializers.CharField()
    hours_hibernated = _hours()
    net_savings = _money()


class DailySavingsSerializer(serializers.Serializer):
    date = serializers.DateField()
    net_savings = _money()


class SavingsSerializer(serializers.Serializer):
    days = serializers.IntegerField()
    since = serializers.DateTimeField()
    until = serializers.DateTimeField()
    totals = SavingsTotalsSerializer()
    projected_month = _money()
    per_instance = InstanceSavingsSerializer(many=True)
    per_gpu = GpuSavingsSerializer(many=True)
    daily = DailySavingsSerializer(many=True)


class TimingSerializer(serializers.Serializer):
    count = serializers.IntegerField()
    median_seconds = serializers.FloatField()
    max_seconds = serializers.FloatField()


class SpendSerializer(serializers.Serializer):
    machines = _money()
    race_losers = _money()
    standby = _money()
    total = _money()


class RaceMetricsSerializer(serializers.Serializer):
    launches = serializers.IntegerField()
    median_seconds_to_ready = serializers.FloatField(allow_null=True)
    p90_seconds_to_ready = serializers.FloatField(allow_null=True)
    machines_rented = serializers.IntegerField()
    loser_cost = _money()


class MetricsSerializer(serializers.Serializer):
    days = serializers.IntegerField()
    instances_by_state = serializers.DictField(child=serializers.IntegerField())
    gpu_hours = _hours()
    spend = SpendSerializer()
    race = RaceMetricsSerializer()
    wake = serializers.DictField(child=TimingSerializer(allow_null=True))
    restore = TimingSerializer(allow_null=True)
    heartbeats_set_aside = serializers.IntegerField(help_text="heartbeats refused by the database, set aside")


class WakeSerializer(serializers.Serializer):
    gpu_name = serializers.CharField(max_length=64, required=False, allow_blank=True)
    region = serializers.CharField(max_length=64, required=False, allow_blank=True)
    max_price_per_hour = serializers.DecimalField(max_digits=8, decimal_places=4, min_value=0, required=False,
                                                  coerce_to_string=False)


class KeepAwakeSerializer(serializers.Serializer):
    minutes = serializers.IntegerField(min_value=0, max_value=7 * 24 * 60)


class InstanceRestoreSerializer(serializers.Serializer):
    snapshot = serializers.IntegerField(min_value=1, help_text="A verified snapshot of yours (of any instance).")
