"""Virtio facts every dataplane shares: feature bits, device status, device ids, ring flags.

Names are the virtio spec's and Linux uapi's (``VIRTQ_DESC_F_NEXT``, ``VIRTIO_F_EVENT_IDX``),
so grep finds the definition; each fact is defined here once and imported everywhere else.
Feature constants are masks (``1 << bit``), unlike the C headers' bit numbers, so that
``features & VIRTIO_F_EVENT_IDX`` reads as it should.
"""

from __future__ import annotations

import enum


class VirtioFeature(enum.IntFlag):
    """Device-independent feature bits (virtio 1.3 §6 "Reserved Feature Bits") and vhost's own."""

    VIRTIO_F_NOTIFY_ON_EMPTY = 1 << 24      # legacy
    VIRTIO_F_ANY_LAYOUT = 1 << 27           # legacy
    VIRTIO_F_INDIRECT_DESC = 1 << 28        # VIRTIO_RING_F_INDIRECT_DESC
    VIRTIO_F_EVENT_IDX = 1 << 29            # VIRTIO_RING_F_EVENT_IDX
    VHOST_USER_F_PROTOCOL_FEATURES = 1 << 30  # vhost-user's meaning of the legacy bit 30 (UNUSED)
    VIRTIO_F_VERSION_1 = 1 << 32
    VIRTIO_F_ACCESS_PLATFORM = 1 << 33      # was VIRTIO_F_IOMMU_PLATFORM
    VIRTIO_F_RING_PACKED = 1 << 34
    VIRTIO_F_IN_ORDER = 1 << 35
    VIRTIO_F_ORDER_PLATFORM = 1 << 36
    VIRTIO_F_SR_IOV = 1 << 37
    VIRTIO_F_NOTIFICATION_DATA = 1 << 38
    VIRTIO_F_NOTIF_CONFIG_DATA = 1 << 39
    VIRTIO_F_RING_RESET = 1 << 40
    VIRTIO_F_ADMIN_VQ = 1 << 41


# vhost's use of two device-specific bits (linux/vhost_types.h); not virtio features.
VHOST_F_LOG_ALL = 1 << 26
VHOST_NET_F_VIRTIO_NET_HDR = 1 << 27
#: struct vhost_vring_addr flags bit 0 (linux/vhost_types.h): log used-ring writes at log_guest_addr.
VHOST_VRING_F_LOG = 1 << 0

VHOST_USER_F_PROTOCOL_FEATURES = VirtioFeature.VHOST_USER_F_PROTOCOL_FEATURES
VIRTIO_F_INDIRECT_DESC = VirtioFeature.VIRTIO_F_INDIRECT_DESC
VIRTIO_F_EVENT_IDX = VirtioFeature.VIRTIO_F_EVENT_IDX
VIRTIO_F_VERSION_1 = VirtioFeature.VIRTIO_F_VERSION_1
VIRTIO_F_ACCESS_PLATFORM = VirtioFeature.VIRTIO_F_ACCESS_PLATFORM
VIRTIO_F_RING_PACKED = VirtioFeature.VIRTIO_F_RING_PACKED
VIRTIO_F_IN_ORDER = VirtioFeature.VIRTIO_F_IN_ORDER


class DeviceStatus(enum.IntFlag):
    """The device status field (virtio 1.3 §2.1)."""

    ACKNOWLEDGE = 1
    DRIVER = 2
    DRIVER_OK = 4
    FEATURES_OK = 8
    SUSPEND = 16          # virtio 1.4
    DEVICE_NEEDS_RESET = 64
    FAILED = 128


class DeviceId(enum.IntEnum):
    """Virtio device ids (virtio 1.3 §5), for the devices vhost_min knows by name."""

    NET = 1
    BLOCK = 2
    CONSOLE = 3
    RNG = 4
    SCSI = 8
    GPU = 16
    INPUT = 18
    VSOCK = 19
    FS = 26
    GPIO = 41


