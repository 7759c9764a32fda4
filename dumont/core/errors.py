"""One domain error type, mapped once to HTTP.

Services raise `DomainError` subclasses; the DRF exception handler and the JSON 404/500 handlers turn
every failure into `{"error": code, "detail": message}` (plus `"fields"` for validation errors).
"""

from __future__ import annotations

import logging
from typing import Any

from django.core.exceptions import PermissionDenied
from django.core.exceptions import ValidationError as DjangoValidationError
from django.http import Http404, JsonResponse
from rest_framework import exceptions as drf_exceptions
from rest_framework import status
from rest_framework.response import Response
from rest_framework.views import exception_handler as drf_exception_handler

logger = logging.getLogger(__name__)


class DomainError(Exception):
    code = "error"
    http_status = status.HTTP_400_BAD_REQUEST
    default_detail = "Bad request."

    def __init__(self, detail: str | None = None, *, code: str | None = None, data: dict[str, Any] | None = None):
        detail = detail or self.default_detail
        super().__init__(detail)
        self.detail = detail
        if code:
            self.code = code
        self.data = data or {}

    def body(self) -> dict[str, Any]:
        """The JSON answer: `{"error": code, "detail": message, **data}` (DRF views and the agent's plain ones)."""
        return _body(self.code, self.detail, **self.data)


class InvalidInput(DomainError):
    code = "invalid"


class NotFound(DomainError):
    code = "not_found"
    http_status = status.HTTP_404_NOT_FOUND


class Conflict(DomainError):
    """The object is not in a state that allows the action (e.g. waking a running instance)."""

    code = "conflict"
    http_status = status.HTTP_409_CONFLICT


class ServiceUnavailable(DomainError):
    code = "unavailable"
    http_status = status.HTTP_503_SERVICE_UNAVAILABLE
    default_detail = "Try again later."


class NotAuthenticated(DomainError):
    """One answer for every authentication failure: which check failed would help an attacker."""

    code = "not_authenticated"
    http_status = status.HTTP_401_UNAUTHORIZED
    default_detail = "Authentication failed."


def _flatten(detail: Any) -> str:
    if isinstance(detail, dict):
        return "; ".join(f"{key}: {_flatten(value)}" for key, value in detail.items())
    if isinstance(detail, list):
        return " ".join(_flatten(item) for item in detail)
    return str(detail)


def _body(code: str, detail: str, **extra: Any) -> dict[str, Any]:
    return {"error": code, "detail": detail, **extra}


def api_exception_handler(exc: Exception, context: dict) -> Response:
    if isinstance(exc, DomainError):
        return Response(exc.body(), status=exc.http_status)
    if isinstance(exc, DjangoValidationError):
        exc = drf_exceptions.ValidationError(exc.message_dict if hasattr(exc, "error_dict") else exc.messages)
    if isinstance(exc, Http404):
        exc = drf_exceptions.NotFound()
    if isinstance(exc, PermissionDenied):
        exc = drf_exceptions.PermissionDenied()

    response = drf_exception_handler(exc, context)
    if response is None:
        logger.exception("unhandled API error", exc_info=exc)
        return Response(_body("server_error", "Internal server error."), status=500)

    if isinstance(exc, drf_exceptions.ValidationError):
        fields = exc.detail if isinstance(exc.detail, dict) else {"non_field_errors": exc.detail}
        response.data = _body("validation_error", _flatten(fields), fields=fields)
    else:
        codes = exc.get_codes() if isinstance(exc, drf_exceptions.APIException) else "error"
        if isinstance(codes, dict):  # simplejwt puts its own code beside the detail
            codes = codes.get("code", "error")
        code = codes if isinstance(codes, str) else "error"
        response.data = _body(code, _flatten(response.data.get("detail", response.data)))
    return response


def _is_api(request) -> bool:
    return request.path.startswith("/api/")


def json_not_found(request, exception=None):
    """Django's handler404: JSON under /api/, the usual page elsewhere (the admin)."""
    if _is_api(request):
        return JsonResponse(_body("not_found", "Not found."), status=404)
    from django.views.defaults import page_not_found

    return page_not_found(request, exception)


def json_server_error(request):
    if _is_api(request):
        return JsonResponse(_body("server_error", "Internal server error."), status=500)
    from django.views.defaults import server_error

    return server_error(request)
