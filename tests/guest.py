"""A throwaway Linux guest under QEMU (TCG) for the peers and kernel test tiers.

The image is Debian's own: the bookworm-backports 6.12 kernel (vhost-net, vhost-vsock,
vhost-scsi, vDPA and VDUSE as modules) and a busybox + python3.11 userland, fetched with
``apt-get download`` through a private sources list (the host's apt state is not touched),
unpacked with ``dpkg-deb -x`` and packed into an initramfs here (modules decompressed, their
dependencies taken from each module's .modinfo: the package ships no modules.dep). The vDPA
simulators Debian's kernel lacks (:data:`SIM_MODULES`) are compiled here, with the host's gcc-12
and make, from the kernel's own version of ``linux-source`` against its headers packages, which
are unpacked, never installed.

Everything is cached outside the clone, in ``support.cache_dir("guest")``:

- ``images/KEY/``: ``vmlinuz``, ``initrd.img`` and ``manifest.json`` (the module table), KEY
  from the package versions, :data:`HARNESS_VERSION` and the text of this file and of /init;
  ``current-HARNESSKEY.json`` names the image this harness uses. A cached boot reads these and
  nothing else (no apt, no network, no compiler).
- ``modules/KEY/*.ko``: the built SIM_MODULES, KEY from the versions of the packages they were
  built from, the recipe and HARNESS_VERSION (editing this file rebuilds the image, not them).
- ``debs/``: the image's packages (those the modules were built from are dropped once built);
  ``apt/``: the private apt's sources, lists and cache.

How a run travels (see tests/guest_init.sh, the guest's /init):

- The project root is shared read-only with 9p (tag ``vhost_min_src``) on /src; it is the
  script's cwd and on PYTHONPATH, so guest-side ``python3 -c "import vhost_min"`` works.
- A per-run temporary directory is shared writable (tag ``vhost_min_ctl``) on /ctl. The host
  writes ``config``, ``modules`` and ``script`` into it; the guest writes the script's
  ``stdout`` and ``stderr`` there, then ``status`` last (by rename), syncs and powers off. 9p
  without a cache mode writes through to the host, so what QEMU leaves behind when it exits is
  complete. No status file means the run failed before or around the script: the host raises
  :class:`GuestError` with the guest's own ``setup_error`` (when it wrote one) and the tail of
  the serial console, which QEMU writes to a file (``GuestResult.console``).
- Bounds: the guest kills the script after ``timeout`` seconds (``GuestResult.timed_out``);
  the host kills QEMU, by its PID, ``boot_timeout`` seconds after that, and raises.
- The guest's shell is busybox's, which runs its own applets before PATH: call iproute2's
  ``/usr/bin/ip`` by its full path (``vdpa`` has no applet; python's subprocess uses PATH).
  ``modprobe`` works, and the kernel autoloads modules by alias (``ip link add type veth``).

Use::

    with Guest(extra_qemu_args=[...], memfd_memory=True, modules=["vhost_net", "vdpa_sim_blk"],
               machine="q35,kernel-irqchip=split", append=["intel_iommu=on"]) as guest:
        guest.start("ls /dev/vhost-net", timeout=60)
        ...                         # serve a vhost-user socket from this process meanwhile
        result = guest.wait()       # GuestResult: .status .stdout .stderr .output .console
    Guest().run("uname -r").check()

CLI: ``python3 -m tests.guest build`` (what CI runs before the tests), ``python3 -m tests.guest
run 'uname -a; lsmod'``, ``python3 -m tests.guest info``.
"""

from __future__ import annotations

import argparse
import compileall
import dataclasses
import fcntl
import gzip
import hashlib
import json
import os
import py_compile
import re
import shlex
import shutil
import stat
import struct
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from fnmatch import fnmatchcase
from typing import BinaryIO

from tests import support

#: Bump when the image layout or the module build changes in a way the package versions do not
#: show (it keys the built vdpa_sim modules too, which the text of this file does not).
HARNESS_VERSION = 2

#: The command that provides what building and running a guest needs on the host (apt-get and
#: dpkg-deb are part of every Debian system; gcc-12 is the compiler Debian built the kernel with).
INSTALL = "apt-get install -y qemu-system-x86 cpio busybox-static gcc-12 make"
QEMU = "qemu-system-x86_64"
#: What booting a guest (and fetching its packages) needs.
HOST_COMMANDS = (QEMU, "apt-get", "dpkg-deb")
#: What building the out-of-tree modules needs besides (strip comes with gcc-12's binutils).
BUILD_COMMANDS = ("gcc-12", "make", "strip")

#: Where the kernel comes from: the metapackage in this suite names the versioned image package.
KERNEL_SUITE_SUFFIX = "-backports"
KERNEL_META_PACKAGE = "linux-image-amd64"

#: Userland packages, with the files kept from each (None: all but documentation and such).
USERLAND: dict[str, tuple[str, ...] | None] = {
    "busybox-static": None,
    "libc6": None,
    "python3.11-minimal": None,
    "libpython3.11-minimal": None,
    "libpython3.11-stdlib": None,
    "zlib1g": None,
    "libexpat1": None,
    "libffi8": None,
    "libbz2-1.0": None,
    "liblzma5": None,
    "libuuid1": None,
    # iproute2's `vdpa` (vDPA management) and a full `ip` (veth, tuntap), and their libraries.
    "iproute2": ("bin/ip", "sbin/vdpa", "etc/iproute2/*"),
    "libmnl0": None,
    "libcap2": None,
    "libelf1": None,
    "libbpf1": None,
    "libbsd0": None,
    "libmd0": None,
}

#: Files nobody runs in a test guest (paths relative to the package root; fnmatch patterns).
PRUNE = (
    "usr/share/doc/*", "usr/share/man/*", "usr/share/info/*", "usr/share/lintian/*",
    "usr/share/locale/*", "usr/share/bug/*", "usr/share/binfmts/*", "usr/share/applications/*",
    "usr/share/pixmaps/*", "usr/share/gdb/*", "usr/lib/x86_64-linux-gnu/gconv/*",
    "usr/lib/python3.11/test/*", "usr/lib/python3.11/idlelib/*", "usr/lib/python3.11/tkinter/*",
    "usr/lib/python3.11/turtledemo/*", "usr/lib/python3.11/ensurepip/*",
    "usr/lib/python3.11/lib2to3/*", "usr/lib/python3.11/pydoc_data/*",
    "usr/lib/python3.11/*/test/*", "usr/lib/python3.11/*/tests/*",
    "usr/lib/python3.11/config-3.11-*", "etc/python3.11/*",
    # Extension modules whose libraries the guest does not carry (ssl, sqlite, curses, ...).
    *(f"usr/lib/python3.11/lib-dynload/{m}.cpython-311-*.so" for m in (
        "_crypt", "_curses", "_curses_panel", "_dbm", "_hashlib", "_sqlite3", "_ssl", "nis",
        "readline")),
)

