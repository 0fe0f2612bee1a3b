"""VDUSE: this process is a vDPA device (linux/vduse.h). The kernel's vDPA bus sees a device whose
control plane is answered here and whose rings are served here, by the same
:class:`~vhost_min.device.Device` code the vhost-user back-end runs.

Life of a device (:class:`VduseDevice`):

* Create: /dev/vduse/control, VDUSE_SET_API_VERSION 0, VDUSE_CREATE_DEV with the offered features
  and the config space, then open /dev/vduse/NAME (O_NONBLOCK: a thread blocked in read() on it
  makes VDUSE_DESTROY_DEV fail with EBUSY) and VDUSE_VQ_SETUP for every queue. The device is then
  ready for ``vdpa dev add mgmtdev vduse name NAME``, which binds it to virtio_vdpa (a kernel
  driver: /dev/vdX for blk) or vhost_vdpa (/dev/vhost-vdpa-N for a VMM).
* Requests: the kernel writes vduse_dev_request on the device fd and waits (30 s, then the
  device is broken) for our vduse_dev_response. Every request is answered at once from the loop
  thread: SET_STATUS (features read back with VDUSE_DEV_GET_FEATURES at FEATURES_OK, rings
  started at DRIVER_OK, everything reset at 0), GET_VQ_STATE (the ring's next avail index),
  UPDATE_IOTLB (our mappings of the range dropped), and any other type answered
  VDUSE_REQ_RESULT_FAILED.
* Memory: ring and buffer addresses are IOVAs of the kernel's VDUSE domain: behind virtio_vdpa a
  bounce area at 0 (64 MiB) and coherent allocations above it (the rings), behind vhost_vdpa the
  VMM's own memory as it mapped it. An IOVA we have not mapped yet is looked up with
  VDUSE_IOTLB_GET_FD and the whole entry is mmapped from the fd it returns, into an
  :class:`~vhost_min.memory.IOTLB`; the rings and the device read and write through it.
* Rings: at DRIVER_OK, VDUSE_VQ_GET_INFO gives each ready ring's size and IOVAs; a kick eventfd
  per ring is handed over with VDUSE_VQ_SETUP_KICKFD. A kick runs ``Device.process`` in the loop
  thread; completions signal the driver with VDUSE_VQ_INJECT_IRQ. Split and packed rings
  (``packed=False`` leaves VIRTIO_F_RING_PACKED out); VERSION_1, ACCESS_PLATFORM (VDUSE requires
  it), INDIRECT_DESC and EVENT_IDX are offered too. A ring's state (GET_VQ_STATE, VQ_GET_INFO) is
  kept in vhost-user's vring base encoding: the split avail index, or packed.encode_base().
* Destroy: ``close()`` stops the rings, closes the device fd and issues VDUSE_DESTROY_DEV, which
  the kernel refuses (EBUSY) while the vDPA device exists: ``vdpa dev del NAME`` first.

What VDUSE refuses at creation (vduse_dev.c): devices other than blk, net (and fs on newer
kernels), features without ACCESS_PLATFORM, and writable config space (blk's CONFIG_WCE, net's
CTRL_VQ): those two bits are not offered here. The config space is read once, at creation;
:meth:`VduseDevice.notify_config_change` re-reads it (VDUSE_DEV_SET_CONFIG) and tells the driver.

What Debian's 6.12 kernel asked (tests/kernel/test_vduse.py): behind virtio_vdpa, SET_STATUS
0, 1, 3, 0xb, 0xf at probe and 0 then 1 at ``vdpa dev del``, nothing else; IOTLB entries for the
ring parts (RW, fd offset = IOVA) and the bounce area [0, 64 MiB). Behind vhost_vdpa, opening the
node sends SET_STATUS 0, each IOTLB update an UPDATE_IOTLB of the whole space [0, 2^64 - 1], and
GET_VRING_BASE a GET_VQ_STATE. Linux's virtio_ring takes a packed ring when offered.

Event-loop agnostic like the vhost-user back-end: :meth:`VduseDevice.watched` lists the fds and
their handlers, :meth:`VduseDevice.poll` runs rings with work left over (``poll_interval``);
:meth:`VduseDevice.run` is a ready-made selectors loop, stopped from any thread with ``stop()``.
"""

from __future__ import annotations

import collections
import ctypes
import errno
import functools
import logging
import mmap
import os
import select
import selectors
import threading
import time
from collections.abc import Callable, Sequence
from ctypes import c_char, c_uint32, c_uint64

