"""One interface for the three dataplanes a VMM drives: kernel vhost (ioctl.py), vhost-vdpa
(vdpa.py) and a vhost-user back-end (frontend.Frontend).

The messages they share are the vhost protocol itself -- features, owner, memory table, dirty log,
and per ring its size, addresses, base, kick, call and error eventfds and enable -- so a VMM (or a
test) that sets a device up through :class:`Dataplane` runs unchanged over any of them, as
rust-vmm's ``VhostBackend`` trait and DPDK virtio-user's three back-end ops tables do. Methods are
named after the messages (``set_vring_addr`` is VHOST_SET_VRING_ADDR and VHOST_USER_SET_VRING_ADDR);
the payloads are user.py's tuples, which have the kernel structs' layouts (``VringAddr`` is
``struct vhost_vring_addr``, ``VringState`` is ``struct vhost_vring_state``, ``MemoryRegion`` is
``struct vhost_memory_region`` with ``mmap_offset`` in the place the kernel calls padding).

Where the transports differ, each class says so in its own docstring: a memory region's
``userspace_addr`` is an address in *this* process for the kernel and vDPA (they read our
mappings), and only a label for vhost-user (the back-end maps the fds); ``fd=None`` for kick/call
means poll mode for vhost-user and VHOST_FILE_UNBIND for the kernel.
"""

from __future__ import annotations

from collections.abc import Sequence

from .errors import NotSupportedError
from .user import MemoryRegion, VringAddr, VringState

__all__ = ["Dataplane", "MemoryRegion", "VringAddr", "VringState"]


class Dataplane:
    """The vhost messages every dataplane has; subclasses implement each one (the defaults raise
    NotSupportedError naming the method and the class). ``close()`` releases the device."""

    def _unsupported(self, what: str) -> NotSupportedError:
        return NotSupportedError(f"{type(self).__name__} does not support {what}")

    # -- device-wide --------------------------------------------------------------------------
    def get_features(self) -> int:
        """VHOST_GET_FEATURES: the virtio feature bits the device offers (masks, virtio.py)."""
        raise self._unsupported("get_features")

    def set_features(self, features: int) -> None:
        """VHOST_SET_FEATURES: the features the driver acknowledged."""
        raise self._unsupported("set_features")

    def set_owner(self) -> None:
        """VHOST_SET_OWNER: this process (connection) owns the device from now on."""
        raise self._unsupported("set_owner")

    def reset_owner(self) -> None:
        """VHOST_RESET_OWNER: give the device up (rings stopped, memory forgotten)."""
        raise self._unsupported("reset_owner")

    def set_mem_table(self, regions: Sequence[MemoryRegion], fds: Sequence[int] = ()) -> None:
        """VHOST_SET_MEM_TABLE: the guest's memory, as regions (and for vhost-user one fd each)."""
        raise self._unsupported("set_mem_table")

    def set_log_base(self, fd: int, mmap_size: int, mmap_offset: int = 0) -> None:
        """VHOST_SET_LOG_BASE: the dirty-page bitmap, ``mmap_size`` bytes of ``fd`` at ``mmap_offset``."""
        raise self._unsupported("set_log_base")

    def set_log_fd(self, fd: int) -> None:
        """VHOST_SET_LOG_FD: an eventfd signalled after the log was written."""
        raise self._unsupported("set_log_fd")

    # -- per ring -------------------------------------------------------------------------------
    def set_vring_num(self, index: int, num: int) -> None:
        """VHOST_SET_VRING_NUM: the ring's size."""
        raise self._unsupported("set_vring_num")

    def set_vring_addr(self, addr: VringAddr) -> None:
        """VHOST_SET_VRING_ADDR: where the ring's parts are (and the used ring's log address)."""
        raise self._unsupported("set_vring_addr")

    def set_vring_base(self, index: int, num: int) -> None:
        """VHOST_SET_VRING_BASE: where the device resumes (split: the next avail index)."""
        raise self._unsupported("set_vring_base")

    def get_vring_base(self, index: int) -> VringState:
        """VHOST_GET_VRING_BASE: stop the ring and say where it stopped."""
        raise self._unsupported("get_vring_base")

    def set_vring_kick(self, index: int, fd: int | None) -> None:
        """VHOST_SET_VRING_KICK: the eventfd the driver writes to notify the device."""
        raise self._unsupported("set_vring_kick")

    def set_vring_call(self, index: int, fd: int | None) -> None:
        """VHOST_SET_VRING_CALL: the eventfd the device writes when it used buffers."""
        raise self._unsupported("set_vring_call")

    def set_vring_err(self, index: int, fd: int | None) -> None:
        """VHOST_SET_VRING_ERR: the eventfd the device writes when the ring broke."""
        raise self._unsupported("set_vring_err")

    def set_vring_enable(self, index: int, enable: bool) -> None:
        """Enable or disable one ring (VHOST_USER_SET_VRING_ENABLE, VHOST_VDPA_SET_VRING_ENABLE;
        kernel devices map it to their own switch, their docstrings say which)."""
        raise self._unsupported("set_vring_enable")

    # -- start ------------------------------------------------------------------------------------
    def start_device(self) -> None:
        """The device-wide start, once every ring is set up and enabled (QEMU's vhost_dev_start
        op): vhost-vdpa writes DRIVER_OK to the device status. Kernel vhost devices run once their
        backend or endpoint is attached, vhost-user ones once their rings are kicked: for them
        (the default) there is nothing to do."""

    def close(self) -> None:
        """Release the device (close the fd or connection)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
