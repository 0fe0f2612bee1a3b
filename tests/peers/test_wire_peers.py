"""Wire-level interoperability: vhost_min.user's Connection and enums against real peers.

No vhost_min front-end or back-end here, only messages written and answered by hand, so a
failure points at the wire layer (header, payload layouts, SCM_RIGHTS, the request table) or at
a peer fact in PEERS.md. The peers are independent C implementations: qemu-storage-daemon and
virtiofsd (libvhost-user back-ends), DPDK's virtio-user (a front-end) and QEMU 7.2 (the front-end
users run). Every received request goes through user.check_message, every reply through the
table's validate_reply, so the request table is checked against what real peers send.
"""

from __future__ import annotations

import os
import selectors
import shutil
import struct
import tempfile
import time
import unittest
from collections.abc import Callable
from dataclasses import dataclass

from tests import support
from tests.peers import launch
from vhost_min.errors import DisconnectedError
from vhost_min.user import (BACKEND_REQUESTS, FRONTEND_REQUESTS, BackendRequest, Config, Connection,
                            FrontendRequest, Listener, MemoryTable, Message, ProtocolFeature, VringFd, VringState,
                            VHOST_USER_NEED_REPLY_MASK, check_message, pack_u64, unpack_u64)
from vhost_min.virtio import VIRTIO_F_RING_PACKED, VIRTIO_F_VERSION_1, DeviceStatus, VirtioFeature

F = FrontendRequest
P = ProtocolFeature
PROTOCOL_FEATURES_BIT = VirtioFeature.VHOST_USER_F_PROTOCOL_FEATURES      # bit 30

# virtio-blk (virtio 1.3 §5.2.3) and virtio-net feature bits used below.
VIRTIO_BLK_F_RO = 1 << 5
VIRTIO_BLK_F_BLK_SIZE = 1 << 6
VIRTIO_BLK_F_MQ = 1 << 12
VIRTIO_NET_F_MRG_RXBUF = 1 << 15
VIRTIO_NET_F_MQ = 1 << 22
#: struct virtio_blk_config up to unused1[3] (virtio 1.2): capacity @0 (le64, 512-byte sectors),
#: blk_size @20 (le32), num_queues @34 (le16). libvhost-user back-ends answer up to 60 bytes.
VIRTIO_BLK_CONFIG_SIZE = 60
BLK_CAPACITY, BLK_SIZE, BLK_NUM_QUEUES = struct.Struct("<Q"), struct.Struct("<I"), struct.Struct("<H")

TIMEOUT = 10.0          # any single wait on a peer
HANDSHAKE_TIMEOUT = 30.0


def names(value: int) -> str:
    """A protocol-feature mask by name, e.g. ``MQ|REPLY_ACK (0x9)``; unknown bits as hex."""
    known = [f.name for f in P if f & value]
    unknown = value & ~sum(P)
    return "|".join(known + ([f"{unknown:#x}"] if unknown else [])) + f" ({value:#x})"


def report(test: unittest.TestCase, what: str, text: str) -> None:
    print(f"\n[{test.id().rsplit('.', 2)[-2]}] {what}: {text}", flush=True)


def blk_config(request: Config, capacity: int, blk_size: int = 512, num_queues: int = 1) -> bytes:
    """The GET_CONFIG reply for ``request``: a virtio-blk config space cut to its offset/size."""
    space = bytearray(max(VIRTIO_BLK_CONFIG_SIZE, request.offset + request.size))
    BLK_CAPACITY.pack_into(space, 0, capacity)
    BLK_SIZE.pack_into(space, 20, blk_size)
    BLK_NUM_QUEUES.pack_into(space, 34, num_queues)
    data = bytes(space[request.offset:request.offset + request.size])
    return Config(request.offset, request.size, request.flags, data).pack()


def ask(conn: Connection, request: FrontendRequest, payload: bytes = b"", *, need_reply: bool = False) -> Message:
    """Send a request to a back-end peer and return its reply, checked against the request table."""
    reply = conn.request(request, payload, need_reply=need_reply)
    FRONTEND_REQUESTS[request].validate_reply(reply.payload, len(reply.fds))
    return reply


