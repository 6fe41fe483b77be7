"""Build (or find in the cache) a generated random-weight model and print its directory.

python -m scripts.make_tiny_model [--spec tiny|migration-bench] [--out DIR]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from engines.tiny_model import SPECS, ensure_model


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", choices=sorted(SPECS), default="tiny", help="which model to build")
    parser.add_argument(
        "--out", type=Path, default=Path.home() / ".cache" / "drover", help="cache directory (models/<hash>)"
    )
    args = parser.parse_args(argv)
    print(ensure_model(args.out, SPECS[args.spec]))


if __name__ == "__main__":
    main()
