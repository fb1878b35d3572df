"""
Denoising autoencoder: corrupt an MNIST digit, then train a network to restore the clean one.

Papers: Vincent, Larochelle, Bengio and Manzagol, "Extracting and Composing Robust Features with
Denoising Autoencoders", ICML 2008 (no arXiv id). Vincent, "A Connection Between Score Matching and
Denoising Autoencoders", Neural Computation 2011 (no arXiv id). Alain and Bengio, "What Regularized
Auto-Encoders Learn from the Data-Generating Distribution", JMLR 2014, arXiv:1211.4246.

The idea: corrupt x into x_tilde, with Gaussian noise (--corruption gaussian) or by zeroing a random
fraction of the pixels (--corruption mask), and train r so that r(x_tilde) is close to the clean x.
Copying the input no longer wins, so r must learn what digits look like. With Gaussian noise and
squared error the best r is the posterior mean E[x | x_tilde], and Tweedie's formula turns it into
the score of the noise-smoothed data density (README Eq. 3.6): a denoiser is a score model, the
bridge to score models (module 04) and diffusion (module 05). A denoiser is not a sampler. To draw
digits anyway we start from uniform noise and iterate "corrupt, then denoise" (README Eq. 3.9), the
chain of Bengio et al. 2013 (arXiv:1305.6663) with the mean r(x_tilde) in place of a draw from
P(x | x_tilde). Nothing makes it sample the data distribution: after the CPU recipe it gives sharp
strokes, but mostly 8s (README section 3, "Run it").

    x_tilde = x + sigma * eps, eps ~ N(0, I)   or   x_tilde = m * x, m_i ~ Bernoulli(1 - p)   (README Eq. 3.1, 3.2)
    L = E || r(x_tilde) - x ||^2   (summed over pixels)                                      (README Eq. 3.3)
    r*(x_tilde) = E[x | x_tilde] = x_tilde + sigma^2 grad log q_sigma(x_tilde)               (README Eq. 3.6)

Run:   python 01_autoencoders/denoising_autoencoder.py        (defaults sized for one GPU; not measured on a GPU)
CPU recipe: python 01_autoencoders/denoising_autoencoder.py --steps 5000 --hidden 256
Measured on this 2-core CPU: 42 s (wall, whole command), test squared error per image 11.17 denoised
vs 196.19 for the noisy input itself (sigma 0.5).
Writes out/denoising_autoencoder/: ckpt.pt, samples.png, samples.npz, denoising.png.
"""

import argparse
import dataclasses
import gzip
import hashlib
import inspect
import math
import os
import re
import struct
import sys
import time
import typing
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from PIL import Image
from tqdm import tqdm


# --- Config ---


@dataclass
class Config:
    seed: int = 0  # random seed (torch, numpy)
    device: str = "auto"  # auto (cuda, then mps, then cpu) | cpu | cuda | cuda:N | mps
    amp: bool = False  # bf16 autocast on CUDA
    data_dir: str = field(default_factory=lambda: os.environ.get("GENAI_DATA_DIR", "data"))  # folder holding mnist/ (falls back to $GENAI_DATA_DIR, then ./data)
    out_dir: str = "out/denoising_autoencoder"  # checkpoint, samples and grids go here
    steps: int = 20000  # optimizer steps
    batch_size: int = 128  # images per step
    lr: float = 1e-3  # Adam learning rate
    hidden: int = 512  # width of the two hidden layers of encoder and decoder
    latent_dim: int = 128  # size of the code between encoder and decoder (the noise, not this bottleneck, rules out copying)
    corruption: str = "gaussian"  # gaussian: x + sigma * eps (README Eq. 3.1) | mask: zero each pixel with probability mask_prob (Eq. 3.2)
    sigma: float = 0.5  # standard deviation of the Gaussian corruption; pixels are in [0, 1]
    mask_prob: float = 0.5  # probability that the mask corruption zeroes a pixel
    num_samples: int = 1000  # images drawn by the corrupt-then-denoise chain, for samples.npz
    sample_steps: int = 50  # steps of that chain (README Eq. 3.9)
    log_every: int = 1000  # steps between test evaluations, checkpoints and grids
    sample_only: bool = False  # skip training; sample from out_dir/ckpt.pt
    resume: bool = False  # continue training from out_dir/ckpt.pt

    def __post_init__(self):
        if self.corruption not in ("gaussian", "mask"):
            raise ValueError(f"--corruption must be gaussian or mask, got {self.corruption!r}")
        if not self.sigma > 0:
            raise ValueError(f"--sigma must be positive, got {self.sigma}")
        if not 0 <= self.mask_prob < 1:
            raise ValueError(f"--mask-prob must be in [0, 1), got {self.mask_prob}")
        if self.sample_steps < 1:
            raise ValueError(f"--sample-steps must be at least 1, got {self.sample_steps}")


