/*
 * pyro-agent: the guest side of the pyro-mcp wire protocol (version 1).
 *
 * The wire format is specified in docs/protocol.md; the host-side codec is
 * src/pyro_mcp/guest/protocol.py. Keep the three in step.
 *
 * Modes:
 *   pyro-agent --stdio   channel = fd 0 (read) / fd 1 (write); no boot steps.
 *   /init (PID 1)        mount /dev /proc /sys, load /modules.list, mount
 *                        /dev/vda as the root, switch into it, open the
 *                        virtio-serial port named "agent", serve forever.
 *
 * One thread, one poll() loop over: the channel, a SIGCHLD self-pipe and the
 * stdout/stderr pipes of every running exec. Every field read from the wire
 * is bounds-checked; a malformed request gets an ERROR frame (EPROTO).
 *
 * Build: cc -static -Os -Wall -Wextra -Werror -o pyro-agent agent.c \
 *           -DAGENT_VERSION="\"1.x\""
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <linux/random.h>
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

enum {
    T_HELLO = 1,
    T_INIT_OK = 2,
    T_OUTPUT = 3,
    T_EXIT = 4,
    T_ERROR = 5,
    T_PONG = 6,
    T_INIT = 16,
    T_EXEC = 17,
    T_SIGNAL = 18,
    T_PING = 19,
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

static uint8_t inbuf[HDR_LEN + MAX_PAYLOAD];
static size_t inlen;
static uint8_t outbuf[HDR_LEN + MAX_OUTPUT_CHUNK + 64 + MAX_ERROR_MESSAGE];
static uint8_t chunk[MAX_OUTPUT_CHUNK];

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

/* Write a short string to a file (cgroup control files). Returns 0 or -1 (errno set). */
static int write_file(const char *path, const char *text) {
    int fd = open(path, O_WRONLY | O_CLOEXEC);
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
    if (mkdir_p(CG_ROOT, 0755) < 0 ||
        (mount("cgroup2", CG_ROOT, "cgroup2", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL) < 0 &&
         errno != EBUSY)) {
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
    /* One controller at a time: a kernel without one still gets the others. */
    static const char *const controllers[] = {"+pids", "+cpu", "+memory"};
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
    uint64_t cg = cg_next++;
    char path[128], value[32];
    cg_path(path, sizeof path, cg, NULL);
    if (mkdir(path, 0755) < 0) {
        logmsg("mkdir %s: %s; exec runs without its cgroup", path, strerror(errno));
        return 0;
    }
    snprintf(value, sizeof value, "%u", pids_max ? pids_max : cg_default_pids_max);
    cg_path(path, sizeof path, cg, "pids.max");
    if (write_file(path, value) < 0)
        logmsg("%s: %s", path, strerror(errno));
    cg_path(path, sizeof path, cg, "cgroup.procs");
    *procs_fd = open(path, O_WRONLY | O_CLOEXEC);
    if (*procs_fd < 0) {
        logmsg("open %s: %s; exec runs without its cgroup", path, strerror(errno));
        cg_path(path, sizeof path, cg, NULL);
        rmdir(path);
        return 0;
    }
    return cg;
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

/* The exec is over: remove its cgroup now or, while background processes live, later. */
static void cg_release(uint64_t cg) {
    if (!cg)
        return;
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
    memset(e, 0, sizeof *e);
    e->fd[0] = e->fd[1] = -1;
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

enum { STAGE_CWD = 1, STAGE_SETUP = 2 };

static void handle_exec(uint32_t id, struct reader *r) {
    uint32_t timeout_ms = rd_u32(r);
    uint32_t caps[2];
    caps[0] = rd_u32(r);
    caps[1] = rd_u32(r);
    char *cwd = rd_str(r);
    uint32_t argc = 0, envc = 0;
    char **argv = rd_strlist(r, &argc);
    char **envp = rd_strlist(r, &envc);
    int outp[2] = {-1, -1}, errp[2] = {-1, -1}, ctl[2] = {-1, -1};
    int cg_procs = -1;
    uint64_t cg = 0;

    if (!rd_done(r) || argc < 1) {
        send_error(id, EPROTO, "malformed EXEC payload");
        goto out;
    }
    if (find_exec(id)) {
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
        pipe2(ctl, O_CLOEXEC) < 0) {
        send_error(id, errno, "pipe: %s", strerror(errno));
        goto out;
    }
    cg = cg_create(0, &cg_procs);
    int64_t start = now_ms();
    pid_t pid = fork();
    if (pid < 0) {
        send_error(id, errno, "fork: %s", strerror(errno));
        goto out;
    }
    if (pid == 0) {
        close(ctl[0]);
        if (cg_procs >= 0 && write(cg_procs, "0", 1) != 1)
            child_fail(ctl[1], STAGE_SETUP); /* join the exec's cgroup before anything runs */
        signal(SIGPIPE, SIG_DFL);
        signal(SIGCHLD, SIG_DFL);
        sigset_t none;
        sigemptyset(&none);
        sigprocmask(SIG_SETMASK, &none, NULL);
        if (setsid() < 0)
            child_fail(ctl[1], STAGE_SETUP);
        int devnull = open("/dev/null", O_RDONLY);
        if (devnull < 0 || dup2(devnull, 0) < 0 || dup2(outp[1], 1) < 0 ||
            dup2(errp[1], 2) < 0)
            child_fail(ctl[1], STAGE_SETUP);
        if (devnull > 2)
            close(devnull);
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
    e->fd[0] = outp[0];
    e->fd[1] = errp[0];
    outp[0] = errp[0] = -1;
    fcntl(e->fd[0], F_SETFL, O_NONBLOCK);
    fcntl(e->fd[1], F_SETFL, O_NONBLOCK);
    e->cap[0] = caps[0];
    e->cap[1] = caps[1];
    e->start_ms = start;
    e->deadline_ms = timeout_ms ? start + timeout_ms : 0;
out:
    close_fd(&outp[0]);
    close_fd(&outp[1]);
    close_fd(&errp[0]);
    close_fd(&errp[1]);
    close_fd(&ctl[0]);
    close_fd(&ctl[1]);
    close_fd(&cg_procs);
    cg_release(cg); /* only when the exec did not start */
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

static void handle_init(uint32_t id, struct reader *r) {
    uint64_t unix_ns = rd_u64(r);
    const uint8_t *entropy;
    uint32_t elen = rd_bytes(r, &entropy);
    uint32_t count = rd_u32(r);
    if (r->bad || elen > MAX_ENTROPY || count > (r->len - r->off) / 13) {
        send_error(id, EPROTO, "malformed INIT payload");
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
    if (!rd_done(r)) {
        send_error(id, EPROTO, "malformed INIT payload");
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
    send_frame(T_INIT_OK, id, NULL, 0);
}

/* ----------------------------------------------------------- frame input */

static void handle_frame(uint8_t type, uint32_t id, const uint8_t *payload, uint32_t len) {
    struct reader r = {payload, len, 0, 0};
    switch (type) {
    case T_INIT:
        handle_init(id, &r);
        break;
    case T_EXEC:
        handle_exec(id, &r);
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
    struct pollfd pfd[2 + 2 * MAX_EXECS];
    struct {
        struct exec_slot *e;
        int s;
    } map[2 + 2 * MAX_EXECS];

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
        for (int i = sig_idx + 1; i < n; i++)
            if (pfd[i].revents && map[i].e->used && map[i].e->fd[map[i].s] == pfd[i].fd)
                pump(map[i].e, map[i].s, 1);
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
        execs[i].fd[0] = execs[i].fd[1] = -1;

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
