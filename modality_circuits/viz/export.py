"""Optional PNG export of plotly figures: only where kaleido and a Chromium/Chrome are present.

Nothing is downloaded: when either is missing, :func:`save_png` skips silently (it logs why once) and returns
False, so reports and runs never depend on it.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
from functools import lru_cache
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")


def find_chromium() -> str | None:
    """Path of a Chromium/Chrome executable on PATH, or None."""
    for name in BROWSERS:
        p = shutil.which(name)
        if p:
            return p
    return None


@lru_cache(maxsize=1)
def png_export_available() -> bool:
    """True when kaleido is importable and a Chromium is installed (logged once when not)."""
    if importlib.util.find_spec("kaleido") is None:
        logger.info("PNG export skipped: kaleido is not installed (optional; the HTML report has every figure)")
        return False
    if find_chromium() is None:
        logger.info("PNG export skipped: no Chromium/Chrome found on PATH")
        return False
    return True


def save_png(fig: Any, path: str | Path, scale: float = 2.0) -> bool:
    """Write ``fig`` as PNG if export is available; returns whether a file was written."""
    if not png_export_available():
        return False
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")  # written whole, then renamed: never a partial PNG
    try:
        fig.write_image(str(tmp), scale=scale)
        os.replace(tmp, path)
    except Exception as e:  # kaleido/browser failures must never break a run
        tmp.unlink(missing_ok=True)
        logger.info("PNG export of %s skipped: %s", path.name, e)
        return False
    return True
