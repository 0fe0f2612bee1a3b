"""virtio-fs (virtio 1.3 §5.11; linux/virtio_fs.h): feature bits and the config space. The requests
in its queues are FUSE messages (FUSE_INIT first)."""

from __future__ import annotations

import enum
import struct

__all__ = ["VirtioFsFeature", "VIRTIO_FS_CONFIG"]


class VirtioFsFeature(enum.IntFlag):
    """virtio-fs feature bits (virtio spec; not in linux/virtio_fs.h yet)."""

    VIRTIO_FS_F_NOTIFICATION = 1 << 0


#: struct virtio_fs_config: {u8 tag[36]; le32 num_request_queues}
VIRTIO_FS_CONFIG = struct.Struct("<36sI")
