"""A virtio device as its author writes it: feature bits, config space, what to do with a request
chain. Transport-agnostic: the vhost-user back-end (backend.py) and VDUSE (vdpa.py) serve the same
Device, so a device class never sees a message header or an ioctl.

The contract with the transport serving it (``device.backend`` while it is served):

* ``process(queue, vq)`` runs in the transport's loop thread when a started ring has work. The
  default pops batches and runs :meth:`Device.handle` on each chain synchronously.
* An asynchronous device pops chains in ``process`` and completes them later, from any thread,
  with ``self.backend.post_used(queue, [(head, written), ...])``: the transport pushes them to the
  used ring (and signals the driver) in its loop thread, so the queue itself is only ever touched
  there.
* An asynchronous device whose completions arrive on an fd (io_uring's eventfd, say) lists it in
  ``watched()``: the transport watches it in its loop and calls the callback there, and what the
  callback posts is pushed as soon as it returns (no wake-up of the loop in between).
* ``stopped(queue)`` is the device's last word on a ring: it is called when the ring stops
  (GET_VRING_BASE, reset, disconnect) and before its queue is rebuilt while chains are in flight
  (SET_VRING_NUM/ADDR/BASE, a ring feature change, a memory table change that moves the ring). It
  must not return before every chain it popped from that queue is completed (``post_used``, with a
  failure status where it cancels one): the transport pushes what was posted right after it
  returns, and only then reads the ring's base or rebuilds the queue. Chains still held after
  that are reported as lost.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import BinaryIO

from .errors import NotSupportedError, VhostError

__all__ = ["Device", "Completions"]

log = logging.getLogger("vhost_min.device")


class Device:
    """A virtio device: subclass it, set the class attributes, implement what you need.

    The classic example::

        class Rng(Device):
            device_id = DeviceId.RNG
            def handle(self, queue, readable, writable):
                for buf in writable:
                    buf[:] = os.urandom(len(buf))
                return sum(len(b) for b in writable)

        serve(Rng, "/tmp/rng.sock")   # -device vhost-user-rng-pci,chardev=... on the QEMU side

    ``serve`` takes a Device instance (one front-end at a time) or a factory such as the class
    itself (a fresh device per connection). While a transport serves it, ``self.backend`` is that
    transport: a vhost-user :class:`~vhost_min.backend.Backend` (``self.backend.signal_used(q)``,
    ``self.backend.post_used(q, done)``, ``self.backend.notify_config_change()``...) or a VDUSE
    device.
    """

    device_id: int = 0              #: virtio.DeviceId
    num_queues: int = 1             #: GET_QUEUE_NUM; ring indexes 0 .. num_queues - 1
    max_queue_size: int = 1024      #: SET_VRING_NUM above this is refused
    #: Device-specific virtio feature masks. The framework adds VIRTIO_F_VERSION_1, INDIRECT_DESC,
    #: EVENT_IDX, RING_PACKED (when packed rings are available), VHOST_F_LOG_ALL and
    #: VHOST_USER_F_PROTOCOL_FEATURES; add VIRTIO_F_ACCESS_PLATFORM here to get an IOTLB.
    features: int = 0
    #: Extra ProtocolFeature bits. CONFIG, DEVICE_STATE, RARP, NET_MTU, SHARED_OBJECT and SHMEM are
    #: added by themselves when the matching hooks are overridden.
    protocol_features: int = 0
    batch_size: int = 256           #: chains per pop_batch in the default process()
    max_batches: int = 64           #: batches per process() call before other rings get a turn
    backend = None                  #: the transport serving this device now, if any
    #: Microseconds the transport's loop may busy-poll this device's rings and :meth:`poll` before
    #: it sleeps (adaptive, as QEMU's IOThread poll-max-ns: polling grows while events come
    #: within it and stops when they do not); 0 never. Worth it where an event's wake-up costs
    #: more than the wait (a disk's completion in tens of microseconds).
    poll_us: int = 0

    def __init__(self) -> None:
        self.backend = None

    # -- config space (VHOST_USER_GET_CONFIG / SET_CONFIG) ----------------------------------------
    def get_config(self, offset: int, size: int) -> bytes:
        """``size`` bytes of the device config space from ``offset``."""
        raise NotSupportedError(f"{type(self).__name__} has no config space")

    def set_config(self, offset: int, data: bytes, flags: int) -> None:
        """A config write; ``flags`` VHOST_SET_CONFIG_TYPE_MIGRATION allows read-only fields."""
        raise NotSupportedError(f"{type(self).__name__} has no writable config space")

    # -- data path ---------------------------------------------------------------------------------
    def handle(self, queue: int, readable: list[memoryview], writable: list[memoryview]) -> int:
        """One request chain: read ``readable``, fill ``writable``; return the bytes written
        (the used length; None counts as 0). Exceptions complete the chain with 0 bytes."""
        raise NotSupportedError(f"{type(self).__name__} does not handle requests")

    def process(self, queue: int, vq) -> bool | None:
        """Queue ``queue`` (started and enabled) was kicked: pop batches of chains from ``vq``
        (a split or packed device queue), :meth:`complete` them. Return True to be called again
        soon (work left over). Override for asynchronous I/O (see the module docstring: complete
        with ``self.backend.post_used``); exceptions from ``vq`` (driver bugs) break the ring,
        anything else is logged and breaks it too."""
        pop_batch, size = vq.pop_batch, self.batch_size
        for _ in range(self.max_batches):
            chains = pop_batch(size)
            if not chains:
                return False
            self.complete(queue, vq, chains)
        return True

    def watched(self) -> dict[int, Callable[[], None]]:
        """fd -> what to call (in the loop thread) when it is readable: the device's own fds for the
        transport to watch while it serves the device, asked once when serving starts (keep the
        callables stable). What the callback posts with ``post_used`` is pushed when it returns."""
        return {}

    def poll_ready(self) -> bool:
        """Loop thread, while busy-polling (``poll_us``), often: is there something :meth:`poll`
        would take? Cheap and without side effects (no system call, no lock)."""
        return False

    def poll(self) -> None:
        """After :meth:`poll_ready` said so: take what completed without waiting for a watched fd
        (post_used it; it is pushed on return)."""

    def process_disabled(self, queue: int, vq) -> bool | None:
        """Queue ``queue`` is started but disabled: the spec asks for processing "without side
        effects". The default leaves every chain in the ring until the queue is enabled; a net
        device discards TX here (``self.discard(queue, vq)``) and supplies no RX."""
        return None

    def complete(self, queue: int, vq, chains: Iterable[tuple[int, list[memoryview], list[memoryview]]]) -> None:
        """Run :meth:`handle` on each chain, push them as one batch and signal the driver if it
        wants to be. A chain whose handle() raises, or returns a bad length, is used with 0 bytes."""
        handle = self.handle
        done = []
        for head, readable, writable in chains:
            try:
                n = handle(queue, readable, writable)
                if n is None:
                    n = 0
                elif n.__class__ is not int or n < 0 or (n and n > sum(map(len, writable))):
                    raise VhostError(f"handle() returned {n!r}, not a length within the "
                                     f"{sum(map(len, writable))} writable bytes", errno.EINVAL)
            except Exception as exc:   # noqa: BLE001 (a device bug must not kill the backend)
                n = 0
                self._chain_failed(queue, head, exc)
            done.append((head, n))
        if done and vq.push_batch(done) and self.backend is not None:
            self.backend.signal_used(queue)

    def discard(self, queue: int, vq) -> None:
        """Use every available chain with 0 bytes written, without looking at it."""
        while True:
            chains = vq.pop_batch(self.batch_size)
            if not chains:
                return
            if vq.push_batch([(chain[0], 0) for chain in chains]) and self.backend is not None:
                self.backend.signal_used(queue)

    def _chain_failed(self, queue: int, head: int, exc: BaseException) -> None:
        if isinstance(exc, VhostError):
            log.warning("%s: queue %d chain %d failed, used with 0 bytes: %s: %s",
                        type(self).__name__, queue, head, type(exc).__name__, exc)
        else:
            log.error("%s: queue %d chain %d: handle() raised, used with 0 bytes", type(self).__name__, queue,
                      head, exc_info=exc)

    # -- lifecycle -------------------------------------------------------------------------------
    def started(self, queue: int) -> None:
        """Queue ``queue`` was started (first kick, or poll mode)."""

    def stopped(self, queue: int) -> None:
        """Queue ``queue`` stops, or its queue is about to be rebuilt: complete (``post_used``)
        every chain popped from it before returning; the transport pushes them, then reads the
        ring's base or rebuilds the queue."""

    def reset(self) -> None:
        """Back to the initial state (RESET_DEVICE, or the front-end went away)."""

    def features_set(self, features: int) -> None:
        """SET_FEATURES with these virtio features; raise to refuse them."""

    def set_status(self, status: int) -> None:
        """SET_STATUS: the driver's device status byte (virtio.DeviceStatus)."""

    # -- optional extensions: overriding one offers its protocol feature -------------------------
    def save_state(self, file: BinaryIO) -> None:
        """DEVICE_STATE, source side: write the device's state to ``file`` (closed afterwards)."""
        raise NotSupportedError(f"{type(self).__name__} cannot save its state")

    def load_state(self, file: BinaryIO) -> None:
        """DEVICE_STATE, destination side: read the state :meth:`save_state` wrote, up to EOF."""
        raise NotSupportedError(f"{type(self).__name__} cannot load a state")

    def send_rarp(self, mac: bytes) -> None:
        """VHOST_USER_SEND_RARP: broadcast a RARP for this 6-byte MAC (net devices)."""
        raise NotSupportedError(f"{type(self).__name__} cannot send a RARP")

    def set_mtu(self, mtu: int) -> None:
        """VHOST_USER_NET_SET_MTU (net devices); raise for an MTU that is not valid."""
        raise NotSupportedError(f"{type(self).__name__} has no MTU")

    def get_shared_object(self, uuid) -> int:
        """VHOST_USER_GET_SHARED_OBJECT: the dma-buf fd exported under ``uuid`` (still the device's)."""
        raise NotSupportedError(f"{type(self).__name__} exports no shared objects")

    def get_shmem_config(self) -> Sequence[int]:
        """VHOST_USER_GET_SHMEM_CONFIG: shared memory region sizes, indexed by shmid (0 = unused)."""
        raise NotSupportedError(f"{type(self).__name__} has no shared memory regions")


