"""
WGAN-GP: a Wasserstein GAN whose critic is kept 1-Lipschitz by a gradient penalty, on MNIST.

Paper: Gulrajani, Ahmed, Arjovsky, Dumoulin and Courville, "Improved Training of Wasserstein GANs",
NeurIPS 2017, arXiv 1704.00028 (builds on Arjovsky, Chintala and Bottou, "Wasserstein GAN", 2017,
arXiv 1701.07875).

The idea: the critic D estimates the Wasserstein-1 distance between the data and the generator's
samples as max over 1-Lipschitz D of E D(x) - E D(G(z)) (README Eq. 4.1). A differentiable D is
1-Lipschitz exactly when its gradient norm is at most 1 everywhere (Eq. 4.2), and the optimal critic
has gradient norm 1 on the straight lines between coupled real and fake points (Eq. 4.3). So instead
of clipping weights, penalize (||grad D|| - 1)^2 at random points on lines between a real digit and
a fake one: ONE mixing coefficient eps per sample, so each point lies on its own real-fake segment.
The critic has no batch norm (the penalty is per sample; batch norm would couple the samples).

    x_hat = eps x + (1 - eps) x_tilde,   eps ~ U[0, 1] per sample,  x_tilde = G(z)   (README Eq. 4.4)
    L_D = E D(x_tilde) - E D(x) + lambda E (||grad_x_hat D(x_hat)||_2 - 1)^2         (README Eq. 4.5)
    L_G = -E D(G(z))                                                                  (README Eq. 4.6)
Algorithm 1 of the paper: lambda = 10, n_critic = 5, Adam lr 1e-4, betas (0, 0.9).

Run:   python 02_gans/wgan_gp.py                  (defaults sized for one GPU; not measured on a GPU)
CPU recipe: python 02_gans/wgan_gp.py --steps 1200 --channels 32 --lr 3e-4 --log-every 100
Measured on a 2-core CPU: 264 s (wall, whole command), held-out Wasserstein estimate 11.41 at step 100 -> 2.88
at step 1200; FID 109.3, IS 6.53, precision 0.367, recall 0.740, confident 0.573 (N = 1000; not yet recognizable).
Writes out/wgan_gp/: ckpt.pt, samples.png, samples.npz (and progress grids samples_<step>.png).
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
    out_dir: str = "out/wgan_gp"  # checkpoint, samples and grids go here
    steps: int = 20000  # generator steps; each follows n_critic critic steps (Algorithm 1)
    batch_size: int = 64  # images per critic step and per generator step (the paper's m)
    lr: float = 1e-4  # Adam learning rate of G and D (the paper's alpha)
    beta1: float = 0.0  # Adam beta1 (Algorithm 1: 0, no momentum)
    beta2: float = 0.9  # Adam beta2 (Algorithm 1: 0.9)
    n_critic: int = 5  # critic steps per generator step
    lambda_gp: float = 10.0  # gradient penalty weight lambda (README Eq. 4.5)
    latent_dim: int = 128  # size of the noise z
    channels: int = 64  # width of G and D: c and 2c feature maps
    num_samples: int = 1000  # images generated for samples.npz
    eval_size: int = 1000  # held-out batch: this many test digits and fixed z for the Wasserstein estimate
    log_every: int = 500  # steps between held-out estimates, checkpoints and grids
    sample_only: bool = False  # skip training; sample from out_dir/ckpt.pt
    resume: bool = False  # continue training from out_dir/ckpt.pt

    def __post_init__(self):
        if self.n_critic < 1:
            raise ValueError(f"--n-critic must be at least 1, got {self.n_critic}")
        if not self.lambda_gp >= 0:
            raise ValueError(f"--lambda-gp must be non-negative, got {self.lambda_gp}")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ValueError(f"--beta1 and --beta2 must lie in [0, 1), got {self.beta1} and {self.beta2}")
        for name in ("latent_dim", "channels", "eval_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")


# --- Model ---


class Generator(nn.Module):
    """DCGAN-style: z -> (2c, 7, 7) -> (c, 14, 14) -> (1, 28, 28) in [-1, 1]. Batch norm is fine
    here: the penalty only differentiates the critic."""

    def __init__(self, latent_dim=128, channels=64):
        super().__init__()
        c = channels
        self.net = nn.Sequential(
            nn.Linear(latent_dim, 2 * c * 7 * 7, bias=False), nn.BatchNorm1d(2 * c * 7 * 7), nn.ReLU(),
            nn.Unflatten(1, (2 * c, 7, 7)),
            nn.ConvTranspose2d(2 * c, c, 4, 2, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU(),  # (B, c, 14, 14)
            nn.ConvTranspose2d(c, 1, 4, 2, 1), nn.Tanh())  # (B, 1, 28, 28)

    def forward(self, z):  # (B, latent_dim) -> (B, 1, 28, 28)
        return self.net(z)


class Critic(nn.Module):
    """DCGAN-style critic with layer norm instead of batch norm (the paper's Section 4): every
    output D(x_i) depends on x_i alone, so the per-sample gradient in Eq. 4.5 is well defined.
    No sigmoid: D(x) is a real-valued score, not a probability."""

    def __init__(self, channels=64):
        super().__init__()
        c = channels
        self.net = nn.Sequential(
            nn.Conv2d(1, c, 4, 2, 1), nn.LeakyReLU(0.2),  # (B, c, 14, 14)
            nn.Conv2d(c, 2 * c, 4, 2, 1), nn.LayerNorm([2 * c, 7, 7]), nn.LeakyReLU(0.2),  # (B, 2c, 7, 7)
            nn.Flatten(), nn.Linear(2 * c * 7 * 7, 1))

    def forward(self, x):  # (B, 1, 28, 28) -> (B,)
        return self.net(x).squeeze(1)


# --- The method ---


class WGANGP(nn.Module):
    def __init__(self, latent_dim=128, channels=64, lambda_gp=10.0):
        super().__init__()
        self.latent_dim, self.lambda_gp = latent_dim, lambda_gp
        self.G = Generator(latent_dim, channels)
        self.D = Critic(channels)

    def interpolate(self, x, x_tilde):
        """Eq. 4.4: one eps ~ U[0, 1] per sample, shape (B, 1, 1, 1), broadcast over the pixels, so
        x_hat_i lies on the segment from x_tilde_i to x_i. A (B, 1, 28, 28) eps would mix each pixel
        differently and put x_hat off that segment."""
        eps = torch.rand(x.shape[0], *[1] * (x.dim() - 1), device=x.device, dtype=x.dtype)
        return eps * x + (1 - eps) * x_tilde

    def gradient_penalty(self, x, x_tilde):
        """E (||grad_x_hat D(x_hat)||_2 - 1)^2 over random interpolates (Eq. 4.5, the two-sided
        penalty). create_graph=True: the penalty is a function of the critic's weights through the
        gradient, and the critic step backpropagates through it (a second derivative)."""
        x_hat = self.interpolate(x.detach(), x_tilde.detach()).requires_grad_(True)
        grad, = torch.autograd.grad(self.D(x_hat).sum(), x_hat, create_graph=True)  # (B, 1, 28, 28)
        # sum() is fine: D(x_hat_i) depends on x_hat_i alone, so d sum_j D(x_hat_j) / d x_hat_i = grad_i
        norm = grad.float().flatten(1).norm(2, dim=1)  # (B,) one L2 norm per sample over all pixels
        return ((norm - 1) ** 2).mean()

    def d_loss(self, x, z):
        """Algorithm 1, lines 4-7: E D(x_tilde) - E D(x) + lambda * penalty. Also returns the
        batch's Wasserstein estimate E D(x) - E D(x_tilde) (Eq. 4.1) and the penalty."""
        with torch.no_grad():
            x_tilde = self.G(z)  # (B, 1, 28, 28); G is not updated in the critic step
        w = self.D(x).mean() - self.D(x_tilde).mean()
        gp = self.gradient_penalty(x, x_tilde)
        return -w + self.lambda_gp * gp, w.detach(), gp.detach()

    def g_loss(self, z):
        """Algorithm 1, line 12 (Eq. 4.6): G raises the critic's score of its samples."""
        return -self.D(self.G(z)).mean()

    @torch.no_grad()
    def sample(self, n, z=None):
        """n images in [0, 1], (n, 1, 28, 28), from z ~ N(0, I) (or the given z), G in eval mode."""
        was_training = self.G.training
        self.G.eval()
        z = torch.randn(n, self.latent_dim, device=next(self.G.parameters()).device) if z is None else z
        x = self.G(z)
        self.G.train(was_training)
        return (x.float() + 1) / 2


@torch.no_grad()
def wasserstein_estimate(model, x, z, batch_size=500):
    """The critic's held-out estimate of W(p_data, p_g): E D(x) - E D(G(z)) (Eq. 4.1) on fixed
    test digits x and fixed noise z, G in eval mode. Unlike the GAN losses, it falls as samples
    improve (README section 4.8, "What the held-out estimate tells you")."""
    def mean_score(images):  # E D(images), in chunks
        return torch.cat([model.D(images[i:i + batch_size]).float() for i in range(0, len(images), batch_size)]).mean()
    fake = model.sample(len(z), z) * 2 - 1  # (N, 1, 28, 28), back to [-1, 1]
    return (mean_score(x) - mean_score(fake)).item()


# --- Training ---


def train(cfg):
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    device = pick_device(cfg.device)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    x_train = load_mnist(cfg.data_dir, train=True)[0].to(device).float().div(127.5).sub(1).unsqueeze(1)  # (N, 1, 28, 28) in [-1, 1]
    x_eval = load_mnist(cfg.data_dir, train=False)[0][:cfg.eval_size].to(device).float().div(127.5).sub(1).unsqueeze(1)
    z_eval = torch.randn(len(x_eval), cfg.latent_dim, generator=torch.Generator().manual_seed(cfg.seed + 1)).to(device)

    model = WGANGP(cfg.latent_dim, cfg.channels, cfg.lambda_gp).to(device)
    optimizer = {"G": torch.optim.Adam(model.G.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2)),
                 "D": torch.optim.Adam(model.D.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))}
    step, history = 0, []
    if cfg.resume or cfg.sample_only:
        ckpt = load_checkpoint(out / "ckpt.pt", device)
        for k in ("G", "D"):
            getattr(model, k).load_state_dict(ckpt["model"][k])
            optimizer[k].load_state_dict(ckpt["optimizer"][k])
        step, history = ckpt["step"], [tuple(h) for h in ckpt["history"]]

    def checkpoint():
        save_checkpoint(out / "ckpt.pt", {"model": {"G": model.G.state_dict(), "D": model.D.state_dict()},
                                          "optimizer": {k: o.state_dict() for k, o in optimizer.items()},
                                          "config": asdict(cfg), "step": step, "history": history})

    def batch():
        x = x_train[torch.randint(len(x_train), (cfg.batch_size,), device=device)]  # (B, 1, 28, 28)
        return x, torch.randn(cfg.batch_size, cfg.latent_dim, device=device)  # z ~ p(z) = N(0, I)

    def check(loss, name):
        if not torch.isfinite(loss):
            raise SystemExit(f"error: {name} loss is {loss.item()} at step {step}; "
                             f"the last good checkpoint is {out / 'ckpt.pt'}")

    if not history:  # held-out W estimate, (step, value); kept in the checkpoint across --resume
        history.append((step, wasserstein_estimate(model, x_eval, z_eval)))
    w, gp = torch.tensor(float("nan")), torch.tensor(float("nan"))
    autocast = dict(device_type=device.type, dtype=torch.bfloat16, enabled=cfg.amp and device.type == "cuda")
    t0 = time.time()
    bar = tqdm(total=0 if cfg.sample_only else cfg.steps, initial=step, desc="wgan_gp")
    try:
        while step < cfg.steps and not cfg.sample_only:
            # 1. n_critic critic steps (Algorithm 1, lines 2-10), each on a fresh real batch and fresh z
            for _ in range(cfg.n_critic):
                x, z = batch()
                with torch.autocast(**autocast):
                    loss_d, w, gp = model.d_loss(x, z)
                check(loss_d, "critic")
                optimizer["D"].zero_grad(set_to_none=True)
                loss_d.backward()
                optimizer["D"].step()
            # 2. one generator step (lines 11-12): raise D(G(z)); only G's optimizer steps
            _, z = batch()
            with torch.autocast(**autocast):
                loss_g = model.g_loss(z)
            check(loss_g, "generator")
            optimizer["G"].zero_grad(set_to_none=True)
            loss_g.backward()
            optimizer["G"].step()
            step += 1
            bar.update(1)
            bar.set_postfix(W_heldout=f"{history[-1][1]:.3f}", W_batch=f"{w.item():.3f}", gp=f"{gp.item():.3f}", refresh=False)
            if step % cfg.log_every == 0 or step == cfg.steps:
                history.append((step, wasserstein_estimate(model, x_eval, z_eval)))
                bar.write(f"step {step}: held-out Wasserstein estimate {history[-1][1]:.3f} "
                          f"(batch {w.item():.3f}, penalty {gp.item():.4f})")
                checkpoint()
                save_grid(model.sample(64, z_eval[:64]), out / f"samples_{step}.png", nrow=8)
    except KeyboardInterrupt:
        checkpoint()
        raise SystemExit(f"interrupted at step {step}; checkpoint saved to {out / 'ckpt.pt'}")
    bar.close()

    w_end = history[-1][1]  # the estimate at the last step (training always ends on a logged step)
    print(f"held-out Wasserstein estimate {w_end:.3f} after {step} steps "
          f"(peak {max(v for _, v in history):.3f}), {time.time() - t0:.0f} s")
    checkpoint()
    samples = model.sample(cfg.num_samples)  # (N, 1, 28, 28) in [0, 1]
    save_grid(samples[:64], out / "samples.png", nrow=8)
    np.savez_compressed(out / "samples.npz", images=(samples * 255).round().byte().cpu().numpy())
    print(f"wrote {out / 'samples.png'} and {out / 'samples.npz'}")
    return {"w_estimate": w_end, "history": history, "gp": gp.item(), "step": step}


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
