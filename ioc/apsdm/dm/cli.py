"""``apsdm``: a DM command-line client like DM's own tools, for production and the
embedded service alike. Output is ``key=value`` lines; failures exit non-zero with one line.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .client import DmClient
from .config import DmConfig
from .errors import DmError
from .records import Esaf, Proposal

SHOWN = {
    "experiment": ("id", "name", "stationName", "description", "storageDirectory", "dataDirectory"),
    "daq": ("id", "experimentName", "dataDirectory", "destDirectory", "status", "nFiles",
            "nProcessedFiles", "nProcessingErrors", "percentageComplete"),
    "workflow": ("id", "name", "owner", "description"),
    "job": ("id", "owner", "status", "stage", "runTime", "errorMessage"),
    # typed ESAF and proposal fields (DM's own keys differ between the two)
    "esaf": ("id", "title", "status", "start", "end", "pi"),
    "proposal": ("id", "title", "run", "start", "end", "pi"),
}


def _line(d: dict[str, Any], keys: Iterable[str]) -> str:
    return " ".join(f"{k}={d[k]}" for k in keys if k in d and d[k] not in (None, ""))


def _record_line(record: Esaf | Proposal, kind: str, users: bool = False) -> str:
    """An ESAF or proposal as ``key=value`` pairs of its typed fields (users if asked)."""
    values = {k: getattr(record, k) for k in SHOWN[kind]}
    if users:
        values["users"] = "; ".join(record.users)
    return _line(values, values)


def _key_values(pairs: list[str]) -> dict[str, str]:
    """``key=value`` (or DM's ``key:value``) arguments as a dict."""
    out = {}
    for pair in pairs:
        for sep in ("=", ":"):
            key, found, value = pair.partition(sep)
            if found and key:
                out[key] = value
                break
        else:
            raise SystemExit(f"error: argument {pair!r} is not key=value")
    return out


def demo_workflows() -> list[Path]:
    """The demo workflow definitions packaged with the bluesky plans (``apsdm_ophyd/workflows``),
    found without importing that package (it needs the ``[bluesky]`` extra)."""
    spec = importlib.util.find_spec("apsdm_ophyd")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("the demo workflows come with apsdm_ophyd, which is not installed")
    folder = Path(next(iter(spec.submodule_search_locations))) / "workflows"
    return sorted(folder.glob("*.json"))


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="apsdm", description=__doc__)
    ap.add_argument("--url", help="base URL of all DM services (default: DM_* environment)")
    ap.add_argument("--setup", default="", help="dm.setup.sh to read DM_* settings from")
    ap.add_argument("--login-file", default="", help="user|password file (with --url)")
    ap.add_argument("--station", default="", help="station name (with --url)")
    sub = ap.add_subparsers(dest="command", required=True)
    s = sub.add_parser("add-experiment", help="create an experiment")
    s.add_argument("--experiment", required=True)
    s.add_argument("--type", default="TEST")
    s.add_argument("--description", default="")
    sub.add_parser("list-experiments", help="experiments of the station")
    s = sub.add_parser("get-experiment", help="one experiment")
    s.add_argument("--experiment", required=True)
    for name, text in (("start-daq", "start a DAQ"), ("stop-daq", "stop a DAQ"),
                       ("upload", "upload a directory (or one file of it)")):
        s = sub.add_parser(name, help=text)
        s.add_argument("--experiment", required=True)
        s.add_argument("--data-directory", required=True)
        if name != "stop-daq":
            s.add_argument("--dest-directory", default="")
        if name == "upload":
            s.add_argument("--directory-mode", action="store_true",
                           help="one transfer of the whole directory")
            s.add_argument("--file", default="", help="only this file, relative to the directory")
    sub.add_parser("list-daqs", help="all DAQs")
    sub.add_parser("list-uploads", help="all uploads")
    s = sub.add_parser("add-workflow", help="add or update a workflow from a JSON file, "
                                            "or the demo workflows of the bluesky plans")
    which = s.add_mutually_exclusive_group(required=True)
    which.add_argument("--file", type=Path)
    which.add_argument("--demo", action="store_true",
                       help="every demo workflow packaged with apsdm_ophyd (apsdm-files-demo, …)")
    sub.add_parser("list-workflows", help="workflows of the DM user")
    s = sub.add_parser("start-processing-job", help="start a job: key=value arguments")
    s.add_argument("--workflow-name", required=True)
    s.add_argument("--workflow-owner", default="")
    s.add_argument("args", nargs="*", metavar="key=value")
    s = sub.add_parser("get-processing-job", help="one job")
    s.add_argument("--id", required=True)
    s.add_argument("--all", action="store_true", help="print the whole job as JSON")
    sub.add_parser("list-processing-jobs", help="jobs of the DM user")
    s = sub.add_parser("list-esafs", help="ESAFs of the station (APS DB service)")
    s.add_argument("--beamline", default="", help="only this beamline, e.g. 25-ID-C")
    s.add_argument("--year", default="", help="only ESAFs starting in this year")
    s = sub.add_parser("get-esaf", help="one ESAF, with its users")
    s.add_argument("--id", required=True)
    s = sub.add_parser("list-proposals", help="beamtime proposals of the station")
    s.add_argument("--beamline", default="", help="only this beamline, e.g. 25-ID-C")
    s.add_argument("--run", default="", help="only this run, e.g. 2026-1")
    s = sub.add_parser("get-proposal", help="one proposal, with its experimenters")
    s.add_argument("--id", required=True)
    s.add_argument("--run", default="", help="the run to look in")
    return ap


