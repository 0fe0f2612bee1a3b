"""vDPA both ways: a vDPA device (hardware, a simulator, or a VDUSE device in userspace) behind
/dev/vhost-vdpa-N with a userspace virtio driver over it, and VDUSE, which makes this process a
vDPA device of the kernel.

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

The other direction, VDUSE (:class:`VduseDevice`, the second half of this module): vDUSE: this process is a vDPA device (linux/vduse.h). The kernel's vDPA bus sees a device whose
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
import contextlib
import ctypes
import errno
import functools
import glob
import logging
import mmap
import os
import re
import select
import selectors
import time
from collections.abc import Callable, Iterator, Sequence
from ctypes import c_char, c_int, c_uint, c_uint8, c_uint16, c_uint32, c_uint64
from typing import NamedTuple

from .device import Completions, Device
from .errors import GuestMemoryError, IoctlError, NotSupportedError, ProtocolError, VhostError, VirtqueueError
from .ioctl import (VDUSE_ACCESS_RO, VDUSE_ACCESS_RW, VDUSE_API_VERSION, VDUSE_EVENTFD_DEASSIGN, VDUSE_NAME_MAX,
                    VDUSE_REQ_RESULT_FAILED, VDUSE_REQ_RESULT_OK, VduseIoctl, VduseReqType, VhostBackendFeature,
                    VhostIoctl, VhostKernel, _fd_or_unbind, _u32, _u64, _uint, ioctl, vduse_config_data,
                    vduse_dev_config, vduse_dev_request, vduse_dev_response, vduse_iotlb_entry, vduse_vq_config,
                    vduse_vq_eventfd, vduse_vq_info, vhost_vdpa_config, vhost_vdpa_iova_range, vhost_vring_addr,
                    vhost_vring_state)
from .blk import VirtioBlkFeature
from .memory import IOTLB, PAGE_SIZE, VHOST_ACCESS_RW, GuestMemory, IOTLBMiss, address_of, map_fd
from .net import VirtioNetFeature
from .packed import PackedDeviceQueue, decode_base, encode_base
from .user import (VHOST_IOTLB_BATCH_BEGIN, VHOST_IOTLB_BATCH_END, VHOST_IOTLB_INVALIDATE, VHOST_IOTLB_UPDATE,
                   IotlbMsg, MemoryRegion, VringAddr)
from .virtio import (VHOST_F_LOG_ALL, VHOST_USER_F_PROTOCOL_FEATURES, VIRTIO_F_ACCESS_PLATFORM, VIRTIO_F_EVENT_IDX,
                     VIRTIO_F_INDIRECT_DESC, VIRTIO_F_RING_PACKED, VIRTIO_F_VERSION_1, DeviceId, DeviceStatus,
                     ring_sizes)
from .vring import SplitDeviceQueue, SplitDriverQueue

__all__ = ["VhostVdpa", "VdpaDriver", "VdpaQueue", "IovaRange", "vdpa_nodes", "VDPA_BACKEND_FEATURES",
           "VDPA_DEVICE_GLOB", "VduseDevice", "VDUSE_CONTROL", "REQUEST_SIZE", "RESPONSE_SIZE"]

#: Where vhost_vdpa creates its nodes (one per vDPA device bound to it).
VDPA_DEVICE_GLOB = "/dev/vhost-vdpa-*"
#: Backend features VhostVdpa acks by default when offered: IOTLB messages v2 (the asid field),
#: batched updates, and honoured address space ids.
VDPA_BACKEND_FEATURES = (VhostBackendFeature.VHOST_BACKEND_F_IOTLB_MSG_V2
                         | VhostBackendFeature.VHOST_BACKEND_F_IOTLB_BATCH
                         | VhostBackendFeature.VHOST_BACKEND_F_IOTLB_ASID)


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


# --------------------------------------------------------------------------------------------
# VDUSE: this process as a vDPA device of the kernel
# --------------------------------------------------------------------------------------------
log = logging.getLogger("vhost_min.vdpa")

#: The control node: VDUSE_CREATE_DEV / VDUSE_DESTROY_DEV.
VDUSE_CONTROL = "/dev/vduse/control"
#: sizeof(struct vduse_dev_request): what one read() on the device fd gives (a shorter buffer is EINVAL).
REQUEST_SIZE = ctypes.sizeof(vduse_dev_request)
#: sizeof(struct vduse_dev_response): what one write() must carry.
RESPONSE_SIZE = ctypes.sizeof(vduse_dev_response)

# Feature bits VDUSE refuses at VDUSE_CREATE_DEV ("only read-only configuration space"), by device.
_REFUSED = {DeviceId.BLOCK: int(VirtioBlkFeature.VIRTIO_BLK_F_CONFIG_WCE),
            DeviceId.NET: int(VirtioNetFeature.VIRTIO_NET_F_CTRL_VQ)}     # int: ~IntFlag keeps only its own bits
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
        self._completions = Completions()
        self._stopping = False
        self._requests_handler = self.handle_requests
        self._wake_handler = self._on_wake
        # The device's own fds (Device.watched), each callback followed by a push of what it posted.
        self._device_fds = {fd: functools.partial(self._on_device_fd, callback)
                            for fd, callback in device.watched().items()}
        self._control = -1
        self._fd = -1
        self._created = False
        self.config_size = config_size      # what VDUSE_CREATE_DEV was given (None: the device type's)
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
        self._completions.close()
        if self._fd >= 0:
            os.close(self._fd)
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
        """fd -> what to call when it is readable: the device fd, the completion wake-up, the
        device's own fds (Device.watched) and the kick eventfd of every started ring (the
        handlers are stable objects)."""
        if self.closed:
            return {}
        fds = {self._fd: self._requests_handler, self._completions.fd: self._wake_handler, **self._device_fds}
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
        self._completions.wake()

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
        self._completions.clear()

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
        self._completions.post(queue, done)

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
        self._completions.woken()
        self._push_posted()

    def _on_device_fd(self, callback: Callable[[], None]) -> None:
        """A device fd (Device.watched) is readable: the device's callback, then what it posted."""
        if self.closed:
            return
        self._completions.run_held(callback)
        self._push_posted()

    def _push_posted(self, queue: int | None = None) -> None:
        for index, done in self._completions.take(queue).items():
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
