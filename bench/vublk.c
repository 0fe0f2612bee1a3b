/* vublk: the project's own vhost-user-blk front-end for measuring back-ends, and a null back-end.
 *
 * Driver (default): connects to a vhost-user-blk back-end, negotiates VIRTIO_F_VERSION_1 (and
 * VIRTIO_RING_F_EVENT_IDX with --event-idx) and the protocol features MQ, REPLY_ACK and CONFIG,
 * shares one memfd region of "guest" memory (SET_MEM_TABLE, fd by SCM_RIGHTS), sets up one split
 * ring with kick and call eventfds, and keeps --qd requests in flight for --seconds after
 * --warmup (or until --count requests were submitted). Each request is a fixed 3-descriptor chain (header, data, status) owned by one slot.
 * Completions are found by busy-polling the used ring (the default: the driver's latency is then
 * as small as it gets) or by waiting on the call eventfd (--wait-call, as an interrupt-driven
 * guest would); either way the driver leaves notifications enabled, so the back-end pays for its
 * calls as it would under a guest. One JSON object on stdout: IOPS, MiB/s, latency, this
 * process's CPU, and the CPU of --backend-pid over the same window (/proc/PID/task/{*}/schedstat).
 * A busy-polling run also counts stalls: 50 ms without a completion while requests are in flight
 * (the first three described on stderr with the ring's indexes, to tell a lost notification from
 * a back-end that did not get the CPU).
 *
 * --pattern SEED fills every write with a pattern that depends only on (SEED, byte offset in the
 * image) and checks every read against it: bench/vublk.py computes the same pattern
 * (splitmix64(SEED ^ offset) for each aligned 8-byte word), so a test can check the image itself.
 *
 * With REPLY_ACK negotiated, every request that has no reply of its own asks for one (NEED_REPLY);
 * --need-reply mem-table asks only on SET_MEM_TABLE, as QEMU 7.2 does (hw/virtio/vhost-user.c).
 *
 * Handshakes (--handshakes N): N times connect, bring up one ring, read 4 KiB, close; each phase's
 * time and the back-end's CPU as JSON (see run_handshakes), for bench/handshake.py.
 *
 * Null back-end (--null-backend): serves the same protocol on --socket and completes every chain
 * with VIRTIO_BLK_S_OK without touching data: the driver's own ceiling.
 *
 * Facts follow the vhost-user spec and linux/virtio_ring.h, linux/virtio_blk.h; the Python home of
 * each is vhost_min/user.py, vhost_min/virtio.py, vhost_min/vring.py and vhost_min/blk.py.
 * Build: cc -O2 -o vublk bench/vublk.c (bench/vublk.py does it, into a cache directory). */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

/* vhost-user requests (vhost_min/user.py FrontendRequest) */
enum {
    VHOST_USER_GET_FEATURES = 1, VHOST_USER_SET_FEATURES = 2, VHOST_USER_SET_OWNER = 3,
    VHOST_USER_SET_MEM_TABLE = 5, VHOST_USER_SET_VRING_NUM = 8, VHOST_USER_SET_VRING_ADDR = 9,
    VHOST_USER_SET_VRING_BASE = 10, VHOST_USER_GET_VRING_BASE = 11, VHOST_USER_SET_VRING_KICK = 12,
    VHOST_USER_SET_VRING_CALL = 13, VHOST_USER_GET_PROTOCOL_FEATURES = 15,
    VHOST_USER_SET_PROTOCOL_FEATURES = 16, VHOST_USER_GET_QUEUE_NUM = 17, VHOST_USER_SET_VRING_ENABLE = 18,
    VHOST_USER_GET_CONFIG = 24,
};
#define VHOST_USER_VERSION 0x1
#define VHOST_USER_REPLY_MASK 0x4
#define VHOST_USER_NEED_REPLY_MASK 0x8
#define VHOST_USER_VRING_NOFD_MASK 0x100
#define VHOST_USER_PROTOCOL_F_MQ 0
#define VHOST_USER_PROTOCOL_F_REPLY_ACK 3
#define VHOST_USER_PROTOCOL_F_CONFIG 9
#define VIRTIO_RING_F_EVENT_IDX 29
#define VHOST_USER_F_PROTOCOL_FEATURES 30
#define VIRTIO_F_VERSION_1 32
/* linux/virtio_ring.h */
#define VRING_DESC_F_NEXT 1
#define VRING_DESC_F_WRITE 2
#define VRING_USED_F_NO_NOTIFY 1
#define VRING_AVAIL_F_NO_INTERRUPT 1
/* linux/virtio_blk.h */
#define VIRTIO_BLK_T_IN 0
#define VIRTIO_BLK_T_OUT 1
#define VIRTIO_BLK_S_OK 0
#define SECTOR_SIZE 512

struct vhost_user_hdr { uint32_t request, flags, size; };
struct vhost_memory_region { uint64_t guest_phys_addr, memory_size, userspace_addr, mmap_offset; };
struct vhost_vring_state { uint32_t index, num; };
struct vhost_vring_addr { uint32_t index, flags; uint64_t desc, used, avail, log; };
struct vring_desc { uint64_t addr; uint32_t len; uint16_t flags, next; };
struct vring_used_elem { uint32_t id, len; };
struct virtio_blk_outhdr { uint32_t type, ioprio; uint64_t sector; };

#define MAX_PAYLOAD 4096
struct msg { struct vhost_user_hdr hdr; uint8_t payload[MAX_PAYLOAD]; int fds[8]; int nfds; };

static void die(const char *what) { fprintf(stderr, "vublk: %s: %s\n", what, strerror(errno)); exit(1); }
static void fail(const char *fmt, const char *what) { fprintf(stderr, "vublk: "); fprintf(stderr, fmt, what); fputc('\n', stderr); exit(1); }

#if defined(__x86_64__) || defined(__i386__)
#define cpu_relax() __builtin_ia32_pause()
#elif defined(__aarch64__)
#define cpu_relax() __asm__ __volatile__("yield")
#else
#define cpu_relax() do {} while (0)
#endif

static int need_event(uint16_t event, uint16_t new_idx, uint16_t old) {   /* vring_need_event() */
    return (uint16_t)(new_idx - event - 1) < (uint16_t)(new_idx - old);
}

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static uint64_t splitmix64(uint64_t x) {
    x += 0x9e3779b97f4a7c15ULL;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
    return x ^ (x >> 31);
}

