"""Debian 12's arm64 python3.11 under qemu-aarch64-static (user-mode emulation), for running
vhost_min's own tests on aarch64 from an x86-64 host.

The packages are fetched once with ``apt-get download`` through tests.guest's private apt
(its own sources list, lists and cache; here also APT::Architecture=arm64 and an empty dpkg
status), so the host's dpkg architectures and apt state are never touched. They are unpacked
with ``dpkg-deb -x`` into ``support.cache_dir("aarch64")/root``, and the interpreter runs as
``qemu-aarch64-static -L ROOT ROOT/usr/bin/python3.11`` through a host shell script,
ROOT/usr/bin/python3.11-qemu, that qemu passes to the guest as its argv[0]: that script is the
emulated ``sys.executable``, so tests that start ``[sys.executable, ...]`` children run them
emulated too, without binfmt_misc. A cached root is used without apt or network; bytecode the
emulated interpreter compiles is cached beside it, never in the clone.

What the emulator cannot do is listed in :data:`EMULATOR_GAPS`; :func:`inside` (run by the
emulated interpreter) skips exactly those tests, each with its reason.

CLI: ``python3 -m tests.aarch64 build`` (fetch and unpack), ``python3 -m tests.aarch64 python
ARGS...`` (the emulated interpreter, cwd and PYTHONPATH as the tests have them).
"""

from __future__ import annotations

import fcntl
import glob
import importlib
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import unittest
from collections.abc import Callable

from tests import support

QEMU = "qemu-aarch64-static"
#: What provides the host programs used here (apt-get and dpkg-deb come with every Debian).
INSTALL = "apt-get install -y --no-install-recommends qemu-user-static"
HOST_COMMANDS = (QEMU, "apt-get", "dpkg-deb")

#: The interpreter and the libraries it and the stdlib modules vhost_min uses need: _ctypes
#: needs libffi8, pyexpat libexpat1, zlib zlib1g; libgcc-s1 has __clear_cache (vhost_min.memory
#: calls it after writing the barrier code) and the unwinder glibc loads for thread exit.
PACKAGES = ("python3.11-minimal", "libpython3.11-minimal", "libpython3.11-stdlib", "libc6", "libffi8",
            "libgcc-s1", "zlib1g", "libexpat1")
