/*
 * pyro-agent: the guest side of the pyro-mcp wire protocol (version 2).
 *
 * The wire format is specified in docs/protocol.md; the host-side codec is
 * src/pyro_mcp/guest/protocol.py. Keep the three in step.
 *
 * Modes:
 *   pyro-agent --stdio   channel = fd 0 (read) / fd 1 (write); no boot steps.
 *   /init (PID 1)        mount /dev /proc /sys, load /modules.list, mount
 *                        /dev/vda as the root, switch into it, set up cgroup2
 *                        (one cgroup per exec), open the virtio-serial port
 *                        named "agent", serve forever.
 *
 * One thread, one poll() loop over: the channel, a SIGCHLD self-pipe, the
 * stdout/stderr pipes of every running exec and the stdin pipes that have
 * bytes waiting. File operations (read, write, list) advance one step per loop
 * turn, within the credit the host granted, so nothing blocks the loop for
 * long and nothing is buffered without bound. Every field read from the wire
 * is bounds-checked; a malformed request gets an ERROR frame (EPROTO).
 *
 * One file on purpose (~2,300 lines): the agent is one static binary whose
 * build is keyed by this file's hash (guest/build.py); sections below follow
 * the order of docs/protocol.md (frames, execs, stdin, files, network, init).
 *
 * Build: cc -static -Os -Wall -Wextra -Werror -o pyro-agent agent.c \
 *           -DAGENT_VERSION="\"1.x\""
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <ctype.h>
#include <grp.h>
#include <net/route.h>
#include <netinet/in.h>
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <linux/random.h>
#include <linux/sched.h>
#include <net/if.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#ifndef AGENT_VERSION
#define AGENT_VERSION "1.dev"
#endif

#define PROTO_VERSION 2 /* announced in HELLO */
#define FRAME_VERSION 1 /* the header's version byte */
#define HDR_LEN 12
#define MAX_PAYLOAD 262144u
#define MAX_OUTPUT_CHUNK 32768u
#define MAX_ENTROPY 4096u
#define MAX_EXECS 64
#define MAX_MOUNT_RECORDS 64
#define EXIT_GRACE_MS 200
#define CHANNEL_RETRY_MS 10
#define BOOT_WAIT_MS 10000
#define MAX_ERROR_MESSAGE 1024
#define MAX_DATA_CHUNK 65536u
#define STDIN_WINDOW (256u * 1024u)
#define NO_ID 0xFFFFFFFFu
#define MAX_WIRE_PATH 4096u

enum {
    T_HELLO = 1,
    T_INIT_OK = 2,
    T_OUTPUT = 3,
    T_EXIT = 4,
    T_ERROR = 5,
    T_PONG = 6,
    T_CREDIT = 7,
    T_READ_DATA = 8,
    T_READ_END = 9,
    T_WRITE_END = 10,
    T_STAT_RESULT = 11,
    T_ENTRIES = 12,
    T_LIST_END = 13,
    T_INIT = 16,
    T_EXEC = 17,
    T_SIGNAL = 18,
    T_PING = 19,
    T_EXEC2 = 20,
    T_DATA = 21,
    T_EOF = 22,
    T_GRANT = 23,
    T_READ_FILE = 24,
    T_WRITE_FILE = 25,
    T_STAT = 26,
    T_LIST = 27,
    T_CANCEL = 28,
    T_INIT2 = 29,
};

struct exec_slot {
    int used;
    uint32_t id;
    pid_t pid; /* main child; also the process group id */
    int fd[2]; /* stdout, stderr read ends; -1 once closed */
    uint32_t cap[2];
    uint64_t sent[2];
    int truncated[2];
    int exited;
    int status;
    int timed_out;
    int64_t start_ms;
    int64_t deadline_ms; /* 0 = no timeout (or already fired) */
    int64_t exit_ms;
    uint64_t cg; /* its cgroup /sys/fs/cgroup/exec/<cg>; 0 = none */
    /* stdin (EXEC2 with stdin): a ring of STDIN_WINDOW bytes. Invariant while open:
     * in_outstanding (the host's credit) + in_len + in_owed == STDIN_WINDOW. */
    int in_fd;                   /* write end of the child's stdin pipe; -1 = none/closed */
    uint8_t *in_buf;
    uint32_t in_head, in_len;
    uint32_t in_outstanding;     /* bytes the host may still send */
    uint32_t in_owed;            /* bytes passed on (or dropped), not yet returned as credit */
    int in_eof;                  /* the host sent EOF */
    int in_broken;               /* the host overran its credit: drop everything */
};

/* A running READ_FILE, WRITE_FILE or LIST (version 2). */
enum { FOP_READ = 1, FOP_WRITE = 2, FOP_LIST = 3 };
#define MAX_FOPS 16
#define LIST_DEPTH 64
#define WRITE_WINDOW (1024u * 1024u)
#define ENTRY_MAX (4 + MAX_WIRE_PATH + 33 + MAX_WIRE_PATH)

struct list_level {
    DIR *dir;
    size_t prefix; /* length of the name prefix ("a/b/") for this level's entries */
};

struct fop {
    int used, kind;
    uint32_t id;
    int fd;
    char *path;
    uint64_t credit; /* READ/LIST: bytes the agent may still send */
    /* READ */
    uint64_t remaining, sent;
    /* WRITE */
    char *tmp;
    uint32_t mode, uid, gid;
    uint64_t written;
    uint32_t outstanding, owed;
    /* LIST */
    struct list_level stack[LIST_DEPTH];
    int depth, recursive, truncated, done;
    uint32_t count, max;
    char *name;       /* MAX_WIRE_PATH + 256: the current entry's relative name */
    uint8_t *pending; /* ENTRY_MAX: the next entry, encoded, not yet sent */
    uint32_t pending_len;
};

struct mount_record {
    char *source, *target, *fstype;
    int readonly;
};

static int stdio_mode;
static int chan_in = -1, chan_out = -1;
static int64_t chan_retry_at; /* channel hung up: do not poll it before this */
static int sigchld_pipe[2] = {-1, -1};
static struct exec_slot execs[MAX_EXECS];
static struct mount_record mounts_done[MAX_MOUNT_RECORDS];
static int n_mounts_done;

/* Per-exec cgroups (PID 1 mode only; see setup_cgroups). */
#define CG_ROOT "/sys/fs/cgroup"
#define CG_EXEC CG_ROOT "/exec"
#define MAX_LINGERING_CGROUPS 256
#define CG_RETRY_MS 1000
static int cg_enabled;
static uint32_t cg_default_pids_max;
static uint64_t cg_next = 1;
static uint64_t cg_lingering[MAX_LINGERING_CGROUPS]; /* exec cgroups still to remove */
static int n_cg_lingering;
static int64_t cg_retry_at;
/* Empty exec cgroups kept for the next execs: under TCG a cgroup's mkdir + rmdir costs
 * about 10 ms, more than the rest of an exec round trip. */
#define MAX_FREE_CGROUPS 8
static uint64_t cg_free[MAX_FREE_CGROUPS];
static uint32_t cg_free_pids_max[MAX_FREE_CGROUPS];
static int n_cg_free;
/* The pids.max each exec cgroup in use was given (so a reused one is written only when it
 * changes); an entry with cg 0 is free. */
static struct {
    uint64_t cg;
    uint32_t pids_max;
} cg_limits[MAX_EXECS + 1];

static void cg_note_pids_max(uint64_t cg, uint32_t pids_max) {
    for (size_t i = 0; i < sizeof cg_limits / sizeof *cg_limits; i++) {
        if (cg_limits[i].cg == 0 || cg_limits[i].cg == cg) {
            cg_limits[i].cg = cg;
            cg_limits[i].pids_max = pids_max;
            return;
        }
    }
}

/* The pids.max noted for cg (0 if unknown), forgetting it. */
static uint32_t cg_take_pids_max(uint64_t cg) {
    for (size_t i = 0; i < sizeof cg_limits / sizeof *cg_limits; i++) {
        if (cg_limits[i].cg == cg) {
            cg_limits[i].cg = 0;
            return cg_limits[i].pids_max;
        }
    }
    return 0;
}

static uint8_t inbuf[HDR_LEN + MAX_PAYLOAD];
static size_t inlen;
/* Room for the largest frame the agent sends: READ_DATA / ENTRIES (64 KiB) + slack. */
static uint8_t outbuf[HDR_LEN + MAX_DATA_CHUNK + 2 * MAX_WIRE_PATH + 256];
static uint8_t chunk[MAX_OUTPUT_CHUNK];
static char *default_cwd; /* INIT2's workdir; NULL = "/" */

/* ------------------------------------------------------------------ utils */

static void logmsg(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void logmsg(const char *fmt, ...) {
    char buf[512];
    int n = snprintf(buf, sizeof buf, "pyro-agent: ");
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf + n, sizeof buf - (size_t)n - 1, fmt, ap);
    va_end(ap);
    size_t len = strlen(buf);
    buf[len++] = '\n';
    ssize_t unused = write(2, buf, len);
    (void)unused;
}

static int64_t clock_ms(clockid_t id) {
    struct timespec ts;
    clock_gettime(id, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static int64_t now_ms(void) { return clock_ms(CLOCK_MONOTONIC); }

static void sleep_ms(int ms) {
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) < 0 && errno == EINTR) {
    }
}

static void put_u32(uint8_t *p, uint32_t v) {
    p[0] = (uint8_t)(v >> 24);
    p[1] = (uint8_t)(v >> 16);
    p[2] = (uint8_t)(v >> 8);
    p[3] = (uint8_t)v;
}

static void put_u64(uint8_t *p, uint64_t v) {
    put_u32(p, (uint32_t)(v >> 32));
    put_u32(p + 4, (uint32_t)v);
}

static uint32_t get_u32(const uint8_t *p) {
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}

static int mkdir_p(const char *path, mode_t mode) {
    char tmp[PATH_MAX];
    size_t len = strlen(path);
    if (len == 0 || len >= sizeof tmp) {
        errno = ENAMETOOLONG;
        return -1;
    }
    memcpy(tmp, path, len + 1);
    for (char *p = tmp + 1; *p; p++) {
        if (*p != '/')
            continue;
        *p = '\0';
        if (mkdir(tmp, mode) < 0 && errno != EEXIST)
            return -1;
        *p = '/';
    }
    if (mkdir(tmp, mode) < 0 && errno != EEXIST)
        return -1;
    return 0;
}

/* ---------------------------------------------------------------- output */

static void shutdown_and_exit(void);

/* Write all of buf to the channel. Returns 0, or -1 if the frame was lost. */
static int write_all(const uint8_t *buf, size_t len) {
    size_t off = 0;
    while (off < len) {
        ssize_t n = write(chan_out, buf + off, len - off);
        if (n > 0) {
            off += (size_t)n;
            continue;
        }
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && errno == EAGAIN) {
            struct pollfd p = {.fd = chan_out, .events = POLLOUT};
            poll(&p, 1, 100);
            continue;
        }
        if (stdio_mode)
            shutdown_and_exit(); /* host end is gone */
        logmsg("channel write failed: %s; frame dropped", n < 0 ? strerror(errno) : "short");
        return -1;
    }
    return 0;
}

