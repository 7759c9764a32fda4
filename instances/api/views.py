from drf_spectacular.utils import extend_schema
from rest_framework import mixins, status, viewsets
from rest_framework.decorators import action
from rest_framework.response import Response
from rest_framework.views import APIView

from instances import metrics, selectors, services
from instances.api.serializers import (
    DaysSerializer,
    EventQuerySerializer,
    InstanceCreateSerializer,
    InstanceDetailSerializer,
    InstanceEventSerializer,
    InstanceRestoreSerializer,
    InstanceSerializer,
    KeepAwakeSerializer,
    MetricsSerializer,
    SavingsSerializer,
    StandbyConfigSerializer,
    StandbyStatusSerializer,
    WakeSerializer,
)
from instances.filters import InstanceFilter
from snapshots import selectors as snapshot_selectors
from snapshots.api import views as snapshot_views
from snapshots.api.serializers import (
    SnapshotCreateSerializer,
    SnapshotOptionsSerializer,
    SnapshotRestoreRequestSerializer,
    SnapshotRestoreSerializer,
    SnapshotSerializer,
)


class InstanceViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    serializer_class = InstanceSerializer
    filterset_class = InstanceFilter

    def get_queryset(self):
        return selectors.instances_of(self.request.user)

    @extend_schema(responses=InstanceDetailSerializer)
    def retrieve(self, request, pk=None):
        instance = self.get_object()
        events = selectors.instance_events(instance=instance)
        return Response(InstanceDetailSerializer(instance, context={"events": events}).data)

    @extend_schema(request=InstanceCreateSerializer, responses={202: InstanceSerializer})
    def create(self, request):
        """Save the instance as pending and start its launch race; follow it in its events."""
        serializer = InstanceCreateSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        instance = services.instance_create(owner=request.user, **serializer.validated_data)
        return Response(InstanceSerializer(instance).data, status=status.HTTP_202_ACCEPTED)

    @extend_schema(request=None, responses={202: InstanceSerializer})
    def destroy(self, request, pk=None):
        instance = services.instance_destroy_request(instance=self.get_object())
        return Response(InstanceSerializer(instance).data, status=status.HTTP_202_ACCEPTED)

    @extend_schema(request=None, responses={202: InstanceSerializer})
    @action(detail=True, methods=["post"])
    def pause(self, request, pk=None):
        instance = services.instance_pause_request(instance=self.get_object())
        return Response(InstanceSerializer(instance).data, status=status.HTTP_202_ACCEPTED)

    @extend_schema(request=None, responses={202: InstanceSerializer})
    @action(detail=True, methods=["post"])
    def resume(self, request, pk=None):
        instance = services.instance_resume_request(instance=self.get_object())
        return Response(InstanceSerializer(instance).data, status=status.HTTP_202_ACCEPTED)

    @extend_schema(request=None, responses={202: InstanceSerializer})
    @action(detail=True, methods=["post"])
    def hibernate(self, request, pk=None):
        """Snapshot (verified) then destroy the machine, now; the workspace waits in object storage."""
        instance = services.instance_hibernate_request(instance=self.get_object())
        return Response(InstanceSerializer(instance).data, status=status.HTTP_202_ACCEPTED)

    @extend_schema(request=WakeSerializer, responses={202: InstanceSerializer})
    @action(detail=True, methods=["post"])
    def wake(self, request, pk=None):
        """Race for a machine, restore the latest verified snapshot onto it, start the agent."""
        body = WakeSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        instance = services.instance_wake_request(instance=self.get_object(), **body.validated_data)
        return Response(InstanceSerializer(instance).data, status=status.HTTP_202_ACCEPTED)

    @extend_schema(request=None, responses={202: InstanceSerializer})
    @action(detail=True, methods=["post"])
    def failover(self, request, pk=None):
        """A failover drill: one last mirror sync, then the instance works on its CPU standby (its GPU
        machine is destroyed). 409 without a standby that has mirrored at least once."""
        instance = services.instance_failover_request(instance=self.get_object())
        return Response(InstanceSerializer(instance).data, status=status.HTTP_202_ACCEPTED)

    @extend_schema(request=None, responses={202: InstanceSerializer})
    @action(detail=True, methods=["post"])
    def failback(self, request, pk=None):
        """From `failover`: race for a GPU, copy the standby's workspace to it, switch back."""
        instance = services.instance_failback_request(instance=self.get_object())
        return Response(InstanceSerializer(instance).data, status=status.HTTP_202_ACCEPTED)

    @extend_schema(request=SnapshotOptionsSerializer, responses={202: SnapshotSerializer})
    @action(detail=True, methods=["post"])
    def snapshots(self, request, pk=None):
        """Snapshot this running instance now; follow it in /snapshots/{id} (status, progress) or in its events."""
        body = SnapshotOptionsSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        instance = selectors.instance_of(user=request.user, instance_id=int(pk))
        snapshot = services.instance_snapshot_request(instance=instance, fast=body.validated_data["fast"])
        return Response(SnapshotSerializer(snapshot).data, status=status.HTTP_202_ACCEPTED)

    @extend_schema(request=InstanceRestoreSerializer, responses={202: SnapshotRestoreSerializer})
    @action(detail=True, methods=["post"])
    def restore(self, request, pk=None):
        """Restore one of your snapshots into this running instance's workspace (files not in it stay)."""
        body = InstanceRestoreSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        snapshot = snapshot_selectors.snapshot_of(user=request.user, snapshot_id=body.validated_data["snapshot"])
        instance = selectors.instance_of(user=request.user, instance_id=int(pk))
        restore = services.instance_restore_request(instance=instance, snapshot=snapshot)
        return Response(SnapshotRestoreSerializer(restore).data, status=status.HTTP_202_ACCEPTED)

    @extend_schema(request=KeepAwakeSerializer, responses=InstanceSerializer)
    @action(detail=True, methods=["post"], url_path="keep-awake")
    def keep_awake(self, request, pk=None):
        body = KeepAwakeSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        instance = services.instance_keep_awake(instance=self.get_object(), **body.validated_data)
        return Response(InstanceSerializer(instance).data)

    @extend_schema(parameters=[EventQuerySerializer], responses=InstanceEventSerializer(many=True))
    @action(detail=True, methods=["get"], pagination_class=None, filter_backends=[])
    def events(self, request, pk=None):
        """Events in order, a plain list (not pages): `?after=<last id seen>` returns only newer ones (to
        follow a race live), at most `limit`."""
        params = EventQuerySerializer(data=request.query_params)
        params.is_valid(raise_exception=True)
        events = selectors.instance_events(
            instance=self.get_object(), after_id=params.validated_data.get("after"),
            limit=params.validated_data["limit"],
        )
        return Response(InstanceEventSerializer(events, many=True).data)


