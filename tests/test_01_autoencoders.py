"""Tests for 01_autoencoders: shapes, the identities the README derives, the plumbing helpers (owned
by autoencoder.py), smoke runs of every script, and learning checks (marked slow) on real MNIST."""

import gzip
import hashlib
import io
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torch.distributions import MultivariateNormal, Normal, kl_divergence

from conftest import ROOT, load_script

AE = load_script("01_autoencoders/autoencoder.py")
SPARSE = load_script("01_autoencoders/sparse_autoencoder.py")
DAE = load_script("01_autoencoders/denoising_autoencoder.py")
VAE = load_script("01_autoencoders/vae.py")
BVAE = load_script("01_autoencoders/beta_vae.py")
HVAE = load_script("01_autoencoders/hvae.py")


def tiny_args(data_dir, out_dir, *extra):
    return ["--steps", "2", "--device", "cpu", "--data-dir", str(data_dir), "--out-dir", str(out_dir), *extra]


def check_outputs(out_dir, *extra_files):
    for name in ("ckpt.pt", "samples.png", "samples.npz", *extra_files):
        assert (out_dir / name).exists(), f"{name} was not written"
    images = np.load(out_dir / "samples.npz")["images"]
    assert images.dtype == np.uint8 and images.shape[1:] == (1, 28, 28)
    return images


# --- autoencoder.py: the model ---


def test_autoencoder_shapes():
    model = AE.Autoencoder(hidden=32, latent_dim=20)
    x = torch.rand(5, 1, 28, 28)
    z = model.encode(x)
    assert z.shape == (5, 20)
    assert model.decode(z).shape == (5, 1, 28, 28)
    assert model.loss(x).shape == ()
    assert model.sample(7).shape == (7, 1, 28, 28)


def test_autoencoder_loss_is_summed_squared_error():
    # With every decoder weight zero, x_hat = sigmoid(b) for the last bias b: Eq. 1.2 by hand.
    model = AE.Autoencoder(hidden=16, latent_dim=4)
    for p in model.decoder.parameters():
        torch.nn.init.zeros_(p)
    b = torch.randn(784)
    model.decoder[4].bias.data.copy_(b)
    x = torch.rand(3, 1, 28, 28)
    expected = ((torch.sigmoid(b) - x.view(3, 784)) ** 2).sum(1).mean()
    assert torch.allclose(model.loss(x), expected)


def test_code_gaussian_matches_code_moments():
    torch.manual_seed(0)
    model = AE.Autoencoder(hidden=16, latent_dim=3)
    x = torch.rand(500, 1, 28, 28)
    model.fit_code_gaussian(x)
    z = model.encode(x).detach().double().numpy()
    chol = model.code_chol.double()
    assert np.allclose(model.code_mean.double().numpy(), z.mean(0), atol=1e-5)
    assert np.allclose((chol @ chol.T).numpy(), np.cov(z.T), atol=1e-4)


def principal_angles(a, b):
    """Principal angles (degrees) between the column spaces of a and b, computed independently of
    the script: orthonormalize both with numpy's QR, then the singular values are the cosines."""
    qa, _ = np.linalg.qr(a)
    qb, _ = np.linalg.qr(b)
    return np.degrees(np.arccos(np.clip(np.linalg.svd(qa.T @ qb, compute_uv=False), -1, 1)))


def test_linear_autoencoder_spans_the_pca_subspace():
    # Data with a known top-3 principal subspace: 3 strong directions plus weak isotropic noise.
    g = torch.Generator().manual_seed(0)
    basis, _ = torch.linalg.qr(torch.randn(784, 3, generator=g))
    x = (torch.randn(2000, 3, generator=g) * torch.tensor([3.0, 2.0, 1.5])) @ basis.T
    x = (x + 0.1 * torch.randn(2000, 784, generator=g) + 0.5).view(-1, 1, 28, 28)
    torch.manual_seed(0)
    model = AE.Autoencoder(hidden=16, latent_dim=3, linear=True)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    before = AE.pca_angle(model, x)
    for _ in range(1000):
        optimizer.zero_grad()
        model.loss(x[torch.randint(2000, (256,), generator=g)]).backward()
        optimizer.step()
    # Eq. 1.3: the decoder's column space W3 W2 W1 is the top-3 principal subspace.
    decoder_map = (model.decoder[4].weight @ model.decoder[2].weight @ model.decoder[0].weight).detach().double().numpy()
    _, eigenvectors = np.linalg.eigh(np.cov(x.view(2000, 784).double().numpy().T))
    angles = principal_angles(decoder_map, eigenvectors[:, -3:])  # top 3 principal directions of the sample
    assert before > 45, "an untrained linear autoencoder should not already span the subspace"
    assert angles.max() < 3, f"principal angles {angles} degrees"
    assert abs(AE.pca_angle(model, x) - angles.max()) < 0.05  # the script's own measure agrees


# --- plumbing (owned by autoencoder.py) ---


def test_load_mnist_reads_gzipped_and_raw(tiny_mnist):
    x_train, y_train = AE.load_mnist(tiny_mnist, train=True)  # gzipped files
    x_test, y_test = AE.load_mnist(tiny_mnist, train=False)  # raw files
    assert x_train.shape == (400, 28, 28) and x_train.dtype == torch.uint8
    assert y_train.shape == (400,) and y_train.dtype == torch.int64 and 0 <= y_train.min() and y_train.max() <= 9
    assert x_test.shape == (200, 28, 28) and y_test.shape == (200,)


def copy_mnist(src, dst):
    (dst / "mnist").mkdir(parents=True)
    for f in (src / "mnist").iterdir():
        (dst / "mnist" / f.name).write_bytes(f.read_bytes())
    return dst / "mnist"


def test_load_mnist_rejects_truncated_and_wrong_files(tiny_mnist, tmp_path):
    folder = copy_mnist(tiny_mnist, tmp_path)
    raw = folder / "t10k-images-idx3-ubyte"
    raw.write_bytes(raw.read_bytes()[:-100])  # truncated
    with pytest.raises(SystemExit, match="t10k-images-idx3-ubyte.*truncated"):
        AE.load_mnist(tmp_path, train=False)
    raw.write_bytes(b"\x00\x00\x08\x01" + raw.read_bytes()[4:])  # a labels magic number in an images file
    with pytest.raises(SystemExit, match="magic number 2051"):
        AE.load_mnist(tmp_path, train=False)
    gz = folder / "train-images-idx3-ubyte.gz"
    gz.write_bytes(gz.read_bytes()[:200])  # a cut-off download
    with pytest.raises(SystemExit, match="train-images-idx3-ubyte.gz"):
        AE.load_mnist(tmp_path, train=True)


def test_load_mnist_offline_names_the_four_files(tmp_path, monkeypatch):
    def offline(url, timeout):
        raise OSError("network unreachable")
    monkeypatch.setattr(AE.urllib.request, "urlopen", offline)
    with pytest.raises(SystemExit) as error:
        AE.load_mnist(tmp_path, train=True)
    message = str(error.value)
    assert all(name + ".gz" in message for name in AE.MNIST_FILES) and str(tmp_path / "mnist") in message


def test_load_mnist_download_checks_md5_and_caches(tiny_mnist, tmp_path, monkeypatch):
    served = {name: gzip.compress(gzip.decompress((tiny_mnist / "mnist" / f"{name}.gz").read_bytes()))
              for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte")}
    calls = []

    def fake_urlopen(url, timeout):
        calls.append(url)
        name = url.rsplit("/", 1)[1].removesuffix(".gz")
        data = served[name] if not url.startswith(AE.MNIST_MIRRORS[0]) else b"corrupt mirror"
        return io.BytesIO(data)
    monkeypatch.setattr(AE.urllib.request, "urlopen", fake_urlopen)
    for name, data in served.items():
        _, magic, shape = AE.MNIST_FILES[name]
        monkeypatch.setitem(AE.MNIST_FILES, name, (hashlib.md5(data).hexdigest(), magic, shape))
    x, y = AE.load_mnist(tmp_path, train=True)  # first mirror fails its MD5, the second is used
    assert x.shape == (400, 28, 28) and len(calls) == 4
    assert sorted(f.name for f in (tmp_path / "mnist").iterdir()) == ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"]
    AE.load_mnist(tmp_path, train=True)
    assert len(calls) == 4, "cached files are not downloaded again"


def test_parse_config_flags_and_errors(capsys):
    cfg = AE.parse_config(AE.Config, ["--batch-size", "7", "--linear", "--lr", "0.01", "--device", "cpu"])
    assert (cfg.batch_size, cfg.linear, cfg.lr, cfg.device) == (7, True, 0.01, "cpu")
    assert AE.parse_config(AE.Config, ["--no-amp"]).amp is False
    for bad in (["--steps", "-1"], ["--lr", "0"], ["--device", "gpu"], ["--batch-size", "x"]):
        with pytest.raises(SystemExit) as error:
            AE.parse_config(AE.Config, bad)
        assert error.value.code == 2
    capsys.readouterr()
    with pytest.raises(SystemExit):
        AE.parse_config(AE.Config, ["--help"])
    assert "size of the code z" in capsys.readouterr().out  # the field's comment is its help


def test_pick_device():
    assert AE.pick_device("cpu") == torch.device("cpu")
    assert AE.pick_device("auto").type in ("cpu", "cuda", "mps")
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="CUDA is not available"):
            AE.pick_device("cuda")


