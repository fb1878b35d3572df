"""Tests for 05_diffusion_models: ddpm.py (the forward process, the posterior, the loss and the bound against
closed forms for Gaussian data, the U-Net's shapes, the discretized decoder), ddim.py (the DDIM step against DDPM's
posterior, determinism, shared marginals, inversion, exact sample variance), guidance.py (classifier-free guidance's
end points, Bayes' rule on scores, the classifier's gradient), noise_schedules.py (schedules' closed forms, the eps / x0 /
v conversions), smoke runs of every script, bad input, and the learning checks."""

import math
import xml.etree.ElementTree as ET

import numpy as np
import pytest
import torch

from conftest import load_script, score_samples

DDPM_SCRIPT = load_script("05_diffusion_models/ddpm.py")
DDIM_SCRIPT = load_script("05_diffusion_models/ddim.py")
GUIDANCE_SCRIPT = load_script("05_diffusion_models/guidance.py")
SCHEDULES_SCRIPT = load_script("05_diffusion_models/noise_schedules.py")


# --- ddpm.py ---

def gaussian_eps(ddpm, mu, s):
    """The optimal eps-predictor for data x0 ~ N(mu, s^2 I) (README Eq. 3.7): E[eps | x_t] =
    sqrt(1 - ab) / (ab s^2 + 1 - ab) (x_t - sqrt(ab) mu), because (eps, x_t) are jointly Gaussian."""
    ab_all = DDPM_SCRIPT.alpha_bar(ddpm.betas)

    def eps_model(xt, t):
        ab = DDPM_SCRIPT.per_sample(ab_all[t], xt)
        return (1 - ab).sqrt() / (ab * s ** 2 + 1 - ab) * (xt - ab.sqrt() * mu)
    return eps_model


