"""Start the RLR feedback app: ``python app.py --help`` lists the options."""

from __future__ import annotations

import sys

from app.config import ConfigError, check_port, parse_args, port_in_use


def main(argv: list[str] | None = None) -> int:
    try:  # before the heavy imports: --help and setting errors answer at once
        config = parse_args(argv)
        check_port(config.host, config.port)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    import torch

    # One torch thread by default: generation and training then leave a core to the UI threads.
    torch.set_num_threads(config.threads)
    from app.ui import create_app, launch_kwargs

    demo, services = create_app(config)
    print(f"model: {config.model}\n  {services.device_summary()}")
    print(f"data: {config.data_dir.resolve()}")
    try:
        # quiet: Gradio's own banner advises `share=True` in `launch()`; this app's switch is --share.
        _, local_url, share_url = demo.launch(server_name=config.host, server_port=config.port, share=config.share,
                                              quiet=True, prevent_thread_lock=True, **launch_kwargs(services))
    except OSError as err:
        if "Cannot find empty port" not in str(err):  # taken since check_port looked
            raise
        services.close()
        print(f"error: {port_in_use(config.host, config.port)}", file=sys.stderr)
        return 2
    print(f"open {local_url} in a browser (API docs: the 'Use via API' link at the bottom of the page)")
    if config.share:
        print(f"public link: {share_url} (model changes need the admin password)" if share_url
              else "no public link: Gradio could not make one (see its message above)")
    else:
        print("for a public link, start it with --share (model changes then need RLR_ADMIN_PASSWORD)")
    print("stop it with Ctrl+C")
    try:
        demo.block_thread()
    finally:
        services.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