def test_checkpoint_round_trip_is_atomic(tmp_path):
    state = {"model": {"w": torch.arange(3.0)}, "step": 5, "config": {"lr": 0.1}}
    AE.save_checkpoint(tmp_path / "ckpt.pt", state)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]  # no temporary file left behind
    loaded = AE.load_checkpoint(tmp_path / "ckpt.pt")
    assert loaded["step"] == 5 and torch.equal(loaded["model"]["w"], state["model"]["w"])
    with pytest.raises(SystemExit, match="no checkpoint"):
        AE.load_checkpoint(tmp_path / "missing.pt")


def test_save_grid_layout(tmp_path):
    AE.save_grid(torch.rand(10, 1, 28, 28), tmp_path / "g.png", nrow=4, scale=1)
    assert Image.open(tmp_path / "g.png").size == (4 * 30 + 2, 3 * 30 + 2)
    AE.save_grid(torch.rand(2, 3, 8, 8), tmp_path / "c.png", nrow=8, scale=2)
    assert Image.open(tmp_path / "c.png").mode == "RGB"


# --- autoencoder.py: runs ---


def test_autoencoder_smoke_resume_and_sample_only(tiny_mnist, tmp_path):
    result = AE.main(tiny_args(tiny_mnist, tmp_path, "--hidden", "16", "--num-samples", "10"))
    assert result["step"] == 2 and math.isfinite(result["test_mse"])
    assert check_outputs(tmp_path, "reconstructions.png").shape[0] == 10
    assert AE.main(tiny_args(tiny_mnist, tmp_path, "--hidden", "16", "--steps", "4", "--resume"))["step"] == 4
    assert AE.main(tiny_args(tiny_mnist, tmp_path, "--hidden", "16", "--sample-only"))["step"] == 4


def test_autoencoder_ctrl_c_saves_and_nan_stops(tiny_mnist, tmp_path, monkeypatch):
    original = AE.Autoencoder.loss
    calls = []

    def interrupted(self, x):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(self, x)
    monkeypatch.setattr(AE.Autoencoder, "loss", interrupted)
    with pytest.raises(SystemExit, match="interrupted at step 2"):
        AE.main(tiny_args(tiny_mnist, tmp_path, "--hidden", "16", "--steps", "10"))
    assert AE.load_checkpoint(tmp_path / "ckpt.pt")["step"] == 2
    monkeypatch.setattr(AE.Autoencoder, "loss", lambda self, x: original(self, x) * float("nan"))
    with pytest.raises(SystemExit, match="loss is nan"):
        AE.main(tiny_args(tiny_mnist, tmp_path, "--hidden", "16", "--steps", "10", "--resume"))
    assert AE.load_checkpoint(tmp_path / "ckpt.pt")["step"] == 2  # the last good checkpoint is kept


