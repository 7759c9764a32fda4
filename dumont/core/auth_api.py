"""Login (username or email), refresh (rotating), logout (blacklists the refresh token)."""

from drf_spectacular.utils import extend_schema
from rest_framework import serializers, status
from rest_framework.permissions import AllowAny, IsAuthenticated
from rest_framework.response import Response
from rest_framework.views import APIView
from rest_framework_simplejwt.exceptions import TokenError
from rest_framework_simplejwt.serializers import TokenObtainPairSerializer
from rest_framework_simplejwt.tokens import RefreshToken
from rest_framework_simplejwt.views import TokenObtainPairView, TokenRefreshView

from dumont.core.errors import DomainError


class LoginSerializer(TokenObtainPairSerializer):
    """`{"username": ..., "password": ...}` or `{"email": ..., "password": ...}`."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.fields[self.username_field].required = False
        self.fields["email"] = serializers.EmailField(required=False, write_only=True)

    def validate(self, attrs):
        email = attrs.pop("email", None)
        if not attrs.get(self.username_field):
            if not email:
                raise serializers.ValidationError({"username": ["Give a username or an email."]})
            attrs[self.username_field] = email
        return super().validate(attrs)


class LoginView(TokenObtainPairView):
    serializer_class = LoginSerializer
    permission_classes = [AllowAny]
    authentication_classes = []


class RefreshView(TokenRefreshView):
    permission_classes = [AllowAny]
    authentication_classes = []


class LogoutSerializer(serializers.Serializer):
    refresh = serializers.CharField()


class LogoutView(APIView):
    permission_classes = [IsAuthenticated]

    @extend_schema(request=LogoutSerializer, responses={204: None})
    def post(self, request):
        serializer = LogoutSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        try:
            token = RefreshToken(serializer.validated_data["refresh"])
        except TokenError as exc:
            raise DomainError(str(exc), code="token_not_valid") from exc
        if str(token.get("user_id")) != str(request.user.pk):
            raise DomainError("That refresh token belongs to another user.", code="token_not_valid")
        token.blacklist()
        return Response(status=status.HTTP_204_NO_CONTENT)
