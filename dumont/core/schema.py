def strip_trailing_slashes(result, generator, request, public):
    """The routes accept an optional trailing slash; document them the way the README writes them."""
    result["paths"] = {path.rstrip("/") or path: item for path, item in result["paths"].items()}
    return result


# Every error answer has this shape (dumont.core.errors); `fields` only for validation errors.
_ERROR = {
    "type": "object",
    "properties": {
        "error": {"type": "string", "description": "a code: validation_error, not_found, throttled, ..."},
        "detail": {"type": "string", "description": "what went wrong, for a person"},
        "fields": {"type": "object", "additionalProperties": True, "description": "validation errors by field"},
    },
    "required": ["error", "detail"],
    "additionalProperties": True,
}


def _error(description: str) -> dict:
    return {"description": description, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}


def document_errors(result, generator, request, public):
    """The 4xx answers each operation can give, in the one error shape: 400 (bad input), 401 (no or a
    bad token, where one is needed), 403 (operators' routes), 404 (an id in the path or the body that is
    not yours or not there, a page past the last), 405, 409 (a state that does not allow it, for
    changes), 429 (rate limit; with Retry-After)."""
    result.setdefault("components", {}).setdefault("schemas", {})["Error"] = _ERROR
    for path, item in result["paths"].items():
        for method, operation in item.items():
            if method not in {"get", "post", "put", "patch", "delete"}:
                continue
            responses = operation.setdefault("responses", {})
            wanted = {"400": "Invalid input.", "404": "Not found (or not yours), or a page past the last.",
                      "405": "Method not allowed.", "429": "Too many requests: wait Retry-After seconds."}
            if operation.get("security") and {} not in operation["security"]:
                wanted["401"] = "Not authenticated."
                wanted["403"] = "Not allowed (operators only)."
            if method != "get":
                wanted["409"] = "Conflict with the object's current state."
            if path.endswith("/auth/login") or path.endswith("/auth/refresh"):
                wanted["401"] = "Wrong credentials or token."
            for status, description in wanted.items():
                responses.setdefault(status, _error(description))
    return result
