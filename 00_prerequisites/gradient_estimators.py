"""
Gradient estimators: the gradient of an expectation, by the score function and by reparameterization.

Paper: Mohamed, Rosca, Figurnov and Mnih, "Monte Carlo Gradient Estimation in Machine Learning",
JMLR 2020, arXiv 1906.10652. Score function: Williams, "Simple statistical gradient-following
algorithms for connectionist reinforcement learning", Machine Learning 1992 (REINFORCE).
Reparameterization: Kingma and Welling 2013, arXiv 1312.6114; Rezende et al. 2014, arXiv 1401.4082.

The idea: we want d/dmu of E_{z ~ N(mu, sigma^2)}[f(z)] (the gradient with respect to mu only)
from samples. The score-function estimator needs only values of f; the reparameterization
(pathwise) estimator writes z = mu + sigma eps and differentiates f itself. Both are unbiased. For a
smooth f such as (z - a)^2 the pathwise one has far lower variance; for a rapidly oscillating
f = cos(omega z) its variance grows like omega^2 while the score function's stays bounded. A
baseline b, the mean of f over a separate batch, lowers the score function's variance when f has
a large mean and cannot help when it has none. Every variance is also derived in closed form.

    score function:  g = f(z) (z - mu) / sigma^2,  z ~ N(mu, sigma^2)   (README Eq. 4.9)
    with baseline:   g = (f(z) - b) (z - mu) / sigma^2, b independent   (README Eq. 4.11)
    pathwise:        g = f'(mu + sigma eps),  eps ~ N(0, 1)             (README Eq. 4.13)
    Var[mean of N] = Var[g] / N                                         (README Eq. 4.2)

Run:   python 00_prerequisites/gradient_estimators.py
CPU recipe: python 00_prerequisites/gradient_estimators.py
Measured on a 2-core CPU: 2.7 s. N x variance at N = 1000 (exact): z^2 score 30.9 (30), baseline 18.9
(18.06), pathwise 3.7 (4); cos(10 z) score 0.50 (0.5), baseline 0.50 (0.505), pathwise 50.4 (50).
Writes out/gradient_estimators/: variance.png, results.json.
"""

import argparse
import dataclasses
import inspect
import json
import math
import re
import sys
import time
import typing
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont


# --- Config ---


@dataclass
class Config:
    seed: int = 0  # random seed (torch, numpy)
    device: str = "auto"  # auto (cuda, then mps, then cpu) | cpu | cuda | cuda:N | mps
    out_dir: str = "out/gradient_estimators"  # variance.png and results.json go here
    num_samples: int = 2000  # independent repeats of each estimator, to measure its variance
    sizes: str = "1,10,100,1000"  # comma-separated sample sizes N averaged inside one estimate
    mu: float = 1.0  # mean of q = N(mu, sigma^2); the gradient is taken with respect to mu
    sigma: float = 1.0  # standard deviation of q
    a: float = 0.0  # the smooth case: f(z) = (z - a)^2
    omega: float = 10.0  # the oscillating case: f(z) = cos(omega z)
    baseline_samples: int = 100  # M: the baseline is the mean of f over M separate draws
    is_samples: int = 10000  # samples per importance-sampling estimate (README Eq. 4.4)

    def __post_init__(self):
        if not self.sigma > 0:
            raise ValueError(f"--sigma must be positive, got {self.sigma}")
        if self.num_samples < 2 or self.baseline_samples < 1 or self.is_samples < 2:
            raise ValueError("--num-samples and --is-samples must be at least 2, --baseline-samples at least 1")
        if not re.fullmatch(r"\s*\d+(\s*,\s*\d+)*\s*", self.sizes) or min(parse_sizes(self.sizes)) < 1:
            raise ValueError(f"--sizes must be positive integers separated by commas, got {self.sizes!r}")


def parse_sizes(text):
    return [int(s) for s in text.split(",")]


# --- The two functions, with their exact gradients and variances ---


class Quadratic:
    """f(z) = (z - a)^2: smooth, its derivative is small where q lives. Reparameterization wins."""

    def __init__(self, a=0.0):
        self.a = a
        self.name = f"f(z) = (z - {a:g})^2"

    def f(self, z):
        return (z - self.a) ** 2

    def moments(self, mu, sigma):
        """Exact moments under z = mu + sigma eps (README Eq. 4.16): E f, Var f, the gradient
        G = d/dmu E f, E[f^2 s^2] and E[f s^2] with the score s = eps / sigma, and Var f'(z)."""
        d = mu - self.a
        mean = d ** 2 + sigma ** 2
        second = d ** 4 + 6 * d ** 2 * sigma ** 2 + 3 * sigma ** 4  # E (d + sigma eps)^4
        return dict(mean=mean, var=second - mean ** 2, grad=2 * d,
                    f2s2=d ** 4 / sigma ** 2 + 18 * d ** 2 + 15 * sigma ** 2,
                    fs2=(d ** 2 + 3 * sigma ** 2) / sigma ** 2,
                    pathwise_var=4 * sigma ** 2)


