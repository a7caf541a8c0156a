"""ASGI entry point: ``vx11site.asgi:application``.

Proxy paths go to the lean handler (``gateway.edge.proxy.ProxyApp``); everything
else — management API, admin, docs, metrics — to Django. WebSockets go through
channels.
"""

from __future__ import annotations

import os

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "vx11site.settings")

from django.core.asgi import get_asgi_application

django_app = get_asgi_application()

from gateway.startup import build_application  # noqa: E402

application = build_application(django_app)