class SnapshotViewSet(snapshot_views.SnapshotViewSet):
    """/snapshots: the snapshots app's list, read and delete, plus the older write routes, kept for clients:
    `POST /snapshots {"instance"}` = `POST /instances/{id}/snapshots`, `POST /snapshots/{id}/restore
    {"instance"}` = `POST /instances/{instance}/restore {"snapshot": id}`."""

    @extend_schema(request=SnapshotCreateSerializer, responses={202: SnapshotSerializer})
    def create(self, request):
        """Snapshot a running instance now (the same as `POST /instances/{id}/snapshots`)."""
        body = SnapshotCreateSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        instance = selectors.instance_of(user=request.user, instance_id=body.validated_data["instance"])
        snapshot = services.instance_snapshot_request(instance=instance, fast=body.validated_data["fast"])
        return Response(SnapshotSerializer(snapshot).data, status=status.HTTP_202_ACCEPTED)

    @extend_schema(request=SnapshotRestoreRequestSerializer, responses={202: SnapshotRestoreSerializer})
    @action(detail=True, methods=["post"])
    def restore(self, request, pk=None):
        """Restore this snapshot into a running instance (the same as `POST /instances/{id}/restore`)."""
        snapshot = snapshot_selectors.snapshot_of(user=request.user, snapshot_id=int(pk))
        body = SnapshotRestoreRequestSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        instance = selectors.instance_of(user=request.user, instance_id=body.validated_data["instance"])
        restore = services.instance_restore_request(instance=instance, snapshot=snapshot)
        return Response(SnapshotRestoreSerializer(restore).data, status=status.HTTP_202_ACCEPTED)


class MetricsView(APIView):
    @extend_schema(parameters=[DaysSerializer], responses=MetricsSerializer)
    def get(self, request):
        days = DaysSerializer(data=request.query_params)
        days.is_valid(raise_exception=True)
        return Response(MetricsSerializer(metrics.fleet_metrics(user=request.user, **days.validated_data)).data)


class SavingsView(APIView):
    """Dollars actually saved by hibernation, from the event ledger (see instances/metrics.py)."""

    @extend_schema(parameters=[DaysSerializer], responses=SavingsSerializer)
    def get(self, request):
        days = DaysSerializer(data=request.query_params)
        days.is_valid(raise_exception=True)
        return Response(SavingsSerializer(metrics.savings_report(user=request.user, **days.validated_data)).data)


class StandbyConfigView(APIView):
    @extend_schema(responses=StandbyConfigSerializer)
    def get(self, request):
        return Response(StandbyConfigSerializer(selectors.standby_config_of(request.user)).data)

    @extend_schema(request=StandbyConfigSerializer, responses=StandbyConfigSerializer)
    def put(self, request):
        serializer = StandbyConfigSerializer(
            selectors.standby_config_of(request.user), data=request.data, partial=True
        )
        serializer.is_valid(raise_exception=True)
        config = services.standby_config_update(owner=request.user, **serializer.validated_data)
        return Response(StandbyConfigSerializer(config).data)


class StandbyStatusView(APIView):
    """Each of your live GPU instances with its standby: machine, last sync and the mirror's lag."""

    @extend_schema(responses=StandbyStatusSerializer)
    def get(self, request):
        config = selectors.standby_config_of(request.user)
        return Response(StandbyStatusSerializer({"enabled": config.enabled,
                                                 "instances": selectors.standby_status(owner=request.user)}).data)
