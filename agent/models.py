from django.db import models

from dumont.core.fields import EncryptedTextField


class AgentCredential(models.Model):
    """The per-instance secret a DumontAgent signs its heartbeats with (HMAC).

    Stored encrypted, not hashed: the server needs the secret itself to check an HMAC.
    """

    instance = models.OneToOneField("instances.Instance", on_delete=models.CASCADE, related_name="agent_credential")
    secret = EncryptedTextField()
    created_at = models.DateTimeField(auto_now_add=True)
    rotated_at = models.DateTimeField(null=True, blank=True)

    def __str__(self) -> str:
        return f"agent credential of instance {self.instance_id}"


class Heartbeat(models.Model):
    """One authenticated heartbeat, written in batches from the Redis buffer (agent.buffer)."""

    instance = models.ForeignKey("instances.Instance", on_delete=models.CASCADE, related_name="heartbeats")
    gpu_util = models.FloatField(
        null=True, blank=True,
        help_text="Max utilization over the machine's GPUs, percent. Empty: no reading (never idleness).",
    )
    gpu_metrics = models.JSONField(default=dict, blank=True, help_text="Per-GPU utilization, memory, temperature.")
    sync = models.JSONField(default=dict, blank=True, help_text="The agent's sync service state.")
    agent_state = models.CharField(max_length=32, blank=True, help_text="running, preparing_hibernate, hibernate_ready.")
    agent_time = models.DateTimeField(null=True, blank=True, help_text="When the agent took the reading.")
    received_at = models.DateTimeField(db_index=True)
    # The request's nonce: a flush that runs twice (crash between insert and ack) inserts nothing twice.
    nonce = models.CharField(max_length=64, null=True, blank=True, unique=True)

    class Meta:
        ordering = ["-received_at"]
        # "the last N minutes of this instance" is an index range scan
        indexes = [models.Index(fields=["instance", "-received_at"], name="heartbeat_instance_recent")]

    def __str__(self) -> str:
        util = "no reading" if self.gpu_util is None else f"{self.gpu_util}%"
        return f"heartbeat of {self.instance_id} at {self.received_at:%H:%M:%S}: {util}"