PYTHON = "usr/bin/python3.11"
#: The host script that starts PYTHON under QEMU (the emulated interpreter's sys.executable).
WRAPPER = "usr/bin/python3.11-qemu"
PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: Tests (by id) that cannot pass under qemu-user 7.2 (Debian 12's) for
#: reasons outside vhost_min, or that check the host rather than the interpreter.
EMULATOR_GAPS = {
    "tests.unit.test_user_wire.TestConnection.test_rejects_too_many_fds":
        "qemu-user's recvmsg receives into a host buffer twice the size asked for: MSG_CTRUNC is not "
        "reported and the fds beyond the caller's buffer stay open in the process",
    "tests.unit.test_blk.HeaderFactsTest.test_constants_match_the_header":
        "reads the host's <linux/virtio_blk.h>: nothing about the interpreter",
    "tests.unit.test_blk.HeaderFactsTest.test_layouts_match_the_compiler":
        "compiles and runs a host (x86-64) C program: nothing about the interpreter",
    "tests.unit.test_aio.EngineTestCase.test_an_operation_refused_at_submit_is_not_left_in_flight":
        "qemu-user has no io_uring_setup (ENOSYS): the io_uring engine cannot be made",
    "tests.unit.test_load.ForcedAsyncTest.test_forced_async_reads_and_writes":
        "qemu-user has no io_uring_setup (ENOSYS): the io_uring engine cannot be made",
    "tests.unit.test_memory.BarrierTest.test_store_buffering_litmus":
        "an x86-64 C loop (rdtsc, pause) racing on two cores: qemu-user on an x86 host keeps x86 ordering, "
        "so it could not tell the aarch64 barrier from none (test_barrier_code_as_qemu_disassembles_it "
        "checks that code)",
}

#: What vhost_min.memory.barriers().how says when the hand-encoded aarch64 code is in use.
AARCH64_BARRIERS = "machine code (dmb / ldaxrb-stlxrb)"


def require_emulator() -> None:
    """Skip (locally) or fail (CI=true) when qemu-aarch64-static, apt-get or dpkg-deb is missing."""
    support.require_commands(*HOST_COMMANDS, install=INSTALL)


# --- the arm64 root (host side) ---------------------------------------------------------------

def _log(line: str) -> None:
    print(f"[aarch64] {line}", file=sys.stderr, flush=True)


def ensure_root(log: Callable[[str], None] = _log) -> str:
    """The unpacked arm64 root, fetched and unpacked on first use and whenever :data:`PACKAGES`
    changes (a lock file serialises builders), with its WRAPPER up to date."""
    base = support.cache_dir("aarch64")
    root = os.path.join(base, "root")
    stamp = os.path.join(base, "packages")
    want = "\n".join(PACKAGES) + "\n"
    with open(os.path.join(base, "lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _read(stamp) != want or not os.access(os.path.join(root, PYTHON), os.X_OK):
            start = time.monotonic()
            for stale in (root, os.path.join(base, "pycache")):
                shutil.rmtree(stale, ignore_errors=True)
            work = tempfile.mkdtemp(prefix="build-", dir=base)
            try:
                log(f"downloading {len(PACKAGES)} arm64 packages")
                os.rename(_unpacked(work), root)
            finally:
                shutil.rmtree(work, ignore_errors=True)   # the .debs and apt lists are not needed again
            with open(stamp, "w") as f:
                f.write(want)
            log(f"{root}: {_du(root) / 2**20:.0f} MiB in {time.monotonic() - start:.1f} s")
        _write_wrapper(root)
    return root


def _unpacked(work: str) -> str:
    """Download PACKAGES into ``work`` and unpack them into ``work``/root; returns that root."""
    debs, root = os.path.join(work, "debs"), os.path.join(work, "root")
    os.mkdir(debs)
    apt = _arm64_apt(os.path.join(work, "apt"))
    apt.update()
    apt.download(PACKAGES, debs)
    for deb in sorted(glob.glob(os.path.join(debs, "*.deb"))):
        _check_call(["dpkg-deb", "-x", deb, root])
    return root


def _write_wrapper(root: str) -> None:
    """ROOT/WRAPPER: ``exec qemu -L ROOT -0 WRAPPER ROOT/PYTHON "$@"`` (rewritten when qemu moves)."""
    qemu = shutil.which(QEMU)
    if qemu is None:
        raise RuntimeError(f"{QEMU} is missing; install it with: {INSTALL}")
    wrapper = os.path.join(root, WRAPPER)
    text = (f'#!/bin/sh\n# tests.aarch64: {PYTHON} under user-mode emulation, argv[0] this script\n'
            f'exec {shlex.quote(qemu)} -L {shlex.quote(root)} -0 "$0" {shlex.quote(os.path.join(root, PYTHON))} "$@"\n')
    if _read(wrapper) != text:
        with open(wrapper + ".tmp", "w") as f:
            f.write(text)
        os.chmod(wrapper + ".tmp", 0o755)
        os.replace(wrapper + ".tmp", wrapper)


def _arm64_apt(directory: str):
    """tests.guest's private apt, made to see arm64 only and no installed packages."""
    from tests import guest      # not at import: the emulated interpreter imports this module too
    apt = guest._Apt(directory)
    status = os.path.join(directory, "status")
    open(status, "w").close()
    apt.options += ["-o", "APT::Architecture=arm64", "-o", "APT::Architectures=arm64",
                    "-o", f"Dir::State::status={status}"]
    return apt


def _check_call(argv: list[str]) -> None:
    proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(argv)} exited with {proc.returncode}: {proc.stderr.strip()}")


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def _du(path: str) -> int:
    return sum(os.lstat(os.path.join(d, n)).st_size for d, _, names in os.walk(path) for n in names)


def python_command(root: str, *args: str) -> list[str]:
    """argv of the emulated interpreter."""
    return [os.path.join(root, WRAPPER), *args]


def python_env(**extra: str) -> dict[str, str]:
    """The emulated interpreter's environment (its children inherit it): the project importable
    from PROJECT_ROOT, bytecode cached outside the clone (compiling the stdlib under emulation is
    slow), no host PYTHON* and no host user site-packages."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(PYTHONPATH=PROJECT_ROOT, PYTHONNOUSERSITE="1", PYTHONUNBUFFERED="1", LC_ALL="C.UTF-8",
               PYTHONPYCACHEPREFIX=os.path.join(support.cache_dir("aarch64"), "pycache"), **extra)
    return env


# --- inside the emulated interpreter ----------------------------------------------------------

def inside(names: list[str]) -> int:
    """Run the tests ``names`` with tests.__main__ (same output, same last line) after checking
    that this really is aarch64 with vhost_min on its aarch64 barriers; EMULATOR_GAPS are skipped."""
    from vhost_min.memory import barriers
    b = barriers()
    print(f"[aarch64] machine {platform.machine()}, python {platform.python_version()}, "
          f"barriers: {b.how}, read {'yes' if b.read else 'none'}, write {'yes' if b.write else 'none'}",
          flush=True)
    if platform.machine() != "aarch64" or b.how != AARCH64_BARRIERS or b.read is None or b.write is None:
        print("[aarch64] not running on the aarch64 code paths", flush=True)
        return 2
    for gap, reason in EMULATOR_GAPS.items():
        _skip(gap, reason)
    from tests.__main__ import main
    return main(names)


def _skip(test_id: str, reason: str) -> None:
    """Mark the test method ``module.Class.method`` as skipped, with ``reason``."""
    module, cls_name, method = test_id.rsplit(".", 2)
    cls = getattr(importlib.import_module(module), cls_name)
    setattr(cls, method, unittest.skip(reason)(getattr(cls, method)))


def main(argv: list[str]) -> int:
    if argv[:1] == ["build"]:
        require_emulator()
        print(ensure_root())
        return 0
    if argv[:1] == ["python"]:
        cmd = python_command(ensure_root(), *argv[1:])
        os.chdir(PROJECT_ROOT)
        os.execvpe(cmd[0], cmd, python_env())
    print("usage: python3 -m tests.aarch64 build | python [ARGS...]", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