/* ---------------------------------------------------------------------------------------------
 * Messages: a header, a payload, and up to 8 fds as SCM_RIGHTS on the header's bytes
 * ------------------------------------------------------------------------------------------- */

static int send_msg(int sock, uint32_t request, uint32_t flags, const void *payload, uint32_t size,
                    const int *fds, int nfds) {
    struct vhost_user_hdr hdr = { request, VHOST_USER_VERSION | flags, size };
    struct iovec iov[2] = { { &hdr, sizeof hdr }, { (void *)payload, size } };
    char control[CMSG_SPACE(8 * sizeof(int))];
    struct msghdr mh = { .msg_iov = iov, .msg_iovlen = size ? 2 : 1 };
    if (nfds) {
        memset(control, 0, sizeof control);
        mh.msg_control = control;
        mh.msg_controllen = CMSG_SPACE(nfds * sizeof(int));
        struct cmsghdr *c = CMSG_FIRSTHDR(&mh);
        c->cmsg_level = SOL_SOCKET;
        c->cmsg_type = SCM_RIGHTS;
        c->cmsg_len = CMSG_LEN(nfds * sizeof(int));
        memcpy(CMSG_DATA(c), fds, nfds * sizeof(int));
    }
    ssize_t n = sendmsg(sock, &mh, MSG_NOSIGNAL);
    return n == (ssize_t)(sizeof hdr + size) ? 0 : -1;
}

static int read_full(int sock, void *buf, size_t len) {
    for (size_t got = 0; got < len;) {
        ssize_t n = recv(sock, (char *)buf + got, len - got, 0);
        if (n <= 0) {
            if (n < 0 && errno == EINTR) continue;
            return -1;
        }
        got += n;
    }
    return 0;
}

/* One message; 0 on success, -1 on EOF or error (fds received are kept in m->fds). */
static int recv_msg(int sock, struct msg *m) {
    char control[CMSG_SPACE(8 * sizeof(int))];
    struct iovec iov = { &m->hdr, sizeof m->hdr };
    struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = control, .msg_controllen = sizeof control };
    ssize_t n;
    do n = recvmsg(sock, &mh, MSG_CMSG_CLOEXEC); while (n < 0 && errno == EINTR);
    m->nfds = 0;
    for (struct cmsghdr *c = CMSG_FIRSTHDR(&mh); c; c = CMSG_NXTHDR(&mh, c))
        if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS) {
            m->nfds = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
            memcpy(m->fds, CMSG_DATA(c), m->nfds * sizeof(int));
        }
    if (n <= 0) return -1;
    if (n < (ssize_t)sizeof m->hdr && read_full(sock, (char *)&m->hdr + n, sizeof m->hdr - n)) return -1;
    if (m->hdr.size > MAX_PAYLOAD) { errno = EPROTO; return -1; }
    return read_full(sock, m->payload, m->hdr.size);
}

/* ---------------------------------------------------------------------------------------------
 * The driver
 * ------------------------------------------------------------------------------------------- */

struct options {
    const char *socket, *rw;
    unsigned bs, qd, queue_size, handshakes;
    double seconds, warmup;
    int event_idx, wait_call, backend_pid, have_pattern, reply_mem_table_only;
    uint64_t pattern, size, seed, count;
};

struct driver {
    struct options o;
    int sock, kick, call, reply_ack, memfd;
    uint8_t *mem;
    size_t mem_size;
    struct vring_desc *desc;
    volatile uint16_t *avail;           /* flags, idx, ring[num], used_event */
    volatile uint8_t *used;             /* flags, idx, ring[num] of 8 bytes, avail_event */
    uint16_t avail_idx, last_used, last_kick;        /* last_kick: the avail idx published with the last kick */
    uint64_t capacity_bytes, rng;
    int write, random;
    uint64_t seq_next;
    double connected;                   /* when GET_FEATURES was answered (the connect phase's end) */
};

/* Guest memory layout (guest physical address = offset in the memfd; one region at 0). */
#define DESC_OFF 0x0000
#define AVAIL_OFF 0x1000
#define USED_OFF 0x2000
#define HDR_OFF 0x3000                  /* slot i: outhdr at +32i, status byte at +32i+16 */
#define DATA_OFF 0x10000                /* slot i: data at +i*bs */

static void request(struct driver *d, uint32_t req, uint32_t flags, const void *p, uint32_t size,
                    const int *fds, int nfds) {
    if (d->reply_ack && (!d->o.reply_mem_table_only || req == VHOST_USER_SET_MEM_TABLE))
        flags |= VHOST_USER_NEED_REPLY_MASK;
    if (send_msg(d->sock, req, flags, p, size, fds, nfds)) die("send");
    if (flags & VHOST_USER_NEED_REPLY_MASK) {
        struct msg m;
        if (recv_msg(d->sock, &m)) die("reply ack");
        if (m.hdr.request != req || m.hdr.size != 8 || *(uint64_t *)m.payload != 0) {
            fprintf(stderr, "vublk: request %u refused by the back-end (REPLY_ACK %" PRIu64 ")\n", req,
                    *(uint64_t *)m.payload);
            exit(1);
        }
    }
}

static uint64_t get_u64(struct driver *d, uint32_t req) {
    struct msg m;
    if (send_msg(d->sock, req, 0, NULL, 0, NULL, 0) || recv_msg(d->sock, &m)) die("get");
    if (m.hdr.request != req || m.hdr.size != 8) { errno = EPROTO; die("get reply"); }
    return *(uint64_t *)m.payload;
}

static void set_u64(struct driver *d, uint32_t req, uint64_t value) { request(d, req, 0, &value, 8, NULL, 0); }