#: Modules (and, automatically, their dependencies) the image carries; built-in ones are noted
#: and skipped. Callers load any of these with ``Guest(modules=[...])``.
IMAGE_MODULES = (
    "virtio_pci", "virtio_blk", "virtio_net", "virtio_scsi", "virtio_console", "virtio_rng",
    "virtiofs", "vmw_vsock_virtio_transport", "vsock_loopback", "9p", "9pnet_virtio",
    "vhost", "vhost_iotlb", "vhost_net", "vhost_vsock", "vhost_scsi", "vhost_vdpa",
    "vdpa", "vduse", "virtio_vdpa", "tun", "tap", "veth", "loop", "sd_mod",
    # vDPA devices without hardware (built here, see SIM_MODULES): `vdpa dev add mgmtdev
    # vdpasim_blk|vdpasim_net` gives /dev/vhost-vdpa-N.
    "vdpa_sim_blk", "vdpa_sim_net",
    # LIO, the SCSI target vhost-scsi serves (configfs comes with it; /init mounts it).
    "target_core_mod", "target_core_file", "target_core_iblock", "tcm_loop",
)

#: Modules Debian's kernel lacks (CONFIG_VDPA_SIM is not set), built out of tree from its
#: ``linux-source-<major.minor>`` against ``linux-headers-<release>``, its ``-common`` and
#: ``linux-kbuild`` packages of the very version the image carries, with gcc-12. vringh is what
#: the simulators need (CONFIG_VHOST_RING is not set either).
SIM_MODULES = ("vringh", "vdpa_sim", "vdpa_sim_net", "vdpa_sim_blk")
#: Their sources in the kernel tree: everything they include is in the headers packages.
SIM_SOURCES = ("drivers/vhost/vringh.c", "drivers/vdpa/vdpa_sim/vdpa_sim.h",
               "drivers/vdpa/vdpa_sim/vdpa_sim.c", "drivers/vdpa/vdpa_sim/vdpa_sim_net.c",
               "drivers/vdpa/vdpa_sim/vdpa_sim_blk.c")
#: make's variables for the build: no BTF for these modules (that needs pahole, and nothing in
#: a test guest reads it), so the result does not depend on whether the host has pahole.
SIM_MAKE_VARIABLES = ("CONFIG_DEBUG_INFO_BTF_MODULES=",)

#: Loaded by /init before anything else: the 9p shares need them.
BOOT_MODULES = ("9pnet_virtio", "9p")

SRC_TAG = "vhost_min_src"
CTL_TAG = "vhost_min_ctl"
PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INIT_TEMPLATE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "guest_init.sh")

#: Kernel command line: serial console (the full log costs no measurable time), no reboot loop,
#: and no Spectre/Meltdown mitigations (each one is pure overhead under TCG).
KERNEL_APPEND = "console=ttyS0 panic=-1 mitigations=off"


class GuestError(RuntimeError):
    """The guest could not be built, booted or run to a result; the message says which step."""


def console_tail(text: str, lines: int = 40) -> str:
    """The last ``lines`` lines of a console log, indented for an exception message."""
    tail = text.rstrip("\n").splitlines()[-lines:]
    return "\n".join("    " + line for line in tail) or "    (empty)"


# --- host prerequisites -----------------------------------------------------------------------

def missing_prerequisites(build: bool = True) -> list[str]:
    """The host commands a guest needs that are not installed (empty when all are there);
    ``build``: those that building the image needs too."""
    return [c for c in HOST_COMMANDS + (BUILD_COMMANDS if build else ()) if shutil.which(c) is None]


def have_prerequisites() -> bool:
    """Whether this host can build and boot the guest (QEMU, apt-get, dpkg-deb, gcc-12, make)."""
    return not missing_prerequisites()


def require_guest() -> None:
    """Skip (locally) or fail (CI=true) a test when the host cannot run a guest (or, when no
    image is cached, cannot build one)."""
    cached = _current_image(_current_path()) is not None
    support.require_commands(*HOST_COMMANDS, *(() if cached else BUILD_COMMANDS), install=INSTALL)


# --- apt, privately ---------------------------------------------------------------------------

def _host_debian_sources() -> list[tuple[str, str, str]]:
    """(uri, suite, signed_by) of every enabled Debian ``deb`` source the host's apt uses."""
    found: list[tuple[str, str, str]] = []
    files = ["/etc/apt/sources.list"]
    parts = "/etc/apt/sources.list.d"
    if os.path.isdir(parts):
        files += sorted(os.path.join(parts, n) for n in os.listdir(parts))
    keyring = "/usr/share/keyrings/debian-archive-keyring.gpg"
    for path in files:
        if not os.path.isfile(path):
            continue
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
        if path.endswith(".sources"):
            for stanza in re.split(r"\n\s*\n", text):
                fields: dict[str, str] = {}
                for line in stanza.splitlines():
                    if line.startswith("#") or ":" not in line:
                        continue
                    key, _, value = line.partition(":")
                    fields[key.strip().lower()] = value.strip()
                if "deb" not in fields.get("types", "").split() or fields.get("enabled", "yes") == "no":
                    continue
                for uri in fields.get("uris", "").split():
                    for suite in fields.get("suites", "").split():
                        found.append((uri, suite, fields.get("signed-by", keyring)))
        elif path.endswith(".list"):
            for line in text.splitlines():
                m = re.match(r"\s*deb\s+(?:\[([^]]*)\]\s+)?(\S+)\s+(\S+)", line)
                if m:
                    signed = re.search(r"signed-by=(\S+)", m.group(1) or "")
                    found.append((m.group(2), m.group(3), signed.group(1) if signed else keyring))
    return [s for s in found if "debian" in s[0] and os.path.exists(s[2])]


