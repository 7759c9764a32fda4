from urllib.parse import urlsplit

from django.conf import settings
from rest_framework import serializers

from machines.models import MachineAttempt, MachineBlacklist, MachineStats, ProviderAccount, SSHKey
from machines.providers.base import OfferQuery
from machines.providers.gcp import validate_service_account_key

# Where a GCP key may send its token grants: Google (current and older keys), or the Compute API
# this server is configured with (a fake GCP in development). Anything else would have the server
# POST to an address of the user's choosing.
GCP_TOKEN_HOSTS = frozenset({"oauth2.googleapis.com", "accounts.google.com", "www.googleapis.com"})
GCP_TOKEN_URI_ERROR = (
    "The service-account key's token_uri must be Google's (https://oauth2.googleapis.com/token)."
)


class ProviderAccountSerializer(serializers.ModelSerializer):
    """The key is write-only: it is never sent back, only its last characters (`key_hint`).

    A GCP key is the whole service-account key JSON; it is checked here (machines.services makes its
    hint from the key's id, never from private-key material)."""

    api_key = serializers.CharField(write_only=True, trim_whitespace=True, max_length=4096)

    class Meta:
        model = ProviderAccount
        fields = ["id", "provider", "name", "api_key", "key_hint", "created_at"]
        read_only_fields = ["id", "key_hint", "created_at"]
        # uniqueness is checked by the service (a 409), not by the serializer
        validators = []

    def validate(self, attrs):
        if attrs.get("provider") == "gcp" and "api_key" in attrs:
            attrs["api_key"] = _gcp_key(attrs["api_key"])
        return attrs


def _gcp_key(api_key: str) -> str:
    try:
        info = validate_service_account_key(api_key)
    except ValueError as exc:
        raise serializers.ValidationError({"api_key": [str(exc)]}) from None
    token_uri = urlsplit(info["token_uri"])
    compute = urlsplit(getattr(settings, "GCP_COMPUTE_API_URL", "") or "")
    if not (
        (token_uri.scheme == "https" and token_uri.hostname in GCP_TOKEN_HOSTS)
        or (compute.netloc and (token_uri.scheme, token_uri.netloc) == (compute.scheme, compute.netloc))
    ):
        raise serializers.ValidationError({"api_key": [GCP_TOKEN_URI_ERROR]})
    return api_key


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
    problematic = MachineStatsSerializer(many=True)
    reliable = MachineStatsSerializer(many=True)
    blacklist = MachineBlacklistSerializer(many=True)


class BlacklistAddSerializer(serializers.Serializer):
    provider = serializers.CharField(max_length=32)
    host_id = serializers.CharField(max_length=64)
    reason = serializers.CharField(max_length=2000)
    hours = serializers.FloatField(required=False, allow_null=True, min_value=0.01,
                                   help_text="Empty: until lifted by hand.")


class BlacklistLiftSerializer(serializers.Serializer):
    provider = serializers.CharField(max_length=32)
    host_id = serializers.CharField(max_length=64)


class OfferQuerySerializer(serializers.Serializer):
    gpu_name = serializers.CharField(required=False, max_length=64)
    num_gpus = serializers.IntegerField(required=False, min_value=0, max_value=16)
    # a number >= 0 in the schema too (as a string its pattern would allow a minus sign)
    max_price = serializers.DecimalField(required=False, max_digits=8, decimal_places=4, min_value=0, coerce_to_string=False)
    region = serializers.CharField(required=False, max_length=64)
    interruptible = serializers.BooleanField(required=False, default=False)
    limit = serializers.IntegerField(required=False, min_value=1, max_value=200, default=64)

    def to_query(self) -> OfferQuery:
        data = self.validated_data
        return OfferQuery(
            gpu_name=data.get("gpu_name"), num_gpus=data.get("num_gpus"), max_price_per_hour=data.get("max_price"),
            region=data.get("region"), interruptible=data["interruptible"], limit=data["limit"],
        )


class OfferSerializer(serializers.Serializer):
    provider = serializers.CharField(source="rated.offer.provider")
    account = serializers.IntegerField(allow_null=True)
    offer_id = serializers.CharField(source="rated.offer.offer_id")
    host_id = serializers.CharField(source="rated.offer.host_id")
    gpu_name = serializers.CharField(source="rated.offer.gpu_name")
    num_gpus = serializers.IntegerField(source="rated.offer.num_gpus")
    gpu_ram_gb = serializers.FloatField(source="rated.offer.gpu_ram_gb")
    price_per_hour = serializers.DecimalField(source="rated.offer.price_per_hour", max_digits=8, decimal_places=4)
    provider_reliability = serializers.FloatField(source="rated.offer.reliability", allow_null=True)
    region = serializers.CharField(source="rated.offer.region")
    disk_gb = serializers.FloatField(source="rated.offer.disk_gb")
    inet_down_mbps = serializers.FloatField(source="rated.offer.inet_down_mbps", allow_null=True)
    # our own record of the host (launch races of every user)
    success_rate = serializers.FloatField(source="rated.success_rate", allow_null=True)
    attempts = serializers.IntegerField(source="rated.judged_attempts")
    reliability_band = serializers.CharField(source="rated.band")
    blacklisted = serializers.BooleanField(source="rated.blacklisted")


class OfferErrorSerializer(serializers.Serializer):
    provider = serializers.CharField()
    account = serializers.IntegerField(allow_null=True)
    detail = serializers.CharField()


class OfferListSerializer(serializers.Serializer):
    offers = OfferSerializer(many=True)
    errors = OfferErrorSerializer(many=True)
