"""Build kvtuner/texts/heldout.txt: held-out English text for evaluation, available offline.

The text is licence documents from /usr/share/common-licenses (Debian/Ubuntu), copied verbatim:
each of them permits verbatim copying and distribution of the licence text itself. It is not
`pydoc_data.topics` (the calibration text), so evaluating on it does not reuse calibration data.

    python scripts/make_heldout_text.py [--source /usr/share/common-licenses] [--out kvtuner/texts/heldout.txt]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kvtuner.io import atomic_write_text

# newest version of each licence family only, so the text repeats itself as little as possible
LICENCES = (
    "GPL-3",
    "LGPL-3",
    "GFDL-1.3",
    "Apache-2.0",
    "MPL-2.0",
    "GPL-2",
    "LGPL-2.1",
    "CC0-1.0",
    "Artistic",
)
SEPARATOR = "\n\n"


def build(source: Path) -> str:
    """Concatenate the licence texts, unchanged, with blank lines between them."""
    missing = [name for name in LICENCES if not (source / name).is_file()]
    if missing:
        raise SystemExit(f"{source}: missing licence files {', '.join(missing)}")
    texts = [(source / name).read_text(encoding="utf-8").strip("\n") for name in LICENCES]
    return SEPARATOR.join(texts) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=Path("/usr/share/common-licenses"))
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).resolve().parents[1] / "kvtuner/texts/heldout.txt",
    )
    args = parser.parse_args(argv)
    text = build(args.source)
    atomic_write_text(args.out, text)
    print(f"{args.out}: {len(text)} characters from {len(LICENCES)} licence texts", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
