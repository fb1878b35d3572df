"""Tests for 01_autoencoders/sparse_autoencoder.py: shapes, the sparsity penalty against the closed-form
Bernoulli KL and its gradient (README Eq. 2.5 to 2.8), the sparsity measures (Eq. 2.10), a smoke run, and
a learning check on real MNIST (slow)."""

import math

import numpy as np
import pytest
import torch

from conftest import load_script

M = load_script("01_autoencoders/sparse_autoencoder.py")


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
    model = M.SparseAutoencoder(latent_dim=40)
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
    kl = M.bernoulli_kl(rho, q).numpy()
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
    model = M.SparseAutoencoder(latent_dim=8, penalty="kl", rho=rho, beta=beta)
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
    model = M.SparseAutoencoder(latent_dim=10, penalty="kl", rho=rho, beta=beta)
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
    l1 = M.SparseAutoencoder(latent_dim=9, penalty="l1", lam=0.3)
    assert math.isclose(l1.sparsity(z).item(), 0.3 * z.double().sum().item() / 6, rel_tol=1e-6)  # Eq. 2.8
    assert M.SparseAutoencoder(latent_dim=9, penalty="none").sparsity(z).item() == 0.0


def test_sparse_autoencoder_evaluate_measures_sparsity():
    # With W1 = 0 every image gets the code z = sigmoid(b1): Eq. 2.10 by hand.
    model = M.SparseAutoencoder(latent_dim=6)
    torch.nn.init.zeros_(model.encoder.weight)
    b = torch.tensor([-3.0, -1.0, -0.2, 0.4, 2.0, -5.0])
    model.encoder.bias.data.copy_(b)
    x = torch.rand(30, 1, 28, 28)
    m = M.evaluate(model, x, batch_size=7)
    z = torch.sigmoid(b)
    x_hat = model.decode(z.expand(30, 6)).detach()
    assert math.isclose(m["mean_activation"], z.mean().item(), rel_tol=1e-5)
    assert math.isclose(m["frac_active"], 2 / 6)  # units 3 and 4 have z > 1/2 on every image
    assert m["never_active"] == 4
    assert math.isclose(m["test_mse"], (x_hat - x).pow(2).sum().item() / 30, rel_tol=1e-4)


def test_sparse_autoencoder_code_gaussian_matches_preactivation_moments():
    torch.manual_seed(0)
    model = M.SparseAutoencoder(latent_dim=5)
    x = torch.rand(500, 1, 28, 28)
    model.fit_code_gaussian(x)
    a = model.encoder(x.flatten(1)).detach().double().numpy()  # Eq. 2.9 is fitted to W1 x + b1
    chol = model.code_chol.double()
    assert np.allclose(model.code_mean.double().numpy(), a.mean(0), atol=1e-5)
    assert np.allclose((chol @ chol.T).numpy(), np.cov(a.T), atol=1e-4)


def test_sparse_autoencoder_smoke_run(tiny_mnist, tmp_path):
    args = ["--steps", "2", "--device", "cpu", "--data-dir", str(tiny_mnist), "--out-dir", str(tmp_path),
            "--latent-dim", "32", "--batch-size", "16", "--num-samples", "10"]
    result = M.main(args)
    for name in ("ckpt.pt", "samples.png", "samples.npz", "reconstructions.png", "features.png"):
        assert (tmp_path / name).exists(), f"{name} was not written"
    images = np.load(tmp_path / "samples.npz")["images"]
    assert images.dtype == np.uint8 and images.shape == (10, 1, 28, 28)
    assert result["step"] == 2 and set(result) >= {"test_mse", "mean_activation", "frac_active", "never_active"}
    assert M.main([*args, "--steps", "4", "--resume", "--penalty", "l1"])["step"] == 4
    assert M.main([*args, "--sample-only"])["step"] == 4


def test_sparse_autoencoder_rejects_bad_options(capsys):
    for bad in (["--penalty", "l2"], ["--rho", "1.5"], ["--rho", "0"], ["--beta", "-1"], ["--latent-dim", "0"]):
        with pytest.raises(SystemExit) as error:
            M.parse_config(M.Config, bad)
        assert error.value.code == 2
    assert "--penalty must be kl, l1 or none" in capsys.readouterr().err


@pytest.mark.slow
def test_sparse_autoencoder_learns_a_sparse_code(mnist_dir, tmp_path):
    # 1200 steps of the default model on real MNIST (about 15 s here). Measured on this 2-core CPU, seeds
    # 0, 1, 2: test squared error 25.73, 26.33, 25.93 per image; mean activation 0.0532, 0.0515, 0.0529.
    # Thresholds: worst seed plus a margin. The untrained model: 184.4 and 0.501.
    def run(steps, out):
        return M.main(["--steps", str(steps), "--device", "cpu", "--data-dir", str(mnist_dir), "--out-dir", str(out),
                       "--num-samples", "10", "--log-every", "100000", "--seed", "0"])

    def passes(m):
        return m["test_mse"] < 30.0 and m["mean_activation"] < 0.065

    trained = run(1200, tmp_path / "trained")
    assert passes(trained), trained
    assert abs(trained["mean_activation"] - 0.05) < 0.01  # the KL has pulled every unit's mean towards rho
    untrained = run(0, tmp_path / "untrained")
    assert not passes(untrained), untrained