class _Apt:
    """apt-get/apt-cache with their own sources list, lists and cache dirs under ``root``."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.lists = os.path.join(root, "lists")
        os.makedirs(os.path.join(self.lists, "partial"), exist_ok=True)
        os.makedirs(os.path.join(root, "cache"), exist_ok=True)
        self.sources = os.path.join(root, "sources.list")
        self.options = [
            "-o", f"Dir::Etc::SourceList={self.sources}", "-o", "Dir::Etc::SourceParts=/dev/null",
            "-o", f"Dir::State::Lists={self.lists}", "-o", f"Dir::Cache={root}/cache",
            "-o", "Dir::Etc::Preferences=/dev/null", "-o", "Dir::Etc::PreferencesParts=/dev/null",
            "-o", "APT::Sandbox::User=root", "-q",
        ]
        self.codename = ""

    def write_sources(self) -> None:
        """The host's Debian sources plus ``<codename>-backports`` on the same mirror."""
        sources = _host_debian_sources()
        suites = [s for _, s, _ in sources]
        base = [s for s in sources if "-" not in s[1]]
        if not base:
            raise GuestError("found no Debian mirror in /etc/apt/sources.list(.d) to fetch the guest from")
        uri, self.codename, key = base[0]
        lines = [f"deb [signed-by={k}] {u} {s} main" for u, s, k in sources]
        if self.codename + KERNEL_SUITE_SUFFIX not in suites:
            lines.append(f"deb [signed-by={key}] {uri} {self.codename}{KERNEL_SUITE_SUFFIX} main")
        with open(self.sources, "w") as f:
            f.write("\n".join(lines) + "\n")

    def _run(self, tool: str, *args: str, cwd: str | None = None) -> str:
        proc = subprocess.run([tool, *self.options, *args], cwd=cwd, capture_output=True, text=True,
                              stdin=subprocess.DEVNULL, timeout=600)
        if proc.returncode:
            raise GuestError(f"{tool} {' '.join(args[:3])}... failed ({proc.returncode}):\n"
                             f"{console_tail(proc.stderr + proc.stdout, 15)}")
        return proc.stdout

    def update(self) -> None:
        self.write_sources()
        self._run("apt-get", "update")

    def kernel_package(self) -> tuple[str, str]:
        """(name, version) of the versioned image package (linux-image-6.12.N+debN-amd64) the
        backports metapackage depends on."""
        suite = self.codename + KERNEL_SUITE_SUFFIX
        out = self._run("apt-cache", "show", f"{KERNEL_META_PACKAGE}/{suite}")
        m = re.search(r"^Depends:\s*(linux-image-[^\s,(]+)\s*\(=\s*([^)\s]+)\)", out, re.M)
        if not m:
            raise GuestError(f"apt-cache show {KERNEL_META_PACKAGE}/{suite} names no linux-image "
                             "package of an exact version")
        return m.group(1), m.group(2)

    def module_build_packages(self, release: str, version: str) -> list[str]:
        """``name=version`` of what building SIM_MODULES for kernel ``release`` needs: its headers,
        the -common headers and linux-kbuild they depend on, and linux-source, all of the image's
        own ``version`` (the same upstream version and ABI, or apt fails to find them)."""
        headers = f"linux-headers-{release}"
        out = self._run("apt-cache", "show", f"{headers}={version}")
        depends = re.search(r"^Depends:(.*)$", out, re.M)
        names = [alt.split()[0] for alt in re.split(r"[,|]", depends.group(1) if depends else "") if alt.strip()]
        common = [n for n in names if n.startswith("linux-headers-") and n.endswith("-common")]
        kbuild = [n for n in names if n.startswith("linux-kbuild-")]
        upstream = re.match(r"\d+\.\d+", version)
        if len(common) != 1 or len(kbuild) != 1 or not upstream:
            raise GuestError(f"cannot tell the -common headers and linux-kbuild packages from "
                             f"{headers} {version}: Depends: {names}")
        return [f"{p}={version}" for p in (headers, common[0], kbuild[0], f"linux-source-{upstream.group()}")]

    def resolve(self, packages: Iterable[str]) -> dict[str, str]:
        """package -> the .deb file name ``apt-get download`` would fetch (it carries the version).
        A package may be given as ``name=version``; the key is then the name."""
        packages = list(packages)
        out = self._run("apt-get", "download", "--print-uris", *packages)
        files = {}
        for line in out.splitlines():
            m = re.match(r"'[^']*' (\S+\.deb) ", line)
            if m:
                files[m.group(1).split("_", 1)[0]] = m.group(1)
        missing = {p.split("=", 1)[0] for p in packages} - set(files)
        if missing:
            raise GuestError(f"apt-get download --print-uris did not resolve {sorted(missing)}")
        return files

    def download(self, packages: Iterable[str], dest: str) -> None:
        packages = list(packages)
        if packages:
            self._run("apt-get", "download", *packages, cwd=dest)


# --- ELF: a module's .modinfo and a program's DT_NEEDED ----------------------------------------

def _elf_sections(data: bytes) -> dict[str, bytes]:
    """Section name -> contents of a little-endian ELF64 file."""
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise GuestError("not a little-endian ELF64 file")
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    headers = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    names = headers[shstrndx]
    strtab = data[names[4]:names[4] + names[5]]
    sections = {}
    for name, kind, _, _, offset, size, *_ in headers:
        if kind != 8:  # SHT_NOBITS has no bytes in the file
            sections[strtab[name:strtab.index(b"\0", name)].decode()] = data[offset:offset + size]
    return sections


def _modinfo(ko: bytes) -> dict[str, list[str]]:
    """A kernel module's .modinfo strings (``key=value``), grouped by key."""
    info: dict[str, list[str]] = {}
    for item in _elf_sections(ko).get(".modinfo", b"").split(b"\0"):
        key, sep, value = item.decode(errors="replace").partition("=")
        if sep:
            info.setdefault(key, []).append(value)
    return info


