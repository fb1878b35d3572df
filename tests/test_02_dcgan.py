"""Tests for 02_gans/dcgan.py: shapes, the paper's initialization and batch-norm placement, the losses,
a smoke run with --resume and --sample-only, bad input, and a learning check on real MNIST."""

import numpy as np
import pytest
import torch
import torch.nn as nn

from conftest import load_script, score_samples

M = load_script("02_gans/dcgan.py")


def layer_shapes(net, x, kind):
    """Output shape of every `kind` layer of a Sequential, in order."""
    shapes = []
    for layer in net:
        x = layer(x)
        if isinstance(layer, kind):
            shapes.append(tuple(x.shape))
    return shapes, x


def test_dcgan_shapes():
    torch.manual_seed(0)
    model = M.DCGAN(latent_dim=16, channels=8)
    z = model.noise(5)
    assert z.shape == (5, 16, 1, 1) and -1 <= z.min() and z.max() <= 1  # z ~ U(-1, 1)
    shapes, x = layer_shapes(model.G, z, nn.ConvTranspose2d)
    assert shapes == [(5, 32, 4, 4), (5, 16, 7, 7), (5, 8, 14, 14), (5, 1, 28, 28)]  # 4c, 2c, c, 1
    assert x.abs().max() <= 1  # tanh output
    shapes, logit = layer_shapes(model.D, x, nn.Conv2d)
    assert shapes == [(5, 8, 14, 14), (5, 16, 7, 7), (5, 32, 4, 4), (5, 1, 1, 1)]  # c, 2c, 4c, one unit
    assert logit.shape == (5,)
    s = model.sample(7)
    assert s.shape == (7, 1, 28, 28) and 0 <= s.min() and s.max() <= 1


def test_dcgan_init_is_normal_0_002():
    """Every conv weight ~ N(0, 0.02) (the paper), BN scales ~ N(1, 0.02), biases 0: mean and standard
    deviation of each tensor within 5 standard errors (sd of a sample sd ~ sigma / sqrt(2n))."""
    torch.manual_seed(0)
    model = M.DCGAN(latent_dim=100, channels=32)
    convs = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(convs) == 8 and len(norms) == 5  # 3 in G, 2 in D
    for module, center in [(m, 0.0) for m in convs] + [(m, 1.0) for m in norms]:
        w = module.weight.detach().double().flatten()
        n = w.numel()
        assert abs(w.mean().item() - center) < 5 * 0.02 / n ** 0.5, module
        assert abs(w.std().item() - 0.02) < 5 * 0.02 / (2 * n) ** 0.5, module
        if module.bias is not None:
            assert torch.all(module.bias == 0), module


