"""The worker supervision that fuzz_gguf.py and fuzz_templates.py share.

A worker process runs a list of cases one after another under a memory limit, printing one
JSON line `{"start": key}` before each case and one with `"end": key` (and the fuzzer's own
fields) after it. `supervise` watches it: a case that makes the worker die or go silent for
`timeout` seconds is charged with that, and a new worker takes the cases still to run.
"""

from __future__ import annotations

import json
import os
import resource
import select
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

MEMORY_LIMIT = 4 << 30  # RLIMIT_AS of a worker


def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


@dataclass
class Ended:
    """A case the worker finished: its JSON line, and the seconds since its start line."""

    msg: dict
    seconds: float


@dataclass
class Failed:
    """A case that killed or hung its worker (or a worker that failed after its last case)."""

    key: str
    outcome: str
    detail: str


def supervise(command: Callable[[list[str]], list[str]], keys: Sequence[str], timeout: float,
              worker_path: Sequence[str] = (), start_must_work: bool = False) -> Iterator[Ended | Failed]:
    """Run the cases `keys` in workers started as `command(keys still to run)`, in order.

    worker_path: directories put first on the workers' PYTHONPATH. start_must_work: a worker
    that exits with an error before any case has ended or been charged raises RuntimeError (its stderr), instead
    of charging the failure to the first case.
    """
    settled = 0  # cases ended or charged so far
    todo = list(keys)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if worker_path:
        env["PYTHONPATH"] = os.pathsep.join([*worker_path, env.get("PYTHONPATH", "")])
    last_ended: str | None = None
    while todo:
        proc = subprocess.Popen(command(todo), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                preexec_fn=_limit_memory, env=env, text=True)
        running, started = None, time.monotonic()
        deadline = time.monotonic() + timeout + 30  # the first case also pays for the imports
        hung = False
        while True:
            ready, _, _ = select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                hung = True
                proc.kill()
                break
            line = proc.stdout.readline()
            if not line:
                break
            msg = json.loads(line)
            if "start" in msg:
                running, started = msg["start"], time.monotonic()
                deadline = started + timeout
            else:
                yield Ended(msg, time.monotonic() - started)
                settled += 1
                todo.remove(msg["end"])
                last_ended, running = msg["end"], None
        proc.wait()
        stderr = proc.stderr.read()
        if running is None and not todo:
            if proc.returncode or "Traceback" in stderr:
                yield Failed(last_ended or "?", f"worker exit {proc.returncode} after the last case", stderr[-500:])
            break
        if running is None:  # died before or between cases
            if start_must_work and not settled and not hung and proc.returncode:
                raise RuntimeError(f"the worker could not start: {stderr[-2000:]}")
            running = todo[0]
        todo.remove(running)
        settled += 1
        if hung:
            yield Failed(running, "hang", f"no answer in {timeout:.0f} s")
        elif proc.returncode < 0:
            yield Failed(running, f"signal {-proc.returncode}", stderr[-500:])
        else:
            yield Failed(running, f"exit {proc.returncode}", stderr[-500:])