async def run(args: argparse.Namespace) -> list[str]:
    if args.url:
        config = DmConfig.single_url(args.url, args.login_file, args.station)
    else:
        config = DmConfig.from_env(setup_file=args.setup)
    async with DmClient(config) as dm:
        c = args.command
        if c == "add-experiment":
            e = await dm.add_experiment(args.experiment, args.type, args.description)
            return [_line(e.raw, SHOWN["experiment"])]
        if c == "list-experiments":
            return [_line(e.raw, SHOWN["experiment"]) for e in await dm.list_experiments()]
        if c == "get-experiment":
            return [_line((await dm.get_experiment(args.experiment)).raw, SHOWN["experiment"])]
        if c == "start-daq":
            d = await dm.start_daq(args.experiment, args.data_directory,
                                   destDirectory=args.dest_directory)
            return [_line(d.raw, SHOWN["daq"])]
        if c == "stop-daq":
            return [_line((await dm.stop_daq(args.experiment, args.data_directory)).raw,
                          SHOWN["daq"])]
        if c == "upload":
            info: dict[str, Any] = {"destDirectory": args.dest_directory}
            if args.directory_mode:
                info["processingMode"] = "directory"
            if args.file:
                info["experimentFilePath"] = args.file
            u = await dm.upload(args.experiment, args.data_directory, **info)
            return [_line(u.raw, SHOWN["daq"])]
        if c in ("list-daqs", "list-uploads"):
            items = await (dm.list_daqs() if c == "list-daqs" else dm.list_uploads())
            return [_line(t.raw, SHOWN["daq"]) for t in items]
        if c == "add-workflow":
            files = demo_workflows() if args.demo else [args.file]
            return [_line((await dm.upsert_workflow(json.loads(f.read_text()))).raw,
                          SHOWN["workflow"]) for f in files]
        if c == "list-workflows":
            return [_line(w.raw, SHOWN["workflow"]) for w in await dm.list_workflows()]
        if c == "start-processing-job":
            j = await dm.start_processing_job(args.workflow_name, _key_values(args.args),
                                              owner=args.workflow_owner)
            return [_line(j.raw, SHOWN["job"])]
        if c == "get-processing-job":
            j = await dm.get_processing_job(args.id)
            return [json.dumps(j.raw, indent=1)] if args.all else [_line(j.raw, SHOWN["job"])]
        if c == "list-esafs":
            return [_record_line(e, "esaf") for e in await dm.list_esafs(args.beamline, args.year)]
        if c == "get-esaf":
            return [_record_line(await dm.get_esaf(args.id), "esaf", users=True)]
        if c == "list-proposals":
            return [_record_line(p, "proposal")
                    for p in await dm.list_proposals(args.beamline, args.run)]
        if c == "get-proposal":
            return [_record_line(await dm.get_proposal(args.id, args.run), "proposal", users=True)]
        return [_line(j.raw, SHOWN["job"]) for j in await dm.list_processing_jobs()]


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    try:
        lines = asyncio.run(run(args))
    except (DmError, OSError, ValueError) as exc:
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    for line in lines:
        print(line)


if __name__ == "__main__":
    main()
