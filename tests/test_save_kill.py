"""Interrupted writes: ``kill -9`` at random points of a save never loses the capture under its
name, and leaves no temporary directory behind once the next save (or load) has run; two saves to
one ``-o`` at once: one wins, the other is refused (a lock), exit 2.

A saver process builds a capture of a few tens of MB in memory and forks a worker that saves it
(or a worker that makes the capture itself, writing it while the model runs: ``stream_to``); the
test kills the worker with SIGKILL after a random delay measured from the fork, so kills land
before, during and after the write of tensors.safetensors, and between the renames of a replace.

The lock: ``fxdiff capture -o OUT`` holds OUT's write lock (``fxdiff.store.writing``) from its
start, not only while saving. Two captures to one output would otherwise both run the model (for
minutes, on a real one) and the second would then fail or replace the first; refused at the start,
it costs the user nothing and says at once that OUT is busy. ``save`` inside the block takes the
same lock again without waiting on itself.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fuzzing as fz  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
KILLS = int(os.environ.get("FXDIFF_KILLS", "40"))
SEED = int(os.environ.get("FXDIFF_FUZZ_SEED", "20261203"))

# The saver: import torch and fxdiff once (seconds), then for each request "OUT TAG" capture the
# big tiny model (in memory) and fork a worker that only saves it: the process killed is one in the
# middle of ``fxdiff.save``, as in a fresh process, without paying the imports each round.
SERVER = r"""
import os, sys, time
import torch
torch.set_num_threads(1)
sys.path.insert(0, sys.argv[1])
import fz_tiny
import fxdiff
model = fz_tiny.build_big()
if sys.argv[2:] == ["two-renames"]:   # as where renameat2(RENAME_EXCHANGE) is not available
    fxdiff.store.capture_dir._exchange = lambda a, b: False
print("ready", flush=True)
for line in sys.stdin:
    out, tag, how = line.split()
    if how == "save":
        cap = fxdiff.capture(model, kwargs=fz_tiny.inputs(), loss=fz_tiny.loss, meta={"tag": tag})
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        code = 0
        try:
            t = time.perf_counter()
            if how == "save":
                fxdiff.save(cap, out)
            else:   # the whole capture, written while the model runs
                fxdiff.capture(model, kwargs=fz_tiny.inputs(), loss=fz_tiny.loss, meta={"tag": tag}, stream_to=out)
            os.write(w, b"%.4f" % (time.perf_counter() - t))
        except BaseException as e:
            os.write(w, repr(e).encode()[:500])
            code = 1
        os._exit(code)
    os.close(w)
    print("started", pid, flush=True)
    sys.stdin.readline()        # "reap": the test killed the worker or lets it finish
    _, status = os.waitpid(pid, 0)
    said = os.read(r, 1000).decode()
    os.close(r)
    print("done", status, said or "-", flush=True)