# --- Model ---


class MLP(nn.Sequential):
    """in -> hidden -> hidden -> out, ReLU between layers."""

    def __init__(self, d_in, hidden, d_out):
        super().__init__(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, d_out))


class Denoiser(nn.Module):
    """r: x_tilde -> x_hat, an encoder and a decoder as in autoencoder.py. The sigmoid keeps x_hat in
    [0, 1], where the optimum E[x | x_tilde] lies too (Eq. 3.4): a mean of images in [0, 1]."""

    def __init__(self, hidden=512, latent_dim=128):
        super().__init__()
        self.encoder = MLP(784, hidden, latent_dim)
        self.decoder = MLP(latent_dim, hidden, 784)

    def forward(self, x_tilde):  # (B, 1, 28, 28), any real values -> (B, 1, 28, 28) in [0, 1]
        return torch.sigmoid(self.decoder(self.encoder(x_tilde.flatten(1)))).view_as(x_tilde)


# --- The method ---


class DenoisingAutoencoder(nn.Module):
    """Any network r trained to undo a corruption. Works on any shape of x: (B, 1, 28, 28) digits
    here, (B, 2) points in the tests."""

    def __init__(self, net, corruption="gaussian", sigma=0.5, mask_prob=0.5):
        super().__init__()
        self.net, self.corruption, self.sigma, self.mask_prob = net, corruption, sigma, mask_prob

    def corrupt(self, x, generator=None):
        """x -> x_tilde, a fresh draw each call (pass a generator to make it repeatable)."""
        if self.corruption == "gaussian":  # Eq. 3.1: x_tilde = x + sigma * eps
            eps = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            return x + self.sigma * eps
        # Eq. 3.2: x_tilde = m * x, each m_i ~ Bernoulli(1 - p) on its own
        keep = torch.rand(x.shape, generator=generator, device=x.device) >= self.mask_prob
        return x * keep

    def forward(self, x_tilde):
        return self.net(x_tilde)  # r(x_tilde)

    def loss(self, x):
        """Eq. 3.3: squared error between r(x_tilde) and the CLEAN x, summed over coordinates,
        averaged over the batch. Its minimum is not 0 but the posterior variance (Eq. 3.4)."""
        x_hat = self(self.corrupt(x))
        return (x_hat - x).pow(2).flatten(1).sum(1).mean()

    def score(self, x_tilde):
        """Eq. 3.7: (r(x_tilde) - x_tilde) / sigma^2 estimates grad log q_sigma(x_tilde), the score of
        the data density smoothed by N(0, sigma^2 I). Gaussian corruption only (README explains why)."""
        if self.corruption != "gaussian":
            raise ValueError("the score interpretation holds for Gaussian corruption only")
        return (self(x_tilde) - x_tilde) / self.sigma ** 2

    @torch.no_grad()
    def sample(self, x, steps):
        """Eq. 3.9: iterate x <- r(corrupt(x)) from a starting batch x. Not a sampler of p(x): the
        mean r(x_tilde) stands where Bengio et al. 2013 draw from P(x | x_tilde)."""
        for _ in range(steps):
            x = self(self.corrupt(x))
        return x


