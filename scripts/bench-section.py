#!/usr/bin/env python3
"""Put a section into BENCHMARKS.md between <!-- NAME:begin --> and <!-- NAME:end --> (appended
when the markers are not there yet).

  bench-section.py NAME < SECTION
"""
import re
import sys

name = sys.argv[1]
section = sys.stdin.read().rstrip("\n")
begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
text = open("BENCHMARKS.md").read()
block = f"{begin}\n{section}\n{end}"
if begin in text:
    text = re.sub(re.escape(begin) + r".*?" + re.escape(end), lambda _: block, text, flags=re.S)
else:
    text = text.rstrip() + "\n\n" + block + "\n"
open("BENCHMARKS.md", "w").write(text)
