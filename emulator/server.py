"""The emulator's HTTP server: a WSGI app over the route table, served by werkzeug in a thread."""

from __future__ import annotations

import logging
import threading

from werkzeug.exceptions import HTTPException, MethodNotAllowed, NotFound
from werkzeug.serving import WSGIRequestHandler, make_server
from werkzeug.wrappers import Request

from .config import EmulatorConfig
from .events import JobEventPublisher
from .exceptions import BedrockError, InternalServerException, ValidationException
from .metrics import MetricsPublisher
from .responses import BedrockResponses, error_response, not_found
from .state import EmulatorServerState
from .urls import url_map

log = logging.getLogger("emulator")


class EmulatorApp:
    """WSGI application: route, call the handler, turn BedrockError into an AWS error body."""

    def __init__(self, state: EmulatorServerState):
        self.state = state
        self.responses = BedrockResponses(state)

    def __call__(self, environ, start_response):
        request = Request(environ)
        adapter = url_map.bind_to_environ(environ)
        try:
            endpoint, args = adapter.match()
            response = getattr(self.responses, endpoint)(request, **args)
        except BedrockError as error:
            response = error_response(error)
        except MethodNotAllowed:
            response = error_response(ValidationException(f"{request.method} not allowed here"))
        except NotFound:
            response = error_response(not_found(request.path))
        except HTTPException as exc:
            response = exc.get_response()
        except Exception as exc:  # noqa: BLE001 - answer 500 like AWS, keep serving
            log.exception("emulator handler crashed")
            response = error_response(InternalServerException(f"Internal error: {exc}"))
        return response(environ, start_response)


class _QuietHandler(WSGIRequestHandler):
    def log_request(self, *args, **kwargs):
        log.debug("%s %s", self.command, self.path)


class EmulatorServer:
    """Bedrock emulator on host:port (0 picks a free port), with its metrics and events."""

    def __init__(
        self,
        config: EmulatorConfig,
        *,
        s3_endpoint_url: str | None,
        cloudwatch_endpoint_url: str | None,
        events_endpoint_url: str | None = None,
        region: str = "us-east-1",
        host: str = "127.0.0.1",
        port: int = 0,
    ):
        self.state = EmulatorServerState(config, s3_endpoint_url, region)
        self._server = make_server(
            host, port, EmulatorApp(self.state), threaded=True, request_handler=_QuietHandler
        )
        self.host, self.port = self._server.server_address[:2]
        self.metrics = MetricsPublisher(self.state, cloudwatch_endpoint_url, region)
        # Job state change events go to EventBridge only when an endpoint is given.
        self.events: JobEventPublisher | None = None
        if events_endpoint_url:
            self.events = JobEventPublisher(events_endpoint_url, region, config.account_id)
            self.state.status_listeners.append(self.events.job_changed)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """Base URL of the emulator."""
        return f"http://{self.host}:{self.port}"

    def start(self) -> EmulatorServer:
        """Serve in a daemon thread and start publishing metrics and events."""
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="bedrock-emulator", daemon=True
        )
        self._thread.start()
        self.metrics.start()
        if self.events:
            self.events.start()
        return self

    def stop(self) -> None:
        """Stop serving and publishing."""
        self.metrics.stop()
        if self.events:
            self.events.stop()
        self._server.shutdown()
        self._server.server_close()
        if self._thread:
            self._thread.join(timeout=5)
