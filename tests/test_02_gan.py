"""Tests for 02_gans/gan.py: shapes, the optimal discriminator D* = p_data / (p_data + p_g) learned from
samples, V(D*, G) = 2 JSD - log 4, the gradients of the two generator losses, and smoke runs."""

import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from conftest import load_script

M = load_script("02_gans/gan.py")


def gan_args(data_dir, out_dir, *extra):
    return ["--steps", "2", "--device", "cpu", "--data-dir", str(data_dir), "--out-dir", str(out_dir),
            "--hidden", "16", "--latent-dim", "8", "--num-samples", "10", "--log-every", "1", *extra]


def normal_log_pdf(x, mu, sigma):
    return -0.5 * ((x - mu) / sigma) ** 2 - math.log(sigma * math.sqrt(2 * math.pi))


# p_data = N(0, 1); p_g = N(1.5, 0.7^2), the law of G(z) = 1.5 + 0.7 z for z ~ N(0, 1)
MU_G, SIGMA_G = 1.5, 0.7


def fixed_generator():
    G = nn.Linear(1, 1)
    with torch.no_grad():
        G.weight.fill_(SIGMA_G)
        G.bias.fill_(MU_G)
    return G.requires_grad_(False)


def d_star(x):
    """Eq. 1.3 for the two Gaussians above."""
    p_data, p_g = normal_log_pdf(x, 0.0, 1.0).exp(), normal_log_pdf(x, MU_G, SIGMA_G).exp()
    return p_data / (p_data + p_g)


# --- shapes ---


def test_gan_shapes():
    torch.manual_seed(0)
    G, D = M.Generator(latent_dim=8, hidden=16), M.Discriminator(hidden=16)
    x_fake = G(torch.randn(5, 8))
    assert x_fake.shape == (5, 1, 28, 28) and x_fake.abs().max() <= 1  # tanh range
    assert D(x_fake).shape == (5, 1)
    gan = M.GAN(G, D, latent_dim=8)
    samples = gan.sample(7)
    assert samples.shape == (7, 1, 28, 28) and samples.min() >= 0 and samples.max() <= 1
    loss_d, d_real = gan.d_loss(torch.rand(5, 1, 28, 28) * 2 - 1, x_fake)
    loss_g, d_fake = gan.g_loss(x_fake)
    assert loss_d.shape == loss_g.shape == d_real.shape == d_fake.shape == ()


# --- the identities of the README ---


def test_gan_discriminator_learns_the_optimal_d_star():
    """Eq. 1.3: a small D trained on the script's d_loss with samples from p_data and p_g approaches
    p_data / (p_data + p_g) on a grid. Untrained, or against the swapped formula, the error is far larger.
    Measured (seed 0): max error 0.008, mean 0.003; untrained D: max 0.58, mean 0.41; swapped formula:
    mean 0.74. The bounds leave a factor of about 5 for other platforms' round-off and threads."""
    torch.manual_seed(0)
    D = nn.Sequential(nn.Linear(1, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 1))
    gan = M.GAN(fixed_generator(), D, latent_dim=1)
    grid = torch.linspace(-2.0, 3.0, 101).unsqueeze(1)  # (101, 1), where both densities have mass
    target = d_star(grid)

    def errors():
        with torch.no_grad():
            err = (torch.sigmoid(D(grid)) - target).abs()
        return err.max().item(), err.mean().item()

    untrained = errors()
    optimizer = torch.optim.Adam(D.parameters(), lr=3e-3)
    for _ in range(1500):
        x = torch.randn(512, 1)  # x ~ p_data
        loss, _ = gan.d_loss(x, gan.G(gan.noise(512)))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    max_err, mean_err = errors()
    assert max_err < 0.04 and mean_err < 0.015, (max_err, mean_err)
    assert untrained[0] > 0.2 and untrained[1] > 0.1, untrained
    with torch.no_grad():
        swapped = (torch.sigmoid(D(grid)) - (1 - target)).abs().mean().item()  # p_g / (p_data + p_g)
    assert swapped > 0.2