from .device import Device
from .errors import GuestMemoryError, IoctlError, NotSupportedError, ProtocolError, VhostError
from .ioctl import (VDUSE_ACCESS_RO, VDUSE_ACCESS_RW, VDUSE_API_VERSION, VDUSE_EVENTFD_DEASSIGN, VDUSE_NAME_MAX,
                    VDUSE_REQ_RESULT_FAILED, VDUSE_REQ_RESULT_OK, VduseIoctl, VduseReqType, ioctl,
                    vduse_config_data, vduse_dev_config, vduse_dev_request, vduse_dev_response, vduse_iotlb_entry,
                    vduse_vq_config, vduse_vq_eventfd, vduse_vq_info)
from .memory import IOTLB, PAGE_SIZE, IOTLBMiss, map_fd
from .virtio import (VHOST_F_LOG_ALL, VHOST_USER_F_PROTOCOL_FEATURES, VIRTIO_F_ACCESS_PLATFORM, VIRTIO_F_EVENT_IDX,
                     VIRTIO_F_INDIRECT_DESC, VIRTIO_F_RING_PACKED, VIRTIO_F_VERSION_1, DeviceId, DeviceStatus,
                     ring_sizes)
from .packed import PackedDeviceQueue, decode_base, encode_base
from .vring import SplitDeviceQueue

__all__ = ["VduseDevice", "VDUSE_CONTROL", "REQUEST_SIZE", "RESPONSE_SIZE"]

log = logging.getLogger("vhost_min.vduse")

#: The control node: VDUSE_CREATE_DEV / VDUSE_DESTROY_DEV.
VDUSE_CONTROL = "/dev/vduse/control"
#: sizeof(struct vduse_dev_request): what one read() on the device fd gives (a shorter buffer is EINVAL).
REQUEST_SIZE = ctypes.sizeof(vduse_dev_request)
#: sizeof(struct vduse_dev_response): what one write() must carry.
RESPONSE_SIZE = ctypes.sizeof(vduse_dev_response)

# Feature bits VDUSE refuses at VDUSE_CREATE_DEV ("only read-only configuration space"), by device.
_VIRTIO_BLK_F_CONFIG_WCE = 1 << 11
_VIRTIO_NET_F_CTRL_VQ = 1 << 17
_REFUSED = {DeviceId.BLOCK: _VIRTIO_BLK_F_CONFIG_WCE, DeviceId.NET: _VIRTIO_NET_F_CTRL_VQ}
#: What this transport adds to a device's own features (and RING_PACKED unless ``packed=False``).
TRANSPORT_FEATURES = VIRTIO_F_VERSION_1 | VIRTIO_F_ACCESS_PLATFORM | VIRTIO_F_INDIRECT_DESC | VIRTIO_F_EVENT_IDX
#: Bits a device may carry that mean nothing here: vhost-user's own.
_NOT_SERVED = VHOST_F_LOG_ALL | VHOST_USER_F_PROTOCOL_FEATURES
#: How many IOTLB entries one ring run may fetch before the ring is declared broken.
_MISS_LIMIT = 64
#: How long close() retries VDUSE_DESTROY_DEV while the kernel still releases the vDPA device.
DESTROY_RETRY = 1.0


def _config_size(device: Device) -> int:
    """The size of the device's config space, known for the types VDUSE allows."""
    if device.device_id == DeviceId.BLOCK:
        from .blk import VIRTIO_BLK_CONFIG
        return VIRTIO_BLK_CONFIG.size
    if device.device_id == DeviceId.NET:
        from .net import VIRTIO_NET_CONFIG
        return VIRTIO_NET_CONFIG.size
    raise ValueError(f"give config_size for a {type(device).__name__} (device id {device.device_id})")


def check_name(name: str) -> bytes:
    """A VDUSE device name as the kernel takes it: the /dev/vduse/ node and the vDPA device name."""
    if not isinstance(name, str):
        raise TypeError(f"a VDUSE device name is a str, not {type(name).__name__}")
    raw = name.encode("ascii", "replace")
    if not raw or len(raw) >= VDUSE_NAME_MAX or not name.isprintable() or not name.isascii() \
            or "/" in name or name in (".", "..", "control"):
        raise ValueError(f"{name!r} is not a VDUSE device name (1..{VDUSE_NAME_MAX - 1} printable ASCII "
                         f"characters, no '/', not 'control')")
    return raw


class _Ring:
    """One queue as the kernel described it (VDUSE_VQ_GET_INFO) and our state for it."""

    __slots__ = ("index", "num", "desc", "driver", "device", "base", "started", "kick_fd", "queue",
                 "broken", "again", "on_kick")

    def __init__(self, index: int) -> None:
        self.index = index
        self.kick_fd: int | None = None
        self.on_kick: Callable[[], None] | None = None
        self.clear()

    def clear(self) -> None:
        self.num = 0
        self.desc = self.driver = self.device = 0
        self.base = 0                        # VQ_GET_INFO's state at DRIVER_OK, as a vring base
        self.started = False
        self.queue: SplitDeviceQueue | PackedDeviceQueue | None = None
        self.broken: str | None = None
        self.again = False

    def __repr__(self) -> str:
        state = "started" if self.started else "stopped"
        return f"<vduse ring {self.index} num={self.num} {state}{' broken' if self.broken else ''}>"