class Completions:
    """Chains an asynchronous device completed on other threads, waiting for the transport's loop
    thread (the ``post_used`` half of the contract above): :meth:`post` from any thread wakes the
    loop through :attr:`fd`, which calls :meth:`take` to push them, one batch per queue. The
    vhost-user back-end and VDUSE share it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._posted: dict[int, list[tuple[int, int]]] = {}
        self._held = False
        #: The eventfd the loop watches (-1 once closed).
        self.fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)

    def post(self, queue: int, done: Sequence[tuple[int, int]]) -> None:
        """Thread-safe: (head, bytes written) of ``queue``; ignored once closed."""
        with self._lock:
            if self.fd < 0:
                return
            self._posted.setdefault(queue, []).extend(done)
            if not self._held:
                os.eventfd_write(self.fd, 1)

    def hold(self, on: bool) -> None:
        """While held, :meth:`post` does not wake the loop: the loop thread holds it around a call
        into the device and takes what was posted right after releasing it."""
        with self._lock:
            self._held = on

    def run_held(self, callback: Callable[[], None]) -> None:
        """Run a device's fd callback (Device.watched) with :meth:`post` held: the loop thread
        takes what it posted right after, with no wake-up in between."""
        self.hold(True)
        try:
            callback()
        finally:
            self.hold(False)

    def wake(self) -> None:
        """Thread- and signal-safe: make the loop look (a stop request, say)."""
        with self._lock:
            if self.fd >= 0:
                os.eventfd_write(self.fd, 1)

    def woken(self) -> None:
        """The loop saw :attr:`fd` readable: reset it (then :meth:`take`)."""
        try:
            os.eventfd_read(self.fd)
        except OSError:
            pass

    def take(self, queue: int | None = None) -> dict[int, list[tuple[int, int]]]:
        """What was posted, for one queue or all, removed: queue -> its chains in posting order."""
        with self._lock:
            if queue is None:
                posted, self._posted = self._posted, {}
                return posted
            done = self._posted.pop(queue, None)
            return {queue: done} if done else {}

    def put_back(self, queue: int, done: list[tuple[int, int]]) -> None:
        """Return chains :meth:`take` gave, ahead of anything posted since (a push that must wait)."""
        with self._lock:
            self._posted[queue] = done + self._posted.get(queue, [])

    def clear(self) -> None:
        with self._lock:
            self._posted.clear()

    def close(self) -> None:
        with self._lock:
            self._posted.clear()
            fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)
