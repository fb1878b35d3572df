"""Tests for 05_diffusion_models/ddpm.py: the forward process, the posterior, the loss and the bound against
closed forms for Gaussian data, the U-Net's shapes, the discretized decoder, a smoke run and a learning check."""

import math

import numpy as np
import pytest
import torch

from conftest import load_script, score_samples

M = load_script("05_diffusion_models/ddpm.py")


def gaussian_eps(ddpm, mu, s):
    """The optimal eps-predictor for data x0 ~ N(mu, s^2 I) (README Eq. 3.7): E[eps | x_t] =
    sqrt(1 - ab) / (ab s^2 + 1 - ab) (x_t - sqrt(ab) mu), because (eps, x_t) are jointly Gaussian."""
    ab_all = M.alpha_bar(ddpm.betas)

    def eps_model(xt, t):
        ab = M.per_sample(ab_all[t], xt)
        return (1 - ab).sqrt() / (ab * s ** 2 + 1 - ab) * (xt - ab.sqrt() * mu)
    return eps_model


def test_ddpm_schedule_endpoints():
    betas = M.linear_betas(1000)
    assert betas.shape == (1001,) and betas[0] == 0
    assert torch.isclose(betas[1], torch.tensor(1e-4, dtype=torch.float64)) and torch.isclose(betas[-1], torch.tensor(0.02, dtype=torch.float64))
    # rescaled by 1000 / T, a chain of any length ends at nearly pure noise (alpha_bar_T = 4.0e-5 at T = 1000,
    # 7.7e-6 at T = 50) and passes alpha_bar = 0.07 to 0.08 half way; without the rescaling T = 50 would end at 0.6
    for T in (50, 200, 1000):
        ab = M.alpha_bar(M.linear_betas(T))
        assert 5e-6 < ab[-1] < 5e-5 and 0.06 < ab[T // 2] < 0.09


def test_ddpm_q_sample_moments():
    # 200 000 draws of x_t for three t: mean and variance within 3 standard errors of sqrt(ab) x0, 1 - ab.
    # Using alpha_t instead of alpha_bar_t (a classic slip) moves the mean at t = 500 from 0.28 x0 to 0.99 x0.
    gen = torch.Generator().manual_seed(0)
    betas = M.linear_betas(1000)
    ab = M.alpha_bar(betas)
    x0 = torch.tensor([0.8, -0.5, 0.1], dtype=torch.float64).view(1, 3, 1, 1)
    n = 200_000
    for t in (1, 500, 1000):
        eps = torch.randn(n, 3, 1, 1, generator=gen, dtype=torch.float64)
        xt = M.q_sample(x0.expand(n, 3, 1, 1), torch.full((n,), t), eps, betas)
        mean, var = xt.mean(0).flatten(), xt.var(0).flatten()
        true_mean, true_var = ab[t].sqrt() * x0.flatten(), 1 - ab[t]
        assert ((mean - true_mean).abs() < 3 * (true_var / n).sqrt()).all(), (t, mean, true_mean)
        assert ((var - true_var).abs() < 3 * true_var * math.sqrt(2 / (n - 1))).all(), (t, var, true_var)


def test_ddpm_posterior_is_gaussian_conditioning():
    # Brute force: x_{t-1} = sqrt(ab_{t-1}) x0 + sqrt(1 - ab_{t-1}) e1, x_t = sqrt(alpha_t) x_{t-1} + sqrt(beta_t) e2;
    # condition the 2 x 2 joint Gaussian on x_t. Swapping alpha_bar_{t-1} for alpha_bar_t anywhere fails by > 1e-3.
    gen = torch.Generator().manual_seed(1)
    betas = M.linear_betas(1000)
    ab = M.alpha_bar(betas)
    t = torch.arange(2, 1001)
    x0 = torch.randn(len(t), 1, 1, 1, generator=gen, dtype=torch.float64)
    xt = torch.randn(len(t), 1, 1, 1, generator=gen, dtype=torch.float64)
    mean, var = M.q_posterior(x0, xt, t, betas)
    a_t, ab_prev = 1 - betas[t], ab[t - 1]
    m1, m2 = ab_prev.sqrt() * x0.flatten(), (a_t * ab_prev).sqrt() * x0.flatten()  # E[x_{t-1}], E[x_t]
    v1 = 1 - ab_prev
    c12 = a_t.sqrt() * v1  # Cov(x_{t-1}, x_t)
    v2 = a_t * v1 + betas[t]  # Var(x_t) (= 1 - ab_t)
    assert torch.allclose(mean.flatten(), m1 + c12 / v2 * (xt.flatten() - m2), rtol=0, atol=1e-12)
    assert torch.allclose(var.flatten(), v1 - c12 ** 2 / v2, rtol=1e-10, atol=0)


def test_ddpm_loss_at_optimum_is_analytic_minimum():
    # With the optimal predictor, L_simple per dimension = mean over t of ab s^2 / (ab s^2 + 1 - ab) (README Eq. 3.8).
    # 20 batches of 20 000 give a standard error of ~5e-4; a loss that summed instead of averaging, or a
    # q_sample with the wrong noise scale, misses by far more.
    torch.manual_seed(2)
    mu, s = 0.3, 0.5
    ddpm = M.DDPM(1000, clip=False).double()
    eps_model = gaussian_eps(ddpm, mu, s)
    losses = torch.stack([ddpm.loss(eps_model, mu + s * torch.randn(20_000, 1, 2, 2, dtype=torch.float64)) for _ in range(20)])
    ab = M.alpha_bar(ddpm.betas)[1:]
    minimum = (ab * s ** 2 / (ab * s ** 2 + 1 - ab)).mean()
    assert abs(losses.mean() - minimum) < 3 * losses.std() / math.sqrt(len(losses)), (losses.mean(), minimum)


def test_ddpm_bound_above_gaussian_nll_and_tightening():
    # Continuous data x0 ~ N(0.3, 0.1^2), the optimal predictor, sigma_t^2 = beta_t, Gaussian decoder: the bound is
    # never below the exact NLL (in expectation) and the gap shrinks as T grows. Measured gaps (nats): T = 25: 0.60,
    # T = 100: 0.18, T = 1000: 0.027, each +- 0.007. A wrong KL (a missing 1/2, a swapped variance ratio) or a wrong
    # posterior makes the gap negative or keeps it large at T = 1000.
    torch.manual_seed(3)
    mu, s = 0.3, 0.1
    x0 = mu + s * torch.randn(20_000, 1, 1, 1, dtype=torch.float64)
    exact = 0.5 * ((x0 - mu) ** 2 / s ** 2 + math.log(2 * math.pi * s ** 2)).flatten()
    gaps = []
    for T in (25, 100, 1000):
        ddpm = M.DDPM(T, "beta", clip=False).double()
        gap = sum(ddpm.nll_bound(gaussian_eps(ddpm, mu, s), x0, discrete=False)) - exact
        se = gap.std() / math.sqrt(len(gap))
        assert gap.mean() > -3 * se, (T, gap.mean(), se)
        gaps.append((gap.mean().item(), se.item()))
    for (g1, se1), (g2, se2) in zip(gaps, gaps[1:]):
        assert g2 < g1 - 3 * math.hypot(se1, se2), gaps
    assert gaps[-1][0] < 0.06, gaps


def test_ddpm_sampler_recovers_gaussian_data():
    # Algorithm 2 with the optimal predictor for N(0.3, 0.5^2): the samples' mean and standard deviation come back
    # to 0.02 (T = 200 leaves a small discretization bias). Dropping the noise term sigma_t z, or using the
    # wrong sigma_t^2 by a large factor, moves the standard deviation far outside the tolerance.
    torch.manual_seed(4)
    mu, s = 0.3, 0.5
    for sigma in ("beta", "posterior"):
        ddpm = M.DDPM(200, sigma, clip=False).double()
        x, _ = ddpm.sample(gaussian_eps(ddpm, mu, s), (20_000, 1, 1, 1))
        assert abs(x.mean() - mu) < 0.02 and abs(x.std() - s) < 0.02, (sigma, x.mean(), x.std())


def test_ddpm_unet_shapes():
    torch.manual_seed(5)
    for size, mult, attn in ((28, (1, 2, 2), (7,)), (32, (1, 2, 2), (16,)), (16, (1, 2), (8,))):
        net = M.UNet(1, 8, mult, attn, size, 1, num_classes=10)
        x = torch.randn(3, 1, size, size)
        t = torch.tensor([1, 500, 1000])
        assert net(x, t).shape == x.shape
        assert net(x, t, torch.tensor([0, 9, 10])).shape == x.shape  # y = 10 is the "no label" class
    net = M.UNet(3, 8, (1, 2), (), 16, 1)
    assert net(torch.randn(2, 3, 16, 16), torch.tensor([7, 8])).shape == (2, 3, 16, 16)


def test_ddpm_discretized_decoder_sums_to_one():
    # The 256 bins must cover the real line: edges at -inf and +inf. Without them the sum falls short by
    # Phi((-1 - mean) / std) + 1 - Phi((1 - mean) / std), 0.16 for the mean at -0.99.
    values = (torch.arange(256, dtype=torch.float64) / 127.5 - 1).view(256, 1)
    for mean, var in ((-0.99, 1e-4), (0.0, 0.3), (0.7, 0.02), (1.2, 1e-2)):
        logp = M.discretized_gaussian_log_prob(values, torch.full((256, 1), mean, dtype=torch.float64),
                                               torch.full((256, 1), var, dtype=torch.float64))
        assert abs(logp.exp().sum().item() - 1) < 1e-9, (mean, var)


def test_ddpm_smoke_run(tiny_mnist, tmp_path):
    args = ["--data-dir", str(tiny_mnist), "--out-dir", str(tmp_path), "--device", "cpu", "--channels", "8",
            "--channel-mult", "1,2", "--attn-res", "14", "--num-res-blocks", "1", "--timesteps", "25",
            "--batch-size", "8", "--num-samples", "6", "--nll-images", "3", "--log-every", "1"]
    result = M.main(args + ["--steps", "2", "--eval-nll"])
    assert result["step"] == 2 and math.isfinite(result["nll_bpd"]) and result["nll_bpd"] > 0
    for name in ("ckpt.pt", "samples.png", "samples.npz", "trajectory.png"):
        assert (tmp_path / name).exists(), name
    images = np.load(tmp_path / "samples.npz")["images"]
    assert images.shape == (6, 1, 28, 28) and images.dtype == np.uint8
    assert "ema" in torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert M.main(args + ["--steps", "3", "--resume"])["step"] == 3
    result = M.main(args + ["--steps", "3", "--sample-only", "--eval-nll"])
    assert result["step"] == 3 and math.isfinite(result["nll_bpd"])


@pytest.mark.parametrize("flags", [["--timesteps", "10"], ["--sigma", "large"], ["--attn-res", "5"],
                                   ["--channel-mult", "1,2,2,2"], ["--ema-decay", "1"]])
def test_ddpm_bad_input_exits_with_one_message(flags, capsys):
    with pytest.raises(SystemExit) as e:
        M.main(flags + ["--device", "cpu"])
    assert e.value.code != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) >= 1 and "error:" in err[-1], err


