"""The guest harness itself (tests/guest.py): Debian's 6.12 backports kernel boots under TCG,
loads the vhost modules and the vdpa_sim modules built for it, sees the project over 9p, takes
extra kernel arguments, and reports the script's real outcome.

Six boots of ~7 s each; the image is built first when the cache has none (~40 s: ~285 MB of
packages downloaded, vdpa_sim compiled).
"""

from __future__ import annotations

import json
import os
import re
import socket
import tempfile
import unittest

from tests import guest, support

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
        built = os.path.join(support.cache_dir("guest"), "modules", self.image.sim_modules)

        def stamps() -> dict[str, int]:
            return {path: os.stat(path).st_mtime_ns for d in (self.image.directory, built)
                    for path in (os.path.join(d, name) for name in os.listdir(d))}
        before = stamps()
        self.assertEqual(sorted(os.path.basename(p) for p in before if p.startswith(built)),
                         sorted(f"{name}.ko" for name in guest.SIM_MODULES))
        logged: list[str] = []
        again = guest.ensure_built(log=logged.append)
        self.assertEqual(again.directory, self.image.directory)
        self.assertEqual(stamps(), before, "the cached image or modules were written again")
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


#: In one boot: what `vdpa` says about the simulators, two devices added, and what appeared.
VDPA_SIM = r"""
echo "--- mgmtdev"; vdpa -j mgmtdev show; echo
vdpa dev add mgmtdev vdpasim_blk name vdpa0
vdpa dev add mgmtdev vdpasim_net name vdpa1
echo "--- dev"; vdpa -j dev show; echo
echo "--- nodes"
for node in /dev/vhost-vdpa-*; do [ -c "$node" ] && echo "$node"; done
echo "--- bound"
for dev in /sys/bus/vdpa/devices/*; do
    echo "${dev##*/} $(basename "$(readlink "$dev/driver")") $(cd "$dev" && echo vhost-vdpa-*)"
done
echo "--- target"
[ -d /sys/kernel/config/target/core ] && echo "configfs target/core"
echo "--- modules"
cut -d' ' -f1 /proc/modules | sort
"""


def _sections(stdout: str) -> dict[str, str]:
    """The '--- name' sections of a script's output."""
    return {m[1]: m[2].strip() for m in re.finditer(r"^--- (\w+)\n(.*?)(?=^--- |\Z)", stdout, re.M | re.S)}


class AddedModulesTest(unittest.TestCase):
    """What the image adds to Debian's kernel: vdpa_sim (built out of tree) and LIO (for vhost-scsi)."""

    @classmethod
    def setUpClass(cls) -> None:
        guest.require_guest()
        cls.result = guest.Guest(modules=["vhost_vdpa", "vdpa_sim_blk", "vdpa_sim_net", "tcm_loop",
                                          "target_core_file", "target_core_iblock"]).run(VDPA_SIM, timeout=60)
        cls.out = _sections(cls.result.stdout)

    def test_the_script_succeeded(self) -> None:
        self.result.check()

    def test_vdpa_lists_both_simulators(self) -> None:
        mgmt = json.loads(self.out["mgmtdev"])["mgmtdev"]
        self.assertEqual(sorted(mgmt), ["vdpasim_blk", "vdpasim_net"], self.result.output)
        self.assertEqual(mgmt["vdpasim_blk"]["supported_classes"], ["block"])
        self.assertEqual(mgmt["vdpasim_net"]["supported_classes"], ["net"])

    def test_added_devices_bind_to_vhost_vdpa(self) -> None:
        devices = json.loads(self.out["dev"])["dev"]
        self.assertEqual({name: (d["mgmtdev"], d["type"]) for name, d in devices.items()},
                         {"vdpa0": ("vdpasim_blk", "block"), "vdpa1": ("vdpasim_net", "network")})
        self.assertEqual(self.out["nodes"].splitlines(), ["/dev/vhost-vdpa-0", "/dev/vhost-vdpa-1"],
                         self.result.output)
        self.assertEqual(self.out["bound"].splitlines(),
                         ["vdpa0 vhost_vdpa vhost-vdpa-0", "vdpa1 vhost_vdpa vhost-vdpa-1"])

    def test_built_modules_and_their_dependencies_are_loaded(self) -> None:
        loaded = set(self.out["modules"].split())
        for module in (*guest.SIM_MODULES, "vhost_vdpa", "vdpa", "vhost_iotlb"):
            self.assertIn(module, loaded)

    def test_lio_loads_and_configfs_is_mounted(self) -> None:
        loaded = set(self.out["modules"].split())
        for module in ("target_core_mod", "target_core_file", "target_core_iblock", "tcm_loop", "configfs"):
            self.assertIn(module, loaded)
        self.assertEqual(self.out["target"], "configfs target/core", self.result.output)


class KernelCommandLineTest(unittest.TestCase):
    """``append`` reaches the kernel, and ``machine`` takes options: the vIOMMU set-up."""

    def test_append_and_machine_options_for_a_viommu(self) -> None:
        guest.require_guest()
        vm = guest.Guest(["-device", "intel-iommu,intremap=on"], machine="q35,kernel-irqchip=split",
                         append=["intel_iommu=on", "iommu=strict"])
        result = vm.run("cat /proc/cmdline; ls /sys/class/iommu", timeout=60).check()
        cmdline, iommus = result.stdout.splitlines()
        self.assertEqual(cmdline.split()[-2:], ["intel_iommu=on", "iommu=strict"], result.output)
        self.assertEqual(iommus, "dmar0", result.output)

    def test_a_string_is_refused_where_arguments_are_expected(self) -> None:
        with self.assertRaisesRegex(TypeError, "append"):
            guest.Guest(append="intel_iommu=on")


class ModuleBuildErrorTest(unittest.TestCase):
    """A failing step of the vdpa_sim build names the step and shows the compiler's tail."""

    def test_a_compiler_error_is_reported_with_the_step(self) -> None:
        support.require_commands(*guest.BUILD_COMMANDS, install=guest.INSTALL)
        with tempfile.TemporaryDirectory() as tmp:
            source = os.path.join(tmp, "broken.c")
            with open(source, "w") as f:
                f.write("int main(void) { return undeclared_here; }\n")
            with self.assertRaises(guest.GuestError) as caught:
                guest._build_step("compile broken.c", ["gcc-12", "-c", "-o", os.devnull, source])
        message = str(caught.exception)
        self.assertIn(f"building {', '.join(guest.SIM_MODULES)}: compile broken.c failed (exit 1)", message)
        self.assertRegex(message, r"broken\.c:1:\d+: error: .undeclared_here. undeclared")


if __name__ == "__main__":
    unittest.main()
