from drf_spectacular.utils import extend_schema
from rest_framework import mixins, status, viewsets
from rest_framework.response import Response
from rest_framework.views import APIView

from machines import selectors, services
from machines.api.serializers import MachineHistorySerializer, ProviderAccountSerializer, SSHKeySerializer


class ProviderAccountViewSet(
    mixins.ListModelMixin, mixins.RetrieveModelMixin, mixins.DestroyModelMixin, viewsets.GenericViewSet
):
    serializer_class = ProviderAccountSerializer

    def get_queryset(self):
        return selectors.provider_accounts_of(self.request.user)

    def create(self, request):
        serializer = self.get_serializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        account = services.provider_account_create(owner=request.user, **serializer.validated_data)
        return Response(self.get_serializer(account).data, status=status.HTTP_201_CREATED)

    def destroy(self, request, pk=None):
        services.provider_account_delete(owner=request.user, account_id=self.get_object().pk)
        return Response(status=status.HTTP_204_NO_CONTENT)


class SSHKeyViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    serializer_class = SSHKeySerializer

    def get_queryset(self):
        return selectors.ssh_keys_of(self.request.user)

    def create(self, request):
        serializer = self.get_serializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        key = services.ssh_key_add(owner=request.user, **serializer.validated_data)
        return Response(self.get_serializer(key).data, status=status.HTTP_201_CREATED)

    def destroy(self, request, pk=None):
        services.ssh_key_delete(owner=request.user, key_id=self.get_object().pk)
        return Response(status=status.HTTP_204_NO_CONTENT)


class MachineHistoryView(APIView):
    @extend_schema(responses=MachineHistorySerializer)
    def get(self, request):
        return Response(MachineHistorySerializer(selectors.machine_history(user=request.user)).data)
