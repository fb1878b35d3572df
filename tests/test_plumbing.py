"""Shared code stays identical: every definition of a name listed below, in any course script, must
be byte-identical to its definition in the owner file.

    pytest tests/test_plumbing.py            check
    python tests/test_plumbing.py --fix      rewrite every copy from its owner

Scripts are self-contained, so small helpers are repeated on purpose (CONTRIBUTING.md: the same helper,
letter for letter, wherever it appears). Model code that several scripts share on purpose (a
U-Net used by three diffusion scripts, say) is listed here too, with its owner.
"""

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

AE = "01_autoencoders/autoencoder.py"
SHARED = {  # name: owner file (relative to the repository root)
    "parse_config": AE,
    "pick_device": AE,
    "MNIST_FILES": AE,
    "MNIST_MIRRORS": AE,
    "load_mnist": AE,
    "_download_mnist_file": AE,
    "save_grid": AE,
    "save_checkpoint": AE,
    "load_checkpoint": AE,
    "toy_2d": "00_prerequisites/gaussian_mixture.py",
    "toy_2d_log_prob": "00_prerequisites/gaussian_mixture.py",
    "init_weights": "02_gans/dcgan.py",  # DCGAN's N(0, 0.02) initialization, also used by wgan.py and cyclegan.py
    "squeeze": "03_normalizing_flows/realnvp.py",  # the multi-scale squeeze, also in glow.py
    "unsqueeze": "03_normalizing_flows/realnvp.py",
    "logit_transform": "03_normalizing_flows/realnvp.py",  # dequantized pixels to logit space, also in maf.py
    "dequantize": "03_normalizing_flows/realnvp.py",  # uniform dequantization, also in glow.py, maf.py and score_sde.py
    "bits_per_dim": "03_normalizing_flows/realnvp.py",  # -log p(y) + D log 256 in bits per dimension, also in glow.py, maf.py and score_sde.py
}
DIFFUSION = "05_diffusion_models/ddpm.py"
SCOPED = {  # name: (owner, the folders whose scripts must copy it); other folders may use the name for other code
    name: (DIFFUSION, ("05_diffusion_models",)) for name in  # DDPM's U-Net and schedule, in ddim.py, guidance.py and noise_schedules.py
    ["ints", "timestep_embedding", "norm", "Attention", "ResBlock", "UNet", "linear_betas", "alpha_bar", "per_sample", "q_sample", "q_posterior", "ema_update"]
} | {
    "ddim_step": ("05_diffusion_models/ddim.py", ("05_diffusion_models",)),  # the DDIM update, also the guided sampler's
}


def course_scripts():
    """Every Python file in a numbered course folder (00_... to 10_...)."""
    return sorted(p for p in ROOT.glob("[0-9][0-9]_*/**/*.py") if "__pycache__" not in p.parts)


def definitions(path):
    """Top-level functions, classes and assignments of a file: name -> (first line, last line, text).
    Decorators belong to the definition."""
    source = path.read_text()
    lines = source.splitlines(keepends=True)
    found = {}
    for node in ast.parse(source).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names = [node.name]
        elif isinstance(node, ast.Assign):
            names = [t.id for t in node.targets if isinstance(t, ast.Name)]
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names = [node.target.id]
        else:
            continue
        first = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
        for name in names:
            found[name] = (first, node.end_lineno, "".join(lines[first - 1:node.end_lineno]))
    return found


def shared_names():
    """name -> (owner, folders it is shared in, or None for everywhere)."""
    return {name: (owner, None) for name, owner in SHARED.items()} | SCOPED


def copies():
    """(name, owner path, copy path) for every copy of a shared name outside its owner."""
    result = []
    for script in course_scripts():
        defs = definitions(script)
        folder = script.relative_to(ROOT).parts[0]
        for name, (owner, folders) in shared_names().items():
            if name in defs and script != ROOT / owner and (folders is None or folder in folders):
                result.append((name, ROOT / owner, script))
    return result


def test_owners_define_their_names():
    for name, (owner, _) in shared_names().items():
        if (ROOT / owner).exists():  # an owner in a folder not written yet is skipped until it exists
            assert name in definitions(ROOT / owner), f"{owner} should define {name}"


@pytest.mark.parametrize("name,owner,copy", copies(), ids=lambda v: v if isinstance(v, str) else v.relative_to(ROOT).as_posix())
def test_copy_is_identical(name, owner, copy):
    if not owner.exists():
        pytest.fail(f"{copy.relative_to(ROOT)} defines {name}, whose owner {owner.relative_to(ROOT)} does not exist")
    expected = definitions(owner)[name][2]
    actual = definitions(copy)[name][2]
    assert actual == expected, (f"{name} in {copy.relative_to(ROOT)} differs from its owner "
                                f"{owner.relative_to(ROOT)}; run `python tests/test_plumbing.py --fix`")


def fix():
    """Rewrite every copy from its owner, bottom-up within a file so line numbers stay valid."""
    changed = 0
    by_file = {}
    for name, owner, copy in copies():
        if owner.exists():
            by_file.setdefault(copy, []).append((name, owner))
    for copy, entries in by_file.items():
        lines = copy.read_text().splitlines(keepends=True)
        defs = definitions(copy)
        for name, owner in sorted(entries, key=lambda e: -defs[e[0]][0]):
            first, last, text = defs[name]
            expected = definitions(owner)[name][2]
            if text != expected:
                lines[first - 1:last] = [expected]
                changed += 1
                print(f"fixed {name} in {copy.relative_to(ROOT)}")
        copy.write_text("".join(lines))
    print(f"{changed} definition(s) rewritten")


if __name__ == "__main__":
    if sys.argv[1:] == ["--fix"]:
        fix()
    else:
        sys.exit("usage: python tests/test_plumbing.py --fix   (to check, run: pytest tests/test_plumbing.py)")
