"""Tests for 01_autoencoders: shapes, the identities the README derives, the plumbing helpers (owned
by autoencoder.py), smoke runs of every script, and learning checks (marked slow) on real MNIST."""

import gzip
import hashlib
import io
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT, load_script

AE = load_script("01_autoencoders/autoencoder.py")


def tiny_args(data_dir, out_dir, *extra):
    return ["--steps", "2", "--device", "cpu", "--data-dir", str(data_dir), "--out-dir", str(out_dir), *extra]


def check_outputs(out_dir, *extra_files):
    for name in ("ckpt.pt", "samples.png", "samples.npz", *extra_files):
        assert (out_dir / name).exists(), f"{name} was not written"
    images = np.load(out_dir / "samples.npz")["images"]
    assert images.dtype == np.uint8 and images.shape[1:] == (1, 28, 28)
    return images


# --- autoencoder.py: the model ---


def test_autoencoder_shapes():
    model = AE.Autoencoder(hidden=32, latent_dim=20)
    x = torch.rand(5, 1, 28, 28)
    z = model.encode(x)
    assert z.shape == (5, 20)
    assert model.decode(z).shape == (5, 1, 28, 28)
    assert model.loss(x).shape == ()
    assert model.sample(7).shape == (7, 1, 28, 28)


def test_autoencoder_loss_is_summed_squared_error():
    # With every decoder weight zero, x_hat = sigmoid(b) for the last bias b: Eq. 1.2 by hand.
    model = AE.Autoencoder(hidden=16, latent_dim=4)
    for p in model.decoder.parameters():
        torch.nn.init.zeros_(p)
    b = torch.randn(784)
    model.decoder[4].bias.data.copy_(b)
    x = torch.rand(3, 1, 28, 28)
    expected = ((torch.sigmoid(b) - x.view(3, 784)) ** 2).sum(1).mean()
    assert torch.allclose(model.loss(x), expected)


def test_code_gaussian_matches_code_moments():
    torch.manual_seed(0)
    model = AE.Autoencoder(hidden=16, latent_dim=3)
    x = torch.rand(500, 1, 28, 28)
    model.fit_code_gaussian(x)
    z = model.encode(x).detach().double().numpy()
    chol = model.code_chol.double()
    assert np.allclose(model.code_mean.double().numpy(), z.mean(0), atol=1e-5)
    assert np.allclose((chol @ chol.T).numpy(), np.cov(z.T), atol=1e-4)


def principal_angles(a, b):
    """Principal angles (degrees) between the column spaces of a and b, computed independently of
    the script: orthonormalize both with numpy's QR, then the singular values are the cosines."""
    qa, _ = np.linalg.qr(a)
    qb, _ = np.linalg.qr(b)
    return np.degrees(np.arccos(np.clip(np.linalg.svd(qa.T @ qb, compute_uv=False), -1, 1)))


def test_linear_autoencoder_spans_the_pca_subspace():
    # Data with a known top-3 principal subspace: 3 strong directions plus weak isotropic noise.
    g = torch.Generator().manual_seed(0)
    basis, _ = torch.linalg.qr(torch.randn(784, 3, generator=g))
    x = (torch.randn(2000, 3, generator=g) * torch.tensor([3.0, 2.0, 1.5])) @ basis.T
    x = (x + 0.1 * torch.randn(2000, 784, generator=g) + 0.5).view(-1, 1, 28, 28)
    torch.manual_seed(0)
    model = AE.Autoencoder(hidden=16, latent_dim=3, linear=True)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    before = AE.pca_angle(model, x)
    for _ in range(1000):
        optimizer.zero_grad()
        model.loss(x[torch.randint(2000, (256,), generator=g)]).backward()
        optimizer.step()
    # Eq. 1.3: the decoder's column space W3 W2 W1 is the top-3 principal subspace.
    decoder_map = (model.decoder[4].weight @ model.decoder[2].weight @ model.decoder[0].weight).detach().double().numpy()
    _, eigenvectors = np.linalg.eigh(np.cov(x.view(2000, 784).double().numpy().T))
    angles = principal_angles(decoder_map, eigenvectors[:, -3:])  # top 3 principal directions of the sample
    assert before > 45, "an untrained linear autoencoder should not already span the subspace"
    assert angles.max() < 3, f"principal angles {angles} degrees"
    assert abs(AE.pca_angle(model, x) - angles.max()) < 0.05  # the script's own measure agrees


# --- plumbing (owned by autoencoder.py) ---