"""


class Saver:
    """The saver process: ``start(out, tag)`` forks a worker saving a fresh capture to ``out`` and
    returns its pid (a child of the saver, reaped only by ``finish``, so the pid stays its own
    until then); ``finish()`` waits for it: (exit status, seconds of the save or an error)."""

    def __init__(self, specs_dir: Path, *flags: str):
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.p = subprocess.Popen([sys.executable, "-c", SERVER, str(specs_dir), *flags], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        line = self.p.stdout.readline()
        assert line.strip() == "ready", f"saver did not get ready: {line!r} {self.p.stderr.read()[-2000:]}"

    def start(self, out: Path, tag: str, how: str = "save") -> int:
        """``how``: ``save`` (a capture made beforehand) or ``stream`` (``capture(stream_to=out)``)."""
        self.p.stdin.write(f"{out} {tag} {how}\n")
        self.p.stdin.flush()
        line = self.p.stdout.readline().split()
        assert line[:1] == ["started"], f"saver failed: {line} {self.p.stderr.read()[-2000:] if not line else ''}"
        return int(line[1])

    def finish(self) -> tuple[int, str]:
        self.p.stdin.write("reap\n")
        self.p.stdin.flush()
        _, status, said = self.p.stdout.readline().split(maxsplit=2)
        return int(status), said.strip()

    def save(self, out: Path, tag: str, how: str = "save") -> float:
        """A whole save, not killed: its seconds."""
        self.start(out, tag, how)
        status, said = self.finish()
        assert status == 0, said
        return float(said)

    def close(self) -> None:
        self.p.stdin.close()
        self.p.wait(timeout=60)


@pytest.fixture(scope="module")
def specs_dir(tmp_path_factory):
    work = tmp_path_factory.mktemp("kill")
    return fz.write_specs(work / "specs").parent


@pytest.fixture(scope="module")
def saver(specs_dir):
    s = Saver(specs_dir)
    yield s
    s.close()


def save_seconds(saver: Saver, tmp: Path, replace: bool, how: str = "save") -> float:
    """How long the save being killed takes when left alone: a fresh save, or a replace (slower:
    it also moves and deletes the old capture). The median of five runs after a first one (on a
    busy machine one run can take several times the others)."""
    target = tmp / "timing.fxd"
    times = []
    for i in range(6):
        if not replace:
            shutil.rmtree(target, ignore_errors=True)
        times.append(saver.save(target, "timing", how))
    size = sum(f.stat().st_size for f in target.iterdir())
    assert size > 10 << 20, f"capture of {size} bytes is too small to be killed mid-write"
    return sorted(times[1:])[2]


def temporaries(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir() if p.name.startswith(f".{path.name}."))


def tag_of(path: Path) -> str | None:
    import fxdiff
    return fxdiff.store.read_meta(path).get("tag") if path.exists() else None


def kill_campaign(saver: Saver, tmp: Path, replace: bool, how: str = "save") -> list[str]:
    """KILLS rounds of save-and-kill; returns what each round left, for the failure message."""
    import fxdiff
    rng = random.Random(SEED + replace + 2 * (how == "stream"))
    # the saves that finish say how long they took: the kills follow the machine's pace, which can
    # change during a campaign (a fresh saver's first saves are slower than its later ones)
    recent = [save_seconds(saver, tmp, replace, how)]
    out = tmp / ("replaced.fxd" if replace else "fresh.fxd")
    log = []
    for round_ in range(KILLS):
        if not replace:
            shutil.rmtree(out, ignore_errors=True)
        elif not out.exists():
            shutil.copytree(tmp / "timing.fxd", out)
        before = tag_of(out)
        new = f"round{round_}"
        duration = sorted(recent[-5:])[len(recent[-5:]) // 2]
        pid = saver.start(out, new, how)
        # half the kills anywhere in the save, half around its end, where the renames are
        delay = rng.uniform(0, duration * 1.5) if round_ % 2 else rng.uniform(duration * 0.7, duration * 1.3)
        time.sleep(delay)
        os.kill(pid, signal.SIGKILL)   # the saver's own child, not reaped yet: the pid is still its
        status, said = saver.finish()
        if not status:
            recent.append(float(said))
        state = f"round {round_}: kill at {delay:.3f}s of {duration:.3f}s ({'killed' if status else 'finished'})"
        # the name holds the old capture or the new one (a fresh save may also leave nothing)
        try:
            cap = fxdiff.load(out)
            now = cap.meta.get("tag")
        except fxdiff.FxdiffError as e:
            now = f"unloadable: {e}"
        log.append(f"{state}: before={before} after={now} temporaries={temporaries(out)}")
        allowed = {before, new} if replace else {None, new}
        if not replace and not out.exists():
            now = None
        assert now in allowed, "\n".join(log)
    killed = sum("(killed)" in line for line in log)
    assert killed >= KILLS // 5, f"only {killed} of {KILLS} saves were killed before they finished:\n" + "\n".join(log)
    # the next save succeeds and tidies up every temporary directory left by the kills
    saver.save(out, "final", how)
    assert tag_of(out) == "final"
    assert not temporaries(out), f"temporary directories survived the next save: {temporaries(out)}\n" + "\n".join(log)
    return log


def test_kill_during_fresh_save(saver, tmp_path):
    kill_campaign(saver, tmp_path, replace=False)


def test_kill_during_replace(saver, tmp_path):
    kill_campaign(saver, tmp_path, replace=True)


def test_kill_during_streamed_capture(saver, tmp_path):
    """A capture written while the model runs (what ``fxdiff capture`` does): killed during the
    run, while the rest is written or during the renames, it loses nothing either."""
    kill_campaign(saver, tmp_path, replace=False, how="stream")


def test_kill_during_streamed_capture_that_replaces(saver, tmp_path):
    kill_campaign(saver, tmp_path, replace=True, how="stream")


def test_kill_during_replace_by_two_renames(specs_dir, tmp_path):
    """Where the file system cannot exchange two directories in one step, a replace renames the old
    capture aside, then the new one in: a kill between the two leaves the old one at ``.NAME.old``,
    which loading finds and the next save puts back."""
    saver = Saver(specs_dir, "two-renames")
    try:
        kill_campaign(saver, tmp_path, replace=True)
    finally:
        saver.close()


def test_load_during_a_replace(saver, tmp_path):
    """Loading the name while another process replaces it finds a capture (never a gap)."""
    import fxdiff
    out = tmp_path / "live.fxd"
    saver.save(out, "first")
    saver.start(out, "second")
    time.sleep(0.05)
    fxdiff.load(out)   # while the second save is running
    status, said = saver.finish()
    assert status == 0 and tag_of(out) == "second", said
    assert not temporaries(out)


def test_capture_to_a_locked_output_is_refused_before_the_model_runs(specs_dir, tmp_path):
    """Another process holds OUT's lock: ``fxdiff capture -o OUT`` is refused at once, exit 2, one
    line naming OUT, and the model is never built."""
    out = tmp_path / "busy.fxd"
    marker = tmp_path / "built.marker"
    (tmp_path / "marked.py").write_text(f"import sys\nsys.path.insert(0, {str(specs_dir)!r})\nimport fz_tiny\n"
                                        f"def build():\n    open({str(marker)!r}, 'w').close()\n"
                                        "    return fz_tiny.build()\n")
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys\n"
                               "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)\n"
                               "fcntl.flock(fd, fcntl.LOCK_EX)\nprint('held', flush=True)\nsys.stdin.read()",
                               str(tmp_path / ".busy.fxd.lock")], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        res = fz.run_cli(["capture", f"{tmp_path / 'marked.py'}:build",
                          "--inputs", f"{specs_dir / 'fz_tiny.py'}:inputs", "-o", str(out)])
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.exit_code == 2 and len(lines) == 1 and lines[0].startswith("fxdiff: error:") and str(out) in lines[0], \
        res.stderr + res.tb
    assert not marker.exists(), "the model was built although the output was locked"
    assert not out.exists()


def test_save_inside_the_lock_of_its_own_process(specs_dir, tmp_path):
    """``store.writing(OUT)`` held by this thread: ``save`` to OUT proceeds (no deadlock); another
    thread asking for OUT meanwhile is refused."""
    import threading
    import fxdiff
    sys.path.insert(0, str(specs_dir))
    import fz_tiny
    cap = fxdiff.capture(fz_tiny.build(), kwargs=fz_tiny.inputs(), loss=fz_tiny.loss, meta={"tag": "inside"})
    out = tmp_path / "inside.fxd"
    errors = []

    def other():
        try:
            fxdiff.save(cap, out)
        except fxdiff.FxdiffError as e:
            errors.append(str(e))
    with fxdiff.store.writing(out):
        fxdiff.save(cap, out)
        t = threading.Thread(target=other)
        t.start()
        t.join()
    assert tag_of(out) == "inside" and len(errors) == 1 and "another fxdiff process" in errors[0], errors
    assert not temporaries(out), temporaries(out)


def test_two_concurrent_saves_to_one_output(specs_dir, tmp_path):
    """Was: both exit 0 and the result is whichever renamed last. Exactly one succeeds; the other
    is refused with exit 2 and one line naming the output (another capture holds it: the lock is
    taken when ``capture`` starts, so the loser is refused before it runs the model).

    Two processes started together race through their imports (seconds, more on a busy machine)
    and a capture of this model takes a fraction of one, so the first one's model builder waits
    until the second has been answered: the two captures overlap every time."""
    out = tmp_path / "race.fxd"
    spec = specs_dir / "fz_tiny.py"
    release = tmp_path / "release"
    (tmp_path / "waiting.py").write_text(
        f"import os, sys, time\nsys.path.insert(0, {str(specs_dir)!r})\nimport fz_tiny\n"
        f"def build():\n    end = time.time() + 120\n"
        f"    while not os.path.exists({str(release)!r}) and time.time() < end:\n        time.sleep(0.05)\n"
        "    return fz_tiny.build_big()\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FXDIFF_FUZZ_WIDTH": "768"}

    def capture(model: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "fxdiff.cli", "capture", model, "--inputs", f"{spec}:inputs",
                                 "--loss", f"{spec}:loss", "-o", str(out)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    first = capture(f"{tmp_path / 'waiting.py'}:build")
    try:
        lock = out.with_name(f".{out.name}.lock")
        deadline = time.time() + 120
        while not lock.exists() and first.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert lock.exists(), f"the first capture never took the lock: {first.communicate(timeout=60)}"
        second = capture(f"{spec}:build_big")
        code, _, err = second.wait(timeout=300), second.stdout.read(), second.stderr.read()
    finally:
        release.touch()
    first_out, first_err = first.communicate(timeout=300)
    assert first.returncode == 0, first_err
    assert code == 2, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("fxdiff: error:") and str(out) in lines[0], err
    assert "another fxdiff process is writing" in lines[0], lines[0]
    import fxdiff
    fxdiff.load(out)
    assert not temporaries(out)
