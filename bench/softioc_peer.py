"""A pythonSoftIOC (EPICS base records) serving as many records as the gateway, with the
same kinds, as the reference the gateway's CA/PVA latency is compared against."""

from __future__ import annotations

import sys

from softioc import asyncio_dispatcher, builder, softioc

from apsdm.gateway.schema import Kind, Layout, build


def main() -> None:
    prefix = sys.argv[1]
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
    softioc.iocInit(asyncio_dispatcher.AsyncioDispatcher())
    print("READY", flush=True)
    softioc.non_interactive_ioc()


if __name__ == "__main__":
    main()