# --- Training ---


@torch.no_grad()
def evaluate(model, x_test, batch_size=1000):
    """Test squared error per image of the denoised r(x_tilde) and of the noisy x_tilde itself
    (Eq. 3.3), under one fixed corruption so that the figures compare across steps and runs."""
    generator = torch.Generator(device=x_test.device).manual_seed(1234)
    denoised = noisy = 0.0
    for i in range(0, len(x_test), batch_size):
        x = x_test[i:i + batch_size]  # (B, 1, 28, 28)
        x_tilde = model.corrupt(x, generator)
        denoised += (model(x_tilde) - x).pow(2).sum().item()
        noisy += (x_tilde - x).pow(2).sum().item()
    return denoised / len(x_test), noisy / len(x_test)


def train(cfg):
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    device = pick_device(cfg.device)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    x_train = load_mnist(cfg.data_dir, train=True)[0].to(device).float().div(255).unsqueeze(1)  # (N, 1, 28, 28)
    x_test = load_mnist(cfg.data_dir, train=False)[0].to(device).float().div(255).unsqueeze(1)

    model = DenoisingAutoencoder(Denoiser(cfg.hidden, cfg.latent_dim), cfg.corruption, cfg.sigma, cfg.mask_prob).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    step = 0
    if cfg.resume or cfg.sample_only:
        ckpt = load_checkpoint(out / "ckpt.pt", device)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        step = ckpt["step"]

    def checkpoint():
        save_checkpoint(out / "ckpt.pt", {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                          "config": asdict(cfg), "step": step})

    t0 = time.time()
    bar = tqdm(total=0 if cfg.sample_only else cfg.steps, initial=step, desc="denoising_autoencoder")
    try:
        while step < cfg.steps and not cfg.sample_only:
            # 1. a random batch of clean training digits
            x = x_train[torch.randint(len(x_train), (cfg.batch_size,), device=device)]
            # 2. corrupt it, denoise it, compare with the clean batch (Eq. 3.1 or 3.2, then Eq. 3.3)
            with torch.autocast(device.type, torch.bfloat16, enabled=cfg.amp and device.type == "cuda"):
                loss = model.loss(x)
            if not torch.isfinite(loss):
                raise SystemExit(f"error: loss is {loss.item()} at step {step}; the last good checkpoint is {out / 'ckpt.pt'}")
            # 3. one gradient step
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.2f}", refresh=False)
            if step % cfg.log_every == 0 or step == cfg.steps:
                model.eval()
                denoised, noisy = evaluate(model, x_test)
                model.train()
                bar.write(f"step {step}: test squared error {denoised:.2f} per image denoised, {noisy:.2f} noisy")
                checkpoint()
    except KeyboardInterrupt:
        checkpoint()
        raise SystemExit(f"interrupted at step {step}; checkpoint saved to {out / 'ckpt.pt'}")
    bar.close()

    model.eval()
    denoised, noisy = evaluate(model, x_test)
    print(f"test squared error per image after {step} steps, {time.time() - t0:.0f} s: {denoised:.2f} denoised, "
          f"{noisy:.2f} for the {cfg.corruption} input itself ({denoised / noisy:.3f} of it)")
    checkpoint()

    # denoising.png: in each band of three rows, the corrupted digits, r of them, the clean digits
    x = x_test[:32]  # (32, 1, 28, 28)
    with torch.no_grad():
        x_tilde = model.corrupt(x, torch.Generator(device=device).manual_seed(1234))
        x_hat = model(x_tilde)
    bands = torch.stack([x_tilde.view(4, 8, 1, 28, 28), x_hat.view(4, 8, 1, 28, 28), x.view(4, 8, 1, 28, 28)], 1)
    save_grid(bands.view(96, 1, 28, 28), out / "denoising.png", nrow=8)  # save_grid clamps x_tilde to [0, 1]
    samples = model.sample(torch.rand(cfg.num_samples, 1, 28, 28, device=device), cfg.sample_steps)
    save_grid(samples[:64], out / "samples.png", nrow=8)
    np.savez_compressed(out / "samples.npz", images=(samples * 255).round().byte().cpu().numpy())
    print(f"wrote {out / 'samples.png'}, {out / 'samples.npz'} and {out / 'denoising.png'}")
    return {"test_denoised": denoised, "test_noisy": noisy, "step": step}


