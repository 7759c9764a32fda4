from rest_framework.routers import SimpleRouter


class Router(SimpleRouter):
    """Routes as the API documents them (`/api/v1/instances/7`), a trailing slash tolerated."""

    def __init__(self):
        super().__init__()
        self.trailing_slash = "/?"
