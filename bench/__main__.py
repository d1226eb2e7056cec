"""Run every benchmark: ``python -m bench [name ...]``."""

from __future__ import annotations

import sys

from . import dm_copy, ioc_latency, stream

BENCHES = {"dm_copy": dm_copy.main, "ioc_latency": ioc_latency.main, "stream": stream.main}

for name in sys.argv[1:] or list(BENCHES):
    BENCHES[name]()
