"""The ``vhost-min`` command (also ``python3 -m vhost_min``), one function per subcommand:

* ``blk``   -- a vhost-user-blk back-end over a raw image, following the vhost-user spec's
  "Backend program conventions" (``--socket-path`` / ``--fd``, ``--print-capabilities``, exit 0 on
  SIGTERM, never daemonizes); ``--connect PATH`` is client mode, for a front-end that listens. The
  ``vhost-min-blk`` program is the same command on its own, for the JSON descriptor in QEMU's
  vhost-user folder (``50-vhost-min-blk.json``, beside this file).
* ``net``   -- a vhost-user-net back-end (vhost_min.net.NetDevice): frames to a tap device or looped
  back to the driver, with the blk command's program conventions.
* ``vduse-blk`` -- the same blk device as a VDUSE (vDPA) device of this kernel, until SIGTERM.
* ``probe`` -- connect as a front-end and print what a back-end offers, leaving it as it was.
* ``demo``  -- a blk back-end in a child process, our front-end in this one, every byte checked.
* ``kernel`` -- list the machine's vhost and vhost-vdpa device nodes and what each offers.
* ``trace`` -- relay a front-end to a back-end, printing every message decoded (vhost_min.trace).

Errors a person can act on (a missing socket, a peer that is not vhost-user, an image that cannot
be opened) end as one line on stderr, ``vhost-min: what and why``, and exit status 1; Ctrl-C is 130.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import enum
import json
import logging
import os
import random
import select
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from typing import NamedTuple

from .errors import VhostError
from .fs import VIRTIO_FS_CONFIG, VirtioFsFeature
from .net import VIRTIO_NET_CONFIG, VIRTIO_NET_S_LINK_UP, VirtioNetFeature
from .vsock import VIRTIO_VSOCK_CONFIG, VirtioVsockFeature

PROG = "vhost-min"
MiB = 1 << 20

#: --print-capabilities (vhost-user.json, VHostUserBackendCapabilities for "block": the two
#: VHostUserBackendBlockFeature values, both supported).
BLK_CAPABILITIES = {"type": "block", "features": ["read-only", "blk-file"]}
#: The descriptor for QEMU's vhost-user folders (vhost-user.json, VhostUserBackend), shipped here.
BLK_DESCRIPTOR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "50-vhost-min-blk.json")

_BLK_DESCRIPTION = """\
Serve a raw disk image (regular file or block device) as a vhost-user-blk device, for QEMU's
-device vhost-user-blk-pci or any vhost-user front-end. Follows the vhost-user spec's back-end
program conventions: stays in the foreground; SIGTERM stops it with exit status 0 and removes
its socket."""
_BLK_EPILOG = f"""\
Install for QEMU and libvirt: `pip install .` gives the vhost-min-blk program (this command on its
own); then copy the descriptor {os.path.basename(BLK_DESCRIPTOR)} (in the vhost_min directory) to
/usr/share/qemu/vhost-user/ (packages) or /etc/qemu/vhost-user/ (local additions), with "binary" set
to where vhost-min-blk is (it ships as /usr/local/bin/vhost-min-blk):
  sed "s|/usr/local/bin/vhost-min-blk|$(command -v vhost-min-blk)|" vhost_min/{os.path.basename(BLK_DESCRIPTOR)} \\
    | sudo tee /etc/qemu/vhost-user/{os.path.basename(BLK_DESCRIPTOR)}
