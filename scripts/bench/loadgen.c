/*
 * loadgen: a small epoll load generator for line-echo servers on loopback.
 *
 * Usage:
 *   loadgen HOST PORT [-m conn|rtt] [-c CLIENTS] [-l LINE_BYTES] [-d SECONDS]
 *                     [-w WARMUP_SECONDS] [-t THREADS] [-T OP_TIMEOUT_SECONDS] [-s SOURCE_ADDRS]
 *
 * Modes:
 *   conn  each client connects (non-blocking), sends one line, reads the whole echo, closes;
 *         repeat. One op = one connection. Latency runs from connect() to the last echo byte.
 *   rtt   each client keeps one connection open, sends a line, waits for the whole echo, sends
 *         again. One op = one round trip. Latency runs from send to the last echo byte.
 *
 * Output: after the warm-up the main thread prints "# measuring" (so a caller can sample the
 * server's CPU over exactly the measured window); at the end it prints ONE JSON line with ops,
 * ops_per_sec, errors by kind, latency percentiles in microseconds, per-client op counts (min > 0
 * means every client was served) and the generator's own CPU time over the window.
 *
 * Ephemeral ports: conn mode at ~10k connections/s leaves tens of thousands of client sockets in
 * TIME_WAIT (60 s), more than the ~28k ephemeral ports of one (source, destination) pair. Linux
 * reuses a loopback TIME_WAIT 4-tuple older than 1 s by itself when net.ipv4.tcp_tw_reuse is 2
 * (the default in current kernels), but finding one costs connect() a search: at 14k
 * connections/s a quarter of this generator's time, and then the generator, not the server, is
 * the limit. -s K spreads connections over K source addresses 127.0.0.1..K (bind() with
 * IP_BIND_ADDRESS_NO_PORT, so the kernel still picks the port per 4-tuple at connect()); the
 * benchmark uses 16. Connections close normally either way (no SO_LINGER {1, 0}: an RST close
 * would change what the server sees, ECONNRESET instead of EOF, and so what is measured).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#ifndef IP_BIND_ADDRESS_NO_PORT
#define IP_BIND_ADDRESS_NO_PORT 24
#endif

/* Log-linear latency histogram: exact below 64 us, then 32 sub-buckets per power of two
 * (about 3% resolution), up to 2^63 us. */
#define SUB_BITS 5
#define SUB (1 << SUB_BITS)
#define NBUCKETS (64 * SUB)

/* A refused or failed connect is retried after this pause, so a dead port does not spin. */
#define RETRY_PAUSE_NS 10000000ULL
/* Upper bound on one epoll_wait, so op timeouts and the end of the run are noticed. */
#define TICK_MS 100

enum mode { MODE_CONN, MODE_RTT };
enum state { ST_PAUSED, ST_CONNECTING, ST_SENDING, ST_RECEIVING };
enum err_kind { E_REFUSED, E_RESET, E_TIMEOUT, E_SHORT_READ, E_ADDR_UNAVAIL, E_OTHER, E_KINDS };
static const char *const ERR_NAMES[E_KINDS] = {"refused",      "reset",         "timeout",
                                               "short_read",   "addr_unavail",  "other"};

struct config {
    enum mode mode;
    int clients, threads, line_bytes, source_addrs;
    double duration_s, warmup_s, timeout_s;
    struct sockaddr_storage addr;
    socklen_t addrlen;
    int family;
    uint64_t t_start, t_measure, t_end; /* CLOCK_MONOTONIC, ns */
};

struct conn {
    int fd;
    enum state state;
    int slot;
    size_t sent, received;
    uint32_t events;    /* what the epoll set watches for fd; 0 when not in the set */
    uint64_t op_start;  /* ns; timeouts run from here */
    uint64_t resume_at; /* ns; when a paused client reconnects */
};

struct worker {
    pthread_t thread;
    const struct config *cfg;
    int first_slot, nslots;
    struct conn *conns;
    uint64_t *slot_ops;
    uint64_t hist[NBUCKETS];
    uint64_t ops, errors[E_KINDS], warmup_errors, max_us, sum_us;
    unsigned source_next;
    int reopen_pending; /* paused clients that may reconnect at once */
    char *line, *buf;
    int epfd;
};

static struct config cfg;

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

