"""Start the app inside this process and stop it again: for tests, benchmarks and notebooks.

    with serve(AppConfig(data_dir=tmp)) as running:
        Client(running.url) ...
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator
from dataclasses import dataclass

import gradio as gr

from app.config import AppConfig
from app.services import AppServices
from app.ui import create_app, launch_kwargs
from rlr_core.backends.base import DiffusionBackend


@dataclass
class RunningApp:
    demo: gr.Blocks
    services: AppServices
    url: str

    def close(self) -> None:
        self.demo.close()
        self.services.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(config: AppConfig, backend: DiffusionBackend | None = None) -> RunningApp:
    demo, services = create_app(config, backend)
    port = config.port if config.port else free_port()
    _, url, _ = demo.launch(server_name=config.host, server_port=port, prevent_thread_lock=True, quiet=True,
                            **launch_kwargs(services))
    return RunningApp(demo, services, url)


@contextlib.contextmanager
def serve(config: AppConfig, backend: DiffusionBackend | None = None) -> Iterator[RunningApp]:
    running = start(config, backend)
    try:
        yield running
    finally:
        running.close()
