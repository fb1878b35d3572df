"""Tests for 05_diffusion_models/noise_schedules.py: the schedules' shapes, endpoints and closed forms, the eps / x0 / v
conversions and the weighting identity between their losses, the DDIM sampler's agreement across parameterizations
with a closed-form denoiser, the schedules.svg figure, smoke runs, bad input and a learning check."""

import math
import xml.etree.ElementTree as ET

import numpy as np
import pytest
import torch

from conftest import load_script, score_samples

M = load_script("05_diffusion_models/noise_schedules.py")


@pytest.mark.parametrize("name", ["linear", "cosine", "sigmoid"])
@pytest.mark.parametrize("T", [21, 50, 200, 1000])
def test_noise_schedules_shapes_and_endpoints(name, T):
    # betas (T + 1,) float64 with betas[0] = 0 and every other beta in (0, 0.999]; alpha_bar strictly decreasing from
    # alpha_bar_0 = 1 to near 0. A schedule that forgot the clip has beta_T = 1 and alpha_bar_T = 0 (fails the first
    # and last checks); an off-by-one (betas[0] = beta_1) makes alpha_bar_0 < 1.
    betas = M.SCHEDULES[name](T)
    ab = M.alpha_bar(betas)
    assert betas.shape == (T + 1,) and betas.dtype == torch.float64 and betas[0] == 0
    assert (betas[1:] > 0).all() and (betas[1:] <= 0.999).all()
    assert ab[0] == 1 and (ab[1:] < ab[:-1]).all() and ab[-1] > 0
    assert ab[-1] < 1e-4, ab[-1]  # the largest is 4.0e-5 (linear, T = 1000); the unclipped betas would give 0 for cosine, sigmoid


def test_noise_schedules_endpoint_values():
    # The values section 1 and 6 quote. linear at T = 1000: alpha_bar_T = 4.04e-5 (a schedule without the 1000 / T
    # rescaling would give 0.6 at T = 50); cosine and sigmoid: only beta_T is clipped, so alpha_bar_T = 0.001 alpha_bar_{T-1}.
    ab = M.alpha_bar(M.linear_betas(1000))
    assert abs(ab[-1].item() - 4.04e-5) < 0.01e-5
    assert M.alpha_bar(M.linear_betas(50))[-1] < 1e-4
    for name in ("cosine", "sigmoid"):
        betas = M.SCHEDULES[name](1000)
        ab = M.alpha_bar(betas)
        assert betas[-1] == 0.999 and (betas[1:-1] < 0.999).all()
        assert math.isclose(ab[-1].item(), 0.001 * ab[-2].item(), rel_tol=1e-9)


@pytest.mark.parametrize("T", [21, 100, 1000])
def test_noise_schedules_closed_forms(T):
    # alpha_bar from the betas matches Eq. 6.3 (cosine) and Eq. 6.6 (sigmoid, start -3, end 3, tau 1) for t < T, to
    # float64 precision. Dropping the normalization by f(0) shifts the cosine's alpha_bar by 1.6e-4; a sigmoid without
    # the normalization to [0, 1] misses by 5 %.
    u = torch.arange(T, dtype=torch.float64) / T  # t = 0..T-1
    f = lambda u: torch.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    assert torch.allclose(M.alpha_bar(M.cosine_betas(T))[:T], f(u) / f(torch.zeros(1, dtype=torch.float64)), rtol=1e-10, atol=0)
    s = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731
    sig = (s(3) - 1 / (1 + torch.exp(-(6 * u - 3)))) / (s(3) - s(-3))
    assert torch.allclose(M.alpha_bar(M.sigmoid_betas(T))[:T], sig, rtol=1e-10, atol=0)


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
    v = M.x0_eps_to_v(x0, eps, ab)
    assert torch.allclose(v, ab.sqrt() * eps - (1 - ab).sqrt() * x0, rtol=0, atol=1e-14)
    tol = dict(rtol=0, atol=1e-9)  # 1 / sqrt(ab) reaches 150 at log-SNR -10
    assert torch.allclose(M.eps_to_x0(xt, eps, ab), x0, **tol) and torch.allclose(M.x0_to_eps(xt, x0, ab), eps, **tol)
    assert torch.allclose(M.v_to_x0(xt, v, ab), x0, **tol) and torch.allclose(M.v_to_eps(xt, v, ab), eps, **tol)
    for param, out in (("eps", eps), ("x0", x0), ("v", v)):
        x0_hat, eps_hat = M.PARAMETERIZATIONS[param](xt, out, ab)
        assert torch.allclose(x0_hat, x0, **tol) and torch.allclose(eps_hat, eps, **tol), param
    assert torch.allclose(M.x0_eps_to_v(M.v_to_x0(xt, v, ab), M.v_to_eps(xt, v, ab), ab), v, **tol)
    assert torch.allclose(M.x0_to_eps(xt, M.eps_to_x0(xt, eps, ab), ab), eps, **tol)


