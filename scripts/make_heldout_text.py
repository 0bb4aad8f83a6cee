"""Build kvtuner/texts/heldout.txt: held-out English text for evaluation, available offline.

The text is licence documents from /usr/share/common-licenses (Debian/Ubuntu), copied verbatim:
each of them permits verbatim copying and distribution of the licence text itself. It is not
`pydoc_data.topics` (the calibration text), so evaluating on it does not reuse calibration data.

    python scripts/make_heldout_text.py [--source /usr/share/common-licenses] [--out kvtuner/texts/heldout.txt]
    python scripts/make_heldout_text.py --long   # kvtuner/texts/heldout_long.txt

`--long` builds the text long-context evaluation adds (`kvtuner eval --context` above 2048 tokens):
the Vim user manual (/usr/share/vim/vim90/doc/usr_*.txt, about 640 KB, 160k tokens), verbatim;
it is distributed under the Open Publication License v1.0, as its usr_01.txt says.
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


VIM_MANUAL = Path("/usr/share/vim/vim90/doc")


def build_long(source: Path) -> str:
    """The Vim user manual's chapters usr_*.txt in order, unchanged, blank lines between them."""
    chapters = sorted(source.glob("usr_*.txt"))
    if not chapters:
        raise SystemExit(f"{source}: no usr_*.txt (the Vim user manual)")
    return SEPARATOR.join(p.read_text(encoding="utf-8").strip("\n") for p in chapters) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--long", action="store_true", help="build heldout_long.txt instead")
    parser.add_argument("--source", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    texts = Path(__file__).resolve().parents[1] / "kvtuner/texts"
    if args.long:
        text = build_long(args.source or VIM_MANUAL)
        out = args.out or texts / "heldout_long.txt"
    else:
        text = build(args.source or Path("/usr/share/common-licenses"))
        out = args.out or texts / "heldout.txt"
    atomic_write_text(out, text)
    print(f"{out}: {len(text)} characters", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
