"""The package's exceptions: one root (an OSError, errno kept) and a few precise subclasses.

Every error vhost_min raises for bad input — from a driver, a vhost-user peer, the kernel
or a user — is a :class:`VhostError`, so ``except vhost_min.VhostError`` catches them all,
and ``except OSError`` still works for code that treats them like any I/O failure.
"""

from __future__ import annotations

import errno as _errno


class VhostError(OSError):
    """Root of every vhost_min error; ``.errno`` says what kind, ``str()`` says what and why."""

    default_errno = _errno.EIO

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(self.default_errno if errno is None else errno, message)

    def __str__(self) -> str:
        return str(self.strerror)


class GuestMemoryError(VhostError):
    """An address or length that no guest memory region (or IOTLB entry) covers, or bad regions."""

    default_errno = _errno.EFAULT


class VirtqueueError(VhostError):
    """The driver broke a ring rule (loops, bad indirect tables, bad indices): the queue is broken."""

    default_errno = _errno.EINVAL


class ProtocolError(VhostError):
    """A peer sent something the vhost-user / vhost protocol does not allow."""

    default_errno = _errno.EPROTO


class NotNegotiatedError(ProtocolError):
    """A request or field needs a (protocol) feature that was not negotiated."""


class NotSupportedError(VhostError):
    """Valid request, but this device or backend does not implement it."""

    default_errno = _errno.EOPNOTSUPP


class DisconnectedError(VhostError):
    """The peer closed the connection (possibly in the middle of a message)."""

    default_errno = _errno.ECONNRESET


class IoctlError(VhostError):
    """An ioctl on a vhost, vhost-vdpa or VDUSE device node failed: ``ioctl`` names it, errno kept.
    ENOTTY (a kernel older than the ioctl) reads "not supported by this kernel"."""

    def __init__(self, message: str, errno: int | None = None, ioctl: str = "") -> None:
        super().__init__(message, errno)
        self.ioctl = ioctl
