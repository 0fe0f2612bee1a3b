"""virtio-vsock (virtio 1.3 §5.10; linux/virtio_vsock.h): feature bits, the config space, and the
header of every packet on its rx and tx queues."""

from __future__ import annotations

import enum
import struct

__all__ = ["VirtioVsockFeature", "VIRTIO_VSOCK_CONFIG", "VMADDR_CID_HOST"]


class VirtioVsockFeature(enum.IntFlag):
    """virtio-vsock feature bits (virtio 1.3 §5.10.3)."""

    VIRTIO_VSOCK_F_STREAM = 1 << 0
    VIRTIO_VSOCK_F_SEQPACKET = 1 << 1
    VIRTIO_VSOCK_F_NO_IMPLIED_STREAM = 1 << 2


#: struct virtio_vsock_config: {le64 guest_cid}
VIRTIO_VSOCK_CONFIG = struct.Struct("<Q")
#: The host's context id (linux/vm_sockets.h): the peer a guest connects to.
VMADDR_CID_HOST = 2
