"""The vhost-user back-end framework: devices as small classes, the protocol state machine that
serves them, and a ready-made selectors loop.

Read top to bottom:

* :class:`~vhost_min.device.Device` (device.py, re-exported here) -- what a device author writes:
  feature bits, config space, what to do with one request chain. Every hook it leaves alone
  answers "not supported" (and the protocol feature that would lead to it is not offered).
* :class:`Backend` -- one front-end connection. It checks every message against user.py's request
  table (header version and flags, exact payload size, the fd whitelist, the protocol-feature gate
  of each request), answers REPLY_ACK centrally, and owns the protocol state: virtio and protocol
  features, memory regions and their mappings, per-ring started/stopped x enabled/disabled, the
  dirty log, the IOTLB, the inflight region, the back-end request channel and the status byte.
  When a kick fd is readable it runs the data path (``Device.process``). Event-loop agnostic:
  :meth:`Backend.watched` lists the fds to poll and what to call, :meth:`Backend.attach` keeps any
  loop's reader registrations in step (``backend.attach(loop.add_reader, loop.remove_reader)``).
* :class:`Server` / :func:`serve` -- a selectors loop for any number of sockets, devices and
  connections in one thread; it keeps serving after a disconnect or a protocol error.

Decisions the spec leaves open, in one place (spec = QEMU docs/interop/vhost-user.rst):

* Ring states ("Ring states"). A ring starts *stopped and disabled*. It is *started* when its kick
  fd becomes readable or by an in-band VRING_KICK -- or, in poll mode (SET_VRING_KICK with the NOFD
  bit), at once, since no kick will ever come. GET_VRING_BASE *stops* it for good and keeps its
  state (the queue object, its indices): the device first finishes what it holds (``stopped()``),
  the kick fd is closed and unwatched, and only a new SET_VRING_KICK (or an in-band VRING_KICK)
  starts it again. SET_VRING_ENABLE toggles enabled; it is accepted once protocol features are
  negotiated (SET_PROTOCOL_FEATURES; QEMU's net device enables rings before SET_FEATURES) and
  refused before (NotNegotiatedError); SET_FEATURES without VHOST_USER_F_PROTOCOL_FEATURES enables
  every ring at once. SET_VRING_CALL signals the new call fd at once, as libvhost-user does.
  Started+enabled rings go to ``Device.process``; started+disabled rings go to
  ``Device.process_disabled``, whose default leaves the chains in the ring (no side effects; they
  are processed once the ring is enabled) -- a net device overrides it to discard TX
  (``Device.discard``). Discarding by default would lose block writes kicked in the window between
  SET_VRING_KICK (QEMU's kick eventfd starts signalled) and the SET_VRING_ENABLE that follows it.
* Suspended device (all rings stopped): no ring is processed, no call is signalled, and
  CONFIG_CHANGE_MSG is held back until a ring starts; front-end messages are still answered.
* The device queue (vring.SplitDeviceQueue, or packed.PackedDeviceQueue when VIRTIO_F_RING_PACKED
  was negotiated) is built when the ring is first processed, not at SET_VRING_ADDR: the ring
  addresses are front-end user addresses translated through the memory table (IOVAs through the
  IOTLB with VIRTIO_F_ACCESS_PLATFORM), which may arrive later: until then (or while a hotplug has
  removed its region) a started ring waits, it is not broken; misses go to the front-end as
  BACKEND_IOTLB_MSG. SET_VRING_ADDR refuses addresses outside the memory known at that time.
  SET_VRING_NUM/ADDR/BASE and a change of a ring-shaping feature drop the queue (the next avail
  index is carried over, the used index re-read from guest memory as SET_VRING_BASE says).
* Poll mode: rings without a kick fd are processed after every front-end message and every
  ``Server.poll_interval`` (POLL_INTERVAL, 10 ms); under another loop, call :meth:`Backend.poll`
  whenever :attr:`Backend.poll_interval` says (None = nothing to poll, 0 = work is pending).
* Errors. A rejected message is logged in one line on logger ``vhost_min.backend`` and its fds
  are closed. The answer: a non-zero u64 (the errno) where a u64 is due (NEED_REPLY, or a request
  whose reply is a status: SET_LOG_BASE, IOTLB_MSG, POSTCOPY_END, GET_SHARED_OBJECT,
  SET_DEVICE_STATE_FD with the NOFD bit, CHECK_DEVICE_STATE), a zero-size payload for GET_CONFIG and
  POSTCOPY_ADVISE; requests whose reply is a value (GET_FEATURES, GET_VRING_BASE, GET_QUEUE_NUM...)
  have no way to say "error", so the connection is closed -- as it is for broken framing (bad
  version, reserved flags, oversize payload, more than 8 fds, EOF inside a message) and for
  INBAND_NOTIFICATIONS without BACKEND_REQ and REPLY_ACK (the spec's only "should close").
  Anything else keeps the connection open.
* Front-ends that stall or flood never hold up the loop. The socket is non-blocking: a message is
  assembled across reads (header, its fds, payload) and handled once complete, one per readable
  event; replies the kernel does not take at once wait in a bounded queue (VHOST_USER_MAX_QUEUED
  bytes), past which the front-end is dropped. One that stops inside a message, or leaves its
  replies unread, for STALL_TIMEOUT is dropped with the reason logged; one idle between messages
  never is. The back-end channel queues the same way; a request that needs an answer waits for it
  at most BACKEND_REQUEST_TIMEOUT.
* Memory regions must be 4 KiB aligned (guest address, size, user address, mmap offset): QEMU
  rounds vhost-user regions to the RAMBlock page size, DPDK sends whole hugepages, and the dirty
  log works in 4 KiB pages. Overlapping regions (guest or user addresses) are refused.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import logging
import os
import selectors
import signal
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence

from .errors import (DisconnectedError, GuestMemoryError, NotNegotiatedError, NotSupportedError, ProtocolError,
                     VhostError)
from .memory import (IOTLB, MAX_MEM_SLOTS, VHOST_ACCESS_RO, VHOST_ACCESS_WO, DirtyLog, GuestMemory, IOTLBMiss,
                     IOVALog)
from .user import (BACKEND_REQUESTS, FRONTEND_REQUESTS, VHOST_IOTLB_INVALIDATE, VHOST_IOTLB_MISS, VHOST_IOTLB_UPDATE,
                   VHOST_SET_CONFIG_TYPE_FRONTEND, VHOST_SET_CONFIG_TYPE_MIGRATION,
                   VHOST_TRANSFER_STATE_DIRECTION_LOAD, VHOST_TRANSFER_STATE_DIRECTION_SAVE,
                   VHOST_TRANSFER_STATE_PHASE_STOPPED, VHOST_USER_DEVICE_STATE_ERROR_MASK, VHOST_USER_FLAG_MAP_RW,
                   VHOST_USER_VRING_IDX_MASK, VHOST_USER_VRING_NOFD_MASK, BackendRequest, Config, Connection,
                   DeviceState, FrontendRequest, Inflight, IotlbMsg, Listener, Log, MemoryRegion, MemoryTable,
                   Message, NO_FEATURES, ProtocolFeature, RequestSpec, SharedObject, ShmemConfig, ShmemMap, VirtioGate,
                   VringAddr, VringArea, VringFd, VringState, check_message, pack_u64)
from .virtio import (VHOST_F_LOG_ALL, VHOST_USER_F_PROTOCOL_FEATURES, VHOST_VRING_F_LOG, VIRTIO_F_ACCESS_PLATFORM,
                     VIRTIO_F_EVENT_IDX, VIRTIO_F_INDIRECT_DESC, VIRTIO_F_RING_PACKED, VIRTIO_F_VERSION_1,
                     VIRTQ_MAX_SIZE, DeviceStatus, misaligned_ring_part, ring_sizes)
from . import inflight as _inflight
from .device import Completions, Device
from .packed import PackedDeviceQueue, decode_base, encode_base
from .vring import SplitDeviceQueue

__all__ = ["Device", "Backend", "Ring", "Server", "serve", "POLL_INTERVAL", "REGION_ALIGN", "MAX_QUEUES"]

log = logging.getLogger("vhost_min.backend")

#: How often rings in poll mode (no kick fd) and work a device left for later are looked at.
POLL_INTERVAL = 0.01
#: The first busy-polling window, and the most a device or the server may ask for (Server.step).
POLL_START_NS = 4000
MAX_POLL_US = 10_000
#: Alignment every memory region field must have (the smallest page; see the module docstring).
REGION_ALIGN = 0x1000
#: Most queues a device can have: SET_VRING_KICK/CALL/ERR carry the index in 8 bits.
MAX_QUEUES = VHOST_USER_VRING_IDX_MASK + 1
#: How long CHECK_DEVICE_STATE waits for the device's save_state/load_state to finish.
STATE_TRANSFER_TIMEOUT = 30.0
#: How long CHECK_DEVICE_STATE may hold up the loop; a transfer still running then is answered
#: from poll() when it ends (a front-end that keeps its end of the pipe open stalls only itself).
STATE_CHECK_GRACE = 0.1
#: How long a back-end request may take to send and, where one is due, to be answered; a front-end
#: slower than that loses the back-end channel (the loop serves every connection and ring).
BACKEND_REQUEST_TIMEOUT = 2.0
#: How long a front-end may leave a message sent in part (header, fds or payload missing), or
#: leave our replies unread once the socket buffers are full, before it is dropped with a logged
#: reason. libvhost-user waits forever; one loop here serves many front-ends, and a stalled one
#: holds at most one message (header + max payload, its fds) and VHOST_USER_MAX_QUEUED of replies
#: meanwhile. A front-end idle *between* messages is never dropped.
STALL_TIMEOUT = 30.0
#: How long a client-mode endpoint waits between connection attempts.
RECONNECT_INTERVAL = 1.0

# Virtio features whose change changes the device queue a ring needs.
_RING_FEATURES = int(VIRTIO_F_EVENT_IDX | VIRTIO_F_INDIRECT_DESC | VIRTIO_F_RING_PACKED | VIRTIO_F_ACCESS_PLATFORM)


def _close(fd: int | None) -> None:
    if fd is not None and fd >= 0:
        try:
            os.close(fd)
        except OSError:
            pass


def _note_unsealed(fd: int, region: MemoryRegion, what: str) -> None:
    """Log a region whose fd its front-end can still shrink: map_fd checked the size, but an
    ftruncate afterwards makes our next access to the lost pages a SIGBUS that kills the process
    (every connection with it). QEMU's memory-backend-memfd seals by default (seal=on: F_SEAL_GROW
    | F_SEAL_SHRINK | F_SEAL_SEAL); memory-backend-file and DPDK's hugepage files are never sealed."""
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError:
        seals = 0                                   # not a file that can be sealed at all
    if not seals & fcntl.F_SEAL_SHRINK:
        log.info("%s: region at guest %#x (%#x bytes): its fd is not sealed against shrinking (F_SEAL_SHRINK); "
                 "the front-end must not truncate it while it is mapped", what, region.guest_phys_addr,
                 region.memory_size)