static int bucket_of(uint64_t us) {
    if (us < 2 * SUB) return (int)us;
    int exp = 63 - __builtin_clzll(us);
    int shift = exp - SUB_BITS;
    int idx = shift * SUB + (int)(us >> shift);
    return idx < NBUCKETS ? idx : NBUCKETS - 1;
}

/* The middle of a bucket's range, in microseconds. */
static double bucket_value(int idx) {
    if (idx < 2 * SUB) return idx;
    int shift = idx / SUB - 1;
    uint64_t low = (uint64_t)(idx - shift * SUB) << shift;
    return (double)low + (double)((1ULL << shift) - 1) / 2.0;
}

static int in_window(uint64_t t) { return t >= cfg.t_measure && t < cfg.t_end; }

static enum err_kind classify(int err) {
    switch (err) {
    case ECONNREFUSED: return E_REFUSED;
    case ECONNRESET:
    case EPIPE:
    case ECONNABORTED: return E_RESET;
    case ETIMEDOUT: return E_TIMEOUT;
    case EADDRNOTAVAIL:
    case EADDRINUSE: return E_ADDR_UNAVAIL;
    default: return E_OTHER;
    }
}

static void count_error(struct worker *w, enum err_kind kind) {
    uint64_t t = now_ns();
    if (in_window(t))
        w->errors[kind]++;
    else if (t < cfg.t_measure)
        w->warmup_errors++;
}

static void drop(struct conn *c) {
    if (c->fd >= 0) close(c->fd); /* close() also removes it from the epoll set */
    c->fd = -1;
    c->events = 0;
    c->state = ST_PAUSED;
}

/* Count the error and recycle the client: it reconnects from the event loop, not from here,
 * so a connect that fails synchronously cannot recurse. */
static void fail(struct worker *w, struct conn *c, enum err_kind kind) {
    count_error(w, kind);
    drop(c);
    /* Pause after connect-type failures only: those repeat at once if retried at once. */
    if (kind == E_REFUSED || kind == E_ADDR_UNAVAIL || kind == E_OTHER) {
        c->resume_at = now_ns() + RETRY_PAUSE_NS;
    } else {
        c->resume_at = 0;
        w->reopen_pending++;
    }
}

/* Make the epoll set watch c->fd for events (one syscall, and only when they change). */
static void watch(struct worker *w, struct conn *c, uint32_t events) {
    if (c->events == events) return;
    struct epoll_event ev = {.events = events, .data.ptr = c};
    if (epoll_ctl(w->epfd, c->events ? EPOLL_CTL_MOD : EPOLL_CTL_ADD, c->fd, &ev) < 0) {
        perror("epoll_ctl");
        exit(2);
    }
    c->events = events;
}

static void bind_source(struct worker *w, int fd) {
    if (cfg.family != AF_INET || cfg.source_addrs <= 1) return;
    struct sockaddr_in *dst = (struct sockaddr_in *)&cfg.addr;
    if ((ntohl(dst->sin_addr.s_addr) >> 24) != 127) return;
    int one = 1;
    setsockopt(fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof one);
    struct sockaddr_in src = {.sin_family = AF_INET, .sin_port = 0};
    unsigned idx = w->source_next++ % (unsigned)cfg.source_addrs;
    src.sin_addr.s_addr = htonl((127U << 24) | (1U + idx));
    bind(fd, (struct sockaddr *)&src, sizeof src); /* on failure connect() picks a source */
}

static void start_send(struct worker *w, struct conn *c);

