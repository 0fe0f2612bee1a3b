"""What every test tier shares: prerequisites that skip locally but fail in CI, fd counting,
temporary memfd guest memory, and PID-exact cleanup of peer processes."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import threading
import time
import unittest

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

#: apt packages each tier needs on a fresh Debian 12 machine; .ci/run installs the same list.
PEER_PACKAGES = ("qemu-system-x86 qemu-utils qemu-system-common dpdk-dev librte-net-vhost23 "
                 "librte-net-virtio23 librte-mempool-ring23 cpio busybox-static qemu-user-static "
                 "gcc-12 make gcc linux-libc-dev")


def require(ok: bool, what: str, install: str) -> None:
    """Skip (locally) or fail (with CI=true) when a tier's prerequisite is missing.

    ``install`` is the exact command that provides it, printed so a person can act on it.
    """
    if ok:
        return
    message = f"{what} is missing; install it with: {install}"
    if IN_CI:
        raise AssertionError(f"CI=true and {message}")
    raise unittest.SkipTest(message)


def require_commands(*commands: str, install: str = f"apt-get install -y {PEER_PACKAGES}") -> None:
    """:func:`require` for programs looked up on PATH (or given as absolute paths)."""
    missing = [c for c in commands if not (shutil.which(c) or (os.path.isabs(c) and os.access(c, os.X_OK)))]
    require(not missing, " and ".join(missing), install)


def require_root(what: str) -> None:
    require(os.geteuid() == 0, f"root (for {what})", "run the tests as root")


def memfd(size: int, name: str = "vhost-min-test") -> int:
    """A close-on-exec memfd of ``size`` zero bytes: guest memory for tests."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    return fd


def open_fds() -> set[int]:
    """The fds this process has open now (for leak checks)."""
    return {int(n) for n in os.listdir("/proc/self/fd")}


def seeded_random(test: unittest.TestCase, seed: int | None = None) -> random.Random:
    """A Random with a fixed (or given) seed that is printed, so a failure can be replayed."""
    seed = int(os.environ.get("VHOST_MIN_SEED", seed if seed is not None else 20261126))
    print(f"\n[{test.id()}] random seed {seed} (set VHOST_MIN_SEED to replay)", flush=True)
    return random.Random(seed)


def stop_process(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """Stop exactly this process (by its PID): SIGTERM, then SIGKILL if it lingers."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()


def wait_for_path(path: str, proc: subprocess.Popen | None = None, timeout: float = 20.0) -> None:
    """Wait until ``path`` exists (a peer's socket), failing early if ``proc`` died."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process {proc.args!r} exited with {proc.returncode} before creating {path}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} did not appear within {timeout} s")
        time.sleep(0.02)


def cache_dir(*parts: str) -> str:
    """Where downloads and built images are kept between runs, outside the clone."""
    base = os.environ.get("VHOST_MIN_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "vhost_min")
    path = os.path.join(base, *parts)
    os.makedirs(path, exist_ok=True)
    return path


def run_server(test: unittest.TestCase, server, timeout: float = 10.0):
    """Run ``server`` (a backend.Server, or a trace.Tracer: ``run(stop_event=)`` and ``close()``)
    in a daemon thread until the test's cleanup, or until the returned ``finish()`` (stop, join,
    close; the loop must have ended). Calling it twice is fine."""
    stop = threading.Event()
    thread = threading.Thread(target=server.run, kwargs={"stop_event": stop}, daemon=True)
    thread.start()

    def finish() -> None:
        stop.set()
        thread.join(timeout)
        server.close()
        test.assertFalse(thread.is_alive(), "the server loop is stuck")
    test.addCleanup(finish)
    return finish


class StoreBuffer:
    """A CPU's store buffer over one word of a ring view: stores to ``index`` stay pending (invisible
    to the other side, which reads memory) until :meth:`flush`, the full barrier; every other index
    and every read go straight through. Loads after a store without a barrier between them are how
    x86-64 and aarch64 lose a notification (store -> load reordering), emulated in one thread."""

    def __init__(self, view: memoryview, index: int) -> None:
        self.view, self.index, self.pending = view, index, None

    def __setitem__(self, i, value) -> None:
        if i == self.index:
            self.pending = value
        else:
            self.view[i] = value

    def __getitem__(self, i):
        return self.pending if i == self.index and self.pending is not None else self.view[i]

    def __getattr__(self, name: str):
        return getattr(self.view, name)

    def flush(self) -> None:
        if self.pending is not None:
            self.view[self.index], self.pending = self.pending, None


class LateDriver:
    """A driver that publishes one more chain (a writable byte at ``buf``) at the worst moment:
    the device's first full barrier once :attr:`armed` (the device's ``_mb``, replaced here, which
    then flushes ``buffered``), or when called. :attr:`published` holds what publish() said (kick
    or not)."""

    def __init__(self, device, buffered: StoreBuffer, driver, buf: int) -> None:
        self.buffered, self.driver, self.buf = buffered, driver, buf
        self.armed = False
        self.published: list[bool] = []
        device._mb = self._barrier

    def __call__(self) -> None:
        if not self.published:
            self.driver.add([], [(self.buf, 1)], "late")
            self.published.append(self.driver.publish())

    def _barrier(self) -> None:
        if self.armed:
            self()
        self.buffered.flush()
