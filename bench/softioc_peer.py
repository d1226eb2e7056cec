"""A pythonSoftIOC (EPICS base records) as the reference the gateway is compared against:
the bench's latency peer (records made with softioc's builder, one per gateway PV), or,
given a database file, that file's records (``db/apsdm.db`` in tests/test_differential.py).

Usage: ``python -m bench.softioc_peer PREFIX [DATABASE]``; prints READY once serving.
"""

from __future__ import annotations

import sys

from softioc import asyncio_dispatcher, builder, softioc

from apsdm.gateway.schema import Kind, Layout, build


def build_records(prefix: str) -> None:
    """One softioc-builder record per CA PV of the gateway, of the same kind."""
    builder.SetDeviceName(prefix.rstrip(":"))
    for pv in build(Layout(prefix)):
        f, name = pv.field, pv.name[len(prefix):]
        if f.pva_only:
            continue
        if f.kind is Kind.LONGSTRING:
            (builder.longStringOut if f.writable else builder.longStringIn)(name, length=4096)
        elif f.kind is Kind.STRING:
            (builder.stringOut if f.writable else builder.stringIn)(name)
        elif f.kind is Kind.LONG:
            builder.longIn(name)
        elif f.kind is Kind.DOUBLE:
            builder.aIn(name)
        else:
            (builder.mbbOut if f.writable else builder.mbbIn)(name, *f.enums)
    builder.LoadDatabase()


def main() -> None:
    prefix, database = sys.argv[1], sys.argv[2:3]
    if database:
        softioc.dbLoadDatabase(database[0], substitutions=f"P={prefix}")
    else:
        build_records(prefix)
    softioc.iocInit(asyncio_dispatcher.AsyncioDispatcher())
    print("READY", flush=True)
    softioc.non_interactive_ioc()


if __name__ == "__main__":
    main()
