"""Tests for 04_score_based_models/score_matching.py: the analytic mixture score, the closed-form minimum
of the denoising objective, the constant between implicit and explicit score matching, the sliced
objective's expectation, smoke runs and bad input; one slow learning check."""

import json
import math
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest
import torch

from conftest import ROOT, load_script

M = load_script("04_score_based_models/score_matching.py")
SCRIPT = ROOT / "04_score_based_models/score_matching.py"


def smoothed_mixture_log_prob(x, sigma):
    """An independent oracle: log q_sigma(x) = log (1/8) sum_k N(x; mu_k, (s^2 + sigma^2) I), float64."""
    angle = torch.arange(8, dtype=torch.float64) * math.pi / 4
    mu = 2 * math.sqrt(2) * torch.stack([angle.cos(), angle.sin()], 1)
    var = 2 / 16 + sigma ** 2
    log_normal = -((x[:, None, :] - mu) ** 2).sum(-1) / (2 * var) - math.log(2 * math.pi * var)
    return torch.logsumexp(log_normal, 1) - math.log(8)


def autograd_score(log_prob, x):
    x = x.detach().clone().requires_grad_(True)
    return torch.autograd.grad(log_prob(x).sum(), x)[0]


def mean_and_se(values):
    values = values.double()
    return values.mean().item(), values.std().item() / math.sqrt(len(values))


def random_net(seed, hidden=32, gain=3.0):
    """A random score network with outputs of order one (the default init gives tiny ones)."""
    torch.manual_seed(seed)
    net = M.ScoreNet(hidden)
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(gain)
    return net


def test_score_matching_mixture_score_matches_autograd():
    g = torch.Generator().manual_seed(0)
    x = torch.cat([M.toy_2d("8gaussians", 300, g).double(), 8 * torch.rand(300, 2, generator=g, dtype=torch.float64) - 4])
    # the oracle agrees with the course's exact log-density at sigma = 0
    assert torch.allclose(smoothed_mixture_log_prob(x, 0.0), M.toy_2d_log_prob("8gaussians", x), atol=1e-12)
    assert torch.allclose(M.mixture_score(x), autograd_score(lambda y: M.toy_2d_log_prob("8gaussians", y), x), atol=1e-10)
    for sigma in (0.1, 0.5):
        # forgetting to add sigma^2 to the variance moves the score by ~|x - mu| (1/s^2 - 1/(s^2 + sigma^2)): order 1
        expected = autograd_score(lambda y: smoothed_mixture_log_prob(y, sigma), x)
        assert torch.allclose(M.mixture_score(x, sigma), expected, atol=1e-10)


def test_score_matching_smoothed_density_is_the_convolution():
    # q_sigma(x) = E_eps p(x - sigma eps): the "variances add" step behind mixture_score(x, sigma), by Monte Carlo
    torch.manual_seed(0)
    sigma = 0.5
    x = torch.tensor([[2.0, 0.5], [0.0, 0.0], [-2.5, -2.0]], dtype=torch.float64)
    eps = torch.randn(200000, 2, dtype=torch.float64)
    for point in x:
        p = M.toy_2d_log_prob("8gaussians", point - sigma * eps).exp()
        mean, se = mean_and_se(p)
        assert abs(mean - smoothed_mixture_log_prob(point[None], sigma).exp().item()) < 3 * se + 1e-12


def test_score_matching_dsm_minimum_for_gaussian_data():
    # data N(mu, s^2 I): q_sigma = N(mu, (s^2 + sigma^2) I) and the minimum of Eq. 1.10 is
    # D s^2 / (2 sigma^2 (s^2 + sigma^2)) (README Eq. 1.14)
    torch.manual_seed(0)
    d, s, sigma, n = 2, 0.5, 0.3, 200000
    mu = torch.tensor([1.0, -2.0])
    x = mu + s * torch.randn(n, d)

    def true_score(y):
        return -(y - mu) / (s ** 2 + sigma ** 2)

    torch.manual_seed(1)
    best = M.dsm_objective(true_score, x, sigma)
    mean, se = mean_and_se(best)
    closed_form = d * s ** 2 / (2 * sigma ** 2 * (s ** 2 + sigma ** 2))  # 8.47; the data score -(x - mu)/s^2 gives 9.66
    assert abs(mean - closed_form) < 3 * se
    # perturbed scores do worse, on the same noise (paired): a constant shift delta costs exactly 1/2 ||delta||^2
    delta = torch.tensor([0.3, -0.2])
    for perturbed, excess in [(lambda y: true_score(y) + delta, 0.5 * delta.pow(2).sum().item()),
                              (lambda y: 1.2 * true_score(y), None), (lambda y: -(y - mu) / s ** 2, None)]:
        torch.manual_seed(1)
        diff_mean, diff_se = mean_and_se(M.dsm_objective(perturbed, x, sigma) - best)
        assert diff_mean > 5 * diff_se
        if excess is not None:
            assert abs(diff_mean - excess) < 3 * diff_se


def test_score_matching_implicit_equals_explicit_minus_constant():
    # Eq. 1.6: J_implicit(theta) = J_explicit(theta) - 1/2 E_p ||grad log p||^2 for every theta. Per point,
    # implicit - explicit + 1/2 ||grad log p||^2 = tr J + s . grad log p, whose mean is 0 (integration by parts).
    # The networks are random MLPs plus a random linear map A x, so tr J is far from 0: dropping the trace
    # term would shift the mean by about tr A, 2 to 5, some 50 to 100 standard errors.
    x = M.toy_2d("8gaussians", 20000, torch.Generator().manual_seed(0))
    constant = 0.5 * M.mixture_score(x).pow(2).sum(1)  # (N,)
    for seed in range(4):
        net = random_net(seed, gain=1.5)
        A = -(1 + 0.5 * seed) * torch.eye(2) + 0.5 * torch.randn(2, 2)

        def score(y):
            return net(y) + y @ A.T

        implicit = M.implicit_objective(score, x).detach()
        explicit = M.explicit_objective(score, x, M.mixture_score).detach()
        mean, se = mean_and_se(implicit - explicit + constant)
        assert abs(mean) < 3.5 * se, (seed, mean, se)
        assert abs(A.trace().item()) > 20 * se  # the test has the power to see a missing trace


