"""Tests of 04_score_based_models/langevin.py: Langevin's stationary law, the sigma^2-weighted DSM loss,
the sigma ladder, the unequal-weights demonstration, shapes, smoke runs and a learning check."""

import math

import numpy as np
import pytest
import torch

from conftest import load_script

M = load_script("04_score_based_models/langevin.py")


def test_langevin_gaussian_stationary_variance():
    # N(mu, s^2) with s = 1 and eps = 0.5: the chain's stationary variance is s^2 / (1 - eps / (4 s^2))
    # = 1.1429, not 1 (README Eq. 2.5). 20000 independent chains, 200 steps each (the transient decays as
    # (1 - eps / (2 s^2))^200 = 0.75^200 ~ 1e-25), one draw per chain, so the draws are independent and the
    # standard errors honest: s.e. of the variance sqrt(2 / n) var = 0.011, so the unbiased value 1 is 12
    # s.e. away (a step that forgot the 1/2 on the drift would give var 1 / (1 - eps / 2) ... far off too).
    mu, s, eps, n = 1.5, 1.0, 0.5, 20000
    g = torch.Generator().manual_seed(0)
    x = M.langevin(lambda x: -(x - mu) / s ** 2, torch.zeros(n, dtype=torch.float64), eps, 200, g)
    var = s ** 2 / (1 - eps / (4 * s ** 2))
    assert abs(x.mean().item() - mu) < 3 * math.sqrt(var / n)
    assert abs(x.var().item() - var) < 3 * math.sqrt(2 / n) * var
    assert abs(x.var().item() - s ** 2) > 6 * math.sqrt(2 / n) * var  # the bias is really resolved


def test_langevin_mixture_score_is_grad_log_density():
    # the exact mixture score (Eq. 2.6) against autograd of the log-density; a wrong sign or a missing
    # 1/var would miss by O(1)
    g = torch.Generator().manual_seed(1)
    weights = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    means = torch.randn(3, 2, generator=g, dtype=torch.float64) * 2
    x = torch.randn(50, 2, generator=g, dtype=torch.float64).requires_grad_(True)
    var = 1.7
    log_p = torch.logsumexp(weights.log() - ((x[:, None] - means) ** 2).sum(-1) / (2 * var), 1)
    (grad,) = torch.autograd.grad(log_p.sum(), x)
    assert torch.allclose(M.mixture_score(x.detach(), weights, means, var), grad, atol=1e-12)


def test_langevin_dsm_loss_weighting():
    # Eq. 2.8 = Eq. 2.9: the sigma^2-weighted loss equals the loss on sigma * s_theta, per example sigma
    g = torch.Generator().manual_seed(2)
    score, z = torch.randn(2, 16, 3, 5, 5, generator=g, dtype=torch.float64)
    sigma = torch.rand(16, 1, 1, 1, generator=g, dtype=torch.float64) + 0.01
    direct = (0.5 * (sigma * score + z) ** 2).flatten(1).sum(1).mean()
    assert torch.allclose(M.dsm_loss(score, z, sigma), direct, rtol=1e-12)
    # For data N(0, s^2 I) in D dimensions the exact smoothed score -x~ / (s^2 + sigma^2) has expected loss
    # D/2 s^2 / (s^2 + sigma^2): O(1) at every level, the point of the weighting (README Eq. 2.9). Without
    # the sigma^2 the value would be D / (2 (s^2 + sigma^2)), 100 times larger at sigma = 0.1 than at 1.
    s, D, n = 0.5, 4, 40000
    for sig in (0.05, 0.5, 5.0):
        x = s * torch.randn(n, D, generator=g, dtype=torch.float64)
        z = torch.randn(n, D, generator=g, dtype=torch.float64)
        xt = x + sig * z
        per_example = 0.5 * (sig * (-xt / (s ** 2 + sig ** 2)) + z).pow(2).sum(1)
        loss = M.dsm_loss(-xt / (s ** 2 + sig ** 2), z, sig).item()
        expected = D / 2 * s ** 2 / (s ** 2 + sig ** 2)
        assert abs(loss - expected) < 3 * per_example.std().item() / math.sqrt(n)


def test_langevin_sigma_ladder_is_geometric():
    sigmas = M.sigma_ladder(1.0, 0.01, 10).double()
    assert len(sigmas) == 10 and abs(sigmas[0] - 1.0) < 1e-6 and abs(sigmas[-1] - 0.01) < 1e-8
    ratios = sigmas[1:] / sigmas[:-1]
    assert torch.allclose(ratios, torch.full_like(ratios, 0.01 ** (1 / 9)), rtol=1e-5)
    model = M.NCSN(M.ScoreMLP(8), 6.0, 0.01, 5)
    assert torch.allclose(model.sigmas, M.sigma_ladder(6.0, 0.01, 5))


