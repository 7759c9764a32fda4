"""Login (username or email), refresh (rotating), logout (blacklists the refresh token); operators add users."""

from drf_spectacular.utils import extend_schema
from rest_framework import serializers, status
from rest_framework.permissions import AllowAny, IsAdminUser, IsAuthenticated
from rest_framework.response import Response
from rest_framework.views import APIView
from rest_framework_simplejwt.exceptions import TokenError
from rest_framework_simplejwt.serializers import TokenObtainPairSerializer
from rest_framework_simplejwt.tokens import RefreshToken
from rest_framework_simplejwt.views import TokenObtainPairView, TokenRefreshView

from dumont.core.errors import DomainError
from dumont.core.services import user_create
from dumont.core.throttling import LoginPerAddressThrottle, LoginPerUsernameThrottle


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
    throttle_classes = [LoginPerUsernameThrottle, LoginPerAddressThrottle]


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


class UserCreateSerializer(serializers.Serializer):
    username = serializers.CharField(max_length=150)
    email = serializers.EmailField(required=False, default="")
    password = serializers.CharField(required=False, write_only=True, min_length=1,
                                     help_text="omitted: one is generated and returned, once")
    is_staff = serializers.BooleanField(required=False, default=False)


class UserCreatedSerializer(serializers.Serializer):
    id = serializers.IntegerField()
    username = serializers.CharField()
    email = serializers.CharField()
    is_staff = serializers.BooleanField()
    password = serializers.CharField(required=False, help_text="only when it was generated")


class UserCreateView(APIView):
    """Operators (staff) add a user: the same as `manage.py createuser`."""

    permission_classes = [IsAdminUser]

    @extend_schema(request=UserCreateSerializer, responses={201: UserCreatedSerializer})
    def post(self, request):
        data = UserCreateSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        given = data.validated_data.get("password")
        user, password = user_create(username=data.validated_data["username"], email=data.validated_data["email"],
                                     password=given, staff=data.validated_data["is_staff"])
        body = {"id": user.pk, "username": user.username, "email": user.email, "is_staff": user.is_staff}
        if not given:
            body["password"] = password  # generated: shown this once, never stored in clear
        return Response(UserCreatedSerializer(body).data, status=status.HTTP_201_CREATED)
