"""
WGAN: train the critic to estimate the Wasserstein-1 distance, and the generator to shrink it.

Paper: Arjovsky, Chintala and Bottou, "Wasserstein GAN", 2017, arXiv 1701.07875.

The idea: when real digits and generated images lie on thin, non-overlapping manifolds, the
Jensen-Shannon divergence a GAN discriminator estimates is stuck at log 2 and gives the generator
no gradient. The earth mover's distance W1 still shrinks smoothly as the two distributions move
together (README Eq. 3.2). Its dual form (Kantorovich-Rubinstein) is a supremum over 1-Lipschitz
functions f, so a network D (the critic: no sigmoid, any real output) is trained to maximize
E D(x) - E D(G(z)), and clipping every critic weight to [-c, c] keeps D K-Lipschitz for some fixed
K: the maximum then estimates K * W1 (Eq. 3.4). The generator descends that estimate. Algorithm 1 of the
paper: n_critic = 5 critic steps per generator step, RMSProp with lr 5e-5, c = 0.01, batch 64.

    W1(P_r, P_g) = sup_{||f||_L <= 1} E_{x~P_r} f(x) - E_{x~P_g} f(x)         (README Eq. 3.3)
    critic:    max_w  W_hat = mean D_w(x) - mean D_w(G(z)),  w <- clip(w, -c, c)  (Eq. 3.5, 3.7)
    generator: min_theta  -mean D_w(G_theta(z))       (gradient of W_hat in theta, Eq. 3.6)

The critic's estimate W_hat is shown in the progress bar, logged, plotted in w_estimate.svg and
returned by train(): unlike a GAN's losses, it falls as the samples improve.

Run:   python 02_gans/wgan.py                                  (defaults sized for one GPU, not measured on a GPU)
CPU recipe: python 02_gans/wgan.py --steps 2500 --channels 32 --lr 2e-4 --log-every 100
Measured on a 2-core CPU: 291 s (wall, whole command), FID 166.3 at N = 1000, IS 6.02, precision
0.315, recall 0.638, 52 % confident (not yet recognizable digits); W_hat 0.76 at step 100, 0.089 at
step 1000, 0.007 at step 2500.
Writes out/wgan/: ckpt.pt, samples.png, samples.npz, w_estimate.svg.
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
from contextlib import nullcontext
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
    out_dir: str = "out/wgan"  # checkpoint, samples and grids go here
    steps: int = 20000  # generator steps (each follows n_critic critic steps)
    batch_size: int = 64  # m in Algorithm 1: real images (and z draws) per step
    lr: float = 5e-5  # alpha in Algorithm 1: RMSProp learning rate of critic and generator
    clip: float = 0.01  # c: every critic weight is clipped to [-c, c] after each critic step (Eq. 3.7)
    n_critic: int = 5  # critic steps per generator step
    latent_dim: int = 100  # size of z ~ N(0, I)
    channels: int = 64  # width of the first critic conv and last generator conv (the others have 2x)
    num_samples: int = 1000  # images sampled at the end for samples.npz
    log_every: int = 500  # generator steps between log lines, checkpoints and grids
    sample_only: bool = False  # skip training; sample from out_dir/ckpt.pt
    resume: bool = False  # continue training from out_dir/ckpt.pt

    def __post_init__(self):
        if not self.clip > 0:
            raise ValueError(f"--clip must be positive (the weights are clipped to [-c, c]), got {self.clip}")
        if self.n_critic < 1 or self.latent_dim < 1 or self.channels < 1:
            raise ValueError(f"--n-critic, --latent-dim and --channels must be at least 1, got "
                             f"{self.n_critic}, {self.latent_dim}, {self.channels}")


# --- Model ---


class Generator(nn.Sequential):
    """DCGAN generator at 28 x 28: z -> 7 x 7 -> 14 x 14 -> 28 x 28, batch norm and ReLU, tanh out."""

    def __init__(self, latent_dim=100, ch=64):
        super().__init__(
            nn.Linear(latent_dim, 2 * ch * 7 * 7, bias=False), nn.Unflatten(1, (2 * ch, 7, 7)),  # (B, 2ch, 7, 7)
            nn.BatchNorm2d(2 * ch), nn.ReLU(),
            nn.ConvTranspose2d(2 * ch, ch, 4, 2, 1, bias=False), nn.BatchNorm2d(ch), nn.ReLU(),  # (B, ch, 14, 14)
            nn.ConvTranspose2d(ch, 1, 4, 2, 1), nn.Tanh())  # (B, 1, 28, 28) in [-1, 1]


class Critic(nn.Sequential):
    """DCGAN discriminator without the sigmoid (D outputs any real number) and without batch norm:
    D(x) must be a function of x alone for E D(x) to estimate E f(x), and batch norm's division by
    the batch's standard deviation is a scale that weight clipping does not bound."""

    def __init__(self, ch=64):
        super().__init__(
            nn.Conv2d(1, ch, 4, 2, 1), nn.LeakyReLU(0.2),  # (B, ch, 14, 14)
            nn.Conv2d(ch, 2 * ch, 4, 2, 1), nn.LeakyReLU(0.2),  # (B, 2ch, 7, 7)
            nn.Flatten(), nn.Linear(2 * ch * 7 * 7, 1))  # (B, 1): a score, not a probability