def test_gan_value_at_d_star_is_two_jsd_minus_log_4():
    """Eq. 1.5: -d_loss with D's logit l = log p_data - log p_g (so that sigmoid(l) = D*) estimates
    V(D*, G) = 2 JSD(p_data || p_g) - log 4, with JSD computed by quadrature. Tolerance: 5 standard errors."""
    torch.manual_seed(0)
    log_ratio = lambda x: normal_log_pdf(x, 0.0, 1.0) - normal_log_pdf(x, MU_G, SIGMA_G)  # noqa: E731
    gan = M.GAN(fixed_generator(), log_ratio, latent_dim=1)
    n = 200000
    x_real, x_fake = torch.randn(n, 1, dtype=torch.float64), gan.G.double()(torch.randn(n, 1, dtype=torch.float64))
    value = -gan.d_loss(x_real, x_fake)[0].item()
    # the standard error of the two Monte Carlo means: log D*(x) and log(1 - D*(G(z))) per sample
    per_real = torch.nn.functional.logsigmoid(log_ratio(x_real))
    per_fake = torch.nn.functional.logsigmoid(-log_ratio(x_fake))
    se = math.sqrt(per_real.var().item() / n + per_fake.var().item() / n)
    x = torch.linspace(-12, 12, 200001, dtype=torch.float64)
    p, q = normal_log_pdf(x, 0.0, 1.0).exp(), normal_log_pdf(x, MU_G, SIGMA_G).exp()
    m = (p + q) / 2
    kl = lambda a: torch.trapezoid(torch.where(a > 0, a * (a / m).log(), torch.zeros_like(a)), x).item()  # noqa: E731
    jsd = 0.5 * kl(p) + 0.5 * kl(q)
    assert 0 < jsd < math.log(2)
    assert abs(value - (2 * jsd - math.log(4))) < 5 * se, (value, 2 * jsd - math.log(4), se)


def test_gan_generator_loss_gradients_match_the_closed_forms():
    """Eq. 1.9: d/dD of log(1 - D) is -1/(1 - D), of -log D is -1/D; in the logit, -D and -(1 - D).
    At D(G(z)) = 0.001 the minimax gradient (in the logit) is 1000 times smaller than the non-saturating one."""
    d = torch.tensor([0.001, 0.01, 0.1, 0.5, 0.9, 0.99], dtype=torch.float64, requires_grad=True)
    logit = (d.log() - (1 - d).log())  # sigmoid(logit) = d
    n = len(d)
    for kind, value, d_grad, l_grad in (("minimax", (1 - d).log(), -1 / (1 - d), -d),
                                        ("nonsaturating", -d.log(), -1 / d, -(1 - d))):
        loss = M.generator_loss(logit.unsqueeze(1), kind)
        assert loss.item() == pytest.approx(value.mean().item(), rel=1e-10)
        (grad_d,) = torch.autograd.grad(loss * n, d, retain_graph=True)
        torch.testing.assert_close(grad_d, d_grad.detach(), rtol=1e-8, atol=0)
        l = logit.detach().requires_grad_()
        (grad_l,) = torch.autograd.grad(M.generator_loss(l.unsqueeze(1), kind) * n, l)
        torch.testing.assert_close(grad_l, l_grad.detach(), rtol=1e-8, atol=1e-12)
    l = torch.tensor([[math.log(0.001 / 0.999)]], requires_grad=True)
    (g_minimax,) = torch.autograd.grad(M.generator_loss(l, "minimax"), l)
    (g_nonsat,) = torch.autograd.grad(M.generator_loss(l, "nonsaturating"), l)
    assert abs(g_minimax.item()) < 0.0011 and abs(g_nonsat.item()) > 0.99