Vendored without pip, "binary" can be a script that runs: exec python3 -m vhost_min blk "$@"."""


def _row(label: str, value: object) -> None:
    """One ``label  value`` line of probe's and demo's output; a long value wraps under itself."""
    indent = " " * 30
    print(f"  {label:<28}" + textwrap.fill(str(value), 100, initial_indent=indent, subsequent_indent=indent)[30:])


def _human(n: int) -> str:
    """Bytes as a person reads them: 64 MiB, 1.5 GiB, 512 bytes."""
    for unit, name in ((1 << 40, "TiB"), (1 << 30, "GiB"), (MiB, "MiB"), (1 << 10, "KiB")):
        if n >= unit:
            value = n / unit
            return f"{value:.0f} {name}" if value == int(value) else f"{value:.1f} {name}"
    return f"{n} bytes"


# --------------------------------------------------------------------------------------------
# blk: a vhost-user-blk back-end (the spec's "Backend program conventions")
# --------------------------------------------------------------------------------------------

class _PrintCapabilities(argparse.Action):
    """--print-capabilities: print the JSON and exit 0 at once; nothing else is looked at."""

    def __init__(self, option_strings, dest, capabilities: dict = BLK_CAPABILITIES, **kwargs) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS,
                         help="print the back-end's capabilities as JSON (vhost-user.json) and exit")
        self.capabilities = capabilities

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        print(json.dumps(self.capabilities))
        parser.exit(0)


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of seconds")
    return value


def _queue_count(text: str) -> int:
    from .backend import MAX_QUEUES
    try:
        n = int(text)
    except ValueError:
        n = 0
    if not 1 <= n <= MAX_QUEUES:
        raise argparse.ArgumentTypeError(f"{text!r} is not a queue count from 1 to {MAX_QUEUES}")
    return n


def _add_io_arguments(parser: argparse.ArgumentParser) -> None:
    """--cache and --aio, as BlkDevice takes them (blk.CACHE_MODES, blk.AIO_MODES)."""
    parser.add_argument("--cache", choices=("none", "writeback", "writethrough"), default="writeback",
                        help="none: O_DIRECT (qemu-storage-daemon's cache.direct=on); writethrough: every write "
                             "stable before it completes; writeback (default): the page cache, stable after FLUSH")
    parser.add_argument("--aio", choices=("io_uring", "threads", "sync"),
                        help="who runs reads, writes and flushes: io_uring, a thread pool, or the loop itself "
                             "(default: io_uring with --cache none, where the disk is the wait, falling back to "
                             "threads where io_uring is refused; sync otherwise)")


def _poll_us(text: str) -> int:
    from .backend import MAX_POLL_US
    try:
        n = int(text)
    except ValueError:
        n = -1
    if not 0 <= n <= MAX_POLL_US:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of microseconds from 0 to {MAX_POLL_US}")
    return n


def _device_line(device, poll_us: int | None = None) -> str:
    """How the device does its I/O, for the "serving" line: the one place the choice is logged."""
    image = device.image
    line = f"cache {image.cache}, aio {device.aio}"
    if image.direct:
        line += f", O_DIRECT alignment {image.align}"
    poll = device.poll_us if poll_us is None else poll_us
    if poll:
        line += f", busy-polling up to {poll} us"
    return line


def _add_blk_arguments(parser: argparse.ArgumentParser) -> None:
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--socket-path", metavar="PATH", help="listen on this unix socket (removed on exit)")
    where.add_argument("--fd", type=int, metavar="N",
                       help="serve the inherited unix socket N: listening (socket activation) or connected")
    where.add_argument("--connect", metavar="PATH",
                       help="client mode: connect to a front-end listening on PATH (QEMU's -chardev "
                            "socket,server=on), retrying every second, and again after each disconnect")
    parser.add_argument("--read-only", action="store_true", help="open the image read-only and offer VIRTIO_BLK_F_RO")
    parser.add_argument("--num-queues", type=_queue_count, default=1, metavar="N",
                        help="request queues (default 1; more offers VIRTIO_BLK_F_MQ)")
    _add_io_arguments(parser)
    parser.add_argument("--poll-us", type=_poll_us, metavar="US",
                        help="busy-poll the rings and the I/O engine for up to US microseconds before sleeping "
                             "(adaptive, as QEMU's IOThread poll-max-ns); 0: never (default: the device's, "
                             "blk.ENGINE_POLL_US with io_uring, never with threads or sync: the serving line says)")
    parser.add_argument("--blk-file", metavar="IMAGE", help="the image (the spec's spelling of IMAGE)")
    parser.add_argument("--print-capabilities", action=_PrintCapabilities)
    parser.add_argument("-v", "--verbose", action="store_true", help="log every connection")
    parser.add_argument("image", nargs="?", metavar="IMAGE", help="raw disk image: a regular file or block device")
    parser.set_defaults(func=cmd_blk, parser=parser)


def _serve_on(server, device, args: argparse.Namespace) -> str:
    """Add ``device`` to ``server`` on --fd N, --socket-path PATH or (blk) --connect PATH; returns
    where, for the serving line."""
    connect = getattr(args, "connect", None)
    if connect is not None:
        from .user import check_socket_path
        server.add(device, check_socket_path(connect), listen=False)   # retried until a front-end listens
        return f"{connect} (client mode: connecting, and again after each disconnect)"
    if args.fd is not None:
        _inherited_socket(args.fd)
        server.add(device, fd=args.fd)
        return f"fd {args.fd}"
    try:
        server.add(device, args.socket_path)
    except VhostError:
        raise
    except OSError as exc:
        raise VhostError(f"cannot listen on {args.socket_path}: {exc.strerror}", exc.errno) from None
    return args.socket_path


def _inherited_socket(fd: int) -> None:
    """Refuse an --fd that is not an AF_UNIX stream socket, with a reason a person can act on."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError as exc:
        raise VhostError(f"--fd {fd}: {exc.strerror}", exc.errno) from None
    try:
        if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
            kind = "/".join(str(getattr(v, "name", v)) for v in (sock.family, sock.type))
            raise VhostError(f"--fd {fd} is not a unix stream socket but {kind}")
    finally:
        sock.detach()


def cmd_blk(args: argparse.Namespace) -> int:
    """Serve a raw image as a vhost-user-blk device until SIGTERM (exit 0) or Ctrl-C (130)."""
    from .backend import Server
    from .blk import SECTOR_SIZE, BlkDevice

    if (args.image is None) == (args.blk_file is None):
        args.parser.error("give the image once: IMAGE or --blk-file IMAGE")
    if (args.socket_path, args.fd, args.connect) == (None, None, None):
        args.parser.error("give --socket-path PATH, --fd N or --connect PATH")
    image = args.image or args.blk_file

    stop = threading.Event()
    server: Server | None = None

    def on_sigterm(signum, frame) -> None:
        stop.set()              # seen by run() even before it starts
        if server is not None:
            server.stop()       # wakes the loop now

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        with BlkDevice(image, read_only=args.read_only, num_queues=args.num_queues, cache=args.cache,
                       aio=args.aio) as device, Server(poll_us=args.poll_us) as server:
            where = _serve_on(server, device, args)
            queues = f"{args.num_queues} queue{'s' if args.num_queues > 1 else ''}"
            print(f"{PROG}: serving {image} ({_human(device.image.capacity * SECTOR_SIZE)}, "
                  f"{'read-only' if args.read_only else 'read-write'}, {queues}, "
                  f"{_device_line(device, server.poll_us)}) on {where}",
                  flush=True)
            server.run(stop_event=stop)
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0


# --------------------------------------------------------------------------------------------
# net: a vhost-user-net back-end, frames to a tap or looped back (same program conventions as blk)
# --------------------------------------------------------------------------------------------

#: --print-capabilities of the net command (vhost-user.json: "net" has no optional features).
NET_CAPABILITIES = {"type": "net"}


def _add_net_arguments(parser: argparse.ArgumentParser) -> None:
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--socket-path", metavar="PATH", help="listen on this unix socket (removed on exit)")
    where.add_argument("--fd", type=int, metavar="N",
                       help="serve the inherited unix socket N: listening (socket activation) or connected")
    frames = parser.add_mutually_exclusive_group()
    frames.add_argument("--tap", metavar="NAME", help="frames to and from this tap device (created if missing)")
    frames.add_argument("--loopback", action="store_true", help="every frame the driver sends comes back to it")
    parser.add_argument("--queues", type=_queue_count, default=1, metavar="N",
                        help="RX/TX queue pairs (default 1; more offers VIRTIO_NET_F_MQ)")
    parser.add_argument("--mac", metavar="MAC", help="the device's MAC address (default 52:54:00 and 3 random bytes)")
    parser.add_argument("--mtu", type=int, default=1500, metavar="N", help="the MTU in config space (default 1500)")
    parser.add_argument("--no-mrg-rxbuf", action="store_true", help="do not offer VIRTIO_NET_F_MRG_RXBUF")
    parser.add_argument("--print-capabilities", action=_PrintCapabilities, capabilities=NET_CAPABILITIES)
    parser.add_argument("-v", "--verbose", action="store_true", help="log every connection")
    parser.set_defaults(func=cmd_net, parser=parser)


