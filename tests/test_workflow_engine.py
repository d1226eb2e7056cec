"""The embedded DM service's processing-job engine, with real /bin/sh child processes."""

from __future__ import annotations

import asyncio
import copy
import json
import re
import time
import uuid
from pathlib import Path
from typing import Any

import psutil
import pytest

from apsdm.dm.errors import InvalidArgument
from apsdm.dmserver.workflow.conditions import evaluate_condition
from apsdm.dmserver.workflow.jobs import interrupted, new_job
from apsdm.dmserver.workflow.runner import INVALID_FILE_SPEC, OUTPUT_CAP, JobRunner
from apsdm.dmserver.workflow.spec import validate_workflow

pytestmark = pytest.mark.timeout(30)


def workflow(**stages: dict[str, Any]) -> dict[str, Any]:
    """A workflow whose stage keys are given with '_' for '-' (01_A -> 01-A)."""
    return {
        "name": "wf",
        "owner": "user1",
        "stages": {key.replace("_", "-"): stage for key, stage in stages.items()},
    }


def run_job(
    tmp_path: Path, wf: dict[str, Any], args: dict[str, Any] | None = None, **kw: Any
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Create and run a job to its end; return it and a snapshot per on_update call."""
    job = new_job(wf, "user1", args or {})
    snapshots: list[dict[str, Any]] = []
    runner = JobRunner(job, lambda j: snapshots.append(copy.deepcopy(j)), tmp_path / "work", **kw)
    asyncio.run(runner.run())
    return job, snapshots


def children(job: dict[str, Any], stage: str) -> list[dict[str, Any]]:
    return list(job["workflow"]["stages"][stage]["childProcesses"].values())


# ---------------------------------------------------------------- definitions and records


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ([], "dictionary"),
        ({"owner": "u", "stages": {"a": {"command": "true"}}}, "name"),
        ({"name": " ", "owner": "u", "stages": {"a": {"command": "true"}}}, "name"),
        ({"name": "w", "stages": {"a": {"command": "true"}}}, "owner"),
        ({"name": "w", "owner": "u"}, "stages"),
        ({"name": "w", "owner": "u", "stages": {}}, "stages"),
        ({"name": "w", "owner": "u", "stages": {"a": {}}}, "command"),
        ({"name": "w", "owner": "u", "stages": {"a": {"command": 5}}}, "command"),
        ({"name": "w", "owner": "u", "stages": {"workflow": {"command": "true"}}}, "reserved"),
        (workflow(a={"command": "true", "outputVariableRegexList": "(?P<x>.*)"}), "list"),
        (workflow(a={"command": "true", "outputVariableRegexList": ["(?P<x>"]}), "regex"),
        (workflow(a={"command": "true", "outputVariableRegexList": ["(?P<status>.*)"]}), "status"),
        (workflow(a={"command": "true", "repeatUntil": "$n > 1"}), "together"),
        (
            workflow(a={"command": "t", "repeatUntil": "1", "repeatPeriod": "x", "maxRepeats": 2}),
            "repeatPeriod",
        ),
        (
            workflow(a={"command": "t", "repeatUntil": "1", "repeatPeriod": 1, "maxRepeats": 0}),
            "maxRepeats",
        ),
        (
            workflow(a={"command": "t", "repeatUntil": 1, "repeatPeriod": 1, "maxRepeats": 2}),
            "repeatUntil",
        ),
        (
            workflow(
                a={
                    "command": "t",
                    "repeatUntil": "__import__('os').system('touch X')",
                    "repeatPeriod": 1,
                    "maxRepeats": 2,
                }
            ),
            "Call",
        ),
        (workflow(a={"command": "true", "parallelExec": "maybe"}), "parallelExec"),
    ],
)
def test_validate_workflow_rejects(bad: Any, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        validate_workflow(bad)


def test_validate_workflow_normalizes_a_copy() -> None:
    wf = workflow(
        b={"command": "true", "parallelExec": "false"},
        a={"command": "x", "repeatUntil": "$n >= 3", "repeatPeriod": "0.5", "maxRepeats": "4"},
    )
    wf["name"] = " wf "
    out = validate_workflow(wf)
    assert out["name"] == "wf"
    assert out["stages"]["b"]["parallelExec"] is False
    assert (out["stages"]["a"]["repeatPeriod"], out["stages"]["a"]["maxRepeats"]) == (0.5, 4)
    assert wf["stages"]["b"]["parallelExec"] == "false"  # the input is untouched


def test_new_job_is_dm_pending_record() -> None:
    wf = workflow(a={"command": "echo $x"})
    job = new_job(wf, "user1", {"x": "1", "n": 2, "flag": True, "filePathList": ["/a", "/b"]})
    assert uuid.UUID(job["id"]).version == 4
    assert (job["owner"], job["status"], job["countFiles"]) == ("user1", "pending", 2)
    assert (job["x"], job["n"], job["flag"]) == ("1", 2, True)
    assert abs(job["submissionTime"] - time.time()) < 5
    assert re.fullmatch(r"\d{4}/\d\d/\d\d \d\d:\d\d:\d\d \S+", job["submissionTimestamp"])
    assert job["workflow"] == wf and job["workflow"] is not wf
    assert new_job(wf, "u", {"filePathList": "/a, /b,/c"})["countFiles"] == 3
    assert new_job(wf, "u", {"filePath": "/a"}, job_id="j1")["id"] == "j1"
    for bad in ({"status": "x"}, {"workflow": "x"}, {"x": None}, {"x": [1]}, {"a-b": "1"}):
        with pytest.raises(InvalidArgument):
            new_job(wf, "user1", bad)
    with pytest.raises(InvalidArgument):
        new_job(wf, "user1", "x=1")  # type: ignore[arg-type]


def test_interrupted_fails_open_job_and_children() -> None:
    job = new_job(workflow(a={"command": "true"}), "u", {})
    job.update(status="running", startTime=time.time() - 3)
    stage = job["workflow"]["stages"]["a"]
    stage["childProcesses"] = {"0": {"status": "running", "startTime": time.time() - 2}}
    assert interrupted(job, "service restarted") is job
    assert (job["status"], job["errorMessage"]) == ("failed", "service restarted")
    assert job["runTime"] >= 3 and job["endTimestamp"]
    assert stage["childProcesses"]["0"]["status"] == "failed"
    assert (stage["nRunningChildProcesses"], stage["nFailedChildProcesses"]) == (0, 1)
    done = {"status": "done", "workflow": {"stages": {}}}
    assert interrupted(done, "x") == {"status": "done", "workflow": {"stages": {}}}


def test_condition_evaluation_is_safe_and_typed() -> None:
    values = {"count": "3", "target": "3", "name": 'a" or "1'}
    assert evaluate_condition('"$count" == "$target"', values)
    assert evaluate_condition("$count >= 3 and not $count > 5", values)
    assert evaluate_condition("-$count < 0 < ${count}", values)
    assert not evaluate_condition('"$name" == "a"', values)  # a value never becomes syntax
    assert evaluate_condition('"$nope" == "$" "nope"', values)  # unknown: stays literal
    with pytest.raises(InvalidArgument, match="unknown variable"):
        evaluate_condition("$nope > 1", values)
    assert evaluate_condition('"__dmv_7__" == "__dmv_" "7__"', values)  # not a placeholder
    for unsafe in ("$count.__class__", "__dmv_0__ == 1", "open('x')", "[1] == [1]"):
        with pytest.raises(InvalidArgument):
            evaluate_condition(unsafe, values)


# ---------------------------------------------------------------- running jobs


def test_three_stages_pass_output_variable_to_later_stage(tmp_path: Path) -> None:
    wf = workflow(
        **{
            "03_USE": {"command": "echo stamp=$timeStamp by $owner in $stage"},
            "01_START": {
                "command": "/bin/date +%Y%m%d%H%M%S",
                "outputVariableRegexList": ["(?P<timeStamp>.*)"],
            },
            "02_MKDIR": {"command": "/bin/mkdir -p out.$timeStamp && echo made"},
        }
    )
    job, snapshots = run_job(tmp_path, wf)
    assert job["status"] == "done", job.get("errorMessage")
    stamp = job["timeStamp"]
    assert re.fullmatch(r"\d{14}", stamp)
    assert (tmp_path / "work" / f"out.{stamp}").is_dir()
    (use,) = children(job, "03-USE")
    assert use["stdOut"] == f"stamp={stamp} by user1 in 03-USE\n"
    assert use["command"] == f"echo stamp={stamp} by user1 in 03-USE"
    assert (use["childProcessNumber"], use["exitStatus"], use["stageId"]) == (2, 0, "03-USE")
    assert sorted(job["workflow"]["stages"]["01-START"]["childProcesses"]) == ["0"]
    assert job["stage"] == "03-USE" and job["runTime"] > 0 and job["endTimestamp"]
    stage = job["workflow"]["stages"]["02-MKDIR"]
    assert (stage["nCompletedChildProcesses"], stage["nFailedChildProcesses"]) == (1, 0)
    assert [s["status"] for s in snapshots[:1]] == ["running"]
    seen = [(s.get("stage"), s["status"]) for s in snapshots]
    assert seen.index(("01-START", "running")) < seen.index(("03-USE", "running"))
    assert snapshots[-1] == job
    assert json.loads(json.dumps(job)) == job  # the store keeps it as JSON


def test_failing_on_update_does_not_stop_the_job(tmp_path: Path) -> None:
    def broken(_job: dict[str, Any]) -> None:
        raise OSError("disk full")

    job = new_job(workflow(a={"command": "echo ok"}), "user1", {})
    asyncio.run(JobRunner(job, broken, tmp_path).run())
    assert job["status"] == "done" and children(job, "a")[0]["stdOut"] == "ok\n"


def test_failing_stage_fails_job_with_stderr(tmp_path: Path) -> None:
    wf = workflow(
        **{
            "01_OK": {"command": "echo fine"},
            "02_BAD": {"command": "echo partial; echo 'disk on fire' >&2; exit 3"},
            "03_NEVER": {"command": "touch never"},
        }
    )
    job, _ = run_job(tmp_path, wf)
    assert job["status"] == "failed"
    assert job["errorMessage"] == "Stage 02-BAD failed: exit status 3: disk on fire"
    (bad,) = children(job, "02-BAD")
    assert (bad["status"], bad["exitStatus"], bad["stdOut"]) == ("failed", 3, "partial\n")
    assert children(job, "03-NEVER") == []
    assert not (tmp_path / "work" / "never").exists()

    job, _ = run_job(tmp_path, workflow(a={"command": "no-such-program-xyz --flag"}))
    assert job["status"] == "failed"
    assert job["errorMessage"].startswith("Stage a failed: exit status 127: ")
    assert "not found" in job["errorMessage"]


def test_values_cannot_inject_shell_commands(tmp_path: Path) -> None:
    args = {
        "x": "a; touch PWNED",
        "y": "$(touch PWNED2)",
        "z": "`touch PWNED3`",
        "q": "it's'; touch PWNED4; '",
    }
    wf = workflow(
        a={"command": 'echo $x $y "$z"'},
        b={"command": "echo '$q' && echo \"${q}\"", "workingDir": str(tmp_path)},
    )
    job, _ = run_job(tmp_path, wf, args)
    assert job["status"] == "done", job.get("errorMessage")
    assert children(job, "a")[0]["stdOut"] == "a; touch PWNED $(touch PWNED2) `touch PWNED3`\n"
    assert children(job, "a")[0]["command"] == f'echo {args["x"]} {args["y"]} "{args["z"]}"'
    assert children(job, "b")[0]["stdOut"] == f"{args['q']}\n{args['q']}\n"
    assert not list(tmp_path.rglob("PWNED*"))

    bad = workflow(a={"command": "echo $(( $n + 1 ))"})
    job, _ = run_job(tmp_path, bad, {"n": "a[$(touch PWNED5)]"})
    assert job["status"] == "failed" and "not an integer" in job["errorMessage"]
    job, _ = run_job(tmp_path, bad, {"n": 41})
    assert children(job, "a")[0]["stdOut"] == "42\n"
    assert not list(tmp_path.rglob("PWNED*"))


COUNTER = 'n=$(cat counter 2>/dev/null || echo 0); n=$((n + 1)); echo $n > counter; echo "count=$n"'


def test_repeat_until_counter_reaches_target(tmp_path: Path) -> None:
    wf = workflow(
        a={
            "command": COUNTER,
            "workingDir": str(tmp_path),
            "outputVariableRegexList": ["count=(?P<count>\\d+)"],
            "repeatUntil": '"$count" == "$target"',
            "repeatPeriod": 0.05,
            "maxRepeats": 10,
        },
        b={"command": "echo final $count"},
    )
    job, _ = run_job(tmp_path, wf, {"target": "3"})
    assert job["status"] == "done", job.get("errorMessage")
    assert job["count"] == "3"
    assert [c["childProcessNumber"] for c in children(job, "a")] == [0, 1, 2]
    assert children(job, "b")[0]["stdOut"] == "final 3\n"
    assert job["workflow"]["stages"]["a"]["nCompletedChildProcesses"] == 3


def test_max_repeats_exceeded_fails_stage(tmp_path: Path) -> None:
    wf = workflow(
        a={
            "command": COUNTER,
            "workingDir": str(tmp_path),
            "outputVariableRegexList": ["count=(?P<count>\\d+)"],
            "repeatUntil": "$count >= 100",
            "repeatPeriod": 0,
            "maxRepeats": 2,
        },
        b={"command": "touch never"},
    )
    job, _ = run_job(tmp_path, wf)
    assert job["status"] == "failed"
    assert job["errorMessage"].startswith("Stage a failed: repeatUntil")
    assert "maxRepeats 2" in job["errorMessage"]
    assert len(children(job, "a")) == 2 and children(job, "b") == []

    wf["stages"]["a"]["command"] = "exit 4"  # each repeat must succeed
    wf["stages"]["a"]["maxRepeats"] = 5
    job, _ = run_job(tmp_path, wf)
    assert job["errorMessage"] == "Stage a failed: exit status 4"
    assert len(children(job, "a")) == 1


def test_file_list_runs_children_in_parallel_then_sequentially(tmp_path: Path) -> None:
    files = []
    for i in range(3):
        path = tmp_path / f"f{i}.dat"
        path.write_text(f"data{i}\n")
        files.append(str(path))
    wf = workflow(
        a={"command": "sleep 0.5; cat $filePath"},
        b={"command": "echo $filePath", "parallelExec": False},
        c={"command": "echo once"},
    )
    started = time.monotonic()
    job, _ = run_job(tmp_path, wf, {"filePathList": files})
    assert time.monotonic() - started < 1.4  # three 0.5 s children overlapped
    assert job["status"] == "done", job.get("errorMessage")
    assert job["countFiles"] == 3
    stage_a = job["workflow"]["stages"]["a"]
    assert sorted(stage_a["childProcesses"]) == ["0", "1", "2"]
    assert sorted(c["stdOut"] for c in children(job, "a")) == ["data0\n", "data1\n", "data2\n"]
    assert stage_a["nCompletedChildProcesses"] == 3 and stage_a["nQueuedChildProcesses"] == 0
    seq = children(job, "b")
    assert [c["childProcessNumber"] for c in seq] == [3, 4, 5]
    assert [c["stdOut"] for c in seq] == [f"{f}\n" for f in files]
    assert all(seq[i]["startTime"] >= seq[i - 1]["endTime"] for i in (1, 2))
    assert [c["childProcessNumber"] for c in children(job, "c")] == [6]

    job, _ = run_job(tmp_path, wf, {"filePathList": ",".join(files)}, max_parallel=1)
    assert job["status"] == "done" and len(children(job, "a")) == 3


def test_file_path_without_file_spec_gives_dm_message(tmp_path: Path) -> None:
    wf = workflow(a={"command": "echo $filePathList"}, b={"command": "md5sum $filePath"})
    job, _ = run_job(tmp_path, wf, {"filePathList": "[]"})
    assert (job["status"], job["errorMessage"]) == ("failed", INVALID_FILE_SPEC)
    job, _ = run_job(tmp_path, wf)
    assert (job["status"], job["errorMessage"]) == ("failed", INVALID_FILE_SPEC)
    assert children(job, "b") == []
    single = tmp_path / "one.txt"
    single.write_text("x")
    job, _ = run_job(tmp_path, wf, {"filePath": str(single)})
    assert job["status"] == "done" and job["countFiles"] == 1


def test_working_dir_and_output_cap(tmp_path: Path) -> None:
    (tmp_path / "exp1").mkdir()
    wf = workflow(
        a={"command": "pwd; head -c 200000 /dev/zero | tr '\\0' a", "workingDir": "$exp"},
        b={"command": "true", "workingDir": "missing-dir"},
    )
    job, _ = run_job(tmp_path, wf, {"exp": str(tmp_path / "exp1")})
    (child,) = children(job, "a")
    assert child["workingDir"] == str(tmp_path / "exp1")
    assert len(child["stdOut"]) == OUTPUT_CAP and set(child["stdOut"]) == {"a"}
    assert job["status"] == "failed" and "No such working directory" in job["errorMessage"]
    assert (tmp_path / "work").is_dir()


def test_cancel_kills_children_and_aborts_job(tmp_path: Path) -> None:
    wf = workflow(a={"command": "sleep 100 & echo $! > bg.pid; echo $$ > sh.pid; wait"})
    job = new_job(wf, "user1", {})
    work = tmp_path / "work"

    async def main() -> None:
        task = asyncio.create_task(JobRunner(job, lambda j: None, work).run())
        for _ in range(200):
            if (work / "sh.pid").exists() and (work / "bg.pid").exists():
                break
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert (job["status"], job["errorMessage"]) == ("failed", "aborted")
    (child,) = children(job, "a")
    assert child["status"] == "failed" and child["exitStatus"] is not None
    for name in ("sh.pid", "bg.pid"):
        pid = int((work / name).read_text())
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and _alive(pid):
            time.sleep(0.05)
        assert not _alive(pid), f"{name} {pid} survived the abort"


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
