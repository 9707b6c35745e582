"""A virtual environment holding only the GPU image's packages, linked from this one: the GPU check's dry run.

    .venv/bin/python scripts/gpu_dry_venv.py outputs/gpu_dry_run/venv

Every distribution of the running Python's site-packages whose name is in scripts/gpu_image_packages.txt is linked
in (its top-level modules, its dist-info and its commands); everything else stays out, catdog itself included. No
download and no copy: a venv of the same packages from the index would be a 5 GB torch install. Checks at the end
that the packages the GPU check carries as wheels (scripts/gpu_prepare.sh) do not import there.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import re
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_LIST = ROOT / "scripts" / "gpu_image_packages.txt"
# The packages scripts/gpu_prepare.sh carries as wheels, and wandb: never linked, they must not import before
# scripts/gpu_check.sh installs the wheels.
CARRIED = ("omegaconf", "webdataset", "submitit", "braceexpand", "wandb")


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def image_packages() -> set[str]:
    lines = PACKAGE_LIST.read_text().splitlines()
    return {normalise(ln.strip()) for ln in lines if ln.strip() and not ln.startswith("#")}


def link_distribution(dist: md.Distribution, src: Path, dst: Path, bin_dir: Path, python: Path) -> None:
    """Its top-level entries of site-packages as links, and a command for each of its console scripts."""
    tops = {Path(str(f)).parts[0] for f in dist.files or ()}
    for top in sorted(tops - {"..", "__pycache__"}):
        if (src / top).exists() and not (dst / top).exists():
            (dst / top).symlink_to(src / top)
    for ep in dist.entry_points.select(group="console_scripts"):
        module, _, attr = ep.value.partition(":")
        script = bin_dir / ep.name
        script.write_text(f"#!{python}\nimport sys\nfrom {module} import {attr.split('.')[0]}\nsys.exit({attr}())\n")
        script.chmod(0o755)


def requirements(dist: md.Distribution) -> set[str]:
    """Names of what ``dist`` needs here (markers evaluated; extras left out)."""
    names = set()
    for text in dist.requires or ():
        req = Requirement(text)
        if req.marker is None or req.marker.evaluate({"extra": ""}):
            names.add(normalise(req.name))
    return names


def build(target: Path) -> tuple[list[str], list[str], list[str]]:
    """(linked image packages, their dependencies linked beside them, image packages this Python lacks).

    A dependency that the image's version of a package would not need (a newer huggingface_hub here needs
    httpcore2) is linked too: on the image, each package's own needs are met. The carried packages never are."""
    if target.exists():
        shutil.rmtree(target)
    venv.EnvBuilder(with_pip=False, symlinks=True).create(target)
    python = target / "bin" / "python"
    purelib = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    dst = Path(subprocess.check_output([python, "-c", purelib], text=True).strip())
    src = Path(sysconfig.get_paths()["purelib"])
    here = {normalise(d.metadata["Name"]): d for d in md.distributions(path=[str(src)])}
    wanted = image_packages()
    todo, chosen = [n for n in wanted if n in here], set()
    while todo:
        name = todo.pop()
        if name in chosen or name in CARRIED:
            continue
        chosen.add(name)
        todo += [r for r in requirements(here[name]) if r in here]
    for name in sorted(chosen):
        link_distribution(here[name], src, dst, target / "bin", python)
    return sorted(chosen & wanted), sorted(chosen - wanted), sorted(wanted - chosen)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("target", type=Path, help="the venv to (re)create")
    args = ap.parse_args(argv)
    args.target = args.target.resolve()
    linked, deps, absent = build(args.target)
    python = args.target / "bin" / "python"
    print(
        f"{args.target}: {len(linked)} of the image's packages linked from {sys.prefix}, with what their versions here "
        f"need beside them ({', '.join(deps) or 'nothing'}); {len(absent)} of its packages are not in this Python"
    )
    leaked = []
    for name in (*CARRIED, "catdog", "train"):
        probe = subprocess.run([python, "-c", f"import {name}"], capture_output=True, cwd="/")
        if probe.returncode == 0:
            leaked.append(name)
    if leaked:
        print(
            f"gpu_dry_venv.py: {', '.join(leaked)} import in {args.target}: not the image's package set",
            file=sys.stderr,
        )
        return 1
    probe = subprocess.run(
        [python, "-c", "import torch, torchvision, accelerate, onnxruntime"], capture_output=True, text=True, cwd="/"
    )
    if probe.returncode:
        print(
            f"gpu_dry_venv.py: torch does not import in {args.target}: {probe.stderr.strip()[-300:]}", file=sys.stderr
        )
        return 1
    print(f"   {', '.join(CARRIED)} and catdog do not import there")
    return 0


if __name__ == "__main__":
    sys.exit(main())