static int send_frame(uint8_t type, uint32_t id, const uint8_t *payload, uint32_t len) {
    if (len > sizeof outbuf - HDR_LEN)
        return -1;
    outbuf[0] = 'P';
    outbuf[1] = 'Y';
    outbuf[2] = FRAME_VERSION;
    outbuf[3] = type;
    put_u32(outbuf + 4, id);
    put_u32(outbuf + 8, len);
    if (len && payload != outbuf + HDR_LEN)
        memmove(outbuf + HDR_LEN, payload, len);
    return write_all(outbuf, HDR_LEN + (size_t)len);
}

/* Length of the well-formed UTF-8 character at s (as Python's strict codec sees it), or 0. */
static size_t utf8_char_len(const unsigned char *s, size_t n) {
    unsigned c = s[0], lo = 0x80, hi = 0xBF;
    size_t len;
    if (c < 0x80)
        return 1;
    if (c >= 0xC2 && c <= 0xDF) {
        len = 2;
    } else if (c >= 0xE0 && c <= 0xEF) {
        len = 3;
        lo = c == 0xE0 ? 0xA0 : 0x80; /* no overlongs */
        hi = c == 0xED ? 0x9F : 0xBF; /* no surrogates */
    } else if (c >= 0xF0 && c <= 0xF4) {
        len = 4;
        lo = c == 0xF0 ? 0x90 : 0x80;
        hi = c == 0xF4 ? 0x8F : 0xBF; /* nothing above U+10FFFF */
    } else {
        return 0;
    }
    if (n < len || s[1] < lo || s[1] > hi)
        return 0;
    for (size_t i = 2; i < len; i++)
        if ((s[i] & 0xC0) != 0x80)
            return 0;
    return len;
}

static void send_error(uint32_t id, int err, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static void send_error(uint32_t id, int err, const char *fmt, ...) {
    uint8_t *p = outbuf + HDR_LEN;
    char msg[MAX_ERROR_MESSAGE];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    /* The message may quote host-sent strings and may have been cut mid-character:
     * the host's decoder insists on valid UTF-8, so replace anything else by '?'. */
    const unsigned char *m = (const unsigned char *)msg;
    size_t n = strlen(msg), i = 0;
    uint32_t mlen = 0;
    while (i < n) {
        size_t len = utf8_char_len(m + i, n - i);
        if (len == 0) {
            p[8 + mlen++] = '?';
            i++;
        } else {
            memcpy(p + 8 + mlen, m + i, len);
            mlen += (uint32_t)len;
            i += len;
        }
    }
    put_u32(p, (uint32_t)err);
    put_u32(p + 4, mlen);
    send_frame(T_ERROR, id, p, 8 + mlen);
}

static void send_hello(void) {
    uint8_t *p = outbuf + HDR_LEN;
    uint32_t vlen = (uint32_t)strlen(AGENT_VERSION);
    put_u32(p, PROTO_VERSION);
    put_u32(p + 4, vlen);
    memcpy(p + 8, AGENT_VERSION, vlen);
    put_u64(p + 8 + vlen, (uint64_t)clock_ms(CLOCK_BOOTTIME));
    send_frame(T_HELLO, 0, p, 16 + vlen);
}

static void send_credit(uint32_t id, uint32_t bytes) {
    uint8_t *p = outbuf + HDR_LEN;
    put_u32(p, bytes);
    send_frame(T_CREDIT, id, p, 4);
}

/* ------------------------------------------------------ payload reading */

struct reader {
    const uint8_t *p;
    size_t len, off;
    int bad;
};

static uint32_t rd_u32(struct reader *r) {
    if (r->bad || r->len - r->off < 4) {
        r->bad = 1;
        return 0;
    }
    uint32_t v = get_u32(r->p + r->off);
    r->off += 4;
    return v;
}

static uint64_t rd_u64(struct reader *r) {
    uint64_t hi = rd_u32(r);
    return (hi << 32) | rd_u32(r);
}

static uint8_t rd_u8(struct reader *r) {
    if (r->bad || r->len - r->off < 1) {
        r->bad = 1;
        return 0;
    }
    return r->p[r->off++];
}

/* A length-prefixed blob; *out points into the frame (not terminated). */
static uint32_t rd_bytes(struct reader *r, const uint8_t **out) {
    uint32_t n = rd_u32(r);
    if (r->bad || r->len - r->off < n) {
        r->bad = 1;
        *out = NULL;
        return 0;
    }
    *out = r->p + r->off;
    r->off += n;
    return n;
}

/* A length-prefixed string, copied and NUL-terminated (malloc). Embedded NUL = bad. */
static char *rd_str(struct reader *r) {
    const uint8_t *s;
    uint32_t n = rd_bytes(r, &s);
    if (r->bad)
        return NULL;
    if (memchr(s, 0, n)) {
        r->bad = 1;
        return NULL;
    }
    char *out = malloc((size_t)n + 1);
    if (!out) {
        r->bad = 1;
        return NULL;
    }
    memcpy(out, s, n);
    out[n] = '\0';
    return out;
}

/* A list<str> as a NULL-terminated malloc'd vector. */
static char **rd_strlist(struct reader *r, uint32_t *count_out) {
    uint32_t count = rd_u32(r);
    if (r->bad || count > (r->len - r->off) / 4) {
        r->bad = 1;
        return NULL;
    }
    char **v = calloc((size_t)count + 1, sizeof *v);
    if (!v) {
        r->bad = 1;
        return NULL;
    }
    *count_out = count;
    for (uint32_t i = 0; i < count && !r->bad; i++)
        v[i] = rd_str(r);
    return v;
}

static void free_strlist(char **v, uint32_t count) {
    if (!v)
        return;
    for (uint32_t i = 0; i < count; i++)
        free(v[i]);
    free(v);
}

static int rd_done(struct reader *r) { return !r->bad && r->off == r->len; }

/* --------------------------------------------------------------- cgroups */

/* Write text to fd in one write() and close it. Returns 0 or -1 (errno set). */
static int write_text_and_close(int fd, const char *text) {
    if (fd < 0)
        return -1;
    size_t len = strlen(text);
    ssize_t n = write(fd, text, len);
    int saved = errno;
    close(fd);
    if (n != (ssize_t)len) {
        errno = n < 0 ? saved : EIO;
        return -1;
    }
    return 0;
}

/* Write a short string to an existing file (cgroup control files). */
static int write_file(const char *path, const char *text) {
    return write_text_and_close(open(path, O_WRONLY | O_CLOEXEC), text);
}

static uint32_t mem_total_mib(void) {
    FILE *f = fopen("/proc/meminfo", "re");
    unsigned long kb = 0;
    if (f) {
        if (fscanf(f, "MemTotal: %lu kB", &kb) != 1)
            kb = 0;
        fclose(f);
    }
    return (uint32_t)(kb / 1024);
}

/*
 * PID 1 mode: mount cgroup2, move the agent into its own leaf with a high cpu.weight, and
 * make /sys/fs/cgroup/exec (low cpu.weight) the parent of one cgroup per exec. A fork bomb
 * then meets pids.max, cannot starve the agent of CPU, and dies whole by cgroup.kill.
 * Any failure leaves cg_enabled 0: execs then run as before (process groups only).
 */
static void setup_cgroups(void) {
    /* favordynmods: moving a process into a cgroup (every exec) then takes no RCU grace
     * period, which under TCG is several ms; kernels without the option mount without. */
    unsigned long flags = MS_NOSUID | MS_NODEV | MS_NOEXEC;
    if (mkdir_p(CG_ROOT, 0755) < 0 ||
        (mount("cgroup2", CG_ROOT, "cgroup2", flags, "favordynmods") < 0 && errno != EBUSY &&
         mount("cgroup2", CG_ROOT, "cgroup2", flags, NULL) < 0 && errno != EBUSY)) {
        logmsg("cgroup2 unavailable (%s): execs run without per-exec cgroups", strerror(errno));
        return;
    }
    if (mkdir(CG_ROOT "/agent", 0755) < 0 && errno != EEXIST) {
        logmsg("mkdir %s/agent: %s; no per-exec cgroups", CG_ROOT, strerror(errno));
        return;
    }
    if (write_file(CG_ROOT "/agent/cgroup.procs", "0") < 0) {
        logmsg("cannot move the agent into its cgroup: %s; no per-exec cgroups", strerror(errno));
        return;
    }
    /* One controller at a time: a kernel without one still gets the others. No memory
     * controller: the guest's OOM killer already bounds memory, and a memory cgroup per
     * exec is the costly part of making one. */
    static const char *const controllers[] = {"+pids", "+cpu"};
    int have_pids = 0;
    for (size_t i = 0; i < sizeof controllers / sizeof *controllers; i++) {
        if (write_file(CG_ROOT "/cgroup.subtree_control", controllers[i]) == 0)
            have_pids |= i == 0;
        else
            logmsg("cgroup controller %s: %s", controllers[i] + 1, strerror(errno));
    }
    if (!have_pids) {
        logmsg("no pids controller: no per-exec cgroups");
        return;
    }
    if (mkdir(CG_EXEC, 0755) < 0 && errno != EEXIST) {
        logmsg("mkdir %s: %s; no per-exec cgroups", CG_EXEC, strerror(errno));
        return;
    }
    for (size_t i = 0; i < sizeof controllers / sizeof *controllers; i++)
        write_file(CG_EXEC "/cgroup.subtree_control", controllers[i]);
    /* The agent must win the CPU against everything it runs: 10000 is the maximum. */
    if (write_file(CG_ROOT "/agent/cpu.weight", "10000") < 0 ||
        write_file(CG_EXEC "/cpu.weight", "10") < 0)
        logmsg("cpu.weight: %s", strerror(errno));
    uint32_t mib = mem_total_mib();
    cg_default_pids_max = mib < 256 ? 256 : mib > 32768 ? 32768 : mib;
    cg_enabled = 1;
}

static void cg_path(char *buf, size_t len, uint64_t cg, const char *file) {
    snprintf(buf, len, CG_EXEC "/%llu%s%s", (unsigned long long)cg, file ? "/" : "",
             file ? file : "");
}

/* Make a fresh exec cgroup with the given pids.max (0 = the default). Returns its number
 * and an O_WRONLY fd of its cgroup.procs (for the child to join), or 0 when disabled. */
static uint64_t cg_create(uint32_t pids_max, int *procs_fd) {
    *procs_fd = -1;
    if (!cg_enabled)
        return 0;
    uint32_t want = pids_max ? pids_max : cg_default_pids_max;
    uint64_t cg;
    uint32_t has = 0;
    char path[128], value[32];
    if (n_cg_free > 0) { /* reuse an empty one */
        n_cg_free--;
        cg = cg_free[n_cg_free];
        has = cg_free_pids_max[n_cg_free];
    } else {
        cg = cg_next++;
        cg_path(path, sizeof path, cg, NULL);
        if (mkdir(path, 0755) < 0) {
            logmsg("mkdir %s: %s; exec runs without its cgroup", path, strerror(errno));
            return 0;
        }
    }
    if (has != want) {
        snprintf(value, sizeof value, "%u", want);
        cg_path(path, sizeof path, cg, "pids.max");
        if (write_file(path, value) < 0)
            logmsg("%s: %s", path, strerror(errno));
    }
    cg_note_pids_max(cg, want);
    cg_path(path, sizeof path, cg, "cgroup.procs");
    *procs_fd = open(path, O_WRONLY | O_CLOEXEC);
    if (*procs_fd < 0) {
        logmsg("open %s: %s; exec runs without its cgroup", path, strerror(errno));
        cg_take_pids_max(cg);
        cg_path(path, sizeof path, cg, NULL);
        rmdir(path);
        return 0;
    }
    return cg;
}

/* fork(), but with the child born in the cgroup whose folder cg_dir is (clone3 with
 * CLONE_INTO_CGROUP): no migration afterwards, whose kernel path a freshly restored TCG
 * guest must translate first (~40 ms on the first exec). *joined says whether it worked;
 * without it (an older kernel) this is a plain fork() and the child joins by itself. */
static pid_t fork_into_cgroup(int cg_dir, int *joined) {
    *joined = 0;
#if defined(SYS_clone3) && defined(CLONE_INTO_CGROUP)
    if (cg_dir >= 0) {
        struct clone_args args;
        memset(&args, 0, sizeof args);
        args.flags = CLONE_INTO_CGROUP;
        args.exit_signal = SIGCHLD;
        args.cgroup = (uint64_t)cg_dir;
        long pid = syscall(SYS_clone3, &args, sizeof args);
        if (pid >= 0) {
            *joined = 1;
            return (pid_t)pid;
        }
    }
#else
    (void)cg_dir;
#endif
    return fork();
}

/* SIGKILL every process in the cgroup, including those that left the process group. */
static void cg_kill(uint64_t cg) {
    if (!cg)
        return;
    char path[128];
    cg_path(path, sizeof path, cg, "cgroup.kill");
    if (write_file(path, "1") < 0 && errno != ENOENT)
        logmsg("%s: %s", path, strerror(errno));
}

/* Try to remove the exec cgroups whose processes are gone; never blocks. */
static void cg_sweep(void) {
    int kept = 0;
    for (int i = 0; i < n_cg_lingering; i++) {
        char path[128];
        cg_path(path, sizeof path, cg_lingering[i], NULL);
        if (rmdir(path) < 0 && errno == EBUSY)
            cg_lingering[kept++] = cg_lingering[i]; /* still populated: retry later */
    }
    n_cg_lingering = kept;
    cg_retry_at = kept ? now_ms() + CG_RETRY_MS : 0;
}

/* Whether the cgroup has no process left (its cgroup.procs reads empty). */
static int cg_empty(uint64_t cg) {
    char path[128], buf[16];
    cg_path(path, sizeof path, cg, "cgroup.procs");
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return 0;
    ssize_t n = read(fd, buf, sizeof buf);
    close(fd);
    return n == 0;
}

/* The exec is over: keep its cgroup for the next exec if it is empty and there is room,
 * else remove it now or, while background processes live, later. */
static void cg_release(uint64_t cg) {
    if (!cg)
        return;
    uint32_t pids_max = cg_take_pids_max(cg);
    if (n_cg_free < MAX_FREE_CGROUPS && cg_empty(cg)) {
        cg_free[n_cg_free] = cg;
        cg_free_pids_max[n_cg_free] = pids_max;
        n_cg_free++;
        return;
    }
    char path[128];
    cg_path(path, sizeof path, cg, NULL);
    if (rmdir(path) == 0 || errno != EBUSY)
        return;
    if (n_cg_lingering == MAX_LINGERING_CGROUPS) {
        logmsg("too many lingering exec cgroups; %s is left in place", path);
        return;
    }
    cg_lingering[n_cg_lingering++] = cg;
    if (!cg_retry_at)
        cg_retry_at = now_ms() + CG_RETRY_MS;
}

/* ----------------------------------------------------------------- execs */

static struct exec_slot *find_exec(uint32_t id) {
    for (int i = 0; i < MAX_EXECS; i++)
        if (execs[i].used && execs[i].id == id)
            return &execs[i];
    return NULL;
}

static void close_fd(int *fd) {
    if (*fd >= 0) {
        close(*fd);
        *fd = -1;
    }
}

/* Forward one read's worth of data from stream s (0 stdout, 1 stderr), honouring the cap. */
static void forward_output(struct exec_slot *e, int s, const uint8_t *data, size_t n) {
    uint64_t room = e->sent[s] < e->cap[s] ? e->cap[s] - e->sent[s] : 0;
    size_t take = n < room ? n : (size_t)room;
    if (take < n)
        e->truncated[s] = 1;
    if (take == 0)
        return;
    uint8_t *p = outbuf + HDR_LEN;
    p[0] = (uint8_t)(s + 1);
    put_u32(p + 1, (uint32_t)take);
    memcpy(p + 5, data, take);
    send_frame(T_OUTPUT, e->id, p, (uint32_t)(5 + take));
    e->sent[s] += take;
}

/* Read what is available on stream s; closes it at EOF. max_reads bounds the work. */
static void pump(struct exec_slot *e, int s, int max_reads) {
    for (int i = 0; i < max_reads && e->fd[s] >= 0; i++) {
        ssize_t n = read(e->fd[s], chunk, sizeof chunk);
        if (n > 0) {
            forward_output(e, s, chunk, (size_t)n);
            continue;
        }
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && errno == EAGAIN)
            return;
        close_fd(&e->fd[s]); /* EOF or error */
    }
}