# --- Plumbing (shared helpers, identical in every script; see tests/test_plumbing.py) ---


def parse_config(config_cls, argv=None):
    """Command-line flags from the dataclass fields: --batch-size 64, --amp / --no-amp.
    The help text of each flag is the field's trailing comment. Bad values exit with one message."""
    defaults = config_cls()
    try:
        source = inspect.getsource(config_cls)
    except (OSError, TypeError):
        source = ""
    comments = dict(re.findall(r"^\s+(\w+):[^#\n]*#\s*(.*)$", source, re.MULTILINE))
    hints = typing.get_type_hints(config_cls)
    parser = argparse.ArgumentParser(description=(sys.modules[config_cls.__module__].__doc__ or "").strip().split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(config_cls):
        kind = hints[f.name]
        flag = "--" + f.name.replace("_", "-")
        help_text = comments.get(f.name, " ")
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=getattr(defaults, f.name), help=help_text)
        else:
            parser.add_argument(flag, type=kind, default=getattr(defaults, f.name), help=help_text)
    args = vars(parser.parse_args(argv))
    for name, low in [("steps", 0), ("batch_size", 1), ("num_samples", 1), ("log_every", 1)]:
        if name in args and args[name] < low:
            parser.error(f"--{name.replace('_', '-')} must be at least {low}, got {args[name]}")
    if "lr" in args and not args["lr"] > 0:
        parser.error(f"--lr must be positive, got {args['lr']}")
    if "device" in args and not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", args["device"]):
        parser.error(f"--device must be auto, cpu, cuda, cuda:N or mps, got {args['device']!r}")
    try:
        return config_cls(**args)
    except ValueError as e:  # a Config may check its own fields in __post_init__
        parser.error(str(e))