def _forget_frames(exc: BaseException | None) -> None:
    """Drop the tracebacks of an exception kept for later (and of its causes)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        exc.__traceback__ = None
        if exc.__cause__ is not None:
            _forget_frames(exc.__cause__)
        exc = exc.__context__


def _errno_of(exc: BaseException) -> int:
    return exc.errno if isinstance(exc, OSError) and exc.errno else errno.EIO


def _overrides(device: Device, name: str) -> bool:
    return getattr(type(device), name, None) is not getattr(Device, name)


#: Device classes -> the protocol features their hook overrides offer (see _offer_protocol_features).
_hook_features: dict[type, int] = {}

#: Device hooks whose override offers a protocol feature.
_HOOK_FEATURES = (
    ("get_config", ProtocolFeature.CONFIG),
    ("send_rarp", ProtocolFeature.RARP),
    ("set_mtu", ProtocolFeature.NET_MTU),
    ("get_shared_object", ProtocolFeature.SHARED_OBJECT),
    ("get_shmem_config", ProtocolFeature.SHMEM),
)

#: What the framework implements itself, whatever the device. INBAND_NOTIFICATIONS is implemented
#: too but offered only when the device asks for it (its ``protocol_features``): QEMU 7.2 acks the
#: bit yet understands neither BACKEND_VRING_CALL nor BACKEND_VRING_ERR, and every in-band call
#: waits for the front-end's answer.
_BASE_PROTOCOL_FEATURES = (ProtocolFeature.MQ | ProtocolFeature.LOG_SHMFD | ProtocolFeature.REPLY_ACK
                           | ProtocolFeature.BACKEND_REQ | ProtocolFeature.BACKEND_SEND_FD | ProtocolFeature.RESET_DEVICE
                           | ProtocolFeature.CONFIGURE_MEM_SLOTS | ProtocolFeature.STATUS)
#: What every back-end offers on top of its device's bits, as ints (worked out once, not per connection).
_LIBRARY_FEATURES = int(VIRTIO_F_VERSION_1 | VIRTIO_F_INDIRECT_DESC | VIRTIO_F_EVENT_IDX | VIRTIO_F_RING_PACKED
                        | VHOST_F_LOG_ALL | VHOST_USER_F_PROTOCOL_FEATURES)
_LIBRARY_PROTOCOL_FEATURES = int(_BASE_PROTOCOL_FEATURES | ProtocolFeature.INFLIGHT_SHMFD)

# The masks handlers test, as plain ints: an IntFlag operator costs about a microsecond, and the
# handshake's messages test a dozen of them (``int & IntFlag`` goes through enum's __rand__).
_F_PROTOCOL_FEATURES = int(VHOST_USER_F_PROTOCOL_FEATURES)
_F_INDIRECT_DESC, _F_EVENT_IDX = int(VIRTIO_F_INDIRECT_DESC), int(VIRTIO_F_EVENT_IDX)
_F_VERSION_1, _F_ACCESS_PLATFORM, _F_RING_PACKED = (int(VIRTIO_F_VERSION_1), int(VIRTIO_F_ACCESS_PLATFORM),
                                                    int(VIRTIO_F_RING_PACKED))
_PF_REPLY_ACK, _PF_BACKEND_REQ = int(ProtocolFeature.REPLY_ACK), int(ProtocolFeature.BACKEND_REQ)
_PF_CONFIG, _PF_INBAND = int(ProtocolFeature.CONFIG), int(ProtocolFeature.INBAND_NOTIFICATIONS)


# --------------------------------------------------------------------------------------------
# Rings
# --------------------------------------------------------------------------------------------

class Ring:
    """What the back-end knows about one vring: the front-end's settings, the two independent
    states (started/stopped, enabled/disabled) and the device queue once it exists."""

    __slots__ = ("index", "size", "addr", "base", "started", "enabled", "kick_fd", "call_fd", "err_fd",
                 "polling", "call_polling", "err_polling", "queue", "broken", "again", "waiting_iotlb",
                 "unmapped", "on_kick")

    def __init__(self, index: int) -> None:
        self.index = index
        self.on_kick: Callable[[], None] | None = None   # the kick-fd handler (a stable object)
        self.kick_fd: int | None = None
        self.call_fd: int | None = None
        self.err_fd: int | None = None
        self.clear()

    def clear(self) -> None:
        """The initial state (fds are the caller's to close)."""
        self.size = 0                       # SET_VRING_NUM; 0 = not set
        self.addr: VringAddr | None = None  # SET_VRING_ADDR as received
        self.base: int | None = None        # SET_VRING_BASE num / a dropped queue's get_base(); None: fresh
        self.started = False
        self.enabled = False
        self.polling = False                # SET_VRING_KICK with NOFD: poll instead of kicks
        self.call_polling = False           # SET_VRING_CALL with NOFD: the front-end polls
        self.err_polling = False
        self.queue = None                   # Split/PackedDeviceQueue, built when first processed
        self.broken: str | None = None      # why the ring stopped working (driver or device bug)
        self.again = False                  # process() asked to be called again
        self.waiting_iotlb = False          # an IOTLB miss was reported; waiting for an update
        self.unmapped = False               # the ring's addresses are in no memory region (yet)

    def __repr__(self) -> str:
        state = ("started" if self.started else "stopped") + ("+enabled" if self.enabled else "+disabled")
        return f"<Ring {self.index} size={self.size} {state}{' broken' if self.broken else ''}>"


class _StateTransfer:
    """A SET_DEVICE_STATE_FD transfer: the device's save_state/load_state on the fd, in a thread
    (the front-end reads or writes the other end only after our reply)."""

    def __init__(self, device: Device, direction: int, fd: int) -> None:
        self.error: BaseException | None = None
        save = direction == VHOST_TRANSFER_STATE_DIRECTION_SAVE
        self._file = os.fdopen(fd, "wb" if save else "rb")
        self._run = functools.partial(device.save_state if save else device.load_state, self._file)
        self.thread = threading.Thread(target=self._main, name="vhost-user device state", daemon=True)
        self.thread.start()

    def _main(self) -> None:
        try:
            self._run()
        except BaseException as exc:   # noqa: BLE001 (reported by CHECK_DEVICE_STATE)
            self.error = exc
        finally:
            try:
                self._file.close()
            except OSError as exc:
                self.error = self.error or exc


# --------------------------------------------------------------------------------------------
# Backend
# --------------------------------------------------------------------------------------------

class Backend:
    """One front-end connection served for ``device``: the vhost-user state machine.

    Drive it from any loop: call :meth:`handle_message` when the socket is readable (or just use
    :meth:`watched` / :meth:`attach`, which also cover the kick fds), and :meth:`poll` as
    :attr:`poll_interval` says. It never raises for anything the front-end sends; it closes
    itself (``closed``) when the peer disconnects or the connection cannot go on.
    """

    def __init__(self, device: Device, connection: Connection, *, name: str | None = None) -> None:
        if not isinstance(device, Device):
            raise TypeError(f"{device!r} is not a vhost_min.backend.Device")
        if device.backend is not None and not device.backend.closed:
            raise VhostError(f"{device!r} already serves {device.backend!r}", errno.EBUSY)
        nq = device.num_queues
        if not (isinstance(nq, int) and 1 <= nq <= MAX_QUEUES):
            raise ValueError(f"{type(device).__name__}.num_queues must be 1..{MAX_QUEUES}, not {nq!r}")
        self.device = device
        self.connection = connection
        connection.make_nonblocking()       # never wait on the front-end: messages in part, replies queued
        self.name = name or f"{type(device).__name__}[fd {connection.fileno()}]"
        self.closed = False
        self.last_error: BaseException | None = None
        #: Called with every exception that rejected a message or closed the connection (not
        #: for a disconnect: ``last_error`` has that one).
        self.on_error: Callable[[BaseException], None] | None = None
        #: Called (with no argument) whenever :meth:`watched` changes.
        self.on_watch_change: Callable[[], None] | None = None

        self.offered_features = self._offer_features()
        self.offered_protocol_features = self._offer_protocol_features()

        self.features = 0                   # acknowledged with SET_FEATURES
        self.features_acked = False
        self._features_failed = False       # SET_FEATURES was refused: FEATURES_OK does not stick
        self.protocol_features = NO_FEATURES
        self.protocol_negotiated = False    # SET_PROTOCOL_FEATURES was accepted
        self.owner = False
        self.status = 0
        self.memory = GuestMemory(max_regions=MAX_MEM_SLOTS)
        self._region_users: dict[tuple[int, int, int], int] = {}     # ADD_MEM_REG of a mapped region: extra users
        self.iotlb: IOTLB | None = None
        self.log: DirtyLog | None = None
        self.log_fd: int | None = None
        self.channel: Connection | None = None      # SET_BACKEND_REQ_FD
        self.inflight = None                        # inflight.InflightRegion
        self._transfer: _StateTransfer | None = None
        self._state_check: tuple[Message, float] | None = None   # CHECK_DEVICE_STATE owed, its deadline
        self._config_change_pending = False
        self.rings = [Ring(i) for i in range(nq)]
        for ring in self.rings:
            ring.on_kick = functools.partial(self._on_kick_fd, ring)
        self._socket_handler = self.handle_message  # one object, so attach() sees no change
        # Chains asynchronous devices completed in other threads (post_used), pushed by the loop.
        self._completions = Completions()
        self._wake_handler = self._on_wake
        # The device's own fds (Device.watched), each callback followed by a push of what it posted.
        self._device_fds = {fd: functools.partial(self._on_device_fd, callback)
                            for fd, callback in device.watched().items()}
        device.backend = self

    def __repr__(self) -> str:
        return f"<Backend {self.name}{' closed' if self.closed else ''}>"

    # -- what is offered ---------------------------------------------------------------------------
    def _offer_features(self) -> int:
        return int(self.device.features) | _LIBRARY_FEATURES

    def _offer_protocol_features(self) -> ProtocolFeature:
        # Per device class, worked out once (the hooks a class overrides do not change).
        hooks = _hook_features.get(type(self.device))
        if hooks is None:
            hooks = 0
            for hook, feature in _HOOK_FEATURES:
                if _overrides(self.device, hook):
                    hooks |= feature
            if _overrides(self.device, "save_state") and _overrides(self.device, "load_state"):
                hooks |= ProtocolFeature.DEVICE_STATE
            hooks = _hook_features[type(self.device)] = int(hooks)
        return ProtocolFeature(_LIBRARY_PROTOCOL_FEATURES | hooks | int(self.device.protocol_features))

    # -- event-loop interface ----------------------------------------------------------------------
    def fileno(self) -> int:
        return self.connection.fileno()

    def watched(self) -> dict[int, Callable[[], None]]:
        """Every fd to watch for reading now (the socket, the completion wake-up, the device's own
        fds from Device.watched and the rings' kick eventfds) and what to call when it is
        readable. Empty once closed."""
        if self.closed:
            return {}
        fds = {self.connection.fileno(): self._socket_handler, self._completions.fd: self._wake_handler,
               **self._device_fds}
        for ring in self.rings:
            if ring.kick_fd is not None:
                fds[ring.kick_fd] = ring.on_kick
        return fds

    def attach(self, add_reader: Callable[[int, Callable[[], None]], object],
               remove_reader: Callable[[int], object]) -> None:
        """Keep a loop's readers in step with :meth:`watched`: ``backend.attach(loop.add_reader,
        loop.remove_reader)`` for asyncio, or a selector's register/unregister. Replaces
        :attr:`on_watch_change`. Readers are removed before their fds are closed."""
        current: dict[int, Callable[[], None]] = {}

        def sync() -> None:
            wanted = self.watched()
            for fd, callback in list(current.items()):
                if wanted.get(fd) is not callback:
                    del current[fd]
                    try:
                        remove_reader(fd)
                    except (KeyError, ValueError, OSError):
                        pass
            for fd, callback in wanted.items():
                if fd not in current:
                    add_reader(fd, callback)
                    current[fd] = callback

        self.on_watch_change = sync
        sync()

    def _watch_changed(self) -> None:
        callback = self.on_watch_change
        if callback is not None:
            try:
                callback()
            except Exception:   # noqa: BLE001
                log.exception("%s: on_watch_change failed", self.name)

    @property
    def poll_interval(self) -> float | None:
        """When :meth:`poll` wants to run: 0 (work pending), POLL_INTERVAL (a ring is in poll mode
        or waits for nothing but time), or None (only fds matter)."""
        interval = POLL_INTERVAL if self._state_check is not None else None
        connection, channel = self.connection, self.channel
        if connection.pending_output or (channel is not None and channel.pending_output):
            interval = POLL_INTERVAL                    # try again to hand the replies over
        elif connection.partial_since is not None:      # due: the stall deadline
            wait = max(0.0, connection.partial_since + STALL_TIMEOUT - time.monotonic())
            interval = wait if interval is None else min(interval, wait)
        for ring in self.rings:
            if ring.started and not ring.broken:
                if ring.again:
                    return 0.0
                if ring.polling:
                    interval = POLL_INTERVAL
        return interval

    def poll(self) -> None:
        """Process rings in poll mode and rings whose device asked to be called again."""
        if self.closed:
            return
        connection, channel = self.connection, self.channel
        if (connection.pending_output or connection.partial_since is not None
                or (channel is not None and channel.pending_output)) and not self._keep_up():
            return
        if self._state_check is not None:
            self._answer_state_check()
        for ring in self.rings:
            if ring.started and (ring.polling or ring.again) and not ring.broken:
                self._run(ring)

    def busy_poll(self) -> bool:
        """One look, without a system call unless there is work, at what the device completed
        (Device.poll_ready, Device.poll) and at every started ring for chains the driver made
        available: the work is done now, as a kick or the device's fd would have had it done.
        True if there was any. The loop calls it while busy-polling (Device.poll_us)."""
        if self.closed:
            return False
        did = self.device.poll_ready()
        if did:
            self._completions.run_held(self.device.poll)
            self._push_posted()
        for ring in self.rings:
            vq = ring.queue
            if vq is None or not ring.started or not ring.enabled or ring.broken or ring.waiting_iotlb:
                continue
            try:
                pending = vq.pending()
            except VhostError:
                pending = -1                        # _run meets the error and breaks the ring
            if pending:
                fd = ring.kick_fd
                if fd is not None:
                    try:
                        os.eventfd_read(fd)         # the kick that announced these, if it came
                    except OSError:
                        pass
                self._run(ring)
                # Work only if the device took chains: one that leaves them for later (a net
                # device's receive buffers wait for frames) must not keep the loop spinning.
                try:
                    did = did or ring.queue is not vq or vq.pending() != pending
                except VhostError:
                    did = True
        return did

    def _keep_up(self) -> bool:
        """Hand over queued output (replies, back-end channel messages) and drop a front-end
        stalled for STALL_TIMEOUT inside a message or on its unread replies; False if dropped."""
        connection, channel = self.connection, self.channel
        if channel is not None and channel.pending_output:
            try:
                channel.flush()
            except VhostError as exc:
                log.warning("%s: the back-end channel failed (%s); dropped", self.name, exc)
                self._drop_channel()
        try:
            if connection.pending_output:
                connection.flush()
        except VhostError as exc:
            log.info("%s: front-end disconnected with replies unread (%s)", self.name, exc)
            _forget_frames(exc)
            self.last_error = exc
            self.close()
            return False
        now = time.monotonic()
        since = connection.partial_since
        if since is not None and now - since > STALL_TIMEOUT:
            what = f"sent a message in part ({connection.partial}) and nothing more for {now - since:.1f} s"
        else:
            since = connection.output_stalled_since
            if since is None or now - since <= STALL_TIMEOUT:
                return True
            what = (f"took none of our {connection.pending_output} queued reply bytes for {now - since:.1f} s")
        exc = VhostError(f"the front-end {what} (STALL_TIMEOUT {STALL_TIMEOUT} s)", errno.ETIMEDOUT)
        self._error(exc)
        log.warning("%s: closing the connection: %s", self.name, exc)
        self.close()
        return False

    # -- messages ----------------------------------------------------------------------------------
    def handle_message(self) -> bool:
        """Read what the socket holds (call when it is readable) and answer the message it
        completes; a message sent in part waits for its next bytes. One message per call, so a
        front-end that floods gets one per loop turn like everyone else. False once the connection
        is gone (the peer left, or it had to be closed); the backend is then closed."""
        if self.closed:
            return False
        connection = self.connection
        try:
            if connection.pending_output:
                connection.flush()
            msg = connection.recv_nowait()
            if msg is None:
                return True
        except DisconnectedError as exc:
            # Normal at VM shutdown, so not an error for on_error; the log line says whether it
            # happened inside a message.
            log.info("%s: front-end disconnected (%s: %s)", self.name, type(exc).__name__, exc)
            _forget_frames(exc)
            self.last_error = exc
            self.close()
            return False
        except Exception as exc:   # noqa: BLE001 (broken framing: ProtocolError, or an OSError)
            self._error(exc)
            log.warning("%s: closing the connection, the message framing is broken: %s: %s",
                        self.name, type(exc).__name__, exc)
            self.close()
            return False
        try:
            self._dispatch(msg)
        except Exception:   # noqa: BLE001 (a bug of ours: drop this connection, keep the process)
            log.exception("%s: internal error handling %r; closing the connection", self.name, msg)
            self.close()
        finally:
            msg.close()
        if self.closed:
            return False
        self.poll()
        self._flush_config_change()
        return not self.closed

    def _dispatch(self, msg: Message) -> None:
        nfds = len(msg.fds)
        spec = FRONTEND_REQUESTS.get(msg.request)
        try:
            if spec is None:
                raise ProtocolError(f"request {int(msg.request)} is not a front-end request the protocol defines")
            check_message(msg, FRONTEND_REQUESTS, self.protocol_features)
            if spec.virtio_gate is not None:
                self._check_virtio_gate(spec)
            result = self._HANDLERS[spec.request](self, msg)
        except Exception as exc:   # noqa: BLE001 (every failure becomes an answer, never a crash)
            self._reject(msg, spec, nfds, exc)
            return
        if result is _ALREADY_ANSWERED:
            return
        if spec.reply:
            payload, fds = result if isinstance(result, tuple) else (result, ())
            self._send_reply(msg, payload, fds)
        elif msg.need_reply:
            self._send_reply(msg, _ACK)

    def _check_virtio_gate(self, spec: RequestSpec) -> None:
        gate = spec.virtio_gate
        if gate is VirtioGate.PROTOCOL_FEATURES and not (self.protocol_negotiated
                                                         or self.features & _F_PROTOCOL_FEATURES):
            raise NotNegotiatedError(f"{spec.name} needs VHOST_USER_F_PROTOCOL_FEATURES negotiated: "
                                     f"VHOST_USER_SET_PROTOCOL_FEATURES or the bit acked with "
                                     f"VHOST_USER_SET_FEATURES (features {self.features:#x})")
        if gate is VirtioGate.ACCESS_PLATFORM and not self.features & _F_ACCESS_PLATFORM:
            raise NotNegotiatedError(f"{spec.name} needs VIRTIO_F_ACCESS_PLATFORM negotiated")
        if gate is VirtioGate.PROTOCOL_FEATURES_OFFERED and not self.offered_features & _F_PROTOCOL_FEATURES:
            raise NotNegotiatedError(f"{spec.name} needs VHOST_USER_F_PROTOCOL_FEATURES offered")

    def _send_reply(self, msg: Message, payload: bytes, fds: Sequence[int] = ()) -> None:
        try:
            self.connection.reply(msg, payload, fds)
        except DisconnectedError as exc:
            log.info("%s: cannot answer %s, the front-end is gone: %s", self.name, msg.name, exc)
            self.close()
        except VhostError as exc:       # ENOBUFS: it sends requests and does not read the answers
            self._error(exc)
            log.warning("%s: closing the connection: %s", self.name, exc)
            self.close()

    def _error(self, exc: BaseException) -> None:
        # Kept without its traceback: the frames would keep guest-memory views (and so the
        # mappings and their fds) alive for as long as the error is remembered.
        _forget_frames(exc)
        self.last_error = exc
        if self.on_error is not None:
            try:
                self.on_error(exc)
            except Exception:   # noqa: BLE001
                log.exception("%s: on_error failed", self.name)

    def _reject(self, msg: Message, spec: RequestSpec | None, nfds: int, exc: BaseException) -> None:
        """Log one line, answer as the spec allows, close the connection where it must be."""
        msg.close()
        what = (f"{msg.name} (flags {msg.flags:#x}, {len(msg.payload)} bytes, {nfds} fds): "
                f"{type(exc).__name__}: {exc}")
        if isinstance(exc, VhostError):
            # A GET_CONFIG beyond the config space is routine (a probe looks for its size by
            # asking less and less): not worth a warning.
            quiet = spec is not None and spec.request == FrontendRequest.GET_CONFIG
            log.log(logging.INFO if quiet else logging.WARNING, "%s: rejected %s", self.name, what)
        else:
            log.error("%s: rejected %s", self.name, what, exc_info=exc)
        self._error(exc)
        code = _errno_of(exc)
        request = spec.request if spec is not None else None
        if spec is None or not spec.reply:
            if msg.need_reply:
                self._send_reply(msg, pack_u64(code))
        elif request in (FrontendRequest.GET_CONFIG, FrontendRequest.POSTCOPY_ADVISE):
            self._send_reply(msg, b"")              # zero-size payload: the spec's error signal
        elif request is FrontendRequest.SET_DEVICE_STATE_FD:
            self._send_reply(msg, pack_u64((code & VHOST_USER_DEVICE_STATE_ERROR_MASK or 1)
                                           | VHOST_USER_VRING_NOFD_MASK))
        elif request in _STATUS_REPLIES:
            self._send_reply(msg, pack_u64(code))
        else:
            log.warning("%s: %s expects a value, there is no way to answer it with an error: closing "
                        "the connection", self.name, msg.name)
            self.close()
        if getattr(exc, "close_connection", False) and not self.closed:
            log.warning("%s: closing the connection as the spec requires", self.name)
            self.close()

    # -- lifecycle -----------------------------------------------------------------------------------
    def close(self) -> None:
        """Stop serving: unwatch and close every fd (socket, ring fds, channel, log, inflight),
        unmap guest memory, stop started rings and reset the device."""
        if self.closed:
            return
        self.closed = True
        self._watch_changed()
        for ring in self.rings:
            if ring.started or (ring.queue is not None and ring.queue.in_flight):
                self._stop(ring)
        self._completions.close()
        try:
            self.device.reset()
        except Exception:   # noqa: BLE001
            log.exception("%s: device reset failed", self.name)
        if self.device.backend is self:
            self.device.backend = None
        for ring in self.rings:
            self._close_ring_fds(ring)
            ring.clear()
        self._drop_channel()
        self._set_log(None)
        _close(self.log_fd)
        self.log_fd = None
        if self.inflight is not None:
            self.inflight.close()
            self.inflight = None
        self.iotlb = None
        self.memory.clear()
        self.connection.close()

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _close_ring_fds(self, ring: Ring) -> None:
        fds = (ring.kick_fd, ring.call_fd, ring.err_fd)
        ring.kick_fd = ring.call_fd = ring.err_fd = None
        if fds[0] is not None:
            self._watch_changed()
        for fd in fds:
            _close(fd)

    def _drop_channel(self) -> None:
        channel, self.channel = self.channel, None
        if channel is not None:
            channel.close()

    # -- rings: lookup and state ----------------------------------------------------------------------
    def _ring(self, index: int, what: str) -> Ring:
        if not 0 <= index < len(self.rings):
            raise ProtocolError(f"{what}: vring index {index} out of range: {type(self.device).__name__} "
                                f"has {len(self.rings)} queue(s)")
        return self.rings[index]

    @property
    def suspended(self) -> bool:
        """All rings stopped (spec "Suspended device state")."""
        return not any(ring.started for ring in self.rings)

    def _start(self, ring: Ring) -> None:
        ring.started = True
        try:
            self.device.started(ring.index)
        except Exception:   # noqa: BLE001
            log.exception("%s: device started(%d) failed", self.name, ring.index)
        self._flush_config_change()

    def _stop(self, ring: Ring) -> None:
        """The ring stops: the device finishes what it holds first (see _quiesce)."""
        self._quiesce(ring)
        ring.started = False
        ring.again = False

    def _quiesce(self, ring: Ring) -> None:
        """device.stopped(), then push what it completed: afterwards no chain of this ring is held
        by the device (device.py's contract), so its base can be read or its queue rebuilt."""
        try:
            self.device.stopped(ring.index)
        except Exception:   # noqa: BLE001
            log.exception("%s: device stopped(%d) failed", self.name, ring.index)
        self._push_posted(ring.index)
        vq = ring.queue
        if vq is not None and vq.in_flight:
            log.error("%s: ring %d: the device still holds %d chain(s) after stopped() returned; they are "
                      "lost to this queue", self.name, ring.index, vq.in_flight)

    def _drop_queue(self, ring: Ring) -> None:
        """Forget the device queue (rebuilt when next processed), keeping the next avail index;
        chains the device holds are finished first. A started ring is looked at again after this
        message: a kick that came while it could not be built (no memory yet) is not lost."""
        ring.again = ring.started
        vq = ring.queue
        if vq is not None:
            if vq.in_flight:
                self._quiesce(ring)
            ring.queue = None
            ring.base = vq.get_base()

    # -- completions from other threads -------------------------------------------------------------
    def post_used(self, queue: int, done: Sequence[tuple[int, int]]) -> None:
        """Thread-safe: chains of ``queue`` that an asynchronous device completed, as (head, bytes
        written). The loop thread pushes them to the used ring as one batch and signals the driver
        if it wants it (device.py describes the contract). Ignored once the backend is closed."""
        if not 0 <= queue < len(self.rings):
            raise ValueError(f"queue {queue} does not exist ({len(self.rings)} queues)")
        self._completions.post(queue, done)

    def _on_wake(self) -> None:
        self._completions.woken()
        self._push_posted()

    def _on_device_fd(self, callback: Callable[[], None]) -> None:
        """A device fd (Device.watched) is readable: the device's callback, then what it posted."""
        if self.closed:
            return
        self._completions.run_held(callback)
        self._push_posted()

    def _push_posted(self, queue: int | None = None) -> None:
        """Push what devices posted (for one queue, or all), one batch and one signal per ring."""
        for index, done in self._completions.take(queue).items():
            ring = self.rings[index]
            vq = ring.queue
            if vq is None:
                log.error("%s: ring %d: %d chain(s) posted for a queue that is gone (reset, or rebuilt)", self.name,
                          index, len(done))
                continue
            try:
                wanted = vq.push_batch(done)
            except IOTLBMiss as miss:
                # The used ring's pages were invalidated while the device held these chains (a
                # vIOMMU flush): keep them, ask for the pages, push when the update comes.
                self._completions.put_back(index, done)
                self._iotlb_miss(ring, miss)
                continue
            except VhostError as exc:
                log.error("%s: ring %d: the device posted chains the ring does not hold: %s", self.name, index, exc)
                continue
            if wanted:
                self.signal_used(index)

    # -- rings: the data path ----------------------------------------------------------------------------
    def _on_kick_fd(self, ring: Ring) -> None:
        fd = ring.kick_fd
        if fd is None or self.closed:
            return
        try:
            os.eventfd_read(fd)
        except BlockingIOError:
            return                     # someone else drained it: not a kick after all
        except OSError as exc:
            log.warning("%s: reading the kick fd of ring %d failed: %s", self.name, ring.index, exc)
            return
        self._kick(ring)

    def _kick(self, ring: Ring) -> None:
        """A kick (eventfd or in-band VRING_KICK): start the ring if it was stopped, process it."""
        if not ring.started:
            self._start(ring)
        self._run(ring)

    def _run(self, ring: Ring) -> None:
        """Process a started ring: the device's process() (enabled) or process_disabled()."""
        if not ring.started or ring.broken or self.closed or ring.waiting_iotlb:
            return
        ring.again = False
        vq = None
        try:
            vq = self._queue_for(ring)
            if vq is None:
                return                 # not set up yet (size, addresses or memory missing)
            if ring.enabled:
                again = self.device.process(ring.index, vq)
            else:
                again = self.device.process_disabled(ring.index, vq)
            ring.again = bool(again)
        except IOTLBMiss as miss:
            self._iotlb_miss(ring, miss)
        except VhostError as exc:
            self._break(ring, exc, driver=vq is None or vq.broken)
        except Exception as exc:   # noqa: BLE001 (a device bug: this ring stops, the backend goes on)
            log.error("%s: ring %d: the device's process() raised", self.name, ring.index, exc_info=exc)
            self._break(ring, exc, driver=False)

    def _break(self, ring: Ring, exc: BaseException, *, driver: bool) -> None:
        """Stop processing a ring for good (until it is set up again) and tell the front-end
        through the error eventfd (or in-band VRING_ERR)."""
        ring.broken = f"{type(exc).__name__}: {exc}"
        ring.again = False
        log.error("%s: ring %d broken (%s): %s", self.name, ring.index,
                  "driver error" if driver else "device error", ring.broken)
        self._error(exc)
        self._signal(ring, ring.err_fd, ring.err_polling, BackendRequest.VRING_ERR)

    def _queue_for(self, ring: Ring):
        """The ring's device queue, built on first use; None while it cannot be built yet."""
        vq = ring.queue
        if vq is not None:
            return vq
        addr = ring.addr
        if not ring.size or addr is None:
            return None
        features = self.features
        packed = bool(features & _F_RING_PACKED)
        event_idx = bool(features & _F_EVENT_IDX)
        sizes = ring_sizes(ring.size, packed=packed, event_idx=event_idx)
        uvas = (addr.desc_user_addr, addr.avail_user_addr, addr.used_user_addr)
        if features & _F_ACCESS_PLATFORM:
            memory = self.iotlb
            for iova, length, write in zip(uvas, sizes, (packed, False, True)):
                memory.segments(iova, length, write)           # raises IOTLBMiss: ask, retry later
            desc, driver_area, device_area = uvas
        else:
            if not self.memory.regions:
                ring.unmapped = True            # no memory table yet (DPDK's order): just wait
                return None
            memory = self.memory
            try:
                desc, driver_area, device_area = self._translate_ring(addr, sizes)
            except GuestMemoryError as exc:
                # Not (yet) mapped: between REM_MEM_REG and ADD_MEM_REG of a memory hotplug, say.
                # SET_VRING_ADDR already refused addresses outside the memory of its time.
                if not ring.unmapped:
                    log.warning("%s: ring %d waits for memory: %s", self.name, ring.index, exc)
                ring.unmapped = True
                return None
            ring.unmapped = False
        cls = PackedDeviceQueue if packed else SplitDeviceQueue
        tracker = self._inflight_tracker(ring)
        vq = cls(memory, ring.size, desc, driver_area, device_area, event_idx=event_idx,
                 indirect=bool(features & _F_INDIRECT_DESC), inflight=tracker)
        if ring.base is not None:
            vq.set_base(ring.base)
        resubmitted = self._resume_inflight(ring, vq, tracker, desc) if tracker is not None else []
        ring.queue = vq
        self._apply_log(ring)
        if resubmitted:
            log.info("%s: ring %d: resubmitting %d request(s) in flight before the restart", self.name,
                     ring.index, len(resubmitted))
            self.device.complete(ring.index, vq, resubmitted)
        return vq

    def _translate_ring(self, addr: VringAddr, sizes: tuple[int, int, int]) -> tuple[int, int, int]:
        """Front-end user addresses of the three ring parts -> guest-physical."""
        out = []
        for what, uva, length in (("descriptor table", addr.desc_user_addr, sizes[0]),
                                  ("driver area (available ring)", addr.avail_user_addr, sizes[1]),
                                  ("device area (used ring)", addr.used_user_addr, sizes[2])):
            try:
                out.append(self.memory.gpa_for_uva(uva, length))
            except GuestMemoryError:
                raise GuestMemoryError(f"vring {addr.index}: {what} at user address {uva:#x} ({length} bytes) "
                                       f"is outside every memory region") from None
        return out[0], out[1], out[2]

    def _inflight_tracker(self, ring: Ring):
        region = self.inflight
        if region is None or ring.index >= region.num_queues:
            return None
        # The region's layout was fixed by the features of GET/SET_INFLIGHT_FD's time; a later
        # SET_FEATURES may have switched VIRTIO_F_RING_PACKED, and neither layout reads the other.
        packed = bool(self.features & _F_RING_PACKED)
        if region.packed != packed:
            layouts = ("split", "packed")
            raise ProtocolError(f"inflight region has {layouts[region.packed]} queue regions but ring {ring.index} "
                                f"is {layouts[packed]} (VHOST_USER_SET_FEATURES changed VIRTIO_F_RING_PACKED after "
                                f"VHOST_USER_SET_INFLIGHT_FD)")
        return region.queue(ring.index)

    def _inflight_pending(self, ring: Ring) -> bool:
        """Whether the inflight region records requests of ``ring`` in flight (a previous back-end's)."""
        region = self.inflight
        if region is None or ring.index >= region.num_queues:
            return False
        try:
            tracker = self._inflight_tracker(ring)
            return tracker.initialized and bool(tracker.resubmit())
        except VhostError:
            return True             # building the queue reports it

    def _resume_inflight(self, ring: Ring, vq, tracker, desc_gpa: int) -> list:
        """Inflight tracking when a queue is built: a fresh region is initialised; one with
        history is reconciled with the ring and its requests in flight are handed back."""
        if not tracker.initialized:
            tracker.init()
            return []
        if isinstance(vq, SplitDeviceQueue):
            tracker.reconcile(vq.used_idx)
        else:
            memory = self.iotlb if self.features & _F_ACCESS_PLATFORM else self.memory

            def ring_flags(slot: int) -> int:   # pvirtq_desc.flags of the descriptor-ring slot
                return int.from_bytes(memory.segments(desc_gpa + 16 * slot + 14, 2)[0], "little")

            tracker.reconcile(ring_flags)
        vq.set_base(tracker.vring_base())
        if not isinstance(vq, SplitDeviceQueue):
            stale = vq.clear_stale_used()
            if stale:
                log.info("%s: ring %d: cleared %d used descriptor(s) of a batch the crashed back-end never "
                         "published", self.name, ring.index, stale)
        return [vq.resubmit(chain) for chain in tracker.resubmit()]

    def _apply_log(self, ring: Ring) -> None:
        vq = ring.queue
        if vq is None:
            return
        if self.log is not None and self.features & VHOST_F_LOG_ALL:
            addr = ring.addr
            used = addr.log_guest_addr if addr is not None and addr.flags & VHOST_VRING_F_LOG else None
            # Behind an IOMMU the ring logs IOVAs (buffers, and log_guest_addr, which QEMU sends as
            # the used ring's IOVA); the log is kept in guest-physical pages (as DPDK does).
            dirty = IOVALog(self.log, self.iotlb) if self.features & _F_ACCESS_PLATFORM else self.log
            vq.set_log(dirty, used)
        else:
            vq.set_log(None)

    # -- notifications to the front-end ---------------------------------------------------------------
    def signal_used(self, queue: int) -> None:
        """Tell the driver that ``queue`` has used buffers: write its call eventfd, or send an
        in-band VRING_CALL (INBAND_NOTIFICATIONS). Nothing for a stopped ring (suspended device)."""
        ring = self.rings[queue]
        if ring.started and not self.closed:
            self._signal(ring, ring.call_fd, ring.call_polling, BackendRequest.VRING_CALL)

    def _signal(self, ring: Ring, fd: int | None, polling: bool, inband: BackendRequest) -> None:
        if fd is not None:
            try:
                os.eventfd_write(fd, 1)
            except OSError as exc:
                log.warning("%s: signalling ring %d (%s) failed: %s", self.name, ring.index, inband.name, exc)
        elif not polling and self.protocol_features & _PF_INBAND:
            # The spec makes INBAND_NOTIFICATIONS imply REPLY_ACK: wait until the front-end processed it.
            self._channel_send(inband, VringState(ring.index, 0).pack(), need_reply=True)

    def notify_config_change(self) -> bool:
        """Send VHOST_USER_BACKEND_CONFIG_CHANGE_MSG (the config space changed). Held back while the
        device is suspended and sent when a ring starts; True if it was sent now."""
        if not self.protocol_features & _PF_CONFIG:
            raise NotNegotiatedError("a config change notification needs VHOST_USER_PROTOCOL_F_CONFIG")
        if self.channel is None:
            raise NotNegotiatedError("a config change notification needs the back-end channel "
                                     "(VHOST_USER_PROTOCOL_F_BACKEND_REQ and SET_BACKEND_REQ_FD)")
        self._config_change_pending = True
        return self._flush_config_change()

    def _flush_config_change(self) -> bool:
        if not self._config_change_pending or self.suspended or self.closed or self.channel is None:
            return False
        self._config_change_pending = False
        return self._channel_send(BackendRequest.CONFIG_CHANGE_MSG)

    def _channel_send(self, request: BackendRequest, payload: bytes = b"", *, need_reply: bool = False) -> bool:
        """A notification of ours on the back-end channel (config change, IOTLB miss, in-band call
        or error): sent if the channel exists; a failure is logged (and the channel dropped)."""
        if self.channel is None:
            return False
        try:
            self.backend_request(request, payload, need_reply=need_reply)
        except VhostError as exc:
            log.warning("%s: %s", self.name, exc)
            return False
        return True

    def backend_request(self, request: BackendRequest, payload: bytes = b"", fds: Sequence[int] = (), *,
                        need_reply: bool = False) -> Message | None:
        """Send a back-end request (VHOST_USER_BACKEND_*) on the SET_BACKEND_REQ_FD channel and
        return its answer: the reply of a request that always has one (SHARED_OBJECT_LOOKUP), or
        with ``need_reply`` and REPLY_ACK negotiated the u64 acknowledgement (non-zero raises
        VhostError); else None. The caller owns the answer's fds. Checks the protocol features the
        request needs (user.py's table). Never blocks for long: a front-end that does not take or
        answer it within BACKEND_REQUEST_TIMEOUT loses the channel (VhostError ETIMEDOUT)."""
        spec = BACKEND_REQUESTS[request]
        spec.require(self.protocol_features | _PF_BACKEND_REQ, len(fds))
        channel = self.channel
        if channel is None:
            raise NotNegotiatedError(f"{spec.name} needs the back-end channel (VHOST_USER_PROTOCOL_F_BACKEND_REQ "
                                     f"and VHOST_USER_SET_BACKEND_REQ_FD)")
        ack = need_reply and not spec.reply and bool(self.protocol_features & _PF_REPLY_ACK)
        try:
            if not (spec.reply or ack):
                channel.send(request, payload, fds)
                return None
            reply = channel.request(request, payload, fds, need_reply=ack)
        except (VhostError, OSError) as exc:       # OSError: TimeoutError, a broken socket
            self._drop_channel()
            if isinstance(exc, TimeoutError):
                raise VhostError(f"{spec.name}: the front-end did not answer within {channel.timeout} s; "
                                 f"back-end channel dropped", errno.ETIMEDOUT) from None
            raise VhostError(f"{spec.name}: the back-end channel failed ({exc}); dropped",
                             getattr(exc, "errno", None)) from None
        try:
            spec.validate_reply(reply.payload, len(reply.fds))
        except ProtocolError as exc:
            reply.close()
            self._drop_channel()
            raise VhostError(f"{spec.name}: {exc}; back-end channel dropped", errno.EPROTO) from None
        if ack:
            with reply:
                value = reply.u64()
            if value:
                raise VhostError(f"{spec.name}: the front-end answered {value:#x}", errno.EIO)
            return None
        return reply

    # -- back-end requests a device may send (each needs its protocol feature negotiated) ---------------
    def send_iotlb_msg(self, msg: IotlbMsg) -> None:
        """VHOST_USER_BACKEND_IOTLB_MSG: an IOTLB miss (VHOST_IOTLB_MISS) or access failure
        (VHOST_IOTLB_ACCESS_FAIL) for the front-end to resolve with VHOST_USER_IOTLB_MSG. Only
        with VIRTIO_F_ACCESS_PLATFORM negotiated (the spec: nobody translates IOVAs otherwise)."""
        if not self.features & _F_ACCESS_PLATFORM:
            raise NotNegotiatedError("VHOST_USER_BACKEND_IOTLB_MSG needs VIRTIO_F_ACCESS_PLATFORM negotiated")
        self.backend_request(BackendRequest.IOTLB_MSG, msg.pack())

    def set_host_notifier(self, queue: int, fd: int | None, size: int = 0, offset: int = 0) -> None:
        """VHOST_USER_BACKEND_VRING_HOST_NOTIFIER_MSG (HOST_NOTIFIER): the front-end maps ``size``
        bytes of ``fd`` at ``offset`` as ``queue``'s notification area (None: stop using one)."""
        self._ring(queue, "VHOST_USER_BACKEND_VRING_HOST_NOTIFIER_MSG")
        flags = queue | (VHOST_USER_VRING_NOFD_MASK if fd is None else 0)
        self.backend_request(BackendRequest.VRING_HOST_NOTIFIER_MSG, VringArea(flags, size, offset).pack(),
                             () if fd is None else (fd,), need_reply=True)

    def shared_object_add(self, uuid) -> None:
        """VHOST_USER_BACKEND_SHARED_OBJECT_ADD (SHARED_OBJECT): this device exports ``uuid`` (other
        back-ends find it through the front-end; the device's get_shared_object() hands its fd out)."""
        self.backend_request(BackendRequest.SHARED_OBJECT_ADD, SharedObject(uuid).pack(), need_reply=True)

    def shared_object_remove(self, uuid) -> None:
        """VHOST_USER_BACKEND_SHARED_OBJECT_REMOVE (SHARED_OBJECT): withdraw an export."""
        self.backend_request(BackendRequest.SHARED_OBJECT_REMOVE, SharedObject(uuid).pack(), need_reply=True)

    def shared_object_lookup(self, uuid) -> int:
        """VHOST_USER_BACKEND_SHARED_OBJECT_LOOKUP (SHARED_OBJECT): the dma-buf fd another device
        exported as ``uuid`` (now the caller's to close); VhostError(ENOENT) when there is none."""
        reply = self.backend_request(BackendRequest.SHARED_OBJECT_LOOKUP, SharedObject(uuid).pack())
        with reply:
            value, fd = reply.u64(), reply.take_fd()
        if value or fd is None:
            _close(fd)
            raise VhostError(f"VHOST_USER_BACKEND_SHARED_OBJECT_LOOKUP {uuid}: the front-end answered {value:#x} "
                             f"{'with' if fd is not None else 'without'} an fd", errno.ENOENT)
        return fd

    def shmem_map(self, shmid: int, fd: int, fd_offset: int, shm_offset: int, length: int, *,
                  writable: bool = True) -> None:
        """VHOST_USER_BACKEND_SHMEM_MAP (SHMEM, BACKEND_SEND_FD): map ``length`` bytes of ``fd`` from
        ``fd_offset`` at ``shm_offset`` of shared memory region ``shmid``."""
        flags = VHOST_USER_FLAG_MAP_RW if writable else 0
        self.backend_request(BackendRequest.SHMEM_MAP, ShmemMap(shmid, fd_offset, shm_offset, length, flags).pack(),
                             (fd,), need_reply=True)

    def shmem_unmap(self, shmid: int, shm_offset: int, length: int) -> None:
        """VHOST_USER_BACKEND_SHMEM_UNMAP (SHMEM): undo a shmem_map of the same range."""
        self.backend_request(BackendRequest.SHMEM_UNMAP, ShmemMap(shmid, 0, shm_offset, length, 0).pack(),
                             need_reply=True)

    def _iotlb_miss(self, ring: Ring, miss: IOTLBMiss) -> None:
        if self.channel is None:
            self._break(ring, miss, driver=False)
            return
        ring.waiting_iotlb = True
        perm = VHOST_ACCESS_WO if miss.write else VHOST_ACCESS_RO
        log.debug("%s: ring %d: IOTLB miss at %#x, asking the front-end", self.name, ring.index, miss.iova)
        if not self._channel_send(BackendRequest.IOTLB_MSG, IotlbMsg(miss.iova, 0, 0, perm, VHOST_IOTLB_MISS).pack()):
            self._break(ring, miss, driver=False)

    # -- memory -----------------------------------------------------------------------------------------
    def _check_region(self, region: MemoryRegion, what: str) -> None:
        gpa, size, uva, offset = region
        if not size:
            raise GuestMemoryError(f"{what}: region at guest address {gpa:#x} has size 0")
        for name, value in (("guest address", gpa), ("size", size), ("user address", uva), ("mmap offset", offset)):
            if value % REGION_ALIGN:
                raise GuestMemoryError(f"{what}: region {name} {value:#x} is not {REGION_ALIGN:#x}-byte aligned "
                                       f"(region gpa={gpa:#x} size={size:#x} uva={uva:#x} offset={offset:#x})")
        for name, value in (("guest address", gpa), ("user address", uva), ("mmap offset", offset)):
            if value + size > 1 << 64:
                raise GuestMemoryError(f"{what}: region {name} {value:#x} + size {size:#x} overflows 64 bits")

    def _memory_changed(self) -> None:
        """Regions were added or removed: ring queues whose parts moved or vanished are rebuilt
        when next processed; IOTLB entries (views into the old mappings) are forgotten."""
        if self.iotlb is not None:
            self.iotlb = IOTLB(self.memory)
        for ring in self.rings:
            vq = ring.queue
            if vq is None:
                ring.again = ring.started       # perhaps it can be built now
                continue
            if self.features & _F_ACCESS_PLATFORM:
                self._drop_queue(ring)
                continue
            try:
                parts = self._translate_ring(ring.addr, (1, 1, 1))
            except GuestMemoryError:
                parts = None
            if parts is None or parts != _queue_parts(vq):
                self._drop_queue(ring)

    def _set_log(self, dirty_log: DirtyLog | None) -> None:
        old, self.log = self.log, dirty_log
        for ring in self.rings:
            self._apply_log(ring)
        if old is not None:
            old.close()

    # -- handlers, one per front-end request (the table below maps them) --------------------------------
    def _on_get_features(self, msg: Message) -> bytes:
        return pack_u64(self.offered_features)

    def _on_set_features(self, msg: Message) -> None:
        features = msg.u64()
        unknown = features & ~self.offered_features
        if unknown:
            self._features_failed = True
            raise ProtocolError(f"VHOST_USER_SET_FEATURES {features:#x}: bits {unknown:#x} were not offered "
                                f"({self.offered_features:#x})")
        try:
            self.device.features_set(features)
        except BaseException:
            self._features_failed = True
            raise
        old, self.features = self.features, features
        self.features_acked, self._features_failed = True, False
        log.info("%s: features %#x negotiated", self.name, features)
        if not features & _F_PROTOCOL_FEATURES:
            for ring in self.rings:                 # spec: "must enable all rings immediately"
                if not ring.enabled:
                    ring.enabled = True
                    ring.again = ring.started
        if (old ^ features) & _RING_FEATURES:
            for ring in self.rings:
                self._drop_queue(ring)
        if features & _F_ACCESS_PLATFORM:
            if self.iotlb is None:
                self.iotlb = IOTLB(self.memory)
        else:
            self.iotlb = None
        if (old ^ features) & VHOST_F_LOG_ALL:
            for ring in self.rings:
                self._apply_log(ring)

    def _on_set_owner(self, msg: Message) -> None:
        self.owner = True

    def _on_reset_owner(self, msg: Message) -> None:
        # Deprecated; the spec recommends ignoring it or disabling all rings. We disable them.
        for ring in self.rings:
            ring.enabled = False

    def _on_set_mem_table(self, msg: Message) -> None:
        table = MemoryTable.unpack(msg.payload)
        fds = msg.take_fds()
        try:
            regions = table.regions
            for region in regions:
                self._check_region(region, "VHOST_USER_SET_MEM_TABLE")
            for key, name in ((lambda r: r.guest_phys_addr, "guest"), (lambda r: r.userspace_addr, "user")):
                ordered = sorted(regions, key=key)
                for a, b in zip(ordered, ordered[1:]):
                    if key(a) + a.memory_size > key(b):
                        raise GuestMemoryError(f"VHOST_USER_SET_MEM_TABLE: regions overlap in {name} addresses: "
                                               f"{key(a):#x}+{a.memory_size:#x} and {key(b):#x}+{b.memory_size:#x}")
            self.memory.clear()
            self._region_users.clear()
            try:
                for region, fd in zip(regions, fds):
                    self.memory.add_region(region.guest_phys_addr, region.memory_size, fd=fd,
                                           mmap_offset=region.mmap_offset, uva=region.userspace_addr)
                    _note_unsealed(fd, region, f"{self.name}: VHOST_USER_SET_MEM_TABLE")
            except GuestMemoryError:
                self.memory.clear()
                raise
            finally:
                self._memory_changed()
        finally:
            for fd in fds:
                _close(fd)

    def _on_set_log_base(self, msg: Message) -> bytes:
        spec = Log.unpack(msg.payload)
        fd = msg.take_fd()
        try:
            dirty_log = DirtyLog.from_fd(fd, spec.mmap_size, spec.mmap_offset)
        finally:
            _close(fd)
        self._set_log(dirty_log)
        return pack_u64(0)

    def _on_set_log_fd(self, msg: Message) -> None:
        old, self.log_fd = self.log_fd, msg.take_fd()
        _close(old)

    def _on_set_vring_num(self, msg: Message) -> None:
        index, num = VringState.unpack(msg.payload)
        ring = self._ring(index, "VHOST_USER_SET_VRING_NUM")
        limit = min(self.device.max_queue_size, VIRTQ_MAX_SIZE)
        if not 1 <= num <= limit:
            raise ProtocolError(f"VHOST_USER_SET_VRING_NUM: vring {index} size {num} is not in 1..{limit}")
        if self.features_acked and not self.features & _F_RING_PACKED and num & (num - 1):
            raise ProtocolError(f"VHOST_USER_SET_VRING_NUM: split vring {index} size {num} is not a power of two")
        self._drop_queue(ring)
        ring.size, ring.broken = num, None

    def _on_set_vring_addr(self, msg: Message) -> None:
        addr = VringAddr.unpack(msg.payload)
        ring = self._ring(addr.index, "VHOST_USER_SET_VRING_ADDR")
        if addr.flags & ~VHOST_VRING_F_LOG:
            raise ProtocolError(f"VHOST_USER_SET_VRING_ADDR: vring {addr.index} flags {addr.flags:#x} has bits "
                                f"other than VHOST_VRING_F_LOG")
        packed = bool(self.features & _F_RING_PACKED)
        problem = misaligned_ring_part(addr.desc_user_addr, addr.avail_user_addr, addr.used_user_addr, packed=packed)
        if problem:
            raise ProtocolError(f"VHOST_USER_SET_VRING_ADDR: vring {addr.index}: {problem}")
        if self.memory.regions and not self.features & _F_ACCESS_PLATFORM:
            sizes = ring_sizes(ring.size or 1, packed=packed, event_idx=bool(self.features & _F_EVENT_IDX))
            self._translate_ring(addr, sizes)       # GuestMemoryError: outside memory
        old = ring.addr
        ring.addr = addr
        if old is None or old[2:5] != addr[2:5] or ring.broken:
            self._drop_queue(ring)                  # rebuilt (afresh, if it was broken) when next used
            ring.broken = None
        else:
            self._apply_log(ring)                   # only the log flag or address changed (migration)

    def _on_set_vring_base(self, msg: Message) -> None:
        index, num = VringState.unpack(msg.payload)
        ring = self._ring(index, "VHOST_USER_SET_VRING_BASE")
        if self.features & _F_RING_PACKED:
            avail, avail_wrap, used, used_wrap = decode_base(num)
            if avail_wrap and not num >> 16:
                # DPDK (virtio-user, and lib/vhost's GET_VRING_BASE) sends only the avail half;
                # its used position is the avail one. Read literally (used 0, wrap 0) the whole
                # ring would be in flight, and the first chain the driver adds an overrun.
                num = encode_base(avail, avail_wrap, avail, avail_wrap)
        self._drop_queue(ring)
        ring.base, ring.broken = num, None

    def _on_get_vring_base(self, msg: Message) -> bytes:
        index, _reserved = VringState.unpack(msg.payload)
        ring = self._ring(index, "VHOST_USER_GET_VRING_BASE")
        if ring.started:
            self._stop(ring)
        # Stopped for good: the kick fd is dropped (as libvhost-user, rust-vmm and DPDK do), so a
        # stray kick cannot restart the ring behind the front-end's back; SET_VRING_KICK re-arms it.
        kick, ring.kick_fd, ring.polling = ring.kick_fd, None, False
        if kick is not None:
            self._watch_changed()
            _close(kick)
        if ring.queue is not None:
            base = ring.queue.get_base()            # the queue is kept: stopped, not reset
        elif ring.base is not None:
            base = ring.base
        else:                                       # never set: where a fresh ring starts
            if self.features & _F_RING_PACKED:   # indices 0, both wrap counters 1 (virtio §2.8.1)
                base = encode_base(0, 1, 0, 1)
            else:
                base = 0
        return VringState(index, base).pack()

    def _vring_fd(self, msg: Message) -> tuple[Ring, int | None, bool]:
        index, nofd = VringFd.unpack(msg.payload, msg.name)
        fd = msg.take_fd()
        try:
            ring = self._ring(index, msg.name)
        except ProtocolError:
            _close(fd)
            raise
        return ring, fd, nofd

    def _on_set_vring_kick(self, msg: Message) -> None:
        ring, fd, nofd = self._vring_fd(msg)
        if fd is not None:
            os.set_blocking(fd, False)              # a spurious wake-up must not block the loop
        old, ring.kick_fd, ring.polling = ring.kick_fd, fd, nofd
        self._watch_changed()
        _close(old)
        if nofd and not ring.started:
            self._start(ring)                       # poll mode: there will be no kick to wait for
        elif fd is not None and self._inflight_pending(ring):
            # Requests a crashed back-end left in flight are resubmitted when the ring is first
            # processed; kick it ourselves (as libvhost-user does "in case of I/O hang after
            # reconnecting"): a driver waiting for exactly those requests will not kick again.
            os.eventfd_write(fd, 1)

    def _on_set_vring_call(self, msg: Message) -> None:
        ring, fd, nofd = self._vring_fd(msg)
        old, ring.call_fd, ring.call_polling = ring.call_fd, fd, nofd
        _close(old)
        if fd is not None:
            # Signalled at once, as libvhost-user does "in case of I/O hang after reconnecting": a
            # driver waiting for an interrupt that a previous back-end owed it looks at the ring
            # again (and one waiting for a first interrupt gets it). A spurious one costs nothing.
            try:
                os.eventfd_write(fd, 1)
            except OSError as exc:
                log.warning("%s: signalling the new call fd of ring %d failed: %s", self.name, ring.index, exc)

    def _on_set_vring_err(self, msg: Message) -> None:
        ring, fd, nofd = self._vring_fd(msg)
        old, ring.err_fd, ring.err_polling = ring.err_fd, fd, nofd
        _close(old)

    def _on_get_protocol_features(self, msg: Message) -> bytes:
        return pack_u64(self.offered_protocol_features)

    def _on_set_protocol_features(self, msg: Message) -> None:
        value = msg.u64()
        unknown = value & ~int(self.offered_protocol_features)
        if unknown:
            raise ProtocolError(f"VHOST_USER_SET_PROTOCOL_FEATURES {value:#x}: bits {unknown:#x} were not offered "
                                f"({int(self.offered_protocol_features):#x})")
        needed = _PF_BACKEND_REQ | _PF_REPLY_ACK
        if value & _PF_INBAND and value & needed != needed:
            error = ProtocolError(f"VHOST_USER_SET_PROTOCOL_FEATURES {value:#x}: INBAND_NOTIFICATIONS without "
                                  f"BACKEND_REQ and REPLY_ACK")
            error.close_connection = True           # "the back-end should close the connection"
            raise error
        self.protocol_features = ProtocolFeature(value)
        self.protocol_negotiated = True

    def _on_get_queue_num(self, msg: Message) -> bytes:
        return pack_u64(len(self.rings))

    def _on_set_vring_enable(self, msg: Message) -> None:
        index, num = VringState.unpack(msg.payload)
        ring = self._ring(index, "VHOST_USER_SET_VRING_ENABLE")
        if num not in (0, 1):
            raise ProtocolError(f"VHOST_USER_SET_VRING_ENABLE: vring {index} num {num} is neither 0 nor 1")
        ring.enabled = bool(num)
        ring.again = ring.enabled and ring.started  # chains left while disabled are processed now

    def _on_send_rarp(self, msg: Message) -> None:
        self.device.send_rarp(bytes(msg.payload[:6]))

    def _on_net_set_mtu(self, msg: Message) -> None:
        self.device.set_mtu(msg.u64())

    def _on_set_backend_req_fd(self, msg: Message) -> None:
        fd = msg.take_fd()
        try:
            channel = Connection.from_fd(fd, requests=BackendRequest)
        except (OSError, ValueError) as exc:
            _close(fd)
            raise ProtocolError(f"VHOST_USER_SET_BACKEND_REQ_FD: the fd is not a connected AF_UNIX stream "
                                f"socket: {exc}") from None
        # The loop never waits for long on it: one-way requests are queued (bounded), a reply
        # is waited for at most BACKEND_REQUEST_TIMEOUT.
        channel.make_nonblocking(timeout=BACKEND_REQUEST_TIMEOUT)
        self._drop_channel()
        self.channel = channel

    def _on_iotlb_msg(self, msg: Message) -> bytes:
        entry = IotlbMsg.unpack(msg.payload)
        if self.iotlb is None:
            self.iotlb = IOTLB(self.memory)
        if entry.type == VHOST_IOTLB_UPDATE:
            log.debug("%s: IOTLB update %#x+%#x perm %d", self.name, entry.iova, entry.size, entry.perm)
            self.iotlb.update(entry.iova, entry.size, entry.uaddr, entry.perm)
            waiting = [ring for ring in self.rings if ring.waiting_iotlb]
            for ring in waiting:
                ring.waiting_iotlb, ring.again = False, ring.started
            if waiting:
                self._push_posted()         # completions kept back by a miss on the used ring
        elif entry.type == VHOST_IOTLB_INVALIDATE:
            log.debug("%s: IOTLB invalidate %#x+%#x", self.name, entry.iova, entry.size)
            self.iotlb.invalidate(entry.iova, entry.size)
        else:
            raise ProtocolError(f"VHOST_USER_IOTLB_MSG: type {entry.type} is not an update (2) or invalidate (3)")
        return pack_u64(0)

    def _on_set_vring_endian(self, msg: Message) -> None:
        index, num = VringState.unpack(msg.payload)
        self._ring(index, "VHOST_USER_SET_VRING_ENDIAN")
        if self.features & _F_VERSION_1:
            raise ProtocolError("VHOST_USER_SET_VRING_ENDIAN is for legacy devices: VIRTIO_F_VERSION_1 rings "
                                "are little-endian")
        if num == 1:
            raise NotSupportedError("VHOST_USER_SET_VRING_ENDIAN: big-endian rings are not supported")
        if num != 0:
            raise ProtocolError(f"VHOST_USER_SET_VRING_ENDIAN: num {num} is neither 0 (little) nor 1 (big)")

    def _on_get_config(self, msg: Message) -> bytes:
        offset, size, flags, _zeros = Config.unpack(msg.payload, msg.name)
        data = self.device.get_config(offset, size)
        if not isinstance(data, (bytes, bytearray, memoryview)) or len(data) != size:
            raise VhostError(f"{type(self.device).__name__}.get_config({offset}, {size}) returned "
                             f"{len(data) if hasattr(data, '__len__') else data!r} bytes", errno.EINVAL)
        return Config(offset, size, flags, bytes(data)).pack()

    def _on_set_config(self, msg: Message) -> None:
        offset, size, flags, data = Config.unpack(msg.payload, msg.name)
        if flags not in (VHOST_SET_CONFIG_TYPE_FRONTEND, VHOST_SET_CONFIG_TYPE_MIGRATION):
            raise ProtocolError(f"VHOST_USER_SET_CONFIG: flags {flags:#x} are neither 0 (front-end) nor "
                                f"1 (migration)")
        self.device.set_config(offset, data, flags)

    def _on_create_crypto_session(self, msg: Message) -> bytes:
        raise NotSupportedError("VHOST_USER_CREATE_CRYPTO_SESSION: crypto sessions are not supported")

    def _on_close_crypto_session(self, msg: Message) -> None:
        raise NotSupportedError("VHOST_USER_CLOSE_CRYPTO_SESSION: crypto sessions are not supported")

    def _on_postcopy_advise(self, msg: Message) -> bytes:
        raise NotSupportedError("VHOST_USER_POSTCOPY_ADVISE: postcopy migration is not supported")

    def _on_postcopy_listen(self, msg: Message) -> None:
        raise NotSupportedError("VHOST_USER_POSTCOPY_LISTEN: postcopy migration is not supported")

    def _on_postcopy_end(self, msg: Message) -> bytes:
        raise NotSupportedError("VHOST_USER_POSTCOPY_END: postcopy migration is not supported")

    def _on_get_inflight_fd(self, msg: Message) -> tuple[bytes, list[int]]:
        request = Inflight.unpack(msg.payload)
        packed = bool(self.features & _F_RING_PACKED)
        fd, size = _inflight.allocate(request.num_queues, request.queue_size, packed)
        try:
            region = _inflight.InflightRegion(fd, size, 0, request.num_queues, request.queue_size, packed)
        except BaseException:
            _close(fd)
            raise
        self._set_inflight(region)
        reply = Inflight(size, 0, request.num_queues, request.queue_size).pack()
        try:
            self._send_reply(msg, reply, [fd])
        finally:
            _close(fd)
        return _ALREADY_ANSWERED

    def _on_set_inflight_fd(self, msg: Message) -> None:
        spec = Inflight.unpack(msg.payload)
        fd = msg.take_fd()
        try:
            region = _inflight.InflightRegion(fd, spec.mmap_size, spec.mmap_offset, spec.num_queues,
                                              spec.queue_size, bool(self.features & _F_RING_PACKED))
        finally:
            _close(fd)
        self._set_inflight(region)

    def _set_inflight(self, region) -> None:
        old, self.inflight = self.inflight, region
        for ring in self.rings:
            self._drop_queue(ring)                  # rebuilt with the region's tracker
        if old is not None:
            old.close()

    def _on_gpu_set_socket(self, msg: Message) -> None:
        raise NotSupportedError("VHOST_USER_GPU_SET_SOCKET: the GPU protocol is not supported")

    def _on_reset_device(self, msg: Message) -> None:
        """Disable all rings and reset the device state; the connection, memory, log and channel stay."""
        for ring in self.rings:
            if ring.started:
                self._stop(ring)
            self._close_ring_fds(ring)
            ring.clear()
        self.features, self.features_acked, self._features_failed = 0, False, False
        self.status = 0
        self.iotlb = None
        if self.inflight is not None:
            self.inflight.close()
            self.inflight = None
        self.device.reset()

    def _on_vring_kick(self, msg: Message) -> None:
        index, _reserved = VringState.unpack(msg.payload)
        self._kick(self._ring(index, "VHOST_USER_VRING_KICK"))

    def _on_get_max_mem_slots(self, msg: Message) -> bytes:
        return pack_u64(MAX_MEM_SLOTS)

    def _on_add_mem_reg(self, msg: Message) -> None:
        region = MemoryRegion.unpack_single(msg.payload, msg.name)
        fd = msg.take_fd()
        try:
            key = (region.guest_phys_addr, region.memory_size, region.userspace_addr)
            if any((r.gpa, r.size, r.uva, r.mmap_offset) == (*key, region.mmap_offset) for r in self.memory.regions):
                # QEMU's multi-queue vhost-user-net runs one vhost_dev per queue pair on this one
                # connection, and each adds the regions it knows of: the same region again is one
                # more user of it (REM_MEM_REG takes one away), not an overlap.
                self._region_users[key] = self._region_users.get(key, 0) + 1
                return
            self._check_region(region, "VHOST_USER_ADD_MEM_REG")
            self.memory.add_region(region.guest_phys_addr, region.memory_size, fd=fd,
                                   mmap_offset=region.mmap_offset, uva=region.userspace_addr)
            _note_unsealed(fd, region, f"{self.name}: VHOST_USER_ADD_MEM_REG")
        finally:
            _close(fd)
        self._memory_changed()

    def _on_rem_mem_reg(self, msg: Message) -> None:
        region = MemoryRegion.unpack_single(msg.payload, msg.name)
        _close(msg.take_fd())                       # "MUST close it without using it"
        key = (region.guest_phys_addr, region.memory_size, region.userspace_addr)
        users = self._region_users.pop(key, 0)
        if users:                                   # another vhost_dev still uses it (see ADD_MEM_REG)
            if users > 1:
                self._region_users[key] = users - 1
            return
        self.memory.remove_region(region.guest_phys_addr, region.memory_size, region.userspace_addr)
        self._memory_changed()

    def _on_set_status(self, msg: Message) -> None:
        status = msg.u64()
        if status > 0xFF:
            raise ProtocolError(f"VHOST_USER_SET_STATUS: {status:#x} is not a status byte")
        if self._features_failed:
            status &= ~DeviceStatus.FEATURES_OK     # the features were refused: FEATURES_OK does not stick
        self.device.set_status(status)
        self.status = status

    def _on_get_status(self, msg: Message) -> bytes:
        status = self.status
        if any(ring.broken for ring in self.rings):
            status |= DeviceStatus.DEVICE_NEEDS_RESET
        return pack_u64(status)

    def _on_get_shared_object(self, msg: Message) -> tuple[bytes, list[int]]:
        shared = SharedObject.unpack(msg.payload)
        fd = self.device.get_shared_object(shared.uuid)
        return pack_u64(0), [fd]

    def _on_set_device_state_fd(self, msg: Message) -> bytes:
        direction, phase = DeviceState.unpack(msg.payload)
        fd = msg.take_fd()
        try:
            if direction not in (VHOST_TRANSFER_STATE_DIRECTION_SAVE, VHOST_TRANSFER_STATE_DIRECTION_LOAD):
                raise ProtocolError(f"VHOST_USER_SET_DEVICE_STATE_FD: direction {direction} is neither save (0) "
                                    f"nor load (1)")
            if phase != VHOST_TRANSFER_STATE_PHASE_STOPPED:
                raise ProtocolError(f"VHOST_USER_SET_DEVICE_STATE_FD: migration phase {phase} is not "
                                    f"'stopped' (0), the only one defined")
            if not self.suspended:
                started = [ring.index for ring in self.rings if ring.started]
                raise ProtocolError(f"VHOST_USER_SET_DEVICE_STATE_FD: only legal while the device is suspended; "
                                    f"ring(s) {started} are started")
            if self._transfer is not None and self._transfer.thread.is_alive():
                raise ProtocolError("VHOST_USER_SET_DEVICE_STATE_FD: a state transfer is still running")
        except BaseException:
            _close(fd)
            raise
        self._transfer = _StateTransfer(self.device, direction, fd)
        return pack_u64(VHOST_USER_VRING_NOFD_MASK)   # success, and we hand back no fd of our own

    def _on_check_device_state(self, msg: Message):
        transfer = self._transfer
        if transfer is None or self._state_check is not None:
            raise ProtocolError("VHOST_USER_CHECK_DEVICE_STATE: no state transfer was started"
                                if transfer is None else "VHOST_USER_CHECK_DEVICE_STATE: already asked")
        transfer.thread.join(STATE_CHECK_GRACE)
        if transfer.thread.is_alive():
            # Answered by poll() when the transfer ends (or times out); the loop goes on meanwhile.
            self._state_check = (msg, time.monotonic() + STATE_TRANSFER_TIMEOUT)
            return _ALREADY_ANSWERED
        self._transfer = None
        return self._state_transfer_result(transfer)

    def _answer_state_check(self) -> None:
        """The deferred answer to CHECK_DEVICE_STATE, once its transfer ended or timed out."""
        msg, deadline = self._state_check
        transfer = self._transfer
        if transfer.thread.is_alive() and time.monotonic() < deadline:
            return
        self._state_check = None
        self._transfer = None
        try:
            if transfer.thread.is_alive():
                raise VhostError(f"VHOST_USER_CHECK_DEVICE_STATE: the state transfer did not finish within "
                                 f"{STATE_TRANSFER_TIMEOUT} s", errno.ETIMEDOUT)
            payload = self._state_transfer_result(transfer)
        except VhostError as exc:
            self._reject(msg, FRONTEND_REQUESTS[FrontendRequest.CHECK_DEVICE_STATE], 0, exc)
            return
        self._send_reply(msg, payload)

    @staticmethod
    def _state_transfer_result(transfer: _StateTransfer) -> bytes:
        if transfer.error is not None:
            error = transfer.error
            raise VhostError(f"VHOST_USER_CHECK_DEVICE_STATE: the state transfer failed: "
                             f"{type(error).__name__}: {error}", _errno_of(error))
        return pack_u64(0)

    def _on_get_shmem_config(self, msg: Message) -> bytes:
        sizes = tuple(int(s) for s in self.device.get_shmem_config())
        return ShmemConfig(sum(1 for s in sizes if s), sizes).pack()

    _HANDLERS: dict[FrontendRequest, Callable[[Backend, Message], object]] = {}


#: The REPLY_ACK answer "success" (u64 0).
_ACK = pack_u64(0)

# Requests whose explicit reply is a u64 status, so an error is a non-zero u64.
_STATUS_REPLIES = frozenset({FrontendRequest.SET_LOG_BASE, FrontendRequest.IOTLB_MSG, FrontendRequest.POSTCOPY_END,
                             FrontendRequest.CHECK_DEVICE_STATE, FrontendRequest.GET_SHARED_OBJECT})


class _Answered(tuple):
    """A handler that sent its own reply (with an fd it closes right after) returns this."""


_ALREADY_ANSWERED = _Answered()

Backend._HANDLERS = {request: getattr(Backend, f"_on_{request.name.lower()}") for request in FrontendRequest}


def _queue_parts(vq) -> tuple[int, int, int]:
    """(desc, driver area, device area) addresses a device queue was built with."""
    if isinstance(vq, SplitDeviceQueue):
        return vq.desc_addr, vq.avail_addr, vq.used_addr
    return vq.desc_addr, vq.driver_area, vq.device_area


# --------------------------------------------------------------------------------------------
# The ready-made loop
# --------------------------------------------------------------------------------------------

class _InheritedListener:
    """A listening socket handed to us as an fd (socket activation)."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    def accept(self) -> Connection:
        sock, _addr = self._sock.accept()
        return Connection(sock)

    def fileno(self) -> int:
        return self._sock.fileno()

    def close(self) -> None:
        self._sock.close()


class _Endpoint:
    """One socket the server serves: a listener, a client connection it (re)makes, or one
    inherited connected fd; and the device (exclusive) or factory behind it."""

    def __init__(self, source, path: str | None) -> None:
        self.source = source
        self.exclusive = isinstance(source, Device)
        self.path = path
        self.listener: Listener | _InheritedListener | None = None
        self.client = False                 # connect to ``path`` (and again after a disconnect)
        self.retry_at: float | None = None
        self.active: list[Backend] = []
        self.done = False                   # nothing more will come from here

    def device(self) -> Device:
        device = self.source if self.exclusive else self.source()
        if not isinstance(device, Device):
            raise TypeError(f"the device factory {self.source!r} returned {device!r}, not a Device")
        return device


class Server:
    """A selectors loop serving any number of sockets, each with a device or a device factory.

    ``add(device_or_factory, path)`` listens on ``path`` (``listen=False``: connects to it, and
    reconnects after a disconnect; ``fd=N``: an inherited listening or connected socket). A Device
    *instance* serves one front-end at a time (the listener is not watched while it is busy); a
    *factory* (e.g. the Device subclass) makes a device per connection, any number at once.
    Every backend error is logged and recorded in :attr:`errors`; the loop goes on.
    """

    def __init__(self, *, selector: selectors.BaseSelector | None = None,
                 poll_interval: float = POLL_INTERVAL, poll_us: int | None = None) -> None:
        if poll_us is not None and not (isinstance(poll_us, int) and 0 <= poll_us <= MAX_POLL_US):
            raise ValueError(f"poll_us must be 0..{MAX_POLL_US} microseconds, not {poll_us!r}")
        self._own_selector = selector is None
        self.selector = selector if selector is not None else selectors.DefaultSelector()
        self.poll_interval = poll_interval
        #: Busy-polling before each sleep, at most this many microseconds: None takes the largest
        #: Device.poll_us of the devices served, 0 never polls (see :meth:`step`).
        self.poll_us = poll_us
        self._poll_ns = 0                   # the adaptive window now, within the maximum
        self._devices_poll_ns = 0           # the largest Device.poll_us served, in ns (kept by _serve/_retire)
        self.backends: list[Backend] = []
        self.endpoints: list[_Endpoint] = []
        #: The most recent exceptions that rejected a message or closed a connection (a peer that
        #: disconnects is not an error; it is logged).
        self.errors: deque[BaseException] = deque(maxlen=100)
        self.served = 0                     # connections accepted so far
        self._stopping = False
        self._wakeup = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.selector.register(self._wakeup, selectors.EVENT_READ, self._drain_wakeup)

    # -- endpoints ---------------------------------------------------------------------------------
    def add(self, device_or_factory, socket_path: str | os.PathLike | None = None, *, fd: int | None = None,
            listen: bool = True) -> None:
        """Serve ``device_or_factory`` on a socket: listen on ``socket_path`` (default), connect to
        it (``listen=False``), or use the inherited socket ``fd`` (listening or connected)."""
        if not isinstance(device_or_factory, Device) and not callable(device_or_factory):
            raise TypeError(f"{device_or_factory!r} is neither a Device nor a factory of Devices")
        if (socket_path is None) == (fd is None):
            raise ValueError("give exactly one of socket_path and fd")
        endpoint = _Endpoint(device_or_factory, None if socket_path is None else os.fspath(socket_path))
        if fd is not None:
            sock = socket.socket(fileno=fd)
            if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
                endpoint.listener = _InheritedListener(sock)
            else:
                sock.detach()
                self.endpoints.append(endpoint)
                self._serve(endpoint, Connection.from_fd(fd))
                endpoint.done = True        # one connection, never another
                return
        elif listen:
            endpoint.listener = Listener(endpoint.path)
        else:
            endpoint.client = True
        self.endpoints.append(endpoint)
        if endpoint.listener is not None:
            os.set_blocking(endpoint.listener.fileno(), False)
            self._watch_listener(endpoint, True)
        else:
            self._connect(endpoint)

    def _watch_listener(self, endpoint: _Endpoint, on: bool) -> None:
        fd = endpoint.listener.fileno()
        if on:
            self._add_reader(fd, functools.partial(self._accept, endpoint))
        else:
            self._remove_reader(fd)

    def _accept(self, endpoint: _Endpoint) -> None:
        try:
            connection = endpoint.listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            log.warning("accepting on %s failed: %s", endpoint.path or endpoint.listener, exc)
            return
        self._serve(endpoint, connection)

    def _connect(self, endpoint: _Endpoint) -> None:
        try:
            connection = Connection.connect(endpoint.path)
        except OSError as exc:
            log.info("connecting to %s failed (%s); retrying in %s s", endpoint.path, exc, RECONNECT_INTERVAL)
            endpoint.retry_at = time.monotonic() + RECONNECT_INTERVAL
            return
        endpoint.retry_at = None
        self._serve(endpoint, connection)

    def _serve(self, endpoint: _Endpoint, connection: Connection) -> None:
        try:
            backend = Backend(endpoint.device(), connection)
        except Exception as exc:   # noqa: BLE001 (a factory failing must not stop the loop)
            log.error("cannot serve a connection on %s: %s: %s", endpoint.path, type(exc).__name__, exc)
            self.errors.append(exc)
            connection.close()
            return
        backend.on_error = self.errors.append
        self.served += 1
        endpoint.active.append(backend)
        self.backends.append(backend)
        self._devices_poll_ns = max(self._devices_poll_ns, backend.device.poll_us * 1000)
        log.info("%s: serving a front-end on %s", backend.name, endpoint.path or "an inherited fd")
        if endpoint.exclusive and endpoint.listener is not None:
            self._watch_listener(endpoint, False)
        backend.attach(self._add_reader, self._remove_reader)

    def _retire(self, backend: Backend) -> None:
        self.backends.remove(backend)
        self._devices_poll_ns = max((b.device.poll_us for b in self.backends), default=0) * 1000
        for endpoint in self.endpoints:
            if backend in endpoint.active:
                endpoint.active.remove(backend)
                if endpoint.exclusive and endpoint.listener is not None and not endpoint.active:
                    self._watch_listener(endpoint, True)
                if endpoint.client and not endpoint.active:
                    endpoint.retry_at = time.monotonic() + RECONNECT_INTERVAL

    # -- selector bookkeeping --------------------------------------------------------------------------
    def _add_reader(self, fd: int, callback: Callable[[], None]) -> None:
        try:
            self.selector.register(fd, selectors.EVENT_READ, callback)
        except KeyError:       # a stale registration of a number that was closed and reused
            self.selector.unregister(fd)
            self.selector.register(fd, selectors.EVENT_READ, callback)

    def _remove_reader(self, fd: int) -> None:
        try:
            self.selector.unregister(fd)
        except (KeyError, ValueError):
            pass

    def _drain_wakeup(self) -> None:
        try:
            os.eventfd_read(self._wakeup)
        except BlockingIOError:
            pass

    # -- running ---------------------------------------------------------------------------------------
    def _poll_max_ns(self) -> int:
        """Asked every step, so nothing is computed here (the devices' maximum is kept as they come and go)."""
        return self._devices_poll_ns if self.poll_us is None else self.poll_us * 1000

    def _busy_poll(self, window_ns: int) -> bool:
        """Look at the backends' rings and devices until one has work (done, True) or
        ``window_ns`` has passed (False)."""
        now = time.perf_counter_ns
        end = now() + window_ns
        backends = [b for b in self.backends if b.device.poll_us or self.poll_us]
        while True:
            for backend in backends:
                if backend.busy_poll():
                    return True
            if now() >= end:
                return False

    def _adapt_poll(self, waited_ns: int, max_ns: int) -> None:
        """QEMU's rule (util/aio-posix.c, with poll-shrink 2): an event within the window needs no
        change; one later than the maximum halves the window (QEMU's default drops it to nothing,
        which a disk whose latency straddles the maximum pays for with four slow wake-ups each
        time); one in between doubles it (from 4 us)."""
        window = self._poll_ns
        if waited_ns <= window:
            return
        if waited_ns > max_ns:
            self._poll_ns = window // 2 if window > POLL_START_NS else 0
        elif window < max_ns:
            self._poll_ns = min(max_ns, window * 2 if window else POLL_START_NS)

    def step(self, timeout: float | None = None) -> None:
        """Wait up to ``timeout`` seconds for something to do, and do it. Where a device asks for
        it (Device.poll_us, or the server's ``poll_us``), busy-poll its rings and completions first
        for the adaptive window, as QEMU's IOThreads do: a wake-up from sleep costs a disk
        completion tens of microseconds on a virtual CPU."""
        self._step(timeout)

    def _step(self, timeout: float | None) -> float | None:
        """:meth:`step`; returns the backends' nearest poll_interval after it, for run()'s next
        timeout (a backend connected at its end has none yet: no ring started, nothing queued)."""
        max_ns = self._poll_max_ns() if timeout != 0 else 0
        if max_ns:
            started = time.perf_counter_ns()
            if self._poll_ns and self._busy_poll(self._poll_ns):
                timeout = 0                 # the work was found: fds are looked at, not waited for
        events = self.selector.select(timeout)
        if max_ns:
            self._adapt_poll(time.perf_counter_ns() - started if events or timeout == 0 else max_ns + 1, max_ns)
        for key, _events in events:
            try:
                key.data()
            except Exception:   # noqa: BLE001 (never let one connection take the loop down)
                log.exception("handler for fd %d failed", key.fd)
                for backend in self.backends:
                    if key.fd in backend.watched():
                        backend.close()
        nearest = None
        for backend in list(self.backends):
            if backend.closed:
                self._retire(backend)
                continue
            interval = backend.poll_interval
            if interval is not None:
                backend.poll()
                if backend.closed:
                    self._retire(backend)
                    continue
                interval = backend.poll_interval
                if interval is not None:
                    nearest = interval if nearest is None else min(nearest, interval)
        for endpoint in self.endpoints:
            if (endpoint.client and endpoint.retry_at is not None and time.monotonic() >= endpoint.retry_at
                    and not self._stopping):
                self._connect(endpoint)
        return nearest

    def _nearest_poll(self) -> float | None:
        """The backends' nearest poll_interval (None: only fds matter)."""
        return min((i for i in (b.poll_interval for b in self.backends) if i is not None), default=None)

    def _timeout(self, stop_event: threading.Event | None, nearest: float | None) -> float | None:
        """The select timeout: the nearest of the stop_event check, the backends' ``nearest``
        poll_interval, a reconnect."""
        timeout = 0.1 if stop_event is not None else None
        if nearest is not None:
            wait = min(nearest, self.poll_interval) if nearest else 0.0
            timeout = wait if timeout is None else min(timeout, wait)
        for e in self.endpoints:
            if e.client and e.retry_at is not None:
                wait = max(0.0, e.retry_at - time.monotonic())
                timeout = wait if timeout is None else min(timeout, wait)
        return timeout

    def run(self, *, once: bool = False, stop_event: threading.Event | None = None) -> None:
        """Serve until :meth:`stop` (or ``stop_event`` is set); with ``once``, until the first
        connection has ended. Also returns when no endpoint can bring another connection."""
        self._stopping = False
        nearest = self._nearest_poll()      # then from each step: what it found is still true
        while not self._stopping and not (stop_event is not None and stop_event.is_set()):
            if once and self.served and not self.backends:
                return
            if not self.backends and all(e.done for e in self.endpoints):
                return
            nearest = self._step(self._timeout(stop_event, nearest))

    def stop(self) -> None:
        """Make :meth:`run` return (thread-safe)."""
        self._stopping = True
        try:
            os.eventfd_write(self._wakeup, 1)
        except OSError:
            pass

    def close(self) -> None:
        """Close every connection and listener (removing socket files we created)."""
        for backend in list(self.backends):
            backend.close()
        self.backends.clear()
        for endpoint in self.endpoints:
            if endpoint.listener is not None:
                self._remove_reader(endpoint.listener.fileno())
                endpoint.listener.close()
                endpoint.listener = None
            endpoint.done = True
        if self._wakeup >= 0:
            self._remove_reader(self._wakeup)
            os.close(self._wakeup)
            self._wakeup = -1
        if self._own_selector:
            self.selector.close()

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def _stopped_by_signals(server: Server, enabled: bool) -> Iterator[None]:
    """SIGTERM and SIGINT stop ``server`` while the block runs (main thread only: elsewhere, and
    when not ``enabled``, signals stay the caller's)."""
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.signal(signum, lambda _signum, _frame: server.stop())
                for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def serve(device_or_factory, socket_path: str | os.PathLike | None = None, *, fd: int | None = None,
          listen: bool = True, once: bool = False, selector: selectors.BaseSelector | None = None,
          stop_event: threading.Event | None = None, handle_signals: bool = True) -> None:
    """Serve a device on a vhost-user socket until stopped (see :class:`Server`).

    ``device_or_factory``: a Device (one front-end at a time), a factory such as the Device class
    (a device per connection), or a sequence of ``(device_or_factory, socket_path)`` pairs to
    serve several sockets in this one loop. ``once``: return when the first connection ends.
    ``stop_event``: a threading.Event that ends the loop (checked every 0.1 s). Called from the
    main thread with ``handle_signals``, SIGTERM and SIGINT (Ctrl-C) end it too, as the CLI's
    back-ends do: connections closed, socket files removed, a normal return (no traceback); the
    previous handlers are back afterwards."""
    with Server(selector=selector) as server, _stopped_by_signals(server, handle_signals):
        if isinstance(device_or_factory, (list, tuple)):
            if socket_path is not None or fd is not None:
                raise ValueError("give the socket paths in the (device, path) pairs")
            for source, path in device_or_factory:
                server.add(source, path, listen=listen)
        else:
            server.add(device_or_factory, socket_path, fd=fd, listen=listen)
        server.run(once=once, stop_event=stop_event)
