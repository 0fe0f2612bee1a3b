"""The guest harness itself (tests/guest.py): Debian's 6.12 backports kernel boots under TCG,
loads the vhost modules, sees the project over 9p, and reports the script's real outcome.

Four boots of ~5 s each; the image is built first when the cache has none (~10 s, plus the
download of ~120 MB of packages).
"""

from __future__ import annotations

import os
import socket
import tempfile
import unittest

from tests import guest

PROBE = r"""
echo "release=$(uname -r)"
[ -c /dev/vhost-net ] && echo "vhost_net_node=yes"
[ -c /dev/vduse/control ] && echo "vduse_control=yes"
[ -d /sys/bus/vdpa ] && echo "vdpa_bus=yes"
echo "modules=$(cut -d' ' -f1 /proc/modules | sort | tr '\n' ' ')"
python3 -c 'import vhost_min.errors as e; print("python_import=" + e.__file__)'
touch /src/written-by-guest 2>/dev/null || echo "src_readonly=yes"
"""


def _facts(stdout: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in stdout.splitlines() if "=" in line)


class GuestHarnessTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls) -> None:
        guest.require_guest()
        cls.image = guest.ensure_built()
        cls.probe = guest.Guest(modules=["vhost_net", "vhost_vdpa", "vduse"]).run(PROBE, timeout=60)
        cls.facts = _facts(cls.probe.stdout)

    def test_probe_succeeded(self) -> None:
        self.probe.check()
        self.assertFalse(self.probe.timed_out)
        self.assertIn("vhost_min-guest: exit status 0", self.probe.console)

    def test_kernel_is_the_612_backports_one(self) -> None:
        release = self.facts.get("release", "")
        self.assertRegex(release, r"^6\.12\.\d+\+deb12-amd64$")
        self.assertEqual(release, self.image.release)
        kernel_deb = self.image.packages[f"linux-image-{release}"]
        self.assertIn("bpo12", kernel_deb, "the kernel package should come from bookworm-backports")

    def test_vhost_vdpa_and_vduse_modules_load(self) -> None:
        self.assertEqual(self.facts.get("vhost_net_node"), "yes", self.probe.output)
        self.assertEqual(self.facts.get("vduse_control"), "yes", self.probe.output)
        self.assertEqual(self.facts.get("vdpa_bus"), "yes", self.probe.output)
        loaded = set(self.facts.get("modules", "").split())
        for module in ("vhost_net", "vhost", "vhost_iotlb", "tun", "tap", "vhost_vdpa", "vdpa", "vduse"):
            self.assertIn(module, loaded)

    def test_python_imports_the_project_from_the_9p_share(self) -> None:
        self.assertEqual(self.facts.get("python_import"), "/src/vhost_min/errors.py", self.probe.output)

    def test_the_source_share_is_read_only(self) -> None:
        self.assertEqual(self.facts.get("src_readonly"), "yes")
        self.assertFalse(os.path.exists(os.path.join(guest.PROJECT_ROOT, "written-by-guest")))

    def test_a_cached_image_is_reused_without_rebuilding(self) -> None:
        def stamps() -> dict[str, int]:
            return {name: os.stat(os.path.join(self.image.directory, name)).st_mtime_ns
                    for name in os.listdir(self.image.directory)}
        before = stamps()
        logged: list[str] = []
        again = guest.ensure_built(log=logged.append)
        self.assertEqual(again.directory, self.image.directory)
        self.assertEqual(stamps(), before, "the cached image was written again")
        self.assertFalse([line for line in logged if "building" in line or "download" in line], logged)

    def test_unknown_module_is_refused_before_booting(self) -> None:
        with self.assertRaisesRegex(guest.GuestError, "no_such_module"):
            guest.Guest(modules=["no_such_module"]).run("true")

    def test_nonzero_status_and_both_streams_come_back(self) -> None:
        result = guest.Guest().run("echo to-stdout; echo to-stderr >&2; exit 7", timeout=30)
        self.assertEqual(result.status, 7)
        self.assertFalse(result.timed_out)
        self.assertEqual(result.stdout, "to-stdout\n")
        self.assertEqual(result.stderr, "to-stderr\n")
        with self.assertRaisesRegex(guest.GuestError, "exited with status 7"):
            result.check()

    def test_the_guest_timeout_stops_a_hanging_script(self) -> None:
        result = guest.Guest().run("echo started; sleep 600; echo never", timeout=3)
        self.assertTrue(result.timed_out)
        self.assertNotEqual(result.status, 0)
        self.assertEqual(result.stdout, "started\n")
        self.assertLess(result.seconds, 60)

    def test_the_host_serves_a_socket_while_the_guest_runs(self) -> None:
        # The peers tier's shape: the test owns a socket, QEMU connects to it, the test talks to
        # the guest through it between start() and wait(). Here a virtio-serial port.
        script = r"""
for port in /sys/class/virtio-ports/*; do
    [ "$(cat "$port/name")" = vhost_min.probe ] && dev=/dev/${port##*/}
done
exec 3<>"$dev"  # one open for both ways: the guest kernel drops what arrives on a closed port
echo "hello from $(uname -r)" >&3
read -r reply <&3
echo "host said: $reply"
"""
        with tempfile.TemporaryDirectory() as tmp, socket.socket(socket.AF_UNIX) as server:
            path = os.path.join(tmp, "port.sock")
            server.bind(path)
            server.listen(1)
            server.settimeout(60)
            args = ["-chardev", f"socket,id=port0,path={path}", "-device", "virtio-serial-pci",
                    "-device", "virtserialport,chardev=port0,name=vhost_min.probe"]
            with guest.Guest(args) as vm:
                vm.start(script, timeout=30)
                conn, _ = server.accept()
                with conn:
                    conn.settimeout(60)
                    greeting = conn.makefile("rb").readline().decode()
                    conn.sendall(b"pong\n")
                    result = vm.wait()
        self.assertEqual(greeting, f"hello from {self.image.release}\n")
        result.check()
        self.assertEqual(result.stdout, "host said: pong\n")


if __name__ == "__main__":
    unittest.main()
