from rest_framework.routers import SimpleRouter


class Router(SimpleRouter):
    """Routes as the API documents them (`/api/v1/instances/7`), a trailing slash tolerated. Ids are
    numbers: anything else in their place is a 404 before any view runs (never an int() that fails)."""

    def __init__(self):
        super().__init__()
        self.trailing_slash = "/?"

    def get_lookup_regex(self, viewset, lookup_prefix=""):
        if not hasattr(viewset, "lookup_value_regex"):
            viewset.lookup_value_regex = "[0-9]{1,18}"
        return super().get_lookup_regex(viewset, lookup_prefix)