# --------------------------------------------------------------------------------------------
# Our side as a hand-written back-end: record what a front-end sends, answer what it asks
# --------------------------------------------------------------------------------------------

@dataclass
class Seen:
    """One request a front-end sent: its header flags, payload and what its fds pointed to."""

    request: int
    flags: int
    payload: bytes
    fd_targets: tuple[str, ...]       # readlink of /proc/self/fd/N: anon_inode:[eventfd], /memfd:...

    @property
    def name(self) -> str:
        return getattr(self.request, "name", str(self.request))

    def u64(self) -> int:
        return unpack_u64(self.payload, self.name)


def serve(conn: Connection, peer: launch.Peer, answer: Callable[[Message], bytes | None],
          until: Callable[[Seen], bool], seen: list[Seen], timeout: float = HANDSHAKE_TIMEOUT) -> None:
    """Answer a front-end's requests until ``until`` is true of one (after its answer is sent).

    ``answer`` returns the reply payload of requests that always get one; a request with NEED_REPLY
    and no reply of its own gets the REPLY_ACK u64 0. Each request is validated against the table
    (and the protocol features the peer set); its fds are closed once recorded or taken by
    ``answer``. Bounded by ``timeout``; a silent or dead peer fails with its log.
    """
    deadline = time.monotonic() + timeout
    negotiated: int | None = None
    with selectors.DefaultSelector() as selector:
        selector.register(conn, selectors.EVENT_READ)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not selector.select(remaining):
                raise AssertionError(f"{peer.name} went quiet after {[s.name for s in seen]}; its output:\n"
                                     f"{peer.log()}")
            conn.sock.settimeout(TIMEOUT)
            try:
                msg = conn.recv()
            except DisconnectedError as exc:
                raise AssertionError(f"{peer.name} disconnected ({exc}) after {[s.name for s in seen]}; "
                                     f"its output:\n{peer.log()}") from None
            with msg:
                spec = check_message(msg, FRONTEND_REQUESTS, negotiated)
                targets = tuple(os.readlink(f"/proc/self/fd/{fd}") for fd in msg.fds)
                seen.append(Seen(msg.request, msg.flags, msg.payload, targets))
                if msg.request == F.SET_PROTOCOL_FEATURES:
                    negotiated = msg.u64()
                payload = answer(msg)
                if spec.reply:
                    if payload is None:
                        raise AssertionError(f"the test has no answer to {spec.name}")
                    spec.validate_reply(payload, 0)
                    conn.reply(msg, payload)
                elif msg.need_reply:
                    conn.reply_u64(msg, 0)
            if until(seen[-1]):
                return


def accept(listener: Listener, peer: launch.Peer, timeout: float = TIMEOUT) -> Connection:
    """Accept the peer's connection, failing (with its log) if it does not come within ``timeout``."""
    with selectors.DefaultSelector() as selector:
        selector.register(listener, selectors.EVENT_READ)
        if not selector.select(timeout):
            peer.check_alive()
            raise AssertionError(f"{peer.name} did not connect within {timeout} s; its output:\n{peer.log()}")
    return listener.accept()


class PeerTestCase(unittest.TestCase):
    """A private temporary directory and a check that no fd leaks from the test."""

    def setUp(self):
        self.fds_before = support.open_fds()
        self.tmp = tempfile.mkdtemp(prefix="vhost_min-wire-")
        self.addCleanup(shutil.rmtree, self.tmp, True)

    def assertNoFdLeak(self):
        leaked = support.open_fds() - self.fds_before
        self.assertFalse(leaked, f"fds left open: {[(fd, _target(fd)) for fd in sorted(leaked)]}")


