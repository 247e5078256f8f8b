"""
A lock on a folder that one job owns (a training run's out_dir, a sampling job's output folder): a second
job started on it is refused in one line that names the live one, and a lock left by a job that died (kill -9,
a lost machine) is taken over with a line that says so.

    with lock.hold("out/run1", job="train.py"):  # makes the folder if needed
        ...                                       # the lock is released however the block ends

The lock is the file FILE in the folder, holding its owner in JSON: the job, the host, the pid, the process's
start time and since when. It is created with O_CREAT | O_EXCL, so that of two jobs that try at once one
creates it, and it works on a shared filesystem (NFS, Lustre): no flock, nothing in /tmp. While the job runs,
a thread touches the file every HEARTBEAT_S seconds. Its owner is gone when, on the same host, no process runs
with its pid and start time (a pid reused by a new process does not count), or, seen from another host, when
the file has not been touched for STALE_S seconds (the two hosts' clocks are trusted to agree that closely).
"""
import json
import os
import socket
import threading
import time
import uuid
from contextlib import contextmanager

FILE = "job.lock"
HEARTBEAT_S = 20  # seconds between touches of the lock file by its owner
STALE_S = 120     # seen from another host, a lock not touched for this long is stale: its owner is gone


class Held(OSError):
    """The folder is held by a live job."""


@contextmanager
def hold(folder, job, wait=False):
    """The lock of `folder` (made if missing) for this process while the block runs; Held if a live job has
    it, or with wait=True, the lock once that job has ended. job: this job's name in the other jobs' messages,
    e.g. "train.py"."""
    path, me = acquire(folder, job, wait)
    stop = threading.Event()
    threading.Thread(target=heartbeat, args=(path, me, stop), daemon=True).start()
    try:
        yield path
    finally:
        stop.set()
        if owner_of(path)[0].get("token") == me["token"]:  # never a lock another job has taken over
            discard(path)


def acquire(folder, job, wait=False):
    """(the lock's path, this job's record): the lock created, or taken over from a job that is gone."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, FILE)
    me = {"job": job, "host": socket.gethostname(), "pid": os.getpid(), "start": process_start(os.getpid()),
          "since": time.strftime("%Y-%m-%d %H:%M:%S"), "token": uuid.uuid4().hex}
    waiting, lost = False, 0  # said that it waits; takeovers another job won
    while lost < 20:  # each round ends with the lock, a live owner, or a lock that changed meanwhile
        if create(path, me):
            return path, me
        found = owner_of(path)
        if found[1] is None:  # released meanwhile
            continue
        owner, mtime = found
        reason = gone(owner, time.time() - mtime)
        if reason is None and not wait:
            raise Held(f"{folder} is in use by a live job ({describe(owner)}; its lock {path} was refreshed "
                       f"{time.time() - mtime:.0f} s ago): wait for it to end or stop it, or use another "
                       f"folder")
        if reason is None and not waiting:
            print(f"{folder} is in use by a live job ({describe(owner)}): waiting for it to end", flush=True)
            waiting = True
        if reason is not None and take_over(path, found, me):
            print(f"{folder}: took over the lock of a job that is gone ({describe(owner)}; {reason})",
                  flush=True)
            return path, me
        lost += reason is not None
        time.sleep(0.5 if reason is None else 0.1)
    raise Held(f"{folder}: its lock {path} keeps changing hands; try again")


def create(path, record):
    """Create the file `path` holding `record` unless it exists: whether this call created it."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        json.dump(record, f)
    return True


def owner_of(path):
    """(the record in a lock file, its mtime): ({}, mtime) while it cannot be read (a job has just created it
    and is writing it), ({}, None) when there is no lock file."""
    try:
        mtime = os.path.getmtime(path)
        with open(path) as f:
            record = json.load(f)
        return (record if isinstance(record, dict) else {}), mtime
    except FileNotFoundError:
        return {}, None
    except (OSError, ValueError):
        return {}, mtime


def gone(owner, age):
    """Why the owner of a lock is gone (for the takeover's line), or None while it may be alive."""
    if owner.get("host") == socket.gethostname() and isinstance(owner.get("pid"), int):
        return None if running(owner["pid"], owner.get("start")) else "its process has exited"
    if age > STALE_S:  # another host's job, or a lock never written: judged by its age alone
        return f"its lock was last refreshed {age:.0f} s ago, over {STALE_S} s"
    return None


def take_over(path, found, me):
    """Replace a gone owner's lock with this job's: whether it did. The lock is checked to be still the one
    judged (`found`: record and mtime) and replaced under a second lock file, which one job at a time can
    create: of two jobs that judge one stale lock at once, one replaces it, the other meets a live owner."""
    guard = path + ".takeover"
    if not create(guard, me):
        mtime = owner_of(guard)[1]
        if mtime is not None and time.time() - mtime > 10:  # its job died within a takeover
            discard(guard)
        return False
    try:
        if owner_of(path) != found:  # taken over or refreshed since it was judged: judge it again
            return False
        discard(path)
        return create(path, me)
    finally:
        discard(guard)


def discard(path):
    """Remove a file if it is there."""
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def heartbeat(path, me, stop):
    """Touch the lock every HEARTBEAT_S seconds while the job runs, so that other hosts see it is alive."""
    while not stop.wait(HEARTBEAT_S):
        owner = owner_of(path)[0]
        if owner.get("token") != me["token"]:
            print(f"warning: {path} is no longer this job's lock: {describe(owner)} took it over",
                  flush=True)
            return
        try:
            os.utime(path)
        except OSError:  # a filesystem that is briefly away: the next beat tries again
            pass


def describe(owner):
    """'train.py, pid 123 on host gpu7, since 2025-01-01 12:00:00'"""
    return (f"{owner.get('job', 'a job')}, pid {owner.get('pid', '?')} on host {owner.get('host', '?')}, "
            f"since {owner.get('since', '?')}")


def process_start(pid):
    """The start time of process pid (clock ticks after boot), or None where there is no /proc: with the pid
    it tells the owner from a new process that was given a dead owner's pid."""
    fields = proc_stat(pid)
    return int(fields[19]) if fields else None  # field 22 of /proc/<pid>/stat


def proc_stat(pid):
    """The fields of /proc/<pid>/stat after the process's name (which may hold spaces), or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()
    except OSError:
        return None


def running(pid, start):
    """Whether process pid runs and is the one that started at `start` (if known); a zombie (exited, not yet
    collected by its parent) does not run."""
    if os.path.exists("/proc/self/stat"):  # Linux
        fields = proc_stat(pid)
        return bool(fields) and fields[0] != "Z" and (start is None or int(fields[19]) == start)
    try:  # elsewhere: the pid alone
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True