def test_load_mnist_reads_gzipped_and_raw(tiny_mnist):
    x_train, y_train = AE.load_mnist(tiny_mnist, train=True)  # gzipped files
    x_test, y_test = AE.load_mnist(tiny_mnist, train=False)  # raw files
    assert x_train.shape == (400, 28, 28) and x_train.dtype == torch.uint8
    assert y_train.shape == (400,) and y_train.dtype == torch.int64 and 0 <= y_train.min() and y_train.max() <= 9
    assert x_test.shape == (200, 28, 28) and y_test.shape == (200,)


def copy_mnist(src, dst):
    (dst / "mnist").mkdir(parents=True)
    for f in (src / "mnist").iterdir():
        (dst / "mnist" / f.name).write_bytes(f.read_bytes())
    return dst / "mnist"


def test_load_mnist_rejects_truncated_and_wrong_files(tiny_mnist, tmp_path):
    folder = copy_mnist(tiny_mnist, tmp_path)
    raw = folder / "t10k-images-idx3-ubyte"
    raw.write_bytes(raw.read_bytes()[:-100])  # truncated
    with pytest.raises(SystemExit, match="t10k-images-idx3-ubyte.*truncated"):
        AE.load_mnist(tmp_path, train=False)
    raw.write_bytes(b"\x00\x00\x08\x01" + raw.read_bytes()[4:])  # a labels magic number in an images file
    with pytest.raises(SystemExit, match="magic number 2051"):
        AE.load_mnist(tmp_path, train=False)
    gz = folder / "train-images-idx3-ubyte.gz"
    gz.write_bytes(gz.read_bytes()[:200])  # a cut-off download
    with pytest.raises(SystemExit, match="train-images-idx3-ubyte.gz"):
        AE.load_mnist(tmp_path, train=True)


def test_load_mnist_offline_names_the_four_files(tmp_path, monkeypatch):
    def offline(url, timeout):
        raise OSError("network unreachable")
    monkeypatch.setattr(AE.urllib.request, "urlopen", offline)
    with pytest.raises(SystemExit) as error:
        AE.load_mnist(tmp_path, train=True)
    message = str(error.value)
    assert all(name + ".gz" in message for name in AE.MNIST_FILES) and str(tmp_path / "mnist") in message


def test_load_mnist_download_checks_md5_and_caches(tiny_mnist, tmp_path, monkeypatch):
    served = {name: gzip.compress(gzip.decompress((tiny_mnist / "mnist" / f"{name}.gz").read_bytes()))
              for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte")}
    calls = []

    def fake_urlopen(url, timeout):
        calls.append(url)
        name = url.rsplit("/", 1)[1].removesuffix(".gz")
        data = served[name] if not url.startswith(AE.MNIST_MIRRORS[0]) else b"corrupt mirror"
        return io.BytesIO(data)
    monkeypatch.setattr(AE.urllib.request, "urlopen", fake_urlopen)
    for name, data in served.items():
        _, magic, shape = AE.MNIST_FILES[name]
        monkeypatch.setitem(AE.MNIST_FILES, name, (hashlib.md5(data).hexdigest(), magic, shape))
    x, y = AE.load_mnist(tmp_path, train=True)  # first mirror fails its MD5, the second is used
    assert x.shape == (400, 28, 28) and len(calls) == 4
    assert sorted(f.name for f in (tmp_path / "mnist").iterdir()) == ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"]
    AE.load_mnist(tmp_path, train=True)
    assert len(calls) == 4, "cached files are not downloaded again"


def test_parse_config_flags_and_errors(capsys):
    cfg = AE.parse_config(AE.Config, ["--batch-size", "7", "--linear", "--lr", "0.01", "--device", "cpu"])
    assert (cfg.batch_size, cfg.linear, cfg.lr, cfg.device) == (7, True, 0.01, "cpu")
    assert AE.parse_config(AE.Config, ["--no-amp"]).amp is False
    for bad in (["--steps", "-1"], ["--lr", "0"], ["--device", "gpu"], ["--batch-size", "x"]):
        with pytest.raises(SystemExit) as error:
            AE.parse_config(AE.Config, bad)
        assert error.value.code == 2
    capsys.readouterr()
    with pytest.raises(SystemExit):
        AE.parse_config(AE.Config, ["--help"])
    assert "size of the code z" in capsys.readouterr().out  # the field's comment is its help


def test_pick_device():
    assert AE.pick_device("cpu") == torch.device("cpu")
    assert AE.pick_device("auto").type in ("cpu", "cuda", "mps")
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="CUDA is not available"):
            AE.pick_device("cuda")


