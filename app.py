"""Start the RLR feedback app: ``python app.py --help`` lists the options."""

from __future__ import annotations

from app.config import parse_args


def main(argv: list[str] | None = None) -> None:
    config = parse_args(argv)  # before the heavy imports: --help and flag errors answer at once
    import torch

    # One torch thread by default: generation and training then leave a core to the UI threads.
    torch.set_num_threads(config.threads)
    from app.ui import create_app, launch_kwargs

    demo, services = create_app(config)
    print(f"model: {config.model}\n  {services.device_summary()}")
    print(f"data: {config.data_dir.resolve()}")
    print(f"open http://{config.host}:{config.port}/ in a browser (API docs: the 'Use via API' link)")
    demo.launch(server_name=config.host, server_port=config.port, share=config.share,
                **launch_kwargs(services))


if __name__ == "__main__":
    main()
