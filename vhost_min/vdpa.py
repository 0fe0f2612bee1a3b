"""vhost-vdpa: a vDPA device (hardware, a simulator, or a VDUSE device in userspace) behind
/dev/vhost-vdpa-N, and a userspace virtio driver over it.

Read top to bottom: :class:`VhostVdpa`, the device node (every VHOST_VDPA_* ioctl as a method
named after it, DMA mapping through IOTLB messages, and the :class:`~vhost_min.dataplane.Dataplane`
messages), then :class:`VdpaDriver`, which drives one as a virtio driver does: rings in our own
memory, DMA-mapped, the status handshake, real I/O.

What differs from kernel vhost (ioctl.py), as the kernel's drivers/vhost/vdpa.c does it:

- Memory is mapped, not described: there is no memory table, every range the device may touch is
  an IOTLB UPDATE message (``struct vhost_msg_v2``) written to the fd, at an IOVA inside
  :meth:`VhostVdpa.get_iova_range`. Ring addresses (SET_VRING_ADDR) and buffer addresses in the
  descriptors are IOVAs. A simulator maps through our page tables (vdpa_sim's ``use_va``) and only
  maps shared file mappings (a memfd mapped MAP_SHARED, as memory.map_fd does); anonymous memory
  is skipped silently and the device then faults.
- The device has a status (virtio 1.3 §2.1) the driver writes: ACKNOWLEDGE, DRIVER, then features
  and FEATURES_OK (read back: the device may refuse), rings, DRIVER_OK. Bits are only ever added;
  writing 0 resets the device. Opening the node resets it too, and it opens once at a time (EBUSY).
- Config space is read and written with VHOST_VDPA_GET/SET_CONFIG, bounded by
  VHOST_VDPA_GET_CONFIG_SIZE; a range past it is refused here before the ioctl.
- No dirty log (VHOST_SET_LOG_BASE/FD) and no VHOST_RESET_OWNER: closing the fd resets the device
  and drops its mappings.

Dataplane mapping (so a VMM drives it like the other two dataplanes, as QEMU's vhost-vdpa
backend does): ``set_features`` also performs the ACKNOWLEDGE/DRIVER/FEATURES_OK handshake;
``set_mem_table`` maps each region at IOVA = its guest-physical address (one IOTLB batch); ring
addresses given to ``set_vring_addr`` are this process's, as for kernel vhost, and are translated
to those IOVAs through the table; ``set_vring_enable`` is VHOST_VDPA_SET_VRING_ENABLE; and
``start_device`` writes DRIVER_OK.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import glob
import os
import re
import select
from collections.abc import Iterator, Sequence
from ctypes import c_int, c_uint, c_uint8, c_uint16, c_uint32
from typing import NamedTuple

from .errors import IoctlError, NotSupportedError, ProtocolError, VhostError, VirtqueueError
from .ioctl import (VhostBackendFeature, VhostIoctl, VhostKernel, _fd_or_unbind, _u32, _u64, _uint, vhost_vdpa_config,
                    vhost_vdpa_iova_range, vhost_vring_addr, vhost_vring_state)
from .memory import VHOST_ACCESS_RW, GuestMemory, address_of
from .user import (VHOST_IOTLB_BATCH_BEGIN, VHOST_IOTLB_BATCH_END, VHOST_IOTLB_INVALIDATE, VHOST_IOTLB_UPDATE,
                   IotlbMsg, MemoryRegion, VringAddr)
from .virtio import VIRTIO_F_ACCESS_PLATFORM, VIRTIO_F_VERSION_1, DeviceStatus
from .vring import SplitDriverQueue

__all__ = ["VhostVdpa", "VdpaDriver", "VdpaQueue", "IovaRange", "vdpa_nodes", "VDPA_BACKEND_FEATURES",
           "VDPA_DEVICE_GLOB"]

#: Where vhost_vdpa creates its nodes (one per vDPA device bound to it).
VDPA_DEVICE_GLOB = "/dev/vhost-vdpa-*"
#: Backend features VhostVdpa acks by default when offered: IOTLB messages v2 (the asid field),
#: batched updates, and honoured address space ids.
VDPA_BACKEND_FEATURES = (VhostBackendFeature.VHOST_BACKEND_F_IOTLB_MSG_V2
                         | VhostBackendFeature.VHOST_BACKEND_F_IOTLB_BATCH
                         | VhostBackendFeature.VHOST_BACKEND_F_IOTLB_ASID)
#: VdpaDriver maps whole pages (the kernel pins and maps page by page).
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


class IovaRange(NamedTuple):
    """VHOST_VDPA_GET_IOVA_RANGE: the device maps IOVAs ``first`` to ``last``, both included."""

    first: int
    last: int

    def contains(self, iova: int, size: int) -> bool:
        return size > 0 and self.first <= iova and iova + size - 1 <= self.last


def vdpa_nodes(pattern: str = VDPA_DEVICE_GLOB) -> list[str]:
    """The vhost-vdpa device nodes present, in numeric order (vhost-vdpa-2 before vhost-vdpa-10)."""
    def number(path: str) -> tuple[int, str]:
        m = re.search(r"(\d+)$", path)
        return (int(m.group(1)) if m else -1, path)
    return sorted(glob.glob(pattern), key=number)


class VhostVdpa(VhostKernel):
    """/dev/vhost-vdpa-N: the vhost ioctls vDPA shares with kernel vhost (owner, features,
    backend features, per-ring num/addr/base/kick/call/err), the VHOST_VDPA_* ones, and DMA
    mapping with IOTLB messages. Owns its fd like every VhostKernel; the kernel resets the device
    and drops every mapping when it is closed."""

    DEVICE = ""             # no default: name the node (vdpa_nodes() lists them)
    MODULE = "vhost_vdpa"

    def __init__(self, path: str | None = None, *, fd: int | None = None) -> None:
        super().__init__(path, fd=fd)
        self._config_size: int | None = None
        self._in_batch: int | None = None           # the asid of the open IOTLB batch
        self._table: list[MemoryRegion] = []        # set_mem_table's regions, mapped at their gpa

    # -- small ioctl shapes -------------------------------------------------------------------------
    def _get(self, request: VhostIoctl, ctype: type) -> int:
        value = ctype()
        self._ioctl(request, value)
        return value.value

    # -- device --------------------------------------------------------------------------------------
    def get_device_id(self) -> int:
        """VHOST_VDPA_GET_DEVICE_ID: the virtio device id (DeviceId: 1 net, 2 block...)."""
        return self._get(VhostIoctl.VHOST_VDPA_GET_DEVICE_ID, c_uint32)

    def get_status(self) -> DeviceStatus:
        """VHOST_VDPA_GET_STATUS: the device status byte."""
        return DeviceStatus(self._get(VhostIoctl.VHOST_VDPA_GET_STATUS, c_uint8))

    def set_status(self, status: int) -> None:
        """VHOST_VDPA_SET_STATUS: write the status. Bits may only be added (EINVAL otherwise); 0
        resets the device (rings, features; mappings too unless IOTLB_PERSIST was acked)."""
        self._ioctl(VhostIoctl.VHOST_VDPA_SET_STATUS, c_uint8(_uint(int(status), 8, "device status")))

    def add_status(self, bits: int) -> DeviceStatus:
        """Write the status with ``bits`` added and return what the device then reports."""
        self.set_status(self.get_status() | bits)
        return self.get_status()

    def reset(self) -> None:
        """Reset the device: status 0 (virtio 1.3 §2.1.2)."""
        self.set_status(0)

    def get_config_size(self) -> int:
        """VHOST_VDPA_GET_CONFIG_SIZE: bytes of config space (asked once, then remembered)."""
        if self._config_size is None:
            self._config_size = self._get(VhostIoctl.VHOST_VDPA_GET_CONFIG_SIZE, c_uint32)
        return self._config_size

    def _config_range(self, request: VhostIoctl, offset: int, size: int) -> None:
        """Refuse a config range the kernel would refuse (EINVAL), saying why, before the ioctl."""
        _u32(offset, "config offset")
        _u32(size, "config size")
        total = self.get_config_size()
        if size == 0 or offset + size > total:
            raise IoctlError(f"{request.name} of {size} bytes at offset {offset} refused before the ioctl: "
                             f"{self.path} has {total} bytes of config space", errno.EINVAL, ioctl=request.name)

    def get_config(self, offset: int = 0, size: int | None = None) -> bytes:
        """VHOST_VDPA_GET_CONFIG: ``size`` bytes of config space at ``offset`` (default: to its end)."""
        if size is None:
            size = self.get_config_size() - offset
        self._config_range(VhostIoctl.VHOST_VDPA_GET_CONFIG, offset, size)
        buf = (c_uint8 * (ctypes.sizeof(vhost_vdpa_config) + size))()
        header = vhost_vdpa_config.from_buffer(buf)
        header.off, header.len = offset, size
        self._ioctl(VhostIoctl.VHOST_VDPA_GET_CONFIG, buf)
        return bytes(buf[ctypes.sizeof(vhost_vdpa_config):])

    def set_config(self, offset: int, data: bytes) -> None:
        """VHOST_VDPA_SET_CONFIG: write ``data`` into config space at ``offset``."""
        self._config_range(VhostIoctl.VHOST_VDPA_SET_CONFIG, offset, len(data))
        buf = (c_uint8 * (ctypes.sizeof(vhost_vdpa_config) + len(data)))()
        header = vhost_vdpa_config.from_buffer(buf)
        header.off, header.len = offset, len(data)
        buf[ctypes.sizeof(vhost_vdpa_config):] = bytes(data)
        self._ioctl(VhostIoctl.VHOST_VDPA_SET_CONFIG, buf)

    def set_config_call(self, fd: int | None) -> None:
        """VHOST_VDPA_SET_CONFIG_CALL: an eventfd the kernel signals on a config change (None: none)."""
        self._ioctl(VhostIoctl.VHOST_VDPA_SET_CONFIG_CALL, c_int(_fd_or_unbind(fd, "VHOST_VDPA_SET_CONFIG_CALL")))

    def get_iova_range(self) -> IovaRange:
        """VHOST_VDPA_GET_IOVA_RANGE: the IOVAs the device can map."""
        r = vhost_vdpa_iova_range()
        self._ioctl(VhostIoctl.VHOST_VDPA_GET_IOVA_RANGE, r)
        return IovaRange(r.first, r.last)

    def get_vqs_count(self) -> int:
        """VHOST_VDPA_GET_VQS_COUNT: how many virtqueues the device has (net: RX, TX, control)."""
        return self._get(VhostIoctl.VHOST_VDPA_GET_VQS_COUNT, c_uint32)

    def get_group_num(self) -> int:
        """VHOST_VDPA_GET_GROUP_NUM: how many virtqueue groups (sets of rings mapped together)."""
        return self._get(VhostIoctl.VHOST_VDPA_GET_GROUP_NUM, c_uint32)

    def get_as_num(self) -> int:
        """VHOST_VDPA_GET_AS_NUM: how many address spaces (asids 0..n-1) the device has."""
        return self._get(VhostIoctl.VHOST_VDPA_GET_AS_NUM, c_uint)

    def suspend(self) -> None:
        """VHOST_VDPA_SUSPEND: the device stops processing rings (state kept; backend feature SUSPEND)."""
        self._ioctl(VhostIoctl.VHOST_VDPA_SUSPEND)

    def resume(self) -> None:
        """VHOST_VDPA_RESUME: processing continues where suspend stopped it (backend feature RESUME)."""
        self._ioctl(VhostIoctl.VHOST_VDPA_RESUME)

    # -- rings -------------------------------------------------------------------------------------
    def get_vring_num(self) -> int:
        """VHOST_VDPA_GET_VRING_NUM: the largest ring size the device takes (every ring)."""
        return self._get(VhostIoctl.VHOST_VDPA_GET_VRING_NUM, c_uint16)

    def get_vring_size(self, index: int) -> int:
        """VHOST_VDPA_GET_VRING_SIZE: the largest size of ring ``index`` (newer kernels)."""
        return self._vring_state(VhostIoctl.VHOST_VDPA_GET_VRING_SIZE, index)

    def get_vring_group(self, index: int) -> int:
        """VHOST_VDPA_GET_VRING_GROUP: the group ring ``index`` belongs to."""
        return self._vring_state(VhostIoctl.VHOST_VDPA_GET_VRING_GROUP, index)

    def get_vring_desc_group(self, index: int) -> int:
        """VHOST_VDPA_GET_VRING_DESC_GROUP: the group of ring ``index``'s descriptor table
        (backend feature DESC_ASID; EOPNOTSUPP from devices without one)."""
        return self._vring_state(VhostIoctl.VHOST_VDPA_GET_VRING_DESC_GROUP, index)

    def set_group_asid(self, group: int, asid: int) -> None:
        """VHOST_VDPA_SET_GROUP_ASID: the rings of ``group`` translate through address space ``asid``."""
        self._ioctl(VhostIoctl.VHOST_VDPA_SET_GROUP_ASID,
                    vhost_vring_state(_u32(group, "vring group"), _u32(asid, "asid")))

    def set_vring_enable(self, index: int, enable: bool) -> None:
        """VHOST_VDPA_SET_VRING_ENABLE: ring ``index`` ready (or not). Before DRIVER_OK, unless
        the backend feature ENABLE_AFTER_DRIVER_OK says the device also takes it after."""
        self._vring_state(VhostIoctl.VHOST_VDPA_SET_VRING_ENABLE, index, 1 if enable else 0)

    def set_vring_addr_iova(self, addr: VringAddr) -> None:
        """VHOST_SET_VRING_ADDR with the ring parts' IOVAs, as the device sees them."""
        index, flags, desc, used, avail, log = addr
        self._ioctl(VhostIoctl.VHOST_SET_VRING_ADDR, vhost_vring_addr(
            _u32(index, "vring index"), _u32(flags, "vring address flags"), _u64(desc, "desc IOVA"),
            _u64(used, "used IOVA"), _u64(avail, "avail IOVA"), _u64(log, "log_guest_addr")))

    # -- DMA mapping (IOTLB messages) --------------------------------------------------------------
    def ack_backend_features(self, wanted: int = VDPA_BACKEND_FEATURES) -> VhostBackendFeature:
        """GET_BACKEND_FEATURES, then SET_BACKEND_FEATURES with the ``wanted`` ones offered;
        returns what was acked. Before SET_OWNER and any mapping (the message format follows)."""
        acked = self.get_backend_features() & wanted
        self.set_backend_features(int(acked))
        return VhostBackendFeature(acked)

    @property
    def backend_features(self) -> VhostBackendFeature:
        """The backend features acked on this fd (0 until set_backend_features)."""
        return VhostBackendFeature(self._acked_backend_features)

    @property
    def batching(self) -> bool:
        """True when VHOST_BACKEND_F_IOTLB_BATCH was acked: updates go out in BEGIN/END batches."""
        return bool(self._acked_backend_features & VhostBackendFeature.VHOST_BACKEND_F_IOTLB_BATCH)

    def _check_asid(self, asid: int) -> int:
        if asid and not self._acked_backend_features & VhostBackendFeature.VHOST_BACKEND_F_IOTLB_ASID:
            raise VhostError(f"asid {asid} needs VHOST_BACKEND_F_IOTLB_ASID acked (ack_backend_features): "
                             f"without it the kernel maps into address space 0", errno.EINVAL)
        if self._in_batch is not None and asid != self._in_batch:
            raise VhostError(f"asid {asid} inside an IOTLB batch for asid {self._in_batch}: the kernel refuses "
                             f"a batch that mixes address spaces", errno.EINVAL)
        return _u32(asid, "asid")

    @contextlib.contextmanager
    def iotlb_batch(self, asid: int = 0) -> Iterator[None]:
        """Group the maps and unmaps inside into one batch: VHOST_IOTLB_BATCH_BEGIN before, END
        after (the device applies the whole table once, at END), when IOTLB_BATCH was acked;
        plain messages otherwise. Nested batches join the outer one."""
        if self._in_batch is not None or not self.batching:
            self._check_asid(asid)
            yield
            return
        self._check_asid(asid)
        self.send_iotlb_msg(IotlbMsg(0, 0, 0, 0, VHOST_IOTLB_BATCH_BEGIN), asid=asid)
        self._in_batch = asid
        try:
            yield
        finally:
            self._in_batch = None
            self.send_iotlb_msg(IotlbMsg(0, 0, 0, 0, VHOST_IOTLB_BATCH_END), asid=asid)

    def dma_map(self, iova: int, size: int, uaddr: int, perm: int = VHOST_ACCESS_RW, *, asid: int = 0) -> None:
        """VHOST_IOTLB_UPDATE: the device may access ``size`` bytes at ``iova``, which are ours at
        ``uaddr`` (VHOST_ACCESS_RO/WO/RW). The kernel refuses ranges outside the IOVA range and
        overlaps with an existing mapping (EINVAL, EEXIST)."""
        self.send_iotlb_msg(IotlbMsg(_u64(iova, "IOVA"), _u64(size, "map size"), _u64(uaddr, "map uaddr"), perm,
                                     VHOST_IOTLB_UPDATE), asid=self._check_asid(asid))

    def dma_unmap(self, iova: int, size: int, *, asid: int = 0) -> None:
        """VHOST_IOTLB_INVALIDATE: forget every mapping inside ``size`` bytes at ``iova``."""
        self.send_iotlb_msg(IotlbMsg(_u64(iova, "IOVA"), _u64(size, "unmap size"), 0, 0, VHOST_IOTLB_INVALIDATE),
                            asid=self._check_asid(asid))

    # -- the Dataplane messages that differ from kernel vhost ----------------------------------------
    def set_features(self, features: int) -> None:
        """VHOST_SET_FEATURES inside the status handshake: ACKNOWLEDGE and DRIVER first (if not
        yet set), then the features, then FEATURES_OK, read back: a device that refuses the
        features leaves it clear, and this raises ProtocolError."""
        driver = DeviceStatus.ACKNOWLEDGE | DeviceStatus.DRIVER
        status = self.get_status()
        for bit in (DeviceStatus.ACKNOWLEDGE, DeviceStatus.DRIVER):
            if not status & bit:
                status = self.add_status(bit)
        if status & driver != driver:
            raise ProtocolError(f"{self.path} did not take ACKNOWLEDGE|DRIVER (status {int(status):#x})")
        super().set_features(features)
        status = self.add_status(DeviceStatus.FEATURES_OK)
        if not status & DeviceStatus.FEATURES_OK:
            raise ProtocolError(f"{self.path} refused features {features:#x}: FEATURES_OK did not stay set "
                                f"(status {int(status):#x})")

    def set_mem_table(self, regions: Sequence[MemoryRegion], fds: Sequence[int] = ()) -> None:
        """Map each region at IOVA = its guest-physical address (``userspace_addr`` is ours), in
        one IOTLB batch, after unmapping the previous table. ``fds`` are vhost-user's: unused."""
        table = [MemoryRegion(*tuple(r)[:4]) for r in regions]
        iova_range = self.get_iova_range()
        for r in table:
            if not iova_range.contains(r.guest_phys_addr, r.memory_size):
                raise VhostError(f"memory region at {r.guest_phys_addr:#x} of {r.memory_size:#x} bytes is outside "
                                 f"the device's IOVA range {iova_range.first:#x}-{iova_range.last:#x}", errno.EINVAL)
        with self.iotlb_batch():
            for old in self._table:
                self.dma_unmap(old.guest_phys_addr, old.memory_size)
            self._table = []
            for r in table:
                self.dma_map(r.guest_phys_addr, r.memory_size, r.userspace_addr)
                self._table.append(r)

    def _iova_of(self, uaddr: int, what: str) -> int:
        for r in self._table:
            if r.userspace_addr <= uaddr < r.userspace_addr + r.memory_size:
                return r.guest_phys_addr + uaddr - r.userspace_addr
        raise VhostError(f"{what} {uaddr:#x} is in no region of the memory table (set_mem_table first, or give "
                         f"IOVAs to set_vring_addr_iova)", errno.EFAULT)

    def set_vring_addr(self, addr: VringAddr) -> None:
        """VHOST_SET_VRING_ADDR from this process's addresses (as kernel vhost takes them),
        translated to IOVAs through the table of :meth:`set_mem_table`."""
        index, flags, desc, used, avail, log = addr
        self.set_vring_addr_iova(VringAddr(index, flags, self._iova_of(desc, "descriptor table address"),
                                           self._iova_of(used, "used ring address"),
                                           self._iova_of(avail, "available ring address"), log))

    def start_device(self) -> None:
        """DRIVER_OK (VHOST_VDPA_SET_STATUS), read back: the device runs its enabled rings."""
        status = self.add_status(DeviceStatus.DRIVER_OK)
        if not status & DeviceStatus.DRIVER_OK or status & (DeviceStatus.DEVICE_NEEDS_RESET | DeviceStatus.FAILED):
            raise ProtocolError(f"{self.path} did not start: status {int(status):#x} after DRIVER_OK")

    def reset_owner(self) -> None:
        """Not a vhost-vdpa ioctl: close the device (or :meth:`reset` it) instead."""
        raise NotSupportedError("vhost-vdpa has no VHOST_RESET_OWNER: reset() the device or close it")

    def set_log_base(self, fd: int, mmap_size: int, mmap_offset: int = 0) -> None:
        """Not a vhost-vdpa ioctl (the kernel answers ENOTTY): a vDPA device keeps no vhost dirty log."""
        raise NotSupportedError("vhost-vdpa has no dirty log (VHOST_SET_LOG_BASE)")

    def set_log_base_address(self, address: int) -> None:
        """Not a vhost-vdpa ioctl, as set_log_base."""
        raise NotSupportedError("vhost-vdpa has no dirty log (VHOST_SET_LOG_BASE)")

    def set_log_fd(self, fd: int | None) -> None:
        """Not a vhost-vdpa ioctl (the kernel answers ENOTTY)."""
        raise NotSupportedError("vhost-vdpa has no dirty log (VHOST_SET_LOG_FD)")


