"""virtio-net (virtio 1.3 §5.1; linux/virtio_net.h): feature bits, status bits, the config space
and the header in front of every frame. The home of the net device as it grows."""

from __future__ import annotations

import enum
import struct

__all__ = ["VirtioNetFeature", "VIRTIO_NET_S_LINK_UP", "VIRTIO_NET_S_ANNOUNCE", "VIRTIO_NET_CONFIG",
           "VIRTIO_NET_HDR", "VIRTIO_NET_HDR_MRG_RXBUF"]


class VirtioNetFeature(enum.IntFlag):
    """virtio-net feature bits (virtio 1.3 §5.1.3), as masks."""

    VIRTIO_NET_F_CSUM = 1 << 0
    VIRTIO_NET_F_GUEST_CSUM = 1 << 1
    VIRTIO_NET_F_CTRL_GUEST_OFFLOADS = 1 << 2
    VIRTIO_NET_F_MTU = 1 << 3
    VIRTIO_NET_F_MAC = 1 << 5
    VIRTIO_NET_F_GSO = 1 << 6               # legacy
    VIRTIO_NET_F_GUEST_TSO4 = 1 << 7
    VIRTIO_NET_F_GUEST_TSO6 = 1 << 8
    VIRTIO_NET_F_GUEST_ECN = 1 << 9
    VIRTIO_NET_F_GUEST_UFO = 1 << 10
    VIRTIO_NET_F_HOST_TSO4 = 1 << 11
    VIRTIO_NET_F_HOST_TSO6 = 1 << 12
    VIRTIO_NET_F_HOST_ECN = 1 << 13
    VIRTIO_NET_F_HOST_UFO = 1 << 14
    VIRTIO_NET_F_MRG_RXBUF = 1 << 15
    VIRTIO_NET_F_STATUS = 1 << 16
    VIRTIO_NET_F_CTRL_VQ = 1 << 17
    VIRTIO_NET_F_CTRL_RX = 1 << 18
    VIRTIO_NET_F_CTRL_VLAN = 1 << 19
    VIRTIO_NET_F_CTRL_RX_EXTRA = 1 << 20
    VIRTIO_NET_F_GUEST_ANNOUNCE = 1 << 21
    VIRTIO_NET_F_MQ = 1 << 22
    VIRTIO_NET_F_CTRL_MAC_ADDR = 1 << 23
    VIRTIO_NET_F_NOTF_COAL = 1 << 53
    VIRTIO_NET_F_HASH_REPORT = 1 << 57
    VIRTIO_NET_F_RSS = 1 << 60
    VIRTIO_NET_F_RSC_EXT = 1 << 61
    VIRTIO_NET_F_STANDBY = 1 << 62
    VIRTIO_NET_F_SPEED_DUPLEX = 1 << 63


VIRTIO_NET_S_LINK_UP = 1        #: virtio_net_config.status: the link is up
VIRTIO_NET_S_ANNOUNCE = 2       #: virtio_net_config.status: announce the guest (GUEST_ANNOUNCE)
#: struct virtio_net_config up to mtu: {u8 mac[6]; le16 status; le16 max_virtqueue_pairs; le16 mtu}
VIRTIO_NET_CONFIG = struct.Struct("<6sHHH")
#: struct virtio_net_hdr {u8 flags; u8 gso_type; le16 hdr_len, gso_size, csum_start, csum_offset} (10)
VIRTIO_NET_HDR = struct.Struct("<BBHHHH")
#: struct virtio_net_hdr_mrg_rxbuf: the header plus le16 num_buffers (12); the header of every
#: frame with VIRTIO_F_VERSION_1 or VIRTIO_NET_F_MRG_RXBUF
VIRTIO_NET_HDR_MRG_RXBUF = struct.Struct("<BBHHHHH")
