"""The vhost-min command as a person (or libvirt, or systemd) runs it: ``python3 -m vhost_min``
in subprocesses, every one with a timeout. ``blk`` follows the vhost-user spec's back-end program
conventions (--print-capabilities, --socket-path / --fd, exit 0 on SIGTERM), and --connect (client
mode); ``probe`` decodes
what a back-end offers; ``demo`` checks bytes end to end; errors are one line on stderr."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import select
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import unittest
from fnmatch import fnmatch

from tests import support
from tests.support import stop_process

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PACKAGE = os.path.join(ROOT, "vhost_min")
DESCRIPTOR = os.path.join(PACKAGE, "50-vhost-min-blk.json")
TIMEOUT = 60

#: VHostUserBackendBlockFeature in QEMU's docs/interop/vhost-user.json
SCHEMA_BLOCK_FEATURES = {"read-only", "blk-file"}
#: VhostUserBackend's members in the same schema
SCHEMA_DESCRIPTOR_KEYS = {"description", "type", "binary", "tags"}


def cli(*args: str, timeout: float = TIMEOUT, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vhost_min", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, **kwargs)


def make_image(directory: str, size: int, name: str = "disk.img") -> str:
    path = os.path.join(directory, name)
    with open(path, "wb") as f:
        f.truncate(size)
    return path


@contextlib.contextmanager
def blk_backend(*args: str, **popen_kwargs):
    """``vhost-min blk ARGS`` running; yields the process once it said it serves (the socket file
    appears at bind(), a moment before listen(): its existence is not the sign)."""
    proc = subprocess.Popen([sys.executable, "-m", "vhost_min", "blk", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **popen_kwargs)
    try:
        if not select.select([proc.stdout], [], [], TIMEOUT)[0]:
            raise AssertionError(f"vhost-min blk said nothing within {TIMEOUT} s")
        line = proc.stdout.readline()
        if "serving" not in line:
            proc.wait(TIMEOUT)
            raise AssertionError(f"vhost-min blk did not start ({proc.returncode}): {line}{proc.stderr.read()}")
        yield proc
    finally:
        stop_process(proc)


class AssertCli(unittest.TestCase):
    def assertOneErrorLine(self, result: subprocess.CompletedProcess, *fragments: str) -> None:
        """Non-zero status, exactly one line on stderr (``vhost-min: ...``), no traceback."""
        self.assertNotEqual(result.returncode, 0, result)
        self.assertNotIn("Traceback", result.stderr)
        lines = result.stderr.splitlines()
        self.assertEqual(len(lines), 1, result.stderr)
        self.assertTrue(lines[0].startswith("vhost-min: "), lines[0])
        for fragment in fragments:
            self.assertIn(fragment, lines[0])

    def probe_json(self, socket_path: str, *args: str) -> dict:
        result = cli("probe", socket_path, "--json", *args)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(len(result.stdout.strip().splitlines()), 1, result.stdout)
        return json.loads(result.stdout)


# --------------------------------------------------------------------------------------------
# What libvirt and QEMU read: --print-capabilities and the descriptor file
# --------------------------------------------------------------------------------------------

class CapabilitiesTest(AssertCli):
    def test_print_capabilities_is_json_of_the_schema_shape(self) -> None:
        result = cli("blk", "--print-capabilities")
        self.assertEqual((result.returncode, result.stderr), (0, ""))
        caps = json.loads(result.stdout)
        self.assertEqual(caps["type"], "block")
        self.assertEqual(set(caps), {"type", "features"})
        self.assertIsInstance(caps["features"], list)
        self.assertLessEqual(set(caps["features"]), SCHEMA_BLOCK_FEATURES)
        self.assertIn("read-only", caps["features"])

    def test_print_capabilities_ignores_everything_after_it(self) -> None:
        result = cli("blk", "--print-capabilities", "--num-queues", "0", "--socket-path", "/nonexistent/s",
                     "/nonexistent.img")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(json.loads(result.stdout)["type"], "block")

    def test_the_vhost_min_blk_program_is_the_blk_command(self) -> None:
        result = subprocess.run([sys.executable, "-c", "import sys; from vhost_min.__main__ import blk_main; "
                                 "sys.exit(blk_main())", "--print-capabilities"],
                                cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(json.loads(result.stdout), json.loads(cli("blk", "--print-capabilities").stdout))

    def test_help_says_what_each_command_does(self) -> None:
        top = cli("--help")
        self.assertEqual(top.returncode, 0)
        for command in ("blk", "probe", "demo"):
            self.assertRegex(top.stdout, rf"\n\s+{command}\s+\w")
            sub = cli(command, "--help")
            self.assertEqual(sub.returncode, 0, sub.stderr)
            self.assertIn(f"usage: vhost-min {command}", sub.stdout)
        self.assertIn("/qemu/vhost-user/", cli("blk", "--help").stdout)


class DescriptorTest(unittest.TestCase):
    def test_descriptor_is_vhost_user_json_for_the_blk_program(self) -> None:
        with open(DESCRIPTOR, encoding="utf-8") as f:
            descriptor = json.load(f)
        self.assertLessEqual(set(descriptor), SCHEMA_DESCRIPTOR_KEYS)
        self.assertEqual(descriptor["type"], "block")
        self.assertTrue(descriptor["description"].strip())
        self.assertTrue(os.path.isabs(descriptor["binary"]), descriptor["binary"])
        self.assertEqual(os.path.basename(descriptor["binary"]), "vhost-min-blk")
        # The name sorts like the schema asks ("50-qemu-gpu.json").
        self.assertRegex(os.path.basename(DESCRIPTOR), r"^\d\d-[\w-]+\.json$")

    def test_pyproject_installs_the_program_and_ships_the_descriptor(self) -> None:
        try:
            import tomllib
        except ImportError:     # Python 3.10
            self.skipTest("tomllib needs Python 3.11")
        with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
            project = tomllib.load(f)
        self.assertEqual(project["project"]["scripts"]["vhost-min-blk"], "vhost_min.__main__:blk_main")
        patterns = project["tool"]["setuptools"]["package-data"]["vhost_min"]
        self.assertTrue(any(fnmatch(os.path.basename(DESCRIPTOR), p) for p in patterns), patterns)
        # The version has one home, the package, which the metadata and --version read.
        self.assertIn("version", project["project"]["dynamic"])
        self.assertEqual(project["tool"]["setuptools"]["dynamic"]["version"], {"attr": "vhost_min.__version__"})

    def test_version(self) -> None:
        from vhost_min import __version__
        self.assertRegex(__version__, r"^\d+\.\d+\.\d+$")
        for program, args in (("vhost-min", ()), ("vhost-min-blk", ("-c", "import sys; from vhost_min.__main__ import "
                                                                   "blk_main; sys.exit(blk_main())"))):
            argv = [sys.executable, *args, "--version"] if args else [sys.executable, "-m", "vhost_min", "--version"]
            result = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT)
            self.assertEqual((result.returncode, result.stdout, result.stderr), (0, f"{program} {__version__}\n", ""))


# --------------------------------------------------------------------------------------------
# blk and probe against each other
# --------------------------------------------------------------------------------------------

class BlkProbeTest(AssertCli):
    SIZE = 40 * (1 << 20) + 7 * 512        # capacity 81927 sectors: an exact, odd number

    def setUp(self) -> None:
        tmp = tempfile.TemporaryDirectory(prefix="vhost-min-cli-")
        self.addCleanup(tmp.cleanup)
        self.dir = tmp.name
        self.image = make_image(self.dir, self.SIZE)
        self.sock = os.path.join(self.dir, "blk.sock")

    def test_probe_prints_blk_features_and_capacity(self) -> None:
        with blk_backend("--socket-path", self.sock, self.image):
            text = cli("probe", self.sock)
            report = self.probe_json(self.sock)
        self.assertEqual(text.returncode, 0, text.stderr)
        self.assertIn("device type blk", text.stdout)
        self.assertRegex(text.stdout, r"capacity\s+81927 sectors")
        for name in ("VIRTIO_BLK_F_SEG_MAX", "VIRTIO_BLK_F_BLK_SIZE", "VIRTIO_BLK_F_FLUSH", "VIRTIO_BLK_F_DISCARD",
                     "VIRTIO_BLK_F_WRITE_ZEROES", "VIRTIO_F_VERSION_1", "VHOST_USER_F_PROTOCOL_FEATURES"):
            self.assertIn(name, text.stdout)
            self.assertIn(name, report["feature_names"])
        self.assertNotIn("VIRTIO_BLK_F_RO", text.stdout)
        self.assertIn("CONFIG", report["protocol_feature_names"])
        # The text and the JSON say the same things.
        self.assertEqual(report["device_type"], "blk")
        self.assertTrue(report["device_type_guessed"])
        self.assertEqual(report["config"]["capacity"], self.SIZE // 512)
        self.assertEqual(report["config"]["blk_size"], 512)
        self.assertFalse(report["config"]["read_only"])
        self.assertEqual(report["num_queues"], 1)
        self.assertIn(f"{report['features']:#x}: ", text.stdout)
        self.assertIn(f"{report['protocol_features']:#x}: ", text.stdout)
        self.assertRegex(text.stdout, rf"max memory slots\s+{report['max_mem_slots']}\n")
        self.assertEqual(bytes.fromhex(report["config_hex"])[:8], (self.SIZE // 512).to_bytes(8, "little"))

    def test_probe_leaves_the_backend_usable(self) -> None:
        from vhost_min.blk import BlkClient
        from vhost_min.frontend import Frontend
        with blk_backend("--socket-path", self.sock, self.image):
            self.probe_json(self.sock)
            self.probe_json(self.sock, "--type", "blk")
            with Frontend.connect(self.sock) as fe:
                client = BlkClient(fe)
                client.write(4096, b"\xa5" * 8192)
                self.assertEqual(client.read(4096, 8192), b"\xa5" * 8192)
        with open(self.image, "rb") as f:
            self.assertEqual(os.pread(f.fileno(), 8192, 4096), b"\xa5" * 8192)

    def test_probe_asks_the_config_size_of_the_device_type(self) -> None:
        """No GET_CONFIG the back-end has to refuse (each one a "rejected" line in a -v log)."""
        with blk_backend("--socket-path", self.sock, self.image, "-v") as proc:
            self.assertEqual(self.probe_json(self.sock)["config"]["capacity"], self.SIZE // 512)
            self.assertEqual(self.probe_json(self.sock, "--type", "blk")["config"]["capacity"], self.SIZE // 512)
            proc.send_signal(signal.SIGTERM)
            _out, log = proc.communicate(timeout=TIMEOUT)
        self.assertEqual(proc.returncode, 0, log)
        self.assertNotIn("rejected", log)

    def test_read_only_shows_ro(self) -> None:
        with blk_backend("--read-only", "--socket-path", self.sock, self.image):
            text = cli("probe", self.sock)
            report = self.probe_json(self.sock)
        self.assertIn("VIRTIO_BLK_F_RO", text.stdout)
        self.assertRegex(text.stdout, r"read_only\s+yes")
        self.assertIn("VIRTIO_BLK_F_RO", report["feature_names"])
        self.assertTrue(report["config"]["read_only"])
        self.assertNotIn("VIRTIO_BLK_F_DISCARD", report["feature_names"])

    def test_num_queues_2_shows_2_queues(self) -> None:
        with blk_backend("--num-queues", "2", "--socket-path", self.sock, "--blk-file", self.image):
            text = cli("probe", self.sock)
            report = self.probe_json(self.sock)
        self.assertRegex(text.stdout, r"\n  queues\s+2\n")
        self.assertEqual(report["num_queues"], 2)
        self.assertEqual(report["config"]["num_queues"], 2)
        self.assertIn("VIRTIO_BLK_F_MQ", report["feature_names"])

    def test_sigterm_exits_0_and_removes_the_socket(self) -> None:
        from vhost_min.frontend import Frontend
        with blk_backend("--socket-path", self.sock, self.image) as proc:
            with Frontend.connect(self.sock) as fe:       # a front-end still connected
                fe.negotiate()
                proc.send_signal(signal.SIGTERM)
                self.assertEqual(proc.wait(TIMEOUT), 0)
            stderr = proc.stderr.read()
        self.assertFalse(os.path.exists(self.sock))
        self.assertNotIn("Traceback", stderr)

    def test_fd_serves_an_inherited_listening_socket(self) -> None:
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(listener.close)
        listener.bind(self.sock)
        listener.listen(4)
        fd = listener.fileno()
        with blk_backend("--fd", str(fd), self.image, pass_fds=(fd,)) as proc:
            listener.close()                        # the back-end's copy is the only one now
            report = self.probe_json(self.sock)
            self.assertEqual(report["config"]["capacity"], self.SIZE // 512)
            proc.send_signal(signal.SIGTERM)
            self.assertEqual(proc.wait(TIMEOUT), 0)
        self.assertTrue(os.path.exists(self.sock))  # not its file: whoever bound it removes it

    def test_fd_serves_an_inherited_connection_then_exits(self) -> None:
        from vhost_min.frontend import Frontend
        from vhost_min.user import Connection
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        with blk_backend("--fd", str(theirs.fileno()), self.image, pass_fds=(theirs.fileno(),)) as proc:
            theirs.close()
            with Frontend(Connection(ours)) as fe:
                self.assertEqual(fe.probe().config[:8], (self.SIZE // 512).to_bytes(8, "little"))
            self.assertEqual(proc.wait(TIMEOUT), 0)    # its one connection ended


class ClientModeTest(AssertCli):
    """``blk --connect PATH``: the back-end connects to a front-end that listens (QEMU's
    ``-chardev socket,server=on``), and connects again after each disconnect, in one process."""

    SIZE = 4 << 20

    def setUp(self) -> None:
        tmp = tempfile.TemporaryDirectory(prefix="vhost-min-cli-")
        self.addCleanup(tmp.cleanup)
        self.dir = tmp.name
        self.image = make_image(self.dir, self.SIZE)
        self.sock = os.path.join(self.dir, "frontend.sock")

    def test_connect_serves_each_front_end_that_listens_in_turn(self) -> None:
        from vhost_min.blk import BlkClient
        from vhost_min.frontend import Frontend
        from vhost_min.user import Connection
        data = os.urandom(96 << 10)
        # Started before anyone listens: it keeps trying.
        with blk_backend("--connect", self.sock, self.image) as proc:
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.addCleanup(listener.close)
            listener.bind(self.sock)
            listener.listen(1)
            listener.settimeout(TIMEOUT)
            for turn in range(2):
                conn, _ = listener.accept()
                with Frontend(Connection(conn), timeout=TIMEOUT) as fe:
                    client = BlkClient(fe)
                    self.assertEqual(client.capacity, self.SIZE // 512)
                    if turn == 0:
                        client.write(8192, data)
                        client.flush()
                    else:               # the same process, a new connection: the data is there
                        self.assertEqual(client.read(8192, len(data)), data)
            proc.send_signal(signal.SIGTERM)
            self.assertEqual(proc.wait(TIMEOUT), 0)
            stderr = proc.stderr.read()
        self.assertNotIn("Traceback", stderr)
        self.assertTrue(os.path.exists(self.sock), "the back-end removed the front-end's socket file")
        with open(self.image, "rb") as f:
            self.assertEqual(os.pread(f.fileno(), len(data), 8192), data)

    def test_connect_in_the_usage_and_its_errors(self) -> None:
        help_text = cli("blk", "--help").stdout
        self.assertIn("--connect PATH", help_text)
        self.assertIn("server=on", help_text)
        result = cli("blk", self.image)
        self.assertEqual(result.returncode, 2)
        self.assertIn("give --socket-path PATH, --fd N or --connect PATH", result.stderr)
        result = cli("blk", "--connect", self.sock, "--socket-path", self.sock, self.image)
        self.assertEqual(result.returncode, 2)
        self.assertIn("not allowed with argument", result.stderr)
        long_path = os.path.join(self.dir, "s" * (120 - len(self.dir)))
        self.assertOneErrorLine(cli("blk", "--connect", long_path, self.image), long_path,
                                "longer than AF_UNIX allows (107)")


class ProbeDecodeTest(AssertCli):
    """probe against devices of other types, served by our back-end framework in this process."""

    def setUp(self) -> None:
        self.refused: list[int] = []            # the GET_CONFIG sizes the device refused

    def serve(self, device) -> str:
        from vhost_min.backend import Server
        logger = logging.getLogger("vhost_min.backend")
        level = logger.level
        logger.setLevel(logging.ERROR)          # probe's config-size search is refused on purpose
        self.addCleanup(logger.setLevel, level)
        tmp = tempfile.TemporaryDirectory(prefix="vhost-min-cli-")
        self.addCleanup(tmp.cleanup)
        path = os.path.join(tmp.name, "dev.sock")
        server = Server()
        server.add(device, path)
        support.run_server(self, server)
        return path

    def test_net(self) -> None:
        from vhost_min.net import VirtioNetFeature as F
        mac = bytes.fromhex("525400123456")
        sock = self.serve(config_device(1, F.VIRTIO_NET_F_MAC | F.VIRTIO_NET_F_STATUS | F.VIRTIO_NET_F_MQ
                                        | F.VIRTIO_NET_F_MTU | F.VIRTIO_NET_F_MRG_RXBUF,
                                        mac + struct.pack("<HHHIBBHI", 1, 4, 9000, 10000, 1, 0, 0, 0), self.refused))
        report = self.probe_json(sock)
        self.assertEqual(report["device_type"], "net")
        self.assertEqual(report["config"], {"mac": "52:54:00:12:34:56", "status": 1, "link_up": True,
                                            "max_virtqueue_pairs": 4, "mtu": 9000})
        self.assertIn("VIRTIO_NET_F_MRG_RXBUF", report["feature_names"])
        self.assertRegex(cli("probe", sock).stdout, r"mac\s+52:54:00:12:34:56")

        self.assertEqual(self.refused, [], "the size net's features point to is asked first")

    def test_fs(self) -> None:
        from vhost_min.blk import VIRTIO_BLK_CONFIG
        sock = self.serve(config_device(26, 0, b"myfs".ljust(36, b"\0") + struct.pack("<I", 2), self.refused))
        report = self.probe_json(sock)
        self.assertEqual((report["device_type"], report["config"]), ("fs", {"tag": "myfs", "num_request_queues": 2}))
        # blk's two sizes (the whole struct, QEMU 7.2's 60 bytes), then fs's: no halving search.
        self.assertEqual(self.refused, [VIRTIO_BLK_CONFIG.size, 60], "the known layouts, largest first")
        self.refused.clear()
        self.probe_json(sock, "--type", "fs")
        self.assertEqual(self.refused, [])

    def test_vsock_and_type_given(self) -> None:
        sock = self.serve(config_device(19, 0, struct.pack("<Q", 42)))
        report = self.probe_json(sock)
        self.assertEqual((report["device_type"], report["config"]), ("vsock", {"guest_cid": 42}))
        forced = self.probe_json(sock, "--type", "blk")
        self.assertEqual((forced["device_type"], forced["device_type_guessed"]), ("blk", False))
        self.assertEqual(forced["config"]["capacity"], 42)

    def test_unknown_device_prints_raw_config(self) -> None:
        sock = self.serve(config_device(4, 0, b"\x01\x02\x03"))
        text = cli("probe", sock)
        self.assertIn("device type unknown", text.stdout)
        self.assertRegex(text.stdout, r"raw\s+010203")


def config_device(device_id: int, features: int, config: bytes, refused: list[int] | None = None):
    """A device with these feature bits and this config space (reads past its end are refused,
    their sizes appended to ``refused``)."""
    from vhost_min.backend import Device
    from vhost_min.errors import NotSupportedError

    class ConfigDevice(Device):
        def get_config(self, offset: int, size: int) -> bytes:
            if offset + size > len(config):
                if refused is not None:
                    refused.append(size)
                raise NotSupportedError(f"{size} bytes at {offset}: the config space has {len(config)}")
            return config[offset:offset + size]

    device = ConfigDevice()
    device.device_id, device.features = device_id, int(features)
    return device


# --------------------------------------------------------------------------------------------
# Errors a person can act on
# --------------------------------------------------------------------------------------------

class ErrorTest(AssertCli):
    def setUp(self) -> None:
        tmp = tempfile.TemporaryDirectory(prefix="vhost-min-cli-")
        self.addCleanup(tmp.cleanup)
        self.dir = tmp.name

    def test_probe_of_a_missing_socket(self) -> None:
        path = os.path.join(self.dir, "nobody.sock")
        self.assertOneErrorLine(cli("probe", path), path)
        self.assertOneErrorLine(cli("probe", "--json", path), path)

    def test_probe_of_a_peer_that_is_not_vhost_user(self) -> None:
        path = os.path.join(self.dir, "http.sock")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(listener.close)
        listener.bind(path)
        listener.listen(4)
        listener.settimeout(TIMEOUT)

        def serve_garbage() -> None:
            with contextlib.suppress(OSError):
                conn, _ = listener.accept()
                with conn:
                    conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
                    conn.recv(1)        # until the client hangs up

        thread = threading.Thread(target=serve_garbage, daemon=True)
        thread.start()
        self.assertOneErrorLine(cli("probe", path), path, "not a vhost-user back-end")
        thread.join(TIMEOUT)

    def test_blk_on_an_image_that_cannot_be_opened(self) -> None:
        sock = os.path.join(self.dir, "blk.sock")
        missing = os.path.join(self.dir, "missing.img")
        self.assertOneErrorLine(cli("blk", "--socket-path", sock, missing), missing, "No such file")
        self.assertOneErrorLine(cli("blk", "--socket-path", sock, self.dir), "Is a directory")
        self.assertFalse(os.path.exists(sock))

    def test_blk_cache_none_on_a_file_system_without_o_direct(self) -> None:
        """tmpfs refused O_DIRECT before Linux 6.6; where this kernel's tmpfs takes it, the child's
        os.open refuses it as that tmpfs did (EINVAL)."""
        shm = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else self.dir
        with tempfile.TemporaryDirectory(dir=shm) as tmp:
            image = make_image(tmp, 1 << 20)
            try:
                os.close(os.open(image, os.O_RDWR | os.O_DIRECT))
                refuse = True
            except OSError:
                refuse = False
            sock = os.path.join(self.dir, "blk.sock")
            code = ("import errno, os, runpy, sys\n"
                    "real = os.open\n"
                    "def refusing(path, flags, *args, **kwargs):\n"
                    "    if flags & os.O_DIRECT:\n"
                    "        raise OSError(errno.EINVAL, os.strerror(errno.EINVAL), path)\n"
                    "    return real(path, flags, *args, **kwargs)\n"
                    f"os.open = refusing if {refuse} else real\n"
                    "sys.argv = ['vhost-min'] + sys.argv[1:]\n"
                    "runpy.run_module('vhost_min', run_name='__main__')\n")
            result = subprocess.run([sys.executable, "-c", code, "blk", "--cache", "none", "--socket-path", sock,
                                     image], cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT)
            self.assertOneErrorLine(result, image, "cache=none", "refuses O_DIRECT")
            self.assertEqual(result.returncode, 1)
            self.assertFalse(os.path.exists(sock))

    def test_blk_cache_and_aio_are_in_the_serving_line(self) -> None:
        image = make_image(self.dir, 1 << 20)
        sock = os.path.join(self.dir, "blk.sock")
        from vhost_min.aio import io_uring_available
        from vhost_min.blk import ENGINE_POLL_US
        cases = [(("--cache", "none", "--aio", "threads"), "cache none, aio threads, O_DIRECT alignment "),
                 (("--aio", "threads"), "cache writeback, aio threads)"),
                 (("--poll-us", "200"), "cache writeback, aio sync, busy-polling up to 200 us)"),
                 ((), "cache writeback, aio sync)")]
        if io_uring_available()[0]:         # (not under qemu-user: the thread pool stands in, logged)
            cases += [(("--aio", "io_uring"), f"aio io_uring, busy-polling up to {ENGINE_POLL_US} us)"),
                      (("--aio", "io_uring", "--poll-us", "0"), "cache writeback, aio io_uring)")]
        for args, said in cases:
            proc = subprocess.Popen([sys.executable, "-m", "vhost_min", "blk", *args, "--socket-path", sock, image],
                                    cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            try:
                line = proc.stdout.readline()
                self.assertIn(said, line)
            finally:
                stop_process(proc)

    def test_blk_poll_us_out_of_range(self) -> None:
        image = make_image(self.dir, 1 << 20)
        for bad in ("-1", "10001", "lots"):
            result = cli("blk", "--poll-us", bad, "--socket-path", os.path.join(self.dir, "blk.sock"), image)
            self.assertEqual(result.returncode, 2)
            self.assertIn(f"argument --poll-us: {bad!r} is not a number of microseconds from 0 to 10000",
                          result.stderr)

    def test_socket_paths_longer_than_af_unix_allows(self) -> None:
        image = make_image(self.dir, 1 << 20)
        long_path = os.path.join(self.dir, "s" * (120 - len(self.dir)))
        self.assertOneErrorLine(cli("blk", "--socket-path", long_path, image), long_path,
                                "longer than AF_UNIX allows (107)")
        self.assertOneErrorLine(cli("probe", long_path), long_path, "longer than AF_UNIX allows (107)")
        # The longest path that fits serves (no longer temporary name on the way).
        longest = os.path.join(self.dir, "s" * (106 - len(self.dir)))
        self.assertEqual(len(os.fsencode(longest)), 107)
        with blk_backend("--socket-path", longest, image):
            self.assertEqual(self.probe_json(longest)["config"]["capacity"], (1 << 20) // 512)
        self.assertFalse(os.path.exists(longest))

    def test_blk_on_a_socket_in_use(self) -> None:
        image = make_image(self.dir, 1 << 20)
        sock = os.path.join(self.dir, "blk.sock")
        with blk_backend("--socket-path", sock, image):
            self.assertOneErrorLine(cli("blk", "--socket-path", sock, image), sock, "in use")

    def test_blk_on_an_fd_that_is_not_a_socket(self) -> None:
        image = make_image(self.dir, 1 << 20)
        with open(image, "rb") as f:
            fd = f.fileno()
            result = cli("blk", "--fd", str(fd), image, pass_fds=(fd,))
        self.assertOneErrorLine(result, f"--fd {fd}", "non-socket")


# --------------------------------------------------------------------------------------------
# demo
# --------------------------------------------------------------------------------------------

_INTRO = re.compile(r"child process (\d+) on (\S+) ")


class DemoTest(AssertCli):
    def test_demo_verifies_and_summarizes(self) -> None:
        result = cli("demo", timeout=120)
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        self.assertEqual(result.stderr, "")
        out = result.stdout
        for fragment in ("VIRTIO_F_VERSION_1", "VIRTIO_BLK_F_FLUSH", "REPLY_ACK", "split", "MiB/s", "writes",
                         "reads", "every byte matches", "os.pread", "exit status 0"):
            self.assertIn(fragment, out)
        self.assertRegex(out, r"\n  protocol features\s+\S")
        pid, sock = _INTRO.search(out).groups()
        self.assertFalse(os.path.exists(os.path.dirname(sock)), "the temporary directory is left behind")
        self.assertFalse(_alive(int(pid)))

    def test_demo_packed(self) -> None:
        result = cli("demo", "--packed", "--mib", "8", timeout=120)
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        self.assertIn("VIRTIO_F_RING_PACKED", result.stdout)
        self.assertRegex(result.stdout, r"ring\s+packed")

    def test_ctrl_c_stops_the_child_and_removes_everything(self) -> None:
        # The demo takes well under a second; on a loaded machine it can finish before the test
        # gets to interrupt it (exit 0). Such a run proves nothing: try again, a few times.
        for attempt in range(5):
            status = self._interrupt_demo()
            if status != 0:
                break
        self.assertEqual(status, 130, "Ctrl-C never reached the demo mid-way in 5 attempts")

    def _interrupt_demo(self) -> int:
        """Run the demo, freeze its back-end so it is stuck mid-way, Ctrl-C it; on exit 130 check
        that nothing is left behind. Returns the demo's exit status."""
        # Ctrl-C as a terminal would deliver it: a shell's background job (or a CI runner) may have
        # started us with SIGINT ignored, which the demo would inherit and honour.
        proc = subprocess.Popen([sys.executable, "-m", "vhost_min", "demo"], cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        child = None
        try:
            match = _INTRO.search(proc.stdout.readline())
            self.assertIsNotNone(match)
            child, sock = int(match.group(1)), match.group(2)
            os.kill(child, signal.SIGSTOP)          # the back-end cannot answer: the demo is mid-way
            proc.send_signal(signal.SIGINT)
            time.sleep(0.2)
            os.kill(child, signal.SIGCONT)
            status = proc.wait(TIMEOUT)
            if status == 0:
                return 0
            self.assertEqual(status, 130)
            self.assertEqual(proc.stderr.read(), "")
            deadline = time.monotonic() + 5
            while _alive(child) and time.monotonic() < deadline:
                time.sleep(0.02)
            self.assertFalse(_alive(child), "the blk child process is still running")
            self.assertFalse(os.path.exists(os.path.dirname(sock)))
            return status
        finally:
            if child is not None and _alive(child):
                os.kill(child, signal.SIGCONT)
                os.kill(child, signal.SIGKILL)
            stop_process(proc)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


if __name__ == "__main__":
    unittest.main()
