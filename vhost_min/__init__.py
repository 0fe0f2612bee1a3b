"""vhost_min: the vhost dataplanes of Linux virtualization in pure Python.

Kernel vhost (``ioctl``), vhost-user (``user``), vDPA and VDUSE (``vdpa``), and the virtqueue
engine they share (``vring`` for split rings, ``packed`` for packed rings, ``memory`` for guest
memory). Standard library only; submodules load on first use so ``import vhost_min`` stays cheap.
"""

from __future__ import annotations

import importlib

from .errors import (DisconnectedError, GuestMemoryError, IoctlError, NotNegotiatedError, NotSupportedError,
                     ProtocolError, VhostError, VirtqueueError)

__version__ = "0.1.0"

#: name -> submodule it lives in, imported on first access (``from vhost_min import Device, serve``).
_LAZY = {
    "GuestMemory": "memory", "IOTLB": "memory", "DirtyLog": "memory",
    "SplitDeviceQueue": "vring", "SplitDriverQueue": "vring",
    "PackedDeviceQueue": "packed", "PackedDriverQueue": "packed",
    "Connection": "user", "Listener": "user",
    "Device": "device", "Backend": "backend", "Server": "backend", "serve": "backend",
    "Frontend": "frontend",
    "Tracer": "trace",
    "BlkDevice": "blk", "BlkClient": "blk", "NetDevice": "net",
    "VhostKernel": "ioctl", "VhostNet": "ioctl", "VhostVsock": "ioctl", "VhostScsi": "ioctl",
    "VhostVdpa": "vdpa", "VdpaDriver": "vdpa",
    "VduseDevice": "vdpa",
}

__all__ = ["VhostError", "GuestMemoryError", "VirtqueueError", "ProtocolError", "NotNegotiatedError",
           "NotSupportedError", "DisconnectedError", "IoctlError", *_LAZY]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'vhost_min' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