static void connect_and_negotiate(struct driver *d) {
    struct sockaddr_un sa = { .sun_family = AF_UNIX };
    snprintf(sa.sun_path, sizeof sa.sun_path, "%s", d->o.socket);
    d->sock = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (d->sock < 0 || connect(d->sock, (struct sockaddr *)&sa, sizeof sa)) die(d->o.socket);

    uint64_t offered = get_u64(d, VHOST_USER_GET_FEATURES);
    d->connected = now();
    uint64_t want = (1ULL << VIRTIO_F_VERSION_1) | (1ULL << VHOST_USER_F_PROTOCOL_FEATURES);
    if (d->o.event_idx) want |= 1ULL << VIRTIO_RING_F_EVENT_IDX;
    if ((offered & want) != want) fail("%s: the back-end lacks a feature asked for (VERSION_1, PROTOCOL_FEATURES"
                                       " or EVENT_IDX)", d->o.socket);
    uint64_t pwant = (1ULL << VHOST_USER_PROTOCOL_F_MQ) | (1ULL << VHOST_USER_PROTOCOL_F_REPLY_ACK)
                   | (1ULL << VHOST_USER_PROTOCOL_F_CONFIG);
    uint64_t protocol = get_u64(d, VHOST_USER_GET_PROTOCOL_FEATURES) & pwant;
    set_u64(d, VHOST_USER_SET_PROTOCOL_FEATURES, protocol);
    d->reply_ack = !!(protocol & (1ULL << VHOST_USER_PROTOCOL_F_REPLY_ACK));
    request(d, VHOST_USER_SET_OWNER, 0, NULL, 0, NULL, 0);
    if (protocol & (1ULL << VHOST_USER_PROTOCOL_F_MQ) && get_u64(d, VHOST_USER_GET_QUEUE_NUM) < 1)
        fail("%s: no queues", d->o.socket);
    d->capacity_bytes = d->o.size;
    if (protocol & (1ULL << VHOST_USER_PROTOCOL_F_CONFIG)) {   /* offset, size, flags, then capacity */
        uint32_t cfg[3 + 2] = { 0, 8, 0 };
        struct msg m;
        if (send_msg(d->sock, VHOST_USER_GET_CONFIG, 0, cfg, sizeof cfg, NULL, 0) || recv_msg(d->sock, &m)) die("config");
        if (m.hdr.size != sizeof cfg) fail("%s: GET_CONFIG refused", d->o.socket);
        if (!d->capacity_bytes) d->capacity_bytes = *(uint64_t *)(m.payload + 12) * SECTOR_SIZE;
    }
    if (d->capacity_bytes < d->o.bs) fail("%s: capacity unknown or too small (give --size)", d->o.socket);
    set_u64(d, VHOST_USER_SET_FEATURES, want);
}

/* The "guest" memory: one memfd, mapped once (--handshakes reuses it for every connection). */
static void map_memory(struct driver *d) {
    d->mem_size = (DATA_OFF + (size_t)d->o.qd * d->o.bs + (2 << 20) - 1) & ~(size_t)((2 << 20) - 1);
    d->memfd = memfd_create("vublk-guest", MFD_CLOEXEC);
    if (d->memfd < 0 || ftruncate(d->memfd, d->mem_size)) die("memfd");
    d->mem = mmap(NULL, d->mem_size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, d->memfd, 0);
    if (d->mem == MAP_FAILED) die("mmap");
}

static void setup_memory_and_ring(struct driver *d) {
    unsigned num = d->o.queue_size;
    if (!d->mem) map_memory(d);
    struct { uint32_t nregions, padding; struct vhost_memory_region r; } table = {
        1, 0, { 0, d->mem_size, (uintptr_t)d->mem, 0 } };
    request(d, VHOST_USER_SET_MEM_TABLE, 0, &table, sizeof table, &d->memfd, 1);

    d->desc = (struct vring_desc *)(d->mem + DESC_OFF);
    d->avail = (volatile uint16_t *)(d->mem + AVAIL_OFF);
    d->used = d->mem + USED_OFF;
    struct vhost_vring_state state = { 0, num };
    request(d, VHOST_USER_SET_VRING_NUM, 0, &state, sizeof state, NULL, 0);
    state.num = 0;
    request(d, VHOST_USER_SET_VRING_BASE, 0, &state, sizeof state, NULL, 0);
    struct vhost_vring_addr addr = { 0, 0, (uintptr_t)d->desc, (uintptr_t)d->used, (uintptr_t)d->avail, 0 };
    request(d, VHOST_USER_SET_VRING_ADDR, 0, &addr, sizeof addr, NULL, 0);
    d->kick = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    d->call = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (d->kick < 0 || d->call < 0) die("eventfd");
    uint64_t index = 0;
    request(d, VHOST_USER_SET_VRING_CALL, 0, &index, 8, &d->call, 1);
    request(d, VHOST_USER_SET_VRING_KICK, 0, &index, 8, &d->kick, 1);
    state.num = 1;
    request(d, VHOST_USER_SET_VRING_ENABLE, 0, &state, sizeof state, NULL, 0);

    for (unsigned i = 0; i < d->o.qd; i++) {           /* fixed chains: slot i owns 3i, 3i+1, 3i+2 */
        struct vring_desc *c = d->desc + 3 * i;
        uint16_t data_flags = VRING_DESC_F_NEXT | (d->write ? 0 : VRING_DESC_F_WRITE);
        c[0] = (struct vring_desc){ HDR_OFF + 32 * i, 16, VRING_DESC_F_NEXT, 3 * i + 1 };
        c[1] = (struct vring_desc){ DATA_OFF + (uint64_t)i * d->o.bs, d->o.bs, data_flags, 3 * i + 2 };
        c[2] = (struct vring_desc){ HDR_OFF + 32 * i + 16, 1, VRING_DESC_F_WRITE, 0 };
    }
    if (d->write && !d->o.have_pattern)                  /* the same incompressible bytes in every write */
        for (size_t off = DATA_OFF; off + 8 <= d->mem_size; off += 8)
            *(uint64_t *)(d->mem + off) = splitmix64(off);
}

static void fill_pattern(uint8_t *buf, uint64_t offset, unsigned len, uint64_t seed) {
    for (unsigned i = 0; i < len; i += 8) *(uint64_t *)(buf + i) = splitmix64(seed ^ (offset + i));
}

static int check_pattern(const uint8_t *buf, uint64_t offset, unsigned len, uint64_t seed) {
    for (unsigned i = 0; i < len; i += 8)
        if (*(const uint64_t *)(buf + i) != splitmix64(seed ^ (offset + i))) return 0;
    return 1;
}

struct slot { double submitted; uint64_t offset; };

