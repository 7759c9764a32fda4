from django.contrib import admin
from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView
from rest_framework.permissions import AllowAny

from dumont.core import auth_api

api_v1 = [
    # first: agents' heartbeats are most of the traffic, and each pattern tried before a match costs
    path("", include("agent.api.urls")),
    path("auth/login", auth_api.LoginView.as_view(), name="auth-login"),
    path("auth/refresh", auth_api.RefreshView.as_view(), name="auth-refresh"),
    path("auth/logout", auth_api.LogoutView.as_view(), name="auth-logout"),
    path("users", auth_api.UserCreateView.as_view(), name="users"),
    # the schema and its docs are public: they describe the API, they hold no user data
    path("schema", SpectacularAPIView.as_view(permission_classes=[AllowAny], authentication_classes=[]), name="schema"),
    path("", include("instances.api.urls")),
    path("", include("snapshots.api.urls")),
    path("", include("machines.api.urls")),
]

urlpatterns = [
    path("admin/", admin.site.urls),
    path("api/v1/", include(api_v1)),
    path(
        "api/docs",
        SpectacularSwaggerView.as_view(url_name="schema", permission_classes=[AllowAny], authentication_classes=[]),
        name="api-docs",
    ),
]

handler404 = "dumont.core.errors.json_not_found"
handler500 = "dumont.core.errors.json_server_error"