class VduseDevice:
    """Serve ``device`` (a :class:`~vhost_min.device.Device`) as the VDUSE device ``name``.

    Creates the device at once (VDUSE_CREATE_DEV, VDUSE_VQ_SETUP of ``num_queues`` rings of at
    most ``queue_size`` entries, default the device's ``max_queue_size``); run the loop
    (:meth:`run`, or :meth:`watched` under any loop) before attaching it with ``vdpa dev add``,
    since the kernel waits for our answers. ``close()`` (or the ``with`` block) destroys it.

    ``fd``: serve an already open device fd instead (a management process created the device
    and passed it; or a test's socket standing in for it): nothing is created or destroyed here.

    While served, ``device.backend`` is this object: ``signal_used(q)``, ``post_used(q, done)``
    and ``notify_config_change()`` work as on the vhost-user back-end.
    """

    def __init__(self, device: Device, name: str = "vhost-min", *, queue_size: int | None = None,
                 config_size: int | None = None, vq_align: int = PAGE_SIZE, packed: bool = True,
                 control: str = VDUSE_CONTROL, fd: int | None = None) -> None:
        if not isinstance(device, Device):
            raise TypeError(f"{device!r} is not a vhost_min.device.Device")
        if device.backend is not None and not getattr(device.backend, "closed", True):
            raise VhostError(f"{device!r} is already served by {device.backend!r}", errno.EBUSY)
        nq = device.num_queues
        if not (isinstance(nq, int) and 1 <= nq <= 0xFFFF):
            raise ValueError(f"{type(device).__name__}.num_queues must be 1..65535, not {nq!r}")
        size = device.max_queue_size if queue_size is None else queue_size
        if not (isinstance(size, int) and 1 <= size <= 0x8000 and size & (size - 1) == 0):
            raise ValueError(f"queue size {size!r} is not a power of two from 1 to 32768")
        self.name = name
        raw_name = check_name(name)
        self.device = device
        self.queue_size = size
        self.packed = bool(packed)
        self.device_features = self._offer_features()
        self.features = 0                   # what the driver took (VDUSE_DEV_GET_FEATURES at FEATURES_OK)
        self.status = 0
        self.iotlb = IOTLB()
        self.rings = [_Ring(i) for i in range(nq)]
        for ring in self.rings:
            ring.on_kick = functools.partial(self._on_kick, ring)
        #: What happened, in order (facts for logs and tests): the kernel's requests as (type name,
        #: detail, "OK"/"FAILED"); the ring layouts read at DRIVER_OK as ("VQ_GET_INFO", index, num,
        #: desc, driver, device, base, ready); the IOTLB entries fetched as ("IOTLB_GET_FD",
        #: start, last, perm, offset).
        self.history: collections.deque[tuple] = collections.deque(maxlen=4096)
        self.last_error: BaseException | None = None
        #: Called with every exception that failed a request or broke a ring.
        self.on_error: Callable[[BaseException], None] | None = None
        self.closed = False
        self._posted: dict[int, list[tuple[int, int]]] = {}
        self._posted_lock = threading.Lock()
        self._stopping = False
        self._requests_handler = self.handle_requests
        self._wake_handler = self._on_wake
        self._control = -1
        self._fd = -1
        self._created = False
        self.config_size = config_size      # what VDUSE_CREATE_DEV was given (None: the device type's)
        self._wake_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        try:
            if fd is not None:
                if not isinstance(fd, int) or isinstance(fd, bool) or fd < 0:
                    raise ValueError(f"{fd!r} is not a file descriptor")
                self._fd = fd
                os.set_blocking(fd, False)
            else:
                self._create(raw_name, control, config_size, vq_align)
        except BaseException:
            self._teardown()
            raise
        device.backend = self

    def __repr__(self) -> str:
        return f"<VduseDevice {self.name}{' closed' if self.closed else ''}>"

    def __enter__(self) -> VduseDevice:
        return self

    def __del__(self) -> None:
        if not getattr(self, "closed", True):
            try:
                self.close()
            except OSError:
                pass

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- creation and destruction ----------------------------------------------------------------
    def _offer_features(self) -> int:
        features = int(self.device.features) | TRANSPORT_FEATURES
        features = features | VIRTIO_F_RING_PACKED if self.packed else features & ~VIRTIO_F_RING_PACKED
        return int(features & ~_NOT_SERVED & ~_REFUSED.get(self.device.device_id, 0))

    def config_space(self, size: int) -> bytes:
        """The device's config space, ``size`` bytes (what VDUSE_CREATE_DEV hands the kernel)."""
        data = bytes(self.device.get_config(0, size))
        if len(data) != size:
            raise VhostError(f"{type(self.device).__name__}.get_config(0, {size}) gave {len(data)} bytes")
        return data

    def _create(self, raw_name: bytes, control: str, config_size: int | None, vq_align: int) -> None:
        size = _config_size(self.device) if config_size is None else config_size
        self.config_size = size
        if not isinstance(size, int) or not 0 <= size <= PAGE_SIZE:
            raise ValueError(f"config size {size!r} is not 0..{PAGE_SIZE} (VDUSE's limit: a page)")
        if not isinstance(vq_align, int) or not 0 < vq_align <= PAGE_SIZE or vq_align & (vq_align - 1):
            raise ValueError(f"vq_align {vq_align!r} is not a power of two up to {PAGE_SIZE}")
        config = self.config_space(size)
        try:
            self._control = os.open(control, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            hint = " (is the vduse module loaded?)" if exc.errno == errno.ENOENT else ""
            raise VhostError(f"cannot open {control}: {exc.strerror}{hint}", exc.errno) from None
        ioctl(self._control, VduseIoctl.VDUSE_SET_API_VERSION, c_uint64(VDUSE_API_VERSION),
              name="VDUSE_SET_API_VERSION")
        head = ctypes.sizeof(vduse_dev_config)
        buf = (c_char * (head + size))()
        cfg = vduse_dev_config.from_buffer(buf)
        cfg.name = raw_name
        cfg.vendor_id = 0
        cfg.device_id = int(self.device.device_id)
        cfg.features = self.device_features
        cfg.vq_num = len(self.rings)
        cfg.vq_align = vq_align
        cfg.config_size = size
        ctypes.memmove(ctypes.addressof(buf) + head, config, size)
        try:
            ioctl(self._control, VduseIoctl.VDUSE_CREATE_DEV, buf, name="VDUSE_CREATE_DEV")
        except IoctlError as exc:
            if exc.errno == errno.EEXIST:
                raise IoctlError(f"VDUSE_CREATE_DEV: a VDUSE device named {self.name!r} exists already",
                                 exc.errno, ioctl=exc.ioctl) from None
            if exc.errno == errno.EINVAL:
                raise IoctlError(f"VDUSE_CREATE_DEV refused {self.name!r} (EINVAL): device id "
                                 f"{cfg.device_id}, features {cfg.features:#x}, {cfg.vq_num} queues, config "
                                 f"{size} bytes (VDUSE takes blk and net, ACCESS_PLATFORM, read-only config)",
                                 exc.errno, ioctl=exc.ioctl) from None
            raise
        self._created = True
        node = f"/dev/vduse/{self.name}"
        try:
            self._fd = os.open(node, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            raise VhostError(f"cannot open {node}: {exc.strerror}", exc.errno) from None
        for ring in self.rings:
            self._ioctl(VduseIoctl.VDUSE_VQ_SETUP, vduse_vq_config(index=ring.index, max_size=self.queue_size))

    def close(self) -> None:
        """Stop the rings, drop every mapping, close the device fd and (when this object created
        the device) VDUSE_DESTROY_DEV. Raises IoctlError EBUSY, after releasing everything of
        ours, when the vDPA device still exists (``vdpa dev del NAME`` first). Call it from the
        loop's thread or after :meth:`run` returned (``stop()`` first): the loop uses these fds."""
        if self.closed:
            return
        self.closed = True
        self._stop_rings(deassign=True)
        self.iotlb.invalidate(0, 1 << 64)
        if self.device.backend is self:
            self.device.backend = None
        self._teardown()

    def _teardown(self) -> None:
        self.closed = True
        with self._posted_lock:
            wake, self._wake_fd = self._wake_fd, -1
        for fd in (self._fd, wake):
            if fd >= 0:
                os.close(fd)
        self._fd = -1
        try:
            if self._created:
                self._destroy()
        finally:
            control, self._control = self._control, -1
            if control >= 0:
                os.close(control)

    def _destroy(self) -> None:
        deadline = time.monotonic() + DESTROY_RETRY
        name = (c_char * VDUSE_NAME_MAX)(*check_name(self.name))
        while True:
            try:
                ioctl(self._control, VduseIoctl.VDUSE_DESTROY_DEV, name, name="VDUSE_DESTROY_DEV")
                self._created = False
                return
            except IoctlError as exc:
                if exc.errno != errno.EBUSY:
                    raise
                if time.monotonic() >= deadline:
                    raise IoctlError(f"VDUSE_DESTROY_DEV {self.name!r}: the device is busy (its vDPA device "
                                     f"still exists: `vdpa dev del {self.name}` first)", exc.errno,
                                     ioctl=exc.ioctl) from None
                time.sleep(0.02)

    # -- the loop ---------------------------------------------------------------------------------
    def fileno(self) -> int:
        """The device fd: readable when the kernel has a request waiting."""
        if self._fd < 0:
            raise VhostError(f"{self!r} is closed", errno.EBADF)
        return self._fd

    def watched(self) -> dict[int, Callable[[], None]]:
        """fd -> what to call when it is readable: the device fd, the completion wake-up and the
        kick eventfd of every started ring (the handlers are stable objects)."""
        if self.closed:
            return {}
        fds = {self._fd: self._requests_handler, self._wake_fd: self._wake_handler}
        for ring in self.rings:
            if ring.kick_fd is not None:
                fds[ring.kick_fd] = ring.on_kick
        return fds

    @property
    def poll_interval(self) -> float | None:
        """0 when a ring has work left over (call :meth:`poll`), else None."""
        return 0 if any(ring.again for ring in self.rings) else None

    def poll(self) -> None:
        """Run the rings whose process() asked to be called again."""
        for ring in self.rings:
            if ring.again:
                self._run(ring)

    def run(self) -> None:
        """Serve until :meth:`stop` (from any thread or a signal handler) or close()."""
        selector = selectors.DefaultSelector()
        registered: dict[int, Callable[[], None]] = {}
        try:
            while not self._stopping and not self.closed:
                want = self.watched()
                for fd in [fd for fd in registered if registered[fd] is not want.get(fd)]:
                    selector.unregister(fd)
                    del registered[fd]
                for fd, handler in want.items():
                    if fd not in registered:
                        selector.register(fd, selectors.EVENT_READ, handler)
                        registered[fd] = handler
                ready = selector.select(self.poll_interval)
                # The kernel waits for our answers: requests first, then kicks and completions.
                ready.sort(key=lambda item: item[0].fd != self._fd)
                for key, _ in ready:
                    if self.closed:
                        break
                    if registered.get(key.fd) is key.data:
                        key.data()
                self.poll()
        finally:
            self._stopping = False
            selector.close()

    def stop(self) -> None:
        """Make :meth:`run` return (thread- and signal-safe)."""
        self._stopping = True
        with self._posted_lock:
            if self._wake_fd >= 0:
                os.eventfd_write(self._wake_fd, 1)

    # -- requests -----------------------------------------------------------------------------------
    def handle_requests(self) -> int:
        """Read and answer every request waiting on the device fd, never blocking; how many."""
        answered = 0
        while not self.closed:
            try:
                data = os.read(self._fd, REQUEST_SIZE)
            except InterruptedError:
                continue
            except BlockingIOError:
                if not answered:
                    self._check_broken()
                return answered
            except OSError as exc:
                raise VhostError(f"reading a request from VDUSE device {self.name!r} failed: {exc.strerror}",
                                 exc.errno) from None
            if not data:
                return answered
            try:
                response = self.handle_request(data)
            except ProtocolError as exc:
                self._error(exc)
                continue
            self._answer(response)
            answered += 1
        return answered

    def _check_broken(self) -> None:
        """The fd was readable but held no request: the kernel flags a broken device with POLLERR
        (a request went unanswered for its timeout, 30 s). Nothing will work again: say so rather
        than spin on an fd that stays ready."""
        poller = select.poll()
        poller.register(self._fd, select.POLLIN)
        if any(events & select.POLLERR for _, events in poller.poll(0)):
            raise VhostError(f"the kernel marked VDUSE device {self.name!r} broken (a request was not answered "
                             f"in time); destroy it and create it again", errno.EIO)

    def handle_request(self, data: bytes) -> vduse_dev_response:
        """The response to one vduse_dev_request (``REQUEST_SIZE`` bytes): OK, or FAILED where the
        request cannot be honoured or its type is unknown. ProtocolError when ``data`` is not a
        request at all (it cannot even be answered)."""
        if len(data) != REQUEST_SIZE:
            raise ProtocolError(f"VDUSE device {self.name!r} gave a {len(data)}-byte request; a "
                                f"vduse_dev_request is {REQUEST_SIZE} bytes")
        req = vduse_dev_request.from_buffer_copy(data)
        resp = vduse_dev_response(request_id=req.request_id, result=VDUSE_REQ_RESULT_OK)
        try:
            kind = VduseReqType(req.type)
        except ValueError:
            log.warning("%s: request type %d (id %d) is unknown: answered VDUSE_REQ_RESULT_FAILED", self.name,
                        req.type, req.request_id)
            resp.result = VDUSE_REQ_RESULT_FAILED
            self.history.append((f"type {req.type}", "", "FAILED"))
            return resp
        detail = ""
        try:
            if kind == VduseReqType.VDUSE_SET_STATUS:
                detail = f"{req.s.status:#x}"
                self._set_status(req.s.status)
            elif kind == VduseReqType.VDUSE_GET_VQ_STATE:
                detail = str(req.vq_state.index)
                resp.vq_state.index = req.vq_state.index
                base = self._vq_state(req.vq_state.index)
                if self.features & VIRTIO_F_RING_PACKED:
                    state = resp.vq_state.packed
                    (state.last_avail_idx, state.last_avail_counter,
                     state.last_used_idx, state.last_used_counter) = decode_base(base)
                else:
                    resp.vq_state.split.avail_index = base
            else:
                detail = f"{req.iova.start:#x}-{req.iova.last:#x}"
                self._update_iotlb(req.iova.start, req.iova.last)
        except Exception as exc:    # noqa: BLE001 (answered FAILED: the kernel must never wait for us)
            resp.result = VDUSE_REQ_RESULT_FAILED
            log.error("%s: %s %s failed, answered VDUSE_REQ_RESULT_FAILED: %s", self.name, kind.name, detail, exc)
            self._error(exc, logged=True)
        answer = "OK" if resp.result == VDUSE_REQ_RESULT_OK else "FAILED"
        self.history.append((kind.name, detail, answer))
        log.info("%s: %s %s: %s", self.name, kind.name, detail, answer)
        return resp

    def _answer(self, resp: vduse_dev_response) -> None:
        try:
            os.write(self._fd, bytes(resp))
        except OSError as exc:
            # ENOENT: the kernel gave up waiting (its 30 s timeout) and forgot the request.
            self._error(VhostError(f"answering request {resp.request_id} of VDUSE device {self.name!r} failed: "
                                   f"{exc.strerror}", exc.errno))

    def _error(self, exc: BaseException, *, logged: bool = False) -> None:
        if not logged:
            log.error("%s: %s", self.name, exc)
        self.last_error = exc
        if self.on_error is not None:
            try:
                self.on_error(exc)
            except Exception:   # noqa: BLE001
                log.exception("%s: on_error failed", self.name)

    def _set_status(self, status: int) -> None:
        """VDUSE_SET_STATUS: the driver wrote the status byte (it is refused, and stays the old
        one, when this raises)."""
        if status == 0:
            self._reset()
            return
        added = status & ~self.status
        if added & DeviceStatus.FEATURES_OK:
            value = c_uint64()
            self._ioctl(VduseIoctl.VDUSE_DEV_GET_FEATURES, value)
            if value.value & ~self.device_features:
                raise ProtocolError(f"the driver took features {value.value & ~self.device_features:#x} that "
                                    f"were not offered")
            self.device.features_set(value.value)
            self.features = value.value
        self.device.set_status(status)
        if added & DeviceStatus.DRIVER_OK:
            self._start_rings()
        self.status = status

    def _reset(self) -> None:
        """Status 0: the rings stop, the mappings go (the kernel frees what they map after our
        answer), the device forgets its negotiation."""
        self._stop_rings(deassign=False)
        self.iotlb.invalidate(0, 1 << 64)
        self.features = 0
        self.status = 0
        self.device.set_status(0)
        self.device.reset()

    def _vq_state(self, index: int) -> int:
        """VDUSE_GET_VQ_STATE: ring ``index``'s state as a vring base (the next avail index, or
        packed.encode_base of both indices and wrap counters)."""
        if not 0 <= index < len(self.rings):
            raise ProtocolError(f"GET_VQ_STATE for queue {index}; the device has {len(self.rings)}")
        ring = self.rings[index]
        return ring.queue.get_base() if ring.queue is not None else ring.base

    def _update_iotlb(self, start: int, last: int) -> None:
        """VDUSE_UPDATE_IOTLB: mappings of [start, last] changed: drop ours (looked up again on
        use); ring queues are rebuilt from their next avail index."""
        if last < start:
            raise ProtocolError(f"UPDATE_IOTLB range {start:#x}-{last:#x} ends before it starts")
        for ring in self.rings:
            self._drop_queue(ring)
        self.iotlb.invalidate(start, last - start + 1)

    # -- rings --------------------------------------------------------------------------------------
    def _start_rings(self) -> None:
        """DRIVER_OK: each ready ring's layout from VDUSE_VQ_GET_INFO and a kick eventfd for it."""
        for ring in self.rings:
            info = vduse_vq_info(index=ring.index)
            self._ioctl(VduseIoctl.VDUSE_VQ_GET_INFO, info)
            if self.features & VIRTIO_F_RING_PACKED:
                p = info.packed
                base = encode_base(p.last_avail_idx, p.last_avail_counter, p.last_used_idx, p.last_used_counter)
            else:
                base = info.split.avail_index
            self.history.append(("VQ_GET_INFO", ring.index, info.num, info.desc_addr, info.driver_addr,
                                 info.device_addr, base, info.ready))
            if not info.ready:
                continue
            ring.num, ring.desc, ring.driver, ring.device = info.num, info.desc_addr, info.driver_addr, info.device_addr
            ring.base = base
            if ring.kick_fd is None:
                ring.kick_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            self._ioctl(VduseIoctl.VDUSE_VQ_SETUP_KICKFD, vduse_vq_eventfd(index=ring.index, fd=ring.kick_fd))
            ring.started = True
            ring.again = True           # look once: the driver may have published before the kick fd

    def _stop_rings(self, *, deassign: bool) -> None:
        for ring in self.rings:
            if ring.started:
                try:
                    self.device.stopped(ring.index)
                except Exception:   # noqa: BLE001
                    log.exception("%s: device stopped(%d) failed", self.name, ring.index)
                self._push_posted(ring.index)
            fd, ring.kick_fd = ring.kick_fd, None
            if fd is not None:
                if deassign and self._fd >= 0:
                    try:
                        self._ioctl(VduseIoctl.VDUSE_VQ_SETUP_KICKFD,
                                    vduse_vq_eventfd(index=ring.index, fd=VDUSE_EVENTFD_DEASSIGN))
                    except VhostError as exc:
                        log.debug("%s: deassigning the kick fd of ring %d: %s", self.name, ring.index, exc)
                os.close(fd)
            ring.clear()
        with self._posted_lock:
            self._posted.clear()

    def _drop_queue(self, ring: _Ring) -> None:
        vq = ring.queue
        if vq is None:
            return
        if vq.in_flight:
            try:
                self.device.stopped(ring.index)
            except Exception:   # noqa: BLE001
                log.exception("%s: device stopped(%d) failed", self.name, ring.index)
            self._push_posted(ring.index)
        ring.base = vq.get_base()
        ring.queue = None
        ring.again = ring.started

    def _on_kick(self, ring: _Ring) -> None:
        fd = ring.kick_fd
        if fd is None:
            return
        try:
            os.eventfd_read(fd)
        except BlockingIOError:
            return
        self._run(ring)

    def _run(self, ring: _Ring) -> None:
        """Process a started ring; IOVAs it meets unmapped are fetched and the run retried."""
        ring.again = False
        if not ring.started or ring.broken or self.closed:
            return
        for _ in range(_MISS_LIMIT):
            try:
                vq = self._queue_for(ring)
                ring.again = bool(self.device.process(ring.index, vq))
                return
            except IOTLBMiss as miss:
                try:
                    self.map_iova(miss.iova, miss.write)
                except VhostError as exc:
                    self._break(ring, exc)
                    return
            except VhostError as exc:
                self._break(ring, exc)
                return
            except Exception as exc:   # noqa: BLE001 (a device bug: this ring stops, the device goes on)
                log.error("%s: ring %d: the device's process() raised", self.name, ring.index, exc_info=exc)
                self._break(ring, exc)
                return
        self._break(ring, GuestMemoryError(f"ring {ring.index}: {_MISS_LIMIT} IOTLB misses in one run"))

    def _break(self, ring: _Ring, exc: BaseException) -> None:
        """The ring stops being served until the next reset (VDUSE has no error eventfd)."""
        ring.broken = f"{type(exc).__name__}: {exc}"
        ring.again = False
        log.error("%s: ring %d broken: %s", self.name, ring.index, ring.broken)
        self._error(exc, logged=True)

    def _queue_for(self, ring: _Ring) -> SplitDeviceQueue | PackedDeviceQueue:
        vq = ring.queue
        if vq is not None:
            return vq
        packed = bool(self.features & VIRTIO_F_RING_PACKED)
        event_idx = bool(self.features & VIRTIO_F_EVENT_IDX)
        sizes = ring_sizes(ring.num, packed=packed, event_idx=event_idx)
        for iova, length, write in zip((ring.desc, ring.driver, ring.device), sizes, (packed, False, True)):
            self.iotlb.segments(iova, length, write)           # IOTLBMiss: fetched, and retried
        cls = PackedDeviceQueue if packed else SplitDeviceQueue
        vq = cls(self.iotlb, ring.num, ring.desc, ring.driver, ring.device, event_idx=event_idx,
                 indirect=bool(self.features & VIRTIO_F_INDIRECT_DESC))
        vq.set_base(ring.base)
        ring.queue = vq
        return vq

    # -- memory -------------------------------------------------------------------------------------
    def map_iova(self, iova: int, write: bool = False) -> tuple[int, int, int]:
        """VDUSE_IOTLB_GET_FD for ``iova``: mmap the whole entry that covers it into :attr:`iotlb`.
        Returns the entry's (start, last, perm)."""
        entry = vduse_iotlb_entry(start=iova, last=iova)
        try:
            fd = self._ioctl(VduseIoctl.VDUSE_IOTLB_GET_FD, entry)
        except IoctlError as exc:
            if exc.errno != errno.EINVAL:
                raise
            raise GuestMemoryError(f"IOVA {iova:#x} is not mapped in VDUSE device {self.name!r} "
                                   f"(VDUSE_IOTLB_GET_FD: EINVAL)", errno.EFAULT) from None
        try:
            start, last, perm, offset = entry.start, entry.last, entry.perm, entry.offset
            self.history.append(("IOTLB_GET_FD", start, last, perm, offset))
            if not start <= iova <= last:
                raise GuestMemoryError(f"VDUSE_IOTLB_GET_FD for IOVA {iova:#x} gave the entry {start:#x}-{last:#x}")
            if write and not perm & 2:
                raise GuestMemoryError(f"IOVA {iova:#x} is mapped read-only; the device must write it")
            view = _map_entry(fd, last - start + 1, offset, perm)
        finally:
            os.close(fd)
        self.iotlb.update_view(start, view, perm)
        return start, last, perm

    # -- what devices call ------------------------------------------------------------------------
    def signal_used(self, queue: int) -> None:
        """VDUSE_VQ_INJECT_IRQ: tell the driver that ``queue`` has used buffers."""
        ring = self.rings[queue]
        if not ring.started or self.closed:
            return
        try:
            self._ioctl(VduseIoctl.VDUSE_VQ_INJECT_IRQ, c_uint32(queue))
        except VhostError as exc:
            log.warning("%s: interrupting ring %d failed: %s", self.name, queue, exc)

    def post_used(self, queue: int, done: Sequence[tuple[int, int]]) -> None:
        """Thread-safe: chains of ``queue`` an asynchronous device completed, as (head, bytes
        written); the loop thread pushes them and signals the driver (device.py's contract)."""
        if not 0 <= queue < len(self.rings):
            raise ValueError(f"queue {queue} does not exist ({len(self.rings)} queues)")
        with self._posted_lock:
            if self._wake_fd < 0:
                return
            self._posted.setdefault(queue, []).extend(done)
            os.eventfd_write(self._wake_fd, 1)

    def notify_config_change(self) -> bool:
        """Re-read the device's config space into the kernel (VDUSE_DEV_SET_CONFIG) and send the
        driver a config interrupt (VDUSE_DEV_INJECT_CONFIG_IRQ; refused before DRIVER_OK: False)."""
        size = _config_size(self.device) if self.config_size is None else self.config_size
        data = self.config_space(size)
        buf = (c_char * (ctypes.sizeof(vduse_config_data) + size))()
        head = vduse_config_data.from_buffer(buf)
        head.offset, head.length = 0, size
        ctypes.memmove(ctypes.addressof(buf) + ctypes.sizeof(vduse_config_data), data, size)
        self._ioctl(VduseIoctl.VDUSE_DEV_SET_CONFIG, buf)
        try:
            self._ioctl(VduseIoctl.VDUSE_DEV_INJECT_CONFIG_IRQ)
        except IoctlError as exc:
            if exc.errno != errno.EINVAL:
                raise
            return False
        return True

    def _on_wake(self) -> None:
        try:
            os.eventfd_read(self._wake_fd)
        except OSError:
            pass
        self._push_posted()

    def _push_posted(self, queue: int | None = None) -> None:
        with self._posted_lock:
            if queue is None:
                posted, self._posted = self._posted, {}
            else:
                done = self._posted.pop(queue, None)
                posted = {queue: done} if done else {}
        for index, done in posted.items():
            vq = self.rings[index].queue
            if vq is None:
                log.error("%s: ring %d: %d chain(s) posted for a queue that is gone", self.name, index, len(done))
                continue
            try:
                wanted = vq.push_batch(done)
            except VhostError as exc:
                log.error("%s: ring %d: the device posted chains the ring does not hold: %s", self.name, index, exc)
                continue
            if wanted:
                self.signal_used(index)

    def _ioctl(self, request: VduseIoctl, arg: object = 0) -> int:
        if self._fd < 0:
            raise VhostError(f"{request.name} on a closed VDUSE device ({self.name})", errno.EBADF)
        return ioctl(self._fd, request, arg, name=request.name)


def _map_entry(fd: int, size: int, offset: int, perm: int) -> memoryview:
    """mmap one IOTLB entry of a VDUSE domain fd: read-write, or read-only for VDUSE_ACCESS_RO
    (the fd is opened O_RDONLY then). A write-only entry cannot be mapped (mmap needs read access)."""
    if perm == VDUSE_ACCESS_RW:
        return map_fd(fd, size, offset)
    if perm == VDUSE_ACCESS_RO:
        try:
            mapping = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ, offset=offset)
        except (OSError, ValueError) as exc:
            raise GuestMemoryError(f"cannot map the read-only IOVA entry ({size:#x} bytes at offset {offset:#x}): "
                                   f"{exc}") from None
        return memoryview(mapping)
    raise NotSupportedError(f"an IOVA entry with permission {perm} cannot be mapped (mmap needs read access)")