static void finish_exec(struct exec_slot *e) {
    for (int s = 0; s < 2; s++) {
        pump(e, s, 32); /* whatever is already buffered */
        close_fd(&e->fd[s]);
    }
    int32_t code = 0, sig = 0;
    if (WIFEXITED(e->status)) {
        code = WEXITSTATUS(e->status);
    } else if (WIFSIGNALED(e->status)) {
        sig = WTERMSIG(e->status);
        code = 128 + sig;
    }
    uint8_t *p = outbuf + HDR_LEN;
    put_u32(p, (uint32_t)code);
    put_u32(p + 4, (uint32_t)sig);
    p[8] = (uint8_t)e->timed_out;
    p[9] = (uint8_t)e->truncated[0];
    p[10] = (uint8_t)e->truncated[1];
    put_u64(p + 11, (uint64_t)(e->exit_ms - e->start_ms));
    uint32_t id = e->id;
    cg_release(e->cg);
    close_fd(&e->in_fd);
    free(e->in_buf);
    memset(e, 0, sizeof *e);
    e->fd[0] = e->fd[1] = e->in_fd = -1;
    send_frame(T_EXIT, id, p, 19);
}

static void reap_children(void) {
    int status;
    pid_t pid;
    while ((pid = waitpid(-1, &status, WNOHANG)) > 0) {
        for (int i = 0; i < MAX_EXECS; i++) {
            struct exec_slot *e = &execs[i];
            if (e->used && !e->exited && e->pid == pid) {
                e->exited = 1;
                e->status = status;
                e->exit_ms = now_ms();
                break;
            }
        }
        /* anything else is an orphan or a grandchild: reaped and forgotten */
    }
}

static void sigchld_handler(int signo) {
    (void)signo;
    int saved = errno;
    char c = 0;
    ssize_t unused = write(sigchld_pipe[1], &c, 1);
    (void)unused;
    errno = saved;
}

/* Child-side setup failure: report (stage, errno) through the error pipe. */
static void __attribute__((noreturn)) child_fail(int errfd, int stage) {
    int msg[2] = {stage, errno};
    ssize_t unused = write(errfd, msg, sizeof msg);
    (void)unused;
    _exit(127);
}

enum { STAGE_CWD = 1, STAGE_SETUP = 2, STAGE_CRED = 3 };

static int request_running(uint32_t id);
static void send_credit(uint32_t id, uint32_t bytes);

/* EXEC (v2 = 0) and EXEC2 (v2 = 1): the same steps; EXEC2 adds credentials, a default
 * cwd, a stdin pipe and a pids limit. */
