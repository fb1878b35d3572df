"""Tests for 02_gans/stylegan.py: shapes, weight demodulation, the grouped modulated conv against a
per-sample loop, R1 against finite differences, truncation, a smoke run and bad input."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import load_script

M = load_script("02_gans/stylegan.py")


def test_stylegan_shapes():
    torch.manual_seed(0)
    gan = M.StyleGAN2(latent_dim=16, mapping_layers=3, channels=8)
    z = torch.randn(6, 16)
    assert gan.G.map(z).shape == (6, 16)
    assert gan.G.num_ws == 8  # 4, 8, 16, 32: one conv at 4 x 4, two at each later resolution, + a toRGB
    assert gan.G(z, mixing_prob=1.0).shape == (6, 1, 32, 32)
    assert gan.D(torch.randn(6, 1, 32, 32)).shape == (6,)
    assert gan.sample(5).shape == (5, 1, 28, 28)
    assert gan.style_mixing_grid(n=3).shape == (16, 1, 28, 28)


def test_stylegan_demodulated_weights_have_unit_norm_per_output_channel():
    torch.manual_seed(0)
    weight = torch.randn(5, 7, 3, 3, dtype=torch.float64)
    s = torch.randn(4, 7, dtype=torch.float64) * 3  # random styles, some negative
    w = M.modulate(weight, s, demodulate=True)  # (4, 5, 7, 3, 3)
    norms = w.pow(2).sum(dim=(2, 3, 4)).sqrt()  # one per sample and output channel
    assert torch.allclose(norms, torch.ones(4, 5, dtype=torch.float64), atol=1e-6)
    raw = M.modulate(weight, s, demodulate=False).pow(2).sum(dim=(2, 3, 4)).sqrt()
    assert (raw - 1).abs().min() > 0.1  # without demodulation the norms are not 1
    # Eq. 5.3: with i.i.d. unit-variance inputs the demodulated output has unit variance per channel
    x = torch.randn(4000, 7, 3, 3, dtype=torch.float64)
    out = torch.einsum("nikl,bjikl->bjn", x, w)  # (4, 5, 4000): one output pixel per input patch
    se = (2 / 4000) ** 0.5  # standard error of a sample variance of 4000 Gaussian values
    assert (out.var(-1) - 1).abs().max() < 5 * se


def test_stylegan_grouped_modulated_conv_equals_per_sample_convs():
    torch.manual_seed(0)
    x = torch.randn(3, 6, 9, 9, dtype=torch.float64)
    weight = torch.randn(4, 6, 3, 3, dtype=torch.float64)
    s = torch.randn(3, 6, dtype=torch.float64)
    for demodulate in (True, False):
        expected = []
        for b in range(3):  # an independent implementation: one ordinary conv per sample
            w = weight * s[b].view(1, 6, 1, 1)
            if demodulate:
                w = w / (w.pow(2).sum(dim=(1, 2, 3), keepdim=True) + 1e-8).sqrt()
            expected.append(F.conv2d(x[b:b + 1], w, padding=1))
        assert torch.allclose(M.modulated_conv2d(x, weight, s, demodulate), torch.cat(expected), atol=1e-10)


def test_stylegan_r1_matches_finite_differences():
    torch.manual_seed(0)
    D = M.Discriminator(channels=4, resolution=8, mbstd_group=2).double()
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64, requires_grad=True)
    r1 = M.r1_penalty(D(x), x).item()
    # central differences of sum_b D(x)_b, one coordinate at a time (the minibatch-stddev feature couples
    # the samples, so the sum over the batch is the function whose gradient R1 takes)
    h, flat, squares = 1e-5, x.detach().flatten(), 0.0
    with torch.no_grad():
        for i in range(flat.numel()):
            e = torch.zeros_like(flat)
            e[i] = h
            up, down = D((flat + e).view_as(x)).sum(), D((flat - e).view_as(x)).sum()
            squares += ((up - down) / (2 * h)).item() ** 2
    assert r1 == pytest.approx(squares / 2, rel=1e-6)  # E_x over the batch of 2
    # d_loss adds r1_every * gamma / 2 * R1 on regularization steps (Eq. 5.7, 5.8)
    gan = M.StyleGAN2(latent_dim=8, mapping_layers=2, channels=4, gamma=3.0, r1_every=4, mbstd_group=2,
                      resolution=8).double()
    real = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    torch.manual_seed(1)
    plain, zero = gan.d_loss(real, regularize=False)
    torch.manual_seed(1)
    regularized, r1 = gan.d_loss(real, regularize=True)
    assert zero.item() == 0 and r1.item() > 0
    assert (regularized - plain).item() == pytest.approx(4 * 3.0 / 2 * r1.item(), rel=1e-9)


def test_stylegan_truncation():
    torch.manual_seed(0)
    G = M.Generator(latent_dim=8, mapping_layers=2, channels=4)
    G.w_avg.copy_(torch.randn(8))
    w = torch.randn(5, 8)
    assert torch.allclose(G.truncate(w, 0.0), G.w_avg.expand(5, 8))
    assert torch.allclose(G.truncate(w, 1.0), w)
    assert torch.allclose(G.truncate(w, 0.5), (w + G.w_avg) / 2)
    # w_avg is a running mean of the mapped w's, updated in training mode only
    G.eval()
    before = G.w_avg.clone()
    G.map(torch.randn(64, 8))
    assert torch.equal(G.w_avg, before)
    G.train()
    z = torch.randn(64, 8)
    w = G.map(z).detach()
    assert torch.allclose(G.w_avg, 0.995 * before + 0.005 * w.mean(0), atol=1e-6)


def test_stylegan_smoke_resume_and_sample_only(tiny_mnist, tmp_path):
    common = ["--device", "cpu", "--data-dir", str(tiny_mnist), "--out-dir", str(tmp_path), "--channels", "4",
              "--latent-dim", "8", "--mapping-layers", "2", "--batch-size", "8", "--num-samples", "10",
              "--log-every", "1", "--r1-every", "2"]
    result = M.main(["--steps", "2"] + common)
    assert result["step"] == 2 and np.isfinite([result["d_loss"], result["g_loss"], result["r1"]]).all()
    for name in ("ckpt.pt", "samples.png", "samples.npz", "truncation.png", "style_mixing.png"):
        assert (tmp_path / name).exists(), f"{name} was not written"
    images = np.load(tmp_path / "samples.npz")["images"]
    assert images.dtype == np.uint8 and images.shape == (10, 1, 28, 28)
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert set(ckpt) == {"model", "ema", "optimizer", "config", "step"} and set(ckpt["model"]) == {"G", "D"}
    assert M.main(["--steps", "3", "--resume"] + common)["step"] == 3
    assert M.main(["--steps", "3", "--sample-only"] + common)["step"] == 3


def test_stylegan_rejects_bad_options(capsys):
    for bad in (["--gamma", "-1"], ["--mixing-prob", "1.5"], ["--r1-every", "0"], ["--channels", "0"]):
        with pytest.raises(SystemExit) as error:
            M.main(bad)
        assert error.value.code != 0
        assert "error:" in capsys.readouterr().err