def test_noise_schedules_loss_weighting_identity():
    # Eq. 6.10, through the code's own loss: one imperfect denoiser (x0_hat, eps_hat consistent with x_t) handed to
    # Diffusion.loss in each parameterization gives per image L_eps = SNR L_x0 and L_v = (1 + SNR) L_x0 at every t.
    # A v target with the wrong sign or an x0 target from the clean digit's neighbour breaks both by O(1).
    torch.manual_seed(0)
    diffusions = {p: M.Diffusion("cosine", p, 1000).double() for p in ("eps", "x0", "v")}
    ab_all = M.alpha_bar(diffusions["eps"].betas)
    x0 = torch.rand(200, 1, 8, 8, dtype=torch.float64) * 2 - 1
    eps = torch.randn_like(x0)
    t = torch.randint(1, 1001, (200,))

    def model_for(param):  # the same denoiser, x0_hat = 0.8 x0 + 0.05 shifted by the x_t it sees, in each output unit
        def model(xt, tt):
            ab = M.per_sample(ab_all[tt], xt)
            x0_hat = 0.8 * x0 + 0.05 + 0.1 * xt
            eps_hat = M.x0_to_eps(xt, x0_hat, ab)
            return {"eps": eps_hat, "x0": x0_hat, "v": M.x0_eps_to_v(x0_hat, eps_hat, ab)}[param]
        return model
    losses = {p: d.loss(model_for(p), x0, t, eps, per_image=True) for p, d in diffusions.items()}
    snr = ab_all[t] / (1 - ab_all[t])
    assert torch.allclose(losses["eps"], snr * losses["x0"], rtol=1e-8, atol=0)
    assert torch.allclose(losses["v"], (1 + snr) * losses["x0"], rtol=1e-8, atol=0)
    assert torch.allclose(losses["v"], losses["eps"] / ab_all[t], rtol=1e-8, atol=0)


def gaussian_x0(diffusion, mu, s):
    """The optimal x0-predictor for data N(mu, s^2 I): E[x0 | x_t] = mu + sqrt(ab) s^2 / (ab s^2 + 1 - ab) (x_t - sqrt(ab) mu)."""
    ab_all = M.alpha_bar(diffusion.betas)

    def x0_star(xt, t):
        ab = M.per_sample(ab_all[t], xt)
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
            d = M.Diffusion(name, param, 1000).double()
            x0_star, ab_all = gaussian_x0(d, mu, s), M.alpha_bar(d.betas)

            def model(xt, t, param=param, x0_star=x0_star, ab_all=ab_all):
                ab, x0 = M.per_sample(ab_all[t], xt), x0_star(xt, t)
                eps = M.x0_to_eps(xt, x0, ab)
                return {"eps": eps, "x0": x0, "v": M.x0_eps_to_v(x0, eps, ab)}[param]
            samples[name, param] = d.sample(model, xT, 50, clip=False)
        for param in ("x0", "v"):
            assert torch.allclose(samples[name, param], samples[name, "eps"], rtol=0, atol=1e-8), (name, param)
        x = samples[name, "eps"]
        # mean: standard error 0.006; spread: S = 50 deterministic steps shrink it by 4 to 7 % (0.465, 0.478, 0.475
        # for linear, cosine, sigmoid; 0.491 at S = 1000), section 4's discretization effect
        assert abs(x.mean().item() - mu) < 0.02 and abs(x.std().item() - s) < 0.05, (name, x.mean(), x.std())