def test_gan_gradient_probe_shows_the_saturation():
    """A D that rejects every sample (logit about -8): the minimax gradient reaching G is about
    D / (1 - D) = e^-8 times the non-saturating one, since both flow back through the same D."""
    torch.manual_seed(0)
    D = nn.Sequential(nn.Flatten(), nn.Linear(784, 1))
    with torch.no_grad():
        D[1].weight.mul_(1e-3)
        D[1].bias.fill_(-8.0)
    gan = M.GAN(M.Generator(latent_dim=8, hidden=16), D, latent_dim=8)
    norms = M.gradient_probe(gan, n=64)
    assert norms["minimax"] / norms["nonsaturating"] == pytest.approx(math.exp(-8), rel=0.01)
    assert all(p.grad is None for p in gan.parameters())  # the probe leaves no gradient behind


# --- runs ---


def check_outputs(out_dir, n):
    for name in ("ckpt.pt", "samples.png", "samples.npz"):
        assert (out_dir / name).exists(), f"{name} was not written"
    images = np.load(out_dir / "samples.npz")["images"]
    assert images.dtype == np.uint8 and images.shape == (n, 1, 28, 28)


def test_gan_smoke_resume_sample_only_and_minimax(tiny_mnist, tmp_path):
    result = M.main(gan_args(tiny_mnist, tmp_path))
    assert result["step"] == 2 and len(result["history"]) == 2
    assert all(math.isfinite(result[k]) for k in ("loss_d", "loss_g", "d_real", "d_fake", "grad_g", "probe_minimax"))
    check_outputs(tmp_path, 10)
    ckpt = M.load_checkpoint(tmp_path / "ckpt.pt")
    assert set(ckpt["model"]) == set(ckpt["optimizer"]) == {"G", "D"} and ckpt["config"]["g_loss"] == "nonsaturating"
    assert M.main(gan_args(tiny_mnist, tmp_path, "--steps", "4", "--resume"))["step"] == 4
    assert M.main(gan_args(tiny_mnist, tmp_path, "--sample-only", "--num-samples", "6"))["step"] == 4
    check_outputs(tmp_path, 6)
    minimax = tmp_path / "minimax"
    result = M.main(gan_args(tiny_mnist, minimax, "--g-loss", "minimax"))
    assert result["step"] == 2 and result["loss_g"] < 0  # log(1 - D) is negative
    assert M.load_checkpoint(minimax / "ckpt.pt")["config"]["g_loss"] == "minimax"


def test_gan_ctrl_c_saves_and_nan_stops(tiny_mnist, tmp_path, monkeypatch):
    original = M.GAN.g_loss
    calls = []

    def interrupted(self, x_fake):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(self, x_fake)
    monkeypatch.setattr(M.GAN, "g_loss", interrupted)
    with pytest.raises(SystemExit, match="interrupted at step 2"):
        M.main(gan_args(tiny_mnist, tmp_path, "--steps", "10", "--log-every", "100"))
    assert M.load_checkpoint(tmp_path / "ckpt.pt")["step"] == 2
    monkeypatch.setattr(M.GAN, "g_loss", lambda self, x: (original(self, x)[0] * float("nan"), torch.tensor(0.0)))
    with pytest.raises(SystemExit, match="loss is"):
        M.main(gan_args(tiny_mnist, tmp_path, "--steps", "10", "--resume"))
    assert M.load_checkpoint(tmp_path / "ckpt.pt")["step"] == 2  # the last good checkpoint is kept


@pytest.mark.parametrize("flags,message", [(["--g-loss", "wasserstein"], "--g-loss must be"),
                                           (["--dropout", "1.5"], "--dropout must be"),
                                           (["--steps", "-1"], "--steps must be")])
def test_gan_bad_input_exits_with_one_message(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as exit_info:
        M.main(["--out-dir", str(tmp_path), *flags])
    assert exit_info.value.code != 0
    assert message in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing trained, nothing written
