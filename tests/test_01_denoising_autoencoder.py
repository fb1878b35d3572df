"""Tests for 01_autoencoders/denoising_autoencoder.py: shapes, the corruptions against their closed
forms, Tweedie's formula (README Eq. 3.6) on a Gaussian mixture, a smoke run, a learning check."""

import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from conftest import load_script

M = load_script("01_autoencoders/denoising_autoencoder.py")
D = torch.distributions


def test_denoising_autoencoder_shapes():
    torch.manual_seed(0)
    model = M.DenoisingAutoencoder(M.Denoiser(hidden=32, latent_dim=8), "gaussian", sigma=0.5)
    x = torch.rand(5, 1, 28, 28)
    x_tilde = model.corrupt(x)
    x_hat = model(x_tilde)
    assert x_tilde.shape == x_hat.shape == model.score(x_tilde).shape == (5, 1, 28, 28)
    assert 0 <= x_hat.min() and x_hat.max() <= 1  # the sigmoid: E[x | x_tilde] lies in [0, 1] too
    assert model.loss(x).shape == ()
    assert model.sample(torch.rand(3, 1, 28, 28), steps=2).shape == (3, 1, 28, 28)
    with pytest.raises(ValueError):  # masking has no score interpretation (README section 3)
        M.DenoisingAutoencoder(M.Denoiser(32, 8), "mask").score(x_tilde)


def test_denoising_autoencoder_gaussian_noise_error_closed_form():
    """The noisy input's error ||x_tilde - x||^2 = sigma^2 chi^2_784: mean 784 sigma^2, variance
    2 * 784 sigma^4 per image. evaluate's second figure must match within 3 standard errors."""
    torch.manual_seed(0)
    sigma, n = 0.3, 200
    model = M.DenoisingAutoencoder(M.Denoiser(hidden=16, latent_dim=4), "gaussian", sigma)
    _, noisy = M.evaluate(model, torch.rand(n, 1, 28, 28), batch_size=64)
    se = sigma ** 2 * math.sqrt(2 * 784 / n)
    assert abs(noisy - 784 * sigma ** 2) < 3 * se, (noisy, 784 * sigma ** 2, se)
    x = torch.rand(n, 1, 28, 28)
    assert M.evaluate(model, x) == M.evaluate(model, x)  # one fixed corruption: figures compare across calls


def test_denoising_autoencoder_mask_zeroes_the_right_fraction():
    """Eq. 3.2: each pixel is zeroed with probability p, independently; the kept ones are untouched."""
    torch.manual_seed(0)
    p = 0.3
    model = M.DenoisingAutoencoder(nn.Identity(), "mask", mask_prob=p)
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
    model = M.DenoisingAutoencoder(lambda x_tilde: posterior_mean(x_tilde, sigma), "gaussian", sigma)
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
    model = M.DenoisingAutoencoder(net, "gaussian", sigma)
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
    result = M.main(["--steps", "2", "--log-every", "1"] + common)
    assert result["step"] == 2 and result["test_denoised"] > 0 and result["test_noisy"] > 0
    for name in ("ckpt.pt", "samples.png", "samples.npz", "denoising.png"):
        assert (tmp_path / name).exists(), name
    images = np.load(tmp_path / "samples.npz")["images"]
    assert images.dtype == np.uint8 and images.shape == (6, 1, 28, 28)
    assert M.main(["--steps", "3", "--resume"] + common)["step"] == 3
    assert M.main(["--steps", "3", "--sample-only"] + common)["step"] == 3
    mask = M.main(["--steps", "1", "--corruption", "mask", "--mask-prob", "0.25"] + common[:-1] + [str(tmp_path / "mask")])
    assert mask["step"] == 1
    for bad in (["--corruption", "salt"], ["--sigma", "0"], ["--mask-prob", "1"], ["--steps", "-1"]):
        with pytest.raises(SystemExit) as exit_info:
            M.main(bad + common)
        assert exit_info.value.code == 2


@pytest.mark.slow
def test_denoising_autoencoder_learns_mnist(mnist_dir, tmp_path):
    """600 steps of the Gaussian denoiser (sigma 0.5) on real MNIST: test squared error per image of
    r(x_tilde), against 196 for the noisy input itself. Seeds 0, 1, 2 gave 22.57, 22.98, 22.71 on this
    2-core CPU; threshold 26 = worst seed plus a margin of 3. Untrained (steps 0): 181.8."""
    common = ["--hidden", "256", "--num-samples", "16", "--sample-steps", "2", "--device", "cpu",
              "--data-dir", str(mnist_dir), "--out-dir", str(tmp_path)]
    trained = M.main(["--steps", "600", "--log-every", "600", "--seed", "0"] + common)
    assert trained["test_denoised"] < 26, trained
    untrained = M.main(["--steps", "0", "--seed", "0"] + common)
    assert untrained["test_denoised"] > 26, untrained