def test_score_matching_sliced_expectation_is_implicit():
    # Eq. 1.8: E_v[v^T J v] = tr J and E_v[(v^T s)^2] = ||s||^2 for E[v v^T] = I; paired per point.
    # Rademacher-scaled-by-2 or uniform[0, 1) directions (E[v v^T] != I) would miss by tens of standard errors.
    x = M.toy_2d("8gaussians", 20000, torch.Generator().manual_seed(1))
    net = random_net(7, gain=1.5)
    implicit = M.implicit_objective(net, x).detach()
    for variance_reduced in (True, False):
        torch.manual_seed(2)
        sliced = M.sliced_objective(net, x, projections=2, variance_reduced=variance_reduced).detach()
        mean, se = mean_and_se(sliced - implicit)
        assert abs(mean) < 3 * se, (variance_reduced, mean, se)


def test_score_matching_shapes_and_gradients():
    x = M.toy_2d("8gaussians", 16, torch.Generator().manual_seed(0))
    assert M.mixture_score(x).shape == (16, 2) and M.mixture_score(x.double(), 0.2).dtype == torch.float64
    for method in M.METHODS:
        model = M.ScoreMatching(method, hidden=8)
        assert model(x).shape == (16, 2)
        loss = model.loss(x)
        assert loss.shape == ()
        loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    net = random_net(0, hidden=8)
    assert M.implicit_objective(net, x).shape == (16,)
    assert M.sliced_objective(net, x, 3).shape == (16,)
    assert M.dsm_objective(net, x, 0.1).shape == (16,)
    assert M.explicit_objective(net, x, M.mixture_score).shape == (16,)


TINY = ["--steps", "2", "--hidden", "16", "--batch-size", "32", "--n-train", "200", "--n-eval", "300", "--device", "cpu"]


def test_score_matching_smoke_all_methods(tmp_path):
    result = M.main(TINY + ["--out-dir", str(tmp_path)])
    assert result["step"] == 2
    saved = json.loads((tmp_path / "errors.json").read_text())
    for key in ("explicit", "implicit", "sliced", "dsm", "dsm_vs_smoothed", "zero_field"):
        assert math.isfinite(saved[key])
    assert (tmp_path / "fields.png").exists() and (tmp_path / "ckpt.pt").exists()
    svg = tmp_path / "score_field.svg"
    assert ET.parse(svg).getroot().tag.endswith("svg") and svg.stat().st_size < 200_000
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert set(ckpt["model"]) == set(M.METHODS) and ckpt["step"] == 2
    assert M.main(TINY[2:] + ["--steps", "3", "--resume", "--out-dir", str(tmp_path)])["step"] == 3
    again = M.main(TINY[2:] + ["--steps", "3", "--sample-only", "--out-dir", str(tmp_path)])
    assert again["step"] == 3 and again["dsm"] == pytest.approx(json.loads((tmp_path / "errors.json").read_text())["dsm"])


def test_score_matching_smoke_other_dataset(tmp_path, capsys):
    result = M.main(TINY + ["--dataset", "moons", "--out-dir", str(tmp_path)])
    assert "implicit" not in result and "explicit" not in result  # no analytic score: no error reported
    assert "no analytic score" in capsys.readouterr().out
    assert set(torch.load(tmp_path / "ckpt.pt", weights_only=True)["model"]) == {"implicit", "sliced", "dsm"}
    assert ET.parse(tmp_path / "score_field.svg").getroot().tag.endswith("svg")


def test_score_matching_subprocess(tmp_path):
    run = subprocess.run([sys.executable, str(SCRIPT), *TINY, "--method", "sliced", "--out-dir", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "sliced" in run.stdout and (tmp_path / "errors.json").exists()


@pytest.mark.parametrize("argv,message", [(["--method", "nope"], "--method must be"),
                                          (["--dataset", "moons", "--method", "explicit"], "needs the analytic score"),
                                          (["--dataset", "spiral"], "--dataset must be"),
                                          (["--sigma", "0"], "--sigma must be positive")])
def test_score_matching_bad_input(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        M.main(argv + ["--out-dir", str(tmp_path)])
    assert exit_info.value.code != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and sum("error" in line for line in err) == 1
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
def test_score_matching_dsm_learns_the_smoothed_score(tmp_path):
    # DSM alone on 8gaussians, 3000 steps of width 128 (about 10 to 13 s on this 2-core CPU). Fisher divergence
    # to grad log q_sigma (what DSM learns, README Eq. 1.12) on 20000 fresh points, seeds 1, 2, 3:
    # 0.274, 0.254, 0.256; the untrained network: 13.1. Threshold: the worst seed plus a margin.
    threshold = 0.35
    argv = ["--method", "dsm", "--hidden", "128", "--batch-size", "1024", "--n-eval", "20000", "--device", "cpu"]
    trained = M.main(argv + ["--steps", "3000", "--seed", "0", "--out-dir", str(tmp_path / "trained")])
    untrained = M.main(argv + ["--steps", "0", "--seed", "0", "--out-dir", str(tmp_path / "untrained")])
    assert trained["dsm_vs_smoothed"] < threshold, trained
    assert untrained["dsm_vs_smoothed"] > threshold, untrained