static void handle_exec(uint32_t id, struct reader *r, int v2) {
    uint32_t timeout_ms = rd_u32(r);
    uint32_t caps[2];
    caps[0] = rd_u32(r);
    caps[1] = rd_u32(r);
    uint32_t uid = NO_ID, gid = NO_ID, pids_max = 0, ngroups = 0;
    uint8_t want_stdin = 0;
    gid_t *groups = NULL;
    if (v2) {
        uid = rd_u32(r);
        gid = rd_u32(r);
        pids_max = rd_u32(r);
        want_stdin = rd_u8(r);
    }
    char *cwd = rd_str(r);
    uint32_t argc = 0, envc = 0;
    char **argv = rd_strlist(r, &argc);
    char **envp = rd_strlist(r, &envc);
    if (v2) {
        ngroups = rd_u32(r);
        if (r->bad || ngroups > (r->len - r->off) / 4 || ngroups > NGROUPS_MAX) {
            r->bad = 1;
        } else {
            groups = calloc((size_t)ngroups + 1, sizeof *groups);
            if (!groups)
                r->bad = 1;
            for (uint32_t i = 0; i < ngroups && groups; i++)
                groups[i] = (gid_t)rd_u32(r);
        }
    }
    int outp[2] = {-1, -1}, errp[2] = {-1, -1}, ctl[2] = {-1, -1}, inp[2] = {-1, -1};
    int cg_procs = -1, cg_dir = -1;
    uint64_t cg = 0;
    uint8_t *in_buf = NULL;
    /* Credentials change only when asked for something other than the agent's own. */
    int set_creds = v2 && (uid != geteuid() || gid != getegid() || ngroups > 0);

    if (!rd_done(r) || argc < 1 || want_stdin > 1 || (v2 && (uid == NO_ID || gid == NO_ID))) {
        send_error(id, EPROTO, "malformed %s payload", v2 ? "EXEC2" : "EXEC");
        goto out;
    }
    if (v2 && !cwd[0]) {
        free(cwd);
        cwd = strdup(default_cwd ? default_cwd : "/");
        if (!cwd) {
            send_error(id, ENOMEM, "out of memory");
            goto out;
        }
    }
    if (request_running(id)) {
        send_error(id, EEXIST, "request id %u is already running", id);
        goto out;
    }
    struct exec_slot *e = NULL;
    for (int i = 0; i < MAX_EXECS && !e; i++)
        if (!execs[i].used)
            e = &execs[i];
    if (!e) {
        send_error(id, EAGAIN, "too many concurrent execs (limit %d)", MAX_EXECS);
        goto out;
    }
    if (pipe2(outp, O_CLOEXEC) < 0 || pipe2(errp, O_CLOEXEC) < 0 ||
        pipe2(ctl, O_CLOEXEC) < 0 || (want_stdin && pipe2(inp, O_CLOEXEC) < 0)) {
        send_error(id, errno, "pipe: %s", strerror(errno));
        goto out;
    }
    if (want_stdin && !(in_buf = malloc(STDIN_WINDOW))) {
        send_error(id, ENOMEM, "out of memory");
        goto out;
    }
    cg = cg_create(pids_max, &cg_procs);
    if (cg) {
        char cg_folder[128];
        cg_path(cg_folder, sizeof cg_folder, cg, NULL);
        cg_dir = open(cg_folder, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    }
    int64_t start = now_ms();
    int joined = 0;
    pid_t pid = fork_into_cgroup(cg_dir, &joined);
    if (pid < 0) {
        send_error(id, errno, "fork: %s", strerror(errno));
        goto out;
    }
    if (pid == 0) {
        close(ctl[0]);
        if (!joined && cg_procs >= 0 && write(cg_procs, "0", 1) != 1)
            child_fail(ctl[1], STAGE_SETUP); /* join the exec's cgroup before anything runs */
        signal(SIGPIPE, SIG_DFL);
        signal(SIGCHLD, SIG_DFL);
        sigset_t none;
        sigemptyset(&none);
        sigprocmask(SIG_SETMASK, &none, NULL);
        if (setsid() < 0)
            child_fail(ctl[1], STAGE_SETUP);
        int devnull = want_stdin ? inp[0] : open("/dev/null", O_RDONLY);
        if (devnull < 0 || dup2(devnull, 0) < 0 || dup2(outp[1], 1) < 0 ||
            dup2(errp[1], 2) < 0)
            child_fail(ctl[1], STAGE_SETUP);
        if (devnull > 2)
            close(devnull);
        if (set_creds && (setgroups(ngroups, groups) < 0 || setgid((gid_t)gid) < 0 ||
                          setuid((uid_t)uid) < 0))
            child_fail(ctl[1], STAGE_CRED);
        if (chdir(cwd) < 0)
            child_fail(ctl[1], STAGE_CWD);
        environ = envp;
        execvp(argv[0], argv);
        int err = errno;
        char msg[512];
        int n = snprintf(msg, sizeof msg, "pyro-agent: %s: %s\n", argv[0], strerror(err));
        if (n > 0) {
            ssize_t unused = write(2, msg, (size_t)n < sizeof msg ? (size_t)n : sizeof msg - 1);
            (void)unused;
        }
        _exit(err == ENOENT ? 127 : 126);
    }
    close_fd(&ctl[1]);
    close_fd(&outp[1]);
    close_fd(&errp[1]);
    close_fd(&inp[0]);
    int msg[2];
    ssize_t got;
    do {
        got = read(ctl[0], msg, sizeof msg);
    } while (got < 0 && errno == EINTR);
    if (got == (ssize_t)sizeof msg) {
        /* setup failed before exec: no EXIT, only an ERROR */
        int status;
        while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {
        }
        if (msg[0] == STAGE_CWD)
            send_error(id, msg[1], "cwd %s: %s", cwd, strerror(msg[1]));
        else if (msg[0] == STAGE_CRED)
            send_error(id, msg[1], "credentials %u:%u: %s", uid, gid, strerror(msg[1]));
        else
            send_error(id, msg[1], "exec setup: %s", strerror(msg[1]));
        goto out;
    }
    memset(e, 0, sizeof *e);
    e->used = 1;
    e->id = id;
    e->pid = pid;
    e->cg = cg;
    cg = 0;
    e->in_fd = inp[1];
    inp[1] = -1;
    if (want_stdin) {
        fcntl(e->in_fd, F_SETFL, O_NONBLOCK);
        e->in_buf = in_buf;
        in_buf = NULL;
        e->in_outstanding = STDIN_WINDOW;
    }
    e->fd[0] = outp[0];
    e->fd[1] = errp[0];
    outp[0] = errp[0] = -1;
    fcntl(e->fd[0], F_SETFL, O_NONBLOCK);
    fcntl(e->fd[1], F_SETFL, O_NONBLOCK);
    e->cap[0] = caps[0];
    e->cap[1] = caps[1];
    e->start_ms = start;
    e->deadline_ms = timeout_ms ? start + timeout_ms : 0;
    if (want_stdin)
        send_credit(id, STDIN_WINDOW);
out:
    close_fd(&outp[0]);
    close_fd(&outp[1]);
    close_fd(&errp[0]);
    close_fd(&errp[1]);
    close_fd(&ctl[0]);
    close_fd(&ctl[1]);
    close_fd(&cg_procs);
    close_fd(&cg_dir);
    close_fd(&inp[0]);
    close_fd(&inp[1]);
    cg_release(cg); /* only when the exec did not start */
    free(in_buf);
    free(groups);
    free(cwd);
    free_strlist(argv, argc);
    free_strlist(envp, envc);
}

static void handle_signal(uint32_t id, struct reader *r) {
    uint32_t signo = rd_u32(r);
    if (!rd_done(r)) {
        send_error(id, EPROTO, "malformed SIGNAL payload");
        return;
    }
    struct exec_slot *e = find_exec(id);
    if (!e) {
        send_error(id, ESRCH, "no running exec with request id %u", id);
        return;
    }
    /* Success has no reply; an ERROR here would read as "the exec failed". */
    if (signo < 1 || signo > 64) {
        logmsg("SIGNAL %u for request %u ignored: bad signal number", signo, id);
        return;
    }
    if (kill(-e->pid, (int)signo) < 0 && errno != ESRCH)
        logmsg("kill(-%d, %u): %s", (int)e->pid, signo, strerror(errno));
    if (signo == SIGKILL)
        cg_kill(e->cg);
}

/* ------------------------------------------------------------ exec stdin */

static int request_running(uint32_t id);

/* Return credit for bytes that left the stdin buffer (batched). */
static void stdin_credit(struct exec_slot *e) {
    if (e->in_broken || e->in_eof || !e->in_owed)
        return;
    if (e->in_owed < STDIN_WINDOW / 4 && e->in_len > 0)
        return;
    send_credit(e->id, e->in_owed);
    e->in_outstanding += e->in_owed;
    e->in_owed = 0;
}

/* Write what the pipe takes (never blocks); close it after EOF once drained. */
static void stdin_flush(struct exec_slot *e) {
    while (e->in_fd >= 0 && e->in_len > 0) {
        uint32_t piece = STDIN_WINDOW - e->in_head;
        if (piece > e->in_len)
            piece = e->in_len;
        ssize_t n = write(e->in_fd, e->in_buf + e->in_head, piece);
        if (n > 0) {
            e->in_head = (e->in_head + (uint32_t)n) % STDIN_WINDOW;
            e->in_len -= (uint32_t)n;
            e->in_owed += (uint32_t)n;
            continue;
        }
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && errno == EAGAIN)
            break;
        /* EPIPE: the command closed its stdin. What is buffered (and what comes) is dropped. */
        close_fd(&e->in_fd);
        e->in_owed += e->in_len;
        e->in_len = 0;
    }
    if (e->in_fd >= 0 && e->in_len == 0 && e->in_eof)
        close_fd(&e->in_fd);
    stdin_credit(e);
}

static void stdin_data(struct exec_slot *e, const uint8_t *data, uint32_t n) {
    if (!e->in_buf || e->in_broken || e->in_eof)
        return; /* no stdin, or after EOF: dropped */
    if (n > e->in_outstanding) {
        logmsg("request %u sent %u stdin bytes past its credit; stdin closed", e->id, n);
        e->in_broken = 1;
        close_fd(&e->in_fd);
        e->in_len = 0;
        return;
    }
    e->in_outstanding -= n;
    if (e->in_fd < 0) { /* the command closed its stdin: drop, but keep the host moving */
        e->in_owed += n;
    } else {
        uint32_t tail = (e->in_head + e->in_len) % STDIN_WINDOW;
        uint32_t first = STDIN_WINDOW - tail < n ? STDIN_WINDOW - tail : n;
        memcpy(e->in_buf + tail, data, first);
        memcpy(e->in_buf, data + first, n - first);
        e->in_len += n;
    }
    stdin_flush(e);
}

/* ------------------------------------------------------- file operations */

static struct fop fops[MAX_FOPS];

static struct fop *find_fop(uint32_t id) {
    for (int i = 0; i < MAX_FOPS; i++)
        if (fops[i].used && fops[i].id == id)
            return &fops[i];
    return NULL;
}

static int request_running(uint32_t id) { return find_exec(id) || find_fop(id); }

/* A write that did not commit leaves nothing behind: removed before any reply is sent. */
static void fop_discard_tmp(struct fop *f) {
    if (f->tmp)
        unlink(f->tmp);
    free(f->tmp);
    f->tmp = NULL;
}

static void fop_free(struct fop *f) {
    close_fd(&f->fd);
    fop_discard_tmp(f);
    for (int i = 0; i < f->depth; i++)
        closedir(f->stack[i].dir);
    free(f->path);
    free(f->name);
    free(f->pending);
    memset(f, 0, sizeof *f);
    f->fd = -1;
}

static void fop_fail(struct fop *f, int err, const char *what) {
    fop_discard_tmp(f);
    send_error(f->id, err, "%s %s: %s", what, f->path, strerror(err));
    fop_free(f);
}

/* Claim a slot for request id (answers ERROR and returns NULL when it cannot). */
static struct fop *fop_new(uint32_t id, int kind, char *path) {
    struct fop *f = NULL;
    if (request_running(id)) {
        send_error(id, EEXIST, "request id %u is already running", id);
    } else {
        for (int i = 0; i < MAX_FOPS && !f; i++)
            if (!fops[i].used)
                f = &fops[i];
        if (!f)
            send_error(id, EAGAIN, "too many concurrent file operations (limit %d)", MAX_FOPS);
    }
    if (!f) {
        free(path);
        return NULL;
    }
    memset(f, 0, sizeof *f);
    f->used = 1;
    f->id = id;
    f->kind = kind;
    f->fd = -1;
    f->path = path;
    return f;
}

/* A wire path: 1..4096 bytes, no NUL; copied and NUL-terminated (malloc). */
static char *rd_path(struct reader *r) {
    char *s = rd_str(r);
    size_t n = s ? strlen(s) : 0;
    if (s && (n == 0 || n > MAX_WIRE_PATH)) {
        free(s);
        r->bad = 1;
        return NULL;
    }
    return s;
}

static uint8_t file_kind(mode_t mode) {
    switch (mode & S_IFMT) {
    case S_IFDIR:
        return 2;
    case S_IFLNK:
        return 3;
    case S_IFIFO:
        return 4;
    case S_IFSOCK:
        return 5;
    case S_IFCHR:
        return 6;
    case S_IFBLK:
        return 7;
    default:
        return 1;
    }
}

