"""miselbo.pipeline.parallel_stages: side-by-side stages, their failures and signals, with stand-in children
(small Python scripts instead of train.py, so each test takes a few seconds)."""
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from miselbo.pipeline import parallel_stages
from miselbo.pipeline.parallel_stages import StageJob, StagesFailed, StagesStopped, run_in_parallel

# A stand-in for train.py: argv = [name, seconds, exit code]; logs start/end times, the thread
# count it was given and the signals it receives (SIGTERM / SIGINT: "stop after the step", exit 128 + n).
CHILD = textwrap.dedent("""
    import os, signal, sys, time
    name, seconds, code = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
    def stop(number, frame):
        print(f"{name} got {signal.Signals(number).name}", flush=True)
        sys.exit(128 + number)
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(f"{name} start {time.time()} threads {os.environ.get('OMP_NUM_THREADS')}", flush=True)
    for epoch in range(1, 3):
        time.sleep(seconds / 2)
        print(f"epoch {epoch}/2 done", flush=True)
    print(f"{name} end {time.time()}", flush=True)
    sys.exit(code)
""")


@pytest.fixture
def stand_in(monkeypatch):
    monkeypatch.setattr(parallel_stages, "TRAIN_COMMAND", (sys.executable, "-c", CHILD))


def _jobs(tmp_path, *specs):
    return [StageJob(name, [name, str(seconds), str(code)], tmp_path / "logs" / f"{name}.log")
            for name, seconds, code in specs]


def _times(job):
    words = {line.split()[1]: float(line.split()[2]) for line in job.log.read_text().splitlines()
             if line.startswith(job.name + " ") and line.split()[1:2] in (["start"], ["end"])}
    return words["start"], words["end"]


def test_two_stages_run_side_by_side_and_one_at_a_time_with_width_one(tmp_path, stand_in):
    seen = []
    ended = run_in_parallel(_jobs(tmp_path, ("q2", 1.0, 0), ("q3", 1.0, 0)), 2, on_progress=seen.append)
    (start2, end2), (start3, end3) = (_times(job) for job in sorted(ended, key=lambda job: job.name))
    assert start3 < end2 and start2 < end3  # they overlapped
    assert {job.exit_code for job in ended} == {0} and all(job.seconds > 0.9 for job in ended)
    assert seen[-1] == {"q2": 2, "q3": 2}  # epochs done, read from the logs
    threads = str(parallel_stages.threads_per_child(2))
    assert f"threads {threads}" in ended[0].log.read_text()
    ended = run_in_parallel(_jobs(tmp_path / "one", ("q2", 0.4, 0), ("q3", 0.4, 0)), 1)
    (start2, end2), (start3, end3) = (_times(job) for job in sorted(ended, key=lambda job: job.name))
    assert end2 <= start3  # one after another


def test_a_failed_stage_is_named_with_its_log_and_the_others_finish(tmp_path, stand_in):
    jobs = _jobs(tmp_path, ("q2", 0.2, 3), ("q3", 1.0, 0))
    with pytest.raises(StagesFailed, match=r"stage q2 failed \(exit 3\)") as failure:
        run_in_parallel(jobs, 2)
    assert "q2 end" in str(failure.value)  # the end of its log
    assert jobs[1].exit_code == 0 and "q3 end" in jobs[1].log.read_text()


PARENT = textwrap.dedent("""
    import sys
    from pathlib import Path
    from miselbo.pipeline import parallel_stages
    parallel_stages.TRAIN_COMMAND = (sys.executable, "-c", sys.argv[2])
    folder = Path(sys.argv[1])
    jobs = [parallel_stages.StageJob(name, [name, "30", "0"], folder / f"{name}.log") for name in ("q2", "q3", "q4")]
    try:
        parallel_stages.run_in_parallel(jobs, int(sys.argv[3]))
    except parallel_stages.StagesStopped as stopped:
        print("STOPPED", stopped.exit_code, stopped, flush=True)
""")


def _start_parent(tmp_path, width: int) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, "-c", PARENT, str(tmp_path), CHILD, str(width)],
                               stdout=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not all((tmp_path / f"q{k}.log").is_file() and f"q{k} start " in (tmp_path / f"q{k}.log").read_text()
                  for k in range(2, 2 + width)):
        assert time.monotonic() < deadline, "the stand-in children did not start"
        time.sleep(0.1)
    return process


def test_sigterm_reaches_every_running_stage_and_starts_no_more(tmp_path):
    parent = _start_parent(tmp_path, 2)
    parent.send_signal(signal.SIGTERM)
    out, _ = parent.communicate(timeout=60)
    assert "STOPPED 143" in out and "stopped q2, q3" in out and "not started: q4" in out
    for name in ("q2", "q3"):
        assert f"{name} got SIGTERM" in (tmp_path / f"{name}.log").read_text()
    assert not (tmp_path / "q4.log").exists()


def test_a_killed_parent_takes_its_training_children_down(tmp_path):
    """PR_SET_PDEATHSIG (Linux): the child started through miselbo.training.__main__'s guard gets
    SIGTERM when its parent dies by SIGKILL."""
    if not sys.platform.startswith("linux"):
        pytest.skip("parent-death signal is Linux-only")
    guarded = "from miselbo.training.__main__ import _follow_parent\n_follow_parent()\n" + CHILD
    parent = subprocess.Popen([sys.executable, "-c", PARENT, str(tmp_path), guarded, "1"],
                              stdout=subprocess.DEVNULL)
    log = tmp_path / "q2.log"
    deadline = time.monotonic() + 60
    while not (log.is_file() and "q2 start " in log.read_text()):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait(timeout=30)
    deadline = time.monotonic() + 30
    while "q2 got SIGTERM" not in log.read_text():
        assert time.monotonic() < deadline, "the orphaned child kept running"
        time.sleep(0.1)
