"""Plain aligned columns, as ``kubectl get`` prints lists.

Every column but the last is as wide as its widest cell, so names and ids never wrap;
the last (a message) is cut to what is left of the terminal line, unless ``full``.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence

GAP = "   "


def render(headers: Sequence[str], rows: Sequence[Sequence[str]], *, full: bool = False) -> str:
    """The table as text lines (no trailing newline)."""
    table = [[h.upper() for h in headers], *([str(c) for c in row] for row in rows)]
    widths = [max(len(r[i]) for r in table) for i in range(len(headers) - 1)]
    room = shutil.get_terminal_size((80, 24)).columns - sum(widths) - len(GAP) * len(widths)
    lines = []
    for row in table:
        last = row[-1]
        if not full and len(last) > max(room, 1):
            last = last[: max(room - 1, 0)] + "…"
        cells = [c.ljust(w) for c, w in zip(row, widths, strict=False)]
        lines.append(GAP.join([*cells, last]).rstrip())
    return "\n".join(lines)