/* Encode a wire `stat` at p; returns its length. link may be NULL (not a symlink). */
static size_t put_stat(uint8_t *p, const struct stat *st, const char *link, size_t link_len) {
    p[0] = file_kind(st->st_mode);
    put_u32(p + 1, (uint32_t)(st->st_mode & 07777));
    put_u32(p + 5, (uint32_t)st->st_uid);
    put_u32(p + 9, (uint32_t)st->st_gid);
    put_u64(p + 13, (uint64_t)st->st_size);
    int64_t ns = (int64_t)st->st_mtim.tv_sec * 1000000000 + st->st_mtim.tv_nsec;
    put_u64(p + 21, (uint64_t)ns);
    if (p[0] != 3)
        link_len = 0;
    put_u32(p + 29, (uint32_t)link_len);
    if (link_len)
        memcpy(p + 33, link, link_len);
    return 33 + link_len;
}

/* lstat-style `stat` of name in dirfd (a symlink's target read, never followed). */
static ssize_t stat_at(int dirfd, const char *name, uint8_t *p) {
    struct stat st;
    if (fstatat(dirfd, name, &st, AT_SYMLINK_NOFOLLOW) < 0)
        return -1;
    char link[MAX_WIRE_PATH + 1]; /* one more: a longer target reads as truncated */
    ssize_t link_len = 0;
    if (S_ISLNK(st.st_mode)) {
        link_len = readlinkat(dirfd, name, link, sizeof link);
        if (link_len < 0)
            return -1;
        if (link_len == 0 || link_len > (ssize_t)MAX_WIRE_PATH) {
            errno = ENAMETOOLONG; /* too long for the wire */
            return -1;
        }
    }
    return (ssize_t)put_stat(p, &st, link, (size_t)link_len);
}

static void handle_stat(uint32_t id, struct reader *r) {
    char *path = rd_path(r);
    if (!rd_done(r)) {
        send_error(id, EPROTO, "malformed STAT payload");
    } else {
        uint8_t *p = outbuf + HDR_LEN;
        ssize_t n = stat_at(AT_FDCWD, path, p);
        if (n < 0)
            send_error(id, errno, "stat %s: %s", path, strerror(errno));
        else
            send_frame(T_STAT_RESULT, id, p, (uint32_t)n);
    }
    free(path);
}

/* ---- READ_FILE */

static void handle_read_file(uint32_t id, struct reader *r) {
    char *path = rd_path(r);
    uint64_t offset = rd_u64(r), max_bytes = rd_u64(r);
    uint32_t window = rd_u32(r);
    if (!rd_done(r)) {
        free(path);
        send_error(id, EPROTO, "malformed READ_FILE payload");
        return;
    }
    struct fop *f = fop_new(id, FOP_READ, path);
    if (!f)
        return;
    /* O_NONBLOCK: opening a fifo must not hang the agent (it is refused below). */
    f->fd = open(path, O_RDONLY | O_NONBLOCK | O_NOCTTY | O_CLOEXEC);
    struct stat st;
    if (f->fd < 0 || fstat(f->fd, &st) < 0)
        return fop_fail(f, errno, "open");
    if (S_ISDIR(st.st_mode))
        return fop_fail(f, EISDIR, "read");
    if (!S_ISREG(st.st_mode))
        return fop_fail(f, EINVAL, "read (not a regular file)");
    if (offset > (uint64_t)INT64_MAX)
        return fop_fail(f, EINVAL, "seek");
    if (lseek(f->fd, (off_t)offset, SEEK_SET) < 0)
        return fop_fail(f, errno, "seek");
    f->remaining = max_bytes;
    f->credit = window;
}

static void read_finish(struct fop *f) {
    int truncated = 0;
    if (f->remaining == 0) { /* stopped by max_bytes: is there more? */
        char c;
        ssize_t n;
        while ((n = read(f->fd, &c, 1)) < 0 && errno == EINTR) {
        }
        truncated = n == 1;
    }
    struct stat st;
    if (fstat(f->fd, &st) < 0)
        return fop_fail(f, errno, "stat");
    uint8_t *p = outbuf + HDR_LEN;
    size_t n = put_stat(p, &st, NULL, 0);
    put_u64(p + n, f->sent);
    p[n + 8] = (uint8_t)truncated;
    send_frame(T_READ_END, f->id, p, (uint32_t)(n + 9));
    fop_free(f);
}

/* One READ_DATA chunk, if credit allows. Returns 1 when it made progress. */
static int read_step(struct fop *f) {
    if (f->remaining == 0) {
        read_finish(f);
        return 1;
    }
    if (f->credit == 0)
        return 0;
    uint64_t want = MAX_DATA_CHUNK;
    if (want > f->credit)
        want = f->credit;
    if (want > f->remaining)
        want = f->remaining;
    uint8_t *p = outbuf + HDR_LEN;
    ssize_t got = read(f->fd, p + 4, (size_t)want);
    if (got < 0) {
        if (errno != EINTR)
            fop_fail(f, errno, "read");
        return 1;
    }
    if (got == 0) {
        read_finish(f);
        return 1;
    }
    put_u32(p, (uint32_t)got);
    send_frame(T_READ_DATA, f->id, p, 4 + (uint32_t)got);
    f->credit -= (uint64_t)got;
    f->remaining -= (uint64_t)got;
    f->sent += (uint64_t)got;
    return 1;
}

/* ---- WRITE_FILE */

/* mkdir -p the folders above path; new folders get 0755 and, if given, the owner. */
static int make_parents(const char *path, uint32_t uid, uint32_t gid) {
    char tmp[PATH_MAX];
    size_t len = strlen(path);
    if (len >= sizeof tmp) {
        errno = ENAMETOOLONG;
        return -1;
    }
    memcpy(tmp, path, len + 1);
    for (char *p = tmp + 1; *p; p++) {
        if (*p != '/')
            continue;
        *p = '\0';
        if (mkdir(tmp, 0755) == 0) {
            if ((uid != NO_ID || gid != NO_ID) && lchown(tmp, uid, gid) < 0)
                return -1;
        } else if (errno != EEXIST) {
            return -1;
        }
        *p = '/';
    }
    return 0;
}