def cmd_net(args: argparse.Namespace) -> int:
    """Serve a virtio-net device until SIGTERM (exit 0) or Ctrl-C (130)."""
    from .backend import Server
    from .net import NetDevice, format_mac

    if (args.socket_path is None) == (args.fd is None):
        args.parser.error("give --socket-path PATH or --fd N")
    if args.tap is None and not args.loopback:
        args.parser.error("give --tap NAME or --loopback")
    if 2 * args.queues + 1 > 256:
        args.parser.error(f"--queues {args.queues}: at most 127 pairs fit vhost-user's 8-bit ring index")
    try:
        device = NetDevice(tap=args.tap, pairs=args.queues, mac=args.mac, mtu=args.mtu,
                           mrg_rxbuf=not args.no_mrg_rxbuf)
    except ValueError as exc:
        args.parser.error(str(exc))
    stop = threading.Event()
    server: Server | None = None

    def on_sigterm(signum, frame) -> None:
        stop.set()
        if server is not None:
            server.stop()

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        with contextlib.closing(device), Server() as server:
            where = _serve_on(server, device, args)
            frames = f"tap {args.tap}" if args.tap is not None else "loopback"
            print(f"{PROG}: serving virtio-net {format_mac(device.mac)} ({frames}, {args.queues} queue "
                  f"pair{'s' if args.queues > 1 else ''}, MTU {device.mtu}) on {where}", flush=True)
            server.run(stop_event=stop)
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0


# --------------------------------------------------------------------------------------------
# vduse-blk: the same blk device as a VDUSE (vDPA) device of this machine's kernel
# --------------------------------------------------------------------------------------------

def cmd_vduse_blk(args: argparse.Namespace) -> int:
    """Serve a raw image as the VDUSE virtio-blk device NAME until SIGTERM (0) or SIGINT (130)."""
    from .blk import SECTOR_SIZE, BlkDevice
    from .vdpa import VduseDevice

    device: VduseDevice | None = None
    got: list[int] = []

    def on_signal(signum, frame) -> None:
        got.append(signum)
        if device is not None:
            device.stop()       # run() returns between requests: none is left unanswered

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        with BlkDevice(args.image, read_only=args.read_only, num_queues=args.num_queues, cache=args.cache,
                       aio=args.aio) as blk, VduseDevice(blk, args.name) as device:
            print(f"{PROG}: serving {args.image} ({_human(blk.image.capacity * SECTOR_SIZE)}, "
                  f"{'read-only' if args.read_only else 'read-write'}, {_device_line(blk, 0)}) "
                  f"as VDUSE device {args.name} "
                  f"(/dev/vduse/{args.name}); attach it with: vdpa dev add mgmtdev vduse name {args.name}",
                  flush=True)
            if not got:
                device.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 130 if signal.SIGINT in got else 0


# --------------------------------------------------------------------------------------------
# probe: what a back-end offers
# --------------------------------------------------------------------------------------------
# The device type is not on the wire: probe guesses it from the features and the config size,
# and decodes the config of blk, net, fs and vsock with the layouts of their modules.

def _present(config: bytes, end: int) -> bool:
    return len(config) >= end


def _decode_blk(config: bytes, features: int) -> dict:
    from .blk import VIRTIO_BLK_CONFIG, VIRTIO_BLK_CONFIG_OFFSETS, BlkConfig, VirtioBlkFeature as F
    c = BlkConfig.unpack(config)
    offsets = list(VIRTIO_BLK_CONFIG_OFFSETS.values()) + [VIRTIO_BLK_CONFIG.size]
    end = dict(zip(VIRTIO_BLK_CONFIG_OFFSETS, offsets[1:]))     # a field is there if the next one starts
    fields = {"capacity": c.capacity} if _present(config, 8) else {}
    for feature, names in ((F.VIRTIO_BLK_F_SIZE_MAX, ("size_max",)), (F.VIRTIO_BLK_F_SEG_MAX, ("seg_max",)),
                           (F.VIRTIO_BLK_F_BLK_SIZE, ("blk_size",)), (F.VIRTIO_BLK_F_CONFIG_WCE, ("wce",)),
                           (F.VIRTIO_BLK_F_MQ, ("num_queues",)),
                           (F.VIRTIO_BLK_F_DISCARD, ("max_discard_sectors", "max_discard_seg",
                                                     "discard_sector_alignment")),
                           (F.VIRTIO_BLK_F_WRITE_ZEROES, ("max_write_zeroes_sectors", "max_write_zeroes_seg",
                                                          "write_zeroes_may_unmap"))):
        if features & feature:
            fields.update({name: getattr(c, name) for name in names if _present(config, end[name])})
    fields["read_only"] = bool(features & F.VIRTIO_BLK_F_RO)
    return fields


def _decode_net(config: bytes, features: int) -> dict:
    mac, status, pairs, mtu = VIRTIO_NET_CONFIG.unpack(config[:VIRTIO_NET_CONFIG.size].ljust(VIRTIO_NET_CONFIG.size,
                                                                                             b"\0"))
    F, fields = VirtioNetFeature, {}
    if features & F.VIRTIO_NET_F_MAC and _present(config, 6):
        fields["mac"] = ":".join(f"{b:02x}" for b in mac)
    if features & F.VIRTIO_NET_F_STATUS and _present(config, 8):
        fields["status"] = status
        fields["link_up"] = bool(status & VIRTIO_NET_S_LINK_UP)
    if features & F.VIRTIO_NET_F_MQ and _present(config, 10):
        fields["max_virtqueue_pairs"] = pairs
    if features & F.VIRTIO_NET_F_MTU and _present(config, 12):
        fields["mtu"] = mtu
    return fields


