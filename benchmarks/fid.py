"""FID Inception features per second against pytorch-fid, and sampling + scoring 1,000 MNIST digits.

    python benchmarks/fid.py [--images 500] [--batch 50] [--samples 1000]

Both Inceptions see the same uint8 digits (resized to 299x299 inside the
network, as pytorch-fid does) in batches of ``--batch``: pytorch-fid's
``InceptionV3([2048])`` in eager PyTorch (its architecture built offline with
random weights: the compute is the weights'), ours jitted (timed after the
compiling call). Then the whole `deme evaluate` path on the demo's 16x16 MNIST
model: DDIM-50 sampling of ``--samples`` images plus FID and FD-MNIST against
the 500 held-out digits. Results: ``benchmarks/results/fid-<platform>.json``.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.unet_ddim import machine  # noqa: E402
from deme_jax.xla_cpu import use_all_cores_for_convolutions  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--samples", type=int, default=1_000)
    parser.add_argument("--model", help="the 16x16 MNIST DDPM (default: the shipped one; random weights if absent)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    flag = use_all_cores_for_convolutions()

    import jax
    import numpy as np
    import torch

    from deme_jax.assets import MNIST16_DDPM
    from deme_jax.data import reference_images
    from deme_jax.defaults import data_config, mnist_deme_config
    from deme_jax.diffusion import make_schedule, sample_images
    from deme_jax.interop import load_model
    from deme_jax.metrics import load_inception
    from deme_jax.metrics.scoring import Scorer
    from deme_jax.models import build_model, init_params
    from tests.test_fid import fid_inception_module, pytorch_fid_model

    torch.set_num_threads(os.cpu_count())
    data = data_config()
    data.image_size = 16
    digits = reference_images("train", data, args.images)
    rgb = np.repeat(digits, 3, axis=-1)
    results = {}

    ours = load_inception(batch_size=args.batch)
    ours(rgb[:args.batch])  # compiles
    start = time.perf_counter()
    ours(rgb)
    results["inception_jax_images_per_s"] = args.images / (time.perf_counter() - start)

    reference = pytorch_fid_model(fid_inception_module(seed=0)).eval()
    batch = torch.from_numpy(rgb).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        reference(batch[:args.batch])
        start = time.perf_counter()
        for i in range(0, args.images, args.batch):
            reference(batch[i:i + args.batch])
    results["inception_pytorch_fid_images_per_s"] = args.images / (time.perf_counter() - start)
    results["inception_speedup"] = results["inception_jax_images_per_s"] / results["inception_pytorch_fid_images_per_s"]
    print(f"Inception: ours {results['inception_jax_images_per_s']:.1f} images/s, pytorch-fid "
          f"{results['inception_pytorch_fid_images_per_s']:.1f} images/s", flush=True)

    config = mnist_deme_config()
    model_path = args.model or (str(MNIST16_DDPM) if MNIST16_DDPM.exists() else None)
    if model_path:
        model, params = load_model(model_path)
    else:
        from configs import mnist16_pretrain

        model = build_model(mnist16_pretrain.get_config().model)
        params = init_params(model, jax.random.key(0))
    config.evaluate.update(dict(num_samples=args.samples, metrics=("fid", "fd_mnist"), num_reference=500))
    start = time.perf_counter()
    scorer = Scorer(config.evaluate, config.data)
    results["reference_features_s"] = time.perf_counter() - start
    start = time.perf_counter()
    images = sample_images(model, params, make_schedule(), args.samples, (16, 16, 1), jax.random.key(0), batch_size=250,
                           ddim_steps=50)
    results["sample_s"] = time.perf_counter() - start
    start = time.perf_counter()
    scores = scorer.score(images)
    results["score_s"] = time.perf_counter() - start
    results["sample_and_score_s"] = results["sample_s"] + results["score_s"]
    print(f"{args.samples} MNIST samples: DDIM-50 {results['sample_s']:.1f} s (compilation included), FID + "
          f"FD-MNIST {results['score_s']:.1f} s; scores {scores}", flush=True)

    record = {
        "benchmark": "fid",
        "settings": {"images": args.images, "batch": args.batch, "samples": args.samples,
                     "model": model_path or "mnist16 architecture, random weights"},
        "machine": machine(),
        "versions": {"jax": jax.__version__, "jaxlib": importlib.metadata.version("jaxlib"),
                     "torch": torch.__version__, "pytorch_fid": importlib.metadata.version("pytorch-fid")},
        "xla_cpu_convolution_flag": flag,
        "results": results,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"fid-{jax.devices()[0].platform}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
