"""Instance statuses and their named groups (the state machine that moves between them: states.py)."""

from django.db import models


class Status(models.TextChoices):
    PENDING = "pending"
    LAUNCHING = "launching"
    RUNNING = "running"
    PAUSED = "paused"
    HIBERNATING = "hibernating"
    HIBERNATED = "hibernated"
    WAKING = "waking"
    FAILED = "failed"
    DESTROYING = "destroying"
    DESTROYED = "destroyed"
    # a lost GPU machine (instances/lost.py): racing for a new one, then the latest snapshot restored
    RECOVERING = "recovering"
    # a lost GPU machine with a CPU standby (instances/standby.py): the user works on the standby...
    FAILOVER = "failover"
    # ...until a new GPU is raced for and the standby's workspace copied back to it
    FAILBACK = "failback"
    # a pause the provider has not finished yet: never judged by the lost sweep
    PAUSING = "pausing"
    # silent, reported running by its provider, SSH does not answer: kept (it may hold unsaved work),
    # re-checked every lost sweep (instances/lost.py)
    UNREACHABLE = "unreachable"


# Terminal: nothing is rented and nothing will happen on its own. A failed instance can still be
# destroyed by its owner (to release anything a provider may still hold), hence failed -> destroying.
# Destroying an instance keeps its snapshots: they are deleted through the snapshots API.
TERMINAL = frozenset({Status.FAILED, Status.DESTROYED})
ACTIVE = frozenset(set(Status) - TERMINAL)
# An owner's instance names are unique among these. Not destroying: a failed instance's name may be in
# use again (by a newer active instance) by the time its owner destroys it.
NAME_TAKEN = ACTIVE - {Status.DESTROYING}
# A provider machine is (or may be) rented in these states.
HOLDS_MACHINE = frozenset({Status.LAUNCHING, Status.RUNNING, Status.PAUSING, Status.PAUSED, Status.HIBERNATING,
                           Status.WAKING, Status.RECOVERING, Status.FAILBACK, Status.UNREACHABLE})
# A CPU standby may exist (or be wanted) in these states; in any other its machine is destroyed.
KEEPS_STANDBY = frozenset({Status.RUNNING, Status.RECOVERING, Status.FAILOVER, Status.FAILBACK, Status.UNREACHABLE})