def _decode_fs(config: bytes, features: int) -> dict:
    tag, queues = VIRTIO_FS_CONFIG.unpack(config[:VIRTIO_FS_CONFIG.size].ljust(VIRTIO_FS_CONFIG.size, b"\0"))
    fields = {"tag": tag.split(b"\0", 1)[0].decode("utf-8", "replace")} if _present(config, 36) else {}
    if _present(config, VIRTIO_FS_CONFIG.size):
        fields["num_request_queues"] = queues
    return fields


def _decode_vsock(config: bytes, features: int) -> dict:
    return {"guest_cid": VIRTIO_VSOCK_CONFIG.unpack_from(config)[0]} if _present(config, 8) else {}


class _DeviceType(NamedTuple):
    features: type[enum.IntFlag] | None
    decode: Callable[[bytes, int], dict]


def _device_types() -> dict[str, _DeviceType]:
    from .blk import VirtioBlkFeature
    return {"blk": _DeviceType(VirtioBlkFeature, _decode_blk), "net": _DeviceType(VirtioNetFeature, _decode_net),
            "fs": _DeviceType(VirtioFsFeature, _decode_fs), "vsock": _DeviceType(VirtioVsockFeature, _decode_vsock)}


# Bits only a net device offers in practice (blk's bits 15..23 are rare or unassigned)...
_NET_HINTS = (VirtioNetFeature.VIRTIO_NET_F_MRG_RXBUF | VirtioNetFeature.VIRTIO_NET_F_CTRL_VQ
              | VirtioNetFeature.VIRTIO_NET_F_CTRL_RX | VirtioNetFeature.VIRTIO_NET_F_GUEST_ANNOUNCE
              | VirtioNetFeature.VIRTIO_NET_F_MQ)
# ...and blk's SEG_MAX, BLK_SIZE, FLUSH, DISCARD, WRITE_ZEROES.
_BLK_HINTS = 1 << 2 | 1 << 6 | 1 << 9 | 1 << 13 | 1 << 14


def guess_device_type(features: int, config: bytes | None) -> str | None:
    """blk, net, fs or vsock from the offered features and the config space size, or None."""
    size = None if config is None else len(config)
    if size == VIRTIO_VSOCK_CONFIG.size:
        return "vsock"
    if size == VIRTIO_FS_CONFIG.size and config[0] and config[:36].rstrip(b"\0").isascii():
        return "fs"
    if features & _NET_HINTS:
        return "net"
    if features & _BLK_HINTS or (size is not None and size > 24):
        return "blk"
    if size is not None and size >= 6:
        return "net"
    return None


def probe_report(path: str, result, device_type: str | None, guessed: bool) -> dict:
    """Frontend.probe()'s ProbeResult as one JSON-able dict, config decoded for ``device_type``
    (what --json prints; the text output is made from it)."""
    from .frontend import feature_names
    kind = _device_types().get(device_type)
    config = result.config
    return {
        "socket": path,
        "device_type": device_type,
        "device_type_guessed": guessed,
        "features": result.features,
        "feature_names": list(feature_names(result.features, kind.features if kind else None)),
        "protocol_features": None if result.protocol_features is None else int(result.protocol_features),
        "protocol_feature_names": list(result.protocol_feature_names),
        "num_queues": result.num_queues,
        "max_mem_slots": result.max_mem_slots,
        "config_size": None if config is None else len(config),
        "config": kind.decode(config, result.features) if kind and config is not None else None,
        "config_hex": None if config is None else config.hex(),
    }


def _print_probe(report: dict) -> None:
    def names(value: int | None, names: list[str]) -> str:
        return "not offered" if value is None else f"{value:#x}: {' '.join(names) or 'none'}"

    kind = report["device_type"]
    how = ("guessed from its features and config space; --type to say" if report["device_type_guessed"]
           else "as given")
    print(f"{report['socket']}: a vhost-user back-end, device type "
          + (f"{kind} ({how})" if kind else "unknown (pass --type blk|net|fs|vsock to decode its config)"))
    _row("virtio features", names(report["features"], report["feature_names"]))
    _row("protocol features", names(report["protocol_features"], report["protocol_feature_names"]))
    _row("queues", report["num_queues"] if report["num_queues"] is not None else "not said (no MQ)")
    _row("max memory slots", report["max_mem_slots"] if report["max_mem_slots"] is not None
         else "not said (no CONFIGURE_MEM_SLOTS)")
    if report["config_size"] is None:
        _row("config space", "not readable (no CONFIG)")
        return
    _row("config space", f"{report['config_size']} bytes")
    if report["config"] is None:
        _row("  raw", report["config_hex"])
        return
    _config_rows(report["config"])


def _config_rows(config: dict) -> None:
    """A decoded config space, one field a row (probe's and kernel's output)."""
    for name, value in config.items():
        if name == "capacity":
            value = f"{value} sectors ({_human(value * 512)})"
        elif name == "read_only":
            value = "yes (VIRTIO_BLK_F_RO)" if value else "no"
        _row(f"  {name}", value)


def config_sizes(device_type: str | None) -> Callable[[int], list[int]]:
    """For Frontend.probe: the config sizes to ask, given the offered features — the given type's
    layout, else the type the features suggest first and the other known layouts after, largest
    first (a back-end accepts any size up to its own, and logs each size it must refuse)."""
    from .blk import VIRTIO_BLK_CONFIG, VIRTIO_BLK_CONFIG_OFFSETS
    # blk: the whole struct, or up to the secure-erase fields (QEMU 7.2's 60-byte config space).
    sizes = {"blk": [VIRTIO_BLK_CONFIG.size, VIRTIO_BLK_CONFIG_OFFSETS["max_secure_erase_sectors"]],
             "fs": [VIRTIO_FS_CONFIG.size], "net": [VIRTIO_NET_CONFIG.size], "vsock": [VIRTIO_VSOCK_CONFIG.size]}

    def for_features(features: int) -> list[int]:
        if device_type is not None:
            return sizes[device_type]
        first = guess_device_type(features, None)
        ordered = sorted((n for ns in sizes.values() for n in ns), reverse=True)
        return ordered if first is None else sizes[first] + [n for n in ordered if n not in sizes[first]]
    return for_features


