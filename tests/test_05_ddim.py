"""Tests for 05_diffusion_models/ddim.py: the DDIM step against DDPM's posterior, determinism, the shared marginals
of the non-Markovian forward process, inversion and sampling with the closed-form predictor for Gaussian data, the
sub-sequences, smoke runs (from a ddpm.py checkpoint and training its own), bad input and a learning check."""

import math

import numpy as np
import pytest
import torch

from conftest import load_script, score_samples

M = load_script("05_diffusion_models/ddim.py")
D = load_script("05_diffusion_models/ddpm.py")


def gaussian_eps(ddim, mu, s):
    """The optimal eps-predictor for data x0 ~ N(mu, s^2 I) (README section 3, Eq. 3.7): E[eps | x_t] =
    sqrt(1 - ab) / (ab s^2 + 1 - ab) (x_t - sqrt(ab) mu), because (eps, x_t) are jointly Gaussian."""
    ab_all = M.alpha_bar(ddim.betas)

    def eps_model(xt, t):
        ab = M.per_sample(ab_all[t], xt)
        return (1 - ab).sqrt() / (ab * s ** 2 + 1 - ab) * (xt - ab.sqrt() * mu)
    return eps_model


def test_ddim_step_eta_one_is_ddpm_posterior_step():
    # eta = 1 between consecutive steps t -> t - 1: ddim_step is affine in the noise, so its mean is the step with
    # noise 0 and its standard deviation the change for noise 1. Both must equal DDPM's posterior q(x_{t-1} | x_t,
    # x0_hat) (ddpm.py's q_posterior, Eq. 2.4, 2.5). Dropping sigma^2 from sqrt(1 - ab_prev - sigma^2) moves the mean
    # by ~1e-2 at t = 500; a sigma without the factor sqrt(1 - ab_t / ab_prev) is ~20x too large.
    torch.manual_seed(0)
    betas = M.linear_betas(1000)
    ab = M.alpha_bar(betas)
    for t in (2, 10, 500, 999, 1000):
        xt, eps = torch.randn(64, 1, 4, 4, dtype=torch.float64), torch.randn(64, 1, 4, 4, dtype=torch.float64)
        x0_hat = (xt - (1 - ab[t]).sqrt() * eps) / ab[t].sqrt()
        mean = M.ddim_step(xt, eps, ab[t], ab[t - 1], 1.0, torch.zeros_like(xt))
        std = M.ddim_step(xt, eps, ab[t], ab[t - 1], 1.0, torch.ones_like(xt)) - mean
        mean_q, var_q = D.q_posterior(x0_hat, xt, torch.full((64,), t), betas)
        assert torch.allclose(mean, mean_q, rtol=0, atol=1e-10), (t, (mean - mean_q).abs().max())
        assert torch.allclose(std ** 2, var_q.expand_as(std), rtol=1e-9, atol=0), t


def test_ddim_eta_zero_is_deterministic():
    # Two runs with different noise give identical samples at eta = 0 (and different ones at eta = 1, so the noise
    # does reach the step): a sampler that adds the noise whatever eta is fails the first check.
    ddim = M.DDIM(100).double()
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
    betas, n = M.linear_betas(1000), 40_000
    ab = M.alpha_bar(betas)
    tau = M.sub_sequence(1000, 50)
    x0 = 0.3 + 0.5 * torch.randn(n, dtype=torch.float64)
    for eta in (0.0, 0.5, 1.0):
        x = ab[1000].sqrt() * x0 + (1 - ab[1000]).sqrt() * torch.randn(n, dtype=torch.float64)
        for t, s in zip(tau[:-1], tau[1:]):
            eps = (x - ab[t].sqrt() * x0) / (1 - ab[t]).sqrt()
            x = M.ddim_step(x, eps, ab[t], ab[s], eta, torch.randn(n, dtype=torch.float64))
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
            tau = M.sub_sequence(T, S, skip)
            assert len(tau) == S + 1 and tau[0] == T and tau[-2:] == [1, 0], (T, S, skip, tau)
            assert all(a > b for a, b in zip(tau, tau[1:])), (T, S, skip, tau)
    assert M.sub_sequence(30, 30) == list(range(30, -1, -1)) == M.sub_sequence(30, 30, "quadratic")
    assert M.sub_sequence(1000, 1) == [1000, 0]
    gaps = -np.diff(M.sub_sequence(1000, 10, "quadratic")[:-1])
    assert (np.diff(gaps) < 0).all()  # quadratic: the gaps shrink towards the data


INVERSION_ERRORS = {10: 0.59, 100: 0.056, 1000: 0.0056}  # measured max |error| for N(0.3, 0.5^2) data: about 5.6 / S


def test_ddim_inversion_round_trip_with_optimal_predictor():
    # With the closed-form predictor, x0 -> x_T -> x0 at eta = 0 returns the input up to the discretization error
    # of the backward Euler steps, which falls like 1 / S (max |error| 0.59, 0.056, 0.0056 at S = 10, 100, 1000 for
    # data of standard deviation 0.5). Evaluating eps at the wrong step (t = s) or running the steps in the wrong
    # order leaves errors of order 1 at every S.
    torch.manual_seed(4)
    ddim = M.DDIM(1000).double()
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
    ab, factor = M.alpha_bar(ddim.betas), 1.0
    tau = M.sub_sequence(ddim.T, S)
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
    ddim = M.DDIM(1000).double()
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