def _needed(binary: bytes) -> list[str]:
    """The shared libraries an ELF program or library names (DT_NEEDED)."""
    sections = _elf_sections(binary)
    dynamic, dynstr = sections.get(".dynamic", b""), sections.get(".dynstr", b"")
    needed = []
    for tag, value in struct.iter_unpack("<qQ", dynamic[:len(dynamic) // 16 * 16]):
        if tag == 0:
            break
        if tag == 1:
            needed.append(dynstr[value:dynstr.index(b"\0", value)].decode())
    return needed


def _module_name(filename: str) -> str:
    """vhost_net from .../vhost_net.ko.xz (kbuild treats - and _ alike)."""
    return re.sub(r"\.ko(\.[a-z]+)?$", "", os.path.basename(filename)).replace("-", "_")


def _read_module(path: str) -> bytes:
    """A module file's ELF bytes (busybox insmod cannot decompress .ko.xz itself)."""
    with open(path, "rb") as f:
        data = f.read()
    if path.endswith(".xz"):
        import lzma                 # here, not at import: a minimal python (the arm64 root) lacks liblzma
        return lzma.decompress(data)
    if path.endswith(".gz"):
        return gzip.decompress(data)
    if path.endswith(".ko"):
        return data
    raise GuestError(f"{path}: no decompressor in the stdlib for this module format")


# --- initramfs --------------------------------------------------------------------------------

class _Cpio:
    """A newc ("070701") cpio archive, the format the kernel unpacks an initramfs from."""

    def __init__(self, out: BinaryIO) -> None:
        self.out = out
        self.ino = 0x1000
        self.dirs: set[str] = set()

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        self.ino += 1
        encoded = name.encode() + b"\0"
        fields = (self.ino, mode, 0, 0, 2 if stat.S_ISDIR(mode) else 1, 0, len(data), 0, 0,
                  rdev[0], rdev[1], len(encoded), 0)
        header = b"070701" + b"".join(b"%08x" % v for v in fields)
        self.out.write(header + encoded + b"\0" * (-(len(header) + len(encoded)) % 4))
        self.out.write(data + b"\0" * (-len(data) % 4))

    def directory(self, name: str) -> None:
        if name in self.dirs or not name:
            return
        self.directory(os.path.dirname(name))
        self.dirs.add(name)
        self._entry(name, stat.S_IFDIR | 0o755)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self.directory(os.path.dirname(name))
        self._entry(name, stat.S_IFREG | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self.directory(os.path.dirname(name))
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def chardev(self, name: str, major: int, minor: int) -> None:
        self.directory(os.path.dirname(name))
        self._entry(name, stat.S_IFCHR | 0o600, rdev=(major, minor))

    def close(self) -> None:
        self._entry("TRAILER!!!", 0)


def _merged(path: str) -> str:
    """Debian's merged /usr: bin, sbin, lib and lib64 live under usr/ (the root has symlinks)."""
    return f"usr/{path}" if path.split("/", 1)[0] in ("bin", "sbin", "lib", "lib64") else path


def _pruned(path: str, keep: tuple[str, ...] | None) -> bool:
    """Whether a package file stays out of the image (not in ``keep``, or matched by PRUNE)."""
    if keep is not None and not any(fnmatchcase(path, k) for k in keep):
        return True
    return any(fnmatchcase(path, p) for p in PRUNE)


# --- the cached image -------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class GuestImage:
    """A built kernel + initramfs pair and what it holds."""

    directory: str
    release: str                      #: ``uname -r`` of the guest kernel
    packages: dict[str, str]          #: package -> .deb file it came from
    modules: dict[str, dict]          #: name -> {"path": in the guest, "depends": [...]}
    builtin: list[str]                #: module names built into the kernel
    build_packages: dict[str, str] = dataclasses.field(default_factory=dict)
    """package -> .deb file SIM_MODULES were built from (not kept in the cache once built)"""
    sim_modules: str = ""             #: the key of the built SIM_MODULES in the cache's modules/

    @property
    def kernel(self) -> str:
        return os.path.join(self.directory, "vmlinuz")

    @property
    def initrd(self) -> str:
        return os.path.join(self.directory, "initrd.img")

    def load_order(self, names: Iterable[str]) -> list[tuple[str, str]]:
        """(name, guest path) for ``names`` and their dependencies, dependencies first.

        Built-in modules are left out; an unknown name raises GuestError.
        """
        order: list[tuple[str, str]] = []
        seen: set[str] = set()

        def visit(name: str, chain: tuple[str, ...]) -> None:
            name = name.replace("-", "_")
            if name in seen or name in self.builtin:
                return
            if name not in self.modules:
                raise GuestError(f"module {name!r} is neither in the guest image nor built into "
                                 f"{self.release}; add it to IMAGE_MODULES" + (f" (needed by {chain[-1]})" if chain else ""))
            seen.add(name)
            for dep in self.modules[name]["depends"]:
                visit(dep, chain + (name,))
            order.append((name, self.modules[name]["path"]))

        for n in names:
            visit(n, ())
        return order

    @classmethod
    def load(cls, directory: str) -> "GuestImage":
        with open(os.path.join(directory, "manifest.json")) as f:
            m = json.load(f)
        return cls(directory, m["release"], m["packages"], m["modules"], m["builtin"],
                   m.get("build_packages", {}), m.get("sim_modules", ""))


def _local_key() -> str:
    """What, besides the package versions, decides the image: HARNESS_VERSION and the sources of
    this builder and of /init (an edited builder never boots a stale image)."""
    digest = hashlib.sha256(str(HARNESS_VERSION).encode())
    for path in (os.path.abspath(__file__), INIT_TEMPLATE):
        with open(path, "rb") as f:
            digest.update(f.read())
    return digest.hexdigest()[:16]


def _log(message: str) -> None:
    print(f"[guest] {message}", file=sys.stderr, flush=True)


def _current_path() -> str:
    """The file naming the image this harness version uses (one per harness version)."""
    return os.path.join(support.cache_dir("guest"), f"current-{_local_key()}.json")


def ensure_built(refresh: bool = False, log: Callable[[str], None] = _log) -> GuestImage:
    """The cached guest image, building it first when there is none for this harness.

    ``refresh`` asks apt for the current package versions (a network round trip) and rebuilds
    only if they changed; without it a usable cached image is returned without any download.
    Safe to call from several processes at once (a lock file serialises builders).
    """
    root = support.cache_dir("guest")
    current = _current_path()
    with open(os.path.join(root, "lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not refresh:
            image = _current_image(current)
            if image is not None:
                return image
        missing = missing_prerequisites()
        if missing:
            raise GuestError(f"cannot build the guest: {', '.join(missing)} missing; {INSTALL}")
        start = time.monotonic()
        apt = _Apt(os.path.join(root, "apt"))
        apt.update()
        kernel, version = apt.kernel_package()
        release = kernel.removeprefix("linux-image-")
        packages = apt.resolve([kernel, *USERLAND])
        build_packages = apt.resolve(apt.module_build_packages(release, version))
        key = hashlib.sha256((_local_key() + json.dumps([packages, build_packages], sort_keys=True))
                             .encode()).hexdigest()[:16]
        directory = os.path.join(root, "images", key)
        if not os.path.exists(os.path.join(directory, "manifest.json")):
            debs = os.path.join(root, "debs")
            os.makedirs(debs, exist_ok=True)
            absent = [p for p, f in packages.items() if not os.path.exists(os.path.join(debs, f))]
            if absent:
                log(f"downloading {len(absent)} packages")
                apt.download(absent, debs)
            built = _sim_modules(root, apt, build_packages, release, log)
            log(f"building image {key} ({kernel})")
            _build(directory, {p: os.path.join(debs, f) for p, f in packages.items()}, kernel,
                   built, build_packages, log)
            _prune_cache(root)
            log(f"built in {time.monotonic() - start:.1f} s")
        _atomic_write(current, json.dumps({"key": key}))
        return GuestImage.load(directory)


def _sim_key(build_packages: Mapping[str, str]) -> str:
    """What decides the built SIM_MODULES: the packages (their versions), the recipe, HARNESS_VERSION."""
    recipe = [HARNESS_VERSION, sorted(build_packages.items()), SIM_MODULES, SIM_SOURCES, SIM_MAKE_VARIABLES]
    return hashlib.sha256(json.dumps(recipe).encode()).hexdigest()[:16]


def _sim_modules(root: str, apt: _Apt, build_packages: Mapping[str, str], release: str,
                 log: Callable[[str], None]) -> dict[str, str]:
    """name -> built .ko of SIM_MODULES: from ``root``/modules/KEY when built before, else
    downloaded and compiled now (the .debs are dropped by the next _prune_cache)."""
    out = os.path.join(root, "modules", _sim_key(build_packages))
    built = {name: os.path.join(out, f"{name}.ko") for name in SIM_MODULES}
    if all(os.path.exists(path) for path in built.values()):
        return built
    debs = os.path.join(root, "debs")
    os.makedirs(debs, exist_ok=True)
    absent = [p for p, f in build_packages.items() if not os.path.exists(os.path.join(debs, f))]
    if absent:
        log(f"downloading {len(absent)} packages to build {', '.join(SIM_MODULES)}")
        apt.download([f"{p}={_deb_version(build_packages[p])}" for p in absent], debs)
    log(f"building {', '.join(SIM_MODULES)} for {release}")
    start = time.monotonic()
    _build_sim_modules(out, {p: os.path.join(debs, f) for p, f in build_packages.items()}, release)
    log(f"built {len(built)} modules in {time.monotonic() - start:.1f} s")
    return built


def _deb_version(filename: str) -> str:
    """6.12.95-1~bpo12+1 from linux-source-6.12_6.12.95-1~bpo12+1_all.deb (apt writes : as %3a)."""
    return filename.split("_")[1].replace("%3a", ":")


def _current_image(current: str) -> GuestImage | None:
    try:
        with open(current) as f:
            state = json.load(f)
        image = GuestImage.load(os.path.join(os.path.dirname(current), "images", state["key"]))
    except (OSError, ValueError, KeyError):
        return None
    return image if os.path.exists(image.kernel) and os.path.exists(image.initrd) else None


def _atomic_write(path: str, text: str) -> None:
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def _prune_cache(root: str, keep: int = 3) -> None:
    """Keep the ``keep`` newest images (two checkouts of different harness versions need not
    rebuild in turn) and the .debs they came from; drop the rest."""
    images = os.path.join(root, "images")
    manifests = sorted((os.path.join(images, n, "manifest.json") for n in os.listdir(images)),
                       key=lambda m: os.path.getmtime(m) if os.path.exists(m) else 0, reverse=True)
    used: set[str] = set()
    for i, manifest in enumerate(manifests):
        if i < keep and os.path.exists(manifest):
            image = GuestImage.load(os.path.dirname(manifest))
            used.update(image.packages.values())
            used.add(image.sim_modules)
        else:
            shutil.rmtree(os.path.dirname(manifest), ignore_errors=True)
    # The packages the modules were built from go: the built modules stay while an image uses them.
    debs = os.path.join(root, "debs")
    for name in os.listdir(debs):
        if name not in used:
            os.unlink(os.path.join(debs, name))
    built = os.path.join(root, "modules")
    for name in os.listdir(built) if os.path.isdir(built) else ():
        if name not in used:
            shutil.rmtree(os.path.join(built, name), ignore_errors=True)
    for name in os.listdir(root):
        if name.startswith("current-"):
            try:
                with open(os.path.join(root, name)) as f:
                    gone = not os.path.isdir(os.path.join(images, json.load(f)["key"]))
            except (OSError, ValueError, KeyError):
                gone = True
            if gone:
                os.unlink(os.path.join(root, name))


def _build(directory: str, debs: Mapping[str, str], kernel_package: str, built: Mapping[str, str],
           build_packages: Mapping[str, str], log: Callable[[str], None]) -> None:
    """Unpack the packages and write vmlinuz, initrd.img and manifest.json into ``directory``;
    ``built`` (name -> .ko) are the out-of-tree modules, from ``build_packages``."""
    parent = os.path.dirname(directory)
    os.makedirs(parent, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="build-", dir=parent) as tmp:
        out = os.path.join(tmp, "image")
        os.mkdir(out)
        kroot = os.path.join(tmp, "kernel")
        _dpkg_x(debs[kernel_package], kroot)
        kernel = _kernel_modules(kroot, built)
        release, modules, builtin = kernel.release, kernel.modules, kernel.builtin
        shutil.copyfile(os.path.join(kroot, "boot", f"vmlinuz-{release}"), os.path.join(out, "vmlinuz"))

        staging = os.path.join(tmp, "root")
        for package in USERLAND:
            pkg_root = os.path.join(tmp, "pkg", package)
            _dpkg_x(debs[package], pkg_root)
            _merge_package(pkg_root, staging, USERLAND[package])
        _compile_stdlib(staging)

        with open(os.path.join(out, "initrd.img"), "wb") as raw:
            cpio = _Cpio(raw)
            _pack_userland(cpio, staging)
            with open(INIT_TEMPLATE, "rb") as f:
                cpio.file("init", f.read(), 0o755)
            for name, data in kernel.files.items():
                cpio.file(_merged(modules[name]["path"].lstrip("/")), data)
            # modules.dep (paths relative to the release directory) lets scripts use modprobe.
            mod_dir = f"/lib/modules/{release}/"
            relative = {n: m["path"].removeprefix(mod_dir) for n, m in modules.items()}
            # Each line lists the whole closure, the module loaded last first, as depmod does.
            image = GuestImage(out, release, {}, modules, builtin)
            cpio.file(_merged(mod_dir.strip("/")) + "/modules.dep", "".join(
                f"{relative[n]}: {' '.join(relative[d] for d, _ in reversed(image.load_order([n])[:-1]))}\n"
                for n in modules).encode())
            cpio.file(_merged(mod_dir.strip("/")) + "/modules.builtin", kernel.builtin_text.encode())
            cpio.file(_merged(mod_dir.strip("/")) + "/modules.alias", "".join(kernel.aliases).encode())
            boot = image.load_order(BOOT_MODULES)
            cpio.file("etc/vhost_min/boot-modules", "".join(f"{n} {p}\n" for n, p in boot).encode())
            cpio.close()
        manifest = {"release": release, "packages": {p: os.path.basename(d) for p, d in debs.items()},
                    "modules": modules, "builtin": builtin, "harness_version": HARNESS_VERSION,
                    "build_packages": dict(build_packages), "sim_modules": _sim_key(build_packages)}
        with open(os.path.join(out, "manifest.json"), "w") as f:
            json.dump(manifest, f, indent=1, sort_keys=True)
        size = os.path.getsize(os.path.join(out, "initrd.img"))
        log(f"kernel {release}, {len(modules)} modules, initramfs {size / 2**20:.1f} MiB")
        shutil.rmtree(directory, ignore_errors=True)
        os.rename(out, directory)


def _dpkg_x(deb: str, dest: str) -> None:
    os.makedirs(dest, exist_ok=True)
    proc = subprocess.run(["dpkg-deb", "-x", deb, dest], capture_output=True, text=True)
    if proc.returncode:
        raise GuestError(f"dpkg-deb -x {deb} failed: {proc.stderr.strip()}")


# --- the out-of-tree modules (vdpa_sim and friends) ---------------------------------------------

def _build_sim_modules(out: str, debs: Mapping[str, str], release: str) -> None:
    """Compile SIM_MODULES for ``release`` and leave the stripped .ko files in ``out``.

    ``debs`` are the packages module_build_packages names (package -> .deb): the headers are
    unpacked (not installed) into a temporary root, the sources taken from linux-source's
    tarball, and kbuild run on them with the host's gcc-12. A failing step raises GuestError
    naming the step, with the tail of what it printed.
    """
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="build-", dir=parent) as tmp:
        root, src, build = (os.path.join(tmp, d) for d in ("root", "src", "build"))
        for package, deb in debs.items():
            if not package.startswith("linux-source-"):
                _dpkg_x(deb, root)
        headers = os.path.join(root, "usr", "src", f"linux-headers-{release}")
        makefile = os.path.join(headers, "Makefile")
        # That Makefile includes the -common one by its installed path (/usr/src/...): point it here.
        try:
            with open(makefile) as f:
                text = f.read()
        except OSError as e:
            raise GuestError(f"building {', '.join(SIM_MODULES)}: linux-headers-{release} has no Makefile: {e}") from e
        with open(makefile, "w") as f:
            f.write(re.sub(r"^include /", f"include {root}/", text, flags=re.M))
        [source_deb] = [deb for package, deb in debs.items() if package.startswith("linux-source-")]
        _extract_kernel_sources(source_deb, SIM_SOURCES, src)
        os.mkdir(build)
        for path in SIM_SOURCES:     # one flat directory: vdpa_sim.h is included as "vdpa_sim.h"
            shutil.copyfile(os.path.join(src, path), os.path.join(build, os.path.basename(path)))
        with open(os.path.join(build, "Kbuild"), "w") as f:
            f.write(f"obj-m := {' '.join(f'{name}.o' for name in SIM_MODULES)}\n")
        _build_step("make modules", ["make", "-C", headers, f"M={build}", f"-j{os.cpu_count() or 1}",
                                     *SIM_MAKE_VARIABLES, "modules"])
        staged = os.path.join(tmp, "out")
        os.mkdir(staged)
        for name in SIM_MODULES:
            ko = os.path.join(staged, f"{name}.ko")
            _build_step(f"strip {name}.ko", ["strip", "--strip-debug", "-o", ko, os.path.join(build, f"{name}.ko")])
        shutil.rmtree(out, ignore_errors=True)
        os.rename(staged, out)


def _build_step(step: str, argv: list[str], timeout: float = 600) -> None:
    """Run one step of the module build; GuestError with the step and its output's tail on failure."""
    what = f"building {', '.join(SIM_MODULES)}: {step}"
    try:
        proc = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, errors="replace", timeout=timeout)
    except subprocess.TimeoutExpired as e:
        output = e.output.decode(errors="replace") if isinstance(e.output, bytes) else e.output or ""
        raise GuestError(f"{what} did not finish in {timeout:.0f} s:\n{console_tail(output, 30)}") from e
    except OSError as e:
        raise GuestError(f"{what} could not start ({e}); {INSTALL}") from e
    if proc.returncode:
        raise GuestError(f"{what} failed (exit {proc.returncode}): {' '.join(argv)}\n"
                         f"{console_tail(proc.stdout, 30)}")


def _extract_kernel_sources(deb: str, paths: Sequence[str], dest: str) -> None:
    """Copy ``paths`` (relative to the kernel tree) out of linux-source's .deb into ``dest``.

    The package holds one tarball, usr/src/linux-source-X.Y.tar.xz (~150 MB, ~1.5 GB unpacked);
    both are read as streams, nothing else is written, and reading stops at the last file wanted.
    """
    import lzma                     # here, not at import: a minimal python (the arm64 root) lacks liblzma
    what = f"building {', '.join(SIM_MODULES)}: extract sources from {os.path.basename(deb)}"
    left = set(paths)
    with tempfile.TemporaryFile() as stderr:
        proc = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", deb], stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=stderr)
        try:
            with tarfile.open(fileobj=proc.stdout, mode="r|") as outer:
                for member in outer:
                    if not re.fullmatch(r"(\./)?usr/src/linux-source-[0-9.]+\.tar\.xz", member.name):
                        continue
                    with tarfile.open(fileobj=outer.extractfile(member), mode="r|xz") as tree:
                        for item in tree:
                            rel = item.name.split("/", 1)[-1]      # under linux-source-X.Y/
                            if rel in left and item.isfile():
                                os.makedirs(os.path.join(dest, os.path.dirname(rel)), exist_ok=True)
                                with open(os.path.join(dest, rel), "wb") as f:
                                    shutil.copyfileobj(tree.extractfile(item), f)
                                left.discard(rel)
                                if not left:
                                    break
                    break
        except (tarfile.TarError, EOFError, lzma.LZMAError) as e:
            stderr.seek(0)
            raise GuestError(f"{what}: {e}\n{console_tail(stderr.read().decode(errors='replace'), 10)}") from e
        finally:
            proc.stdout.close()      # dpkg-deb, when stopped early, ends on the closed pipe
            if proc.poll() is None:
                proc.kill()
            proc.wait()
    if left:
        raise GuestError(f"{what}: the source tree lacks {sorted(left)}")


@dataclasses.dataclass
class _Kernel:
    """What the image takes from the kernel package."""

    release: str
    modules: dict[str, dict]     #: the IMAGE_MODULES closure: name -> {"path", "depends"}
    builtin: list[str]           #: names in IMAGE_MODULES that are built in
    files: dict[str, bytes]      #: name -> the module, decompressed
    aliases: list[str]           #: modules.alias lines (request_module and modprobe use them)
    builtin_text: str            #: the package's modules.builtin


def _kernel_modules(kroot: str, built: Mapping[str, str]) -> _Kernel:
    """Pick IMAGE_MODULES and their dependencies (from each module's .modinfo) out of an
    unpacked linux-image package and the out-of-tree ``built`` ones (name -> .ko), which go to
    extra/ as kbuild installs them."""
    releases = os.listdir(os.path.join(kroot, "lib", "modules"))
    if len(releases) != 1:
        raise GuestError(f"expected one kernel release in the image package, found {releases}")
    release = releases[0]
    mod_root = os.path.join(kroot, "lib", "modules", release)
    available: dict[str, str] = {}      # name -> file
    guest_path: dict[str, str] = {}     # name -> path under mod_root in the guest
    for dirpath, _, filenames in os.walk(os.path.join(mod_root, "kernel")):
        for filename in filenames:
            if ".ko" in filename:
                name = _module_name(filename)
                available[name] = os.path.join(dirpath, filename)
                guest_path[name] = re.sub(r"[.](xz|gz)$", "", os.path.relpath(available[name], mod_root))
    for name, path in built.items():
        if name in available:
            raise GuestError(f"{name} is both built here and in {release}: drop it from SIM_MODULES")
        available[name], guest_path[name] = path, f"extra/{name}.ko"
    with open(os.path.join(mod_root, "modules.builtin")) as f:
        all_builtin = {_module_name(line.strip()) for line in f if line.strip()}

    modules: dict[str, dict] = {}
    files: dict[str, bytes] = {}
    builtin: set[str] = set()
    aliases: list[str] = []
    pending = list(IMAGE_MODULES)
    while pending:
        name = pending.pop().replace("-", "_")
        if name in modules or name in builtin:
            continue
        if name in all_builtin:
            builtin.add(name)
            continue
        if name not in available:
            raise GuestError(f"kernel {release} has no module {name!r} (neither loadable nor built in)")
        data = _read_module(available[name])
        info = _modinfo(data)
        vermagic = info.get("vermagic", [""])[0].split(" ", 1)[0]
        if vermagic != release:
            raise GuestError(f"{available[name]} is for kernel {vermagic!r}, the image's is {release!r}")
        depends = [d for d in ",".join(info.get("depends", [])).split(",") if d]
        # "softdep=pre: a b post: c": load the pre- ones first when this kernel has them.
        for soft in info.get("softdep", []):
            pre = re.search(r"pre:\s*([^:]*?)(?:\s+post:|$)", soft)
            depends += [d for d in (pre.group(1).split() if pre else []) if d in available or d in all_builtin]
        depends = [d.replace("-", "_") for d in depends]
        modules[name] = {"path": f"/lib/modules/{release}/{guest_path[name]}",
                         "depends": [d for d in depends if d not in all_builtin]}
        files[name] = data
        aliases += [f"alias {a} {name}\n" for a in info.get("alias", [])]
        pending += depends
    with open(os.path.join(mod_root, "modules.builtin")) as f:
        builtin_text = f.read()
    return _Kernel(release, modules, sorted(builtin), files, sorted(aliases), builtin_text)


def _merge_package(pkg_root: str, staging: str, keep: tuple[str, ...] | None) -> None:
    """Move a package's kept files into the merged-/usr staging tree."""
    for dirpath, dirnames, filenames in os.walk(pkg_root):
        for filename in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            src = os.path.join(dirpath, filename)
            rel = os.path.relpath(src, pkg_root)
            if _pruned(rel, keep):
                continue
            dst = os.path.join(staging, _merged(rel))
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            if os.path.lexists(dst):
                os.unlink(dst)
            os.rename(src, dst)


def _compile_stdlib(staging: str) -> None:
    """Byte-compile the guest's stdlib here (same 3.11 bytecode), so TCG does not do it per run."""
    stdlib = os.path.join(staging, "usr", "lib", "python3.11")
    if sys.version_info[:2] != (3, 11) or not os.path.isdir(stdlib):
        return
    compileall.compile_dir(stdlib, quiet=2, workers=os.cpu_count() or 1, stripdir=staging,
                           prependdir="/", invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)


def _pack_userland(cpio: _Cpio, staging: str) -> None:
    """The staging tree, busybox's applet links, /dev/console, and the merged-/usr symlinks."""
    for top in ("bin", "sbin", "lib", "lib64"):
        cpio.symlink(top, f"usr/{top}")
    cpio.chardev("dev/console", 5, 1)
    for d in ("proc", "sys", "tmp", "run", "root", "ctl", "src", "mnt", "etc"):
        cpio.directory(d)
    cpio.symlink("usr/bin/python3", "python3.11")
    cpio.file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")
    cpio.file("etc/group", b"root:x:0:\n")
    present: set[str] = set()
    libraries: dict[str, str] = {}
    binaries: list[tuple[str, bytes]] = []
    for dirpath, dirnames, filenames in os.walk(staging):
        dirnames.sort()
        rel_dir = os.path.relpath(dirpath, staging)
        for name in sorted(filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]):
            path = os.path.join(dirpath, name)
            rel = os.path.normpath(os.path.join(rel_dir, name))
            present.add(rel)
            if os.path.islink(path):
                cpio.symlink(rel, os.readlink(path))
                if ".so" in name:
                    libraries[name] = rel
                continue
            with open(path, "rb") as f:
                data = f.read()
            cpio.file(rel, data, os.stat(path).st_mode & 0o7777)
            if data[:4] == b"\x7fELF":
                binaries.append((rel, data))
                if ".so" in name:
                    libraries[name] = rel
    busybox = os.path.join(staging, "usr", "bin", "busybox")
    applets = subprocess.run([busybox, "--list-full"], capture_output=True, text=True, check=True).stdout
    programs = {os.path.basename(p) for p in present if p.startswith(("usr/bin/", "usr/sbin/"))}
    for applet in applets.split():
        rel = _merged(applet)
        if os.path.basename(rel) not in programs and rel != "linuxrc":
            cpio.symlink(rel, "/usr/bin/busybox")
    # Every ELF file's libraries must be here: a missing one is a build error, not a guest mystery.
    missing = {f"{rel} needs {lib}" for rel, data in binaries for lib in _needed(data)
               if lib not in libraries and not lib.startswith("ld-linux")}
    if missing:
        raise GuestError("guest image: libraries missing (add their packages to USERLAND, or prune "
                         "what needs them):\n  " + "\n  ".join(sorted(missing)))


# --- running a guest --------------------------------------------------------------------------

@dataclasses.dataclass
class GuestResult:
    """What one run of a script in the guest gave back."""

    status: int          #: the script's exit status (137 when the guest timeout killed it)
    stdout: str
    stderr: str
    console: str         #: the whole serial console log, for debugging
    timed_out: bool      #: the in-guest timeout fired
    seconds: float       #: wall time from QEMU's start to its exit

    @property
    def output(self) -> str:
        """stdout then stderr."""
        return self.stdout + self.stderr

    def check(self) -> "GuestResult":
        """Raise GuestError (with stdout, stderr and the console tail) unless the status is 0."""
        if self.status != 0 or self.timed_out:
            what = "timed out" if self.timed_out else f"exited with status {self.status}"
            raise GuestError(f"guest script {what}\n--- stdout:\n{self.stdout}--- stderr:\n{self.stderr}"
                             f"--- console tail:\n{console_tail(self.console, 20)}")
        return self


class Guest:
    """One QEMU (TCG) guest running one script; see the module docstring.

    ``extra_qemu_args`` are appended to QEMU's command line (chardevs, vhost-user devices).
    ``memfd_memory`` backs guest RAM with a shared memfd, as vhost-user needs. ``machine`` is
    QEMU's -machine value, options included ("q35,kernel-irqchip=split"). ``append`` adds
    arguments to the kernel command line (``["intel_iommu=on", "iommu=strict"]``). ``modules``
    are loaded (with their dependencies) before the script runs. ``shares`` maps 9p tags to
    host directories mounted writable on /mnt/<tag>. ``env`` is exported to the script.
    """

    def __init__(self, extra_qemu_args: Sequence[str] = (), *, memfd_memory: bool = False,
                 memory: str = "512M", smp: int = 1, machine: str = "q35", append: Sequence[str] = (),
                 modules: Sequence[str] = (), shares: Mapping[str, str] | None = None,
                 env: Mapping[str, str] | None = None, source_dir: str = PROJECT_ROOT,
                 boot_timeout: float = 90.0, image: GuestImage | None = None) -> None:
        for name, value in (("extra_qemu_args", extra_qemu_args), ("append", append), ("modules", modules)):
            if isinstance(value, str):
                raise TypeError(f"{name} is a sequence of arguments, not one string: {value!r}")
        self.extra_qemu_args = list(extra_qemu_args)
        self.append = list(append)
        self.memfd_memory = memfd_memory
        self.memory = memory
        self.smp = smp
        self.machine = machine
        self.modules = list(modules)
        self.shares = dict(shares or {})
        self.env = dict(env or {})
        self.source_dir = os.path.abspath(source_dir)
        self.boot_timeout = boot_timeout
        self.image = image
        self.process: subprocess.Popen | None = None
        self._tmp: tempfile.TemporaryDirectory | None = None
        self._console = ""
        self._deadline = 0.0
        self._started = 0.0
        for tag in self.shares:
            if not re.fullmatch(r"[A-Za-z0-9_]+", tag) or tag in (SRC_TAG, CTL_TAG):
                raise ValueError(f"share tag {tag!r} must be [A-Za-z0-9_]+ and not a reserved tag")

    # -- lifecycle

    def __enter__(self) -> "Guest":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Kill QEMU (if still running) by its PID and remove the run's temporary files."""
        if self.process is not None:
            support.stop_process(self.process, timeout=5)
            self.process = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def run(self, script: str, timeout: float = 120) -> GuestResult:
        """Boot, run ``script``, power off; the whole run in one call."""
        try:
            self.start(script, timeout)
            return self.wait()
        finally:
            self.close()

    def start(self, script: str, timeout: float = 120) -> None:
        """Boot the guest with ``script`` (sh, or anything with a #! line) and return at once.

        Raises GuestError when QEMU cannot be started. QEMU connects client chardev sockets
        while it starts up, so a test serving one should accept() with a timeout after this.
        """
        if self.process is not None:
            raise GuestError("this Guest is already running; wait() for it first")
        image = self.image = self.image or ensure_built()
        load = image.load_order(self.modules)
        self._tmp = tempfile.TemporaryDirectory(prefix="vhost_min-guest-")
        ctl = os.path.join(self._tmp.name, "ctl")
        os.mkdir(ctl)
        with open(os.path.join(ctl, "script"), "w") as f:
            f.write(script)
        os.chmod(os.path.join(ctl, "script"), 0o755)
        with open(os.path.join(ctl, "modules"), "w") as f:
            f.write("".join(f"{name} {path}\n" for name, path in load))
        config = [f"TIMEOUT={int(max(1, timeout))}",
                  f"RUNNER={'' if script.startswith('#!') else 'sh'}",
                  f"SHARES={shlex.quote(' '.join(self.shares))}"]
        config += [f"export {k}={shlex.quote(v)}" for k, v in self.env.items()]
        with open(os.path.join(ctl, "config"), "w") as f:
            f.write("\n".join(config) + "\n")
        self._console = os.path.join(self._tmp.name, "console.log")
        with open(os.path.join(self._tmp.name, "qemu.stderr"), "w") as qemu_out:
            try:
                self.process = subprocess.Popen(self.qemu_command(ctl), stdin=subprocess.DEVNULL,
                                                stdout=qemu_out, stderr=subprocess.STDOUT)
            except OSError as e:
                self.close()
                raise GuestError(f"cannot start {QEMU}: {e}") from e
        self._started = time.monotonic()
        self._deadline = self._started + timeout + self.boot_timeout

    def qemu_command(self, ctl: str) -> list[str]:
        """The QEMU command line for a run whose control share is ``ctl``."""
        image = self.image
        assert image is not None
        cmd = [QEMU, "-nodefaults", "-no-user-config", "-machine", self.machine, "-accel", "tcg",
               "-cpu", "max", "-smp", str(self.smp), "-m", self.memory,
               "-kernel", image.kernel, "-initrd", image.initrd,
               "-append", " ".join([KERNEL_APPEND, *self.append]),
               "-display", "none", "-monitor", "none", "-serial", f"file:{_opt(self._console)}",
               "-no-reboot", "-device", "virtio-rng-pci",
               "-virtfs", f"local,path={_opt(ctl)},mount_tag={CTL_TAG},security_model=none",
               "-virtfs", f"local,path={_opt(self.source_dir)},mount_tag={SRC_TAG},"
                          "security_model=none,readonly=on"]
        for tag, path in self.shares.items():
            cmd += ["-virtfs", f"local,path={_opt(os.path.abspath(path))},mount_tag={tag},security_model=none"]
        if self.memfd_memory:
            cmd += ["-object", f"memory-backend-memfd,id=mem,size={self.memory},share=on",
                    "-numa", "node,memdev=mem"]
        return cmd + self.extra_qemu_args

    def console(self) -> str:
        """The serial console so far."""
        try:
            with open(self._console, encoding="utf-8", errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def wait_for_console(self, text: str, timeout: float = 60) -> None:
        """Wait until ``text`` appears on the console; GuestError if QEMU exits or time runs out."""
        deadline = time.monotonic() + timeout
        while text not in self.console():
            if self.process is None or self.process.poll() is not None:
                raise self._error(f"QEMU exited before {text!r} appeared on the console")
            if time.monotonic() > deadline:
                raise self._error(f"{text!r} did not appear on the console within {timeout} s")
            time.sleep(0.1)

    def wait(self) -> GuestResult:
        """Wait for the guest to power off and collect its result; QEMU is killed at the hard
        deadline. Raises GuestError when the guest reported no status. Cleans up like close()."""
        if self.process is None or self._tmp is None:
            raise GuestError("wait() without start()")
        try:
            return self._collect(self.process)
        finally:
            self.close()

    def _collect(self, process: subprocess.Popen) -> GuestResult:
        try:
            process.wait(max(0.0, self._deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            support.stop_process(process, timeout=5)
            raise self._error(f"QEMU still ran {self._deadline - self._started:.0f} s after start "
                              f"(the guest timeout plus boot_timeout); killed it (pid {process.pid})")
        seconds = time.monotonic() - self._started
        ctl = os.path.join(self._tmp.name, "ctl")
        try:
            with open(os.path.join(ctl, "status")) as f:
                status, timed_out = (int(v) for v in f.read().split())
        except (OSError, ValueError):
            reason = read_text(os.path.join(ctl, "setup_error")).strip()
            if reason:
                reason = f"guest setup failed: {reason}"
            elif not self.console() and process.returncode:
                reason = "QEMU failed before the guest started"
            else:
                reason = "the guest wrote no exit status"
            raise self._error(f"{reason} (QEMU exit code {process.returncode})")
        return GuestResult(status, read_text(os.path.join(ctl, "stdout")), read_text(os.path.join(ctl, "stderr")),
                           self.console(), bool(timed_out), seconds)

    def _error(self, message: str) -> GuestError:
        qemu_out = read_text(os.path.join(self._tmp.name, "qemu.stderr")) if self._tmp else ""
        text = f"{message}\n--- console tail:\n{console_tail(self.console())}"
        if qemu_out.strip():
            text += f"\n--- QEMU said:\n{console_tail(qemu_out, 15)}"
        return GuestError(text)


def _opt(value: str) -> str:
    """A value inside a QEMU option list, where a comma is written twice."""
    return value.replace(",", ",,")


def read_text(path: str) -> str:
    """A file's text (undecodable bytes replaced), or "" when it cannot be read (not there yet)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return ""


# --- CLI --------------------------------------------------------------------------------------

def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m tests.guest", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("build", help="fetch the packages and build (or refresh) the cached image")
    sub.add_parser("info", help="print the cached image's manifest")
    run = sub.add_parser("run", help="boot the guest and run a shell script")
    run.add_argument("script")
    run.add_argument("-m", "--module", action="append", default=[], help="load this module first")
    run.add_argument("-t", "--timeout", type=float, default=120)
    run.add_argument("--console", action="store_true", help="print the serial console too")
    args = parser.parse_args(argv)
    if args.command == "build":
        start = time.monotonic()
        image = ensure_built(refresh=True)
        print(f"{image.directory}: kernel {image.release}; {time.monotonic() - start:.1f} s")
        return 0
    if args.command == "info":
        image = ensure_built()
        print(json.dumps(dataclasses.asdict(image), indent=1, sort_keys=True))
        return 0
    result = Guest(modules=args.module).run(args.script, timeout=args.timeout)
    if args.console:
        print(result.console, end="")
    sys.stdout.write(result.stdout)
    sys.stderr.write(result.stderr)
    print(f"[guest] status {result.status}{' (timed out)' if result.timed_out else ''}, "
          f"{result.seconds:.1f} s", file=sys.stderr)
    return result.status


if __name__ == "__main__":
    sys.exit(main())
