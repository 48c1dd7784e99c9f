"""Serve a controller's admin API through a real uvicorn on a free port, in a thread (tests)."""

from __future__ import annotations

import threading
import time

import uvicorn

from controller.api.app import create_app
from controller.runtime import Controller
from ratepilot.servers import free_port


class ApiServer:
    """uvicorn in a background thread; the controller's loop is not started (tests tick by hand)."""

    def __init__(self, controller: Controller):
        self.port = free_port()
        config = uvicorn.Config(create_app(controller, manage_lifecycle=False), host="127.0.0.1", port=self.port,
                                log_level="warning", access_log=False)  # fmt: skip
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        """Base URL."""
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> ApiServer:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