LOSS_MAX = 0.05  # L_simple of the last 125 steps; seeds 0, 1, 2 gave 0.0387, 0.0383, 0.0399 (untrained: 1.004)
CONFIDENT_MIN = 0.05  # fraction of samples with confidence > 0.9; seeds 0, 1, 2 gave 0.110, 0.210, 0.215 (untrained: 0.000)


@pytest.mark.slow
def test_ddpm_learns_mnist(mnist_dir, short_classifier, tmp_path):
    # A shortened run, not the CPU recipe: 250 steps (about 50 s here) of a 16-channel U-Net on a 50-step chain,
    # 200 samples scored by the session's short classifier. Thresholds: the worst of three seeds with a margin
    # (values beside LOSS_MAX and CONFIDENT_MIN). The untrained model (output layer zeroed, so it predicts
    # eps = 0) has L_simple = 1 and draws noise that the classifier is never confident about.
    args = ["--data-dir", mnist_dir, "--device", "cpu", "--channels", "16", "--attn-res=", "--num-res-blocks", "1",
            "--timesteps", "50", "--batch-size", "64", "--lr", "1e-3", "--ema-decay", "0.995", "--log-every", "125",
            "--seed", "0"]
    untrained = M.main(args + ["--steps", "0", "--num-samples", "50", "--out-dir", str(tmp_path / "untrained")])
    x0 = M.load_mnist(mnist_dir)[0][:256].float().div(127.5).sub(1).unsqueeze(1)
    untrained_loss = M.DDPM(50).loss(M.UNet(1, 16, (1, 2, 2), (), 28, 1), x0).item()
    untrained_confident = score_samples(short_classifier, mnist_dir, np.load(tmp_path / "untrained" / "samples.npz")["images"])["confident"]
    assert untrained["step"] == 0 and untrained_loss > LOSS_MAX and untrained_confident < CONFIDENT_MIN, (untrained_loss, untrained_confident)
    result = M.main(args + ["--steps", "250", "--num-samples", "200", "--out-dir", str(tmp_path / "trained")])
    confident = score_samples(short_classifier, mnist_dir, np.load(tmp_path / "trained" / "samples.npz")["images"])["confident"]
    assert result["loss"] < LOSS_MAX, result
    assert confident > CONFIDENT_MIN, confident