static void handle_write_file(uint32_t id, struct reader *r) {
    static uint64_t counter;
    char *path = rd_path(r);
    uint32_t mode = rd_u32(r);
    uint8_t keep = rd_u8(r), parents = rd_u8(r);
    uint32_t uid = rd_u32(r), gid = rd_u32(r);
    if (!rd_done(r) || mode > 07777 || keep > 1 || parents > 1) {
        free(path);
        send_error(id, EPROTO, "malformed WRITE_FILE payload");
        return;
    }
    struct fop *f = fop_new(id, FOP_WRITE, path);
    if (!f)
        return;
    size_t len = strlen(path);
    const char *slash = strrchr(path, '/');
    size_t dir_len = slash ? (size_t)(slash - path) : 0;
    if (path[len - 1] == '/')
        return fop_fail(f, EISDIR, "write");
    if (parents && make_parents(path, uid, gid) < 0)
        return fop_fail(f, errno, "create the parents of");
    struct stat st;
    if (lstat(path, &st) == 0) {
        if (S_ISDIR(st.st_mode))
            return fop_fail(f, EISDIR, "write");
        if (keep) {
            mode = st.st_mode & 07777;
            uid = st.st_uid;
            gid = st.st_gid;
        }
    } else if (errno != ENOENT) {
        return fop_fail(f, errno, "write");
    }
    f->mode = mode;
    f->uid = uid;
    f->gid = gid;
    f->tmp = malloc(dir_len + 64);
    if (!f->tmp)
        return fop_fail(f, ENOMEM, "write");
    snprintf(f->tmp, dir_len + 64, "%.*s%s.pyro-write-%d-%llu.tmp", (int)dir_len, path,
             slash ? "/" : "", (int)getpid(), (unsigned long long)++counter);
    f->fd = open(f->tmp, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
    if (f->fd < 0) {
        int err = errno;
        free(f->tmp);
        f->tmp = NULL; /* not ours: never unlink it */
        return fop_fail(f, err, "write");
    }
    f->outstanding = WRITE_WINDOW;
    send_credit(id, WRITE_WINDOW);
}

static void write_data(struct fop *f, const uint8_t *data, uint32_t n) {
    if (n > f->outstanding) {
        fop_discard_tmp(f);
        send_error(f->id, EPROTO, "write %s: the host sent %u bytes past its credit", f->path, n);
        fop_free(f);
        return;
    }
    f->outstanding -= n;
    for (uint32_t off = 0; off < n;) {
        ssize_t w = write(f->fd, data + off, n - off);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            return fop_fail(f, w < 0 ? errno : EIO, "write");
        off += (uint32_t)w;
    }
    f->written += n;
    f->owed += n;
    if (f->owed >= WRITE_WINDOW / 2) {
        send_credit(f->id, f->owed);
        f->outstanding += f->owed;
        f->owed = 0;
    }
}

static void write_commit(struct fop *f) {
    /* chown before chmod: chown clears the set-id bits. */
    if ((f->uid != NO_ID || f->gid != NO_ID) && fchown(f->fd, f->uid, f->gid) < 0)
        return fop_fail(f, errno, "chown");
    if (fchmod(f->fd, f->mode) < 0)
        return fop_fail(f, errno, "chmod");
    if (rename(f->tmp, f->path) < 0)
        return fop_fail(f, errno, "rename onto");
    free(f->tmp);
    f->tmp = NULL;
    struct stat st;
    if (fstat(f->fd, &st) < 0)
        return fop_fail(f, errno, "stat");
    uint8_t *p = outbuf + HDR_LEN;
    size_t n = put_stat(p, &st, NULL, 0);
    put_u64(p + n, f->written);
    send_frame(T_WRITE_END, f->id, p, (uint32_t)(n + 8));
    fop_free(f);
}

/* ---- LIST */

static void handle_list(uint32_t id, struct reader *r) {
    char *path = rd_path(r);
    uint8_t recursive = rd_u8(r);
    uint32_t max = rd_u32(r), window = rd_u32(r);
    if (!rd_done(r) || recursive > 1 || max > (1u << 20)) {
        free(path);
        send_error(id, EPROTO, "malformed LIST payload");
        return;
    }
    struct fop *f = fop_new(id, FOP_LIST, path);
    if (!f)
        return;
    f->name = malloc(MAX_WIRE_PATH + 256 + 2);
    f->pending = malloc(ENTRY_MAX);
    if (!f->name || !f->pending)
        return fop_fail(f, ENOMEM, "list");
    int fd = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    DIR *d = fd < 0 ? NULL : fdopendir(fd);
    if (!d) {
        int err = errno;
        if (fd >= 0)
            close(fd);
        return fop_fail(f, err, "list");
    }
    f->stack[0] = (struct list_level){d, 0};
    f->depth = 1;
    f->recursive = recursive;
    f->max = max;
    f->credit = window;
}

/* Encode the next entry into f->pending. Returns 1, or 0 when the walk is over. */
static int list_next(struct fop *f) {
    while (f->depth > 0) {
        struct list_level *top = &f->stack[f->depth - 1];
        errno = 0;
        struct dirent *de = readdir(top->dir);
        if (!de) {
            closedir(top->dir);
            f->depth--;
            continue;
        }
        if (!strcmp(de->d_name, ".") || !strcmp(de->d_name, ".."))
            continue;
        size_t nlen = strlen(de->d_name);
        if (top->prefix + nlen > MAX_WIRE_PATH)
            continue; /* a name the wire cannot carry (deeper than 4096 bytes): skipped */
        if (f->count >= f->max) {
            f->truncated = 1;
            return 0;
        }
        memcpy(f->name + top->prefix, de->d_name, nlen + 1);
        size_t full = top->prefix + nlen;
        uint8_t *p = f->pending;
        put_u32(p, (uint32_t)full);
        memcpy(p + 4, f->name, full);
        ssize_t st_len = stat_at(dirfd(top->dir), de->d_name, p + 4 + full);
        if (st_len < 0)
            continue; /* vanished meanwhile, or an unreadable link: skipped */
        f->pending_len = (uint32_t)(4 + full + (size_t)st_len);
        if (f->recursive && p[4 + full] == 2 && f->depth < LIST_DEPTH &&
            full + 1 < MAX_WIRE_PATH) {
            int fd = openat(dirfd(top->dir), de->d_name,
                            O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
            DIR *d = fd < 0 ? NULL : fdopendir(fd);
            if (d) {
                f->name[full] = '/';
                f->stack[f->depth++] = (struct list_level){d, full + 1};
            } else if (fd >= 0) {
                close(fd);
            }
        }
        return 1;
    }
    return 0;
}

/* One ENTRIES frame, as big as the credit allows; LIST_END when done. */
static int list_step(struct fop *f) {
    uint8_t *p = outbuf + HDR_LEN;
    uint64_t cap = f->credit < MAX_DATA_CHUNK ? f->credit : MAX_DATA_CHUNK;
    size_t len = 4;
    uint32_t n = 0;
    for (;;) {
        if (!f->pending_len && (f->done || !list_next(f))) {
            f->done = 1;
            break;
        }
        if (len + f->pending_len > cap)
            break;
        memcpy(p + len, f->pending, f->pending_len);
        len += f->pending_len;
        f->pending_len = 0;
        n++;
        f->count++;
    }
    if (n) {
        put_u32(p, n);
        send_frame(T_ENTRIES, f->id, p, (uint32_t)len);
        f->credit -= len;
    }
    if (f->done && !f->pending_len) {
        put_u32(p, f->count);
        p[4] = (uint8_t)f->truncated;
        send_frame(T_LIST_END, f->id, p, 5);
        fop_free(f);
        return 1;
    }
    return n > 0;
}

/* Advance every file operation by one step; 1 if any could go on at once. */
static int fops_step(void) {
    int busy = 0;
    for (int i = 0; i < MAX_FOPS; i++) {
        struct fop *f = &fops[i];
        if (!f->used)
            continue;
        if (f->kind == FOP_READ && read_step(f) && fops[i].used)
            busy = 1;
        else if (f->kind == FOP_LIST && list_step(f) && fops[i].used)
            busy = 1;
    }
    return busy;
}

/* ---- DATA / EOF / GRANT / CANCEL: for a running request; otherwise dropped */

static void handle_stream(uint8_t type, uint32_t id, struct reader *r) {
    const uint8_t *data = NULL;
    uint32_t n = 0, grant = 0;
    if (type == T_DATA)
        n = rd_bytes(r, &data);
    else if (type == T_GRANT)
        grant = rd_u32(r);
    int ok = rd_done(r) && n <= MAX_DATA_CHUNK;
    struct exec_slot *e = find_exec(id);
    struct fop *f = find_fop(id);
    if (!ok) {
        if (f) {
            fop_discard_tmp(f);
            send_error(id, EPROTO, "malformed stream frame (type %u)", type);
            fop_free(f);
        } else {
            logmsg("malformed stream frame (type %u) for request %u dropped", type, id);
        }
        return;
    }
    if (e) {
        if (type == T_DATA) {
            stdin_data(e, data, n);
        } else if (type == T_EOF && e->in_buf && !e->in_eof) {
            e->in_eof = 1;
            stdin_flush(e);
        }
        return;
    }
    if (!f)
        return;
    if (type == T_CANCEL) {
        fop_discard_tmp(f);
        send_error(id, ECANCELED, "cancelled");
        fop_free(f);
    } else if (type == T_GRANT && f->kind != FOP_WRITE) {
        f->credit += grant;
    } else if (type == T_DATA && f->kind == FOP_WRITE) {
        write_data(f, data, n);
    } else if (type == T_EOF && f->kind == FOP_WRITE) {
        write_commit(f);
    } else {
        fop_discard_tmp(f);
        send_error(id, EPROTO, "message type %u does not apply to this request", type);
        fop_free(f);
    }
}

/* ------------------------------------------------------------ network */

static int set_addr(int s, unsigned long req, const char *ifname, const uint8_t *a4) {
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    strncpy(ifr.ifr_name, ifname, IFNAMSIZ - 1);
    struct sockaddr_in *sin = (struct sockaddr_in *)&ifr.ifr_addr;
    sin->sin_family = AF_INET;
    memcpy(&sin->sin_addr, a4, 4);
    return ioctl(s, req, &ifr);
}

/* Address, netmask, MTU, up, default route. Returns 0 or an errno (message in err). */
static int configure_interface(const char *name, const uint8_t *addr, uint8_t prefix,
                               const uint8_t *gw, uint32_t mtu, char *err, size_t errlen) {
    int s = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (s < 0) {
        snprintf(err, errlen, "socket: %s", strerror(errno));
        return errno;
    }
    uint32_t mask_h = prefix ? 0xFFFFFFFFu << (32 - prefix) : 0;
    uint8_t mask[4] = {(uint8_t)(mask_h >> 24), (uint8_t)(mask_h >> 16), (uint8_t)(mask_h >> 8),
                       (uint8_t)mask_h};
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    strncpy(ifr.ifr_name, name, IFNAMSIZ - 1);
    const char *step = "SIOCSIFADDR";
    int rc = set_addr(s, SIOCSIFADDR, name, addr);
    if (rc < 0 && errno == EEXIST)
        rc = 0; /* the same address again (INIT2 after a restore) */
    if (rc == 0) {
        step = "SIOCSIFNETMASK";
        rc = set_addr(s, SIOCSIFNETMASK, name, mask);
    }
    if (rc == 0 && mtu) {
        step = "SIOCSIFMTU";
        ifr.ifr_mtu = (int)mtu;
        rc = ioctl(s, SIOCSIFMTU, &ifr);
    }
    if (rc == 0) {
        step = "SIOCGIFFLAGS";
        rc = ioctl(s, SIOCGIFFLAGS, &ifr);
    }
    if (rc == 0) {
        step = "SIOCSIFFLAGS";
        ifr.ifr_flags |= IFF_UP | IFF_RUNNING;
        rc = ioctl(s, SIOCSIFFLAGS, &ifr);
    }
    if (rc == 0 && gw) {
        step = "SIOCADDRT";
        struct rtentry rt;
        memset(&rt, 0, sizeof rt);
        char dev[IFNAMSIZ];
        snprintf(dev, sizeof dev, "%s", name);
        ((struct sockaddr_in *)&rt.rt_dst)->sin_family = AF_INET;
        ((struct sockaddr_in *)&rt.rt_genmask)->sin_family = AF_INET;
        struct sockaddr_in *g = (struct sockaddr_in *)&rt.rt_gateway;
        g->sin_family = AF_INET;
        memcpy(&g->sin_addr, gw, 4);
        rt.rt_flags = RTF_UP | RTF_GATEWAY;
        rt.rt_dev = dev;
        rc = ioctl(s, SIOCADDRT, &rt);
        if (rc < 0 && errno == EEXIST)
            rc = 0;
    }
    int saved = errno;
    close(s);
    if (rc < 0) {
        snprintf(err, errlen, "%s %s: %s", step, name, strerror(saved));
        return saved;
    }
    return 0;
}

/* Rewrite a small file in place (a bind mount there stays valid; a symlink is replaced). */
static int write_etc(const char *path, const char *text) {
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_NOFOLLOW | O_CLOEXEC, 0644);
    if (fd < 0 && errno == ELOOP && unlink(path) == 0)
        fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_NOFOLLOW | O_CLOEXEC, 0644);
    return write_text_and_close(fd, text);
}