static void open_conn(struct worker *w, struct conn *c) {
    c->sent = c->received = 0;
    c->op_start = now_ns();
    c->fd = socket(cfg.family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (c->fd < 0) {
        fail(w, c, classify(errno));
        return;
    }
    int one = 1;
    setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    bind_source(w, c->fd);
    if (connect(c->fd, (struct sockaddr *)&cfg.addr, cfg.addrlen) == 0) {
        start_send(w, c);
    } else if (errno == EINPROGRESS) {
        c->state = ST_CONNECTING;
        watch(w, c, EPOLLOUT);
    } else {
        fail(w, c, classify(errno));
    }
}

static void send_some(struct worker *w, struct conn *c) {
    while (c->sent < (size_t)cfg.line_bytes) {
        ssize_t n = send(c->fd, w->line + c->sent, (size_t)cfg.line_bytes - c->sent, MSG_NOSIGNAL);
        if (n > 0) {
            c->sent += (size_t)n;
        } else if (n < 0 && errno == EINTR) {
            continue;
        } else if (n < 0 && errno == EAGAIN) {
            watch(w, c, EPOLLOUT);
            return;
        } else {
            fail(w, c, classify(errno));
            return;
        }
    }
    c->state = ST_RECEIVING;
    watch(w, c, EPOLLIN);
}

static void start_send(struct worker *w, struct conn *c) {
    if (cfg.mode == MODE_RTT) c->op_start = now_ns();
    c->sent = c->received = 0;
    c->state = ST_SENDING;
    send_some(w, c);
}

static void complete_op(struct worker *w, struct conn *c) {
    uint64_t t = now_ns();
    if (in_window(t)) {
        uint64_t us = (t - c->op_start) / 1000;
        w->hist[bucket_of(us)]++;
        w->ops++;
        w->sum_us += us;
        if (us > w->max_us) w->max_us = us;
        w->slot_ops[c->slot - w->first_slot]++;
    }
    if (cfg.mode == MODE_CONN) {
        drop(c);
        open_conn(w, c);
    } else {
        start_send(w, c);
    }
}

static void receive_some(struct worker *w, struct conn *c) {
    for (;;) {
        ssize_t n = recv(c->fd, w->buf, (size_t)cfg.line_bytes, 0);
        if (n > 0) {
            c->received += (size_t)n;
            if (c->received > (size_t)cfg.line_bytes) { /* more than was sent: not an echo */
                fail(w, c, E_OTHER);
                return;
            }
            if (c->received == (size_t)cfg.line_bytes) {
                complete_op(w, c);
                return;
            }
        } else if (n == 0) {
            fail(w, c, E_SHORT_READ);
            return;
        } else if (errno == EINTR) {
            continue;
        } else if (errno == EAGAIN) {
            return;
        } else {
            fail(w, c, classify(errno));
            return;
        }
    }
}

static void on_event(struct worker *w, struct conn *c, uint32_t events) {
    if (c->fd < 0) return;
    switch (c->state) {
    case ST_CONNECTING: {
        int err = 0;
        socklen_t len = sizeof err;
        getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len);
        if (err) {
            fail(w, c, classify(err));
            return;
        }
        start_send(w, c);
        break;
    }
    case ST_SENDING: send_some(w, c); break;
    case ST_RECEIVING: receive_some(w, c); break;
    case ST_PAUSED: break;
    }
    (void)events; /* EPOLLERR/EPOLLHUP surface through the next recv/send/SO_ERROR */
}

/* Time out stuck operations (with timeouts) and restart paused clients that are due. */
static void sweep(struct worker *w, uint64_t t, int timeouts) {
    uint64_t limit = (uint64_t)(cfg.timeout_s * 1e9);
    w->reopen_pending = 0;
    for (int i = 0; i < w->nslots; i++) {
        struct conn *c = &w->conns[i];
        if (timeouts && c->state != ST_PAUSED && t - c->op_start > limit) fail(w, c, E_TIMEOUT);
        if (c->state == ST_PAUSED && t >= c->resume_at) open_conn(w, c);
    }
}

static void *worker_main(void *arg) {
    struct worker *w = arg;
    struct epoll_event events[256];
    w->epfd = epoll_create1(EPOLL_CLOEXEC);
    if (w->epfd < 0) {
        perror("epoll_create1");
        exit(2);
    }
    for (int i = 0; i < w->nslots; i++) open_conn(w, &w->conns[i]);
    uint64_t next_sweep = now_ns() + TICK_MS * 1000000ULL;
    for (;;) {
        uint64_t t = now_ns();
        if (t >= cfg.t_end) break;
        uint64_t wait_ns = cfg.t_end - t;
        if (next_sweep > t && next_sweep - t < wait_ns) wait_ns = next_sweep - t;
        int timeout_ms = (int)((wait_ns + 999999) / 1000000);
        int n = epoll_wait(w->epfd, events, 256, timeout_ms);
        if (n < 0 && errno != EINTR) {
            perror("epoll_wait");
            exit(2);
        }
        for (int i = 0; i < n; i++) on_event(w, events[i].data.ptr, events[i].events);
        t = now_ns();
        if (t >= next_sweep) {
            sweep(w, t, 1);
            next_sweep = t + TICK_MS * 1000000ULL;
        } else if (w->reopen_pending) {
            sweep(w, t, 0);
        }
    }
    for (int i = 0; i < w->nslots; i++)
        if (w->conns[i].fd >= 0) close(w->conns[i].fd);
    close(w->epfd);
    return NULL;
}

