from drf_spectacular.utils import extend_schema
from rest_framework import mixins, status, viewsets
from rest_framework.permissions import IsAdminUser
from rest_framework.response import Response
from rest_framework.views import APIView

from dumont.core.errors import NotFound
from machines import reliability, selectors, services
from machines.api.serializers import (
    BlacklistAddSerializer,
    BlacklistLiftSerializer,
    MachineBlacklistSerializer,
    MachineHistorySerializer,
    OfferListSerializer,
    OfferQuerySerializer,
    ProviderAccountSerializer,
    SSHKeySerializer,
)


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


class OfferListView(APIView):
    """The deploy wizard's data: offers from every provider you can rent from, cheapest first."""

    @extend_schema(parameters=[OfferQuerySerializer], responses=OfferListSerializer)
    def get(self, request):
        params = OfferQuerySerializer(data=request.query_params)
        params.is_valid(raise_exception=True)
        offers, errors = selectors.offers_for(user=request.user, query=params.to_query())
        return Response(OfferListSerializer({"offers": offers, "errors": errors}).data)


class BlacklistView(APIView):
    """Operators (staff) blacklist a host by hand or lift it; the blacklist applies to every user's races."""

    permission_classes = [IsAdminUser]

    @extend_schema(request=BlacklistAddSerializer, responses={201: MachineBlacklistSerializer})
    def post(self, request):
        data = BlacklistAddSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        entry = reliability.blacklist_add(by=request.user, **data.validated_data)
        return Response(MachineBlacklistSerializer(entry).data, status=status.HTTP_201_CREATED)

    @extend_schema(request=BlacklistLiftSerializer, responses={204: None})
    def delete(self, request):
        data = BlacklistLiftSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        if not reliability.blacklist_lift(by=request.user, **data.validated_data):
            raise NotFound("That host is not blacklisted.")
        return Response(status=status.HTTP_204_NO_CONTENT)