def test_dcgan_batch_norm_placement():
    """BN after every hidden conv, but not on G's output layer nor D's input layer; ReLU in G with a
    tanh output, LeakyReLU(0.2) in D; no pooling and no fully connected layer anywhere."""
    model = M.DCGAN(latent_dim=16, channels=8)
    g, d = list(model.G), list(model.D)
    g_convs = [i for i, m in enumerate(g) if isinstance(m, nn.ConvTranspose2d)]
    d_convs = [i for i, m in enumerate(d) if isinstance(m, nn.Conv2d)]
    for i in g_convs[:-1]:
        assert isinstance(g[i + 1], nn.BatchNorm2d) and isinstance(g[i + 2], nn.ReLU)
    assert isinstance(g[g_convs[-1] + 1], nn.Tanh) and g_convs[-1] + 2 == len(g)  # output: no BN
    assert isinstance(d[d_convs[0] + 1], nn.LeakyReLU)  # input layer: no BN
    for i in d_convs[1:-1]:
        assert isinstance(d[i + 1], nn.BatchNorm2d) and isinstance(d[i + 2], nn.LeakyReLU)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in d[d_convs[-1]:])  # the logit is not normalized
    assert all(m.negative_slope == 0.2 for m in d if isinstance(m, nn.LeakyReLU))
    hidden = [m for m in g[1:] + d[:-2] if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
    assert len(hidden) == 6 and all(m.stride == (2, 2) for m in hidden)  # strided, all but projection and logit
    banned = (nn.Linear, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
    assert not any(isinstance(m, banned) for m in model.modules())


def test_dcgan_losses_match_their_equations():
    """Eq. 2.1 and 2.2 written with sigmoid and log, against the softplus forms in the script."""
    torch.manual_seed(0)
    model = M.DCGAN(latent_dim=16, channels=8)
    x, fake = torch.rand(6, 1, 28, 28) * 2 - 1, model.G(model.noise(6)).detach()
    model.eval()  # batch norm in eval mode, so D gives the same output on each call
    d_x, d_fake = torch.sigmoid(model.D(x)), torch.sigmoid(model.D(fake))
    expected_d = -(d_x.log().mean() + (1 - d_fake).log().mean())
    assert model.d_loss(x, fake).item() == pytest.approx(expected_d.item(), rel=1e-5)
    assert model.g_loss(fake).item() == pytest.approx(-d_fake.log().mean().item(), rel=1e-5)


def test_dcgan_smoke_resume_sample_only(tiny_mnist, tmp_path):
    args = ["--channels", "4", "--latent-dim", "8", "--batch-size", "8", "--device", "cpu", "--ema", "0.9",
            "--num-samples", "10", "--log-every", "1", "--data-dir", str(tiny_mnist), "--out-dir", str(tmp_path)]
    result = M.main(args + ["--steps", "2"])
    assert result["step"] == 2 and np.isfinite(result["d_loss"]) and np.isfinite(result["g_loss"])
    for name in ("ckpt.pt", "samples.png", "samples.npz"):
        assert (tmp_path / name).exists()
    images = np.load(tmp_path / "samples.npz")["images"]
    assert images.dtype == np.uint8 and images.shape == (10, 1, 28, 28)
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert set(ckpt) == {"model", "ema", "optimizer", "config", "step"} and set(ckpt["model"]) == {"G", "D"}
    assert M.main(args + ["--steps", "3", "--resume", "--lr-decay"])["step"] == 3
    assert M.main(args + ["--steps", "3", "--sample-only"])["step"] == 3
    with pytest.raises(SystemExit, match="--channels"):  # a checkpoint of another width
        M.main(args[2:] + ["--channels", "6", "--sample-only"])


@pytest.mark.parametrize("flags", [["--steps", "-1"], ["--channels", "0"], ["--ema", "1.0"], ["--beta1", "-0.1"]])
def test_dcgan_bad_input_exits(flags, capsys):
    with pytest.raises(SystemExit) as e:
        M.main(flags)
    assert e.value.code != 0
    assert "error" in capsys.readouterr().err


@pytest.mark.slow
def test_dcgan_learns_mnist_digits(mnist_dir, short_classifier, tmp_path):
    """400 steps of the CPU recipe's settings (about 20 s on this 2-core CPU) already give samples
    with FID < 100 against 2000 test digits (short classifier) and every class >= 0.5 % of them; the
    untrained generator (--steps 0) fails. Measured, seeds 0, 1, 2: FID 83.7, 76.2, 77.3 and smallest
    class share 0.013, 0.030, 0.022; --steps 0: FID 551.1, smallest class share 0.000."""
    def scores(steps):
        out = tmp_path / str(steps)
        M.main(["--seed", "0", "--steps", str(steps), "--channels", "32", "--batch-size", "64", "--ema", "0.999",
                "--device", "cpu", "--data-dir", mnist_dir, "--out-dir", str(out)])
        return score_samples(short_classifier, mnist_dir, np.load(out / "samples.npz")["images"])

    def passes(r):
        return r["fid"] < 100 and min(r["histogram"]) >= 0.005

    trained, untrained = scores(400), scores(0)
    assert passes(trained), f"FID {trained['fid']:.1f} (need < 100), class shares {trained['histogram']}"
    assert not passes(untrained), f"the untrained generator passes: FID {untrained['fid']:.1f}"
