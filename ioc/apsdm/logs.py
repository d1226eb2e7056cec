"""Console logging for the gateway's programs: INFO for operators, traffic at DEBUG.

An operator's console shows start-up, READY, lost and regained connections, commands and
their outcomes. Per-request lines (the DM service's HTTP access log, httpx's request log)
are traffic: they show only with ``--log-level DEBUG``.
"""

from __future__ import annotations

import logging
import sys

#: loggers that write one line per request at INFO
TRAFFIC = ("apsdm.dmserver.access", "httpx", "httpcore")


def setup(level: str) -> None:
    """Log to stderr at ``level``; request traffic only when that level is DEBUG."""
    logging.basicConfig(level=level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    traffic = logging.DEBUG if level == "DEBUG" else logging.WARNING
    for name in TRAFFIC:
        logging.getLogger(name).setLevel(traffic)
