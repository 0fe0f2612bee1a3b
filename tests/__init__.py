"""vhost_min's tests: unit (anywhere), peers (real QEMU, qemu-storage-daemon, virtiofsd, DPDK),
kernel (a QEMU guest on Debian's kernel). Run them all with ``python3 -m tests``."""
