"""Progress of store writes: a tqdm bar (bytes written, GB/s, ETA, the tensor being written) on the terminal.

Shown only when it helps: on a terminal (stderr is a TTY), for writes that take more than ``DELAY_S`` seconds (tqdm's
``delay``: a quick write prints nothing), and unless turned off with ``progress=False`` (``write_model``,
``tensorstream.Config``) or ``TENSORSTREAM_PROGRESS=0``. Without tqdm installed, nothing is shown.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Optional

from .errors import ConfigError

# A write shorter than this shows no bar at all; the bar redraws at most this often.
DELAY_S = 2.0
REDRAW_S = 0.5

__all__ = ["WriteProgress", "progress_enabled", "DELAY_S", "REDRAW_S"]


def progress_enabled(progress: Optional[bool]) -> bool:
    """``progress`` as given, else TENSORSTREAM_PROGRESS (1/0, true/false, on/off), else whether stderr is a TTY."""
    if progress is not None:
        if not isinstance(progress, bool):
            raise ConfigError(f"invalid progress: {progress!r} must be True, False or None (on a terminal)",
                              field="progress")
        return progress
    text = os.environ.get("TENSORSTREAM_PROGRESS", "").strip().lower()
    if text in ("0", "false", "off"):
        return False
    if text in ("1", "true", "on"):
        return True
    if text:
        raise ConfigError(f"invalid TENSORSTREAM_PROGRESS: {text!r} is not one of 1, 0, true, false, on, off",
                          field="TENSORSTREAM_PROGRESS")
    return sys.stderr is not None and hasattr(sys.stderr, "isatty") and sys.stderr.isatty()


class WriteProgress:
    """Bytes written so far, shown by tqdm when enabled; a no-op otherwise. ``total``: bytes, when known."""

    def __init__(self, enabled: bool, total: Optional[int], description: str) -> None:
        self._bar: Any = None
        if not enabled:
            return
        try:
            from tqdm.auto import tqdm
        except ImportError:  # pragma: no cover - tqdm is a dependency of the hf/all extras, not of the core
            return
        self._bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1000, desc=description,
                         delay=DELAY_S, mininterval=REDRAW_S, dynamic_ncols=True, leave=False, file=sys.stderr)

    def tensor_written(self, name: str, nbytes: int) -> None:
        if self._bar is not None:
            self._bar.set_postfix_str(name, refresh=False)
            self._bar.update(nbytes)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> "WriteProgress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