def tiny_args(tiny_mnist, out):
    return ["--data-dir", str(tiny_mnist), "--out-dir", str(out), "--device", "cpu", "--channels", "8", "--channel-mult", "1,2",
            "--attn-res", "14", "--num-res-blocks", "1", "--timesteps", "25", "--batch-size", "8", "--num-samples", "6",
            "--log-every", "1"]


def test_ddim_smoke_run_from_ddpm_checkpoint(tiny_mnist, tmp_path):
    # A tiny ddpm.py run gives the checkpoint; ddim.py samples from it without training (no ckpt.pt of its own).
    D.main(tiny_args(tiny_mnist, tmp_path / "ddpm") + ["--steps", "2", "--num-samples", "2"])
    args = ["--ckpt", str(tmp_path / "ddpm" / "ckpt.pt"), "--data-dir", str(tiny_mnist), "--out-dir", str(tmp_path / "ddim"),
            "--device", "cpu", "--num-samples", "6", "--sample-steps", "5"]
    result = M.main(args + ["--eta", "0.5", "--skip", "quadratic"])
    assert result["step"] == 2 and set(result["samples"]) == {5} and math.isfinite(result["inversion_rmse"])
    for name in ("samples.png", "samples.npz", "inversion.png", "interpolation.png"):
        assert (tmp_path / "ddim" / name).exists(), name
    assert not (tmp_path / "ddim" / "ckpt.pt").exists()
    images = np.load(tmp_path / "ddim" / "samples.npz")["images"]
    assert images.shape == (6, 1, 28, 28) and images.dtype == np.uint8
    result = M.main(args + ["--sweep", "--sweep-steps", "2,5,100"])  # 100 is clipped to the checkpoint's T = 25
    assert set(result["samples"]) == {2, 5, 25}
    for S in (2, 5, 25):
        assert np.load(tmp_path / "ddim" / f"samples_{S}.npz")["images"].shape == (6, 1, 28, 28)


def test_ddim_smoke_run_training_its_own(tiny_mnist, tmp_path):
    args = tiny_args(tiny_mnist, tmp_path) + ["--ckpt", str(tmp_path / "missing.pt"), "--sample-steps", "4"]
    result = M.main(args + ["--steps", "2"])
    assert result["step"] == 2 and math.isfinite(result["loss"])
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert set(ckpt) == {"model", "ema", "optimizer", "config", "step"}
    assert (tmp_path / "samples.npz").exists() and (tmp_path / "inversion.png").exists()
    assert M.main(args + ["--steps", "3", "--resume"])["step"] == 3
    assert M.main(args + ["--steps", "3", "--sample-only"])["step"] == 3
    assert M.main(args + ["--ckpt", str(tmp_path / "ckpt.pt")])["step"] == 3  # its own checkpoint loads as a ddpm.py one


@pytest.mark.parametrize("flags", [["--eta", "-0.5"], ["--skip", "cubic"], ["--sweep-steps", "10,,20"], ["--sample-steps", "0"],
                                   ["--sample-steps", "30"], ["--ckpt", "GARBAGE"], ["--ckpt", "OTHER"]])
def test_ddim_bad_input_exits_with_one_message(flags, tiny_mnist, tmp_path, capsys):
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    torch.save({"config": {"channels": 8}, "ema": {}, "step": 0}, tmp_path / "other.pt")  # another model's checkpoint
    flags = [{"GARBAGE": str(tmp_path / "garbage.pt"), "OTHER": str(tmp_path / "other.pt")}.get(f, f) for f in flags]
    args = ["--ckpt", "", "--timesteps", "25", "--steps", "0"] + tiny_args(tiny_mnist, tmp_path)[:6]
    with pytest.raises(SystemExit) as e:
        M.main(args + flags)  # --sample-steps 30 > T = 25; the others are caught before or while loading
    assert e.value.code not in (0, None)
    message = capsys.readouterr().err.strip().splitlines()[-1:] or [str(e.value.code)]
    assert "error:" in message[-1] and len(str(e.value.code).splitlines()) <= 1, message


CONFIDENT_MIN = 0.0  # NOT YET CALIBRATED: /tmp/ddim/calib.sh sets it from seeds 0, 1, 2 (worst minus a margin) and writes the values here


@pytest.mark.slow
def test_ddim_learns_mnist(mnist_dir, short_classifier, tmp_path):
    # ddim.py training its own model briefly (not the CPU recipe): 250 steps of a 16-channel U-Net on the T = 1000
    # chain, then 200 samples with S = 20 DDIM steps, scored by the session's short classifier. The untrained model
    # (output layer zeroed: eps = 0, so x0_hat = x_t / sqrt(ab_t), blown-up noise) must fail the same threshold.
    args = ["--ckpt", "", "--data-dir", mnist_dir, "--device", "cpu", "--channels", "16", "--attn-res=", "--num-res-blocks", "1",
            "--batch-size", "64", "--lr", "1e-3", "--ema-decay", "0.995", "--log-every", "150", "--sample-steps", "20",
            "--num-samples", "200", "--seed", "0"]
    M.main(args + ["--steps", "0", "--out-dir", str(tmp_path / "untrained")])
    untrained = score_samples(short_classifier, mnist_dir, np.load(tmp_path / "untrained" / "samples.npz")["images"])["confident"]
    assert untrained < CONFIDENT_MIN, untrained
    M.main(args + ["--steps", "250", "--out-dir", str(tmp_path / "trained")])
    confident = score_samples(short_classifier, mnist_dir, np.load(tmp_path / "trained" / "samples.npz")["images"])["confident"]
    assert confident > CONFIDENT_MIN, confident