class Cosine:
    """f(z) = cos(omega z): bounded, but its derivative is as large as omega. The score function wins."""

    def __init__(self, omega=10.0):
        self.omega = omega
        self.name = f"f(z) = cos({omega:g} z)"

    def f(self, z):
        return torch.cos(self.omega * z)

    def moments(self, mu, sigma):
        """Exact moments (README Eq. 4.17), from E[eps^k e^{i t eps}] for a standard normal eps."""
        k, s = self.omega, sigma
        damp, damp2 = math.exp(-k ** 2 * s ** 2 / 2), math.exp(-2 * k ** 2 * s ** 2)
        mean = math.cos(k * mu) * damp
        grad = -k * math.sin(k * mu) * damp
        return dict(mean=mean, var=(1 + math.cos(2 * k * mu) * damp2) / 2 - mean ** 2, grad=grad,
                    f2s2=(1 + math.cos(2 * k * mu) * (1 - 4 * k ** 2 * s ** 2) * damp2) / (2 * s ** 2),
                    fs2=math.cos(k * mu) * (1 - k ** 2 * s ** 2) * damp / s ** 2,
                    pathwise_var=k ** 2 * (1 - math.cos(2 * k * mu) * damp2) / 2 - grad ** 2)


def exact_variances(case, mu, sigma, baseline_samples):
    """Variance of ONE sample of each estimator (N = 1); the mean of N has 1/N of it (Eq. 4.2).
    With s = eps / sigma and E s^2 = 1 / sigma^2:
      score:     E[f^2 s^2] - G^2                                              (Eq. 4.10)
      baseline:  E[f^2 s^2] - 2 E[b] E[f s^2] + E[b^2] E[s^2] - G^2, b from M draws   (Eq. 4.12)
      pathwise:  Var f'(z)                                                     (Eq. 4.14)
    and, for reference, the best constant baseline b* = E[f s^2] / E[s^2]    (Eq. 4.15)."""
    m = case.moments(mu, sigma)
    s2 = 1 / sigma ** 2
    b_second = m["mean"] ** 2 + m["var"] / baseline_samples  # E[b^2] for b the mean of M draws
    return {"score": m["f2s2"] - m["grad"] ** 2,
            "baseline": m["f2s2"] - 2 * m["mean"] * m["fs2"] + b_second * s2 - m["grad"] ** 2,
            "pathwise": m["pathwise_var"],
            "best_constant_baseline": m["f2s2"] - m["fs2"] ** 2 / s2 - m["grad"] ** 2}


# --- The estimators ---
# Each returns R independent estimates, each the average over N samples. mu is a (R, 1) tensor of
# copies of mu that requires grad: the gradient of the sum of the R estimates with respect to row r
# is estimate r alone, so one backward pass gives all R gradients.


def normal_log_prob(z, mu, sigma):
    return -(z - mu) ** 2 / (2 * sigma ** 2) - math.log(sigma) - 0.5 * math.log(2 * math.pi)


def score_function(f, mu, sigma, repeats, n, generator, baseline_samples=0):
    """REINFORCE (Eq. 4.9): differentiate the surrogate mean[(f(z) - b) log q(z; mu)] with z and b held
    fixed. The baseline b (Eq. 4.11) is the mean of f over M separate draws, independent of z, so the
    estimator stays unbiased; baseline_samples=0 means no baseline."""
    device, dtype = generator.device, torch.float64 if generator.device.type != "mps" else torch.float32
    mu_r = torch.full((repeats, 1), mu, device=device, dtype=dtype, requires_grad=True)  # (R, 1)
    z = (mu + sigma * torch.randn(repeats, n, generator=generator, device=device, dtype=dtype))  # (R, N), no path to mu_r
    fz = f(z)  # (R, N): only values of f are used
    b = 0.0
    if baseline_samples:
        extra = mu + sigma * torch.randn(repeats, baseline_samples, generator=generator, device=device, dtype=dtype)
        b = f(extra).mean(1, keepdim=True)  # (R, 1), one baseline per estimate
    surrogate = ((fz - b) * normal_log_prob(z, mu_r, sigma)).mean(1).sum()
    (grad,) = torch.autograd.grad(surrogate, mu_r)
    return grad[:, 0]  # (R,)


