from django.apps import AppConfig
from django.db.models.signals import post_delete, post_save


class AgentConfig(AppConfig):
    name = "agent"

    def ready(self) -> None:
        from agent import mirror
        from agent.models import AgentCredential
        from instances.models import Instance

        def credential_changed(sender, instance, **kwargs) -> None:
            mirror.invalidate(instance.instance_id)

        def instance_changed(sender, instance, update_fields=None, **kwargs) -> None:
            # states.transition saves with update_fields including "status"; a full save may change it too
            if update_fields is None or "status" in update_fields:
                mirror.invalidate(instance.pk)

        post_save.connect(credential_changed, sender=AgentCredential, weak=False,
                          dispatch_uid="agent.mirror.credential_saved")
        # deleting an instance deletes its credential (cascade), which sends this one
        post_delete.connect(credential_changed, sender=AgentCredential, weak=False,
                            dispatch_uid="agent.mirror.credential_deleted")
        post_save.connect(instance_changed, sender=Instance, weak=False, dispatch_uid="agent.mirror.instance_saved")