def cmd_probe(args: argparse.Namespace) -> int:
    """Connect, ask (Frontend.probe: nothing is claimed or changed), print, disconnect."""
    from .frontend import Frontend
    with Frontend.connect(args.socket, timeout=args.timeout) as fe:
        result = fe.probe(config_size=config_sizes(args.type))
    guessed = args.type is None
    device_type = guess_device_type(result.features, result.config) if guessed else args.type
    report = probe_report(args.socket, result, device_type, guessed)
    if args.json:
        print(json.dumps(report))
    else:
        _print_probe(report)
    return 0


# --------------------------------------------------------------------------------------------
# kernel: the vhost and vhost-vdpa device nodes of this machine
# --------------------------------------------------------------------------------------------
# Each node is opened and asked (nothing is set: no owner, no features). Opening a vhost-vdpa
# node resets its device, and one open at a time is allowed: a node a VMM holds reports EBUSY.

_NO_NODES = ("no vhost or vhost-vdpa device nodes in {dev} (load vhost_net, vhost_vsock, vhost_scsi or "
             "vhost_vdpa; a vDPA device appears as vhost-vdpa-N once `vdpa dev add` binds one to vhost_vdpa)")


def _bit_names(value: int, flags: type[enum.IntFlag]) -> list[str]:
    names = {int(f): f.name for f in flags}
    return [names.get(1 << bit, f"bit {bit}") for bit in range(64) if value >> bit & 1]


def _kernel_node(path: str, cls) -> dict:
    """What a kernel vhost node (VhostNet, VhostVsock, VhostScsi) offers."""
    from .errors import IoctlError
    from .frontend import feature_names
    from .ioctl import VhostBackendFeature
    from .virtio import VHOST_NET_F_VIRTIO_NET_HDR
    kind = {"VhostNet": "net", "VhostVsock": "vsock", "VhostScsi": "scsi"}[cls.__name__]
    entry: dict = {"node": path, "kind": f"vhost-{kind}", "device_type": kind}
    with cls(path) as dev:
        features = entry["features"] = dev.get_features()
        flags = _device_types()[kind].features if kind in ("net", "vsock") else None
        # vhost-net's bit 27 is its own (the legacy ANY_LAYOUT bit, reused), as feature_names cannot know
        own = {VHOST_NET_F_VIRTIO_NET_HDR: "VHOST_NET_F_VIRTIO_NET_HDR"} if kind == "net" else {}
        entry["feature_names"] = [own.get(1 << bit) or feature_names(1 << bit, flags)[0]
                                  for bit in range(64) if features >> bit & 1]
        try:
            backend = dev.get_backend_features()
        except IoctlError:              # vhost-scsi has none (ENOTTY)
            backend = None
        entry["backend_features"] = None if backend is None else int(backend)
        entry["backend_feature_names"] = [] if backend is None else _bit_names(backend, VhostBackendFeature)
    return entry


def _vdpa_node(path: str) -> dict:
    """What a vhost-vdpa node's device is: id, features, backend features, queues, config."""
    from .frontend import feature_names
    from .ioctl import VhostBackendFeature
    from .vdpa import VhostVdpa
    from .virtio import DeviceId
    with VhostVdpa(path) as dev:
        device_id = dev.get_device_id()
        kind = {DeviceId.NET: "net", DeviceId.BLOCK: "blk"}.get(device_id)
        decoder = _device_types().get(kind)
        features, backend = dev.get_features(), dev.get_backend_features()
        config = dev.get_config() if dev.get_config_size() else b""
        first, last = dev.get_iova_range()
        return {
            "node": path, "kind": "vhost-vdpa", "device_id": device_id, "device_type": kind,
            "features": features, "feature_names": list(feature_names(features, decoder.features if decoder else None)),
            "backend_features": int(backend), "backend_feature_names": _bit_names(backend, VhostBackendFeature),
            "vqs_count": dev.get_vqs_count(), "vring_num": dev.get_vring_num(), "group_num": dev.get_group_num(),
            "as_num": dev.get_as_num(), "iova_range": [first, last], "config_size": len(config),
            "config": decoder.decode(config, features) if decoder else None, "config_hex": config.hex(),
        }


def kernel_report(dev_dir: str = "/dev") -> dict:
    """Every vhost and vhost-vdpa node under ``dev_dir`` with what it offers; a node that cannot
    be opened or asked carries ``error`` instead (what the ``kernel`` command prints)."""
    from .ioctl import VhostNet, VhostScsi, VhostVsock
    from .vdpa import vdpa_nodes
    found = [(os.path.join(dev_dir, os.path.basename(cls.DEVICE)), lambda p, cls=cls: _kernel_node(p, cls))
             for cls in (VhostNet, VhostVsock, VhostScsi)]
    found = [(path, ask) for path, ask in found if os.path.exists(path)]
    found += [(path, _vdpa_node) for path in vdpa_nodes(os.path.join(dev_dir, "vhost-vdpa-*"))]
    devices = []
    for path, ask in found:
        try:
            devices.append(ask(path))
        except OSError as exc:
            devices.append({"node": path, "error": " ".join(str(exc).split())})
    return {"dev": dev_dir, "devices": devices}


def _print_kernel(report: dict) -> None:
    if not report["devices"]:
        print(_NO_NODES.format(dev=report["dev"]))
        return
    for entry in report["devices"]:
        if "error" in entry:
            print(f"{entry['node']}: {entry['error']}")
            continue
        if entry["kind"] == "vhost-vdpa":
            kind = entry["device_type"] or "no decoder for this type"
            print(f"{entry['node']}: vhost-vdpa, virtio device id {entry['device_id']} ({kind})")
        else:
            print(f"{entry['node']}: kernel {entry['kind']}")
        _row("virtio features", f"{entry['features']:#x}: {' '.join(entry['feature_names']) or 'none'}")
        backend = entry["backend_features"]
        _row("backend features", "none (ENOTTY)" if backend is None
             else f"{backend:#x}: {' '.join(entry['backend_feature_names']) or 'none'}")
        if entry["kind"] != "vhost-vdpa":
            continue
        _row("queues", f"{entry['vqs_count']} (largest size {entry['vring_num']}), {entry['group_num']} groups, "
                       f"{entry['as_num']} address spaces")
        _row("IOVA range", "{:#x}-{:#x}".format(*entry["iova_range"]))
        _row("config space", f"{entry['config_size']} bytes")
        _config_rows(entry["config"] or {"raw": entry["config_hex"]})


