#!/usr/bin/env python3
"""Replace one section of docs/benchmarks.md (between <!-- bench:NAME --> markers) with stdin."""
import pathlib, sys
name = sys.argv[1]
doc = pathlib.Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
text = doc.read_text() if doc.exists() else "# Benchmarks\n\nNumbers are measured by scripts in `bench/`, never asserted by tests.\n"
start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
body = f"{start}\n{sys.stdin.read().strip()}\n{end}"
if start in text and end in text:
    a = text.index(start); b = text.index(end) + len(end)
    text = text[:a] + body + text[b:]
else:
    text = text.rstrip() + "\n\n" + body + "\n"
doc.write_text(text)
