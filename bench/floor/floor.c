/* The floor: the least an HTTP server on this machine can do for k6's requests.
 *
 * One thread, one epoll set, non-blocking sockets.  Every complete request, whatever its
 * method or path, is answered with the same 200 and the constant body
 * {"approved":true,"fraud_score":0.0}.  So under the harness it measures what is left when
 * the service does no work at all: k6, the kernel's TCP path and the scheduler.
 *
 *   floor --port N [--host 127.0.0.1]     accept on a TCP port (TCP_NODELAY on each connection)
 *   floor --handoff PATH                  take connections from `fraudscore balance --upstream PATH`:
 *                                         each message on an accepted unix channel carries accepted
 *                                         sockets as SCM_RIGHTS (service/handoff.py's format)
 *
 * HTTP, minimally: a request is its head up to the blank line plus Content-Length bytes of body;
 * pipelined requests are answered in order, a request split across reads waits for its rest.
 * "Connection: close" closes after the answer.  No chunked bodies (k6 sends none).
 * On SIGTERM or SIGINT it prints what it did (requests, reads, writes, epoll waits) to stderr.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <arpa/inet.h>
#include <signal.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#define BODY "{\"approved\":true,\"fraud_score\":0.0}"
#define HEAD_KEEP "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
static const char ANSWER[] = HEAD_KEEP "35\r\n\r\n" BODY;
_Static_assert(sizeof(BODY) - 1 == 35, "Content-Length must match the body");

#define IN_SIZE 65536    /* a request (head + body) larger than this is refused by closing */
#define OUT_SIZE 65536   /* answers not yet taken by the kernel */
#define MAX_EVENTS 256
#define MAX_FDS_PER_MESSAGE 64 /* as service/handoff.py */

enum kind { LISTENER = 1, CHANNEL_LISTENER, CHANNEL, CLIENT };

struct conn {
    enum kind kind;
    int fd;
    size_t in_len, out_len, out_off;
    int close_after; /* close once out is flushed */
    char in[IN_SIZE];
    char out[OUT_SIZE];
};

static int epfd;
static volatile sig_atomic_t stopping;
static unsigned long long n_requests, n_reads, n_writes, n_waits, n_conns;

static void on_signal(int sig) { (void)sig; stopping = 1; }

static void die(const char *what) {
    perror(what);
    exit(2);
}

static void set_nonblocking(int fd) {
    int flags = fcntl(fd, F_GETFL);
    if (flags < 0 || fcntl(fd, F_SETFL, flags | O_NONBLOCK) < 0) die("fcntl");
}

/* Small sockets (listeners, channels) need no buffers: only their kind and fd. */
static struct conn *watch(int fd, enum kind kind, size_t size) {
    struct conn *c = calloc(1, size);
    if (!c) die("calloc");
    c->kind = kind;
    c->fd = fd;
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
    if (epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &ev) < 0) die("epoll_ctl");
    return c;
}

static void add_client(int fd) {
    set_nonblocking(fd);
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one); /* fails harmlessly on a unix socket */
    watch(fd, CLIENT, sizeof(struct conn));
    n_conns++;
}

static void drop(struct conn *c) {
    epoll_ctl(epfd, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    free(c);
}

/* Content-Length's value in head[0..len) (0 when absent), and whether it says Connection: close.
 * -1 when the value is not a number. */
static long parse_head(const char *head, size_t len, int *close_it) {
    long length = 0;
    const char *p = memchr(head, '\n', len), *end = head + len;
    *close_it = 0;
    while (p && p + 1 < end) {
        const char *line = p + 1;
        const char *eol = memchr(line, '\n', (size_t)(end - line));
        if (!eol) break;
        size_t n = (size_t)(eol - line);
        if (n >= 15 && strncasecmp(line, "content-length:", 15) == 0) {
            char *stop;
            length = strtol(line + 15, &stop, 10);
            if (stop == line + 15 || length < 0) return -1;
        } else if (n >= 11 && strncasecmp(line, "connection:", 11) == 0) {
            const char *v = line + 11;
            while (v < eol && *v == ' ') v++;
            if ((size_t)(eol - v) >= 5 && strncasecmp(v, "close", 5) == 0) *close_it = 1;
        }
        p = eol;
    }
    return length;
}

/* Queue an answer for each whole request in the input; keep the unfinished rest. 0 on success. */
static int take_requests(struct conn *c) {
    size_t at = 0;
    while (!c->close_after) {
        char *start = c->in + at;
        size_t left = c->in_len - at;
        char *blank = memmem(start, left, "\r\n\r\n", 4);
        if (!blank) break;
        size_t head = (size_t)(blank - start) + 4;
        int close_it;
        long body = parse_head(start, head, &close_it);
        if (body < 0 || head + (size_t)body > IN_SIZE) return -1;
        if (head + (size_t)body > left) break; /* the body's rest has not come yet */
        if (c->out_len + sizeof ANSWER - 1 > OUT_SIZE) return -1; /* a client that never reads */
        memcpy(c->out + c->out_len, ANSWER, sizeof ANSWER - 1);
        c->out_len += sizeof ANSWER - 1;
        c->close_after = close_it;
        at += head + (size_t)body;
        n_requests++;
    }
    memmove(c->in, c->in + at, c->in_len - at);
    c->in_len -= at;
    return c->in_len == IN_SIZE ? -1 : 0;
}

/* Write what is queued; wait for EPOLLOUT only when the kernel takes less.  0 on success. */
static int flush(struct conn *c) {
    while (c->out_off < c->out_len) {
        ssize_t n = send(c->fd, c->out + c->out_off, c->out_len - c->out_off, MSG_NOSIGNAL);
        n_writes++;
        if (n < 0) {
            if (errno == EAGAIN) {
                struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT, .data.ptr = c};
                epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &ev);
                return 0;
            }
            if (errno == EINTR) continue;
            return -1;
        }
        c->out_off += (size_t)n;
    }
    c->out_len = c->out_off = 0;
    return c->close_after ? -1 : 0;
}