def cmd_kernel(args: argparse.Namespace) -> int:
    """List the vhost and vhost-vdpa nodes with what each offers (nothing is set or claimed)."""
    report = kernel_report(args.dev)
    if args.json:
        print(json.dumps(report))
    else:
        _print_kernel(report)
    return 0


# --------------------------------------------------------------------------------------------
# demo: a blk back-end in a child process, our front-end here, every byte checked
# --------------------------------------------------------------------------------------------

DEMO_IMAGE_SIZE = 64 * MiB
PR_SET_PDEATHSIG = 1        # linux/prctl.h


def _die_with_parent(parent: int) -> Callable[[], None]:
    """preexec_fn: the child gets SIGTERM if this process dies, even by SIGKILL (prctl)."""
    from .memory import libc

    def preexec() -> None:
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:          # died before the prctl took effect
            os.kill(os.getpid(), signal.SIGTERM)
    return preexec


@contextlib.contextmanager
def _blk_child(socket_path: str, image: str, log_path: str) -> Iterator[subprocess.Popen]:
    """``python -m vhost_min blk`` in a child process, accepting on ``socket_path`` once this
    yields (its "serving" line is the sign); stopped with SIGTERM (SIGKILL if it lingers) however
    the block is left. Its log goes to ``log_path``; the last line of it explains a failed start."""
    package_parent = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, (package_parent, os.environ.get("PYTHONPATH")))))
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen([sys.executable, "-m", "vhost_min", "blk", "--socket-path", socket_path, image],
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log_file, env=env,
                                start_new_session=True, preexec_fn=_die_with_parent(os.getpid()))
    try:
        with proc.stdout:
            ready = select.select([proc.stdout], [], [], 20)[0] and proc.stdout.readline()
        if not ready:
            proc.poll()
            with open(log_path, "rb") as f:
                said = f.read().decode(errors="replace").strip().splitlines()
            what = "did not start within 20 s" if proc.returncode is None else f"exited with status {proc.returncode}"
            raise VhostError(f"the blk back-end {what}" + (f": {said[-1]}" if said else ""))
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