static double cpu_seconds(void) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return (double)ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + (double)ru.ru_stime.tv_sec +
           ru.ru_stime.tv_usec / 1e6;
}

static void sleep_until(uint64_t t) {
    struct timespec ts = {.tv_sec = (time_t)(t / 1000000000ULL), .tv_nsec = (long)(t % 1000000000ULL)};
    while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) == EINTR) {
    }
}

static double percentile(const uint64_t *hist, uint64_t total, double q) {
    if (total == 0) return 0;
    uint64_t rank = (uint64_t)(q * (double)total);
    if (rank >= total) rank = total - 1;
    uint64_t seen = 0;
    for (int i = 0; i < NBUCKETS; i++) {
        seen += hist[i];
        if (seen > rank) return bucket_value(i);
    }
    return bucket_value(NBUCKETS - 1);
}

static void usage(void) {
    fprintf(stderr, "usage: loadgen HOST PORT [-m conn|rtt] [-c clients] [-l line_bytes] "
                    "[-d seconds] [-w warmup] [-t threads] [-T op_timeout] [-s source_addrs]\n");
    exit(2);
}

static void raise_nofile(void) {
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
}

static void parse_args(int argc, char **argv) {
    cfg.mode = MODE_RTT;
    cfg.clients = 32;
    cfg.threads = 1;
    cfg.line_bytes = 64;
    cfg.source_addrs = 1;
    cfg.duration_s = 5;
    cfg.warmup_s = 0.5;
    cfg.timeout_s = 5;
    int opt;
    while ((opt = getopt(argc, argv, "m:c:l:d:w:t:T:s:")) != -1) {
        switch (opt) {
        case 'm':
            if (strcmp(optarg, "conn") == 0) cfg.mode = MODE_CONN;
            else if (strcmp(optarg, "rtt") == 0) cfg.mode = MODE_RTT;
            else usage();
            break;
        case 'c': cfg.clients = atoi(optarg); break;
        case 'l': cfg.line_bytes = atoi(optarg); break;
        case 'd': cfg.duration_s = atof(optarg); break;
        case 'w': cfg.warmup_s = atof(optarg); break;
        case 't': cfg.threads = atoi(optarg); break;
        case 'T': cfg.timeout_s = atof(optarg); break;
        case 's': cfg.source_addrs = atoi(optarg); break;
        default: usage();
        }
    }
    if (argc - optind != 2 || cfg.clients < 1 || cfg.line_bytes < 1 || cfg.duration_s <= 0 ||
        cfg.warmup_s < 0 || cfg.timeout_s <= 0)
        usage();
    if (cfg.threads < 1) cfg.threads = 1;
    if (cfg.threads > cfg.clients) cfg.threads = cfg.clients;
    struct addrinfo hints = {.ai_socktype = SOCK_STREAM, .ai_flags = AI_NUMERICSERV};
    struct addrinfo *res;
    int rc = getaddrinfo(argv[optind], argv[optind + 1], &hints, &res);
    if (rc != 0) {
        fprintf(stderr, "loadgen: %s: %s\n", argv[optind], gai_strerror(rc));
        exit(2);
    }
    memcpy(&cfg.addr, res->ai_addr, res->ai_addrlen);
    cfg.addrlen = res->ai_addrlen;
    cfg.family = res->ai_family;
    freeaddrinfo(res);
}