def _target(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return "?"


# --------------------------------------------------------------------------------------------
# Back-end peers: we are the front-end
# --------------------------------------------------------------------------------------------

class StorageDaemonTest(PeerTestCase):
    """qemu-storage-daemon's vhost-user-blk export (libvhost-user)."""

    #: What a hand-written front-end asks for (everything a blk front-end uses that qsd offers).
    WANTED = P.MQ | P.REPLY_ACK | P.CONFIG | P.CONFIGURE_MEM_SLOTS

    def image(self, size: int) -> str:
        path = os.path.join(self.tmp, "disk.img")
        with open(path, "wb") as f:
            f.truncate(size)
        return path

    def negotiate(self, conn: Connection) -> tuple[int, P]:
        """GET_FEATURES, GET_PROTOCOL_FEATURES, SET_PROTOCOL_FEATURES (our subset)."""
        conn.sock.settimeout(TIMEOUT)
        with ask(conn, F.GET_FEATURES) as reply:
            features = reply.u64()
        with ask(conn, F.GET_PROTOCOL_FEATURES) as reply:
            offered = P(reply.u64())
        conn.send(F.SET_PROTOCOL_FEATURES, pack_u64(offered & self.WANTED))
        return features, offered

    def check_export(self, num_queues: int, image_size: int, block_size: int) -> None:
        with launch.storage_daemon(self.image(image_size), num_queues=num_queues, block_size=block_size) as qsd, \
                Connection.connect(qsd.socket) as conn:
            features, offered = self.negotiate(conn)
            report(self, "GET_FEATURES", f"{features:#x}")
            report(self, "GET_PROTOCOL_FEATURES", names(offered))
            self.assertTrue(features & VIRTIO_F_VERSION_1, f"{features:#x}")
            self.assertTrue(features & PROTOCOL_FEATURES_BIT, f"{features:#x}")
            self.assertTrue(features & VIRTIO_BLK_F_BLK_SIZE and features & VIRTIO_BLK_F_MQ, f"{features:#x}")
            self.assertEqual(offered & self.WANTED, self.WANTED, names(offered))

            with ask(conn, F.GET_QUEUE_NUM) as reply:
                self.assertEqual(reply.u64(), num_queues)
            with ask(conn, F.GET_MAX_MEM_SLOTS) as reply:
                slots = reply.u64()
            report(self, "GET_MAX_MEM_SLOTS", str(slots))
            self.assertGreaterEqual(slots, 8)      # at least what SET_MEM_TABLE could carry

            request = Config(0, VIRTIO_BLK_CONFIG_SIZE, 0, bytes(VIRTIO_BLK_CONFIG_SIZE))
            with ask(conn, F.GET_CONFIG, request.pack()) as reply:
                config = Config.unpack(reply.payload)
            self.assertEqual((config.offset, config.size), (0, VIRTIO_BLK_CONFIG_SIZE))
            self.assertEqual(BLK_CAPACITY.unpack_from(config.data, 0)[0], image_size // 512)
            self.assertEqual(BLK_SIZE.unpack_from(config.data, 20)[0], block_size)
            self.assertEqual(BLK_NUM_QUEUES.unpack_from(config.data, 34)[0], num_queues)

            # REPLY_ACK is negotiated: a request without a reply of its own, sent with NEED_REPLY,
            # gets the u64 0 of success.
            with ask(conn, F.SET_OWNER, need_reply=True) as ack:
                self.assertEqual(ack.u64(), 0)
            with ask(conn, F.SET_FEATURES, pack_u64(features & (VIRTIO_F_VERSION_1 | PROTOCOL_FEATURES_BIT)),
                     need_reply=True) as ack:
                self.assertEqual(ack.u64(), 0)
        self.assertNoFdLeak()

    def test_one_queue_512_byte_blocks(self):
        self.check_export(num_queues=1, image_size=1 << 20, block_size=512)

    def test_two_queues_4k_blocks(self):
        # capacity stays in 512-byte sectors whatever the logical block size
        self.check_export(num_queues=2, image_size=3 << 20, block_size=4096)

    def test_read_only_export_offers_VIRTIO_BLK_F_RO(self):
        with launch.storage_daemon(self.image(1 << 20), writable=False) as qsd, \
                Connection.connect(qsd.socket) as conn:
            features, _ = self.negotiate(conn)
            self.assertTrue(features & VIRTIO_BLK_F_RO, f"{features:#x}")
        self.assertNoFdLeak()

    def test_config_beyond_its_size_gets_the_empty_error_reply_and_it_survives_reconnect(self):
        with launch.storage_daemon(self.image(1 << 20)) as qsd:
            with Connection.connect(qsd.socket) as conn:
                self.negotiate(conn)
                # 72 bytes (with the secure-erase fields) is more than its struct: the spec's
                # error signal, a zero-length GET_CONFIG reply.
                with ask(conn, F.GET_CONFIG, Config(0, 72, 0, bytes(72)).pack()) as reply:
                    self.assertEqual(reply.payload, b"")
            with Connection.connect(qsd.socket) as conn:      # one front-end at a time, again
                features, _ = self.negotiate(conn)
                self.assertTrue(features & VIRTIO_F_VERSION_1)
        self.assertNoFdLeak()


class VirtiofsdTest(PeerTestCase):
    """QEMU 7.2's C virtiofsd (libvhost-user); one-shot, so one per test."""

    def setUp(self):
        super().setUp()
        self.shared = os.path.join(self.tmp, "shared")
        os.mkdir(self.shared)

    def test_features_and_protocol_features(self):
        with launch.virtiofsd(self.shared) as fsd:
            self.assertEqual(os.stat(fsd.socket).st_mode & 0o777, 0o700)
            with Connection.connect(fsd.socket) as conn:
                conn.sock.settimeout(TIMEOUT)
                with ask(conn, F.GET_FEATURES) as reply:
                    features = reply.u64()
                with ask(conn, F.GET_PROTOCOL_FEATURES) as reply:
                    offered = P(reply.u64())
                report(self, "GET_FEATURES", f"{features:#x}")
                report(self, "GET_PROTOCOL_FEATURES", names(offered))
                self.assertTrue(features & VIRTIO_F_VERSION_1 and features & PROTOCOL_FEATURES_BIT, f"{features:#x}")
                wanted = P.MQ | P.REPLY_ACK | P.BACKEND_REQ | P.CONFIGURE_MEM_SLOTS
                self.assertEqual(offered & wanted, wanted, names(offered))
                self.assertFalse(offered & P.CONFIG, "QEMU, not virtiofsd, owns vhost-user-fs's config space")
                conn.send(F.SET_PROTOCOL_FEATURES, pack_u64(offered & wanted))
                with ask(conn, F.GET_QUEUE_NUM) as reply:
                    self.assertEqual(reply.u64(), 2)        # the hiprio queue and one request queue
                with ask(conn, F.SET_OWNER, need_reply=True) as ack:
                    self.assertEqual(ack.u64(), 0)
        self.assertNoFdLeak()

    def test_exits_when_the_frontend_disconnects(self):
        with launch.virtiofsd(self.shared) as fsd:
            with Connection.connect(fsd.socket) as conn:
                conn.sock.settimeout(TIMEOUT)
                with ask(conn, F.GET_FEATURES):
                    pass
            self.assertEqual(fsd.wait_exit(TIMEOUT), 0, fsd.log())
        self.assertNoFdLeak()


class DpdkVhostTest(PeerTestCase):
    """DPDK 22.11 testpmd's net_vhost port (lib/vhost), as a server and as a client."""

    def check(self, conn: Connection) -> None:
        conn.sock.settimeout(TIMEOUT)
        with ask(conn, F.GET_FEATURES) as reply:
            features = reply.u64()
        with ask(conn, F.GET_PROTOCOL_FEATURES) as reply:
            offered = P(reply.u64())
        report(self, "GET_FEATURES", f"{features:#x}")
        report(self, "GET_PROTOCOL_FEATURES", names(offered))
        for bit in (VIRTIO_F_VERSION_1, PROTOCOL_FEATURES_BIT, VIRTIO_F_RING_PACKED, VIRTIO_NET_F_MQ):
            self.assertTrue(features & bit, f"{features:#x} lacks {bit:#x}")
        wanted = P.MQ | P.REPLY_ACK | P.STATUS
        self.assertEqual(offered & wanted, wanted, names(offered))
        conn.send(F.SET_PROTOCOL_FEATURES, pack_u64(wanted))
        with ask(conn, F.GET_QUEUE_NUM) as reply:
            report(self, "GET_QUEUE_NUM", str(reply.u64()))
            self.assertGreaterEqual(reply.u64(), 1)
        with ask(conn, F.SET_OWNER, need_reply=True) as ack:
            self.assertEqual(ack.u64(), 0)

    def test_server(self):
        with launch.testpmd_vhost() as pmd, Connection.connect(pmd.socket) as conn:
            self.check(conn)
        self.assertNoFdLeak()

    def test_client_connects_to_our_listener(self):
        path = os.path.join(self.tmp, "net.sock")
        with Listener(path) as listener, launch.testpmd_vhost(path, client=True) as pmd:
            with accept(listener, pmd) as conn:
                self.check(conn)
        self.assertNoFdLeak()


# --------------------------------------------------------------------------------------------
# Front-end peers: we are the back-end
# --------------------------------------------------------------------------------------------

class VirtioUserTest(PeerTestCase):
    """DPDK 22.11 testpmd's virtio-user port as the front-end of a socket we listen on."""

    #: Offered in GET_PROTOCOL_FEATURES: virtio-user takes MQ|REPLY_ACK|STATUS of it.
    OFFERED = P.MQ | P.REPLY_ACK | P.STATUS | P.CONFIG | P.CONFIGURE_MEM_SLOTS

    def handshake(self, features: int, queues: int = 1, packed: bool = False) -> list[Seen]:
        """Serve virtio-user from connect to DRIVER_OK; return what it sent."""
        status = [0]
        path = os.path.join(self.tmp, "net.sock")

        def answer(msg: Message) -> bytes | None:
            if msg.request == F.GET_FEATURES:
                return pack_u64(features)
            if msg.request == F.GET_PROTOCOL_FEATURES:
                return pack_u64(self.OFFERED)
            if msg.request == F.GET_QUEUE_NUM:
                return pack_u64(queues)
            if msg.request == F.SET_STATUS:
                status[0] = msg.u64()
            if msg.request == F.GET_STATUS:
                return pack_u64(status[0])
            if msg.request == F.GET_VRING_BASE:
                return VringState(VringState.unpack(msg.payload).index, 0).pack()
            return None

        seen: list[Seen] = []
        with Listener(path) as listener, launch.testpmd_virtio_user(path, packed=packed, queues=queues) as pmd:
            with accept(listener, pmd) as conn:
                serve(conn, pmd, answer, lambda s: s.request == F.SET_STATUS and bool(s.u64() & DeviceStatus.DRIVER_OK),
                      seen)
            # our end closed first: stopping testpmd then cannot wait on replies from us
        self.assertNoFdLeak()
        report(self, "virtio-user sent", " ".join(s.name for s in seen))
        return seen

    def check_common(self, seen: list[Seen], features: int, queues: int) -> None:
        order = [s.request for s in seen]
        self.assertEqual(order[:4], [F.SET_OWNER, F.GET_FEATURES, F.GET_PROTOCOL_FEATURES, F.SET_PROTOCOL_FEATURES])
        self.assertEqual(P(seen[3].u64()), P.MQ | P.REPLY_ACK | P.STATUS)   # 0x10009
        set_features = order.index(F.SET_FEATURES)
        self.assertEqual(seen[set_features].u64(), features)               # it acks all we offered
        mem_table = order.index(F.SET_MEM_TABLE)
        self.assertLess(set_features, mem_table)

        calls = [s for s in seen[:set_features] if s.request == F.SET_VRING_CALL]
        self.assertEqual(sorted(VringFd.unpack(s.payload).index for s in calls), list(range(2 * queues)))
        kicks = [s for s in seen[mem_table:] if s.request == F.SET_VRING_KICK]
        self.assertEqual(len(kicks), 2 * queues)
        for s in calls + kicks:
            self.assertEqual(s.fd_targets, ("anon_inode:[eventfd]",), s)

        table = seen[mem_table]
        self.assertTrue(table.flags & VHOST_USER_NEED_REPLY_MASK, "SET_MEM_TABLE is sent with NEED_REPLY")
        regions = MemoryTable.unpack(table.payload).regions
        self.assertGreaterEqual(len(regions), 1)
        self.assertEqual(len(table.fd_targets), len(regions))
        self.assertTrue(all(t.startswith("/memfd:") for t in table.fd_targets), table.fd_targets)
        for region in regions:       # virtio-user's "guest" addresses are its own virtual addresses
            self.assertEqual(region.guest_phys_addr, region.userspace_addr)
        report(self, "SET_MEM_TABLE", f"{[tuple(hex(v) for v in r) for r in regions]} fds {table.fd_targets}")

        statuses = [s.u64() for s in seen if s.request == F.SET_STATUS]
        self.assertEqual(statuses[-1], DeviceStatus.ACKNOWLEDGE | DeviceStatus.DRIVER | DeviceStatus.FEATURES_OK
                         | DeviceStatus.DRIVER_OK)
        self.assertIn(DeviceStatus.ACKNOWLEDGE | DeviceStatus.DRIVER | DeviceStatus.FEATURES_OK, statuses[:-1])

    def test_split_ring_one_queue_pair(self):
        features = VIRTIO_F_VERSION_1 | PROTOCOL_FEATURES_BIT
        seen = self.handshake(features)
        self.check_common(seen, features, queues=1)

    def test_packed_ring_two_queue_pairs(self):
        features = VIRTIO_F_VERSION_1 | PROTOCOL_FEATURES_BIT | VIRTIO_F_RING_PACKED | VIRTIO_NET_F_MQ
        seen = self.handshake(features, queues=2, packed=True)
        self.check_common(seen, features, queues=2)
        bases = [VringState.unpack(s.payload) for s in seen if s.request == F.SET_VRING_BASE]
        # Packed SET_VRING_BASE num: bit 15 is the avail wrap counter, which starts at 1.
        self.assertTrue(bases and all(b.num & 0x7FFF == 0 and b.num & 0x8000 for b in bases), bases)
        report(self, "packed SET_VRING_BASE", " ".join(f"{b.index}:{b.num:#x}" for b in bases))


class QemuFrontendTest(PeerTestCase):
    """QEMU 7.2 with -S: the realize-time handshake of vhost-user devices, answered by hand."""

    BLK_FEATURES = VIRTIO_F_VERSION_1 | PROTOCOL_FEATURES_BIT | VIRTIO_BLK_F_BLK_SIZE | VIRTIO_BLK_F_MQ
    CAPACITY = 2048

    def realize(self, protocol: P, num_queues: int = 1, *, device: str = "vhost-user-blk-pci",
                features: int = BLK_FEATURES, done: Callable[[Seen], bool] = lambda s: s.request == F.GET_CONFIG,
                virtio: tuple[int, int, str] | None = None,
                after: Callable[[launch.Peer, Connection, int], None] | None = None) -> list[Seen]:
        """Start QEMU, answer its requests until ``done``, check it is up over QMP, make it quit.

        ``virtio`` is what x-query-virtio-status must show: (device id, number of virtqueues, a
        feature name from our GET_FEATURES); blk's by default. ``after`` runs before the quit with
        the QEMU peer, our connection and the SET_BACKEND_REQ_FD socket.
        """
        path = os.path.join(self.tmp, "vhost-user.sock")
        backend_fd: list[int] = []
        virtio = virtio or (2, num_queues, "VIRTIO_BLK_F_BLK_SIZE")

        def answer(msg: Message) -> bytes | None:
            if msg.request == F.GET_FEATURES:
                return pack_u64(features)
            if msg.request == F.GET_PROTOCOL_FEATURES:
                return pack_u64(protocol)
            if msg.request == F.GET_QUEUE_NUM:
                return pack_u64(num_queues)
            if msg.request == F.GET_MAX_MEM_SLOTS:
                return pack_u64(32)
            if msg.request == F.GET_CONFIG:
                return blk_config(Config.unpack(msg.payload), self.CAPACITY, num_queues=num_queues)
            if msg.request == F.SET_BACKEND_REQ_FD:
                backend_fd.append(msg.take_fd())
            return None

        seen: list[Seen] = []
        device_args = f"num-queues={num_queues}" if device == "vhost-user-blk-pci" else ""
        with Listener(path) as listener, launch.qemu_frontend(path, device, device_args) as qemu:
            with accept(listener, qemu) as conn:
                try:
                    serve(conn, qemu, answer, done, seen)
                    with qemu.qmp() as qmp:
                        self.assertEqual(qmp.execute("query-status")["status"], "prelaunch")
                        status = qmp.execute("x-query-virtio-status", path="/machine/peripheral/vhost0/virtio-backend")
                        self.assertEqual((status["device-id"], status["num-vqs"]), virtio[:2])
                        self.assertIn(virtio[2], " ".join(status["host-features"]["dev-features"]))
                        if after is not None:
                            after(qemu, conn, backend_fd[0])
                        qmp.quit()
                    self.assertEqual(qemu.wait_exit(TIMEOUT), 0, qemu.log())
                    conn.sock.settimeout(TIMEOUT)
                    with self.assertRaises(DisconnectedError):      # nothing more before it hangs up
                        conn.recv().close()
                finally:
                    for fd in backend_fd:
                        os.close(fd)
        self.assertNoFdLeak()
        report(self, f"QEMU {device} realize sent", " ".join(s.name for s in seen))
        return seen

    def check_vring_fds(self, seen: list[Seen], num_queues: int) -> None:
        """SET_VRING_CALL then SET_VRING_ERR per queue, in queue order, each with an eventfd."""
        fds = [s for s in seen if s.request in (F.SET_VRING_CALL, F.SET_VRING_ERR)]
        self.assertEqual([(s.request, VringFd.unpack(s.payload).index) for s in fds],
                         [(r, q) for q in range(num_queues) for r in (F.SET_VRING_CALL, F.SET_VRING_ERR)])
        for s in fds:
            self.assertEqual(s.fd_targets, ("anon_inode:[eventfd]",), s)

    def check_blk_config_request(self, seen: list[Seen]) -> None:
        # QEMU 7.2 reads 57 bytes: virtio_blk_config up to write_zeroes_may_unmap, not unused1[3].
        self.assertEqual(Config.unpack(seen[-1].payload)[:3], (0, 57, 0))

    def test_realize_handshake(self):
        protocol = P.MQ | P.REPLY_ACK | P.BACKEND_REQ | P.CONFIG
        seen = self.realize(protocol)
        self.assertEqual([s.request for s in seen], [
            F.GET_FEATURES, F.GET_PROTOCOL_FEATURES, F.SET_PROTOCOL_FEATURES, F.GET_QUEUE_NUM,
            F.SET_BACKEND_REQ_FD, F.SET_OWNER, F.GET_FEATURES, F.SET_VRING_CALL, F.SET_VRING_ERR, F.GET_CONFIG])
        self.assertEqual(P(seen[2].u64()), protocol)
        backend_req = seen[4]
        self.assertTrue(backend_req.flags & VHOST_USER_NEED_REPLY_MASK, "SET_BACKEND_REQ_FD is sent with NEED_REPLY")
        self.assertEqual(len(backend_req.fd_targets), 1)
        self.assertTrue(backend_req.fd_targets[0].startswith("socket:"), backend_req.fd_targets)
        self.check_vring_fds(seen, 1)
        self.check_blk_config_request(seen)

    def test_realize_with_mem_slots_and_two_queues(self):
        protocol = P.MQ | P.REPLY_ACK | P.BACKEND_REQ | P.CONFIG | P.CONFIGURE_MEM_SLOTS
        seen = self.realize(protocol, num_queues=2)
        self.assertEqual([s.request for s in seen[:7]], [
            F.GET_FEATURES, F.GET_PROTOCOL_FEATURES, F.SET_PROTOCOL_FEATURES, F.GET_QUEUE_NUM,
            F.GET_MAX_MEM_SLOTS, F.SET_BACKEND_REQ_FD, F.SET_OWNER])
        self.assertEqual(P(seen[2].u64()), protocol)
        self.check_vring_fds(seen, 2)
        self.check_blk_config_request(seen)

    def test_virtio_net_realize_with_a_vhost_user_netdev(self):
        features = VIRTIO_F_VERSION_1 | PROTOCOL_FEATURES_BIT | VIRTIO_NET_F_MRG_RXBUF
        seen = self.realize(P.MQ | P.REPLY_ACK, device="virtio-net-pci", features=features,
                            done=lambda s: s.request == F.SET_VRING_ENABLE and VringState.unpack(s.payload).index == 1,
                            virtio=(1, 3, "VIRTIO_NET_F_MRG_RXBUF"))   # rx, tx + QEMU's ctrl vq
        self.assertEqual([s.request for s in seen[:6]], [
            F.GET_FEATURES, F.GET_PROTOCOL_FEATURES, F.SET_PROTOCOL_FEATURES, F.GET_QUEUE_NUM, F.SET_OWNER,
            F.GET_FEATURES])
        self.check_vring_fds(seen, 2)           # one rx/tx pair: vrings 0 and 1
        # The vhost-user netdev enables each ring as soon as the chardev opens, long before the
        # device starts (the first driver-ready step of blk): a back-end must accept it that early.
        self.assertEqual([VringState.unpack(s.payload) for s in seen if s.request == F.SET_VRING_ENABLE],
                         [(0, 1), (1, 1)])

    def test_backend_channel_config_change_is_acked(self):
        """BACKEND_CONFIG_CHANGE_MSG with NEED_REPLY on the SET_BACKEND_REQ_FD socket: QEMU acks 0."""
        acks: list[int] = []

        def config_change(qemu: launch.Peer, conn: Connection, fd: int) -> None:
            channel = Connection.from_fd(os.dup(fd), requests=BackendRequest)
            with channel:
                channel.sock.settimeout(TIMEOUT)
                channel.send(BackendRequest.CONFIG_CHANGE_MSG, need_reply=True)
                deadline = time.monotonic() + TIMEOUT
                with selectors.DefaultSelector() as selector:
                    selector.register(conn, selectors.EVENT_READ, conn)
                    selector.register(channel, selectors.EVENT_READ, channel)
                    while not acks:
                        ready = selector.select(max(0.0, deadline - time.monotonic()))
                        self.assertTrue(ready, f"no answer to BACKEND_CONFIG_CHANGE_MSG; QEMU:\n{qemu.log()}")
                        for key, _ in ready:
                            if key.data is channel:
                                with channel.recv() as reply:
                                    self.assertEqual(reply.request, BackendRequest.CONFIG_CHANGE_MSG)
                                    self.assertTrue(reply.is_reply)
                                    BACKEND_REQUESTS[BackendRequest.CONFIG_CHANGE_MSG].validate_reply(
                                        reply.payload, len(reply.fds))
                                    acks.append(reply.u64())
                            else:          # a running device would re-read its config here
                                serve(conn, qemu, lambda m: blk_config(Config.unpack(m.payload), 2 * self.CAPACITY),
                                      lambda s: True, [])

        self.realize(P.MQ | P.REPLY_ACK | P.BACKEND_REQ | P.CONFIG, after=config_change)
        self.assertEqual(acks, [0])


class LauncherTest(PeerTestCase):
    """The launchers themselves: a peer that dies at startup fails at once, with its own words."""

    def test_a_peer_that_exits_early_fails_fast_with_its_output(self):
        image = os.path.join(self.tmp, "disk.img")
        with open(image, "wb") as f:
            f.truncate(1 << 20)
        with self.assertRaises(AssertionError) as caught:
            with launch.storage_daemon(image, block_size=1000):
                pass
        self.assertIn("not a power of 2", str(caught.exception))     # its own words, not a timeout
        self.assertNoFdLeak()


if __name__ == "__main__":
    unittest.main()
