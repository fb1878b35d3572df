"""
CycleGAN: translate thin MNIST digits into bold ones and back, without ever seeing a pair.

Paper: Zhu, Park, Isola and Efros, "Unpaired Image-to-Image Translation using Cycle-Consistent
Adversarial Networks", 2017, arXiv 1703.10593. Loss: Mao et al., "Least Squares Generative
Adversarial Networks", 2017, arXiv 1611.04076.

The idea: domain A holds thin digits (MNIST as is) and domain B bold ones (a 3x3 max-pool, i.e. a
dilation, of a DIFFERENT half of the training set), so no digit is ever seen in both. A generator
G: A -> B and a PatchGAN discriminator D_B play a least-squares GAN; so do F: B -> A and D_A. The
adversarial loss alone only asks G(a) to look bold: any map onto bold digits, a 3 sent to a bold 7
included, is optimal. Cycle consistency, F(G(a)) = a and G(F(b)) = b, makes G and F near-inverse
bijections: no many-to-one maps, no collapse. Among the bijections left, small convolutional nets
find the simplest (thicken the strokes); the identity loss G(b) = b keeps ink and background.

    L_D = 1/2 E_b (D_B(b) - 1)^2 + 1/2 E_a D_B(G(a))^2                      (README Eq. 6.2)
    L_cyc = E_a |F(G(a)) - a|_1 + E_b |G(F(b)) - b|_1                        (README Eq. 6.6)
    L_G = E_a (D_B(G(a)) - 1)^2 + E_b (D_A(F(b)) - 1)^2
          + lambda_cyc L_cyc + lambda_id (E_b |G(b) - b|_1 + E_a |F(a) - a|_1)   (README Eq. 6.8)
with lambda_cyc = 10, lambda_id = 0.5 lambda_cyc, Adam 2e-4 (beta1 0.5, linear decay to 0 over the
second half) and the history pool of 50 fakes for the discriminators, all as in the paper.

Run:   python 02_gans/cyclegan.py                             (defaults sized for one GPU; not measured on a GPU)
CPU recipe: python 02_gans/cyclegan.py --steps 800 --channels 16 --n-res 3
Measured on a 2-core CPU: 218 s (wall, whole command); G(a) keeps the class of 96.8 % of 1000 test
digits (metrics.py label_agreement; F(b): 97.5 %), |G(a) - dilate(a)| 0.043 per pixel (input: 0.127).
Writes out/cyclegan/: ckpt.pt, samples.png (a, G(a), F(G(a)) and b, F(b), G(F(b)) rows),
samples.npz (G(a) of test digits with their labels: python 02_gans/metrics.py scores it) and
samples_b2a.npz (F(b) of the dilated test digits, likewise).
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
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm


# --- Config ---


@dataclass
class Config:
    seed: int = 0  # random seed (torch, numpy) and of the split of the training set into domains A and B
    device: str = "auto"  # auto (cuda, then mps, then cpu) | cpu | cuda | cuda:N | mps
    amp: bool = False  # bf16 autocast on CUDA
    data_dir: str = field(default_factory=lambda: os.environ.get("GENAI_DATA_DIR", "data"))  # folder holding mnist/ (falls back to $GENAI_DATA_DIR, then ./data)
    out_dir: str = "out/cyclegan"  # checkpoint, samples and grids go here
    steps: int = 20000  # optimizer steps (each: one step of G and F, then one of D_A and D_B)
    batch_size: int = 32  # images of each domain per step
    lr: float = 2e-4  # Adam learning rate, constant for the first half, then linearly to 0 (paper)
    beta1: float = 0.5  # Adam beta1 (paper: 0.5)
    channels: int = 32  # channels of the generators' first layer and of the discriminators' first layer
    n_res: int = 6  # residual blocks in each generator (paper: 6 at 128 x 128, 9 at 256 x 256)
    lambda_cyc: float = 10.0  # weight of the cycle-consistency loss (README Eq. 6.8)
    identity: float = 0.5  # lambda_id / lambda_cyc (paper: 0.5); 0 turns the identity loss off
    pool_size: int = 50  # history of generated images shown to the discriminators (paper: 50); 0 turns it off
    num_samples: int = 1000  # test digits translated for samples.npz and samples_b2a.npz
    log_every: int = 500  # steps between test evaluations, checkpoints and grids
    sample_only: bool = False  # skip training; translate with out_dir/ckpt.pt
    resume: bool = False  # continue training from out_dir/ckpt.pt

    def __post_init__(self):
        if self.channels < 1 or self.n_res < 0 or self.pool_size < 0:
            raise ValueError("--channels must be at least 1, --n-res and --pool-size at least 0")
        if self.lambda_cyc < 0 or self.identity < 0 or not 0 <= self.beta1 < 1:
            raise ValueError("--lambda-cyc and --identity must be non-negative and --beta1 in [0, 1)")


# --- Model ---


class ResidualBlock(nn.Module):
    """x + (conv3x3 - norm - ReLU - conv3x3 - norm)(x): the generator's body keeps the image
    and learns only the change, which here is small (a stroke gets wider or thinner)."""

    def __init__(self, c):
        super().__init__()
        self.body = nn.Sequential(nn.ReflectionPad2d(1), nn.Conv2d(c, c, 3), nn.InstanceNorm2d(c), nn.ReLU(),
                                  nn.ReflectionPad2d(1), nn.Conv2d(c, c, 3), nn.InstanceNorm2d(c))

    def forward(self, x):
        return x + self.body(x)


class Generator(nn.Sequential):
    """The paper's ResNet generator scaled to 28 x 28: c7s1-c, d2c (one downsampling, not two),
    n_res residual blocks, u-c, c7s1-1, tanh. Reflection padding avoids dark borders."""

    def __init__(self, channels=32, n_res=6):
        c = channels
        super().__init__(
            nn.ReflectionPad2d(3), nn.Conv2d(1, c, 7), nn.InstanceNorm2d(c), nn.ReLU(),           # (B, c, 28, 28)
            nn.Conv2d(c, 2 * c, 3, stride=2, padding=1), nn.InstanceNorm2d(2 * c), nn.ReLU(),     # (B, 2c, 14, 14)
            *[ResidualBlock(2 * c) for _ in range(n_res)],                                        # (B, 2c, 14, 14)
            nn.ConvTranspose2d(2 * c, c, 3, stride=2, padding=1, output_padding=1),               # (B, c, 28, 28)
            nn.InstanceNorm2d(c), nn.ReLU(),
            nn.ReflectionPad2d(3), nn.Conv2d(c, 1, 7), nn.Tanh())                                 # (B, 1, 28, 28) in [-1, 1]


class PatchDiscriminator(nn.Sequential):
    """PatchGAN (the paper's 70 x 70 one, scaled to 28 x 28): three 4 x 4 convolutions give a
    6 x 6 map of scores, each judging one 22 x 22 patch. Real is 1, fake 0 (least squares)."""

    def __init__(self, channels=32):
        c = channels
        super().__init__(
            nn.Conv2d(1, c, 4, stride=2, padding=1), nn.LeakyReLU(0.2),                           # (B, c, 14, 14)
            nn.Conv2d(c, 2 * c, 4, stride=2, padding=1), nn.InstanceNorm2d(2 * c), nn.LeakyReLU(0.2),  # (B, 2c, 7, 7)
            nn.Conv2d(2 * c, 1, 4, stride=1, padding=1))                                          # (B, 1, 6, 6)


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


class ImagePool:
    """The paper's history of generated images (Shrivastava et al. 2017): once full, each new fake
    is, with probability 1/2, swapped for an older one, so D also sees earlier generators' fakes."""

    def __init__(self, size=50):
        self.size, self.images = size, []

    def __call__(self, x):  # (B, 1, 28, 28) fresh fakes -> (B, 1, 28, 28) fakes for D
        if self.size == 0:
            return x
        out = []
        for image in x.detach():
            if len(self.images) < self.size:
                self.images.append(image)
            elif torch.rand(()) < 0.5:
                i = int(torch.randint(self.size, ()))
                self.images[i], image = image, self.images[i]
            out.append(image)
        return torch.stack(out)


# --- The method ---


def dilate(x):
    """Domain B from domain A: morphological dilation, the max over each 3 x 3 neighbourhood."""
    return F.max_pool2d(x, 3, stride=1, padding=1)


def make_domains(images, seed):
    """Split (N, 28, 28) uint8 training digits at random into two disjoint halves: thin digits a
    from the first (domain A), dilated digits b from the second (domain B), both (N/2, 1, 28, 28)
    in [-1, 1]. No digit appears in both, so no pair (a, dilate(a)) is ever seen in training."""
    perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    idx_a, idx_b = perm[:len(images) // 2], perm[len(images) // 2:]
    x = images.float().div(255).unsqueeze(1)  # (N, 1, 28, 28) in [0, 1]
    return x[idx_a] * 2 - 1, dilate(x[idx_b]) * 2 - 1, idx_a, idx_b


def lsgan_d_loss(d_real, d_fake):
    """Eq. 6.2: the least-squares discriminator loss, real pushed to 1 and fake to 0, each patch
    score a separate regression; 1/2 as in the paper."""
    return 0.5 * ((d_real - 1).pow(2).mean() + d_fake.pow(2).mean())


def lsgan_g_loss(d_fake):
    """Eq. 6.3: the least-squares generator loss, fakes pushed to the real label 1."""
    return (d_fake - 1).pow(2).mean()


class CycleGAN(nn.Module):
    """G: A -> B and F: B -> A (paper symbols; self.F is not torch.nn.functional), D_A judges real a
    against F(b), D_B real b against G(a). Images live in [-1, 1]."""

    def __init__(self, channels=32, n_res=6, lambda_cyc=10.0, identity=0.5):
        super().__init__()
        self.G, self.F = Generator(channels, n_res), Generator(channels, n_res)
        self.D_A, self.D_B = PatchDiscriminator(channels), PatchDiscriminator(channels)
        self.apply(init_weights)
        self.lambda_cyc, self.lambda_id = lambda_cyc, identity * lambda_cyc

    def cycle_loss(self, a, b, fake_a=None, fake_b=None):
        """Eq. 6.6: |F(G(a)) - a|_1 + |G(F(b)) - b|_1, each a mean over pixels and batch.
        Pass the translations fake_b = G(a), fake_a = F(b) if they are already computed."""
        fake_b = self.G(a) if fake_b is None else fake_b
        fake_a = self.F(b) if fake_a is None else fake_a
        return (self.F(fake_b) - a).abs().mean() + (self.G(fake_a) - b).abs().mean()

    def g_loss(self, a, b):
        """Eq. 6.8 for both generators at once. Returns the total, its parts, and the fakes."""
        fake_b, fake_a = self.G(a), self.F(b)                                          # (B, 1, 28, 28) each
        adv = lsgan_g_loss(self.D_B(fake_b)) + lsgan_g_loss(self.D_A(fake_a))         # Eq. 6.3, both directions
        cyc = self.cycle_loss(a, b, fake_a, fake_b)                                    # Eq. 6.6
        idt = adv.new_zeros(())
        if self.lambda_id > 0:  # Eq. 6.7: a digit already in the target domain should pass unchanged
            idt = (self.G(b) - b).abs().mean() + (self.F(a) - a).abs().mean()
        total = adv + self.lambda_cyc * cyc + self.lambda_id * idt
        return total, {"adv": adv.item(), "cyc": cyc.item(), "idt": idt.item()}, fake_a, fake_b

    def d_loss(self, a, b, fake_a, fake_b):
        """Eq. 6.2 for both discriminators; the fakes come detached (from the history pool)."""
        return lsgan_d_loss(self.D_A(a), self.D_A(fake_a.detach())) + lsgan_d_loss(self.D_B(b), self.D_B(fake_b.detach()))

    @torch.no_grad()
    def sample(self, x, direction="A2B"):
        """A CycleGAN samples by translating: G(x) for direction A2B, F(x) for B2A; [-1, 1] in and out."""
        return (self.G if direction == "A2B" else self.F)(x).clamp(-1, 1)


# --- Training ---


@torch.no_grad()
def translate_all(model, x, direction, batch_size=500):  # G(x) or F(x) in batches
    return torch.cat([model.sample(x[i:i + batch_size], direction) for i in range(0, len(x), batch_size)])


@torch.no_grad()
def evaluate(model, a, b):
    """Test digits a and their true dilations b = dilate(a) (pairs exist here only, to score).
    Errors are mean |.| per pixel on the [0, 1] scale."""
    def err(x, y):  # mean |x - y| per pixel, halved: [-1, 1] -> [0, 1] scale
        return (x - y).abs().mean().item() / 2

    fake_b, fake_a = translate_all(model, a, "A2B"), translate_all(model, b, "B2A")
    rec_a, rec_b = translate_all(model, fake_b, "B2A"), translate_all(model, fake_a, "A2B")
    return {"l1_G_vs_dilation": err(fake_b, b), "l1_F_vs_source": err(fake_a, a),
            "l1_do_nothing": err(a, b), "cycle_l1_a": err(rec_a, a), "cycle_l1_b": err(rec_b, b),
            "ink_ratio": ((fake_b + 1).sum() / (b + 1).sum()).item()}


def to_uint8(x):  # [-1, 1] -> uint8 numpy
    return ((x + 1) * 127.5).round().clamp(0, 255).byte().cpu().numpy()


def train(cfg):
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    device = pick_device(cfg.device)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    a_train, b_train, _, _ = make_domains(load_mnist(cfg.data_dir, train=True)[0], cfg.seed)
    a_train, b_train = a_train.to(device), b_train.to(device)  # (N/2, 1, 28, 28) each, disjoint digits
    x_test, y_test = load_mnist(cfg.data_dir, train=False)
    n = min(cfg.num_samples, len(x_test))
    a_test = x_test[:n].to(device).float().div(255).unsqueeze(1)  # (n, 1, 28, 28), held out
    a_test, b_test = a_test * 2 - 1, dilate(a_test) * 2 - 1

    model = CycleGAN(cfg.channels, cfg.n_res, cfg.lambda_cyc, cfg.identity).to(device)
    opt_G = torch.optim.Adam([*model.G.parameters(), *model.F.parameters()], lr=cfg.lr, betas=(cfg.beta1, 0.999))
    opt_D = torch.optim.Adam([*model.D_A.parameters(), *model.D_B.parameters()], lr=cfg.lr, betas=(cfg.beta1, 0.999))
    nets = {"G": model.G, "F": model.F, "D_A": model.D_A, "D_B": model.D_B}
    step = 0
    if cfg.resume or cfg.sample_only:
        ckpt = load_checkpoint(out / "ckpt.pt", device)
        for name, net in nets.items():
            net.load_state_dict(ckpt["model"][name])
        opt_G.load_state_dict(ckpt["optimizer"]["G"])
        opt_D.load_state_dict(ckpt["optimizer"]["D"])
        step = ckpt["step"]

    def checkpoint():
        save_checkpoint(out / "ckpt.pt", {"model": {name: net.state_dict() for name, net in nets.items()},
                                          "optimizer": {"G": opt_G.state_dict(), "D": opt_D.state_dict()},
                                          "config": asdict(cfg), "step": step})

    def grid(path):  # rows: a, G(a), F(G(a)), b, F(b), G(F(b)) for the first test digit of each class
        first = torch.stack([(y_test[:n] == k).nonzero()[0, 0] for k in range(10) if (y_test[:n] == k).any()])
        a, b = a_test[first.to(device)], b_test[first.to(device)]
        fake_b, fake_a = model.sample(a, "A2B"), model.sample(b, "B2A")
        rows = [a, fake_b, model.sample(fake_b, "B2A"), b, fake_a, model.sample(fake_a, "A2B")]
        save_grid((torch.cat(rows) + 1) / 2, path, nrow=len(a))

    pool_A, pool_B = ImagePool(cfg.pool_size), ImagePool(cfg.pool_size)
    amp = dict(device_type=device.type, dtype=torch.bfloat16, enabled=cfg.amp and device.type == "cuda")
    t0 = time.time()
    bar = tqdm(total=0 if cfg.sample_only else cfg.steps, initial=step, desc="cyclegan")
    try:
        while step < cfg.steps and not cfg.sample_only:
            # 0. the paper's schedule: lr constant for the first half, then linearly down to 0
            for opt in (opt_G, opt_D):
                for group in opt.param_groups:
                    group["lr"] = cfg.lr * min(1.0, 2.0 * (1 - step / cfg.steps))
            # 1. an unpaired batch: thin digits from half A, bold digits from half B
            a = a_train[torch.randint(len(a_train), (cfg.batch_size,), device=device)]
            b = b_train[torch.randint(len(b_train), (cfg.batch_size,), device=device)]
            # 2. generators G and F: fool both discriminators, close both cycles, keep identities (Eq. 6.8)
            model.D_A.requires_grad_(False)
            model.D_B.requires_grad_(False)
            with torch.autocast(**amp):
                g_loss, parts, fake_a, fake_b = model.g_loss(a, b)
            opt_G.zero_grad(set_to_none=True)
            g_loss.backward()
            # 3. discriminators D_A and D_B on real digits and on fakes from the history pools (Eq. 6.2)
            model.D_A.requires_grad_(True)
            model.D_B.requires_grad_(True)
            with torch.autocast(**amp):
                d_loss = model.d_loss(a, b, pool_A(fake_a.float()), pool_B(fake_b.float()))
            if not (torch.isfinite(g_loss) and torch.isfinite(d_loss)):
                raise SystemExit(f"error: loss is not finite at step {step} (G {g_loss.item()}, D {d_loss.item()}); "
                                 f"the last good checkpoint is {out / 'ckpt.pt'}")
            opt_G.step()
            opt_D.zero_grad(set_to_none=True)
            d_loss.backward()
            opt_D.step()
            step += 1
            bar.update(1)
            bar.set_postfix(G=f"{g_loss.item():.3f}", D=f"{d_loss.item():.3f}", cyc=f"{parts['cyc']:.3f}", refresh=False)
            if step % cfg.log_every == 0 or step == cfg.steps:
                m = evaluate(model, a_test, b_test)
                bar.write(f"step {step}: |G(a) - dilate(a)| {m['l1_G_vs_dilation']:.4f} per pixel "
                          f"(doing nothing: {m['l1_do_nothing']:.4f}), ink ratio {m['ink_ratio']:.3f}, "
                          f"cycle {m['cycle_l1_a']:.4f}")
                checkpoint()
                grid(out / "samples.png")
    except KeyboardInterrupt:
        checkpoint()
        raise SystemExit(f"interrupted at step {step}; checkpoint saved to {out / 'ckpt.pt'}")
    bar.close()

    m = evaluate(model, a_test, b_test)
    print(f"after {step} steps, {time.time() - t0:.0f} s, on {n} test digits (mean |error| per pixel, [0, 1] scale):\n"
          f"  G(a) vs the true dilation {m['l1_G_vs_dilation']:.4f} (doing nothing: {m['l1_do_nothing']:.4f}), "
          f"ink of G(a) / ink of dilate(a) {m['ink_ratio']:.3f}\n"
          f"  F(b) vs the thin source {m['l1_F_vs_source']:.4f}; cycles |F(G(a)) - a| {m['cycle_l1_a']:.4f}, "
          f"|G(F(b)) - b| {m['cycle_l1_b']:.4f}")
    grid(out / "samples.png")
    labels = y_test[:n].numpy()
    np.savez_compressed(out / "samples.npz", images=to_uint8(translate_all(model, a_test, "A2B")), labels=labels)
    np.savez_compressed(out / "samples_b2a.npz", images=to_uint8(translate_all(model, b_test, "B2A")), labels=labels)
    print(f"wrote {out / 'samples.png'}, {out / 'samples.npz'} (G: thin -> bold), {out / 'samples_b2a.npz'} (F: bold -> thin)")
    return {**m, "step": step}


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
