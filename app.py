"""Start the RLR feedback app: ``python app.py --help`` lists the options."""

from __future__ import annotations

import torch

from app.config import parse_args
from app.ui import CSS, build_ui
from rlr_core.backend import BuiltinBackend


def main(argv: list[str] | None = None) -> None:
    config = parse_args(argv)
    backend = BuiltinBackend.load(config.model, device=config.device)
    demo = build_ui(backend)
    print(f"model: {config.model} ({backend.name}) on {config.device}, torch threads {torch.get_num_threads()}")
    print(f"data: {config.data_dir.resolve()}")
    demo.queue(default_concurrency_limit=1).launch(
        server_name=config.host, server_port=config.port, share=config.share, css=CSS,
    )


if __name__ == "__main__":
    main()