class _Progress:
    """One line updated in place on a terminal; on anything else a plain line every quarter."""

    def __init__(self, total: int, stream=sys.stdout) -> None:
        self.total, self.stream = total, stream
        self.tty = stream.isatty()
        self.started = time.monotonic()
        self.shown_at = 0.0
        self.quarter = 0

    def update(self, phase: str, done: int, requests: int) -> None:
        now = time.monotonic()
        quarter = 4 * done // self.total
        if self.tty and now - self.shown_at < 0.1 and done < self.total:
            return
        if not self.tty and quarter <= self.quarter:
            return
        self.shown_at, self.quarter = now, quarter
        rate = done / MiB / max(now - self.started, 1e-9)
        line = (f"  {phase:<8} {done / MiB:6.1f} of {self.total / MiB:.1f} MiB, {requests:5d} requests, "
                f"{rate:6.1f} MiB/s")
        self.stream.write(f"\r{line:<72}" if self.tty else line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


def _tiling(rng: random.Random, start: int, length: int) -> list[tuple[int, int]]:
    """[start, start + length) (4 KiB multiples) cut into requests of 4 KiB..256 KiB, as many
    small as large ones (log-uniform), in random order."""
    out, at, end = [], start, start + length
    while at < end:
        k = rng.randrange(7)
        n = min(4096 * min(64, rng.randint(1 << k, (2 << k) - 1)), end - at)
        out.append((at, n))
        at += n
    rng.shuffle(out)
    return out


class _Workload:
    """Writes random data through the virtqueues, reads it back and checks every byte."""

    def __init__(self, client, data: bytes, base: int, progress: _Progress) -> None:
        self.client, self.data, self.base, self.progress = client, data, base, progress
        self.moved = 0
        self.counts = collections.Counter()

    def _check_read(self, offset: int, got) -> None:
        want = self.data[offset - self.base:offset - self.base + len(got)]
        if got != want:
            at = next(i for i in range(len(want)) if got[i] != want[i])
            raise VhostError(f"read of {len(got)} bytes at offset {offset}: byte {offset + at} is "
                             f"{got[at]:#04x}, {want[at]:#04x} was written there")

    def _done(self, kind: str, offset: int, length: int) -> None:
        self.counts[kind] += 1
        self.moved += length
        self.progress.update(kind + "s", self.moved, sum(self.counts.values()))

    def run(self, kind: str, extents: list[tuple[int, int]], depth: int) -> None:
        """One request per extent: synchronously at depth 1, else submit/complete ``depth`` deep."""
        from .blk import VIRTIO_BLK_S_OK, BlkRequest
        client, data, base = self.client, self.data, self.base
        if depth == 1:
            for offset, length in extents:
                if kind == "write":
                    client.write(offset, data[offset - base:offset - base + length])
                else:
                    self._check_read(offset, client.read(offset, length))
                self._done(kind, offset, length)
            return
        pending = collections.deque(extents)
        in_flight = 0
        while pending or in_flight:
            batch = []
            while pending and in_flight + len(batch) < depth:
                offset, length = pending.popleft()
                batch.append(BlkRequest.write(offset, data[offset - base:offset - base + length], tag=(offset, length))
                             if kind == "write" else BlkRequest.read(offset, length, tag=(offset, length)))
            placed = client.submit(batch) if batch else 0
            in_flight += placed
            pending.extendleft(reversed([r.tag for r in batch[placed:]]))
            for c in client.complete(1):        # read data is a view valid until the next submit
                in_flight -= 1
                offset, length = c.tag
                if c.status != VIRTIO_BLK_S_OK:
                    raise VhostError(f"{kind} of {length} bytes at offset {offset}: the device answered status "
                                     f"{c.status}")
                if kind == "read":
                    self._check_read(offset, bytes(c.data))
                self._done(kind, offset, length)


def _check_image(image: str, data: bytes, base: int) -> None:
    """The bytes the back-end wrote are in the image file: os.pread, 1 MiB at a time."""
    fd = os.open(image, os.O_RDONLY | os.O_CLOEXEC)
    try:
        for at in range(0, len(data), MiB):
            got = os.pread(fd, min(MiB, len(data) - at), base + at)
            if got != data[at:at + MiB]:
                raise VhostError(f"the image file does not hold what was written at offset {base + at} "
                                 f"(os.pread of {image})")
    finally:
        os.close(fd)


def cmd_demo(args: argparse.Namespace) -> int:
    """A vhost-user-blk back-end in a child process and BlkClient here: random writes, read back
    and checked, then the image file checked with os.pread."""
    from .blk import BlkClient, VirtioBlkFeature
    from .frontend import Frontend, feature_names, protocol_feature_names
    from .virtio import VIRTIO_F_RING_PACKED

    rng = random.Random(args.seed)
    size = args.mib * MiB
    if not 1 <= args.mib <= DEMO_IMAGE_SIZE // MiB:
        args.parser.error(f"--mib must be 1..{DEMO_IMAGE_SIZE // MiB}")
    base = rng.randrange(0, (DEMO_IMAGE_SIZE - size) // MiB + 1) * MiB
    data = os.urandom(size)
    # SIGTERM (a process manager, a CI timeout) unwinds like Ctrl-C: the child is stopped, files removed.
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        with tempfile.TemporaryDirectory(prefix="vhost-min-demo-") as tmp:
            image, sock = os.path.join(tmp, "disk.img"), os.path.join(tmp, "blk.sock")
            with open(image, "wb") as f:
                f.truncate(DEMO_IMAGE_SIZE)
            with _blk_child(sock, image, os.path.join(tmp, "blk.log")) as child:
                print(f"{PROG} demo: vhost-user-blk back-end in child process {child.pid} on {sock} "
                      f"({_human(DEMO_IMAGE_SIZE)} image);\n  this process writes {_human(size)} of random data "
                      f"at offset {_human(base) if base else 0} through the virtqueues and reads it back", flush=True)
                with Frontend.connect(sock) as fe:
                    client = BlkClient(fe, queue_size=256, depth=args.depth, max_io=256 << 10, packed=args.packed)
                    progress = _Progress(2 * size)
                    work = _Workload(client, data, base, progress)
                    try:
                        for kind in ("write", "read"):
                            extents = _tiling(rng, base, size)
                            sync = len(extents) // 4          # the first quarter one at a time
                            work.run(kind, extents[:sync], 1)
                            work.run(kind, extents[sync:], args.depth)
                        elapsed = time.monotonic() - progress.started
                        client.flush()
                        work.counts["flush"] += 1
                    finally:
                        progress.close()
                    features, protocol = fe.features, fe.protocol_features
                _check_image(image, data, base)
                pid = child.pid
            status = child.returncode
    finally:
        signal.signal(signal.SIGTERM, previous)

    ring = "packed" if features & VIRTIO_F_RING_PACKED else "split"
    counts = work.counts
    print(f"{PROG} demo: {sum(counts.values())} requests through the virtqueues, every byte checked")
    _row("virtio features", " ".join(feature_names(features, VirtioBlkFeature)))
    _row("protocol features", " ".join(protocol_feature_names(protocol)))
    _row("ring", f"{ring}, 256 entries; requests one at a time, then up to {args.depth} in flight")
    _row("requests", f"{counts['write']} writes, {counts['read']} reads, {counts['flush']} flush; "
                     f"4 KiB..256 KiB each")
    _row("throughput", f"{_human(work.moved)} in {elapsed:.2f} s: {work.moved / MiB / elapsed:.1f} MiB/s")
    _row("read back", "every byte matches what was written")
    _row("image file", f"os.pread finds all {_human(size)} at offset {_human(base) if base else 0}")
    _row("back-end", f"pid {pid}, stopped by SIGTERM: exit status {status}")
    if status != 0:
        raise VhostError(f"the blk back-end exited with status {status} on SIGTERM (expected 0)")
    return 0


# --------------------------------------------------------------------------------------------
# trace: a man in the middle, printing what a front-end and a back-end say
# --------------------------------------------------------------------------------------------

def cmd_trace(args: argparse.Namespace) -> int:
    """Relay front-ends on --listen to the back-end on --connect until SIGTERM (0) or Ctrl-C (130)."""
    from .trace import Tracer, printer

    tracer: Tracer | None = None

    def on_sigterm(signum, frame) -> None:
        if tracer is not None:
            tracer.stop()

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        with Tracer(args.listen, args.connect, printer(sys.stdout, args.json), once=args.once) as tracer:
            if not args.json:
                print(f"{PROG}: tracing {args.listen} -> {args.connect}", flush=True)
            tracer.run()
            if args.once and tracer.failures and tracer.sessions == 1:
                raise VhostError(tracer.failures[0])
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="vhost-user back-ends and tools in pure Python (vhost_min).",
        epilog="Run `vhost-min COMMAND --help` for each command's options.")
    from . import __version__
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    blk = sub.add_parser(
        "blk", help="serve a raw disk image as a vhost-user-blk device",
        description=_BLK_DESCRIPTION, epilog=_BLK_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_blk_arguments(blk)

    net = sub.add_parser(
        "net", help="serve a vhost-user-net device: frames to a tap device or looped back",
        description="Serve a virtio-net device (MQ, MRG_RXBUF, control queue, STATUS, MTU) on a vhost-user "
                    "socket, for QEMU's -netdev vhost-user or DPDK's virtio-user. Frames go to and from a tap "
                    "device (--tap, IFF_VNET_HDR; needs /dev/net/tun) or straight back to the driver "
                    "(--loopback). Stays in the foreground; SIGTERM stops it with exit status 0 and removes "
                    "its socket.")
    _add_net_arguments(net)

    vduse = sub.add_parser(
        "vduse-blk", help="serve a raw disk image as a VDUSE (vDPA) virtio-blk device of this kernel",
        description="Create the VDUSE device NAME (/dev/vduse/NAME, needs the vduse module and root) serving "
                    "a raw image with the same blk device as the blk command, and serve it until SIGTERM or "
                    "Ctrl-C, then destroy it. Attach it with `vdpa dev add mgmtdev vduse name NAME` (virtio_vdpa "
                    "gives a /dev/vdX disk, vhost_vdpa a /dev/vhost-vdpa-N for a VMM); detach it with "
                    "`vdpa dev del NAME` before stopping, or the kernel keeps the device.")
    vduse.add_argument("image", metavar="IMAGE", help="raw disk image: a regular file or block device")
    vduse.add_argument("--name", default="vhost-min-blk0", help="the device name (default vhost-min-blk0)")
    vduse.add_argument("--read-only", action="store_true", help="open the image read-only and offer VIRTIO_BLK_F_RO")
    vduse.add_argument("--num-queues", type=_queue_count, default=1, metavar="N",
                       help="request queues (default 1; more offers VIRTIO_BLK_F_MQ)")
    _add_io_arguments(vduse)
    vduse.add_argument("-v", "--verbose", action="store_true", help="log the kernel's requests")
    vduse.set_defaults(func=cmd_vduse_blk, parser=vduse)

    probe = sub.add_parser(
        "probe", help="show what a vhost-user back-end offers",
        description="Connect to a vhost-user back-end as a front-end and print what it offers: virtio and "
                    "protocol features by name, queue count, memory slots and the decoded config space "
                    "(blk, net, fs, vsock). Nothing is claimed or changed: no SET_OWNER, no features set, "
                    "no memory or rings (note that one-shot back-ends exit when any front-end leaves).")
    probe.add_argument("socket", metavar="SOCKET", help="the back-end's unix socket")
    probe.add_argument("--type", choices=("blk", "net", "fs", "vsock"),
                       help="the device type (not on the wire; guessed from features and config size by default)")
    probe.add_argument("--json", action="store_true", help="print one JSON object")
    probe.add_argument("--timeout", type=_positive, default=5.0, metavar="SECONDS",
                       help="how long each answer may take (default 5)")
    probe.set_defaults(func=cmd_probe, parser=probe)

    kernel = sub.add_parser(
        "kernel", help="list this machine's vhost and vhost-vdpa device nodes and what they offer",
        description="Open each kernel vhost node (/dev/vhost-net, /dev/vhost-vsock, /dev/vhost-scsi) and each "
                    "vhost-vdpa node (/dev/vhost-vdpa-N) and print its virtio and backend features by name; for "
                    "vDPA also the device id, queues, IOVA range and the config space (decoded for blk and net). "
                    "Nothing is set or claimed; opening a vhost-vdpa node resets its device, and a node in use "
                    "reports EBUSY.")
    kernel.add_argument("--json", action="store_true", help="print one JSON object")
    kernel.add_argument("--dev", default="/dev", metavar="DIR", help="where the nodes are (default /dev)")
    kernel.set_defaults(func=cmd_kernel, parser=kernel)

    trace = sub.add_parser(
        "trace", help="relay a vhost-user front-end to a back-end, printing every message decoded",
        description="Listen on --listen for vhost-user front-ends; for each, connect to the back-end at --connect "
                    "and forward every message and fd unchanged both ways (the back-end-request channel of "
                    "SET_BACKEND_REQ_FD too, through a socketpair of the tracer's), printing each message: "
                    "direction, request, flags, payload fields, fds, and whether a reply answers the request "
                    "owed. Runs until SIGTERM or Ctrl-C.")
    trace.add_argument("--listen", required=True, metavar="PATH", help="the socket front-ends connect to")
    trace.add_argument("--connect", required=True, metavar="PATH", help="the back-end's socket")
    trace.add_argument("--json", action="store_true", help="one JSON object per line")
    trace.add_argument("--once", action="store_true", help="exit when the first session ends")
    trace.set_defaults(func=cmd_trace, parser=trace)

    demo = sub.add_parser(
        "demo", help="run a blk back-end and our front-end against each other, checking every byte",
        description="Start a vhost-user-blk back-end in a child process on a temporary socket and image, "
                    "write random data through real virtqueues from this process (4 KiB..256 KiB requests, "
                    "some one at a time, most several in flight), read it back and check every byte, then "
                    "check the image file with os.pread. Needs nothing prepared; leaves nothing behind.")
    demo.add_argument("--mib", type=int, default=48, help="MiB to write and read back (default 48)")
    demo.add_argument("--depth", type=int, default=32, choices=range(1, 65), metavar="N",
                      help="requests in flight (1..64, default 32)")
    demo.add_argument("--packed", action="store_true", help="negotiate packed virtqueues (default split)")
    demo.add_argument("--seed", type=int, help="seed the request sizes and order")
    demo.set_defaults(func=cmd_demo, parser=demo)
    return parser


def _run(args: argparse.Namespace) -> int:
    """Run a command: the library's log lines prefixed like ours, errors as one line, Ctrl-C quiet."""
    logging.basicConfig(level=logging.INFO if getattr(args, "verbose", False) else logging.WARNING,
                        format=f"{PROG}: %(message)s")
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except OSError as exc:      # VhostError and the OS's own: one line, what and why
        if isinstance(exc, VhostError) or not exc.strerror:
            what = str(exc)
        else:
            what = exc.strerror + (f": {exc.filename}" if exc.filename else "")
        print(f"{PROG}: {' '.join(what.split())}", file=sys.stderr)
        return 1


def main(argv: list[str] | None = None) -> int:
    """``vhost-min COMMAND ...`` (``python3 -m vhost_min``)."""
    try:
        args = build_parser().parse_args(argv)
    except KeyboardInterrupt:
        return 130
    return _run(args)


def blk_main(argv: list[str] | None = None) -> int:
    """``vhost-min-blk``: the blk command as a program of its own, as QEMU's vhost-user
    descriptors expect (``vhost-min-blk --print-capabilities``, ``--socket-path``, ``--fd``)."""
    parser = argparse.ArgumentParser(prog="vhost-min-blk", description=_BLK_DESCRIPTION, epilog=_BLK_EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    from . import __version__
    parser.add_argument("--version", action="version", version=f"vhost-min-blk {__version__}")
    _add_blk_arguments(parser)
    return _run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