/* snprintf at buf + *len, keeping *len within the buffer (output cut at its end). */
static void appendf(char *buf, size_t size, size_t *len, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
static void appendf(char *buf, size_t size, size_t *len, const char *fmt, ...) {
    if (*len + 1 >= size)
        return;
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(buf + *len, size - *len, fmt, ap);
    va_end(ap);
    if (n > 0)
        *len = *len + (size_t)n < size ? *len + (size_t)n : size - 1;
}

static int hostname_ok(const uint8_t *s, uint32_t n) {
    if (n == 0 || n > 253)
        return 0;
    for (uint32_t i = 0; i < n; i++)
        if (!(isalnum(s[i]) || s[i] == '.' || s[i] == '-' || s[i] == '_'))
            return 0;
    return 1;
}

static int rd_addr(struct reader *r, const uint8_t **a, int v4_only) {
    uint32_t n = rd_bytes(r, a);
    if (!r->bad && !(n == 4 || (!v4_only && n == 16)))
        r->bad = 1;
    return (int)n;
}

/* Parse (validate == 1) or apply (validate == 0) INIT2's network part at r. */
static int network_step(uint32_t id, struct reader *r, int validate) {
    char err[256];
    /* Sized for the limits (16 servers, 6 domains, 64 entries of 253-byte names);
     * appendf never writes past the end anyway. */
    static char resolv[4096], hosts[64 * 300 + 128];
    uint32_t nif = rd_u32(r);
    if (r->bad || nif > 16)
        return r->bad = 1, -1;
    for (uint32_t i = 0; i < nif; i++) {
        char *name = rd_str(r);
        const uint8_t *addr, *gw;
        rd_addr(r, &addr, 1);
        uint8_t prefix = rd_u8(r);
        uint32_t gwlen = rd_bytes(r, &gw);
        uint32_t mtu = rd_u32(r);
        int bad = r->bad || !name || !name[0] || strlen(name) >= IFNAMSIZ || strchr(name, '/') ||
                  prefix > 32 || (gwlen != 0 && gwlen != 4);
        if (bad) {
            free(name);
            return r->bad = 1, -1;
        }
        if (!validate) {
            int rc = configure_interface(name, addr, prefix, gwlen ? gw : NULL, mtu, err,
                                         sizeof err);
            if (rc) {
                send_error(id, rc, "%s", err);
                free(name);
                return -1;
            }
        }
        free(name);
    }
    size_t rl = 0, hl = 0;
    uint32_t nns = rd_u32(r);
    if (r->bad || nns > 16)
        return r->bad = 1, -1;
    for (uint32_t i = 0; i < nns; i++) {
        const uint8_t *a;
        int n = rd_addr(r, &a, 0);
        char text[INET6_ADDRSTRLEN];
        if (r->bad)
            return -1;
        inet_ntop(n == 4 ? AF_INET : AF_INET6, a, text, sizeof text);
        appendf(resolv, sizeof resolv, &rl, "nameserver %s\n", text);
    }
    uint32_t nsearch = rd_u32(r);
    if (r->bad || nsearch > 6)
        return r->bad = 1, -1;
    for (uint32_t i = 0; i < nsearch; i++) {
        const uint8_t *d;
        uint32_t n = rd_bytes(r, &d);
        if (r->bad || !hostname_ok(d, n))
            return r->bad = 1, -1;
        appendf(resolv, sizeof resolv, &rl, "%s%.*s%s", i ? " " : "search ",
                               (int)n, d, i + 1 == nsearch ? "\n" : "");
    }
    appendf(hosts, sizeof hosts, &hl, "127.0.0.1\tlocalhost\n::1\tlocalhost\n"
                                               "127.0.1.1\tpyro\n");
    uint32_t nhosts = rd_u32(r);
    if (r->bad || nhosts > 64)
        return r->bad = 1, -1;
    for (uint32_t i = 0; i < nhosts; i++) {
        const uint8_t *a, *name;
        int n = rd_addr(r, &a, 0);
        uint32_t nl = rd_bytes(r, &name);
        char text[INET6_ADDRSTRLEN];
        if (r->bad || !hostname_ok(name, nl))
            return r->bad = 1, -1;
        inet_ntop(n == 4 ? AF_INET : AF_INET6, a, text, sizeof text);
        appendf(hosts, sizeof hosts, &hl, "%s\t%.*s\n", text, (int)nl, name);
    }
    if (validate)
        return 0;
    if (write_etc("/etc/resolv.conf", resolv) < 0) {
        send_error(id, errno, "write /etc/resolv.conf: %s", strerror(errno));
        return -1;
    }
    if (write_etc("/etc/hosts", hosts) < 0) {
        send_error(id, errno, "write /etc/hosts: %s", strerror(errno));
        return -1;
    }
    return 0;
}

/* ------------------------------------------------------------------ init */

static int mount_recorded(const char *src, const char *tgt, const char *fs, int ro) {
    for (int i = 0; i < n_mounts_done; i++) {
        struct mount_record *m = &mounts_done[i];
        if (m->readonly == ro && !strcmp(m->source, src) && !strcmp(m->target, tgt) &&
            !strcmp(m->fstype, fs))
            return 1;
    }
    return 0;
}

static void record_mount(const char *src, const char *tgt, const char *fs, int ro) {
    if (n_mounts_done >= MAX_MOUNT_RECORDS)
        return;
    struct mount_record *m = &mounts_done[n_mounts_done];
    m->source = strdup(src);
    m->target = strdup(tgt);
    m->fstype = strdup(fs);
    m->readonly = ro;
    if (m->source && m->target && m->fstype)
        n_mounts_done++;
}

/* Read INIT2's tail after the mounts: workdir and (validate or apply) the network. */
static int init2_tail(uint32_t id, struct reader *r, int validate) {
    char *workdir = rd_str(r);
    uint8_t has_net = rd_u8(r);
    if (r->bad || has_net > 1) {
        free(workdir);
        return r->bad = 1, -1;
    }
    if (has_net && network_step(id, r, validate) < 0) {
        free(workdir);
        return -1;
    }
    if (validate) {
        free(workdir);
        return 0;
    }
    free(default_cwd);
    default_cwd = workdir[0] ? workdir : NULL;
    if (!workdir[0])
        free(workdir);
    return 0;
}

/* INIT (v2 = 0) and INIT2 (v2 = 1). */
static void handle_init(uint32_t id, struct reader *r, int v2) {
    const char *what = v2 ? "INIT2" : "INIT";
    uint64_t unix_ns = rd_u64(r);
    const uint8_t *entropy;
    uint32_t elen = rd_bytes(r, &entropy);
    uint32_t count = rd_u32(r);
    if (r->bad || elen > MAX_ENTROPY || count > (r->len - r->off) / 13) {
        send_error(id, EPROTO, "malformed %s payload", what);
        return;
    }
    /* Validate the whole payload before acting on any of it. */
    size_t mounts_at = r->off;
    for (uint32_t i = 0; i < count; i++) {
        free(rd_str(r));
        free(rd_str(r));
        free(rd_str(r));
        uint8_t ro = rd_u8(r);
        if (ro > 1)
            r->bad = 1;
    }
    if (v2 && !r->bad)
        init2_tail(id, r, 1);
    if (!rd_done(r)) {
        send_error(id, EPROTO, "malformed %s payload", what);
        return;
    }
    /* The clock and the entropy pool are the machine's: only PID 1 owns them. */
    if (!stdio_mode) {
        struct timespec ts = {(time_t)(unix_ns / 1000000000u), (long)(unix_ns % 1000000000u)};
        if (clock_settime(CLOCK_REALTIME, &ts) < 0)
            logmsg("clock_settime: %s", strerror(errno));
    }
    if (elen) {
        int fd = open("/dev/urandom", O_WRONLY | O_CLOEXEC);
        if (fd >= 0) {
            struct rand_pool_info *rp = stdio_mode ? NULL : calloc(1, sizeof *rp + elen + 4);
            if (rp) {
                rp->entropy_count = (int)(elen * 8); /* credited: the host's randomness */
                rp->buf_size = (int)elen;
                memcpy(rp->buf, entropy, elen);
                if (ioctl(fd, RNDADDENTROPY, rp) < 0)
                    logmsg("RNDADDENTROPY: %s", strerror(errno));
                /* A restored snapshot starts with the snapshot's generator state:
                 * force a reseed so every restored VM draws from the new entropy. */
                if (ioctl(fd, RNDRESEEDCRNG) < 0)
                    logmsg("RNDRESEEDCRNG: %s", strerror(errno));
                free(rp);
            }
            ssize_t unused = write(fd, entropy, elen);
            (void)unused;
            close(fd);
        }
    }
    r->off = mounts_at;
    for (uint32_t i = 0; i < count; i++) {
        char *src = rd_str(r), *tgt = rd_str(r), *fs = rd_str(r);
        int ro = rd_u8(r);
        int failed = 0;
        if (!src || !tgt || !fs) {
            send_error(id, ENOMEM, "out of memory");
            failed = 1;
        } else if (!mount_recorded(src, tgt, fs, ro)) {
            if (mkdir_p(tgt, 0755) < 0) {
                send_error(id, errno, "mkdir %s: %s", tgt, strerror(errno));
                failed = 1;
            } else if (mount(src, tgt, fs, ro ? MS_RDONLY : 0, NULL) < 0) {
                send_error(id, errno, "mount %s on %s (%s): %s", src, tgt, fs, strerror(errno));
                failed = 1;
            } else {
                record_mount(src, tgt, fs, ro);
            }
        }
        free(src);
        free(tgt);
        free(fs);
        if (failed)
            return;
    }
    if (v2 && init2_tail(id, r, 0) < 0)
        return; /* the ERROR is sent */
    send_frame(T_INIT_OK, id, NULL, 0);
}

/* ----------------------------------------------------------- frame input */

static void handle_frame(uint8_t type, uint32_t id, const uint8_t *payload, uint32_t len) {
    struct reader r = {payload, len, 0, 0};
    switch (type) {
    case T_INIT:
    case T_INIT2:
        handle_init(id, &r, type == T_INIT2);
        break;
    case T_EXEC:
    case T_EXEC2:
        handle_exec(id, &r, type == T_EXEC2);
        break;
    case T_DATA:
    case T_EOF:
    case T_GRANT:
    case T_CANCEL:
        handle_stream(type, id, &r);
        break;
    case T_READ_FILE:
        handle_read_file(id, &r);
        break;
    case T_WRITE_FILE:
        handle_write_file(id, &r);
        break;
    case T_STAT:
        handle_stat(id, &r);
        break;
    case T_LIST:
        handle_list(id, &r);
        break;
    case T_SIGNAL:
        handle_signal(id, &r);
        break;
    case T_PING:
        if (len != 0)
            send_error(id, EPROTO, "malformed PING payload");
        else
            send_frame(T_PONG, id, NULL, 0);
        break;
    default:
        send_error(id, EPROTO, "unknown message type %u", type);
        break;
    }
}

static void process_input(void) {
    size_t off = 0;
    while (inlen - off >= HDR_LEN) {
        const uint8_t *h = inbuf + off;
        uint32_t plen = get_u32(h + 8);
        if (h[0] != 'P' || h[1] != 'Y' || h[2] != FRAME_VERSION || plen > MAX_PAYLOAD) {
            logmsg("bad frame header (magic %02x%02x, version %u, length %u); input discarded",
                   h[0], h[1], h[2], plen);
            inlen = 0;
            return;
        }
        if (inlen - off < HDR_LEN + (size_t)plen)
            break;
        handle_frame(h[3], get_u32(h + 4), h + HDR_LEN, plen);
        off += HDR_LEN + (size_t)plen;
    }
    if (off) {
        memmove(inbuf, inbuf + off, inlen - off);
        inlen -= off;
    }
}

static void kill_all_execs(void) {
    for (int i = 0; i < MAX_EXECS; i++)
        if (execs[i].used) {
            kill(-execs[i].pid, SIGKILL);
            cg_kill(execs[i].cg);
        }
}

static void shutdown_and_exit(void) {
    kill_all_execs();
    for (int i = 0; i < MAX_FOPS; i++)
        if (fops[i].used)
            fop_free(&fops[i]);
    _exit(0);
}

/* Returns after handling channel readiness. */
static void read_channel(void) {
    if (inlen >= sizeof inbuf) { /* cannot happen: a full frame is always consumed */
        inlen = 0;
    }
    ssize_t n = read(chan_in, inbuf + inlen, sizeof inbuf - inlen);
    if (n > 0) {
        inlen += (size_t)n;
        process_input();
        return;
    }
    if (n < 0 && (errno == EINTR || errno == EAGAIN))
        return;
    if (stdio_mode)
        shutdown_and_exit(); /* EOF on stdin: the host is done with us */
    /* host side not connected (around snapshot/restore): retry shortly */
    chan_retry_at = now_ms() + CHANNEL_RETRY_MS;
}

/* ------------------------------------------------------------- main loop */

static void serve(void) {
    struct pollfd pfd[2 + 3 * MAX_EXECS];
    struct {
        struct exec_slot *e;
        int s; /* 0 stdout, 1 stderr, 2 stdin */
    } map[2 + 3 * MAX_EXECS];

    for (;;) {
        int64_t now = now_ms();
        int64_t wake = -1;

        /* deadlines: timeouts and the grace period after the main child exits */
        for (int i = 0; i < MAX_EXECS; i++) {
            struct exec_slot *e = &execs[i];
            if (!e->used)
                continue;
            if (!e->exited && e->deadline_ms && now >= e->deadline_ms) {
                kill(-e->pid, SIGKILL);
                cg_kill(e->cg);
                e->timed_out = 1;
                e->deadline_ms = 0;
            }
            if (e->exited && ((e->fd[0] < 0 && e->fd[1] < 0) || now >= e->exit_ms + EXIT_GRACE_MS)) {
                finish_exec(e);
                continue;
            }
            int64_t t = e->exited ? e->exit_ms + EXIT_GRACE_MS : e->deadline_ms;
            if (t && (wake < 0 || t < wake))
                wake = t;
        }

        if (cg_retry_at) {
            if (now >= cg_retry_at)
                cg_sweep();
            if (cg_retry_at && (wake < 0 || cg_retry_at < wake))
                wake = cg_retry_at;
        }

        /* file operations: one step each; poll without sleeping while any can go on */
        if (fops_step())
            wake = now;

        int n = 0;
        int chan_idx = -1;
        if (chan_retry_at && now < chan_retry_at) {
            if (wake < 0 || chan_retry_at < wake)
                wake = chan_retry_at;
        } else {
            chan_retry_at = 0;
            chan_idx = n;
            pfd[n++] = (struct pollfd){.fd = chan_in, .events = POLLIN};
        }
        int sig_idx = n;
        pfd[n++] = (struct pollfd){.fd = sigchld_pipe[0], .events = POLLIN};
        for (int i = 0; i < MAX_EXECS; i++) {
            for (int s = 0; s < 2; s++) {
                if (execs[i].used && execs[i].fd[s] >= 0) {
                    map[n].e = &execs[i];
                    map[n].s = s;
                    pfd[n++] = (struct pollfd){.fd = execs[i].fd[s], .events = POLLIN};
                }
            }
            if (execs[i].used && execs[i].in_fd >= 0 && execs[i].in_len > 0) {
                map[n].e = &execs[i];
                map[n].s = 2;
                pfd[n++] = (struct pollfd){.fd = execs[i].in_fd, .events = POLLOUT};
            }
        }

        int timeout = -1;
        if (wake >= 0)
            timeout = wake <= now ? 0 : wake - now > 60000 ? 60000 : (int)(wake - now);
        int rc = poll(pfd, (nfds_t)n, timeout);
        if (rc < 0) {
            if (errno != EINTR) {
                logmsg("poll: %s", strerror(errno));
                sleep_ms(CHANNEL_RETRY_MS);
            }
            continue;
        }
        if (pfd[sig_idx].revents) {
            char drain[64];
            while (read(sigchld_pipe[0], drain, sizeof drain) > 0) {
            }
            reap_children();
        }
        for (int i = sig_idx + 1; i < n; i++) {
            struct exec_slot *e = map[i].e;
            if (!pfd[i].revents || !e->used)
                continue;
            if (map[i].s == 2 && e->in_fd == pfd[i].fd)
                stdin_flush(e);
            else if (map[i].s < 2 && e->fd[map[i].s] == pfd[i].fd)
                pump(e, map[i].s, 1);
        }
        if (chan_idx >= 0 && pfd[chan_idx].revents) {
            if (pfd[chan_idx].revents & (POLLIN | POLLHUP | POLLERR))
                read_channel();
            else if (pfd[chan_idx].revents & POLLNVAL) {
                logmsg("channel fd invalid");
                chan_retry_at = now_ms() + CHANNEL_RETRY_MS;
            }
        }
    }
}

/* ------------------------------------------------------------------ boot */

static void __attribute__((noreturn)) fatal(const char *fmt, ...)
    __attribute__((format(printf, 1, 2)));
static void fatal(const char *fmt, ...) {
    char buf[400];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    logmsg("fatal: %s; powering off", buf);
    sync();
    sleep_ms(200);
    reboot(RB_POWER_OFF);
    reboot(RB_AUTOBOOT); /* -no-reboot turns this into a QEMU exit too */
    for (;;)
        pause();
}

static void must_mount(const char *src, const char *tgt, const char *fs, unsigned long flags,
                       const char *data) {
    if (mkdir_p(tgt, 0755) < 0)
        fatal("mkdir %s: %s", tgt, strerror(errno));
    if (mount(src, tgt, fs, flags, data) < 0)
        fatal("mount %s on %s (%s): %s", src, tgt, fs, strerror(errno));
}

static void load_modules(void) {
    FILE *f = fopen("/modules.list", "re");
    if (!f)
        return;
    char line[256];
    while (fgets(line, sizeof line, f)) {
        line[strcspn(line, "\r\n")] = '\0';
        if (!line[0] || strchr(line, '/'))
            continue;
        char path[300];
        snprintf(path, sizeof path, "/modules/%s", line);
        int fd = open(path, O_RDONLY | O_CLOEXEC);
        if (fd < 0) {
            logmsg("module %s: %s", path, strerror(errno));
            continue;
        }
        if (syscall(SYS_finit_module, fd, "", 0) < 0 && errno != EEXIST)
            logmsg("finit_module %s: %s", line, strerror(errno));
        close(fd);
    }
    fclose(f);
}

static void wait_for_path(const char *path, int64_t deadline) {
    struct stat st;
    while (stat(path, &st) < 0) {
        if (now_ms() >= deadline)
            fatal("%s did not appear within %d s", path, BOOT_WAIT_MS / 1000);
        sleep_ms(5);
    }
}

/* Find /dev/vportNpM whose /sys/class/virtio-ports/<it>/name is "agent". */
static int find_agent_port(char *dev, size_t devlen) {
    DIR *d = opendir("/sys/class/virtio-ports");
    if (!d)
        return -1;
    struct dirent *de;
    int found = -1;
    while ((de = readdir(d)) && found < 0) {
        if (strncmp(de->d_name, "vport", 5) != 0)
            continue;
        char path[300], name[64] = {0};
        snprintf(path, sizeof path, "/sys/class/virtio-ports/%s/name", de->d_name);
        int fd = open(path, O_RDONLY | O_CLOEXEC);
        if (fd < 0)
            continue;
        ssize_t n = read(fd, name, sizeof name - 1);
        close(fd);
        if (n <= 0)
            continue;
        name[strcspn(name, "\r\n")] = '\0';
        if (strcmp(name, "agent") == 0) {
            snprintf(dev, devlen, "/dev/%s", de->d_name);
            found = 0;
        }
    }
    closedir(d);
    return found;
}

static void loopback_up(void) {
    int s = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (s < 0) {
        logmsg("socket: %s", strerror(errno));
        return;
    }
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    strncpy(ifr.ifr_name, "lo", IFNAMSIZ - 1);
    if (ioctl(s, SIOCGIFFLAGS, &ifr) < 0) {
        logmsg("SIOCGIFFLAGS lo: %s", strerror(errno));
    } else {
        ifr.ifr_flags |= IFF_UP | IFF_RUNNING;
        if (ioctl(s, SIOCSIFFLAGS, &ifr) < 0)
            logmsg("SIOCSIFFLAGS lo: %s", strerror(errno));
    }
    close(s);
}

static void boot_as_init(void) {
    umask(022);
    mkdir("/dev", 0755);
    if (mount("devtmpfs", "/dev", "devtmpfs", MS_NOSUID, "mode=0755") < 0 && errno != EBUSY)
        fatal("mount devtmpfs on /dev: %s", strerror(errno));
    if (fcntl(2, F_GETFD) < 0) { /* no console from the kernel: open it ourselves */
        int fd = open("/dev/console", O_RDWR);
        if (fd >= 0) {
            for (int i = 0; i < 3; i++)
                if (fd != i)
                    dup2(fd, i);
            if (fd > 2)
                close(fd);
        }
    }
    must_mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL);
    must_mount("sysfs", "/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL);
    load_modules();

    int64_t deadline = now_ms() + BOOT_WAIT_MS;
    wait_for_path("/dev/vda", deadline);
    must_mount("/dev/vda", "/newroot", "ext4", 0, NULL);
    must_mount("proc", "/newroot/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL);
    must_mount("sysfs", "/newroot/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL);
    must_mount("devtmpfs", "/newroot/dev", "devtmpfs", MS_NOSUID, "mode=0755");
    must_mount("devpts", "/newroot/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC,
               "mode=0620,ptmxmode=0666");
    must_mount("tmpfs", "/newroot/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777");
    must_mount("tmpfs", "/newroot/run", "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755");
    /* the initramfs' own mounts are no longer needed */
    umount2("/proc", MNT_DETACH);
    umount2("/sys", MNT_DETACH);
    umount2("/dev", MNT_DETACH);
    /* switch_root: move the new root over / and chroot into it */
    if (chdir("/newroot") < 0)
        fatal("chdir /newroot: %s", strerror(errno));
    if (mount(".", "/", NULL, MS_MOVE, NULL) < 0)
        fatal("move /newroot to /: %s", strerror(errno));
    if (chroot(".") < 0 || chdir("/") < 0)
        fatal("chroot /newroot: %s", strerror(errno));

    if (sethostname("pyro", 4) < 0)
        logmsg("sethostname: %s", strerror(errno));
    loopback_up();
    setup_cgroups();

    char dev[300];
    while (find_agent_port(dev, sizeof dev) < 0) {
        if (now_ms() >= deadline)
            fatal("no virtio-serial port named \"agent\" within %d s", BOOT_WAIT_MS / 1000);
        sleep_ms(5);
    }
    wait_for_path(dev, deadline);
    int fd = open(dev, O_RDWR | O_CLOEXEC);
    if (fd < 0)
        fatal("open %s: %s", dev, strerror(errno));
    chan_in = chan_out = fd;
}

int main(int argc, char **argv) {
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--stdio") == 0) {
            stdio_mode = 1;
        } else if (strcmp(argv[i], "--version") == 0) {
            printf("pyro-agent %s (protocol %d)\n", AGENT_VERSION, PROTO_VERSION);
            return 0;
        }
    }
    if (!stdio_mode && getpid() != 1) {
        fprintf(stderr, "usage: pyro-agent --stdio   (or run as /init, PID 1)\n");
        return 2;
    }
    for (int i = 0; i < MAX_EXECS; i++)
        execs[i].fd[0] = execs[i].fd[1] = execs[i].in_fd = -1;
    for (int i = 0; i < MAX_FOPS; i++)
        fops[i].fd = -1;

    signal(SIGPIPE, SIG_IGN);
    if (pipe2(sigchld_pipe, O_CLOEXEC | O_NONBLOCK) < 0) {
        if (stdio_mode) {
            perror("pyro-agent: pipe2");
            return 1;
        }
        fatal("pipe2: %s", strerror(errno));
    }
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = sigchld_handler;
    sa.sa_flags = SA_RESTART | SA_NOCLDSTOP;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGCHLD, &sa, NULL);

    if (stdio_mode) {
        chan_in = 0;
        chan_out = 1;
        fcntl(0, F_SETFD, FD_CLOEXEC);
        fcntl(1, F_SETFD, FD_CLOEXEC);
    } else {
        boot_as_init();
    }
    send_hello();
    serve();
    return 0;
}
