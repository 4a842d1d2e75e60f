"""The operator image: its size and what building it costs (``hack/image.sh``).

Figures: the image's size (uncompressed, as podman counts it), a rebuild with nothing
changed (the layer cache at work: what a developer pays per test session), and, unless
``--quick``, a cold build in a private, empty cache (debootstrap of the stand-in base,
the locked dependencies from PyPI: what CI pays on a fresh machine). The cold build never
touches ``~/.cache/maestro``, which running tests may be using.
"""

from __future__ import annotations

import io
import shutil
import tempfile
from pathlib import Path

from bench.common import Figure, Outcome, use_test_fixtures

use_test_fixtures()

from fixtures.image import build_image, podman  # noqa: E402


def run(quick: bool) -> Outcome:
    """Build the working tree's image (warm, then cold unless ``quick``) and measure it."""
    out = Outcome()
    log = io.StringIO()
    first = build_image(log)  # brings the shared cache up to date with the working tree
    warm = [build_image(log).seconds for _ in range(1 if quick else 3)]
    out.figures.append(Figure("image", "size (uncompressed)", "MB", [first.size_bytes / 1e6]))
    out.figures.append(Figure("image", "rebuild, nothing changed", "s", warm))
    out.details = {"tag": first.tag, "base": first.base, "size_bytes": first.size_bytes}
    if not quick:
        cache = Path(tempfile.mkdtemp(prefix="maestro-image-cold-"))
        try:
            cold = build_image(log, cache_dir=cache)
        finally:
            # The storage holds overlay mounts and root-owned files: podman empties it.
            podman("system", "reset", "--force", check=False, cache_dir=cache)
            shutil.rmtree(cache, ignore_errors=True)
        out.figures.append(
            Figure(
                "image",
                "cold build (empty cache)",
                "s",
                [cold.seconds],
                target="< 180 s",
                met=cold.seconds < 180,
            )
        )
    out.details["log"] = log.getvalue()
    return out
