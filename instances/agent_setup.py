"""Start DumontAgent on an instance's machine (after its race, after a wake's restore)."""

from __future__ import annotations

import logging

from django.conf import settings

from agent.deploy import agent_deploy
from agent.services import agent_credential_issue
from instances.models import Instance, InstanceEvent
from instances.services import instance_event_add
from machines.keys import control_plane_key_path
from machines.ssh import SSHError, SSHTarget

log = logging.getLogger(__name__)


def agent_start(instance: Instance) -> bool:
    """Deploy the agent with a fresh credential (the previous machine's secret dies with it).

    A failure is an event, not an error: without heartbeats the instance is never judged idle (a
    missing heartbeat is not idleness), so it keeps running, and the agent can be redeployed.
    """
    secret = agent_credential_issue(instance.pk)
    target = SSHTarget(instance.ssh_host, instance.ssh_port or 22, instance.ssh_user or "root", instance.ssh_host_key)
    try:
        agent_deploy(target=target, private_key=control_plane_key_path(), instance_id=instance.pk, secret=secret,
                     control_plane_url=settings.AGENT_CONTROL_PLANE_URL)
    except SSHError as exc:
        log.warning("agent deploy on instance %s failed: %s", instance.pk, exc)
        instance_event_add(instance=instance, kind=InstanceEvent.Kind.AGENT,
                           message=f"agent could not be started: {exc}", data={"error": str(exc)[:500]})
        return False
    instance_event_add(instance=instance, kind=InstanceEvent.Kind.AGENT, message="agent started")
    return True
