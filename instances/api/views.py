from drf_spectacular.utils import extend_schema
from rest_framework import mixins, viewsets
from rest_framework.response import Response
from rest_framework.views import APIView

from instances import selectors, services
from instances.api.serializers import InstanceDetailSerializer, InstanceSerializer, StandbyConfigSerializer
from instances.filters import InstanceFilter


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