def pathwise(f, mu, sigma, repeats, n, generator):
    """Reparameterization (Eq. 4.13): z = mu + sigma eps keeps a path from mu to f(z); autograd follows it."""
    device, dtype = generator.device, torch.float64 if generator.device.type != "mps" else torch.float32
    mu_r = torch.full((repeats, 1), mu, device=device, dtype=dtype, requires_grad=True)  # (R, 1)
    eps = torch.randn(repeats, n, generator=generator, device=device, dtype=dtype)  # (R, N)
    z = mu_r + sigma * eps  # differentiable in mu
    (grad,) = torch.autograd.grad(f(z).mean(1).sum(), mu_r)
    return grad[:, 0]  # (R,)


ESTIMATORS = ("score", "baseline", "pathwise")


def estimate(name, case, cfg, n, generator):
    """cfg.num_samples independent estimates, each from n samples, by the estimator called name."""
    if name == "pathwise":
        return pathwise(case.f, cfg.mu, cfg.sigma, cfg.num_samples, n, generator)
    m = cfg.baseline_samples if name == "baseline" else 0
    return score_function(case.f, cfg.mu, cfg.sigma, cfg.num_samples, n, generator, baseline_samples=m)


# --- Importance sampling ---


def importance_sampling(f, log_p, proposal_mean, proposal_std, n, generator):
    """Estimate E_p[f] with draws from q = N(proposal_mean, proposal_std^2) (Eq. 4.4): the mean of
    w f with w = p / q. Returns the estimate, its standard error and the effective sample size
    (sum w)^2 / sum w^2 (Eq. 4.6)."""
    z = proposal_mean + proposal_std * torch.randn(n, generator=generator, device=generator.device, dtype=torch.float64)
    log_w = log_p(z) - normal_log_prob(z, proposal_mean, proposal_std)
    w = log_w.exp()
    values = w * f(z)
    ess = (w.sum() ** 2 / (w ** 2).sum()).item()
    return values.mean().item(), (values.std() / math.sqrt(n)).item(), ess


def importance_sampling_demo(cfg, generator):
    """Two worked examples with p = N(0, 1): a rare event where a shifted proposal helps, and a
    proposal narrower than p whose weights have infinite variance (Eq. 4.7)."""
    def log_p(z):
        return normal_log_prob(z, 0.0, 1.0)

    def above_four(z):
        return (z > 4).double()

    def square(z):
        return z ** 2

    rows = {"tail_exact": 0.5 * math.erfc(4 / math.sqrt(2))}  # P(z > 4) in closed form
    rows["tail_plain"] = importance_sampling(above_four, log_p, 0.0, 1.0, cfg.is_samples, generator)
    rows["tail_shifted"] = importance_sampling(above_four, log_p, 4.0, 1.0, cfg.is_samples, generator)
    rows["narrow"] = [importance_sampling(square, log_p, 0.0, 0.5, cfg.is_samples, generator)
                      for _ in range(5)]  # E_p[z^2] = 1, from q = N(0, 0.5^2)
    return rows


# --- The experiment ---