int main(int argc, char **argv) {
    parse_args(argc, argv);
    raise_nofile();

    struct worker *workers = calloc((size_t)cfg.threads, sizeof *workers);
    uint64_t *slot_ops = calloc((size_t)cfg.clients, sizeof *slot_ops);
    struct conn *conns = calloc((size_t)cfg.clients, sizeof *conns);
    char *line = malloc((size_t)cfg.line_bytes);
    if (!workers || !slot_ops || !conns || !line) {
        perror("calloc");
        return 2;
    }
    for (int i = 0; i < cfg.line_bytes - 1; i++) line[i] = (char)('a' + i % 26);
    line[cfg.line_bytes - 1] = '\n';
    for (int i = 0; i < cfg.clients; i++) {
        conns[i].fd = -1;
        conns[i].slot = i;
    }

    cfg.t_start = now_ns();
    cfg.t_measure = cfg.t_start + (uint64_t)(cfg.warmup_s * 1e9);
    cfg.t_end = cfg.t_measure + (uint64_t)(cfg.duration_s * 1e9);

    int per = cfg.clients / cfg.threads, extra = cfg.clients % cfg.threads, first = 0;
    for (int i = 0; i < cfg.threads; i++) {
        struct worker *w = &workers[i];
        w->cfg = &cfg;
        w->first_slot = first;
        w->nslots = per + (i < extra);
        w->conns = conns + first;
        w->slot_ops = slot_ops + first;
        w->line = line;
        w->buf = malloc((size_t)cfg.line_bytes);
        first += w->nslots;
        if (pthread_create(&w->thread, NULL, worker_main, w) != 0) {
            perror("pthread_create");
            return 2;
        }
    }

    sleep_until(cfg.t_measure);
    double cpu0 = cpu_seconds();
    printf("# measuring\n");
    fflush(stdout);
    sleep_until(cfg.t_end);
    double cpu1 = cpu_seconds();
    uint64_t t_done = now_ns();
    for (int i = 0; i < cfg.threads; i++) pthread_join(workers[i].thread, NULL);

    static uint64_t hist[NBUCKETS];
    uint64_t ops = 0, errors[E_KINDS] = {0}, warmup_errors = 0, max_us = 0, sum_us = 0;
    for (int i = 0; i < cfg.threads; i++) {
        struct worker *w = &workers[i];
        for (int b = 0; b < NBUCKETS; b++) hist[b] += w->hist[b];
        for (int k = 0; k < E_KINDS; k++) errors[k] += w->errors[k];
        ops += w->ops;
        warmup_errors += w->warmup_errors;
        sum_us += w->sum_us;
        if (w->max_us > max_us) max_us = w->max_us;
    }
    uint64_t min_ops = UINT64_MAX, max_ops = 0, starved = 0, errors_total = 0;
    for (int i = 0; i < cfg.clients; i++) {
        if (slot_ops[i] < min_ops) min_ops = slot_ops[i];
        if (slot_ops[i] > max_ops) max_ops = slot_ops[i];
        if (slot_ops[i] == 0) starved++;
    }
    for (int k = 0; k < E_KINDS; k++) errors_total += errors[k];
    double window_s = cfg.duration_s;
    double cpu_s = cpu1 - cpu0;

    printf("{\"mode\": \"%s\", \"clients\": %d, \"threads\": %d, \"line_bytes\": %d, "
           "\"duration_s\": %.3f, \"ops\": %llu, \"ops_per_sec\": %.1f, \"errors_total\": %llu, "
           "\"errors\": {",
           cfg.mode == MODE_CONN ? "conn" : "rtt", cfg.clients, cfg.threads, cfg.line_bytes,
           window_s, (unsigned long long)ops, (double)ops / window_s,
           (unsigned long long)errors_total);
    for (int k = 0; k < E_KINDS; k++)
        printf("%s\"%s\": %llu", k ? ", " : "", ERR_NAMES[k], (unsigned long long)errors[k]);
    printf("}, \"warmup_errors\": %llu, \"latency_us\": {\"p50\": %.1f, \"p90\": %.1f, "
           "\"p99\": %.1f, \"max\": %llu, \"mean\": %.1f}, "
           "\"per_conn_ops\": {\"min\": %llu, \"max\": %llu, \"starved\": %llu}, "
           "\"cpu_s\": %.4f, \"cpu_pct\": %.1f, \"finish_lag_ms\": %.1f}\n",
           (unsigned long long)warmup_errors, percentile(hist, ops, 0.50),
           percentile(hist, ops, 0.90), percentile(hist, ops, 0.99), (unsigned long long)max_us,
           ops ? (double)sum_us / (double)ops : 0.0, (unsigned long long)min_ops,
           (unsigned long long)max_ops, (unsigned long long)starved, cpu_s,
           100.0 * cpu_s / window_s, (double)(now_ns() - t_done) / 1e6);
    return 0;
}