def pick_device(name="auto"):
    """'auto' picks cuda, then mps, then cpu; an explicit device must exist."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"error: --device {name} asked for, but CUDA is not available here (try --device cpu)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise SystemExit(f"error: --device {name} asked for, but MPS is not available here (try --device cpu)")
    return device


MNIST_FILES = {  # name: (official MD5 of the gzipped file, IDX magic number, shape after the count)
    "train-images-idx3-ubyte": ("f68b3c2dcbeaaa9fbdd348bbdeb94873", 2051, (28, 28)),
    "train-labels-idx1-ubyte": ("d53e105ee54ea40749a09fcbcd1e9432", 2049, ()),
    "t10k-images-idx3-ubyte": ("9fb629c4189551a2d022fa330f9573f3", 2051, (28, 28)),
    "t10k-labels-idx1-ubyte": ("ec29112dd5afa0611ce80d1b7f02629c", 2049, ()),
}
MNIST_MIRRORS = ["https://ossci-datasets.s3.amazonaws.com/mnist/",
                 "https://storage.googleapis.com/cvdf-datasets/mnist/",
                 "http://yann.lecun.com/exdb/mnist/"]


def load_mnist(data_dir, train=True):
    """MNIST as (images uint8 (N, 28, 28), labels int64 (N,)) from <data_dir>/mnist, where each of the
    four IDX files may be gzipped (name.gz) or raw (name). Missing files are downloaded and checked
    against the official MD5; every file is checked for its IDX magic number and size."""
    folder = Path(data_dir) / "mnist"
    prefix = "train" if train else "t10k"
    arrays = []
    for name in (f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"):
        md5, magic, shape = MNIST_FILES[name]
        path = next((p for p in (folder / (name + ".gz"), folder / name) if p.exists()), None)
        if path is None:
            path = _download_mnist_file(folder, name + ".gz", md5)
        try:
            data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
        except (OSError, EOFError) as e:
            raise SystemExit(f"error: {path} is not a valid gzip file ({e}); delete it and run again to re-download")
        header = 4 + 4 * (1 + len(shape))
        if len(data) < header or struct.unpack(">I", data[:4])[0] != magic:
            raise SystemExit(f"error: {path} is not an MNIST IDX file (expected magic number {magic})")
        count, *dims = struct.unpack(f">{1 + len(shape)}I", data[4:header])
        if tuple(dims) != shape or len(data) != header + count * math.prod(shape):
            raise SystemExit(f"error: {path} is truncated or corrupt: header says {count} x {tuple(dims)}, "
                             f"file holds {len(data) - header} bytes of data; delete it and run again")
        arrays.append(np.frombuffer(data, dtype=np.uint8, offset=header).reshape(count, *shape))
    images, labels = arrays
    if len(images) != len(labels):
        raise SystemExit(f"error: {folder} has {len(images)} {prefix} images but {len(labels)} labels")
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


def _download_mnist_file(folder, filename, md5):
    folder.mkdir(parents=True, exist_ok=True)
    errors = []
    for mirror in MNIST_MIRRORS:
        try:
            with urllib.request.urlopen(mirror + filename, timeout=30) as response:
                data = response.read()
        except OSError as e:
            errors.append(f"{mirror}: {e}")
            continue
        if hashlib.md5(data).hexdigest() != md5:
            errors.append(f"{mirror}: MD5 mismatch")
            continue
        tmp = folder / (filename + ".part")
        tmp.write_bytes(data)
        os.replace(tmp, folder / filename)
        print(f"downloaded {filename} from {mirror}")
        return folder / filename
    names = ", ".join(n + ".gz" for n in MNIST_FILES)
    raise SystemExit(f"error: could not download {filename} ({'; '.join(errors)}).\n"
                     f"Put the four MNIST files ({names}) in {folder}/, or point --data-dir "
                     f"(or GENAI_DATA_DIR) at a folder whose mnist/ subfolder holds them.")


def save_grid(images, path, nrow=8, scale=2):
    """Save a (N, C, H, W) tensor with values in [0, 1] as a PNG grid, 2-pixel gaps, upscaled."""
    images = images.detach().float().clamp(0, 1).cpu()
    n, c, h, w = images.shape
    ncol = min(nrow, n)
    rows = math.ceil(n / ncol)
    grid = torch.ones(c, rows * (h + 2) + 2, ncol * (w + 2) + 2)
    for i in range(n):
        r, k = divmod(i, ncol)
        grid[:, 2 + r * (h + 2):2 + r * (h + 2) + h, 2 + k * (w + 2):2 + k * (w + 2) + w] = images[i]
    array = (grid.permute(1, 2, 0) * 255).round().byte().numpy()
    image = Image.fromarray(array[:, :, 0] if c == 1 else array)
    image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def save_checkpoint(path, state):
    """Write atomically: a temporary file, then os.replace, so a crash never leaves half a checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path, device="cpu"):
    """Load a checkpoint written by save_checkpoint (tensors, numbers, strings only)."""
    if not Path(path).exists():
        raise SystemExit(f"error: no checkpoint at {path}; train first (without --resume / --sample-only)")
    return torch.load(path, map_location=device, weights_only=True)


# --- Main ---


def main(argv=None):
    cfg = parse_config(Config, argv)
    return train(cfg)


if __name__ == "__main__":
    main()