# --------------------------------------------------------------------------------------------
# A userspace virtio driver over vhost-vdpa
# --------------------------------------------------------------------------------------------

class VdpaQueue(NamedTuple):
    """One ring of a :class:`VdpaDriver`: its index, our driver side, and its eventfds."""

    index: int
    ring: SplitDriverQueue
    kick_fd: int
    call_fd: int

    def kick(self) -> None:
        """Tell the device there is work (the kick eventfd; vhost-vdpa forwards it to kick_vq)."""
        os.eventfd_write(self.kick_fd, 1)

    def wait(self, timeout: float) -> list[tuple[object, int]]:
        """What the device used, as (token, written length), waiting up to ``timeout`` seconds on
        the call eventfd; raises TimeoutError when nothing comes."""
        while True:
            used = self.ring.reap()
            if used:
                return used
            if not select.select([self.call_fd], [], [], timeout)[0]:
                raise TimeoutError(f"ring {self.index}: nothing used within {timeout} s")
            with contextlib.suppress(BlockingIOError):
                os.eventfd_read(self.call_fd)


class VdpaDriver:
    """A virtio driver in this process for the device behind a :class:`VhostVdpa`: split rings
    (vring.SplitDriverQueue) in a memfd of ``memory_size`` bytes mapped here and DMA-mapped at the
    start of the device's IOVA range (so descriptor addresses are IOVAs), the status handshake
    ACKNOWLEDGE, DRIVER, FEATURES_OK (checked back), DRIVER_OK, one kick and one call eventfd per
    ring. ``features`` are the ones wanted (taken if offered; VIRTIO_F_VERSION_1 is required, and
    ACCESS_PLATFORM is taken when offered: every address here is an IOVA). ``queues`` are the ring
    indices to set up. ``close()`` resets the device, unmaps, and closes what it opened.

    Give a path (opened and closed here) or an open VhostVdpa (left open; it must be fresh: no
    owner, backend features not yet set)."""

    def __init__(self, device: VhostVdpa | str, features: int, queues: Sequence[int], *, queue_size: int = 256,
                 memory_size: int = 1 << 20, timeout: float = 10.0) -> None:
        self.timeout = timeout
        self._fds: list[int] = []
        self._owns_device = not isinstance(device, VhostVdpa)
        self.device = VhostVdpa(device) if self._owns_device else device
        self.memory: GuestMemory | None = None
        self.mapped: tuple[int, int] | None = None
        self.queues: dict[int, VdpaQueue] = {}
        try:
            self._bring_up(features, queues, queue_size, memory_size)
        except BaseException:
            self.close()
            raise

    def _bring_up(self, wanted: int, queues: Sequence[int], queue_size: int, memory_size: int) -> None:
        dev = self.device
        self.backend_features = dev.ack_backend_features()
        dev.set_owner()
        dev.reset()
        dev.add_status(DeviceStatus.ACKNOWLEDGE)
        dev.add_status(DeviceStatus.DRIVER)
        self.device_id = dev.get_device_id()
        self.offered = dev.get_features()
        if not self.offered & VIRTIO_F_VERSION_1:
            raise NotSupportedError(f"{dev.path} does not offer VIRTIO_F_VERSION_1 (legacy devices are not driven)")
        self.features = self.offered & (wanted | VIRTIO_F_VERSION_1 | VIRTIO_F_ACCESS_PLATFORM)
        dev.set_features(self.features)            # FEATURES_OK, checked back

        # Our memory, mapped at the first page-aligned IOVA the device takes.
        self.iova_range = dev.get_iova_range()
        base = -(-self.iova_range.first // PAGE_SIZE) * PAGE_SIZE
        size = -(-memory_size // PAGE_SIZE) * PAGE_SIZE
        if not self.iova_range.contains(base, size):
            raise VhostError(f"{size:#x} bytes at IOVA {base:#x} do not fit the device's IOVA range "
                             f"{self.iova_range.first:#x}-{self.iova_range.last:#x}", errno.ENOSPC)
        fd = os.memfd_create("vhost-min-vdpa", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, size)
            self.memory = GuestMemory()
            region = self.memory.add_region(base, size, fd=fd)
        finally:
            os.close(fd)
        with dev.iotlb_batch():
            dev.dma_map(base, size, address_of(region.view))
        self.mapped = (base, size)
        self._next = base

        # Rings: size, IOVAs, base, kick and call; then enabled, then DRIVER_OK.
        self.queue_size = min(queue_size, dev.get_vring_num())
        for index in queues:
            parts = SplitDriverQueue.layout(self.queue_size, self.alloc(
                SplitDriverQueue.layout(self.queue_size, 0)["end"], PAGE_SIZE))
            ring = SplitDriverQueue(self.memory, self.queue_size, parts["desc"], parts["driver"], parts["device"])
            kick, call = self._eventfd(), self._eventfd()
            dev.set_vring_num(index, self.queue_size)
            dev.set_vring_addr_iova(VringAddr(index, 0, parts["desc"], parts["device"], parts["driver"], 0))
            dev.set_vring_base(index, 0)
            dev.set_vring_kick(index, kick)
            dev.set_vring_call(index, call)
            self.queues[index] = VdpaQueue(index, ring, kick, call)
        for index in queues:
            dev.set_vring_enable(index, True)
        dev.start_device()

    def _eventfd(self) -> int:
        fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._fds.append(fd)
        return fd

    def alloc(self, size: int, align: int = 16) -> int:
        """``size`` bytes of our DMA-mapped memory (an IOVA; never freed before close)."""
        start = -(-self._next // align) * align
        base, total = self.mapped
        if size <= 0 or start + size > base + total:
            raise VhostError(f"no room for {size} more bytes in the driver's {total:#x}-byte memory", errno.ENOMEM)
        self._next = start + size
        return start

    def config(self, offset: int = 0, size: int | None = None) -> bytes:
        """The device's config space (VHOST_VDPA_GET_CONFIG), by default all of it."""
        return self.device.get_config(offset, size)

    def request(self, index: int, out: Sequence[bytes], in_sizes: Sequence[int] = ()) -> tuple[int, list[bytes]]:
        """One chain on ring ``index``: ``out`` buffers the device reads, then buffers of
        ``in_sizes`` it writes; kick, wait for it to be used. Returns (used length, the written
        buffers' bytes). The buffers are taken from :meth:`alloc`'s memory for the request only
        (copied in and out), so requests do not use memory up; not for rings with other chains in
        flight (their completions would be taken here)."""
        q = self.queues[index]
        mark = self._next
        readable = []
        for data in out:
            iova = self.alloc(len(data))
            self.memory.write(iova, data)
            readable.append((iova, len(data)))
        writable = [(self.alloc(n), n) for n in in_sizes]
        token = object()
        q.ring.add(readable, writable, token)
        if q.ring.publish():
            q.kick()
        used = q.wait(self.timeout)      # on a timeout the buffers stay allocated: the device may still write
        if [t for t, _ in used] != [token]:
            raise VirtqueueError(f"ring {index}: expected our one chain back, got {len(used)} used entries")
        result = used[0][1], [self.memory.read(iova, n) for iova, n in writable]
        self._next = mark                # the device is done with them
        return result

    def close(self) -> None:
        """Reset the device (status 0: rings stopped), unmap our memory, close the eventfds, the
        memory and (if opened here) the device."""
        dev = self.device
        if dev is not None and not dev.closed:
            with contextlib.suppress(OSError):
                dev.reset()
            if self.mapped is not None:
                with contextlib.suppress(OSError):
                    dev.dma_unmap(*self.mapped)
            if self._owns_device:
                dev.close()
        self.mapped = None
        for fd in self._fds:
            os.close(fd)
        self._fds = []
        if self.memory is not None:
            self.memory.clear()
            self.memory = None

    def __enter__(self) -> VdpaDriver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