def run(cfg):
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    device = pick_device(cfg.device)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sizes = parse_sizes(cfg.sizes)
    t0 = time.time()

    results = {"config": asdict(cfg), "cases": []}
    for case in (Quadratic(cfg.a), Cosine(cfg.omega)):
        m = case.moments(cfg.mu, cfg.sigma)
        exact = exact_variances(case, cfg.mu, cfg.sigma, cfg.baseline_samples)
        print(f"\n{case.name}, z ~ N({cfg.mu:g}, {cfg.sigma:g}^2): exact d/dmu E f = {m['grad']:.6g}   "
              f"(baseline: mean of f over M = {cfg.baseline_samples} separate draws)")
        print(f"{'estimator':>9} {'N':>5} {'mean of estimates':>24} {'variance':>11} {'N x variance':>13} {'exact N x var':>14}")
        rows = []
        for name in ESTIMATORS:
            for n in sizes:
                g = estimate(name, case, cfg, n, generator).double().cpu()
                mean, var = g.mean().item(), g.var().item()
                se = math.sqrt(var / len(g))
                rows.append({"estimator": name, "n": n, "mean": mean, "se": se, "var": var,
                             "exact_var": exact[name] / n})
                print(f"{name:>9} {n:>5} {mean:>12.4f} +- {se:<9.4f} {var:>11.4g} {n * var:>13.4g} {exact[name]:>14.4g}")
        print(f"   (best constant baseline b* = E[f s^2] / E[s^2] would give N x variance {exact['best_constant_baseline']:.4g})")
        results["cases"].append({"name": case.name, "grad": m["grad"], "exact_per_sample_var": exact, "rows": rows})

    isr = importance_sampling_demo(cfg, generator)
    n = cfg.is_samples
    print(f"\nimportance sampling, p = N(0, 1), {n} samples per estimate (mean, standard error, ESS):")
    print(f"  P(z > 4) = {isr['tail_exact']:.4e} exactly")
    plain_var = isr["tail_exact"] * (1 - isr["tail_exact"]) / n  # exact variance of the plain estimate
    for key, label in (("tail_plain", "q = p"), ("tail_shifted", "q = N(4, 1)")):
        est, se, ess = isr[key]
        gain = f"variance {plain_var / se ** 2:.3g} x smaller than plain" if se > 0 else "no sample hit z > 4"
        print(f"  {label:<12} {est:.4e} +- {se:.2e}   ESS {ess:8.1f}   {gain}")
    print("  E_p[z^2] = 1 from q = N(0, 0.5^2), five independent estimates (weights of infinite variance):")
    for est, se, ess in isr["narrow"]:
        print(f"               {est:.4f} +- {se:.4f}   ESS {ess:8.1f}")
    results["importance_sampling"] = isr

    plot_variances(results["cases"], sizes, out / "variance.png")
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(f"\nwrote {out / 'variance.png'} and {out / 'results.json'} ({time.time() - t0:.1f} s)")
    return results


# --- Plot ---

COLORS = {"score": (214, 39, 40), "baseline": (255, 127, 14), "pathwise": (31, 119, 180)}


def plot_variances(cases, sizes, path, width=460, height=380):
    """Log-log variance against N, one panel per case: dots measured, lines the exact Var / N."""
    font = ImageFont.load_default(size=13)
    image = Image.new("RGB", (width * len(cases), height), "white")
    draw = ImageDraw.Draw(image)
    left, right, top, bottom = 62, 26, 30, 46
    for panel, case in enumerate(cases):
        x0 = panel * width
        values = [r[k] for r in case["rows"] for k in ("var", "exact_var") if r[k] > 0]
        lo, hi = math.floor(math.log10(min(values))), math.ceil(math.log10(max(values)))
        nlo, nhi = math.log10(min(sizes)), max(math.log10(max(sizes)), math.log10(min(sizes)) + 1)

        def xy(n, v):
            x = x0 + left + (math.log10(n) - nlo) / (nhi - nlo) * (width - left - right)
            y = top + (hi - math.log10(max(v, 10.0 ** lo))) / max(hi - lo, 1) * (height - top - bottom)
            return x, y

        draw.rectangle([x0 + left, top, x0 + width - right, height - bottom], outline="black")
        for e in range(lo, hi + 1):
            _, y = xy(min(sizes), 10.0 ** e)
            draw.line([x0 + left - 4, y, x0 + left, y], fill="black")
            draw.text((x0 + 4, y - 7), f"1e{e}", fill="black", font=font)
        for n in sizes:
            x, _ = xy(n, 10.0 ** lo)
            draw.line([x, height - bottom, x, height - bottom + 4], fill="black")
            draw.text((x - 8, height - bottom + 6), str(n), fill="black", font=font)
        draw.text((x0 + width / 2 - 40, height - 18), "sample size N", fill="black", font=font)
        draw.text((x0 + left, 8), f"{case['name']}: variance of the gradient estimate", fill="black", font=font)
        for i, name in enumerate(ESTIMATORS):
            rows = [r for r in case["rows"] if r["estimator"] == name]
            exact_line = [xy(r["n"], r["exact_var"]) for r in rows]
            if len(exact_line) > 1:
                draw.line(exact_line, fill=COLORS[name], width=2)
            radius = 6 - i  # drawn largest first, so coinciding dots stay visible
            for r in rows:
                x, y = xy(r["n"], r["var"])
                draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=COLORS[name], outline="black")
            draw.text((x0 + width - right - 150, top + 8 + 16 * i), f"o {name}", fill=COLORS[name], font=font)
        draw.text((x0 + width - right - 150, top + 8 + 16 * 3), "line: exact Var / N", fill="gray", font=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


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


# --- Main ---


def main(argv=None):
    cfg = parse_config(Config, argv)
    return run(cfg)


if __name__ == "__main__":
    main()
