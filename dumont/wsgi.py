"""The web process's WSGI entry point (gunicorn): Django, except the agents' heartbeats.

`POST /api/v1/agent/status` is nearly all the traffic: it goes to a bare WSGI callable
(agent.api.wsgi) that answers exactly as the Django view does, without Django's request, middleware
and URL resolving; everything else, and whatever that callable leaves to Django, goes to Django.
"""

import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "dumont.settings")
django_application = get_wsgi_application()

from agent.api.wsgi import heartbeat_application  # noqa: E402 (needs the apps loaded)
from agent.daemon.dumont_agent import STATUS_PATH  # noqa: E402


def application(environ, start_response):
    if environ.get("PATH_INFO") == STATUS_PATH and environ.get("REQUEST_METHOD") == "POST":
        return heartbeat_application(environ, start_response, django_application)
    return django_application(environ, start_response)
