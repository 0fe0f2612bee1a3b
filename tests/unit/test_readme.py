"""README.md's promises, checked: every ```python block runs (its asserts are the checks), the
virtio-rng example serves random bytes to our own front-end, and the test command it tells people
to run is the one CI runs. The peers tier runs the same rng block against QEMU and a Linux guest
(tests/peers/test_guest_peers.py). Editing an example so that it breaks fails a test here."""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import unittest
from typing import NamedTuple

from tests.support import stop_process, wait_for_path
from vhost_min.backend import serve
from vhost_min.frontend import Frontend
from vhost_min.virtio import DeviceId

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
README = os.path.join(ROOT, "README.md")
CI_RUN = os.path.join(ROOT, ".ci", "run")

#: The section whose first python block is the complete custom device (virtio-rng).
RNG_HEADING = "## A complete custom device"
TIMEOUT = 5.0


class Block(NamedTuple):
    """One fenced code block of README.md."""

    language: str
    heading: str        #: the nearest "#"-heading above it
    line: int           #: README line of its first code line (1-based)
    code: str


def readme_blocks(path: str = README) -> list[Block]:
    """Every fenced code block of README.md, in order."""
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines(keepends=True)
    blocks: list[Block] = []
    heading, fence = "", None
    for number, line in enumerate(lines, 1):
        if fence is None:
            if line.startswith("#"):
                heading = line.strip()
            elif line.startswith("```"):
                fence, start, body = line[3:].strip(), number + 1, []
        elif line.rstrip("\n") == "```":
            blocks.append(Block(fence, heading, start, "".join(body)))
            fence = None
        else:
            body.append(line)
    return blocks


def block_after(heading: str, language: str = "python", path: str = README) -> Block:
    """The first ``language`` block in the section whose heading starts with ``heading``."""
    for block in readme_blocks(path):
        if block.heading.startswith(heading) and block.language == language:
            return block
    raise AssertionError(f"README.md has no ```{language} block under a heading starting {heading!r}")


def compile_block(block: Block):
    """The block as code whose tracebacks point at README.md's own line numbers."""
    return compile("\n" * (block.line - 1) + block.code, README, "exec")


def rng_example() -> Block:
    """README.md's complete custom device, exactly as written."""
    return block_after(RNG_HEADING)


class PythonBlocksTest(unittest.TestCase):
    def test_every_self_contained_block_runs(self) -> None:
        blocks = [b for b in readme_blocks() if b.language == "python"]
        rng = rng_example()
        others = [b for b in blocks if b != rng]
        self.assertTrue(others, "README.md should have python examples besides the rng device")
        for block in others:
            with self.subTest(heading=block.heading, line=block.line):
                exec(compile_block(block), {"__name__": "readme_example"})

    def test_the_api_tour_engine_example_is_among_them(self) -> None:
        tour = block_after("## API tour")
        self.assertIn("SplitDriverQueue", tour.code)
        self.assertIn("assert ", tour.code, "the engine example checks its own result")


