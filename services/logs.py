"""Logger names and the one function entry points call to configure logging.

Every component logs under the root `cdcload`; modules never add handlers.
"""

from __future__ import annotations

import logging

ROOT = "cdcload"


def get(component: str) -> logging.Logger:
    """Return the logger of a component, such as `pool` or `cdc`."""
    return logging.getLogger(f"{ROOT}.{component}")


def configure(level: str = "INFO") -> None:
    """Send log records to stderr, once; for the CLI entry points, not for Locust.

    Locust configures its own handlers; its processes must not call this.
    """
    root = logging.getLogger()
    if root.handlers:
        return
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
