"""Tests for 01_autoencoders/hvae.py: shapes, the identities of README section 6 (per-layer KLs against
Monte Carlo, precision weighting, the importance-weighted bound, free bits, warm-up, active units), a
smoke run, and a learning check on real MNIST (marked slow)."""

import math

import numpy as np
import pytest
import torch

from conftest import load_script

M = load_script("01_autoencoders/hvae.py")


def hvae_model(seed=0, hidden=32, z1_dim=8, z2_dim=4):
    torch.manual_seed(seed)
    return M.LadderVAE(hidden, z1_dim, z2_dim)


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
    assert torch.allclose(M.log_bernoulli(x, logits), expected, atol=1e-3)


def test_hvae_precision_weighting_is_the_product_of_gaussians():
    # Eq. 6.3: N(z; mu_hat, s_hat^2) N(z; mu_p, s_p^2) / N(z; mu_q, s_q^2) must not depend on z.
    g = torch.Generator().manual_seed(0)
    mu_hat, logvar_hat, mu_p, logvar_p = torch.randn(4, 6, generator=g).double() * 1.5
    mu_q, logvar_q = M.precision_weighted(mu_hat, logvar_hat, mu_p, logvar_p)
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
        kl2 = M.gaussian_kl(mu2, logvar2, torch.zeros_like(mu2), torch.zeros_like(logvar2)).sum()
        ok, info = hvae_within_3se(mc2, kl2)
        assert ok, f"layer z2: Monte Carlo {info[0]:.4f} vs closed form {info[1]:.4f} (s.e. {info[2]:.4f})"
        # lower layer, given one z2: q(z1|x,z2) against p(z1|z2)
        mu_p, logvar_p = model.prior1(z2[:1])
        mu1, logvar1 = M.precision_weighted(mu_hat, logvar_hat, mu_p, logvar_p)
        q1, p1 = normal(mu1[0], (0.5 * logvar1[0]).exp()), normal(mu_p[0], (0.5 * logvar_p[0]).exp())
        z1 = q1.sample((n,))
        mc1 = q1.log_prob(z1).sum(-1) - p1.log_prob(z1).sum(-1)
        kl1 = M.gaussian_kl(mu1, logvar1, mu_p, logvar_p).sum()
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
        log_pz = M.gaussian_log_prob(z1, mu_p, logvar_p) - 0.5 * (math.log(2 * math.pi) + z2.pow(2)).sum(-1)  # (G,)
        logits = model.decode(z1).unsqueeze(1)  # (G, 1, 784)
        log_px_z = torch.cat([M.log_bernoulli(x[i:i + 1], logits) for i in range(2)], 1)  # (G, 2)
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
    value = M.free_bits(kl, 0.5)
    value.backward()
    assert value.item() == pytest.approx(0.5 + 1.0)
    assert torch.equal(kl.grad[:, 0], torch.zeros(2)), "a group below lambda must get no gradient"
    assert torch.allclose(kl.grad[:, 1], torch.full((2,), 0.5)), "a group above lambda gets d(mean)/d(kl) = 1/B"
    kl.grad = None
    M.free_bits(kl, 0.0).backward()  # lambda = 0 is the plain KL, summed over groups and averaged over the batch
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
    assert [M.kl_warmup(t, 100) for t in (0, 25, 50, 100, 5000)] == [0.0, 0.25, 0.5, 1.0, 1.0]
    assert M.kl_warmup(0, 0) == 1.0  # no warm-up: the plain ELBO from the first step


def test_hvae_active_units_known_answer():
    g = torch.Generator().manual_seed(0)
    # columns with variance across x of about 1, 0.04 (active), 0.0025, 0 (inactive)
    means = torch.randn(5000, 4, generator=g) * torch.tensor([1.0, 0.2, 0.05, 0.0]) + 3.0
    count, variances = M.active_units(means)
    assert count == 2
    assert np.allclose(variances.numpy(), [1.0, 0.04, 0.0025, 0.0], rtol=0.1, atol=1e-6)
    # in the model: a q(z2|x) whose mean ignores x has no active z2 unit
    model = hvae_model()
    with torch.no_grad():
        model.q2.weight.zero_()
    mean1, mean2 = model.posterior_means(hvae_digits(200))
    assert M.active_units(mean2)[0] == 0


# --- runs ---


def hvae_args(data_dir, out_dir, *extra):
    return ["--steps", "2", "--device", "cpu", "--data-dir", str(data_dir), "--out-dir", str(out_dir),
            "--hidden", "16", "--z1-dim", "4", "--z2-dim", "2", "--num-samples", "10", *extra]


def test_hvae_smoke_resume_and_sample_only(tiny_mnist, tmp_path):
    result = M.main(hvae_args(tiny_mnist, tmp_path, "--warmup", "4", "--free-bits", "0.1", "--eval-nll", "--iw-k", "8"))
    assert result["step"] == 2 and math.isfinite(result["neg_elbo"]) and math.isfinite(result["nll"])
    for name in ("ckpt.pt", "samples.png", "samples.npz", "layers.png"):
        assert (tmp_path / name).exists(), f"{name} was not written"
    images = np.load(tmp_path / "samples.npz")["images"]
    assert images.dtype == np.uint8 and images.shape == (10, 1, 28, 28)
    assert M.main(hvae_args(tiny_mnist, tmp_path, "--steps", "4", "--resume"))["step"] == 4
    assert M.main(hvae_args(tiny_mnist, tmp_path, "--sample-only"))["step"] == 4
    for bad in (["--free-bits", "-1"], ["--warmup", "-5"], ["--iw-k", "0"], ["--hidden", "1"]):
        with pytest.raises(SystemExit) as error:
            M.main(hvae_args(tiny_mnist, tmp_path, *bad))
        assert error.value.code == 2


# --- learning check (real MNIST) ---


@pytest.mark.slow
def test_hvae_learns_and_keeps_both_layers_active(mnist_dir, tmp_path):
    # After 1000 steps (warm-up 300), seeds 0, 1, 2: test -ELBO 123.74, 121.98, 123.55 nats; active units
    # z1 82, 92, 95 of 100 and z2 9, 13, 10 of 50. Untrained: 216.76 nats, 0 and 0 active units.
    # Thresholds: the worst seed plus a margin (-ELBO 127; at least 40 active z1 units and 4 active z2 units).
    threshold, min_z1, min_z2 = 127.0, 40, 4
    cfg = M.Config(seed=0, device="cpu", data_dir=mnist_dir, out_dir=str(tmp_path), steps=1000, warmup=300,
                   log_every=100_000, num_samples=64)
    untrained = M.train(M.Config(**{**cfg.__dict__, "steps": 0}))
    trained = M.train(cfg)
    assert untrained["neg_elbo"] > threshold, f"the untrained model already passes ({untrained['neg_elbo']:.1f})"
    assert untrained["active_z2"] < min_z2, "the untrained model should not already have active z2 units"
    assert trained["neg_elbo"] < threshold, f"test -ELBO {trained['neg_elbo']:.1f} nats, threshold {threshold}"
    assert trained["active_z1"] >= min_z1 and trained["active_z2"] >= min_z2, trained
