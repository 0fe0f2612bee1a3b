"""The tracer (``python3 -m vhost_min trace --json --once``, as users run it) between QEMU 7.2 and
real back-ends while a Linux guest (tests/guest.py) does I/O through them, in one boot:

- a vhost-user-blk disk served by qemu-storage-daemon: the guest writes 1 MiB of seeded random
  bytes with O_DIRECT, drops its caches, reads them back and compares; the test finds them in
  the image file;
- a vhost-user-fs share served by QEMU's C virtiofsd: the guest mounts it (virtiofs), reads a
  host file through it (compared with the same file over 9p) and writes one the test finds.

Each tracer's JSON lines must show the session as it happened: memory handed over with fds
(ADD_MEM_REG or SET_MEM_TABLE, QEMU's memfd), SET_VRING_KICK/CALL with eventfds, the back-end
channel relayed, GET_VRING_BASE when QEMU stops the device at power-off, every reply matching
the request owed, nothing the spec refuses -- and the tracer exits 0 when QEMU disconnects.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import unittest

from tests import guest, support
from tests.peers import launch

MiB = 1 << 20
IMAGE_SIZE = 48 * MiB
PATTERN_OFFSET, PATTERN_SIZE, DD_BLOCK = 2 * MiB, 1 * MiB, 64 * 1024
FS_FILE_SIZE = 256 * 1024
FS_TAG = "tracefs"
GUEST_TIMEOUT = 45
BOOT_TIMEOUT = 30
#: QEMU 7.2 names the memfd of memory-backend-memfd after the object type.
GUEST_MEMFD = "/memfd:memory-backend-memfd"
MEMORY_REQUESTS = {"VHOST_USER_ADD_MEM_REG", "VHOST_USER_SET_MEM_TABLE"}

SCRIPT = f"""\
set -e
for d in /sys/block/vd*; do
    [ "$(cat "$d/size")" = "{IMAGE_SIZE // 512}" ] && disk=${{d##*/}}
done
echo "disk=$disk"
dd if=/mnt/data/pattern of=/dev/$disk bs={DD_BLOCK} seek={PATTERN_OFFSET // DD_BLOCK} oflag=direct conv=fsync \
    2>/dev/null
echo 3 >/proc/sys/vm/drop_caches
dd if=/dev/$disk of=/tmp/back bs={DD_BLOCK} skip={PATTERN_OFFSET // DD_BLOCK} count={PATTERN_SIZE // DD_BLOCK} \
    iflag=direct 2>/dev/null
cmp /mnt/data/pattern /tmp/back
echo "blk=ok"
mkdir -p /mnt/vfs
mount -t virtiofs {FS_TAG} /mnt/vfs
cmp /mnt/vfs/host.bin /mnt/data/host.bin
echo "fs_read=ok"
echo "written by the guest through virtiofs" >/mnt/vfs/guest.txt
sync
umount /mnt/vfs
echo "fs_write=done"
"""


def start_tracer(workdir: str, name: str, backend_socket: str) -> tuple[subprocess.Popen, str, str]:
    """``python3 -m vhost_min trace --json --once`` from this checkout, listening in ``workdir``;
    its stdout (the JSON lines) and stderr each in a file. Returns (process, socket, stdout path)."""
    listen = os.path.join(workdir, f"{name}-trace.sock")
    out = os.path.join(workdir, f"{name}-trace.jsonl")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, (guest.PROJECT_ROOT,
                                                                    os.environ.get("PYTHONPATH")))))
    with open(out, "wb") as stdout, open(out + ".err", "wb") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "vhost_min", "trace", "--listen", listen, "--connect",
                                 backend_socket, "--json", "--once"], stdin=subprocess.DEVNULL, stdout=stdout,
                                stderr=stderr, env=env, preexec_fn=launch._die_with_parent)
    try:
        support.wait_for_path(listen, proc, launch.READY_TIMEOUT)
    except BaseException:
        support.stop_process(proc)
        raise
    return proc, listen, out


def read_image(path: str, offset: int, size: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(size)


class TraceGuestTest(unittest.TestCase):
    """One guest boot; QEMU reaches both back-ends only through a tracer process each."""

    @classmethod
    def setUpClass(cls) -> None:
        guest.require_guest()
        support.require_commands(launch.QEMU_STORAGE_DAEMON, install=launch.APT_QEMU_COMMON)
        support.require_commands(launch.VIRTIOFSD, install=launch.APT_QEMU_COMMON)
        support.require_root("virtiofsd")
        rng = support.seeded_random(cls("test_blk_data_through_the_tracer_is_in_the_image"))
        cls.pattern, cls.host_file = rng.randbytes(PATTERN_SIZE), rng.randbytes(FS_FILE_SIZE)
        work = tempfile.TemporaryDirectory(prefix="vhost_min-trace-")
        cls.addClassCleanup(work.cleanup)
        data, shared = os.path.join(work.name, "data"), os.path.join(work.name, "shared")
        os.mkdir(data)
        os.mkdir(shared)
        for path, content in ((os.path.join(data, "pattern"), cls.pattern),
                              (os.path.join(data, "host.bin"), cls.host_file),
                              (os.path.join(shared, "host.bin"), cls.host_file)):
            with open(path, "wb") as f:
                f.write(content)
        cls.image, cls.shared = os.path.join(work.name, "disk.img"), shared
        with open(cls.image, "wb") as f:
            f.truncate(IMAGE_SIZE)
        with launch.storage_daemon(cls.image) as qsd, launch.virtiofsd(shared) as fsd:
            blk_tracer, blk_listen, cls.blk_trace_path = start_tracer(work.name, "blk", qsd.socket)
            try:
                fs_tracer, fs_listen, cls.fs_trace_path = start_tracer(work.name, "fs", fsd.socket)
            except BaseException:
                support.stop_process(blk_tracer)
                raise
            try:
                qemu_args = ["-chardev", f"socket,id=blk0,path={blk_listen}",
                             "-device", "vhost-user-blk-pci,id=blk0,chardev=blk0,num-queues=1",
                             "-chardev", f"socket,id=fs0,path={fs_listen}",
                             "-device", f"vhost-user-fs-pci,id=fs0,chardev=fs0,tag={FS_TAG}"]
                with guest.Guest(qemu_args, memfd_memory=True, modules=["virtio_blk", "virtiofs"],
                                 shares={"data": data}, boot_timeout=BOOT_TIMEOUT) as vm:
                    cls.result = vm.run(SCRIPT, timeout=GUEST_TIMEOUT)
                # QEMU has exited: each tracer's only session ended, and --once makes it exit.
                cls.tracer_exits = (blk_tracer.wait(10), fs_tracer.wait(10))
            finally:
                support.stop_process(blk_tracer)
                support.stop_process(fs_tracer)
            cls.fsd_log = fsd.log()
        cls.facts = dict(line.split("=", 1) for line in cls.result.stdout.splitlines() if "=" in line)
        cls.blk_trace = cls.load(cls.blk_trace_path)
        cls.fs_trace = cls.load(cls.fs_trace_path)
        with open(os.path.join(shared, "guest.txt"), "rb") as f:
            cls.guest_file = f.read()

    @staticmethod
    def load(path: str) -> list[dict]:
        with open(path) as f:
            lines = [json.loads(line) for line in f]
        with open(path + ".err") as f:
            err = f.read()
        assert not err, f"the tracer wrote to stderr: {err}"
        return lines

    # -- the guest's I/O, unchanged by the tracer in the middle

    def test_the_guest_script_succeeded(self) -> None:
        self.assertEqual((self.result.status, self.result.timed_out), (0, False), self.result.output)

    def test_blk_data_through_the_tracer_is_in_the_image(self) -> None:
        self.assertEqual(self.facts.get("blk"), "ok", self.result.output)
        self.assertTrue(read_image(self.image, PATTERN_OFFSET, PATTERN_SIZE) == self.pattern,
                        "the image does not hold the guest's 1 MiB at offset 2 MiB")
        self.assertEqual(read_image(self.image, 0, PATTERN_OFFSET), bytes(PATTERN_OFFSET))

    def test_virtiofs_read_and_write_through_the_tracer(self) -> None:
        self.assertEqual(self.facts.get("fs_read"), "ok", f"{self.result.output}\n--- virtiofsd:\n{self.fsd_log}")
        self.assertEqual(self.facts.get("fs_write"), "done", self.result.output)
        self.assertEqual(self.guest_file, b"written by the guest through virtiofs\n")

    def test_each_tracer_exited_0_when_qemu_left(self) -> None:
        self.assertEqual(self.tracer_exits, (0, 0))

    # -- what the traces show

    def check_trace(self, trace: list[dict], what: str) -> list[dict]:
        """The checks both sessions pass; returns the main channel's requests."""
        records = [r for r in trace if "request" in r]
        events = [r for r in trace if "event" in r]
        requests = [r for r in records if r["channel"] == "main" and "REPLY" not in r["flag_names"]]
        names = [r["request"] for r in requests]
        print(f"\n[{what}] QEMU sent {len(requests)} requests: "
              f"{' '.join(sorted(set(n.removeprefix('VHOST_USER_') for n in names)))}", flush=True)
        self.assertEqual([e["event"] for e in events if e["channel"] == "main"], ["open", "closed"])
        main_close = next(e for e in events if e["event"] == "closed" and e["channel"] == "main")
        self.assertEqual((main_close["by"], main_close.get("owed", [])), ("frontend", []), main_close)
        self.assertTrue(all(r["direction"] == "frontend->backend" for r in requests))
        # Every reply answers the request owed; nothing the spec refuses.
        replies = [r for r in records if "REPLY" in r["flag_names"]]
        self.assertTrue(replies)
        self.assertEqual([r for r in replies if not r["reply"]["matched"]], [])
        self.assertEqual([(r["request"], r["problems"]) for r in records if r.get("problems")], [])
        # Guest memory handed over with QEMU's memfd.
        memory = [r for r in requests if r["request"] in MEMORY_REQUESTS]
        self.assertTrue(memory, names)
        for r in memory:
            self.assertTrue(r["fds"] and all(fd["target"].startswith(GUEST_MEMFD) for fd in r["fds"]), r)
        for name in ("VHOST_USER_GET_FEATURES", "VHOST_USER_SET_FEATURES", "VHOST_USER_SET_VRING_NUM",
                     "VHOST_USER_SET_VRING_ADDR", "VHOST_USER_SET_VRING_KICK", "VHOST_USER_SET_VRING_CALL",
                     "VHOST_USER_GET_VRING_BASE"):
            self.assertIn(name, names)
        kicks = [r for r in requests if r["request"] == "VHOST_USER_SET_VRING_KICK"]
        self.assertTrue(all(k["fds"] == [{"target": "anon_inode:[eventfd]"}] for k in kicks), kicks)
        # GET_VRING_BASE comes when QEMU stops the device (the guest powered off), after the kicks.
        stops = [r for r in requests if r["request"] == "VHOST_USER_GET_VRING_BASE"]
        self.assertGreater(requests.index(stops[0]), requests.index(kicks[0]))
        answer = next(r for r in replies if r["request"] == "VHOST_USER_GET_VRING_BASE")
        self.assertEqual(answer["reply"], {"to": "VHOST_USER_GET_VRING_BASE", "kind": "reply", "matched": True})
        # QEMU asks REPLY_ACK of the memory table: each acknowledged with 0.
        acks = [r for r in replies if r["request"] in MEMORY_REQUESTS]
        self.assertTrue(acks and all(r["reply"]["kind"] == "ack" and r["fields"] == {"status": 0} for r in acks),
                        acks)
        self.assertEqual(set(answer["fields"]), {"index", "num"})
        # The back-end channel went through the tracer's socketpair.
        channel = next(r for r in requests if r["request"] == "VHOST_USER_SET_BACKEND_REQ_FD")
        self.assertTrue(channel["fds"][0]["target"].startswith("socket:["))
        self.assertTrue(any("socketpair" in n for n in channel.get("notes", [])), channel)
        self.assertIn("backend channel", [e["channel"] for e in events])
        return requests

    def test_blk_trace(self) -> None:
        requests = self.check_trace(self.blk_trace, "blk")
        config = next(r for r in self.blk_trace if r.get("request") == "VHOST_USER_GET_CONFIG"
                      and "REPLY" in r["flag_names"])
        self.assertEqual(config["fields"]["size"], 57)          # vhost-user-blk-pci asks 57 bytes (PEERS.md)
        capacity = int.from_bytes(bytes.fromhex(config["fields"]["data"])[:8], "little")
        self.assertEqual(capacity, IMAGE_SIZE // 512)
        # QEMU negotiated CONFIGURE_MEM_SLOTS with qemu-storage-daemon: memory by ADD_MEM_REG.
        self.assertIn("VHOST_USER_ADD_MEM_REG", [r["request"] for r in requests])

    def test_fs_trace(self) -> None:
        requests = self.check_trace(self.fs_trace, "virtiofsd")
        # Two queues: hiprio and one request queue, each kicked with its own eventfd.
        kicked = {r["fields"]["index"] for r in requests if r["request"] == "VHOST_USER_SET_VRING_KICK"}
        self.assertEqual(kicked, {0, 1})


if __name__ == "__main__":
    unittest.main()
