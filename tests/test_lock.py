"""lock.py: a folder's lock is taken, refused while its owner lives, taken over once it is gone (a dead process on
this host, a lock another host stopped refreshing), by one job only, and released however the job ends."""
import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

import lock


def write_lock(folder, age=0.0, **owner):
    """A lock file in folder as another job would leave it, last touched `age` seconds ago."""
    folder.mkdir(exist_ok=True)
    record = {"job": "train.py", "host": socket.gethostname(), "pid": 1, "start": None, "since": "then",
              "token": "theirs", **owner}
    path = folder / lock.FILE
    path.write_text(json.dumps(record))
    os.utime(path, (time.time() - age, time.time() - age))
    return path


def exited_pid():
    """The pid of a process that has exited (and been collected)."""
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_hold_makes_the_folder_records_the_owner_and_releases_on_every_exit(tmp_path):
    folder = tmp_path / "a" / "run"
    with lock.hold(folder, job="train.py") as path:
        owner = json.loads(open(path).read())
        assert path == str(folder / lock.FILE)
        assert (owner["job"], owner["host"], owner["pid"]) == ("train.py", socket.gethostname(), os.getpid())
        assert owner["start"] == lock.process_start(os.getpid()) and owner["since"]
    assert os.listdir(folder) == []
    with pytest.raises(KeyboardInterrupt):  # an error or Ctrl-C inside the block releases it too
        with lock.hold(folder, job="train.py"):
            raise KeyboardInterrupt
    assert os.listdir(folder) == []


def test_a_live_owner_is_refused_in_one_line(tmp_path):
    with lock.hold(tmp_path, job="train.py"):  # this process: alive
        with pytest.raises(lock.Held) as e:
            lock.acquire(tmp_path, "train.py")
    message = str(e.value)
    assert "\n" not in message and f"{tmp_path} is in use by a live job (train.py, pid {os.getpid()} on host " \
        f"{socket.gethostname()}, since " in message and "wait for it to end or stop it" in message
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:  # another live process of this host
        write_lock(tmp_path, age=3600, pid=sleeper.pid, start=lock.process_start(sleeper.pid))
        with pytest.raises(lock.Held, match=f"pid {sleeper.pid} on host"):
            lock.acquire(tmp_path, "sample.py")
    finally:
        sleeper.kill()
        sleeper.wait()
    # a job of another host that refreshes its lock
    write_lock(tmp_path, age=lock.STALE_S / 2, host="elsewhere", pid=os.getpid())
    with pytest.raises(lock.Held, match="pid .* on host elsewhere"):
        lock.acquire(tmp_path, "train.py")


def test_a_dead_owner_on_this_host_is_taken_over_with_a_line(tmp_path, capsys):
    pid = exited_pid()
    path = write_lock(tmp_path, pid=pid, since="2025-01-01 12:00:00")
    with lock.hold(tmp_path, job="train.py"):
        assert json.loads(path.read_text())["pid"] == os.getpid()
    assert capsys.readouterr().out == (f"{tmp_path}: took over the lock of a job that is gone (train.py, pid {pid} "
                                       f"on host {socket.gethostname()}, since 2025-01-01 12:00:00; its process "
                                       f"has exited)\n")


def test_a_reused_pid_is_not_the_owner(tmp_path, capsys):
    # the owner's pid now belongs to another process (here: this one), which started at another time
    write_lock(tmp_path, pid=os.getpid(), start=lock.process_start(os.getpid()) - 1)
    with lock.hold(tmp_path, job="train.py"):
        pass
    assert "its process has exited" in capsys.readouterr().out


def test_another_hosts_lock_is_stale_once_not_refreshed(tmp_path, capsys):
    write_lock(tmp_path, age=lock.STALE_S + 60, host="elsewhere", pid=os.getpid())
    with lock.hold(tmp_path, job="train.py"):
        pass
    out = capsys.readouterr().out
    assert "(train.py, pid" in out and "on host elsewhere" in out
    assert f"its lock was last refreshed 180 s ago, over {lock.STALE_S} s" in out


def test_of_jobs_racing_for_a_stale_lock_one_wins(tmp_path):
    write_lock(tmp_path, pid=exited_pid())
    found = lock.owner_of(tmp_path / lock.FILE)
    mine, yours = {"token": "mine"}, {"token": "yours"}
    assert lock.take_over(str(tmp_path / lock.FILE), found, mine)
    assert not lock.take_over(str(tmp_path / lock.FILE), found, yours)  # judged the same stale lock: too late
    assert lock.owner_of(tmp_path / lock.FILE)[0] == mine
    # threads that judge one stale lock at once: one takes it, the others find it held by a live job
    write_lock(tmp_path, pid=exited_pid())
    start, results = threading.Barrier(8), []

    def contender():
        start.wait()
        try:
            results.append(lock.acquire(tmp_path, "train.py")[1]["token"])
        except lock.Held as e:
            results.append(e)
    threads = [threading.Thread(target=contender) for _ in range(8)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    winners = [r for r in results if isinstance(r, str)]
    assert len(winners) == 1 and lock.owner_of(tmp_path / lock.FILE)[0]["token"] == winners[0]
    assert not any(name.endswith(".takeover") for name in os.listdir(tmp_path))


def test_the_owner_refreshes_its_lock_and_never_removes_anothers(tmp_path, monkeypatch):
    monkeypatch.setattr(lock, "HEARTBEAT_S", 0.05)
    with lock.hold(tmp_path, job="train.py") as path:
        os.utime(path, (0, 0))
        time.sleep(0.5)
        assert time.time() - os.path.getmtime(path) < 5  # touched again by the heartbeat
        write_lock(tmp_path, host="elsewhere")  # taken over meanwhile (this host seemed gone)
    assert json.loads(open(path).read())["host"] == "elsewhere"  # the new owner's lock stays


def test_a_job_that_waits_gets_the_lock_once_the_live_owner_ends(tmp_path, capsys):
    held, released = threading.Event(), []

    def owner():  # another job of this process, done in 0.3 s
        with lock.hold(tmp_path, job="train.py"):
            held.set()
            time.sleep(0.3)
        released.append(time.time())
    t = threading.Thread(target=owner)
    t.start()
    held.wait()
    with lock.hold(tmp_path, job="train.py", wait=True):
        assert released and time.time() >= released[0]
    t.join()
    out = capsys.readouterr().out
    assert f"{tmp_path} is in use by a live job (train.py, pid {os.getpid()} on host" in out
    assert out.endswith("): waiting for it to end\n")