def test_noise_schedules_svg(tmp_path):
    # Valid XML with two panels of three curves (one per schedule), whose points stay inside the panels.
    M.save_schedules_svg(200, tmp_path / "s.svg")
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
    results = M.main(smoke_args(tiny_mnist, tmp_path))
    assert set(results) == {"cosine:v", "linear:eps"}
    for run in ("cosine_v", "linear_eps"):
        images = np.load(tmp_path / f"samples_{run}.npz")["images"]
        assert images.shape == (12, 1, 28, 28) and images.dtype == np.uint8
        ckpt = torch.load(tmp_path / f"ckpt_{run}.pt", weights_only=True)
        assert set(ckpt) == {"model", "ema", "optimizer", "config", "step"} and ckpt["step"] == 2
    assert (tmp_path / "schedules.svg").exists() and (tmp_path / "samples.png").exists()
    assert all(len(r["x0_mse"]) == 5 and np.isfinite(r["x0_mse"]).all() for r in results.values())
    M.main(smoke_args(tiny_mnist, tmp_path, "--resume", "--steps", "3"))
    assert torch.load(tmp_path / "ckpt_cosine_v.pt", weights_only=True)["step"] == 3
    before = np.load(tmp_path / "samples_cosine_v.npz")["images"]
    M.main(smoke_args(tiny_mnist, tmp_path, "--sample-only", "--steps", "3"))
    assert (np.load(tmp_path / "samples_cosine_v.npz")["images"] == before).all()  # eta = 0 and the same x_T: same samples


@pytest.mark.parametrize("flags", [["--runs", "cosine:w"], ["--runs", "quadratic:eps"], ["--runs", "cosine:v,cosine:v"],
                                   ["--timesteps", "10"], ["--sample-steps", "0"], ["--steps", "-1"]])
def test_noise_schedules_bad_input(flags, capsys):
    with pytest.raises(SystemExit) as e:
        M.main(flags)
    assert e.value.code != 0 and "error" in capsys.readouterr().err


MSE_MAX = 0.12  # mean x0-MSE yardstick (Eq. 6.11) after 250 steps, seeds 0, 1, 2: 0.1045, 0.1048, 0.1055; untrained 0.469
CONFIDENT_MIN = 0.10  # short classifier, confidence > 0.9, N = 200, seeds 0, 1, 2: 0.180, 0.220, 0.205; untrained 0.000
SLOW_ARGS = ["--runs", "cosine:v", "--steps", "250", "--batch-size", "64", "--lr", "1e-3", "--channels", "16", "--attn-res=",
             "--num-res-blocks", "1", "--ema-decay", "0.999", "--log-every", "250", "--num-samples", "200", "--test-images", "200"]


@pytest.mark.slow
def test_noise_schedules_learns(mnist_dir, short_classifier, tmp_path):
    # A 250-step cosine / v run (about 60 s here): its mean x0-MSE yardstick and the short classifier's confident
    # fraction of its 200 samples. Thresholds from seeds 0, 1, 2 (above), worst seed plus or minus a margin; the
    # untrained network (steps 0: it predicts v = 0, so x0_hat = sqrt(alpha_bar) x_t) fails both.
    results = M.main(SLOW_ARGS + ["--data-dir", mnist_dir, "--out-dir", str(tmp_path / "trained"), "--device", "cpu"])
    untrained = M.main(SLOW_ARGS + ["--data-dir", mnist_dir, "--out-dir", str(tmp_path / "untrained"), "--device", "cpu",
                                    "--steps", "0", "--num-samples", "100"])
    mse, mse0 = np.mean(results["cosine:v"]["x0_mse"]), np.mean(untrained["cosine:v"]["x0_mse"])
    trained = score_samples(short_classifier, mnist_dir, np.load(tmp_path / "trained" / "samples_cosine_v.npz")["images"])
    random = score_samples(short_classifier, mnist_dir, np.load(tmp_path / "untrained" / "samples_cosine_v.npz")["images"])
    assert mse < MSE_MAX and trained["confident"] > CONFIDENT_MIN, (mse, trained["confident"])
    assert mse0 > MSE_MAX and random["confident"] < CONFIDENT_MIN, (mse0, random["confident"])
