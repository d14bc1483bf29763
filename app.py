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
    from rlr_core.backends.loading import ModelLoadError
    from rlr_core.feedback.encoders import EncoderError

    try:
        demo, services = create_app(config)
    except (ModelLoadError, EncoderError) as err:
        raise SystemExit(_exit_line("error: " + " ".join(str(err).split()))) from None
    print(f"model: {config.model}\n  {services.model.device_summary()}")
    backend = services.base_backend
    if backend.device.type == "cpu" and not backend.cpu_sized:
        note = f" (--dtype {config.dtype} applies on CUDA only)" if config.dtype in ("fp16", "bf16") else ""
        print(f"warning: running {backend.name} on a CPU in fp32{note}: expect minutes per batch of images "
              "and hours per training round; use a CUDA GPU (--device cuda) for real work")
    print(f"reward proxy features: {services.rounds.image_encoder.name} ({services.rounds.image_encoder.dim}-d)")
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
    services.rounds.warm_up()  # the training process, started while the person rates (CPU only)
    try:
        demo.block_thread()
    finally:
        services.close()
    return 0


def _exit_line(message: str) -> int:
    """Print the one-line message to stderr and give exit code 2 (as argparse does for bad flags)."""
    import sys

    print(message, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
