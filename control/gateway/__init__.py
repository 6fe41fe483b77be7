"""An OpenAI-compatible HTTP gateway in front of Drover: ``drover gateway``.

OpenAI clients (``openai.OpenAI(base_url="http://127.0.0.1:8000/v1")``) talk to it; it submits every
request over NATS like any Drover client. See docs/operators.md.
"""

from control.gateway.app import create_app
from control.gateway.server import GatewayThread, serve
from control.gateway.settings import ApiKeySettings, GatewaySettings

__all__ = ["ApiKeySettings", "GatewaySettings", "GatewayThread", "create_app", "serve"]