static void on_client(struct conn *c, unsigned events) {
    if (events & EPOLLOUT) {
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
        epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &ev);
        if (flush(c) < 0) goto gone;
    }
    if (events & (EPOLLIN | EPOLLHUP | EPOLLERR)) {
        ssize_t n = recv(c->fd, c->in + c->in_len, IN_SIZE - c->in_len, 0);
        n_reads++;
        if (n == 0) goto gone;
        if (n < 0) {
            if (errno == EAGAIN || errno == EINTR) return;
            goto gone;
        }
        c->in_len += (size_t)n;
        if (take_requests(c) < 0 || flush(c) < 0) goto gone;
    }
    return;
gone:
    drop(c);
}

static void on_channel(struct conn *c) {
    char data[16];
    char control[CMSG_SPACE(sizeof(int) * MAX_FDS_PER_MESSAGE)];
    for (;;) {
        struct iovec iov = {.iov_base = data, .iov_len = sizeof data};
        struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = control,
                             .msg_controllen = sizeof control};
        ssize_t n = recvmsg(c->fd, &msg, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
        if (n < 0) {
            if (errno == EAGAIN || errno == EINTR) return;
            drop(c);
            return;
        }
        int got = 0;
        for (struct cmsghdr *cm = CMSG_FIRSTHDR(&msg); cm; cm = CMSG_NXTHDR(&msg, cm)) {
            if (cm->cmsg_level != SOL_SOCKET || cm->cmsg_type != SCM_RIGHTS) continue;
            size_t count = (cm->cmsg_len - CMSG_LEN(0)) / sizeof(int);
            int *fds = (int *)CMSG_DATA(cm);
            for (size_t i = 0; i < count; i++) add_client(fds[i]);
            got = 1;
        }
        if (n == 0 && !got) { /* the balancer went away */
            drop(c);
            return;
        }
    }
}

static void on_listener(struct conn *c) {
    for (;;) {
        int fd = accept4(c->fd, NULL, NULL, SOCK_CLOEXEC);
        if (fd < 0) return; /* EAGAIN, or a client gone before we took it */
        if (c->kind == LISTENER) {
            add_client(fd);
        } else {
            set_nonblocking(fd);
            watch(fd, CHANNEL, offsetof(struct conn, in));
        }
    }
}

static int tcp_listener(const char *host, int port) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) die("socket");
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    if (inet_pton(AF_INET, host, &addr.sin_addr) != 1) {
        fprintf(stderr, "floor: --host %s is not an IPv4 address\n", host);
        exit(2);
    }
    if (bind(fd, (struct sockaddr *)&addr, sizeof addr) < 0) die("bind");
    if (listen(fd, 4096) < 0) die("listen");
    return fd;
}

static int unix_listener(const char *path) {
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) die("socket");
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    if (strlen(path) >= sizeof addr.sun_path) {
        fprintf(stderr, "floor: --handoff %s: path too long\n", path);
        exit(2);
    }
    strcpy(addr.sun_path, path);
    unlink(path);
    if (bind(fd, (struct sockaddr *)&addr, sizeof addr) < 0) die("bind");
    if (listen(fd, 16) < 0) die("listen");
    return fd;
}

static void usage(void) {
    fprintf(stderr, "usage: floor --port N [--host ADDR] | floor --handoff PATH\n");
    exit(2);
}

int main(int argc, char **argv) {
    const char *host = "127.0.0.1", *handoff = NULL;
    int port = -1;
    for (int i = 1; i < argc; i++) {
        if (i + 1 >= argc) usage();
        if (strcmp(argv[i], "--port") == 0) port = atoi(argv[++i]);
        else if (strcmp(argv[i], "--host") == 0) host = argv[++i];
        else if (strcmp(argv[i], "--handoff") == 0) handoff = argv[++i];
        else usage();
    }
    if ((port < 0) == (handoff == NULL)) usage();
    struct sigaction sa = {.sa_handler = on_signal}; /* no SA_RESTART: epoll_wait returns EINTR */
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);

    epfd = epoll_create1(EPOLL_CLOEXEC);
    if (epfd < 0) die("epoll_create1");
    if (handoff) {
        watch(unix_listener(handoff), CHANNEL_LISTENER, offsetof(struct conn, in));
    } else {
        watch(tcp_listener(host, port), LISTENER, offsetof(struct conn, in));
    }
    if (handoff) fprintf(stderr, "floor: pid %d taking connections on %s\n", getpid(), handoff);
    else fprintf(stderr, "floor: pid %d serving %s:%d\n", getpid(), host, port);

    struct epoll_event events[MAX_EVENTS];
    while (!stopping) {
        int n = epoll_wait(epfd, events, MAX_EVENTS, -1);
        n_waits++;
        for (int i = 0; i < n; i++) {
            struct conn *c = events[i].data.ptr;
            if (c->kind == CLIENT) on_client(c, events[i].events);
            else if (c->kind == CHANNEL) on_channel(c);
            else on_listener(c);
        }
    }
    fprintf(stderr, "floor: requests %llu connections %llu reads %llu writes %llu epoll_waits %llu\n",
            n_requests, n_conns, n_reads, n_writes, n_waits);
    if (handoff) unlink(handoff);
    return 0;
}