def init_weights(module):
    """DCGAN's initialization (Radford et al. 2015; CycleGAN uses it too): every weight from N(0, 0.02),
    biases 0; batch-norm scales from N(1, 0.02), as in the DCGAN code, so a fresh layer passes its input on."""
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


# --- The method ---


class WGAN(nn.Module):
    def __init__(self, latent_dim=100, channels=64, clip=0.01):
        super().__init__()
        self.latent_dim, self.clip = latent_dim, clip
        self.G = Generator(latent_dim, channels)  # G_theta: z -> x
        self.D = Critic(channels)  # f_w: x -> R, kept in the clipped box W = [-c, c]^d
        self.apply(init_weights)
        self.clip_critic()  # start inside W, so every critic the loop sees is K-Lipschitz

    def w_estimate(self, x, x_fake):
        """Eq. 3.5: W_hat = mean_i D(x_i) - mean_i D(G(z_i)), the critic's estimate of K * W1."""
        return self.D(x).mean() - self.D(x_fake).mean()

    def d_loss(self, x, z):
        """The critic ascends W_hat, so its loss is -W_hat (returned too, detached, for logging).
        G(z) is detached: this step moves w only."""
        w_hat = self.w_estimate(x, self.G(z).detach())
        return -w_hat, w_hat.detach()

    def g_loss(self, z):
        """Eq. 3.6: only the second term of W_hat depends on theta, so descending W_hat in theta is
        descending -mean D(G(z)). No log, no sigmoid: the gradient does not saturate."""
        return -self.D(self.G(z)).mean()

    @torch.no_grad()
    def clip_critic(self):
        """Eq. 3.7: w <- clip(w, -c, c), every critic parameter (biases too, as in Algorithm 1)."""
        for p in self.D.parameters():
            p.clamp_(-self.clip, self.clip)

    @torch.no_grad()
    def sample(self, n):
        """x = G(z), z ~ N(0, I), mapped from [-1, 1] to [0, 1]. (n, 1, 28, 28)"""
        z = torch.randn(n, self.latent_dim, device=next(self.parameters()).device)
        return ((self.G(z) + 1) / 2).clamp(0, 1)


def train_step(model, opt_D, opt_G, next_batch, n_critic, autocast=nullcontext):
    """One pass of Algorithm 1's outer loop: n_critic critic steps, each followed by the clip, then
    one generator step. Returns (W_hat averaged over the critic steps, generator loss)."""
    w_sum = 0.0
    for _ in range(n_critic):
        # 1. a batch of real x and of z ~ N(0, I)
        x = next_batch()  # (m, 1, 28, 28) in [-1, 1]
        z = torch.randn(len(x), model.latent_dim, device=x.device)
        # 2. one RMSProp step of the critic up the estimate W_hat (Eq. 3.5)
        with autocast():
            loss_D, w_hat = model.d_loss(x, z)
        opt_D.zero_grad(set_to_none=True)
        loss_D.backward()
        opt_D.step()
        # 3. back into the box [-c, c] (Eq. 3.7)
        model.clip_critic()
        w_sum = w_sum + w_hat.float()
    # 4. one RMSProp step of the generator down the estimate (Eq. 3.6); the critic is frozen
    z = torch.randn(len(x), model.latent_dim, device=x.device)
    model.D.requires_grad_(False)
    with autocast():
        loss_G = model.g_loss(z)
    opt_G.zero_grad(set_to_none=True)
    loss_G.backward()
    opt_G.step()
    model.D.requires_grad_(True)
    return w_sum / n_critic, loss_G.detach().float()


def plot_curve(steps, values, path, label="critic's estimate of K * W1"):
    """A line plot of values against steps, written as SVG text (no plotting library)."""
    width, height, pad = 640, 320, 50
    lo, hi = min(values), max(values)
    hi = hi if hi > lo else lo + 1
    x_of = lambda s: pad + (s - steps[0]) / max(steps[-1] - steps[0], 1) * (width - 2 * pad)
    y_of = lambda v: height - pad - (v - lo) / (hi - lo) * (height - 2 * pad)
    points = " ".join(f"{x_of(s):.1f},{y_of(v):.1f}" for s, v in zip(steps, values))
    text = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12">',
            f'<rect width="{width}" height="{height}" fill="white"/>',
            f'<path d="M{pad},{pad} V{height - pad} H{width - pad}" fill="none" stroke="black"/>',
            f'<polyline points="{points}" fill="none" stroke="#1f77b4" stroke-width="1.5"/>',
            f'<text x="{pad - 4}" y="{pad + 4}" text-anchor="end">{hi:.3g}</text>',
            f'<text x="{pad - 4}" y="{height - pad + 4}" text-anchor="end">{lo:.3g}</text>',
            f'<text x="{pad}" y="{height - pad + 16}" text-anchor="middle">{steps[0]}</text>',
            f'<text x="{width - pad}" y="{height - pad + 16}" text-anchor="middle">{steps[-1]}</text>',
            f'<text x="{width / 2}" y="{height - 12}" text-anchor="middle">generator step</text>',
            f'<text x="{width / 2}" y="{pad - 16}" text-anchor="middle">{label}</text>', "</svg>"]
    Path(path).write_text("\n".join(text) + "\n")


