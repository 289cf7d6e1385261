"""Turn your own rows (a CSV, or a JSONL of objects) into a requests file: one request per row.

The user turn comes from a template whose {column} fields take each row's values; the system prompt from a file,
the same on every line (so automatic caching writes it once and every other line reads it at a tenth of the
price); chosen columns become each line's metadata, kept beside its answer. Standard library only.

    python examples/rows_to_requests.py reviews.csv --template "Classify this review: {text}" \\
        --system prompt.txt --metadata id,stars --output reviews_requests.jsonl

A CSV's first line names the columns; cells may hold commas, quotes, line breaks and any Unicode. In a template,
write {{ and }} for a literal brace.
"""

from __future__ import annotations

import argparse
import csv
import json
import string
import sys
from collections.abc import Iterator
from pathlib import Path


def rows(path: Path) -> Iterator[dict[str, object]]:
    """The rows of a .csv (its header names the columns) or of a .jsonl of objects."""
    if path.suffix.lower() == ".jsonl":
        with open(path, encoding="utf-8-sig") as file:
            for number, line in enumerate(file, start=1):
                if line.strip():
                    row = json.loads(line)
                    if not isinstance(row, dict):
                        raise ValueError(f"line {number} of {path} is not a JSON object")
                    yield row
        return
    with open(path, encoding="utf-8-sig", newline="") as file:
        yield from csv.DictReader(file)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("rows", type=Path, help="a .csv file (a header line, then one row a line) or a .jsonl file")
    parser.add_argument("--template", required=True, help="the user turn, with {column} fields")
    parser.add_argument("--system", type=Path, help="a text file whose content is every request's system prompt")
    parser.add_argument("--metadata", default="", help="comma-separated columns kept as each line's metadata")
    parser.add_argument("--model", default="claude-sonnet-5-5", help="the model of every request "
                                                                     "(default: claude-sonnet-5-5)")
    parser.add_argument("--max_tokens", type=int, default=1024, help="the longest answer (default: 1024)")
    parser.add_argument("--output", type=Path, help="the requests file (default: <rows>_requests.jsonl)")
    args = parser.parse_args(argv)
    fields = [name for _, name, _, _ in string.Formatter().parse(args.template) if name]
    keep = [name.strip() for name in args.metadata.split(",") if name.strip()]
    system = args.system.read_text(encoding="utf-8") if args.system else None
    output = args.output or args.rows.with_name(args.rows.stem + "_requests.jsonl")
    written = 0
    try:
        with open(output, "w", encoding="utf-8") as file:
            for number, row in enumerate(rows(args.rows), start=1):
                missing = [name for name in [*fields, *keep] if name not in row]
                if missing:
                    raise ValueError(f"row {number} has no column {missing[0]!r} (its columns: {', '.join(row)})")
                request = {"model": args.model, "max_tokens": args.max_tokens,
                           **({"system": system} if system else {}),
                           "messages": [{"role": "user", "content": args.template.format_map(row)}],
                           **({"metadata": {name: row[name] for name in keep}} if keep else {})}
                file.write(json.dumps(request, ensure_ascii=False) + "\n")
                written += 1
    except (OSError, ValueError, csv.Error) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"Wrote {written:,} requests to {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