/* Put slot i's chain on the avail ring (not yet published) for the next request. */
static void prepare(struct driver *d, struct slot *s, unsigned i) {
    uint64_t blocks = d->capacity_bytes / d->o.bs, block;
    if (d->random) {
        d->rng ^= d->rng << 13; d->rng ^= d->rng >> 7; d->rng ^= d->rng << 17;   /* xorshift64 */
        block = d->rng % blocks;
    } else {
        block = d->seq_next++ % blocks;
    }
    s->offset = block * d->o.bs;
    struct virtio_blk_outhdr *h = (struct virtio_blk_outhdr *)(d->mem + HDR_OFF + 32 * i);
    h->type = d->write ? VIRTIO_BLK_T_OUT : VIRTIO_BLK_T_IN;
    h->ioprio = 0;
    h->sector = s->offset / SECTOR_SIZE;
    d->mem[HDR_OFF + 32 * i + 16] = 0xff;               /* a back-end that never writes the status is caught */
    if (d->write && d->o.have_pattern) fill_pattern(d->mem + DATA_OFF + (size_t)i * d->o.bs, s->offset, d->o.bs, d->o.pattern);
    unsigned num = d->o.queue_size;
    d->avail[2 + d->avail_idx % num] = 3 * i;
    d->avail_idx++;
}

/* Publish the avail index and kick if the back-end asked for it. */
static uint64_t publish(struct driver *d, uint16_t old) {
    if (d->avail_idx == old) return 0;
    __atomic_store_n(&d->avail[1], d->avail_idx, __ATOMIC_RELEASE);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);              /* avail idx visible before reading the suppression */
    int kick;
    if (d->o.event_idx)
        kick = need_event(*(volatile uint16_t *)(d->used + 4 + 8 * d->o.queue_size), d->avail_idx, old);
    else
        kick = !(*(volatile uint16_t *)d->used & VRING_USED_F_NO_NOTIFY);
    if (kick) {
        uint64_t one = 1;
        if (write(d->kick, &one, 8) != 8) die("kick");
        d->last_kick = d->avail_idx;
    }
    return kick;
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* CPU seconds of a process, all its threads: schedstat's nanoseconds, else stat's ticks. */
static double process_cpu(int pid) {
    char path[64];
    snprintf(path, sizeof path, "/proc/%d/task", pid);
    DIR *dir = opendir(path);
    double total = 0;
    int found = 0;
    if (dir) {
        for (struct dirent *e; (e = readdir(dir));) {
            if (e->d_name[0] == '.') continue;
            char p[320];
            snprintf(p, sizeof p, "/proc/%d/task/%s/schedstat", pid, e->d_name);
            FILE *f = fopen(p, "r");
            unsigned long long ns;
            if (f && fscanf(f, "%llu", &ns) == 1) { total += ns * 1e-9; found = 1; }
            if (f) fclose(f);
        }
        closedir(dir);
    }
    if (found) return total;
    snprintf(path, sizeof path, "/proc/%d/stat", pid);
    FILE *f = fopen(path, "r");
    char buf[1024];
    size_t n = f ? fread(buf, 1, sizeof buf - 1, f) : 0;
    if (f) fclose(f);
    buf[n] = 0;
    char *p = strrchr(buf, ')');
    unsigned long ut, st;
    if (!p || sscanf(p + 2, "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %lu %lu", &ut, &st) != 2) return -1;
    return (double)(ut + st) / sysconf(_SC_CLK_TCK);
}

/* The back-end's scheduling over a window: nanoseconds on a CPU and waiting for one (schedstat's first
 * two fields, all threads), and how many threads are runnable now (state R in /proc/PID/task/{*}/stat). */
struct sched_sample { double run, wait; int runnable, asleep, in_io, threads; };

static struct sched_sample sched_sample(int pid) {
    struct sched_sample s = { 0, 0, 0, 0, 0, 0 };
    char path[64];
    snprintf(path, sizeof path, "/proc/%d/task", pid);
    DIR *dir = opendir(path);
    if (!dir) return s;
    for (struct dirent *e; (e = readdir(dir));) {
        if (e->d_name[0] == '.') continue;
        char p[320], buf[512];
        unsigned long long run, wait;
        snprintf(p, sizeof p, "/proc/%d/task/%s/schedstat", pid, e->d_name);
        FILE *f = fopen(p, "r");
        if (f && fscanf(f, "%llu %llu", &run, &wait) == 2) { s.run += run * 1e-9; s.wait += wait * 1e-9; }
        if (f) fclose(f);
        snprintf(p, sizeof p, "/proc/%d/task/%s/stat", pid, e->d_name);
        f = fopen(p, "r");
        size_t n = f ? fread(buf, 1, sizeof buf - 1, f) : 0;
        if (f) fclose(f);
        buf[n] = 0;
        char *q = strrchr(buf, ')');
        s.threads++;
        char state = q && q[1] == ' ' ? q[2] : '?';
        s.runnable += state == 'R';
        s.asleep += state == 'S';
        s.in_io += state == 'D';
    }
    closedir(dir);
    return s;
}