def test_ddpm_schedule_endpoints():
    betas = DDPM_SCRIPT.linear_betas(1000)
    assert betas.shape == (1001,) and betas[0] == 0
    assert torch.isclose(betas[1], torch.tensor(1e-4, dtype=torch.float64)) and torch.isclose(betas[-1], torch.tensor(0.02, dtype=torch.float64))
    # rescaled by 1000 / T, a chain of any length ends at nearly pure noise (alpha_bar_T = 4.0e-5 at T = 1000,
    # 7.7e-6 at T = 50) and passes alpha_bar = 0.07 to 0.08 half way; without the rescaling T = 50 would end at 0.6
    for T in (50, 200, 1000):
        ab = DDPM_SCRIPT.alpha_bar(DDPM_SCRIPT.linear_betas(T))
        assert 5e-6 < ab[-1] < 5e-5 and 0.06 < ab[T // 2] < 0.09


def test_ddpm_q_sample_moments():
    # 200 000 draws of x_t for three t: mean and variance within 3 standard errors of sqrt(ab) x0, 1 - ab.
    # Using alpha_t instead of alpha_bar_t (a classic slip) moves the mean at t = 500 from 0.28 x0 to 0.99 x0.
    gen = torch.Generator().manual_seed(0)
    betas = DDPM_SCRIPT.linear_betas(1000)
    ab = DDPM_SCRIPT.alpha_bar(betas)
    x0 = torch.tensor([0.8, -0.5, 0.1], dtype=torch.float64).view(1, 3, 1, 1)
    n = 200_000
    for t in (1, 500, 1000):
        eps = torch.randn(n, 3, 1, 1, generator=gen, dtype=torch.float64)
        xt = DDPM_SCRIPT.q_sample(x0.expand(n, 3, 1, 1), torch.full((n,), t), eps, betas)
        mean, var = xt.mean(0).flatten(), xt.var(0).flatten()
        true_mean, true_var = ab[t].sqrt() * x0.flatten(), 1 - ab[t]
        assert ((mean - true_mean).abs() < 3 * (true_var / n).sqrt()).all(), (t, mean, true_mean)
        assert ((var - true_var).abs() < 3 * true_var * math.sqrt(2 / (n - 1))).all(), (t, var, true_var)


def test_ddpm_posterior_is_gaussian_conditioning():
    # Brute force: x_{t-1} = sqrt(ab_{t-1}) x0 + sqrt(1 - ab_{t-1}) e1, x_t = sqrt(alpha_t) x_{t-1} + sqrt(beta_t) e2;
    # condition the 2 x 2 joint Gaussian on x_t. Swapping alpha_bar_{t-1} for alpha_bar_t anywhere fails by > 1e-3.
    gen = torch.Generator().manual_seed(1)
    betas = DDPM_SCRIPT.linear_betas(1000)
    ab = DDPM_SCRIPT.alpha_bar(betas)
    t = torch.arange(2, 1001)
    x0 = torch.randn(len(t), 1, 1, 1, generator=gen, dtype=torch.float64)
    xt = torch.randn(len(t), 1, 1, 1, generator=gen, dtype=torch.float64)
    mean, var = DDPM_SCRIPT.q_posterior(x0, xt, t, betas)
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
    ddpm = DDPM_SCRIPT.DDPM(1000, clip=False).double()
    eps_model = gaussian_eps(ddpm, mu, s)
    losses = torch.stack([ddpm.loss(eps_model, mu + s * torch.randn(20_000, 1, 2, 2, dtype=torch.float64)) for _ in range(20)])
    ab = DDPM_SCRIPT.alpha_bar(ddpm.betas)[1:]
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
        ddpm = DDPM_SCRIPT.DDPM(T, "beta", clip=False).double()
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
        ddpm = DDPM_SCRIPT.DDPM(200, sigma, clip=False).double()
        x, _ = ddpm.sample(gaussian_eps(ddpm, mu, s), (20_000, 1, 1, 1))
        assert abs(x.mean() - mu) < 0.02 and abs(x.std() - s) < 0.02, (sigma, x.mean(), x.std())


def test_ddpm_unet_shapes():
    torch.manual_seed(5)
    for size, mult, attn in ((28, (1, 2, 2), (7,)), (32, (1, 2, 2), (16,)), (16, (1, 2), (8,))):
        net = DDPM_SCRIPT.UNet(1, 8, mult, attn, size, 1, num_classes=10)
        x = torch.randn(3, 1, size, size)
        t = torch.tensor([1, 500, 1000])
        assert net(x, t).shape == x.shape
        assert net(x, t, torch.tensor([0, 9, 10])).shape == x.shape  # y = 10 is the "no label" class
    net = DDPM_SCRIPT.UNet(3, 8, (1, 2), (), 16, 1)
    assert net(torch.randn(2, 3, 16, 16), torch.tensor([7, 8])).shape == (2, 3, 16, 16)


def test_ddpm_discretized_decoder_sums_to_one():
    # The 256 bins must cover the real line: edges at -inf and +inf. Without them the sum falls short by
    # Phi((-1 - mean) / std) + 1 - Phi((1 - mean) / std), 0.16 for the mean at -0.99.
    values = (torch.arange(256, dtype=torch.float64) / 127.5 - 1).view(256, 1)
    for mean, var in ((-0.99, 1e-4), (0.0, 0.3), (0.7, 0.02), (1.2, 1e-2)):
        logp = DDPM_SCRIPT.discretized_gaussian_log_prob(values, torch.full((256, 1), mean, dtype=torch.float64),
                                               torch.full((256, 1), var, dtype=torch.float64))
        assert abs(logp.exp().sum().item() - 1) < 1e-9, (mean, var)


def test_ddpm_smoke_run(tiny_mnist, tmp_path):
    args = ["--data-dir", str(tiny_mnist), "--out-dir", str(tmp_path), "--device", "cpu", "--channels", "8",
            "--channel-mult", "1,2", "--attn-res", "14", "--num-res-blocks", "1", "--timesteps", "25",
            "--batch-size", "8", "--num-samples", "6", "--nll-images", "3", "--log-every", "1"]
    result = DDPM_SCRIPT.main(args + ["--steps", "2", "--eval-nll"])
    assert result["step"] == 2 and math.isfinite(result["nll_bpd"]) and result["nll_bpd"] > 0
    for name in ("ckpt.pt", "samples.png", "samples.npz", "trajectory.png"):
        assert (tmp_path / name).exists(), name
    images = np.load(tmp_path / "samples.npz")["images"]
    assert images.shape == (6, 1, 28, 28) and images.dtype == np.uint8
    assert "ema" in torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert DDPM_SCRIPT.main(args + ["--steps", "3", "--resume", "--amp"])["step"] == 3  # --amp: bf16 autocast on the CPU too
    result = DDPM_SCRIPT.main(args + ["--steps", "3", "--sample-only", "--eval-nll"])
    assert result["step"] == 3 and math.isfinite(result["nll_bpd"])


def test_ddpm_amp_engages_on_cpu(tiny_mnist, tmp_path):
    """The CPU recipe relies on --amp: with it the same seed trains different (bf16-rounded) weights."""
    args = ["--data-dir", str(tiny_mnist), "--device", "cpu", "--channels", "8", "--channel-mult", "1,2", "--attn-res=",
            "--num-res-blocks", "1", "--timesteps", "25", "--batch-size", "8", "--num-samples", "2", "--steps", "2"]
    weights = []
    for amp in ([], ["--amp"]):
        DDPM_SCRIPT.main(args + amp + ["--out-dir", str(tmp_path / str(len(amp)))])
        weights.append(torch.load(tmp_path / str(len(amp)) / "ckpt.pt", weights_only=True)["model"])
    assert all(v.dtype == torch.float32 for v in weights[1].values() if v.is_floating_point())  # float32 master weights
    assert any(not torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


@pytest.mark.parametrize("flags", [["--timesteps", "10"], ["--sigma", "large"], ["--attn-res", "5"],
                                   ["--channel-mult", "1,2,2,2"], ["--ema-decay", "1"]])
def test_ddpm_bad_input_exits_with_one_message(flags, capsys):
    with pytest.raises(SystemExit) as e:
        DDPM_SCRIPT.main(flags + ["--device", "cpu"])
    assert e.value.code != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) >= 1 and "error:" in err[-1], err


DDPM_LOSS_MAX = 0.05  # L_simple of the last 125 steps; seeds 0, 1, 2 gave 0.0387, 0.0383, 0.0399 (untrained: 1.004)
DDPM_CONFIDENT_MIN = 0.05  # fraction of samples with confidence > 0.9; seeds 0, 1, 2 gave 0.110, 0.210, 0.215 (untrained: 0.000)


@pytest.mark.slow
def test_ddpm_learns_mnist(mnist_dir, short_classifier, tmp_path):
    # A shortened run, not the CPU recipe: 250 steps (about 50 s here) of a 16-channel U-Net on a 50-step chain,
    # 200 samples scored by the session's short classifier. Thresholds: the worst of three seeds with a margin
    # (values beside DDPM_LOSS_MAX and DDPM_CONFIDENT_MIN). The untrained model (output layer zeroed, so it predicts
    # eps = 0) has L_simple = 1 and draws noise that the classifier is never confident about.
    args = ["--data-dir", mnist_dir, "--device", "cpu", "--channels", "16", "--attn-res=", "--num-res-blocks", "1",
            "--timesteps", "50", "--batch-size", "64", "--lr", "1e-3", "--ema-decay", "0.995", "--log-every", "125",
            "--seed", "0"]
    untrained = DDPM_SCRIPT.main(args + ["--steps", "0", "--num-samples", "50", "--out-dir", str(tmp_path / "untrained")])
    x0 = DDPM_SCRIPT.load_mnist(mnist_dir)[0][:256].float().div(127.5).sub(1).unsqueeze(1)
    untrained_loss = DDPM_SCRIPT.DDPM(50).loss(DDPM_SCRIPT.UNet(1, 16, (1, 2, 2), (), 28, 1), x0).item()
    untrained_confident = score_samples(short_classifier, mnist_dir, np.load(tmp_path / "untrained" / "samples.npz")["images"])["confident"]
    assert untrained["step"] == 0 and untrained_loss > DDPM_LOSS_MAX and untrained_confident < DDPM_CONFIDENT_MIN, (untrained_loss, untrained_confident)
    result = DDPM_SCRIPT.main(args + ["--steps", "250", "--num-samples", "200", "--out-dir", str(tmp_path / "trained")])
    confident = score_samples(short_classifier, mnist_dir, np.load(tmp_path / "trained" / "samples.npz")["images"])["confident"]
    assert result["loss"] < DDPM_LOSS_MAX, result
    assert confident > DDPM_CONFIDENT_MIN, confident


# --- ddim.py ---

def test_ddim_step_eta_one_is_ddpm_posterior_step():
    # eta = 1 between consecutive steps t -> t - 1: ddim_step is affine in the noise, so its mean is the step with
    # noise 0 and its standard deviation the change for noise 1. Both must equal DDPM's posterior q(x_{t-1} | x_t,
    # x0_hat) (ddpm.py's q_posterior, Eq. 2.4, 2.5). Dropping sigma^2 from sqrt(1 - ab_prev - sigma^2) moves the mean
    # by ~1e-2 at t = 500; a sigma without the factor sqrt(1 - ab_t / ab_prev) is ~20x too large.
    torch.manual_seed(0)
    betas = DDIM_SCRIPT.linear_betas(1000)
    ab = DDIM_SCRIPT.alpha_bar(betas)
    for t in (2, 10, 500, 999, 1000):
        xt, eps = torch.randn(64, 1, 4, 4, dtype=torch.float64), torch.randn(64, 1, 4, 4, dtype=torch.float64)
        x0_hat = (xt - (1 - ab[t]).sqrt() * eps) / ab[t].sqrt()
        mean = DDIM_SCRIPT.ddim_step(xt, eps, ab[t], ab[t - 1], 1.0, torch.zeros_like(xt))
        std = DDIM_SCRIPT.ddim_step(xt, eps, ab[t], ab[t - 1], 1.0, torch.ones_like(xt)) - mean
        mean_q, var_q = DDPM_SCRIPT.q_posterior(x0_hat, xt, torch.full((64,), t), betas)
        assert torch.allclose(mean, mean_q, rtol=0, atol=1e-10), (t, (mean - mean_q).abs().max())
        assert torch.allclose(std ** 2, var_q.expand_as(std), rtol=1e-9, atol=0), t


def test_ddim_eta_zero_is_deterministic():
    # Two runs with different noise give identical samples at eta = 0 (and different ones at eta = 1, so the noise
    # does reach the step): a sampler that adds the noise whatever eta is fails the first check.
    ddim = DDIM_SCRIPT.DDIM(100).double()
    eps_model = gaussian_eps(ddim, 0.3, 0.5)
    xT = torch.randn(500, 1, 1, 1, dtype=torch.float64)
    runs = {}
    for eta in (0.0, 1.0):
        torch.manual_seed(1)
        a = ddim.sample(eps_model, xT, 20, eta)
        torch.manual_seed(2)
        runs[eta] = (a, ddim.sample(eps_model, xT, 20, eta))
    assert torch.equal(*runs[0.0])
    assert (runs[1.0][0] - runs[1.0][1]).abs().max() > 0.1


def test_ddim_forward_process_has_ddpm_marginals():
    # Lemma 1 of Song et al. (README Eq. 4.5): run the non-Markovian forward process q_sigma downwards along tau
    # (x_T ~ q(x_T | x0), then x_s ~ q_sigma(x_s | x_t, x0), which is ddim_step with the true noise of x_t) and
    # every x_s has DDPM's marginal N(sqrt(ab_s) x0, (1 - ab_s) I), whatever eta. Checked within 3 standard errors
    # at five steps; a sigma formula off by a factor, or sqrt(1 - ab_s) in place of sqrt(1 - ab_s - sigma^2), moves
    # the variance by many standard errors at eta = 1.
    torch.manual_seed(3)
    betas, n = DDIM_SCRIPT.linear_betas(1000), 40_000
    ab = DDIM_SCRIPT.alpha_bar(betas)
    tau = DDIM_SCRIPT.sub_sequence(1000, 50)
    x0 = 0.3 + 0.5 * torch.randn(n, dtype=torch.float64)
    for eta in (0.0, 0.5, 1.0):
        x = ab[1000].sqrt() * x0 + (1 - ab[1000]).sqrt() * torch.randn(n, dtype=torch.float64)
        for t, s in zip(tau[:-1], tau[1:]):
            eps = (x - ab[t].sqrt() * x0) / (1 - ab[t]).sqrt()
            x = DDIM_SCRIPT.ddim_step(x, eps, ab[t], ab[s], eta, torch.randn(n, dtype=torch.float64))
            if s in tau[1:-1:12]:  # steps 980, 736, 491, 246, 1 of tau
                r = x - ab[s].sqrt() * x0  # should be N(0, 1 - ab_s)
                var = 1 - ab[s]
                assert abs(r.mean()) < 3 * math.sqrt(var / n), (eta, s, r.mean())
                assert abs(r.var() - var) < 3 * var * math.sqrt(2 / n), (eta, s, r.var(), var)
        assert torch.allclose(x, x0, atol=1e-9)  # the last step lands on t = 0: x0 itself


def test_ddim_sub_sequences():
    # tau starts at T, decreases strictly, ends at step 1 and then 0, and has S network steps; S = T visits every
    # step. Rounding the raw quadratic schedule would repeat steps near t = 1 (a step of zero length).
    for T, S in ((1000, 10), (1000, 50), (1000, 100), (1000, 999), (25, 20), (50, 2)):
        for skip in ("uniform", "quadratic"):
            tau = DDIM_SCRIPT.sub_sequence(T, S, skip)
            assert len(tau) == S + 1 and tau[0] == T and tau[-2:] == [1, 0], (T, S, skip, tau)
            assert all(a > b for a, b in zip(tau, tau[1:])), (T, S, skip, tau)
    assert DDIM_SCRIPT.sub_sequence(30, 30) == list(range(30, -1, -1)) == DDIM_SCRIPT.sub_sequence(30, 30, "quadratic")
    assert DDIM_SCRIPT.sub_sequence(1000, 1) == [1000, 0]
    gaps = -np.diff(DDIM_SCRIPT.sub_sequence(1000, 10, "quadratic")[:-1])
    assert (np.diff(gaps) < 0).all()  # quadratic: the gaps shrink towards the data


INVERSION_ERRORS = {10: 0.59, 100: 0.056, 1000: 0.0056}  # measured max |error| for N(0.3, 0.5^2) data: about 5.6 / S


def test_ddim_inversion_round_trip_with_optimal_predictor():
    # With the closed-form predictor, x0 -> x_T -> x0 at eta = 0 returns the input up to the discretization error
    # of the backward Euler steps, which falls like 1 / S (max |error| 0.59, 0.056, 0.0056 at S = 10, 100, 1000 for
    # data of standard deviation 0.5). Evaluating eps at the wrong step (t = s) or running the steps in the wrong
    # order leaves errors of order 1 at every S.
    torch.manual_seed(4)
    ddim = DDIM_SCRIPT.DDIM(1000).double()
    eps_model = gaussian_eps(ddim, 0.3, 0.5)
    x0 = 0.3 + 0.5 * torch.randn(2000, 1, 1, 1, dtype=torch.float64)
    errors = {}
    for S in INVERSION_ERRORS:
        xT = ddim.invert(eps_model, x0, S)
        errors[S] = (ddim.sample(eps_model, xT, S) - x0).abs().max().item()
        assert abs(xT.std().item() - 1) < 0.05, (S, xT.std())  # the data really went to noise
    assert errors[100] < 0.07, errors  # the stated tolerance at S = 100
    assert errors[10] > errors[100] > errors[1000], errors
    for S, measured in INVERSION_ERRORS.items():
        assert errors[S] < 1.2 * measured, (S, errors)


def exact_eta0_variance(ddim, S, s):
    """Var of the eta = 0 sampler's output for N(mu, s^2) data from x_T ~ N(0, 1): each step is linear in
    y_t = x_t - sqrt(ab_t) mu, with the factor (sqrt(ab_s ab_t) s^2 + sqrt((1 - ab_s)(1 - ab_t))) / (ab_t s^2 + 1 - ab_t)."""
    ab, factor = DDIM_SCRIPT.alpha_bar(ddim.betas), 1.0
    tau = DDIM_SCRIPT.sub_sequence(ddim.T, S)
    for t, u in zip(tau[:-1], tau[1:]):
        factor *= ((ab[u] * ab[t]).sqrt() * s ** 2 + ((1 - ab[u]) * (1 - ab[t])).sqrt()) / (ab[t] * s ** 2 + 1 - ab[t])
    return factor.item() ** 2


def test_ddim_samples_gaussian_data():
    # The sampler with the optimal predictor for N(0.3, 0.5^2), n = 40 000. Mean: mu within 3 standard errors for
    # eta = 0 and 1 at S = 50 and 1000 (every step maps E[x_t] = sqrt(ab_t) mu to sqrt(ab_s) mu exactly). Variance: at
    # S = 1000 it is s^2 within 3 standard errors for both eta. At S = 50 it is NOT: each deterministic step shrinks
    # the spread (by Cauchy-Schwarz its factor is at most sqrt(Var x_s / Var x_t)); exact_eta0_variance gives 0.2227
    # for eta = 0 (11 % low) and the samples match that within 3 standard errors; eta = 1 at S = 50 came out 0.195.
    mu, s, n = 0.3, 0.5, 40_000
    ddim = DDIM_SCRIPT.DDIM(1000).double()
    eps_model = gaussian_eps(ddim, mu, s)
    for S in (50, 1000):
        for eta in (0.0, 1.0):
            torch.manual_seed(5)
            x = ddim.sample(eps_model, torch.randn(n, 1, 1, 1, dtype=torch.float64), S, eta)
            se_mean, se_var = s / math.sqrt(n), s ** 2 * math.sqrt(2 / n)
            assert abs(x.mean().item() - mu) < 3 * se_mean, (S, eta, x.mean())
            target = s ** 2 if S == 1000 else exact_eta0_variance(ddim, S, s) if eta == 0 else None
            if target is not None:
                assert abs(x.var().item() - target) < 3 * se_var, (S, eta, x.var(), target)
    assert abs(exact_eta0_variance(ddim, 50, s) - 0.2227) < 1e-3


def ddim_tiny_args(tiny_mnist, out):
    return ["--data-dir", str(tiny_mnist), "--out-dir", str(out), "--device", "cpu", "--channels", "8", "--channel-mult", "1,2",
            "--attn-res", "14", "--num-res-blocks", "1", "--timesteps", "25", "--batch-size", "8", "--num-samples", "6",
            "--log-every", "1"]


def test_ddim_smoke_run_from_ddpm_checkpoint(tiny_mnist, tmp_path):
    # A tiny ddpm.py run gives the checkpoint; ddim.py samples from it without training (no ckpt.pt of its own).
    DDPM_SCRIPT.main(ddim_tiny_args(tiny_mnist, tmp_path / "ddpm") + ["--steps", "2", "--num-samples", "2"])
    args = ["--ckpt", str(tmp_path / "ddpm" / "ckpt.pt"), "--data-dir", str(tiny_mnist), "--out-dir", str(tmp_path / "ddim"),
            "--device", "cpu", "--num-samples", "6", "--sample-steps", "5"]
    result = DDIM_SCRIPT.main(args + ["--eta", "0.5", "--skip", "quadratic"])
    assert result["step"] == 2 and set(result["samples"]) == {5} and math.isfinite(result["inversion_rmse"])
    for name in ("samples.png", "samples.npz", "inversion.png", "interpolation.png"):
        assert (tmp_path / "ddim" / name).exists(), name
    assert not (tmp_path / "ddim" / "ckpt.pt").exists()
    images = np.load(tmp_path / "ddim" / "samples.npz")["images"]
    assert images.shape == (6, 1, 28, 28) and images.dtype == np.uint8
    result = DDIM_SCRIPT.main(args + ["--sweep", "--sweep-steps", "2,5,100"])  # 100 is clipped to the checkpoint's T = 25
    assert set(result["samples"]) == {2, 5, 25}
    for S in (2, 5, 25):
        assert np.load(tmp_path / "ddim" / f"samples_{S}.npz")["images"].shape == (6, 1, 28, 28)


def test_ddim_smoke_run_training_its_own(tiny_mnist, tmp_path):
    args = ddim_tiny_args(tiny_mnist, tmp_path) + ["--ckpt", str(tmp_path / "missing.pt"), "--sample-steps", "4"]
    result = DDIM_SCRIPT.main(args + ["--steps", "2"])
    assert result["step"] == 2 and math.isfinite(result["loss"])
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert set(ckpt) == {"model", "ema", "optimizer", "config", "step"}
    assert (tmp_path / "samples.npz").exists() and (tmp_path / "inversion.png").exists()
    assert DDIM_SCRIPT.main(args + ["--steps", "3", "--resume"])["step"] == 3
    assert DDIM_SCRIPT.main(args + ["--steps", "3", "--sample-only"])["step"] == 3
    assert DDIM_SCRIPT.main(args + ["--ckpt", str(tmp_path / "ckpt.pt")])["step"] == 3  # its own checkpoint loads as a ddpm.py one


@pytest.mark.parametrize("flags", [["--eta", "-0.5"], ["--skip", "cubic"], ["--sweep-steps", "10,,20"], ["--sample-steps", "0"],
                                   ["--sample-steps", "30"], ["--ckpt", "GARBAGE"], ["--ckpt", "OTHER"]])
def test_ddim_bad_input_exits_with_one_message(flags, tiny_mnist, tmp_path, capsys):
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    torch.save({"config": {"channels": 8}, "ema": {}, "step": 0}, tmp_path / "other.pt")  # another model's checkpoint
    flags = [{"GARBAGE": str(tmp_path / "garbage.pt"), "OTHER": str(tmp_path / "other.pt")}.get(f, f) for f in flags]
    args = ["--ckpt", "", "--timesteps", "25", "--steps", "0"] + ddim_tiny_args(tiny_mnist, tmp_path)[:6]
    with pytest.raises(SystemExit) as e:
        DDIM_SCRIPT.main(args + flags)  # --sample-steps 30 > T = 25; the others are caught before or while loading
    assert e.value.code not in (0, None)
    message = capsys.readouterr().err.strip().splitlines()[-1:] or [str(e.value.code)]
    assert "error:" in message[-1] and len(str(e.value.code).splitlines()) <= 1, message


DDIM_CONFIDENT_MIN = 0.06  # short classifier, confidence > 0.9, N = 200, S = 20: seeds 0, 1, 2 gave 0.125, 0.105, 0.175; untrained 0.025


@pytest.mark.slow
def test_ddim_learns_mnist(mnist_dir, short_classifier, tmp_path):
    # ddim.py training its own model briefly (not the CPU recipe): 250 steps of a 16-channel U-Net on the T = 1000
    # chain, then 200 samples with S = 20 DDIM steps, scored by the session's short classifier. The untrained model
    # (output layer zeroed: eps = 0, so x0_hat = x_t / sqrt(ab_t), blown-up noise) must fail the same threshold.
    args = ["--ckpt", "", "--data-dir", mnist_dir, "--device", "cpu", "--channels", "16", "--attn-res=", "--num-res-blocks", "1",
            "--batch-size", "64", "--lr", "1e-3", "--ema-decay", "0.995", "--log-every", "150", "--sample-steps", "20",
            "--num-samples", "200", "--seed", "0"]
    DDIM_SCRIPT.main(args + ["--steps", "0", "--out-dir", str(tmp_path / "untrained")])
    untrained = score_samples(short_classifier, mnist_dir, np.load(tmp_path / "untrained" / "samples.npz")["images"])["confident"]
    assert untrained < DDIM_CONFIDENT_MIN, untrained
    DDIM_SCRIPT.main(args + ["--steps", "250", "--out-dir", str(tmp_path / "trained")])
    confident = score_samples(short_classifier, mnist_dir, np.load(tmp_path / "trained" / "samples.npz")["images"])["confident"]
    assert confident > DDIM_CONFIDENT_MIN, confident


# --- guidance.py ---

def randomized(net, seed=0):
    """The net with its zero-initialized layers (output conv, each ResBlock's second conv) filled with small random
    weights: at initialization the class embedding cannot reach the output, so nothing label-dependent could fail."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            if not p.any():
                p.normal_(0, 0.1)
    return net


def test_guidance_cfg_end_points():
    # Eq. 5.7: w = 0 is the conditional prediction and w = -1 the unconditional one, exactly. Swapping the two
    # predictions in cfg_eps, or writing w eps_cond - (w - 1) eps_uncond, breaks both by the gap measured below.
    torch.manual_seed(1)
    unet = randomized(GUIDANCE_SCRIPT.UNet(1, 8, (1, 2), (), 28, 1, 0.0, 10)).eval()
    guidance = GUIDANCE_SCRIPT.Guidance(100)
    x, t, y = torch.randn(6, 1, 28, 28), torch.randint(1, 101, (6,)), torch.arange(6) % 10
    with torch.no_grad():
        eps_cond, eps_uncond = unet(x, t, y), unet(x, t, None)
        assert (eps_cond - eps_uncond).abs().max() > 1e-3  # the label matters, so the test can fail
        w0 = guidance.eps(unet, None, x, t, y, "cfg", 0.0)
        w_minus1 = guidance.eps(unet, None, x, t, y, "cfg", -1.0)
    assert torch.equal(w0, eps_cond)
    assert torch.equal(w_minus1, eps_uncond)
    assert torch.equal(GUIDANCE_SCRIPT.cfg_eps(eps_cond, eps_uncond, 3.0), 4 * eps_cond - 3 * eps_uncond)


def mixture(guidance, mu, s):
    """Data x0 ~ sum_y (1/2) N(mu_y, s^2), one dimension, as (B, 1). Every q_t(x_t | y) is N(sqrt(ab) mu_y, v) with
    v = ab s^2 + 1 - ab (section 1, Eq. 1.4), so the exact predictors are closed forms: eps*(x_t, y) = sqrt(1 - ab)
    (x_t - sqrt(ab) mu_y) / v (section 3, Eq. 3.7), eps*(x_t) = -sqrt(1 - ab) grad log q_t(x_t) (Eq. 3.5) with the
    mixture's score sum_y r_y(x_t) (-(x_t - sqrt(ab) mu_y) / v), and the exact classifier's logits log N(x_t; sqrt(ab) mu_y, v)."""
    ab_all, mu = GUIDANCE_SCRIPT.alpha_bar(guidance.betas), torch.tensor(mu, dtype=torch.float64)

    def moments(t):
        ab = ab_all[t][:, None]  # (B, 1)
        return ab, ab.sqrt() * mu, ab * s ** 2 + 1 - ab  # (B, 1), (B, 2), (B, 1)

    def classifier(xt, t):
        _, m, v = moments(t)
        return -0.5 * (xt - m) ** 2 / v - 0.5 * torch.log(2 * torch.pi * v)  # (B, 2)

    def eps_model(xt, t, y):
        ab, m, v = moments(t)
        if y is None:
            r = torch.softmax(classifier(xt, t), 1)  # p(y | x_t) with equal priors
            return -(1 - ab).sqrt() * (r * -(xt - m) / v).sum(1, keepdim=True)
        return (1 - ab).sqrt() * (xt - m.gather(1, y[:, None])) / v
    return eps_model, classifier


def test_guidance_bayes_rule_on_a_mixture():
    # Eq. 5.1-5.4: the unconditional eps guided with s = 1 by the exact classifier (its gradient by autograd, through
    # Guidance.eps and classifier_grad) equals the exact conditional eps at every t. Dropping sqrt(1 - ab) from
    # Eq. 5.4, or its sign, leaves an error of order 1 (the unguided gap, asserted, shows the scale); float64 agrees to 1e-15.
    guidance = GUIDANCE_SCRIPT.Guidance(1000).double()
    eps_model, classifier = mixture(guidance, (-1.0, 1.5), 0.5)
    x = torch.linspace(-3, 3, 61, dtype=torch.float64)[:, None]  # (61, 1)
    for t_value in (1, 50, 200, 500, 900):
        t = torch.full((61,), t_value)
        for label in (0, 1):
            y = torch.full((61,), label)
            exact = eps_model(x, t, y)
            guided = guidance.eps(eps_model, classifier, x, t, y, "classifier", 1.0)
            assert torch.allclose(guided, exact, atol=1e-10, rtol=0), (t_value, (guided - exact).abs().max())
            unguided = guidance.eps(eps_model, classifier, x, t, y, "classifier", 0.0)
            assert (unguided - exact).abs().max() > 0.01  # 0.02 (t = 900) to 2.3 (t = 200): the guidance does the work


def test_guidance_classifier_grad_matches_finite_differences():
    # classifier_grad (grad_x log softmax(logits)_y) against central differences of log p(y | x_t, t) in float64, at
    # 8 random pixels of 2 images. The gradient of the raw logit instead of the log-softmax misses by the
    # softmax-weighted gradient of every logit, far beyond the 1e-6 tolerance.
    torch.manual_seed(0)
    classifier = randomized(GUIDANCE_SCRIPT.NoisyClassifier(4)).double().eval()
    x, t, y = torch.randn(2, 1, 28, 28, dtype=torch.float64), torch.tensor([30, 700]), torch.tensor([3, 8])
    grad = GUIDANCE_SCRIPT.classifier_grad(classifier, x, t, y)

    def log_p(z):
        with torch.no_grad():
            return torch.log_softmax(classifier(z, t), 1)[torch.arange(2), y]  # (2,)
    h = 1e-5
    for _ in range(8):
        i, j = torch.randint(28, (2,)).tolist()
        e = torch.zeros_like(x)
        e[:, 0, i, j] = h
        fd = (log_p(x + e) - log_p(x - e)) / (2 * h)
        assert torch.allclose(grad[:, 0, i, j], fd, atol=1e-7, rtol=1e-6), (grad[:, 0, i, j], fd)
    assert grad.abs().max() > 1e-4  # not trivially zero


def test_guidance_label_dropout_rate():
    # Eq. 5.8: a fraction p_uncond of labels becomes the null index 10 (within 3 standard errors), the rest unchanged.
    # Dropping with probability 1 - p, or to index 0 instead of 10, fails by hundreds of standard errors.
    torch.manual_seed(0)
    n, p = 100_000, 0.2
    y = torch.randint(0, 10, (n,))
    dropped = GUIDANCE_SCRIPT.drop_labels(y, p, 10)
    null = dropped == 10
    assert abs(null.double().mean().item() - p) < 3 * (p * (1 - p) / n) ** 0.5
    assert torch.equal(dropped[~null], y[~null])


def guidance_tiny_args(data_dir, out_dir):
    return ["--device", "cpu", "--data-dir", str(data_dir), "--out-dir", str(out_dir), "--batch-size", "8", "--channels", "8",
            "--channel-mult", "1,2", "--attn-res=", "--num-res-blocks", "1", "--clf-channels", "4", "--timesteps", "50",
            "--sample-steps", "3", "--num-samples", "20", "--log-every", "2"]


def test_guidance_smoke_sweep_resume_sample_only(tiny_mnist, tmp_path):
    args = guidance_tiny_args(tiny_mnist, tmp_path)
    result = GUIDANCE_SCRIPT.main(args + ["--steps", "2", "--clf-steps", "3", "--sweep", "--clf-scales", "0,1", "--cfg-scales", "0,2", "--scale", "2"])
    assert result["step"] == 3 and set(result["sample_time"]) == {"classifier_0", "classifier_1", "cfg_0", "cfg_2"}
    for name in ("classifier_0", "classifier_1", "cfg_0", "cfg_2"):
        data = np.load(tmp_path / f"samples_{name}.npz")
        assert data["images"].dtype == np.uint8 and data["images"].shape == (20, 1, 28, 28)
        assert np.array_equal(data["labels"], np.arange(20) % 10)  # the requested labels, equal numbers per class
    assert (tmp_path / "grid.png").exists() and (tmp_path / "samples_cfg_2.png").exists()
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert {"model", "ema", "classifier", "optimizer", "config", "step"} <= set(ckpt) and set(ckpt["optimizer"]) == {"model", "classifier"}
    assert GUIDANCE_SCRIPT.main(args + ["--steps", "4", "--clf-steps", "3", "--resume"])["step"] == 4
    GUIDANCE_SCRIPT.main(args + ["--steps", "4", "--sample-only", "--guidance", "classifier", "--scale", "1"])
    data = np.load(tmp_path / "samples.npz")
    assert np.array_equal(data["labels"], np.arange(20) % 10) and torch.load(tmp_path / "ckpt.pt", weights_only=True)["step"] == 4


@pytest.mark.parametrize("flags", [["--p-uncond", "1"], ["--guidance", "both"], ["--cfg-scales", "1,x"],
                                   ["--sample-steps", "0"], ["--clf-steps", "-1"]])
def test_guidance_bad_input(flags, capsys):
    with pytest.raises(SystemExit) as e:
        GUIDANCE_SCRIPT.main(flags)
    assert e.value.code != 0 and "error" in capsys.readouterr().err


def in_class(short_classifier, mnist_dir, path):
    data = np.load(path)
    classes = score_samples(short_classifier, mnist_dir, data["images"])["classes"].numpy()
    return float((classes == data["labels"]).mean())


STEPS = 250
GUIDANCE_MARGIN = 0.25  # in-class gap, guided minus unguided, at STEPS: seeds 0, 1, 2 gave 0.390, 0.420, 0.395; worst minus 0.14


@pytest.mark.slow
def test_guidance_cfg_beats_unguided_at_the_requested_class(mnist_dir, short_classifier, tmp_path):
    # A shortened run, not the CPU recipe (the whole test about 70 s here, the session's classifier included): STEPS
    # steps of a 16-channel conditional U-Net (no classifier), then 200 samples (20 per class) with 10 DDIM steps,
    # classifier-free at w = 3 and unguided unconditional (s = 0), scored by the session's short classifier. The check:
    # the fraction classified as the requested class is higher with guidance by GUIDANCE_MARGIN, the worst of three seeds minus
    # a margin (values beside GUIDANCE_MARGIN; guided 0.50 to 0.53, unguided 0.08 to 0.135). The untrained model (output layer
    # zeroed: eps = 0 whatever the label) draws the same images for both settings, at chance (0.1 in class).
    args = ["--data-dir", mnist_dir, "--device", "cpu", "--channels", "16", "--attn-res=", "--num-res-blocks", "1",
            "--batch-size", "64", "--lr", "1e-3", "--ema-decay", "0.995", "--clf-steps", "0", "--clf-channels", "4",
            "--sample-steps", "10", "--num-samples", "200", "--sweep", "--clf-scales", "0", "--cfg-scales", "3", "--seed", "0"]

    def gap(out):
        guided, unguided = (in_class(short_classifier, mnist_dir, out / f"samples_{n}.npz") for n in ("cfg_3", "classifier_0"))
        return guided - unguided, guided, unguided
    GUIDANCE_SCRIPT.main(args + ["--steps", "0", "--out-dir", str(tmp_path / "untrained")])
    untrained = gap(tmp_path / "untrained")
    assert untrained[0] < GUIDANCE_MARGIN and untrained[1] < 0.25, untrained
    GUIDANCE_SCRIPT.main(args + ["--steps", str(STEPS), "--log-every", str(STEPS), "--out-dir", str(tmp_path / "trained")])
    trained = gap(tmp_path / "trained")
    assert trained[0] > GUIDANCE_MARGIN, trained


# --- noise_schedules.py ---

@pytest.mark.parametrize("name", ["linear", "cosine", "sigmoid"])
@pytest.mark.parametrize("T", [21, 50, 200, 1000])
def test_noise_schedules_shapes_and_endpoints(name, T):
    # betas (T + 1,) float64 with betas[0] = 0 and every other beta in (0, 0.999]; alpha_bar strictly decreasing from
    # alpha_bar_0 = 1 to near 0. A schedule that forgot the clip has beta_T = 1 and alpha_bar_T = 0 (fails the first
    # and last checks); an off-by-one (betas[0] = beta_1) makes alpha_bar_0 < 1.
    betas = SCHEDULES_SCRIPT.SCHEDULES[name](T)
    ab = SCHEDULES_SCRIPT.alpha_bar(betas)
    assert betas.shape == (T + 1,) and betas.dtype == torch.float64 and betas[0] == 0
    assert (betas[1:] > 0).all() and (betas[1:] <= 0.999).all()
    assert ab[0] == 1 and (ab[1:] < ab[:-1]).all() and ab[-1] > 0
    assert ab[-1] < 1e-4, ab[-1]  # the largest is 4.0e-5 (linear, T = 1000); the unclipped betas would give 0 for cosine, sigmoid


def test_noise_schedules_endpoint_values():
    # The values section 1 and 6 quote. linear at T = 1000: alpha_bar_T = 4.04e-5 (a schedule without the 1000 / T
    # rescaling would give 0.6 at T = 50); cosine and sigmoid: only beta_T is clipped, so alpha_bar_T = 0.001 alpha_bar_{T-1}.
    ab = SCHEDULES_SCRIPT.alpha_bar(SCHEDULES_SCRIPT.linear_betas(1000))
    assert abs(ab[-1].item() - 4.04e-5) < 0.01e-5
    assert SCHEDULES_SCRIPT.alpha_bar(SCHEDULES_SCRIPT.linear_betas(50))[-1] < 1e-4
    for name in ("cosine", "sigmoid"):
        betas = SCHEDULES_SCRIPT.SCHEDULES[name](1000)
        ab = SCHEDULES_SCRIPT.alpha_bar(betas)
        assert betas[-1] == 0.999 and (betas[1:-1] < 0.999).all()
        assert math.isclose(ab[-1].item(), 0.001 * ab[-2].item(), rel_tol=1e-9)


@pytest.mark.parametrize("T", [21, 100, 1000])
def test_noise_schedules_closed_forms(T):
    # alpha_bar from the betas matches Eq. 6.3 (cosine) and Eq. 6.6 (sigmoid, start -3, end 3, tau 1) for t < T, to
    # float64 precision. Dropping the normalization by f(0) shifts the cosine's alpha_bar by 1.6e-4; a sigmoid without
    # the normalization to [0, 1] misses by 5 %.
    u = torch.arange(T, dtype=torch.float64) / T  # t = 0..T-1
    f = lambda u: torch.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    assert torch.allclose(SCHEDULES_SCRIPT.alpha_bar(SCHEDULES_SCRIPT.cosine_betas(T))[:T], f(u) / f(torch.zeros(1, dtype=torch.float64)), rtol=1e-10, atol=0)
    s = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731
    sig = (s(3) - 1 / (1 + torch.exp(-(6 * u - 3)))) / (s(3) - s(-3))
    assert torch.allclose(SCHEDULES_SCRIPT.alpha_bar(SCHEDULES_SCRIPT.sigmoid_betas(T))[:T], sig, rtol=1e-10, atol=0)


def synthetic(n=64, seed=0):
    """(x0, eps, alpha_bar, x_t) in float64, alpha_bar per image spread over (0, 1), shaped (n, 1, 1, 1)."""
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(n, 1, 8, 8, generator=g, dtype=torch.float64) * 2 - 1
    eps = torch.randn(n, 1, 8, 8, generator=g, dtype=torch.float64)
    ab = torch.sigmoid(torch.linspace(-10, 10, n, dtype=torch.float64)).view(-1, 1, 1, 1)
    return x0, eps, ab, ab.sqrt() * x0 + (1 - ab).sqrt() * eps


def test_noise_schedules_conversions_round_trip():
    # Every conversion agrees with the definitions (Eq. 1.4 and 6.7) on synthetic (x0, eps), and chains of them return
    # their input to float64 precision. A sign slip in v (v = sqrt(ab) x0 - sqrt(1 - ab) eps) is off by O(1).
    x0, eps, ab, xt = synthetic()
    v = SCHEDULES_SCRIPT.x0_eps_to_v(x0, eps, ab)
    assert torch.allclose(v, ab.sqrt() * eps - (1 - ab).sqrt() * x0, rtol=0, atol=1e-14)
    tol = dict(rtol=0, atol=1e-9)  # 1 / sqrt(ab) reaches 150 at log-SNR -10
    assert torch.allclose(SCHEDULES_SCRIPT.eps_to_x0(xt, eps, ab), x0, **tol) and torch.allclose(SCHEDULES_SCRIPT.x0_to_eps(xt, x0, ab), eps, **tol)
    assert torch.allclose(SCHEDULES_SCRIPT.v_to_x0(xt, v, ab), x0, **tol) and torch.allclose(SCHEDULES_SCRIPT.v_to_eps(xt, v, ab), eps, **tol)
    for param, out in (("eps", eps), ("x0", x0), ("v", v)):
        x0_hat, eps_hat = SCHEDULES_SCRIPT.PARAMETERIZATIONS[param](xt, out, ab)
        assert torch.allclose(x0_hat, x0, **tol) and torch.allclose(eps_hat, eps, **tol), param
    assert torch.allclose(SCHEDULES_SCRIPT.x0_eps_to_v(SCHEDULES_SCRIPT.v_to_x0(xt, v, ab), SCHEDULES_SCRIPT.v_to_eps(xt, v, ab), ab), v, **tol)
    assert torch.allclose(SCHEDULES_SCRIPT.x0_to_eps(xt, SCHEDULES_SCRIPT.eps_to_x0(xt, eps, ab), ab), eps, **tol)


def test_noise_schedules_loss_weighting_identity():
    # Eq. 6.10, through the code's own loss: one imperfect denoiser (x0_hat, eps_hat consistent with x_t) handed to
    # Diffusion.loss in each parameterization gives per image L_eps = SNR L_x0 and L_v = (1 + SNR) L_x0 at every t.
    # A v target with the wrong sign or an x0 target from the clean digit's neighbour breaks both by O(1).
    torch.manual_seed(0)
    diffusions = {p: SCHEDULES_SCRIPT.Diffusion("cosine", p, 1000).double() for p in ("eps", "x0", "v")}
    ab_all = SCHEDULES_SCRIPT.alpha_bar(diffusions["eps"].betas)
    x0 = torch.rand(200, 1, 8, 8, dtype=torch.float64) * 2 - 1
    eps = torch.randn_like(x0)
    t = torch.randint(1, 1001, (200,))

    def model_for(param):  # the same denoiser, x0_hat = 0.8 x0 + 0.05 shifted by the x_t it sees, in each output unit
        def model(xt, tt):
            ab = SCHEDULES_SCRIPT.per_sample(ab_all[tt], xt)
            x0_hat = 0.8 * x0 + 0.05 + 0.1 * xt
            eps_hat = SCHEDULES_SCRIPT.x0_to_eps(xt, x0_hat, ab)
            return {"eps": eps_hat, "x0": x0_hat, "v": SCHEDULES_SCRIPT.x0_eps_to_v(x0_hat, eps_hat, ab)}[param]
        return model
    losses = {p: d.loss(model_for(p), x0, t, eps, per_image=True) for p, d in diffusions.items()}
    snr = ab_all[t] / (1 - ab_all[t])
    assert torch.allclose(losses["eps"], snr * losses["x0"], rtol=1e-8, atol=0)
    assert torch.allclose(losses["v"], (1 + snr) * losses["x0"], rtol=1e-8, atol=0)
    assert torch.allclose(losses["v"], losses["eps"] / ab_all[t], rtol=1e-8, atol=0)


def gaussian_x0(diffusion, mu, s):
    """The optimal x0-predictor for data N(mu, s^2 I): E[x0 | x_t] = mu + sqrt(ab) s^2 / (ab s^2 + 1 - ab) (x_t - sqrt(ab) mu)."""
    ab_all = SCHEDULES_SCRIPT.alpha_bar(diffusion.betas)

    def x0_star(xt, t):
        ab = SCHEDULES_SCRIPT.per_sample(ab_all[t], xt)
        return mu + ab.sqrt() * s ** 2 / (ab * s ** 2 + 1 - ab) * (xt - ab.sqrt() * mu)
    return x0_star


def test_noise_schedules_sampler_agrees_across_parameterizations():
    # The same closed-form denoiser for Gaussian data, expressed as eps, x0 or v, must give the same DDIM samples from
    # the same x_T (the sampler's conversions are exact), and those samples have the data's mean and (nearly) spread. Feeding
    # v to the sampler as if it were eps, or converting with alpha_bar at the wrong step, breaks the agreement by O(1).
    mu, s, xT = 0.3, 0.5, torch.randn(2000, 1, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    samples = {}
    for name in ("linear", "cosine", "sigmoid"):
        for param in ("eps", "x0", "v"):
            d = SCHEDULES_SCRIPT.Diffusion(name, param, 1000).double()
            x0_star, ab_all = gaussian_x0(d, mu, s), SCHEDULES_SCRIPT.alpha_bar(d.betas)

            def model(xt, t, param=param, x0_star=x0_star, ab_all=ab_all):
                ab, x0 = SCHEDULES_SCRIPT.per_sample(ab_all[t], xt), x0_star(xt, t)
                eps = SCHEDULES_SCRIPT.x0_to_eps(xt, x0, ab)
                return {"eps": eps, "x0": x0, "v": SCHEDULES_SCRIPT.x0_eps_to_v(x0, eps, ab)}[param]
            samples[name, param] = d.sample(model, xT, 50, clip=False)
        for param in ("x0", "v"):
            assert torch.allclose(samples[name, param], samples[name, "eps"], rtol=0, atol=1e-8), (name, param)
        x = samples[name, "eps"]
        # mean: standard error 0.006; spread: S = 50 deterministic steps shrink it by 4 to 7 % (0.465, 0.478, 0.475
        # for linear, cosine, sigmoid; 0.491 at S = 1000), section 4's discretization effect
        assert abs(x.mean().item() - mu) < 0.02 and abs(x.std().item() - s) < 0.05, (name, x.mean(), x.std())


def test_noise_schedules_svg(tmp_path):
    # Valid XML with two panels of three curves (one per schedule), whose points stay inside the panels.
    SCHEDULES_SCRIPT.save_schedules_svg(200, tmp_path / "s.svg")
    root = ET.parse(tmp_path / "s.svg").getroot()
    lines = root.findall("{http://www.w3.org/2000/svg}polyline")
    assert sorted(p.get("class") for p in lines) == sorted(["linear", "cosine", "sigmoid"] * 2)
    for p in lines:
        xy = np.array([[float(c) for c in pair.split(",")] for pair in p.get("points").split()])
        assert len(xy) >= 100 and np.isfinite(xy).all() and (xy[:, 1] >= 40 - 1e-6).all() and (xy[:, 1] <= 270 + 1e-6).all()


def smoke_args(tiny_mnist, out, *extra):
    return ["--device", "cpu", "--data-dir", str(tiny_mnist), "--out-dir", str(out), "--steps", "2", "--batch-size", "8",
            "--channels", "8", "--channel-mult", "1,2", "--attn-res=", "--num-res-blocks", "1", "--timesteps", "50",
            "--sample-steps", "5", "--num-samples", "12", "--test-images", "16", "--log-every", "1",
            "--runs", "cosine:v,linear:eps", *extra]


def test_noise_schedules_smoke(tiny_mnist, tmp_path):
    results = SCHEDULES_SCRIPT.main(smoke_args(tiny_mnist, tmp_path))
    assert set(results) == {"cosine:v", "linear:eps"}
    for run in ("cosine_v", "linear_eps"):
        images = np.load(tmp_path / f"samples_{run}.npz")["images"]
        assert images.shape == (12, 1, 28, 28) and images.dtype == np.uint8
        ckpt = torch.load(tmp_path / f"ckpt_{run}.pt", weights_only=True)
        assert set(ckpt) == {"model", "ema", "optimizer", "config", "step"} and ckpt["step"] == 2
    assert (tmp_path / "schedules.svg").exists() and (tmp_path / "samples.png").exists()
    assert all(len(r["x0_mse"]) == 5 and np.isfinite(r["x0_mse"]).all() for r in results.values())
    SCHEDULES_SCRIPT.main(smoke_args(tiny_mnist, tmp_path, "--resume", "--steps", "3"))
    assert torch.load(tmp_path / "ckpt_cosine_v.pt", weights_only=True)["step"] == 3
    before = np.load(tmp_path / "samples_cosine_v.npz")["images"]
    SCHEDULES_SCRIPT.main(smoke_args(tiny_mnist, tmp_path, "--sample-only", "--steps", "3"))
    assert (np.load(tmp_path / "samples_cosine_v.npz")["images"] == before).all()  # eta = 0 and the same x_T: same samples


@pytest.mark.parametrize("flags", [["--runs", "cosine:w"], ["--runs", "quadratic:eps"], ["--runs", "cosine:v,cosine:v"],
                                   ["--timesteps", "10"], ["--sample-steps", "0"], ["--steps", "-1"]])
def test_noise_schedules_bad_input(flags, capsys):
    with pytest.raises(SystemExit) as e:
        SCHEDULES_SCRIPT.main(flags)
    assert e.value.code != 0 and "error" in capsys.readouterr().err


MSE_MAX = 0.12  # mean x0-MSE yardstick (Eq. 6.11) after 250 steps, seeds 0, 1, 2: 0.1045, 0.1048, 0.1055; untrained 0.469
SCHEDULES_CONFIDENT_MIN = 0.10  # short classifier, confidence > 0.9, N = 200, seeds 0, 1, 2: 0.180, 0.220, 0.205; untrained 0.000
SLOW_ARGS = ["--runs", "cosine:v", "--steps", "250", "--batch-size", "64", "--lr", "1e-3", "--channels", "16", "--attn-res=",
             "--num-res-blocks", "1", "--ema-decay", "0.999", "--log-every", "250", "--num-samples", "200", "--test-images", "200"]


@pytest.mark.slow
def test_noise_schedules_learns(mnist_dir, short_classifier, tmp_path):
    # A 250-step cosine / v run (about 60 s here): its mean x0-MSE yardstick and the short classifier's confident
    # fraction of its 200 samples. Thresholds from seeds 0, 1, 2 (above), worst seed plus or minus a margin; the
    # untrained network (steps 0: it predicts v = 0, so x0_hat = sqrt(alpha_bar) x_t) fails both.
    results = SCHEDULES_SCRIPT.main(SLOW_ARGS + ["--data-dir", mnist_dir, "--out-dir", str(tmp_path / "trained"), "--device", "cpu"])
    untrained = SCHEDULES_SCRIPT.main(SLOW_ARGS + ["--data-dir", mnist_dir, "--out-dir", str(tmp_path / "untrained"), "--device", "cpu",
                                    "--steps", "0", "--num-samples", "100"])
    mse, mse0 = np.mean(results["cosine:v"]["x0_mse"]), np.mean(untrained["cosine:v"]["x0_mse"])
    trained = score_samples(short_classifier, mnist_dir, np.load(tmp_path / "trained" / "samples_cosine_v.npz")["images"])
    random = score_samples(short_classifier, mnist_dir, np.load(tmp_path / "untrained" / "samples_cosine_v.npz")["images"])
    assert mse < MSE_MAX and trained["confident"] > SCHEDULES_CONFIDENT_MIN, (mse, trained["confident"])
    assert mse0 > MSE_MAX and random["confident"] < SCHEDULES_CONFIDENT_MIN, (mse0, random["confident"])