def test_autoencoder_runs_as_a_program(tiny_mnist, tmp_path):
    script = ROOT / "01_autoencoders" / "autoencoder.py"
    done = subprocess.run([sys.executable, str(script), *tiny_args(tiny_mnist, tmp_path, "--hidden", "16", "--linear")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "principal angle" in done.stdout
    bad = subprocess.run([sys.executable, str(script), "--data-dir", str(tmp_path / "empty"), "--steps", "1"],
                         capture_output=True, text=True, timeout=120,
                         env={"http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9"})  # offline
    assert bad.returncode != 0 and "Traceback" not in bad.stderr


# --- learning checks (real MNIST) ---


@pytest.mark.slow
def test_autoencoder_learns(mnist_dir, tmp_path):
    # Test squared error per image after 600 steps (hidden 256), seeds 0, 1, 2:
    # 18.42, 17.71, 17.87 (untrained: 181.5), about 5 s each on the 2-core CPU.
    # Threshold: the worst seed plus a margin. An untrained network scores far above it.
    threshold = 20.0
    cfg = AE.Config(seed=0, device="cpu", data_dir=mnist_dir, out_dir=str(tmp_path), hidden=256,
                    steps=600, log_every=10_000, num_samples=64)
    untrained = AE.train(AE.Config(**{**cfg.__dict__, "steps": 0}))["test_mse"]
    trained = AE.train(cfg)["test_mse"]
    assert untrained > threshold, f"the untrained model already passes ({untrained:.1f})"
    assert trained < threshold, f"test squared error {trained:.1f} per image, threshold {threshold}"


# --- sparse_autoencoder.py ---


def hand_bernoulli_kl(p, q):
    """KL(Bernoulli(p) || Bernoulli(q)) as the sum over the two outcomes, in float64 numpy."""
    p, q = np.float64(p), np.asarray(q, dtype=np.float64)
    return sum(pb * np.log(pb / qb) for pb, qb in ((p, q), (1 - p, 1 - q)))


def codes_with_means(q, batch=6, spread=0.02, seed=0):
    """A (batch, K) code whose column means are exactly q, with rows that differ (+-spread)."""
    g = torch.Generator().manual_seed(seed)
    sign = torch.tensor([1.0, -1.0]).repeat(batch // 2)[:, None]  # mean zero down each column
    return q[None, :] + spread * sign * torch.rand(1, len(q), generator=g)


def test_sparse_autoencoder_shapes():
    model = SPARSE.SparseAutoencoder(latent_dim=40)
    x = torch.rand(5, 1, 28, 28)
    z = model.encode(x)
    assert z.shape == (5, 40) and 0 < z.min() and z.max() < 1
    assert model.decode(z).shape == (5, 1, 28, 28)
    loss, recon = model.loss(x)
    assert loss.shape == () and recon.shape == () and loss > recon > 0
    assert model.sample(7).shape == (7, 1, 28, 28)
    features = model.features(12)
    assert features.shape == (12, 1, 28, 28) and features.min() >= 0 and features.max() <= 1


def test_sparse_autoencoder_bernoulli_kl_zero_at_target_positive_elsewhere():
    rho = 0.05
    q = torch.tensor([0.001, 0.01, 0.04, 0.05, 0.06, 0.2, 0.5, 0.9, 0.999], dtype=torch.float64)
    kl = SPARSE.bernoulli_kl(rho, q).numpy()
    assert np.allclose(kl, hand_bernoulli_kl(rho, q.numpy()), rtol=1e-10, atol=1e-14)
    library = torch.distributions.kl_divergence(torch.distributions.Bernoulli(probs=torch.full_like(q, rho)),
                                                torch.distributions.Bernoulli(probs=q))
    assert np.allclose(kl, library.numpy(), rtol=1e-8)
    at_target = q.numpy() == rho
    assert abs(kl[at_target]).max() < 1e-12
    assert (kl[~at_target] > 1e-4).all()
    assert kl[0] > kl[1] > kl[2] and kl[4] < kl[5] < kl[6] < kl[7] < kl[8]  # grows away from rho


def test_sparse_autoencoder_penalty_averages_over_the_batch_first():
    # Eq. 2.6: beta sum_j KL(rho || rho_hat_j) with rho_hat_j the batch mean (Eq. 2.4), not a mean of
    # per-image KLs: codes whose every column averages to rho cost nothing, though no row equals rho.
    rho, beta = 0.05, 3.0
    model = SPARSE.SparseAutoencoder(latent_dim=8, penalty="kl", rho=rho, beta=beta)
    z = codes_with_means(torch.full((8,), rho))
    assert (z - rho).abs().min() > 1e-4
    assert abs(model.sparsity(z).item()) < 1e-6
    q = torch.tensor([0.01, 0.03, 0.05, 0.08, 0.1, 0.3, 0.6, 0.95])
    expected = beta * hand_bernoulli_kl(rho, q.double().numpy()).sum()
    assert math.isclose(model.sparsity(codes_with_means(q)).item(), expected, rel_tol=1e-5)


def test_sparse_autoencoder_kl_gradient_matches_closed_form():
    # Eq. 2.7: d/da_bj of beta sum_j KL(rho || rho_hat_j) = (beta / B) (-rho/rho_hat_j + (1-rho)/(1-rho_hat_j)) z_bj (1 - z_bj)
    torch.manual_seed(0)
    rho, beta, batch = 0.1, 2.5, 16
    model = SPARSE.SparseAutoencoder(latent_dim=10, penalty="kl", rho=rho, beta=beta)
    a = (torch.randn(batch, 10, dtype=torch.float64) - 1.0).requires_grad_()
    z = torch.sigmoid(a)
    grad, = torch.autograd.grad(model.sparsity(z), a)
    zd = z.detach().double()
    rho_hat = zd.mean(0)
    expected = beta / batch * (-rho / rho_hat + (1 - rho) / (1 - rho_hat)) * zd * (1 - zd)
    assert torch.allclose(grad.double(), expected, rtol=1e-4, atol=1e-9)


def test_sparse_autoencoder_l1_and_none_penalties():
    torch.manual_seed(0)
    z = torch.rand(6, 9)
    l1 = SPARSE.SparseAutoencoder(latent_dim=9, penalty="l1", lam=0.3)
    assert math.isclose(l1.sparsity(z).item(), 0.3 * z.double().sum().item() / 6, rel_tol=1e-6)  # Eq. 2.8
    assert SPARSE.SparseAutoencoder(latent_dim=9, penalty="none").sparsity(z).item() == 0.0


def test_sparse_autoencoder_evaluate_measures_sparsity():
    # With W1 = 0 every image gets the code z = sigmoid(b1): Eq. 2.10 by hand.
    model = SPARSE.SparseAutoencoder(latent_dim=6)
    torch.nn.init.zeros_(model.encoder.weight)
    b = torch.tensor([-3.0, -1.0, -0.2, 0.4, 2.0, -5.0])
    model.encoder.bias.data.copy_(b)
    x = torch.rand(30, 1, 28, 28)
    m = SPARSE.evaluate(model, x, batch_size=7)
    z = torch.sigmoid(b)
    x_hat = model.decode(z.expand(30, 6)).detach()
    assert math.isclose(m["mean_activation"], z.mean().item(), rel_tol=1e-5)
    assert math.isclose(m["frac_active"], 2 / 6)  # units 3 and 4 have z > 1/2 on every image
    assert m["never_active"] == 4
    assert math.isclose(m["test_mse"], (x_hat - x).pow(2).sum().item() / 30, rel_tol=1e-4)


def test_sparse_autoencoder_code_gaussian_matches_preactivation_moments():
    torch.manual_seed(0)
    model = SPARSE.SparseAutoencoder(latent_dim=5)
    x = torch.rand(500, 1, 28, 28)
    model.fit_code_gaussian(x)
    a = model.encoder(x.flatten(1)).detach().double().numpy()  # Eq. 2.9 is fitted to W1 x + b1
    chol = model.code_chol.double()
    assert np.allclose(model.code_mean.double().numpy(), a.mean(0), atol=1e-5)
    assert np.allclose((chol @ chol.T).numpy(), np.cov(a.T), atol=1e-4)


def test_sparse_autoencoder_smoke_run(tiny_mnist, tmp_path):
    args = ["--steps", "2", "--device", "cpu", "--data-dir", str(tiny_mnist), "--out-dir", str(tmp_path),
            "--latent-dim", "32", "--batch-size", "16", "--num-samples", "10"]
    result = SPARSE.main(args)
    for name in ("ckpt.pt", "samples.png", "samples.npz", "reconstructions.png", "features.png"):
        assert (tmp_path / name).exists(), f"{name} was not written"
    images = np.load(tmp_path / "samples.npz")["images"]
    assert images.dtype == np.uint8 and images.shape == (10, 1, 28, 28)
    assert result["step"] == 2 and set(result) >= {"test_mse", "mean_activation", "frac_active", "never_active"}
    assert SPARSE.main([*args, "--steps", "4", "--resume", "--penalty", "l1"])["step"] == 4
    assert SPARSE.main([*args, "--sample-only"])["step"] == 4


def test_sparse_autoencoder_rejects_bad_options(capsys):
    for bad in (["--penalty", "l2"], ["--rho", "1.5"], ["--rho", "0"], ["--beta", "-1"], ["--latent-dim", "0"]):
        with pytest.raises(SystemExit) as error:
            SPARSE.parse_config(SPARSE.Config, bad)
        assert error.value.code == 2
    assert "--penalty must be kl, l1 or none" in capsys.readouterr().err


@pytest.mark.slow
def test_sparse_autoencoder_learns_a_sparse_code(mnist_dir, tmp_path):
    # 1200 steps of the default model on real MNIST (about 15 s here). Measured on this 2-core CPU, seeds
    # 0, 1, 2: test squared error 25.73, 26.33, 25.93 per image; mean activation 0.0532, 0.0515, 0.0529.
    # Thresholds: worst seed plus a margin. The untrained model: 184.4 and 0.501.
    def run(steps, out):
        return SPARSE.main(["--steps", str(steps), "--device", "cpu", "--data-dir", str(mnist_dir), "--out-dir", str(out),
                       "--num-samples", "10", "--log-every", "100000", "--seed", "0"])

    def passes(m):
        return m["test_mse"] < 30.0 and m["mean_activation"] < 0.065

    trained = run(1200, tmp_path / "trained")
    assert passes(trained), trained
    assert abs(trained["mean_activation"] - 0.05) < 0.01  # the KL has pulled every unit's mean towards rho
    untrained = run(0, tmp_path / "untrained")
    assert not passes(untrained), untrained


# --- denoising_autoencoder.py ---


D = torch.distributions


def test_denoising_autoencoder_shapes():
    torch.manual_seed(0)
    model = DAE.DenoisingAutoencoder(DAE.Denoiser(hidden=32, latent_dim=8), "gaussian", sigma=0.5)
    x = torch.rand(5, 1, 28, 28)
    x_tilde = model.corrupt(x)
    x_hat = model(x_tilde)
    assert x_tilde.shape == x_hat.shape == model.score(x_tilde).shape == (5, 1, 28, 28)
    assert 0 <= x_hat.min() and x_hat.max() <= 1  # the sigmoid: E[x | x_tilde] lies in [0, 1] too
    assert model.loss(x).shape == ()
    assert model.sample(torch.rand(3, 1, 28, 28), steps=2).shape == (3, 1, 28, 28)
    with pytest.raises(ValueError):  # masking has no score interpretation (README section 3)
        DAE.DenoisingAutoencoder(DAE.Denoiser(32, 8), "mask").score(x_tilde)


def test_denoising_autoencoder_gaussian_noise_error_closed_form():
    """The noisy input's error ||x_tilde - x||^2 = sigma^2 chi^2_784: mean 784 sigma^2, variance
    2 * 784 sigma^4 per image. evaluate's second figure must match within 3 standard errors."""
    torch.manual_seed(0)
    sigma, n = 0.3, 200
    model = DAE.DenoisingAutoencoder(DAE.Denoiser(hidden=16, latent_dim=4), "gaussian", sigma)
    _, noisy = DAE.evaluate(model, torch.rand(n, 1, 28, 28), batch_size=64)
    se = sigma ** 2 * math.sqrt(2 * 784 / n)
    assert abs(noisy - 784 * sigma ** 2) < 3 * se, (noisy, 784 * sigma ** 2, se)
    x = torch.rand(n, 1, 28, 28)
    assert DAE.evaluate(model, x) == DAE.evaluate(model, x)  # one fixed corruption: figures compare across calls


def test_denoising_autoencoder_mask_zeroes_the_right_fraction():
    """Eq. 3.2: each pixel is zeroed with probability p, independently; the kept ones are untouched."""
    torch.manual_seed(0)
    p = 0.3
    model = DAE.DenoisingAutoencoder(nn.Identity(), "mask", mask_prob=p)
    x = 0.1 + torch.rand(64, 1, 28, 28)  # no pixel is 0 before masking
    x_tilde = model.corrupt(x)
    zeroed = x_tilde == 0
    n = x.numel()
    assert abs(zeroed.float().mean().item() - p) < 3 * math.sqrt(p * (1 - p) / n)
    assert torch.equal(x_tilde[~zeroed], x[~zeroed])
    per_image = zeroed.flatten(1).float().mean(1)  # a fresh mask per image, not one shared mask
    assert per_image.std() > 0


def mixture_2d(sigma=0.0):
    """A 2-D mixture of three correlated Gaussians, convolved with N(0, sigma^2 I): q_sigma (Eq. 3.5)."""
    pi = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    mu = torch.tensor([[-1.5, 0.0], [1.5, 0.5], [0.0, 2.0]], dtype=torch.float64)
    chol = torch.tensor([[[0.4, 0.0], [0.1, 0.2]], [[0.2, 0.0], [-0.1, 0.3]], [[0.3, 0.0], [0.0, 0.3]]],
                        dtype=torch.float64)
    cov = chol @ chol.mT
    q = D.MixtureSameFamily(D.Categorical(pi), D.MultivariateNormal(mu, cov + sigma ** 2 * torch.eye(2, dtype=torch.float64)))
    return pi, mu, cov, q


def posterior_mean(x_tilde, sigma):
    """E[x | x_tilde] by Bayes, component by component, with no score in sight: the posterior is a
    mixture with weights w_k ∝ pi_k N(x_tilde; mu_k, S_k), S_k = cov_k + sigma^2 I, and means
    mu_k + cov_k S_k^-1 (x_tilde - mu_k)."""
    pi, mu, cov, _ = mixture_2d()
    S = cov + sigma ** 2 * torch.eye(2, dtype=torch.float64)
    w = (pi.log() + D.MultivariateNormal(mu, S).log_prob(x_tilde[:, None])).softmax(1)  # (N, K)
    means = mu + ((cov @ torch.linalg.inv(S)) @ (x_tilde[:, None] - mu)[..., None])[..., 0]  # (N, K, 2)
    return (w[..., None] * means).sum(1)  # (N, 2)


def autograd_score(q, x_tilde):
    x_tilde = x_tilde.clone().requires_grad_(True)
    return torch.autograd.grad(q.log_prob(x_tilde).sum(), x_tilde)[0]


@pytest.mark.parametrize("sigma", [0.2, 0.5, 1.5])
def test_denoising_autoencoder_tweedie_closed_form(sigma):
    """Eq. 3.6-3.7: with the exact posterior mean as r, model.score(x_tilde) = (r - x_tilde) / sigma^2
    equals the autograd gradient of log q_sigma, to float64 round-off, at points all over q_sigma."""
    torch.manual_seed(0)
    _, _, _, q = mixture_2d(sigma)
    model = DAE.DenoisingAutoencoder(lambda x_tilde: posterior_mean(x_tilde, sigma), "gaussian", sigma)
    x_tilde = q.sample((500,))
    torch.testing.assert_close(model.score(x_tilde), autograd_score(q, x_tilde), rtol=1e-9, atol=1e-9)
    assert (model.score(x_tilde) - x_tilde).abs().max() > 0.1  # the check is not vacuous


def test_denoising_autoencoder_learns_the_posterior_mean():
    """Eq. 3.3-3.4: a tiny r trained with model.loss on samples of the mixture approaches E[x | x_tilde].
    Tolerance: RMS distance to the exact posterior mean below 0.1 (seeds 0-2 gave 0.050, 0.044,
    0.046 in 1000 steps), against 0.56 for the identity r(x_tilde) = x_tilde and 0.44 for the best
    linear denoiser (the Wiener filter): the network learned the nonlinear shape of E[x | x_tilde]."""
    sigma, steps = 0.5, 1000
    torch.manual_seed(0)
    _, _, _, p = mixture_2d()
    _, _, _, q = mixture_2d(sigma)
    net = nn.Sequential(nn.Linear(2, 64), nn.SiLU(), nn.Linear(64, 64), nn.SiLU(), nn.Linear(64, 2))
    model = DAE.DenoisingAutoencoder(net, "gaussian", sigma)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    for _ in range(steps):
        loss = model.loss(p.sample((512,)).float())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    x_tilde = q.sample((4000,))
    exact = posterior_mean(x_tilde, sigma)
    with torch.no_grad():
        learned = model(x_tilde.float()).double()
        score = model.score(x_tilde.float()).double()
    rms = (learned - exact).pow(2).sum(1).mean().sqrt().item()
    rms_identity = (x_tilde - exact).pow(2).sum(1).mean().sqrt().item()
    assert rms < 0.1 < rms_identity, (rms, rms_identity)
    # the same numbers seen as a score: error / sigma^2, about 10 % of the size of the score
    true_score = autograd_score(q, x_tilde)
    assert (score - true_score).pow(2).sum(1).mean().sqrt() < 0.1 / sigma ** 2


def test_denoising_autoencoder_smoke(tiny_mnist, tmp_path):
    common = ["--hidden", "16", "--latent-dim", "4", "--batch-size", "8", "--num-samples", "6", "--sample-steps", "2",
              "--device", "cpu", "--data-dir", str(tiny_mnist), "--out-dir", str(tmp_path)]
    result = DAE.main(["--steps", "2", "--log-every", "1"] + common)
    assert result["step"] == 2 and result["test_denoised"] > 0 and result["test_noisy"] > 0
    for name in ("ckpt.pt", "samples.png", "samples.npz", "denoising.png"):
        assert (tmp_path / name).exists(), name
    images = np.load(tmp_path / "samples.npz")["images"]
    assert images.dtype == np.uint8 and images.shape == (6, 1, 28, 28)
    assert DAE.main(["--steps", "3", "--resume"] + common)["step"] == 3
    assert DAE.main(["--steps", "3", "--sample-only"] + common)["step"] == 3
    mask = DAE.main(["--steps", "1", "--corruption", "mask", "--mask-prob", "0.25"] + common[:-1] + [str(tmp_path / "mask")])
    assert mask["step"] == 1
    for bad in (["--corruption", "salt"], ["--sigma", "0"], ["--mask-prob", "1"], ["--steps", "-1"]):
        with pytest.raises(SystemExit) as exit_info:
            DAE.main(bad + common)
        assert exit_info.value.code == 2


@pytest.mark.slow
def test_denoising_autoencoder_learns_mnist(mnist_dir, tmp_path):
    """600 steps of the Gaussian denoiser (sigma 0.5) on real MNIST: test squared error per image of
    r(x_tilde), against 196 for the noisy input itself. Seeds 0, 1, 2 gave 22.57, 22.98, 22.71 on this
    2-core CPU; threshold 26 = worst seed plus a margin of 3. Untrained (steps 0): 181.8."""
    common = ["--hidden", "256", "--num-samples", "16", "--sample-steps", "2", "--device", "cpu",
              "--data-dir", str(mnist_dir), "--out-dir", str(tmp_path)]
    trained = DAE.main(["--steps", "600", "--log-every", "600", "--seed", "0"] + common)
    assert trained["test_denoised"] < 26, trained
    untrained = DAE.main(["--steps", "0", "--seed", "0"] + common)
    assert untrained["test_denoised"] > 26, untrained


# --- vae.py ---


def test_vae_shapes():
    torch.manual_seed(0)
    model = VAE.VAE(hidden=32, latent_dim=4)
    x = torch.rand(5, 1, 28, 28)
    mu, logvar = model.encode(x)
    assert mu.shape == logvar.shape == (5, 4)
    assert model.decode(mu).shape == (5, 784)
    assert model.log_likelihood(x, torch.randn(3, 5, 4)).shape == (3, 5)
    assert model.elbo(x).shape == (5,)
    assert model.iw_bound(x, 7).shape == (5,)
    samples = model.sample(3)
    assert samples.shape == (3, 1, 28, 28) and 0 <= samples.min() and samples.max() <= 1


def test_vae_bernoulli_log_likelihood_is_the_bernoulli_log_prob():
    torch.manual_seed(0)
    x = torch.bernoulli(torch.rand(4, 784)).double()
    logits = 6 * torch.randn(3, 4, 784, dtype=torch.float64)
    expected = torch.distributions.Bernoulli(logits=logits).log_prob(x).sum(-1)
    torch.testing.assert_close(VAE.bernoulli_log_likelihood(x, logits), expected)


def test_vae_gaussian_kl_closed_form_matches_torch_and_monte_carlo():
    torch.manual_seed(0)
    mu = torch.randn(4, 3, dtype=torch.float64)
    logvar = torch.randn(4, 3, dtype=torch.float64)
    q, p = Normal(mu, torch.exp(0.5 * logvar)), Normal(0.0, 1.0)
    kl = VAE.gaussian_kl(mu, logvar)
    torch.testing.assert_close(kl, kl_divergence(q, p).sum(-1))
    n = 200_000  # KL = E_q[log q(z) - log p(z)]
    z = q.sample((n,))
    terms = (q.log_prob(z) - p.log_prob(z)).sum(-1)  # (n, 4)
    se = terms.std(0) / math.sqrt(n)
    assert ((terms.mean(0) - kl).abs() < 3 * se).all(), (terms.mean(0), kl, se)


def test_vae_reparameterized_samples_have_the_right_moments_and_gradients():
    torch.manual_seed(0)
    n = 100_000
    mu = torch.tensor([0.5, -2.0, 3.0], dtype=torch.float64, requires_grad=True)
    logvar = torch.tensor([0.0, -1.5, 1.2], dtype=torch.float64, requires_grad=True)
    z = VAE.reparameterize(mu.expand(n, 3), logvar.expand(n, 3))  # (n, 3)
    var = logvar.detach().exp()
    se_mean = (var / n).sqrt()
    se_var = var * math.sqrt(2 / (n - 1))  # standard error of the sample variance of a Gaussian
    assert ((z.mean(0) - mu.detach()).abs() < 3 * se_mean).all()
    assert ((z.var(0) - var).abs() < 3 * se_var).all()
    z.sum().backward()  # dz/dmu = 1, dz/dlogvar = sigma * eps / 2 = (z - mu) / 2
    torch.testing.assert_close(mu.grad, torch.full((3,), float(n), dtype=torch.float64))
    torch.testing.assert_close(logvar.grad, 0.5 * (z - mu).detach().sum(0))


def ppca(seed=0, batch=3, d=6, latent=3, s=0.5):
    """Probabilistic PCA (Tipping and Bishop 1999): p(z) = N(0, I), p(x|z) = N(Wz + b, s^2 I), with
    orthogonal columns of W so that the exact posterior is a diagonal Gaussian. Returns a batch x (B, d),
    its exact log p(x) (B,), the posterior's mean and log-variance (B, latent), and make_log_likelihood(x),
    the callable z (k, B, latent) -> log p(x|z) (k, B) that vae.py's bound functions take."""
    g = torch.Generator().manual_seed(seed)
    q_basis, _ = torch.linalg.qr(torch.randn(d, latent, generator=g, dtype=torch.float64))
    W = q_basis * torch.tensor([2.0, 1.0, 0.5], dtype=torch.float64)  # (d, latent), W^T W diagonal
    b = torch.randn(d, generator=g, dtype=torch.float64)
    x = torch.randn(batch, d, generator=g, dtype=torch.float64) * 2
    log_px = MultivariateNormal(b, W @ W.T + s**2 * torch.eye(d, dtype=torch.float64)).log_prob(x)  # (B,)
    post_var = 1 / (1 + (W * W).sum(0) / s**2)  # (latent,) = diag((I + W^T W / s^2)^-1)
    post_mu = (x - b) @ W / s**2 * post_var  # (B, latent)

    def make_log_likelihood(xs):
        return lambda z: Normal(z @ W.T + b, s).log_prob(xs).sum(-1)

    return x, log_px, post_mu, post_var.log().expand_as(post_mu), make_log_likelihood


def test_vae_bounds_equal_log_px_at_the_exact_posterior():
    torch.manual_seed(0)
    x, log_px, mu, logvar, make_log_likelihood = ppca()
    log_likelihood = make_log_likelihood(x)
    # every importance weight p(x, z) / q(z|x) equals p(x) when q is the posterior, for any z and any k
    for k in (1, 10, 100):
        torch.testing.assert_close(VAE.iw_estimate(log_likelihood, mu, logvar, k), log_px, rtol=0, atol=1e-9)
    # the analytic-KL ELBO is an expectation over z; log p(x|z) is quadratic in z, so the 2D symmetric
    # points eps = +-sqrt(D) e_j (each weight 1 / 2D) give E_q exactly: the ELBO is log p(x) exactly
    D = mu.shape[1]
    points = math.sqrt(D) * torch.cat([torch.eye(D), -torch.eye(D)]).double()  # (2D, D)
    eps = points[:, None, :].expand(2 * D, *mu.shape)  # (2D, B, D)
    torch.testing.assert_close(VAE.elbo_estimate(log_likelihood, mu, logvar, eps), log_px, rtol=0, atol=1e-9)
    # one random draw is not exact: the analytic-KL estimator has variance even at the posterior
    assert (VAE.elbo_estimate(log_likelihood, mu, logvar) - log_px).abs().max() > 1e-3


def test_vae_bounds_are_below_log_px_and_iw_rises_with_k():
    torch.manual_seed(0)
    x, log_px, post_mu, post_logvar, make_log_likelihood = ppca()
    mu, logvar = post_mu + 0.4, post_logvar + 0.7  # a q that is not the posterior
    n, B = 5000, x.shape[0]
    log_likelihood = make_log_likelihood(x.repeat(n, 1))  # n independent copies of the batch
    mu_n, logvar_n = mu.repeat(n, 1), logvar.repeat(n, 1)

    def mean_and_se(values):  # (n * B,) -> mean and standard error per example, (B,) each
        values = values.view(n, B)
        return values.mean(0), values.std(0) / math.sqrt(n)

    elbo, elbo_se = mean_and_se(VAE.elbo_estimate(log_likelihood, mu_n, logvar_n))
    # exact ELBO of this q: log p(x) - KL(q(z|x) || p(z|x)) (README Eq. 4.4)
    gap = kl_divergence(Normal(mu, torch.exp(0.5 * logvar)), Normal(post_mu, torch.exp(0.5 * post_logvar))).sum(-1)
    assert (gap > 1).all()
    assert ((elbo - (log_px - gap)).abs() < 3 * elbo_se).all(), (elbo, log_px - gap, elbo_se)
    assert (elbo <= log_px + 3 * elbo_se).all()
    means = []
    for k in (1, 10, 100):
        bound, se = mean_and_se(VAE.iw_estimate(log_likelihood, mu_n, logvar_n, k))
        assert (bound <= log_px + 3 * se).all(), (k, bound, log_px, se)
        if k == 1:  # L_1 is the ELBO with the KL sampled: same expectation as the analytic-KL estimate
            assert ((bound - elbo).abs() < 3 * torch.sqrt(se**2 + elbo_se**2)).all()
        means.append((bound, se))
    for (lower, lower_se), (higher, higher_se) in zip(means, means[1:]):
        assert (higher - lower > 3 * torch.sqrt(lower_se**2 + higher_se**2)).all(), (lower, higher)


def smoke_args(data_dir, out_dir, *extra):
    return ["--steps", "2", "--hidden", "16", "--latent-dim", "4", "--batch-size", "8", "--device", "cpu",
            "--data-dir", str(data_dir), "--out-dir", str(out_dir), "--num-samples", "10", "--log-every", "1", *extra]


def test_vae_smoke_run_resume_and_sample_only(tiny_mnist, tmp_path):
    result = VAE.main(smoke_args(tiny_mnist, tmp_path))
    assert result["step"] == 2 and math.isfinite(result["test_loss"])
    for name in ("ckpt.pt", "samples.png", "reconstructions.png", "interpolation.png"):
        assert (tmp_path / name).exists(), name
    images = np.load(tmp_path / "samples.npz")["images"]
    assert images.dtype == np.uint8 and images.shape == (10, 1, 28, 28)
    result = VAE.main(smoke_args(tiny_mnist, tmp_path, "--steps", "3", "--resume", "--binarize", "--eval-nll", "--iw-k", "20"))
    assert result["step"] == 3 and result["test_nll"] <= result["test_loss"] + 1.0
    result = VAE.main(smoke_args(tiny_mnist, tmp_path, "--sample-only"))
    assert result["step"] == 3
    with pytest.raises(SystemExit, match="another size"):
        VAE.main(smoke_args(tiny_mnist, tmp_path, "--sample-only", "--hidden", "32"))


def test_vae_bad_input_exits_with_a_message(tiny_mnist, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        VAE.main(smoke_args(tiny_mnist, tmp_path, "--eval-nll"))  # no --binarize: no likelihood to estimate
    assert e.value.code != 0 and "--binarize" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        VAE.main(smoke_args(tiny_mnist, tmp_path, "--sample-only"))  # no checkpoint yet
    assert "no checkpoint" in str(e.value)


@pytest.mark.slow
def test_vae_learns_binarized_mnist(mnist_dir, tmp_path):
    """2500 steps (about 20 s on this 2-core CPU) on dynamically binarized MNIST must bring the test
    negative ELBO below 122 nats; the untrained model (decoder at the mean digit) is at about 206."""
    args = ["--steps", "2500", "--hidden", "200", "--binarize", "--device", "cpu", "--seed", "0",
            "--data-dir", str(mnist_dir), "--num-samples", "64", "--log-every", "100000"]
    trained = VAE.main(args + ["--out-dir", str(tmp_path / "trained")])
    untrained = VAE.main(args + ["--steps", "0", "--out-dir", str(tmp_path / "untrained")])
    # test negative ELBO after this run: seed 0: 118.89, seed 1: 117.87, seed 2: 118.63 nats;
    # threshold = worst seed (118.89) plus a margin of about 3 nats
    threshold = 122.0
    assert trained["test_loss"] < threshold, trained
    assert untrained["test_loss"] > threshold, untrained


# --- beta_vae.py ---


def _batch(n=16, seed=0):
    """Grey-level images in [0, 1], like MNIST after /255 (not binarized)."""
    return torch.rand(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed))


def _neg_elbo_terms(model, x, seed):
    """The plain VAE's pieces written out by hand from mu, logvar and the decoder's logits, drawing eps with
    the same seed the model's loss will see: Bernoulli cross-entropy of x per image, and closed-form KL."""
    mu, logvar = model.encode(x)
    torch.manual_seed(seed)
    eps = torch.randn(mu.shape)
    logits = model.decode(mu + torch.exp(0.5 * logvar) * eps).flatten(1)
    x = x.flatten(1)
    log_px = (x * F.logsigmoid(logits) + (1 - x) * F.logsigmoid(-logits)).sum(1)  # log p(x|z) as if Bernoulli
    kl = 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).sum(1)
    return -log_px.mean(), kl.mean()


def test_beta_vae_shapes():
    torch.manual_seed(0)
    model = BVAE.BetaVAE(hidden=32, latent_dim=3)
    x = _batch(5)
    mu, logvar = model.encode(x)
    assert mu.shape == logvar.shape == (5, 3)
    assert model.decode(mu).shape == (5, 1, 28, 28)
    bce, kl_dims = model.terms(x)
    assert bce.shape == (5,) and kl_dims.shape == (5, 3)
    loss, bce, kl = model.loss(x)
    assert loss.shape == bce.shape == kl.shape == ()
    samples = model.sample(7)
    assert samples.shape == (7, 1, 28, 28) and 0 <= samples.min() and samples.max() <= 1


def test_beta_vae_beta_one_is_the_vae_loss():
    torch.manual_seed(0)
    model = BVAE.BetaVAE(hidden=32, latent_dim=4, beta=1.0)
    x = _batch()
    with torch.no_grad():
        recon, kl = _neg_elbo_terms(model, x, seed=7)
        torch.manual_seed(7)
        loss, bce, kl_model = model.loss(x, step=123)
    assert kl > 0.01  # the KL term is not negligible, so a missing or doubled KL would show
    torch.testing.assert_close(loss, recon + kl, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(bce, recon, rtol=1e-5, atol=1e-4)
    # beta multiplies the KL alone: beta = 4 adds exactly 3 KL to the same draw
    model.beta = 4.0
    with torch.no_grad():
        torch.manual_seed(7)
        loss4, _, _ = model.loss(x, step=123)
    torch.testing.assert_close(loss4, recon + 4 * kl, rtol=1e-5, atol=1e-4)


def test_beta_vae_capacity_schedule():
    model = BVAE.BetaVAE(hidden=8, latent_dim=2, capacity_max=25.0, capacity_steps=1000)
    assert model.capacity(0) == 0.0
    assert model.capacity(250) == pytest.approx(6.25)
    assert model.capacity(500) == pytest.approx(12.5)
    assert model.capacity(999) == pytest.approx(25.0 * 0.999)
    assert model.capacity(1000) == pytest.approx(25.0)
    assert model.capacity(50000) == pytest.approx(25.0)
    steps = np.arange(0, 1001, 50)
    values = np.array([model.capacity(int(t)) for t in steps])
    assert np.allclose(np.diff(values), 25.0 * 50 / 1000)  # linear in between


def test_beta_vae_capacity_objective():
    """recon + gamma |KL - C|: at step 0 (C = 0) it is recon + gamma KL; once C exceeds the KL the sign
    flips and the loss rewards a larger KL. beta plays no part."""
    torch.manual_seed(0)
    model = BVAE.BetaVAE(hidden=32, latent_dim=4, beta=4.0, capacity_max=25.0, gamma=100.0, capacity_steps=10)
    x = _batch()
    with torch.no_grad():
        recon, kl = _neg_elbo_terms(model, x, seed=3)
        assert kl < 25.0
        torch.manual_seed(3)
        loss_start, _, _ = model.loss(x, step=0)
        torch.manual_seed(3)
        loss_end, _, _ = model.loss(x, step=10)
    torch.testing.assert_close(loss_start, recon + 100.0 * kl, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(loss_end, recon + 100.0 * (25.0 - kl), rtol=1e-5, atol=1e-3)


def test_beta_vae_kl_matches_torch_distributions():
    g = torch.Generator().manual_seed(0)
    mu = 2 * torch.randn(64, 6, generator=g, dtype=torch.float64)
    logvar = 1.5 * torch.randn(64, 6, generator=g, dtype=torch.float64)
    q = torch.distributions.Normal(mu, torch.exp(0.5 * logvar))
    p = torch.distributions.Normal(torch.zeros_like(mu), torch.ones_like(mu))
    expected = torch.distributions.kl_divergence(q, p)  # (64, 6)
    torch.testing.assert_close(BVAE.BetaVAE.kl_per_dim(mu, logvar), expected, rtol=1e-10, atol=1e-10)


def test_beta_vae_traversal_and_manifold_layout():
    torch.manual_seed(0)
    model = BVAE.BetaVAE(hidden=16, latent_dim=2)
    x = _batch(3)
    values = torch.tensor([-3.0, 0.0, 3.0])
    with torch.no_grad():
        grid = model.traverse(x, dims=[1, 0], values=values)  # row 0 sweeps z_1, row 1 sweeps z_0
        mu, _ = model.encode(x[:1])
        assert grid.shape == (6, 1, 28, 28)
        expected = torch.sigmoid(model.decode(torch.tensor([[mu[0, 0].item(), 3.0], [-3.0, mu[0, 1].item()]])))
        torch.testing.assert_close(grid[[2, 3]], expected)
        # manifold: top-left is (low z_1, high z_2), bottom-right (high z_1, low z_2), like the scatter plot
        images = BVAE.manifold(model, n=4)
        q = torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor([0.125, 0.875]))
        corners = torch.sigmoid(model.decode(torch.tensor([[q[0], q[1]], [q[1], q[0]]])))
        torch.testing.assert_close(images[[0, 15]], corners)


def _check_outputs(out, extra=()):
    for name in ("ckpt.pt", "samples.png", "traversal.png", *extra):
        assert (out / name).exists(), name
    images = np.load(out / "samples.npz")["images"]
    assert images.dtype == np.uint8 and images.shape == (8, 1, 28, 28)


def test_beta_vae_smoke(tiny_mnist, tmp_path):
    args = ["--steps", "2", "--hidden", "16", "--latent-dim", "4", "--batch-size", "8", "--num-samples", "8",
            "--device", "cpu", "--data-dir", str(tiny_mnist), "--out-dir", str(tmp_path)]
    result = BVAE.main(args)
    _check_outputs(tmp_path)
    assert result["step"] == 2 and len(result["kl_per_dim"]) == 4
    assert result["test_neg_elbo"] == pytest.approx(result["test_bce"] + result["test_kl"])
    assert BVAE.main(args[:1] + ["4"] + args[2:] + ["--resume"])["step"] == 4
    assert BVAE.main(args + ["--sample-only"])["step"] == 4
    assert not (tmp_path / "latent_space.png").exists()


def test_beta_vae_smoke_2d_and_capacity(tiny_mnist, tmp_path):
    common = ["--steps", "2", "--hidden", "16", "--batch-size", "8", "--num-samples", "8", "--device", "cpu",
              "--data-dir", str(tiny_mnist)]
    BVAE.main(common + ["--latent-dim", "2", "--out-dir", str(tmp_path / "2d")])
    _check_outputs(tmp_path / "2d", extra=("latent_space.png", "manifold.png"))
    BVAE.main(common + ["--capacity-max", "5", "--gamma", "10", "--capacity-steps", "2", "--out-dir", str(tmp_path / "c")])
    _check_outputs(tmp_path / "c")


@pytest.mark.parametrize("flag", [["--beta", "-1"], ["--gamma", "0"], ["--capacity-steps", "0"], ["--latent-dim", "0"]])
def test_beta_vae_bad_input(flag, tmp_path):
    with pytest.raises(SystemExit) as e:
        BVAE.main(flag + ["--out-dir", str(tmp_path)])
    assert e.value.code not in (0, None)


@pytest.mark.slow
def test_beta_vae_learns_mnist(mnist_dir, tmp_path):
    """beta = 1 (the plain VAE), 1500 steps: the test negative ELBO (BCE + KL, nats per image) must fall
    below the threshold; the untrained model (about 543 = 784 ln 2 nats) must not."""
    common = ["--hidden", "256", "--latent-dim", "10", "--beta", "1", "--num-samples", "64", "--log-every", "100000",
              "--device", "cpu", "--data-dir", str(mnist_dir)]
    # seeds 0, 1, 2 measured on this 2-core CPU: 115.52, 116.18, 117.55 nats; worst seed plus a 4.5-nat margin
    threshold = 122.0
    trained = BVAE.main(common + ["--steps", "1500", "--seed", "0", "--out-dir", str(tmp_path / "trained")])
    assert trained["test_neg_elbo"] < threshold
    untrained = BVAE.main(common + ["--steps", "0", "--seed", "0", "--out-dir", str(tmp_path / "untrained")])
    assert untrained["test_neg_elbo"] >= threshold


# --- hvae.py ---


def hvae_model(seed=0, hidden=32, z1_dim=8, z2_dim=4):
    torch.manual_seed(seed)
    return HVAE.LadderVAE(hidden, z1_dim, z2_dim)


def hvae_digits(n=8, seed=0):
    return torch.bernoulli(torch.rand(n, 784, generator=torch.Generator().manual_seed(seed)) * 0.6)


def hvae_within_3se(samples, value):
    samples = samples.double()
    se = samples.std() / math.sqrt(len(samples))
    return abs(samples.mean().item() - float(value)) < 3 * se.item(), (samples.mean().item(), float(value), se.item())


# --- the model ---


def test_hvae_shapes():
    model = hvae_model()
    x = hvae_digits(5)
    log_px, kl1, kl2 = model.terms(x.view(5, 1, 28, 28))
    assert log_px.shape == (5,) and kl1.shape == (5, 8) and kl2.shape == (5, 4)
    assert (kl1 >= 0).all() and (kl2 >= 0).all()
    assert model.loss(x, beta=0.3, lam=0.1).shape == ()
    assert model.log_weights(x, 7).shape == (7, 5)
    assert model.iw_bound(x, 30, rows=40).shape == (5,)  # 8 draws per chunk: four chunks, the last one short
    mean1, mean2 = model.posterior_means(x)
    assert mean1.shape == (5, 8) and mean2.shape == (5, 4)
    assert model.sample(6).shape == (6, 1, 28, 28)
    assert model.sample(3, z2=torch.zeros(3, 4)).shape == (3, 1, 28, 28)


def test_hvae_log_bernoulli_matches_torch():
    x = hvae_digits(3)
    logits = 3 * torch.randn(2, 3, 784, generator=torch.Generator().manual_seed(1))
    expected = torch.distributions.Bernoulli(logits=logits).log_prob(x.expand_as(logits)).sum(-1)
    assert torch.allclose(HVAE.log_bernoulli(x, logits), expected, atol=1e-3)


def test_hvae_precision_weighting_is_the_product_of_gaussians():
    # Eq. 6.3: N(z; mu_hat, s_hat^2) N(z; mu_p, s_p^2) / N(z; mu_q, s_q^2) must not depend on z.
    g = torch.Generator().manual_seed(0)
    mu_hat, logvar_hat, mu_p, logvar_p = torch.randn(4, 6, generator=g).double() * 1.5
    mu_q, logvar_q = HVAE.precision_weighted(mu_hat, logvar_hat, mu_p, logvar_p)
    z = torch.randn(50, 6, generator=g).double() * 3
    normal = torch.distributions.Normal
    ratio = (normal(mu_hat, (0.5 * logvar_hat).exp()).log_prob(z) + normal(mu_p, (0.5 * logvar_p).exp()).log_prob(z)
             - normal(mu_q, (0.5 * logvar_q).exp()).log_prob(z))  # (50, 6)
    assert (ratio - ratio[0]).abs().max() < 1e-9
    assert (logvar_q < torch.minimum(logvar_hat, logvar_p)).all()  # precisions add: sharper than either


def test_hvae_gaussian_kl_matches_monte_carlo_per_layer():
    # Each layer's closed-form KL (Eq. 6.5) against E_q[log q - log p] by sampling, with densities from torch.
    model = hvae_model(seed=3)
    x = hvae_digits(1)
    normal = torch.distributions.Normal
    n = 20000
    with torch.no_grad():
        model.q2.bias.copy_(torch.randn(8, generator=torch.Generator().manual_seed(0)))  # move q(z2|x) off the prior
        mu_hat, logvar_hat, mu2, logvar2 = model.bottom_up(x)
        # top layer: q(z2|x) against p(z2) = N(0, I)
        q2 = normal(mu2[0], (0.5 * logvar2[0]).exp())
        z2 = q2.sample((n,))
        mc2 = q2.log_prob(z2).sum(-1) - normal(0.0, 1.0).log_prob(z2).sum(-1)
        kl2 = HVAE.gaussian_kl(mu2, logvar2, torch.zeros_like(mu2), torch.zeros_like(logvar2)).sum()
        ok, info = hvae_within_3se(mc2, kl2)
        assert ok, f"layer z2: Monte Carlo {info[0]:.4f} vs closed form {info[1]:.4f} (s.e. {info[2]:.4f})"
        # lower layer, given one z2: q(z1|x,z2) against p(z1|z2)
        mu_p, logvar_p = model.prior1(z2[:1])
        mu1, logvar1 = HVAE.precision_weighted(mu_hat, logvar_hat, mu_p, logvar_p)
        q1, p1 = normal(mu1[0], (0.5 * logvar1[0]).exp()), normal(mu_p[0], (0.5 * logvar_p[0]).exp())
        z1 = q1.sample((n,))
        mc1 = q1.log_prob(z1).sum(-1) - p1.log_prob(z1).sum(-1)
        kl1 = HVAE.gaussian_kl(mu1, logvar1, mu_p, logvar_p).sum()
        ok, info = hvae_within_3se(mc1, kl1)
        assert ok, f"layer z1: Monte Carlo {info[0]:.4f} vs closed form {info[1]:.4f} (s.e. {info[2]:.4f})"
        assert kl1 > 0.05 and kl2 > 0.05  # both layers differ from their priors, so the comparison has teeth


def test_hvae_iw_bound_with_one_sample_is_the_elbo_and_rises_with_k():
    model = hvae_model(seed=1)
    x = hvae_digits(8)
    torch.manual_seed(0)
    with torch.no_grad():
        # k = 1: log w from the joint densities (Eq. 6.9) and the ELBO from the closed-form KLs (Eq. 6.4) have one mean
        n = 3000
        log_w = model.log_weights(x, n).sum(1)  # (n,) summed over the 8 images
        log_px, kl1, kl2 = model.terms(x.repeat(n, 1))  # n independent draws for each image
        elbo = (log_px - kl1.sum(1) - kl2.sum(1)).view(n, 8).sum(1)  # (n,)
        diff_se = math.sqrt(log_w.double().var() / n + elbo.double().var() / n)
        assert abs(log_w.double().mean() - elbo.double().mean()) < 3 * diff_se, (log_w.mean(), elbo.mean(), diff_se)
        # the bound rises with k: repeated estimates at k = 1, 10, 100
        bounds = {k: torch.stack([model.iw_bound(x, k).mean() for _ in range(40)]).double() for k in (1, 10, 100)}
    for low, high in ((1, 10), (10, 100)):
        se = math.sqrt(bounds[low].var() / 40 + bounds[high].var() / 40)
        assert bounds[high].mean() - bounds[low].mean() > 3 * se, (low, high, bounds[low].mean(), bounds[high].mean(), se)


def test_hvae_iw_bound_approaches_log_px_by_quadrature():
    # With one unit per layer, log p(x) is the log of a 2-D integral over (z1, z2), done on a grid (Eq. 6.1).
    # The k = 1 bound (the ELBO) lies below it in expectation; k = 20000 closes the gap.
    model = hvae_model(seed=2, hidden=16, z1_dim=1, z2_dim=1)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)  # a sharper posterior than at initialization: a gap of a few nats between ELBO and log p(x)
    x = hvae_digits(2, seed=5)
    grid = torch.linspace(-7, 7, 141)
    dz = (grid[1] - grid[0]).item()
    z1, z2 = (z.reshape(-1, 1) for z in torch.meshgrid(grid, grid, indexing="ij"))
    with torch.no_grad():
        mu_p, logvar_p = model.prior1(z2)
        log_pz = HVAE.gaussian_log_prob(z1, mu_p, logvar_p) - 0.5 * (math.log(2 * math.pi) + z2.pow(2)).sum(-1)  # (G,)
        logits = model.decode(z1).unsqueeze(1)  # (G, 1, 784)
        log_px_z = torch.cat([HVAE.log_bernoulli(x[i:i + 1], logits) for i in range(2)], 1)  # (G, 2)
        exact = torch.logsumexp(log_px_z + log_pz[:, None], 0) + 2 * math.log(dz)  # (2,)
        torch.manual_seed(0)
        elbo = torch.stack([model.iw_bound(x, 1) for _ in range(200)])  # (200, 2)
        bound = model.iw_bound(x, 20000)
    assert (elbo.mean(0) + 3 * elbo.std(0) / math.sqrt(200) < exact).all(), (elbo.mean(0), exact)
    assert (exact - elbo.mean(0)).min() > 1.0, "the test needs a visible ELBO gap"
    assert (bound - exact).abs().max() < 0.02, (bound, exact)


# --- collapse remedies and diagnostics ---


def test_hvae_free_bits_clamp():
    # Eq. 6.7: one group below lambda (batch mean 0.2), one above (batch mean 1.0).
    kl = torch.tensor([[0.1, 0.5], [0.3, 1.5]], requires_grad=True)
    value = HVAE.free_bits(kl, 0.5)
    value.backward()
    assert value.item() == pytest.approx(0.5 + 1.0)
    assert torch.equal(kl.grad[:, 0], torch.zeros(2)), "a group below lambda must get no gradient"
    assert torch.allclose(kl.grad[:, 1], torch.full((2,), 0.5)), "a group above lambda gets d(mean)/d(kl) = 1/B"
    kl.grad = None
    HVAE.free_bits(kl, 0.0).backward()  # lambda = 0 is the plain KL, summed over groups and averaged over the batch
    assert torch.allclose(kl.grad, torch.full((2, 2), 0.5))
    # in the model: with lambda above every unit's KL, the KL terms carry no gradient to q(z2|x)'s mean
    model = hvae_model()
    x = hvae_digits(4)
    torch.manual_seed(0)
    model.loss(x, beta=1.0, lam=1e6).backward()
    clamped = model.q2.weight.grad[:4].clone()  # rows of mu2
    model.zero_grad()
    torch.manual_seed(0)
    log_px, kl1, kl2 = model.terms(x)
    (-log_px.mean()).backward()
    assert torch.allclose(clamped, model.q2.weight.grad[:4], atol=1e-6)


def test_hvae_warmup_schedule():
    assert [HVAE.kl_warmup(t, 100) for t in (0, 25, 50, 100, 5000)] == [0.0, 0.25, 0.5, 1.0, 1.0]
    assert HVAE.kl_warmup(0, 0) == 1.0  # no warm-up: the plain ELBO from the first step


def test_hvae_active_units_known_answer():
    g = torch.Generator().manual_seed(0)
    # columns with variance across x of about 1, 0.04 (active), 0.0025, 0 (inactive)
    means = torch.randn(5000, 4, generator=g) * torch.tensor([1.0, 0.2, 0.05, 0.0]) + 3.0
    count, variances = HVAE.active_units(means)
    assert count == 2
    assert np.allclose(variances.numpy(), [1.0, 0.04, 0.0025, 0.0], rtol=0.1, atol=1e-6)
    # in the model: a q(z2|x) whose mean ignores x has no active z2 unit
    model = hvae_model()
    with torch.no_grad():
        model.q2.weight.zero_()
    mean1, mean2 = model.posterior_means(hvae_digits(200))
    assert HVAE.active_units(mean2)[0] == 0


# --- runs ---


def hvae_args(data_dir, out_dir, *extra):
    return ["--steps", "2", "--device", "cpu", "--data-dir", str(data_dir), "--out-dir", str(out_dir),
            "--hidden", "16", "--z1-dim", "4", "--z2-dim", "2", "--num-samples", "10", *extra]


def test_hvae_smoke_resume_and_sample_only(tiny_mnist, tmp_path):
    result = HVAE.main(hvae_args(tiny_mnist, tmp_path, "--warmup", "4", "--free-bits", "0.1", "--eval-nll", "--iw-k", "8"))
    assert result["step"] == 2 and math.isfinite(result["neg_elbo"]) and math.isfinite(result["nll"])
    for name in ("ckpt.pt", "samples.png", "samples.npz", "layers.png"):
        assert (tmp_path / name).exists(), f"{name} was not written"
    images = np.load(tmp_path / "samples.npz")["images"]
    assert images.dtype == np.uint8 and images.shape == (10, 1, 28, 28)
    assert HVAE.main(hvae_args(tiny_mnist, tmp_path, "--steps", "4", "--resume"))["step"] == 4
    assert HVAE.main(hvae_args(tiny_mnist, tmp_path, "--sample-only"))["step"] == 4
    for bad in (["--free-bits", "-1"], ["--warmup", "-5"], ["--iw-k", "0"], ["--hidden", "1"]):
        with pytest.raises(SystemExit) as error:
            HVAE.main(hvae_args(tiny_mnist, tmp_path, *bad))
        assert error.value.code == 2


# --- learning check (real MNIST) ---


@pytest.mark.slow
def test_hvae_learns_and_keeps_both_layers_active(mnist_dir, tmp_path):
    # After 1000 steps (warm-up 300), seeds 0, 1, 2: test -ELBO 123.74, 121.98, 123.55 nats; active units
    # z1 82, 92, 95 of 100 and z2 9, 13, 10 of 50. Untrained: 216.76 nats, 0 and 0 active units.
    # Thresholds: the worst seed plus a margin (-ELBO 127; at least 40 active z1 units and 4 active z2 units).
    threshold, min_z1, min_z2 = 127.0, 40, 4
    cfg = HVAE.Config(seed=0, device="cpu", data_dir=mnist_dir, out_dir=str(tmp_path), steps=1000, warmup=300,
                   log_every=100_000, num_samples=64)
    untrained = HVAE.train(HVAE.Config(**{**cfg.__dict__, "steps": 0}))
    trained = HVAE.train(cfg)
    assert untrained["neg_elbo"] > threshold, f"the untrained model already passes ({untrained['neg_elbo']:.1f})"
    assert untrained["active_z2"] < min_z2, "the untrained model should not already have active z2 units"
    assert trained["neg_elbo"] < threshold, f"test -ELBO {trained['neg_elbo']:.1f} nats, threshold {threshold}"
    assert trained["active_z1"] >= min_z1 and trained["active_z2"] >= min_z2, trained