def test_checkpoint_round_trip_is_atomic(tmp_path):
    state = {"model": {"w": torch.arange(3.0)}, "step": 5, "config": {"lr": 0.1}}
    AE.save_checkpoint(tmp_path / "ckpt.pt", state)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]  # no temporary file left behind
    loaded = AE.load_checkpoint(tmp_path / "ckpt.pt")
    assert loaded["step"] == 5 and torch.equal(loaded["model"]["w"], state["model"]["w"])
    with pytest.raises(SystemExit, match="no checkpoint"):
        AE.load_checkpoint(tmp_path / "missing.pt")


def test_save_grid_layout(tmp_path):
    AE.save_grid(torch.rand(10, 1, 28, 28), tmp_path / "g.png", nrow=4, scale=1)
    assert Image.open(tmp_path / "g.png").size == (4 * 30 + 2, 3 * 30 + 2)
    AE.save_grid(torch.rand(2, 3, 8, 8), tmp_path / "c.png", nrow=8, scale=2)
    assert Image.open(tmp_path / "c.png").mode == "RGB"


# --- autoencoder.py: runs ---


def test_autoencoder_smoke_resume_and_sample_only(tiny_mnist, tmp_path):
    result = AE.main(tiny_args(tiny_mnist, tmp_path, "--hidden", "16", "--num-samples", "10"))
    assert result["step"] == 2 and math.isfinite(result["test_mse"])
    assert check_outputs(tmp_path, "reconstructions.png").shape[0] == 10
    assert AE.main(tiny_args(tiny_mnist, tmp_path, "--hidden", "16", "--steps", "4", "--resume"))["step"] == 4
    assert AE.main(tiny_args(tiny_mnist, tmp_path, "--hidden", "16", "--sample-only"))["step"] == 4


def test_autoencoder_ctrl_c_saves_and_nan_stops(tiny_mnist, tmp_path, monkeypatch):
    original = AE.Autoencoder.loss
    calls = []

    def interrupted(self, x):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(self, x)
    monkeypatch.setattr(AE.Autoencoder, "loss", interrupted)
    with pytest.raises(SystemExit, match="interrupted at step 2"):
        AE.main(tiny_args(tiny_mnist, tmp_path, "--hidden", "16", "--steps", "10"))
    assert AE.load_checkpoint(tmp_path / "ckpt.pt")["step"] == 2
    monkeypatch.setattr(AE.Autoencoder, "loss", lambda self, x: original(self, x) * float("nan"))
    with pytest.raises(SystemExit, match="loss is nan"):
        AE.main(tiny_args(tiny_mnist, tmp_path, "--hidden", "16", "--steps", "10", "--resume"))
    assert AE.load_checkpoint(tmp_path / "ckpt.pt")["step"] == 2  # the last good checkpoint is kept


def test_autoencoder_runs_as_a_program(tiny_mnist, tmp_path):
    script = ROOT / "01_autoencoders" / "autoencoder.py"
    done = subprocess.run([sys.executable, str(script), *tiny_args(tiny_mnist, tmp_path, "--hidden", "16", "--linear")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "principal angle" in done.stdout
    bad = subprocess.run([sys.executable, str(script), "--data-dir", str(tmp_path / "empty"), "--steps", "1"],
                         capture_output=True, text=True, timeout=120,
                         env={"http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9"})  # offline
    assert bad.returncode != 0 and "Traceback" not in bad.stderr


# --- learning checks (real MNIST) ---


@pytest.mark.slow
def test_autoencoder_learns(mnist_dir, tmp_path):
    # Test squared error per image after 600 steps (hidden 256), seeds 0, 1, 2:
    # 18.42, 17.71, 17.87 (untrained: 181.5), about 5 s each on the 2-core CPU.
    # Threshold: the worst seed plus a margin. An untrained network scores far above it.
    threshold = 20.0
    cfg = AE.Config(seed=0, device="cpu", data_dir=mnist_dir, out_dir=str(tmp_path), hidden=256,
                    steps=600, log_every=10_000, num_samples=64)
    untrained = AE.train(AE.Config(**{**cfg.__dict__, "steps": 0}))["test_mse"]
    trained = AE.train(cfg)["test_mse"]
    assert untrained > threshold, f"the untrained model already passes ({untrained:.1f})"
    assert trained < threshold, f"test squared error {trained:.1f} per image, threshold {threshold}"
