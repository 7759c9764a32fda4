from rest_framework import serializers

from machines.models import MachineAttempt, MachineBlacklist, MachineStats, ProviderAccount, SSHKey


class ProviderAccountSerializer(serializers.ModelSerializer):
    """The key is write-only: it is never sent back, only its last characters (`key_hint`)."""

    api_key = serializers.CharField(write_only=True, trim_whitespace=True, max_length=4096)

    class Meta:
        model = ProviderAccount
        fields = ["id", "provider", "name", "api_key", "key_hint", "created_at"]
        read_only_fields = ["id", "key_hint", "created_at"]
        # uniqueness is checked by the service (a 409), not by the serializer
        validators = []


class SSHKeySerializer(serializers.ModelSerializer):
    class Meta:
        model = SSHKey
        fields = ["id", "name", "public_key", "fingerprint", "created_at"]
        read_only_fields = ["id", "fingerprint", "created_at"]
        validators = []


class MachineAttemptSerializer(serializers.ModelSerializer):
    class Meta:
        model = MachineAttempt
        fields = [
            "id", "instance", "provider", "host_id", "offer_id", "round", "provider_instance_id", "gpu_name",
            "price_per_hour", "outcome", "failure_stage", "detail", "seconds_to_ready", "cost",
            "created_at", "ready_at", "finished_at", "destroyed_at",
        ]


class MachineStatsSerializer(serializers.ModelSerializer):
    class Meta:
        model = MachineStats
        fields = [
            "provider", "host_id", "attempts", "successes", "failures", "consecutive_failures",
            "success_rate", "median_seconds_to_ready", "last_attempt_at", "last_success_at",
        ]


class MachineBlacklistSerializer(serializers.ModelSerializer):
    class Meta:
        model = MachineBlacklist
        fields = ["id", "provider", "host_id", "reason", "source", "until", "created_at"]


class HistorySummarySerializer(serializers.Serializer):
    attempts = serializers.IntegerField()
    won = serializers.IntegerField()
    failed = serializers.IntegerField()
    cost = serializers.DecimalField(max_digits=12, decimal_places=6)
    avg_seconds_to_ready = serializers.FloatField(allow_null=True)


class MachineHistorySerializer(serializers.Serializer):
    summary = HistorySummarySerializer()
    attempts = MachineAttemptSerializer(many=True)
    stats = MachineStatsSerializer(many=True)
    blacklist = MachineBlacklistSerializer(many=True)