# Split and packed descriptor flags (virtio 1.3 §2.7.5, §2.8; linux/virtio_ring.h).
VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_DESC_F_INDIRECT = 4
VIRTQ_DESC_F_AVAIL = 1 << 7     # packed only
VIRTQ_DESC_F_USED = 1 << 15     # packed only

# Split ring notification suppression flags.
VIRTQ_AVAIL_F_NO_INTERRUPT = 1
VIRTQ_USED_F_NO_NOTIFY = 1

# Packed ring event suppression (struct pvirtq_event_suppress flags).
RING_EVENT_FLAGS_ENABLE = 0
RING_EVENT_FLAGS_DISABLE = 1
RING_EVENT_FLAGS_DESC = 2
# pvirtq_event_suppress.desc: the offset in bits 0-14, the wrap counter in this bit
# (desc_event_wrap; linux/virtio_ring.h VRING_PACKED_EVENT_F_WRAP_CTR).
VRING_PACKED_EVENT_F_WRAP_CTR = 15

VIRTQ_DESC_SIZE = 16            # both split (virtq_desc) and packed (pvirtq_desc) descriptors
VIRTQ_MAX_SIZE = 32768          # largest queue size the spec allows

# Alignment the spec requires of each ring part (split: desc 16, avail 2, used 4; packed: 16, 4, 4).
SPLIT_DESC_ALIGN, SPLIT_AVAIL_ALIGN, SPLIT_USED_ALIGN = 16, 2, 4
PACKED_DESC_ALIGN, PACKED_EVENT_ALIGN = 16, 4


def split_ring_sizes(queue_size: int, event_idx: bool = True) -> tuple[int, int, int]:
    """Bytes of the split ring's descriptor table, avail ring and used ring. Without
    VIRTIO_F_EVENT_IDX the rings end before their used_event / avail_event words, 2 bytes shorter,
    and only those bytes need to lie inside guest memory."""
    tail = 0 if event_idx else 2
    return 16 * queue_size, 6 + 2 * queue_size - tail, 6 + 8 * queue_size - tail


def packed_ring_sizes(queue_size: int) -> tuple[int, int, int]:
    """Bytes of the packed ring's descriptor ring, driver and device event suppression areas."""
    return 16 * queue_size, 4, 4


def ring_sizes(queue_size: int, *, packed: bool, event_idx: bool) -> tuple[int, int, int]:
    """Bytes of the three ring parts (descriptors, driver area, device area) of either format."""
    return packed_ring_sizes(queue_size) if packed else split_ring_sizes(queue_size, event_idx)


#: The ring parts' names, in (descriptors, driver area, device area) order, for messages.
SPLIT_PART_NAMES = ("descriptor table", "available ring", "used ring")
PACKED_PART_NAMES = ("descriptor ring", "driver area", "device area")


def misaligned_ring_part(desc: int, driver: int, device: int, *, packed: bool) -> str | None:
    """Why the ring parts' addresses break the spec's alignment (virtio 1.3 §2.7 and §2.8), or
    None: the one check every ring user makes, each raising its own error type with this text."""
    aligns = ((PACKED_DESC_ALIGN, PACKED_EVENT_ALIGN, PACKED_EVENT_ALIGN) if packed
              else (SPLIT_DESC_ALIGN, SPLIT_AVAIL_ALIGN, SPLIT_USED_ALIGN))
    for what, addr, align in zip(PACKED_PART_NAMES if packed else SPLIT_PART_NAMES, (desc, driver, device), aligns):
        if not isinstance(addr, int) or addr < 0 or addr % align:
            shown = f"{addr:#x}" if isinstance(addr, int) else repr(addr)
            return f"{'packed ' if packed else ''}{what} address {shown} is not {align}-byte aligned"
    return None


def vring_need_event(event_idx: int, new_idx: int, old_idx: int) -> bool:
    """The spec's notification test with EVENT_IDX: notify iff event is in [old, new) mod 2^16."""
    return ((new_idx - event_idx - 1) & 0xFFFF) < ((new_idx - old_idx) & 0xFFFF)
