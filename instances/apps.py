from django.apps import AppConfig


class InstancesConfig(AppConfig):
    name = "instances"

    def ready(self) -> None:
        from instances.events import record_instance_event
        from snapshots.signals import snapshot_event

        snapshot_event.connect(record_instance_event, dispatch_uid="instances.record_snapshot_event")
