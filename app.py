"""Start the RLR feedback app: ``python app.py --help`` lists the options."""

from __future__ import annotations

from app.config import parse_args


def main(argv: list[str] | None = None) -> None:
    config = parse_args(argv)  # before the heavy imports: --help and flag errors answer at once
    import torch

    # One torch thread by default: generation and training then leave a core to the UI threads.
    torch.set_num_threads(config.threads)
    from app.ui import create_app, launch_kwargs
    from rlr_core.backends.builtin import BuiltinBackend
    from rlr_core.backends.loading import ModelLoadError
    from rlr_core.feedback.encoders import EncoderError

    try:
        demo, services = create_app(config)
    except (ModelLoadError, EncoderError) as err:
        raise SystemExit(_exit_line("error: " + " ".join(str(err).split()))) from None
    print(f"model: {config.model}\n  {services.device_summary()}")
    backend = services.base_backend
    if backend.device.type == "cpu" and not isinstance(backend, BuiltinBackend):
        note = f" (--dtype {config.dtype} applies on CUDA only)" if config.dtype in ("fp16", "bf16") else ""
        print(f"warning: running {backend.name} on a CPU in fp32{note}: expect minutes per batch of images "
              "and hours per training round; use a CUDA GPU (--device cuda) for real work")
    print(f"reward proxy features: {services.rounds.image_encoder.name} ({services.rounds.image_encoder.dim}-d)")
    print(f"data: {config.data_dir.resolve()}")
    print(f"open http://{config.host}:{config.port}/ in a browser (API docs: the 'Use via API' link)")
    demo.launch(server_name=config.host, server_port=config.port, share=config.share,
                **launch_kwargs(services))


def _exit_line(message: str) -> int:
    """Print the one-line message to stderr and give exit code 2 (as argparse does for bad flags)."""
    import sys

    print(message, file=sys.stderr)
    return 2


if __name__ == "__main__":
    main()
