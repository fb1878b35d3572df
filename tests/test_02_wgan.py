"""Tests for 02_gans/wgan.py: shapes, weight clipping, the critic loss as -W_hat, n_critic critic
steps per generator step, a smoke run with --resume and --sample-only, bad input."""

import copy

import numpy as np
import pytest
import torch

from conftest import load_script

M = load_script("02_gans/wgan.py")


def test_wgan_shapes():
    torch.manual_seed(0)
    model = M.WGAN(latent_dim=8, channels=4)
    x_fake = model.G(torch.randn(5, 8))
    assert x_fake.shape == (5, 1, 28, 28) and x_fake.abs().max() <= 1  # tanh output
    assert model.D(x_fake).shape == (5, 1)
    samples = model.sample(3)
    assert samples.shape == (3, 1, 28, 28) and samples.min() >= 0 and samples.max() <= 1


def test_wgan_critic_loss_is_minus_w_estimate():
    torch.manual_seed(1)
    model = M.WGAN(latent_dim=8, channels=4)
    x, z = torch.ones(16, 1, 28, 28), torch.randn(16, 8)  # all-white images: far from G's, a clear gap
    loss_D, w_hat = model.d_loss(x, z)
    assert torch.equal(loss_D, -w_hat)
    with torch.no_grad():  # Eq. 3.5 by hand: mean critic score of real minus mean score of generated
        by_hand = model.D(x).mean() - model.D(model.G(z)).mean()
        assert model.g_loss(z).item() == pytest.approx(-model.D(model.G(z)).mean().item(), abs=1e-7)
    assert abs(by_hand.item()) > 1e-5  # a nonzero estimate, so the sign is tested
    assert w_hat.item() == pytest.approx(by_hand.item(), rel=1e-4, abs=1e-8)


def test_wgan_clipping_keeps_critic_weights_in_the_box():
    c = 0.01
    torch.manual_seed(2)
    model = M.WGAN(latent_dim=8, channels=4, clip=c)
    unclipped = copy.deepcopy(model)
    assert all(p.abs().max() <= c for p in model.D.parameters())  # clipped at construction
    x = torch.rand(16, 1, 28, 28) * 2 - 1

    # control: the same critic step without the clip leaves the box [-c, c]
    torch.manual_seed(3)
    opt = torch.optim.RMSprop(unclipped.D.parameters(), lr=5e-5)
    loss_D, _ = unclipped.d_loss(x, torch.randn(16, 8))
    loss_D.backward()
    opt.step()
    assert max(p.abs().max().item() for p in unclipped.D.parameters()) > c

    # the training step clips after the critic update
    torch.manual_seed(3)
    opt_D = torch.optim.RMSprop(model.D.parameters(), lr=5e-5)
    opt_G = torch.optim.RMSprop(model.G.parameters(), lr=5e-5)
    M.train_step(model, opt_D, opt_G, lambda: x, n_critic=1)
    assert all(p.abs().max() <= c for p in model.D.parameters())
    changed = sum((p != q).sum().item() for p, q in zip(model.D.parameters(), unclipped.D.parameters()))
    assert changed > 0  # the clipped step did move some weights to the edge, where the control left them outside


def test_wgan_n_critic_steps_per_generator_step():
    torch.manual_seed(4)
    model = M.WGAN(latent_dim=8, channels=4)
    opt_D = torch.optim.RMSprop(model.D.parameters(), lr=5e-5)
    opt_G = torch.optim.RMSprop(model.G.parameters(), lr=5e-5)
    batches = []
    def next_batch():
        batches.append(1)
        return torch.rand(8, 1, 28, 28) * 2 - 1
    for _ in range(2):
        w_hat, loss_G = M.train_step(model, opt_D, opt_G, next_batch, n_critic=3)
    first_d, first_g = next(iter(model.D.parameters())), next(iter(model.G.parameters()))
    assert opt_D.state[first_d]["step"].item() == 6 and opt_G.state[first_g]["step"].item() == 2
    assert len(batches) == 6 and w_hat.shape == () and loss_G.shape == ()


def test_wgan_smoke_run_resume_and_sample_only(tiny_mnist, tmp_path):
    args = ["--steps", "2", "--channels", "4", "--latent-dim", "8", "--batch-size", "8", "--n-critic", "2",
            "--num-samples", "10", "--log-every", "1", "--device", "cpu", "--data-dir", str(tiny_mnist),
            "--out-dir", str(tmp_path)]
    result = M.main(args)
    for name in ("ckpt.pt", "samples.png", "samples.npz", "w_estimate.svg"):
        assert (tmp_path / name).exists()
    images = np.load(tmp_path / "samples.npz")["images"]
    assert images.dtype == np.uint8 and images.shape == (10, 1, 28, 28)
    assert result["step"] == 2 and [s for s, _ in result["w_history"]] == [1, 2]
    assert np.isfinite(result["w_estimate"])
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert set(ckpt["model"]) == {"G", "D"} and set(ckpt["optimizer"]) == {"G", "D"}
    assert ckpt["optimizer"]["D"]["state"][0]["step"].item() == 4  # 2 generator steps x n_critic = 2
    assert ckpt["optimizer"]["G"]["state"][0]["step"].item() == 2

    result = M.main(args[:1] + ["3"] + args[2:] + ["--resume"])
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert result["step"] == 3 and ckpt["optimizer"]["D"]["state"][0]["step"].item() == 6
    assert len(result["w_history"]) == 3

    (tmp_path / "samples.npz").unlink()
    result = M.main(args + ["--sample-only"])
    assert result["step"] == 3 and (tmp_path / "samples.npz").exists()


@pytest.mark.parametrize("bad", [["--clip", "0"], ["--clip", "-0.01"], ["--n-critic", "0"], ["--steps", "-1"]])
def test_wgan_bad_input_exits(bad, capsys):
    with pytest.raises(SystemExit) as e:
        M.main(bad + ["--device", "cpu"])
    assert e.value.code != 0
    assert "error:" in capsys.readouterr().err
