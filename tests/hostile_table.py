"""``python -m tests.hostile_table``: play every hostile case (tests/hostile.py) against wmproxy-tw,
nginx and HAProxy and print the Markdown comparison table (input | ours | nginx | HAProxy | note).

Runs the installed ``twistd`` of the interpreter's environment (``make test-deps`` first)."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any

from twisted.internet import defer, task

from .hostile import CASES, Stack, run_case


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


async def table(reactor: Any, out: Any = sys.stdout) -> list[str]:
    """The table's lines (also written to ``out``)."""
    with tempfile.TemporaryDirectory(prefix="hostile-") as tmp:
        stack = await Stack(Path(tmp)).start()
        lines = ["| input | listener | ours | nginx | HAProxy | note |", "|---|---|---|---|---|---|"]
        try:
            slow = [c for c in CASES if c.slow]
            rows: dict[str, dict[str, str]] = {}
            results = await defer.gatherResults([defer.ensureDeferred(run_case(stack, c)) for c in slow])
            rows.update({c.name: r for c, r in zip(slow, results, strict=True)})
            for c in CASES:
                if not c.slow:
                    rows[c.name] = await run_case(stack, c)
            random: dict[str, list[str]] = {}
            for c in CASES:
                r = rows[c.name]
                if c.family == "random bytes":  # one row per listener: the answers to the 4 seeds
                    if c.target not in random:
                        random[c.target] = []
                        lines.append(c.target)  # placeholder, filled below
                    random[c.target].append(r["ours"])
                    continue
                line = (f"| {_cell(c.name)} | {c.target} | {_cell(r['ours'])} | {_cell(r.get('nginx', '—'))} "
                        f"| {_cell(r.get('haproxy', '—'))} | {_cell(c.note)} |")
                lines.append(line)
            for target, answers in random.items():
                seen = " / ".join(dict.fromkeys(answers))
                lines[lines.index(target)] = (f"| random 64 KiB ×{len(answers)} (plain, 0x05…, 'GET '…, TLS-like) "
                                              f"| {target} | {_cell(seen)} | — | — | |")
        finally:
            await stack.stop()
    for line in lines:
        out.write(line + "\n")
    return lines


def main() -> None:
    task.react(lambda reactor: defer.ensureDeferred(table(reactor)))


if __name__ == "__main__":
    main()