class RngExampleTest(unittest.TestCase):
    """The rng block imported as a module (``__name__`` is not "__main__", so it does not serve by
    itself) and served with serve() in a thread to our Frontend over a temporary socket."""

    def setUp(self) -> None:
        self.namespace: dict = {"__name__": "readme_rng"}
        exec(compile_block(rng_example()), self.namespace)
        self.Rng = self.namespace["Rng"]
        tmp = tempfile.TemporaryDirectory(prefix="vhost_min-readme-")
        self.addCleanup(tmp.cleanup)
        self.socket_path = os.path.join(tmp.name, "rng.sock")

    def test_it_is_a_virtio_rng_device(self) -> None:
        self.assertEqual(self.Rng.device_id, DeviceId.RNG)
        self.assertEqual(self.Rng.num_queues, 1)

    def test_three_buffers_come_back_full_of_random_bytes(self) -> None:
        # Listening before the thread starts: nothing to wait for, no connect racing the bind.
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(self.socket_path)
        listener.listen()
        stop = threading.Event()
        server = threading.Thread(target=serve, args=(self.Rng,), kwargs={"fd": listener.detach(), "stop_event": stop},
                                  name="readme-rng", daemon=True)
        server.start()
        self.addCleanup(server.join, TIMEOUT)
        self.addCleanup(stop.set)
        sizes = (16, 512, 4096)
        with Frontend.connect(self.socket_path, timeout=TIMEOUT) as fe:
            fe.negotiate()
            fe.setup_memory(1 << 20)
            queue = fe.setup_queue(0, 8)
            buffers = [fe.alloc(size) for size in sizes]
            for i, (gpa, size) in enumerate(zip(buffers, sizes)):
                fe.memory.write(gpa, bytes(size))
                queue.add([], [(gpa, size)], token=i)
            fe.publish(0)
            used: list = []
            while len(used) < len(sizes) and fe.wait_call(0, timeout=TIMEOUT):
                used += queue.reap()
            self.assertEqual(sorted(used), [(i, size) for i, size in enumerate(sizes)])
            data = [fe.memory.read(gpa, size) for gpa, size in zip(buffers, sizes)]
        for chunk in data:
            self.assertNotEqual(chunk, bytes(len(chunk)), "a buffer came back all zeros")
            self.assertGreater(len(set(chunk)), 1, "a buffer came back constant")
        self.assertGreater(len(set(data[2])), 200, "4096 random bytes take nearly all 256 values")
        self.assertNotEqual(data[1][:16], data[0], "two buffers got the same bytes")

    def test_run_as_a_program_it_stops_cleanly_on_sigterm_and_ctrl_c(self) -> None:
        """As the README says to run it (``python3 rng.py SOCKET``): SIGTERM and SIGINT end it with
        status 0, no traceback, the socket file removed, as the CLI's blk does."""
        script = os.path.join(os.path.dirname(self.socket_path), "rng.py")
        with open(script, "w") as f:
            f.write(rng_example().code)
        for signum in (signal.SIGTERM, signal.SIGINT):
            with self.subTest(signal=signal.Signals(signum).name):
                proc = subprocess.Popen([sys.executable, script, self.socket_path], cwd=ROOT, text=True,
                                        env={**os.environ, "PYTHONPATH": ROOT}, stderr=subprocess.PIPE)
                try:
                    wait_for_path(self.socket_path, proc)
                    with Frontend.connect(self.socket_path, timeout=TIMEOUT) as fe:
                        self.assertEqual(fe.negotiate().features & (1 << 32), 1 << 32, "VIRTIO_F_VERSION_1 acked")
                    proc.send_signal(signum)
                    _out, err = proc.communicate(timeout=20)
                finally:
                    stop_process(proc)
                self.assertEqual(proc.returncode, 0, err)
                self.assertNotIn("Traceback", err)
                self.assertFalse(os.path.exists(self.socket_path), "the socket file is left behind")


class CommandLineTest(unittest.TestCase):
    def test_the_readme_test_command_is_what_ci_runs(self) -> None:
        commands = [line.split("#", 1)[0].strip() for block in readme_blocks() if block.language == "sh"
                    for line in block.code.splitlines()]
        test_commands = [c for c in commands if re.match(r"python3 -m tests\b", c)]
        self.assertEqual(test_commands, ["python3 -m tests"])
        with open(CI_RUN, encoding="utf-8") as f:
            ci = [line.split("#", 1)[0].strip() for line in f]
        self.assertIn(test_commands[0], ci, ".ci/run must run the README's test command as is")
        # ... and as its last command, so its status is CI's status.
        self.assertEqual([c for c in ci if c][-1], test_commands[0])

    def test_the_readme_apt_line_installs_what_the_tiers_need(self) -> None:
        from tests.support import PEER_PACKAGES
        lines = [" ".join(shlex.split(block.code.replace("\\\n", " "))) for block in readme_blocks()
                 if block.language == "sh" and "apt-get install" in block.code]
        self.assertEqual(len(lines), 1, "one apt-get line in README.md")
        listed = [w for w in lines[0].split() if w not in ("apt-get", "install", "-y", "--no-install-recommends")]
        self.assertEqual(sorted(listed), sorted(PEER_PACKAGES.split()))

    def test_the_rng_qemu_command_names_the_socket_the_example_serves_by_default(self) -> None:
        code = rng_example().code
        qemu = shlex.split(block_after(RNG_HEADING, "sh").code.replace("\\\n", " "))
        chardev = qemu[qemu.index("-chardev") + 1]
        path = dict(p.split("=", 1) for p in chardev.split(",")[1:] if "=" in p)["path"]
        self.assertIn(f'"{path}"', code)
        self.assertIn("share=on", " ".join(qemu), "vhost-user needs guest memory shared with the back-end")


if __name__ == "__main__":
    unittest.main()