static double self_cpu(void) {
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static int run_driver(struct options *o) {
    struct driver d = { .o = *o, .rng = o->seed | 1 };
    if (!strcmp(o->rw, "randread")) d.random = 1;
    else if (!strcmp(o->rw, "randwrite")) d.random = d.write = 1;
    else if (!strcmp(o->rw, "write")) d.write = 1;
    else if (strcmp(o->rw, "read")) fail("--rw %s: one of read, write, randread, randwrite", o->rw);
    if (o->bs < SECTOR_SIZE || o->bs % SECTOR_SIZE || o->bs > (16 << 20)) fail("--bs %s: a multiple of 512 up to 16 MiB", "");
    if (o->queue_size < 2 || o->queue_size > 256 || (o->queue_size & (o->queue_size - 1)))
        fail("%s: --queue-size is a power of two up to 256", "");
    if (o->qd < 1 || o->qd * 3 > o->queue_size) fail("%s: --qd from 1 to queue-size / 3", "");
    connect_and_negotiate(&d);
    setup_memory_and_ring(&d);
    if (d.capacity_bytes < d.o.bs) fail("%s: image smaller than one request", o->socket);

    struct slot *slots = calloc(o->qd, sizeof *slots);
    size_t lat_cap = 1 << 22, lat_n = 0;
    double *lat = malloc(lat_cap * sizeof *lat);
    uint64_t done = 0, bad_status = 0, mismatches = 0, kicks = 0, calls = 0, in_flight = 0;
    uint64_t kicks0 = 0, calls0 = 0, kicks1 = 0, calls1 = 0;              /* the counters over the window */
    double start = now(), t0 = start + o->warmup, t_end = t0 + o->seconds;
    double cpu0 = 0, bcpu0 = 0, cpu1 = 0, bcpu1 = 0, t1 = 0;
    int measuring = o->warmup <= 0, running = 1;
    if (measuring) { cpu0 = self_cpu(); bcpu0 = o->backend_pid ? process_cpu(o->backend_pid) : 0; t0 = start; }
    unsigned num = o->queue_size, spins = 0, stall_reports = 0;
    int stall_watch = 0;
    double stall_t = 0;
    struct sched_sample stall_base = { 0, 0, 0, 0, 0, 0 };
    double last_completion = start;
    uint16_t old = d.avail_idx;
    uint64_t submitted = 0, limit = o->count ? o->count : UINT64_MAX;
    for (unsigned i = 0; i < o->qd && submitted < limit; i++, submitted++) {
        slots[i].submitted = start;
        prepare(&d, &slots[i], i);
    }
    in_flight = submitted;
    kicks += publish(&d, old);

    while (in_flight) {
        uint16_t used_idx = __atomic_load_n((volatile uint16_t *)(d.used + 2), __ATOMIC_ACQUIRE);
        if (used_idx == d.last_used) {
            if (!o->wait_call) {
                if (!(++spins & 0xfff)) {                  /* a back-end silent for 50 ms with work queued */
                    double t = now();
                    if (o->backend_pid && !stall_watch && t - last_completion > 0.01) {
                        stall_watch = 1;                   /* its scheduling from here to the report */
                        stall_t = t;
                        stall_base = sched_sample(o->backend_pid);
                    }
                    if (t - last_completion > 0.05) {
                        /* Which of three: the kick still unread in the eventfd while the back-end sleeps
                         * (a wake-up lost in its loop), no kick sent (suppression: compare avail_event
                         * with the avail idx), or a back-end that wanted a CPU and got none (wait). */
                        struct pollfd kp = { d.kick, POLLIN, 0 };
                        int kick_pending = poll(&kp, 1, 0) == 1;
                        if (stall_reports++ < 3) {
                            fprintf(stderr, "vublk: stall: %.0f ms without a completion, %" PRIu64 " in flight, avail idx %u,"
                                    " avail_event %u, used idx %u, used flags %#x, last kick at avail idx %u, kick fd %s",
                                    (t - last_completion) * 1e3, in_flight, d.avail_idx,
                                    *(volatile uint16_t *)(d.used + 4 + 8 * num), used_idx, *(volatile uint16_t *)d.used,
                                    d.last_kick, kick_pending ? "unread" : "read");
                            if (stall_watch) {              /* run_delay grows only when a waiting thread gets a CPU */
                                struct sched_sample s = sched_sample(o->backend_pid);
                                double w = t - stall_t, ran = s.run - stall_base.run, waited = s.wait - stall_base.wait;
                                fprintf(stderr, "; back-end over the last %.0f ms: ran %.1f ms, waited for a CPU %.1f ms,"
                                        " rest %.1f ms; threads now %d runnable, %d asleep, %d in I/O of %d: %s",
                                        w * 1e3, ran * 1e3, waited * 1e3, (w - ran - waited) * 1e3, s.runnable, s.asleep,
                                        s.in_io, s.threads,
                                        s.runnable ? "it waits for a CPU (other work on its core)"
                                        : s.in_io ? "it waits for I/O"
                                        : kick_pending ? "it sleeps with a kick unread (a lost wake-up in its loop)"
                                        : "it sleeps with requests on the ring and no kick unread (a lost notification?)");
                            }
                            fputc('\n', stderr);
                        }
                        last_completion = t;
                        stall_watch = 0;
                    }
                }
                cpu_relax();
                continue;
            }
            if (o->event_idx) d.avail[2 + num] = d.last_used;      /* used_event: call on the next one */
            __atomic_thread_fence(__ATOMIC_SEQ_CST);
            if (__atomic_load_n((volatile uint16_t *)(d.used + 2), __ATOMIC_ACQUIRE) != d.last_used) continue;
            struct pollfd p = { d.call, POLLIN, 0 };
            if (poll(&p, 1, 5000) == 0) { fprintf(stderr, "vublk: no completion for 5 s\n"); return 1; }
            uint64_t v;
            if (read(d.call, &v, 8) == 8) calls++;
            continue;
        }
        double t = now();
        last_completion = t;
        stall_watch = 0;
        if (!measuring && t >= t0) {
            measuring = 1;
            t0 = t;
            t_end = t0 + o->seconds;
            cpu0 = self_cpu();
            bcpu0 = o->backend_pid ? process_cpu(o->backend_pid) : 0;
            kicks0 = kicks;
            calls0 = calls;
        }
        if (running && t >= t_end) {
            running = 0;
            t1 = t;
            cpu1 = self_cpu();
            bcpu1 = o->backend_pid ? process_cpu(o->backend_pid) : 0;
            kicks1 = kicks;
            calls1 = calls;
        }
        old = d.avail_idx;
        for (; d.last_used != used_idx; d.last_used++) {
            struct vring_used_elem *e = (struct vring_used_elem *)(d.used + 4 + 8 * (d.last_used % num));
            unsigned i = e->id / 3;
            if (e->id % 3 || i >= o->qd) { fprintf(stderr, "vublk: used id %u is no chain head\n", e->id); return 1; }
            in_flight--;
            if (d.mem[HDR_OFF + 32 * i + 16] != VIRTIO_BLK_S_OK) bad_status++;
            if (o->have_pattern && !d.write
                && !check_pattern(d.mem + DATA_OFF + (size_t)i * o->bs, slots[i].offset, o->bs, o->pattern))
                mismatches++;
            if (measuring && running) {                  /* completions in the window; latency of those */
                done++;                                    /* submitted in it too */
                if (slots[i].submitted >= t0 && lat_n < lat_cap) lat[lat_n++] = t - slots[i].submitted;
            }
            if (running && submitted < limit) {
                submitted++;
                slots[i].submitted = t;
                prepare(&d, &slots[i], i);
                in_flight++;
            }
        }
        kicks += publish(&d, old);
    }
    if (running) {
        t1 = now(); cpu1 = self_cpu(); bcpu1 = o->backend_pid ? process_cpu(o->backend_pid) : 0;
        kicks1 = kicks; calls1 = calls;
    }
    /* Close without GET_VRING_BASE: every back-end here treats a hang-up as the end of the session. */
    close(d.sock);

    double elapsed = t1 - t0, sum = 0;
    qsort(lat, lat_n, sizeof *lat, cmp_double);
    for (size_t i = 0; i < lat_n; i++) sum += lat[i];
#define PCT(p) (lat_n ? lat[(size_t)((lat_n - 1) * (p))] * 1e6 : 0)
    printf("{\"rw\": \"%s\", \"bs\": %u, \"qd\": %u, \"queue_size\": %u, \"event_idx\": %s, \"wait_call\": %s, "
           "\"seconds\": %.6f, \"requests\": %" PRIu64 ", \"iops\": %.1f, \"mib_s\": %.2f, "
           "\"lat_us_mean\": %.3f, \"lat_us_p50\": %.3f, \"lat_us_p99\": %.3f, \"lat_us_p999\": %.3f, \"lat_us_max\": %.3f, "
           "\"client_cpu_s\": %.6f, \"backend_cpu_s\": %.6f, \"kicks\": %" PRIu64 ", \"calls\": %" PRIu64 ", "
           "\"bad_status\": %" PRIu64 ", \"mismatches\": %" PRIu64 ", \"capacity\": %" PRIu64 ", \"stalls\": %u}\n",
           o->rw, o->bs, o->qd, o->queue_size, o->event_idx ? "true" : "false", o->wait_call ? "true" : "false",
           elapsed, done, done / elapsed, done * (double)o->bs / elapsed / (1 << 20),
           lat_n ? sum / lat_n * 1e6 : 0, PCT(0.5), PCT(0.99), PCT(0.999), lat_n ? lat[lat_n - 1] * 1e6 : 0,
           cpu1 - cpu0, o->backend_pid ? bcpu1 - bcpu0 : -1.0, kicks1 - kicks0, calls1 - calls0, bad_status, mismatches, d.capacity_bytes,
           stall_reports);
    free(lat);
    free(slots);
    return bad_status || mismatches ? 3 : 0;
}

/* --handshakes N: N times connect (socket + GET_FEATURES), bring-up (negotiation, config, memory, one
 * ring), the first 4 KiB read completed, close; 10 ms apart so the back-end finishes with each
 * connection outside the clock. The memfd is made and mapped once; the ring area is zeroed before
 * each connection, outside the clock. One JSON object: each phase of each handshake in
 * microseconds, and the back-end's CPU over all of them (close included). */
static void print_list(const char *name, const double *v, unsigned n) {
    printf("\"%s\": [", name);
    for (unsigned i = 0; i < n; i++) printf(i ? ", %.1f" : "%.1f", v[i] * 1e6);
    printf("], ");
}

static int run_handshakes(struct options *o) {
    struct driver d = { .o = *o, .rng = o->seed | 1, .memfd = -1 };
    d.o.qd = 1;
    unsigned n = o->handshakes;
    double *t = calloc(4 * (size_t)n, sizeof *t), *connect_t = t, *bring_up = t + n, *first_read = t + 2 * n,
           *ready = t + 3 * n;
    if (!t) die("calloc");
    double bcpu0 = o->backend_pid ? process_cpu(o->backend_pid) : 0, cpu0 = self_cpu();
    for (unsigned i = 0; i < n; i++) {
        if (d.mem) memset(d.mem, 0, HDR_OFF + 0x1000);  /* rings and headers as a fresh guest has them */
        d.avail_idx = d.last_used = d.last_kick = 0;
        double t0 = now();
        connect_and_negotiate(&d);       /* stamps d.connected at GET_FEATURES' answer */
        setup_memory_and_ring(&d);
        double t3 = now();
        struct slot s;
        prepare(&d, &s, 0);
        publish(&d, 0);
        /* Wait for the call, as a guest would: a driver busy-polling on the back-end's core (nothing
         * is pinned here) would hold the CPU the back-end needs until the next scheduler tick. A call
         * may come before the request is done (back-ends signal a new call fd), so it is read. */
        struct pollfd p = { d.call, POLLIN, 0 };
        uint64_t calls;
        while (__atomic_load_n((volatile uint16_t *)(d.used + 2), __ATOMIC_ACQUIRE) == 0) {
            if (poll(&p, 1, 10000) != 1) fail("%s: the first request did not complete within 10 s", o->socket);
            if (read(d.call, &calls, 8) != 8 && errno != EAGAIN) die("call");
        }
        double t4 = now();
        if (d.mem[HDR_OFF + 16] != VIRTIO_BLK_S_OK) fail("%s: the first read failed", o->socket);
        close(d.sock);
        close(d.kick);
        close(d.call);
        connect_t[i] = d.connected - t0;
        bring_up[i] = t3 - d.connected;
        first_read[i] = t4 - t3;
        ready[i] = t4 - t0;
        usleep(10000);
    }
    double bcpu = o->backend_pid ? process_cpu(o->backend_pid) - bcpu0 : -1.0, cpu = self_cpu() - cpu0;
    printf("{\"handshakes\": %u, \"need_reply\": \"%s\", ", n, o->reply_mem_table_only ? "mem-table" : "all");
    print_list("connect_us", connect_t, n);
    print_list("bring_up_us", bring_up, n);
    print_list("first_read_us", first_read, n);
    print_list("ready_us", ready, n);
    printf("\"client_cpu_s\": %.6f, \"backend_cpu_s\": %.6f}\n", cpu, bcpu);
    free(t);
    return 0;
}

/* ---------------------------------------------------------------------------------------------
 * The null back-end: every request completes VIRTIO_BLK_S_OK at once, no data touched
 * ------------------------------------------------------------------------------------------- */

struct null_backend {
    int conn, kick, call, event_idx, enabled;
    uint64_t features, protocol;
    struct { uint8_t *base; uint64_t gpa, uva, size, map_size; } regions[8];
    int nregions;
    unsigned num;
    struct vring_desc *desc;
    volatile uint16_t *avail;
    volatile uint8_t *used;
    uint16_t last_avail, used_idx;
    uint64_t capacity;
};

static uint8_t *gpa_to_va(struct null_backend *b, uint64_t gpa, uint64_t len) {
    for (int i = 0; i < b->nregions; i++)
        if (gpa >= b->regions[i].gpa && gpa - b->regions[i].gpa + len <= b->regions[i].size)
            return b->regions[i].base + (gpa - b->regions[i].gpa);
    return NULL;
}

static uint8_t *uva_to_va(struct null_backend *b, uint64_t uva) {
    for (int i = 0; i < b->nregions; i++)
        if (uva >= b->regions[i].uva && uva - b->regions[i].uva < b->regions[i].size)
            return b->regions[i].base + (uva - b->regions[i].uva);
    return NULL;
}

static void null_unmap(struct null_backend *b) {
    for (int i = 0; i < b->nregions; i++) munmap(b->regions[i].base - 0, b->regions[i].map_size);
    b->nregions = 0;
}

/* Complete everything on the avail ring; call the driver when its suppression allows. */
static int null_serve_ring(struct null_backend *b) {
    if (!b->desc || !b->enabled) return 0;
    unsigned num = b->num;
    for (;;) {
        uint16_t avail_idx = __atomic_load_n(&b->avail[1], __ATOMIC_ACQUIRE), old_used = b->used_idx;
        if (avail_idx == b->last_avail) break;
        for (; b->last_avail != avail_idx; b->last_avail++) {
            uint16_t head = b->avail[2 + b->last_avail % num], i = head;
            unsigned hops = 0;
            while (b->desc[i].flags & VRING_DESC_F_NEXT && hops++ < num) i = b->desc[i].next;
            struct vring_desc *last = &b->desc[i];
            uint8_t *status = gpa_to_va(b, last->addr + last->len - 1, 1);
            if (!status) { fprintf(stderr, "vublk null: descriptor outside guest memory\n"); return -1; }
            *status = VIRTIO_BLK_S_OK;
            struct vring_used_elem *e = (struct vring_used_elem *)(b->used + 4 + 8 * (b->used_idx % num));
            e->id = head;
            e->len = 1;
            b->used_idx++;
        }
        __atomic_store_n((volatile uint16_t *)(b->used + 2), b->used_idx, __ATOMIC_RELEASE);
        if (b->event_idx) *(volatile uint16_t *)(b->used + 4 + 8 * num) = b->last_avail;   /* avail_event */
        __atomic_thread_fence(__ATOMIC_SEQ_CST);
        int call = b->event_idx ? need_event(b->avail[2 + num], b->used_idx, old_used)
                                : !(b->avail[0] & VRING_AVAIL_F_NO_INTERRUPT);
        if (call && b->call >= 0) {
            uint64_t one = 1;
            if (write(b->call, &one, 8) != 8) return -1;
        }
    }
    return 0;
}

static int null_reply(struct null_backend *b, struct msg *m, const void *payload, uint32_t size) {
    return send_msg(b->conn, m->hdr.request, VHOST_USER_REPLY_MASK, payload, size, NULL, 0);
}

/* One front-end message; -1 ends the session. */
static int null_message(struct null_backend *b, struct msg *m) {
    uint64_t u = 0, zero = 0;
    int replied = 0, take_fd = -1;
    memcpy(&u, m->payload, m->hdr.size < 8 ? m->hdr.size : 8);
    switch (m->hdr.request) {
    case VHOST_USER_GET_FEATURES: {
        uint64_t f = (1ULL << VIRTIO_F_VERSION_1) | (1ULL << VIRTIO_RING_F_EVENT_IDX) | (1ULL << VHOST_USER_F_PROTOCOL_FEATURES);
        replied = 1; if (null_reply(b, m, &f, 8)) return -1;
        break;
    }
    case VHOST_USER_SET_FEATURES:
        b->features = u;
        b->event_idx = !!(u & (1ULL << VIRTIO_RING_F_EVENT_IDX));
        if (!(u & (1ULL << VHOST_USER_F_PROTOCOL_FEATURES))) b->enabled = 1;
        break;
    case VHOST_USER_GET_PROTOCOL_FEATURES: {
        uint64_t f = (1ULL << VHOST_USER_PROTOCOL_F_MQ) | (1ULL << VHOST_USER_PROTOCOL_F_REPLY_ACK)
                   | (1ULL << VHOST_USER_PROTOCOL_F_CONFIG);
        replied = 1; if (null_reply(b, m, &f, 8)) return -1;
        break;
    }
    case VHOST_USER_SET_PROTOCOL_FEATURES: b->protocol = u; break;
    case VHOST_USER_GET_QUEUE_NUM: { uint64_t one = 1; replied = 1; if (null_reply(b, m, &one, 8)) return -1; break; }
    case VHOST_USER_GET_CONFIG: {                         /* capacity in the first 8 bytes, the rest zero */
        uint8_t cfg[12 + 256] = { 0 };
        uint32_t off, size;
        memcpy(&off, m->payload, 4);
        memcpy(&size, m->payload + 4, 4);
        if (m->hdr.size < 12 || size > 256 || off > 256 - size) size = 0;
        memcpy(cfg, m->payload, 12);
        memcpy(cfg + 4, &size, 4);
        uint8_t space[256] = { 0 };
        uint64_t sectors = b->capacity / SECTOR_SIZE;
        memcpy(space, &sectors, 8);
        memcpy(cfg + 12, space + off, size);
        replied = 1; if (null_reply(b, m, cfg, 12 + size)) return -1;
        break;
    }
    case VHOST_USER_SET_MEM_TABLE: {
        null_unmap(b);
        uint32_t n;
        memcpy(&n, m->payload, 4);
        if (n > 8 || (int)n != m->nfds || m->hdr.size < 8 + n * sizeof(struct vhost_memory_region)) return -1;
        for (uint32_t i = 0; i < n; i++) {
            struct vhost_memory_region r;
            memcpy(&r, m->payload + 8 + i * sizeof r, sizeof r);
            uint8_t *p = mmap(NULL, r.memory_size + r.mmap_offset, PROT_READ | PROT_WRITE, MAP_SHARED, m->fds[i], 0);
            close(m->fds[i]);
            if (p == MAP_FAILED) return -1;
            b->regions[i].base = p + r.mmap_offset;
            b->regions[i].map_size = r.memory_size + r.mmap_offset;
            b->regions[i].gpa = r.guest_phys_addr;
            b->regions[i].uva = r.userspace_addr;
            b->regions[i].size = r.memory_size;
            b->nregions = i + 1;
        }
        m->nfds = 0;
        break;
    }
    case VHOST_USER_SET_VRING_NUM: { struct vhost_vring_state s; memcpy(&s, m->payload, 8); b->num = s.num; break; }
    case VHOST_USER_SET_VRING_BASE: {
        struct vhost_vring_state s; memcpy(&s, m->payload, 8);
        b->last_avail = b->used_idx = s.num;
        break;
    }
    case VHOST_USER_SET_VRING_ADDR: {
        struct vhost_vring_addr a;
        memcpy(&a, m->payload, sizeof a);
        b->desc = (struct vring_desc *)uva_to_va(b, a.desc);
        b->avail = (volatile uint16_t *)uva_to_va(b, a.avail);
        b->used = uva_to_va(b, a.used);
        if (!b->desc || !b->avail || !b->used) return -1;
        break;
    }
    case VHOST_USER_SET_VRING_KICK:
    case VHOST_USER_SET_VRING_CALL:
        take_fd = (u & VHOST_USER_VRING_NOFD_MASK) || m->nfds < 1 ? -1 : m->fds[0];
        if (m->hdr.request == VHOST_USER_SET_VRING_KICK) { if (b->kick >= 0) close(b->kick); b->kick = take_fd; }
        else { if (b->call >= 0) close(b->call); b->call = take_fd; }
        m->nfds = 0;
        break;
    case VHOST_USER_SET_VRING_ENABLE: { struct vhost_vring_state s; memcpy(&s, m->payload, 8); b->enabled = s.num; break; }
    case VHOST_USER_GET_VRING_BASE: {
        struct vhost_vring_state s = { 0, b->last_avail };
        b->desc = NULL;
        replied = 1; if (null_reply(b, m, &s, sizeof s)) return -1;
        break;
    }
    default: break;                                      /* SET_OWNER and the rest: nothing to do */
    }
    for (int i = 0; i < m->nfds; i++) close(m->fds[i]);
    if (!replied && m->hdr.flags & VHOST_USER_NEED_REPLY_MASK && null_reply(b, m, &zero, 8)) return -1;
    return 0;
}

static _Noreturn void run_null_backend(const char *path, uint64_t capacity) {
    int lsock = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_un sa = { .sun_family = AF_UNIX };
    snprintf(sa.sun_path, sizeof sa.sun_path, "%s", path);
    unlink(path);
    if (lsock < 0 || bind(lsock, (struct sockaddr *)&sa, sizeof sa) || listen(lsock, 4)) die(path);
    signal(SIGPIPE, SIG_IGN);
    for (;;) {                                            /* one session at a time, until killed */
        struct null_backend b = { .kick = -1, .call = -1, .capacity = capacity };
        b.conn = accept4(lsock, NULL, NULL, SOCK_CLOEXEC);
        if (b.conn < 0) { if (errno == EINTR) continue; die("accept"); }
        struct msg m;
        for (;;) {
            struct pollfd p[2] = { { b.conn, POLLIN, 0 }, { b.kick, POLLIN, 0 } };
            if (poll(p, b.kick >= 0 ? 2 : 1, -1) < 0) { if (errno == EINTR) continue; break; }
            if (p[0].revents) { if (recv_msg(b.conn, &m) || null_message(&b, &m)) break; }
            if (b.kick >= 0 && p[1].revents & POLLIN) {
                uint64_t v;
                if (read(b.kick, &v, 8) < 0 && errno != EAGAIN) break;
                if (null_serve_ring(&b)) break;
            }
        }
        close(b.conn);
        if (b.kick >= 0) close(b.kick);
        if (b.call >= 0) close(b.call);
        null_unmap(&b);
    }
}

static void usage(void) {
    fputs("usage: vublk --socket PATH [--rw randread|randwrite|read|write] [--bs BYTES] [--qd N]\n"
          "             [--queue-size 128|256] [--seconds S] [--warmup S] [--event-idx] [--wait-call]\n"
          "             [--backend-pid PID] [--size BYTES] [--seed N] [--pattern SEED] [--count N]\n"
          "             [--need-reply all|mem-table]\n"
          "       vublk --socket PATH --handshakes N [--need-reply all|mem-table] [--backend-pid PID]\n"
          "       vublk --null-backend --socket PATH [--size BYTES]\n", stderr);
    exit(2);
}

int main(int argc, char **argv) {
    struct options o = { .rw = "randread", .bs = 4096, .qd = 1, .queue_size = 128, .seconds = 2, .warmup = 0.5,
                         .seed = 20261126 };
    int null_backend = 0;
    static const struct option longs[] = {
        { "socket", 1, 0, 's' }, { "rw", 1, 0, 'r' }, { "bs", 1, 0, 'b' }, { "qd", 1, 0, 'q' },
        { "queue-size", 1, 0, 'Q' }, { "seconds", 1, 0, 't' }, { "warmup", 1, 0, 'w' },
        { "event-idx", 0, 0, 'e' }, { "wait-call", 0, 0, 'c' }, { "backend-pid", 1, 0, 'p' },
        { "size", 1, 0, 'S' }, { "seed", 1, 0, 'd' }, { "count", 1, 0, 'n' }, { "pattern", 1, 0, 'P' }, { "null-backend", 0, 0, 'N' },
        { "handshakes", 1, 0, 'H' }, { "need-reply", 1, 0, 'R' },
        { 0, 0, 0, 0 } };
    for (int c; (c = getopt_long(argc, argv, "", longs, NULL)) != -1;) {
        switch (c) {
        case 's': o.socket = optarg; break;
        case 'r': o.rw = optarg; break;
        case 'b': o.bs = strtoul(optarg, NULL, 0); break;
        case 'q': o.qd = strtoul(optarg, NULL, 0); break;
        case 'Q': o.queue_size = strtoul(optarg, NULL, 0); break;
        case 't': o.seconds = strtod(optarg, NULL); break;
        case 'w': o.warmup = strtod(optarg, NULL); break;
        case 'e': o.event_idx = 1; break;
        case 'c': o.wait_call = 1; break;
        case 'p': o.backend_pid = atoi(optarg); break;
        case 'S': o.size = strtoull(optarg, NULL, 0); break;
        case 'd': o.seed = strtoull(optarg, NULL, 0); break;
        case 'n': o.count = strtoull(optarg, NULL, 0); break;
        case 'P': o.pattern = strtoull(optarg, NULL, 0); o.have_pattern = 1; break;
        case 'N': null_backend = 1; break;
        case 'H': o.handshakes = strtoul(optarg, NULL, 0); break;
        case 'R':
            if (!strcmp(optarg, "mem-table")) o.reply_mem_table_only = 1;
            else if (strcmp(optarg, "all")) usage();
            break;
        default: usage();
        }
    }
    if (!o.socket || optind != argc) usage();
    if (null_backend) run_null_backend(o.socket, o.size ? o.size : 256 << 20);
    return o.handshakes ? run_handshakes(&o) : run_driver(&o);
}