def test_langevin_unequal_weights_demo():
    # 0.2 N((-5,-5), I) + 0.8 N((5,5), I) from U[-8, 8]^2. Plain Langevin keeps the initial split (measured
    # 0.516 at seed 0; the true share is 0.8). Annealed Langevin with the exact smoothed score recovers it
    # up to a small freezing bias (measured 0.777 at seed 0; binomial s.e. at n = 10000 is 0.004).
    _, _, plain, annealed = M.unequal_weights_demo(10000, torch.Generator().manual_seed(0))
    assert abs(plain - 0.8) > 0.2
    assert abs(annealed - 0.8) < 0.04


def test_langevin_shapes():
    x, sigma = torch.rand(3, 1, 28, 28), torch.tensor([1.0, 0.1, 0.01])
    assert M.UNet(8)(x, sigma).shape == (3, 1, 28, 28)
    assert M.ScoreMLP(16)(torch.randn(3, 2), sigma).shape == (3, 2)
    model = M.NCSN(M.ScoreMLP(16), 2.0, 0.1, 3)
    samples, path = model.sample(torch.randn(5, 2), 1e-3, 4, denoise=True, record=2)
    assert samples.shape == (5, 2) and path.shape == (3 * 4 + 1, 2, 2)
    assert model.loss(torch.randn(7, 2)).shape == ()


def test_langevin_smoke_mnist(tiny_mnist, tmp_path):
    args = ["--device", "cpu", "--data-dir", str(tiny_mnist), "--out-dir", str(tmp_path), "--channels", "8",
            "--num-levels", "3", "--steps-per-level", "2", "--num-samples", "6", "--batch-size", "8", "--demo-chains", "50"]
    result = M.main(args + ["--steps", "2"])
    assert result["step"] == 2 and len(result["loss_per_level"]) == 3
    images = np.load(tmp_path / "samples.npz")["images"]
    assert images.shape == (6, 1, 28, 28) and images.dtype == np.uint8
    for name in ("ckpt.pt", "samples.png", "chain.png", "demo.png"):
        assert (tmp_path / name).exists()
    assert M.main(args + ["--steps", "3", "--resume"])["step"] == 3
    assert M.main(args + ["--steps", "3", "--sample-only"])["step"] == 3


def test_langevin_smoke_8gaussians(tmp_path):
    args = ["--device", "cpu", "--dataset", "8gaussians", "--out-dir", str(tmp_path), "--hidden", "16",
            "--steps-per-level", "3", "--num-samples", "20", "--batch-size", "8", "--demo-chains", "0"]
    result = M.main(args + ["--steps", "2"])
    assert result["step"] == 2 and "max_share_error" in result
    points = np.load(tmp_path / "samples.npz")["points"]
    assert points.shape == (20, 2) and points.dtype == np.float32
    assert (tmp_path / "trajectories.png").exists()
    assert M.main(args + ["--steps", "4", "--resume"])["step"] == 4
    assert M.main(args + ["--steps", "4", "--sample-only"])["step"] == 4


def test_langevin_demo_only(tmp_path):
    result = M.main(["--demo", "--demo-chains", "200", "--out-dir", str(tmp_path)])
    assert set(result) == {"demo_share_plain", "demo_share_annealed"} and (tmp_path / "demo.png").exists()
    assert not (tmp_path / "ckpt.pt").exists()


@pytest.mark.parametrize("argv", [["--dataset", "cifar"], ["--sigma-min", "2", "--sigma-max", "1"],
                                  ["--num-levels", "1"], ["--eps", "-1"], ["--steps", "-3"]])
def test_langevin_bad_input(argv, capsys):
    with pytest.raises(SystemExit) as info:
        M.main(argv + ["--device", "cpu"])
    assert info.value.code != 0
    assert capsys.readouterr().err.count("error:") == 1


@pytest.mark.slow
def test_langevin_learns_8gaussians(tmp_path):
    # The check: NCSN on 8gaussians (3000 steps, 5000 annealed-Langevin samples at the default
    # L = 10, T = 100, eps = 2e-5) puts every mode's share within +-0.03 (absolute) of 1/8. Binomial s.e.
    # of one share at n = 5000: sqrt(1/8 * 7/8 / 5000) = 0.0047, so +-0.03 is 6.4 s.e. and not flaky.
    # A diffuse cloud could pass the shares by symmetry, so most samples must also lie within 3 std of a
    # centre (the exact density: 1 - exp(-4.5) = 0.989). Seeds 0, 1, 2: max share error 0.0106, 0.0112,
    # 0.0098; near fraction 0.895, 0.904, 0.888; threshold 0.83 (worst seed minus 0.06). The untrained
    # model (steps 0): max share error 0.218, near fraction 0.005.
    cfg = dict(dataset="8gaussians", steps=3000, num_samples=5000, device="cpu", demo_chains=0, seed=0)
    trained = M.train(M.Config(out_dir=str(tmp_path / "trained"), **cfg))
    assert trained["max_share_error"] <= 0.03
    assert trained["near_fraction"] >= 0.83
    untrained = M.train(M.Config(out_dir=str(tmp_path / "untrained"), **{**cfg, "steps": 0, "num_samples": 2000}))
    assert untrained["max_share_error"] > 0.03 or untrained["near_fraction"] < 0.83
