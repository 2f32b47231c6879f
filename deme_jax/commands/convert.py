"""``deme convert SRC DST``: diffusers directory or training workdir -> orbax export, orbax export ->
diffusers directory, PyTorch pickle -> safetensors."""

from deme_jax.interop import convert


def add_arguments(parser) -> None:
    parser.add_argument("src")
    parser.add_argument("dst")


def run(args) -> None:
    print(f"wrote {convert(args.src, args.dst)}")