# --- Training ---


def train(cfg):
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    device = pick_device(cfg.device)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    x_train = load_mnist(cfg.data_dir, train=True)[0].to(device).float().div(127.5).sub(1).unsqueeze(1)  # (N, 1, 28, 28) in [-1, 1]

    model = WGAN(cfg.latent_dim, cfg.channels, cfg.clip).to(device)
    # Algorithm 1 uses RMSProp: the authors found momentum-based Adam unstable with a clipped critic
    opt_D = torch.optim.RMSprop(model.D.parameters(), lr=cfg.lr)
    opt_G = torch.optim.RMSprop(model.G.parameters(), lr=cfg.lr)
    step, history = 0, []  # history: (generator step, mean W_hat over the last log_every steps)
    if cfg.resume or cfg.sample_only:
        ckpt = load_checkpoint(out / "ckpt.pt", device)
        model.G.load_state_dict(ckpt["model"]["G"])
        model.D.load_state_dict(ckpt["model"]["D"])
        opt_G.load_state_dict(ckpt["optimizer"]["G"])
        opt_D.load_state_dict(ckpt["optimizer"]["D"])
        step, history = ckpt["step"], [tuple(h) for h in ckpt["w_history"]]

    def checkpoint():
        save_checkpoint(out / "ckpt.pt", {"model": {"G": model.G.state_dict(), "D": model.D.state_dict()},
                                          "optimizer": {"G": opt_G.state_dict(), "D": opt_D.state_dict()},
                                          "config": asdict(cfg), "step": step, "w_history": history})

    def next_batch():
        return x_train[torch.randint(len(x_train), (cfg.batch_size,), device=device)]

    def autocast():
        return torch.autocast(device.type, torch.bfloat16, enabled=cfg.amp and device.type == "cuda")

    z_grid = torch.randn(64, cfg.latent_dim, device=device)  # fixed z: the grids show one set of digits evolving
    t0 = time.time()
    window = []
    bar = tqdm(total=0 if cfg.sample_only else cfg.steps, initial=step, desc="wgan")
    try:
        while step < cfg.steps and not cfg.sample_only:
            w_hat, loss_G = train_step(model, opt_D, opt_G, next_batch, cfg.n_critic, autocast)
            if not (torch.isfinite(w_hat) and torch.isfinite(loss_G)):
                raise SystemExit(f"error: critic estimate {w_hat.item()}, generator loss {loss_G.item()} at step {step}; "
                                 f"the last good checkpoint is {out / 'ckpt.pt'}")
            step += 1
            window.append(w_hat.item())
            bar.update(1)
            bar.set_postfix(W=f"{window[-1]:.4f}", refresh=False)
            if step % cfg.log_every == 0 or step == cfg.steps:
                history.append((step, sum(window) / len(window)))
                window = []
                bar.write(f"step {step}: critic's estimate W_hat {history[-1][1]:.4f} (mean of the last steps)")
                model.G.eval()
                save_grid((model.G(z_grid).detach() + 1) / 2, out / "samples.png", nrow=8)
                model.G.train()
                checkpoint()
    except KeyboardInterrupt:
        checkpoint()
        raise SystemExit(f"interrupted at step {step}; checkpoint saved to {out / 'ckpt.pt'}")
    bar.close()
    if not cfg.sample_only:
        print(f"{step} generator steps ({step * cfg.n_critic} critic steps) in {time.time() - t0:.0f} s")

    model.eval()
    if history:
        plot_curve([s for s, _ in history], [w for _, w in history], out / "w_estimate.svg")
    samples = torch.cat([model.sample(min(500, cfg.num_samples - i)) for i in range(0, cfg.num_samples, 500)])
    save_grid(samples[:64], out / "samples.png", nrow=8)
    np.savez_compressed(out / "samples.npz", images=(samples * 255).round().byte().cpu().numpy())
    print(f"wrote {out / 'samples.png'} and {out / 'samples.npz'}" + (f" and {out / 'w_estimate.svg'}" if history else ""))
    return {"w_estimate": history[-1][1] if history else float("nan"), "w_history": history, "step": step}


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
