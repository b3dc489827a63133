/* The closed-loop keep-alive load client of bench/_load.py, in C, for when Python
 * clients would need more CPU than the server they measure (on a 2-core machine
 * the client and the server share the cores).
 *
 *   _load SOCKET CONNS SECONDS REQUEST
 *
 * Opens CONNS connections to the unix socket SOCKET; each sends REQUEST and, as soon
 * as the whole answer (head + Content-Length body) is in, sends it again, for
 * SECONDS. Prints {"n": ..., "elapsed": ..., "bad": ..., "cpu": ...} (bad: answers
 * that are not "HTTP/1.1 200"; cpu: this process's user + system seconds).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define BUF 65536

struct conn { int fd; size_t have; char buf[BUF]; };

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

/* Length of the first complete answer in buf, or 0 if incomplete. */
static size_t answer_len(const char *buf, size_t have) {
    const char *end = memmem(buf, have, "\r\n\r\n", 4);
    if (!end) return 0;
    size_t head = (size_t)(end - buf) + 4, body = 0;
    const char *cl = memmem(buf, head, "Content-Length: ", 16);
    if (cl) body = strtoul(cl + 16, NULL, 10);
    return have >= head + body ? head + body : 0;
}

int main(int argc, char **argv) {
    if (argc != 5) { fprintf(stderr, "usage: %s SOCKET CONNS SECONDS REQUEST\n", argv[0]); return 2; }
    int conns = atoi(argv[2]);
    double seconds = atof(argv[3]);
    const char *req = argv[4];
    size_t req_len = strlen(req);
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    strncpy(addr.sun_path, argv[1], sizeof addr.sun_path - 1);
    int ep = epoll_create1(0);
    struct conn *cs = calloc((size_t)conns, sizeof *cs);
    for (int i = 0; i < conns; i++) {
        cs[i].fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK, 0);
        if (connect(cs[i].fd, (struct sockaddr *)&addr, sizeof addr) != 0) { perror("connect"); return 1; }
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = &cs[i]};
        epoll_ctl(ep, EPOLL_CTL_ADD, cs[i].fd, &ev);
    }
    long n = 0, bad = 0;
    int outstanding = conns, stopping = 0;
    long done = 0;
    double t0 = now(), deadline = t0 + seconds, elapsed = 0;
    for (int i = 0; i < conns; i++) if (write(cs[i].fd, req, req_len) != (ssize_t)req_len) return 1;
    struct epoll_event evs[64];
    while (outstanding > 0) {
        int k = epoll_wait(ep, evs, 64, 1000);
        if (k < 0 && errno != EINTR) { perror("epoll_wait"); return 1; }
        for (int j = 0; j < k; j++) {
            struct conn *c = evs[j].data.ptr;
            ssize_t got = read(c->fd, c->buf + c->have, BUF - c->have);
            if (got <= 0) { fprintf(stderr, "connection closed\n"); return 1; }
            c->have += (size_t)got;
            size_t len = answer_len(c->buf, c->have);
            if (!len) continue;
            if (strncmp(c->buf, "HTTP/1.1 200", 12) != 0) bad++;
            memmove(c->buf, c->buf + len, c->have - len);
            c->have -= len;
            n++;
            if (!stopping && (n & 255) == 0 && now() > deadline) {
                stopping = 1;
                elapsed = now() - t0;
                done = n;
            }
            if (stopping) outstanding--;
            else if (write(c->fd, req, req_len) != (ssize_t)req_len) return 1;
        }
        if (now() > deadline + 5) break;
    }
    if (!stopping) { elapsed = now() - t0; done = n; }
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    double cpu = ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + ru.ru_stime.tv_sec + ru.ru_stime.tv_usec / 1e6;
    printf("{\"n\": %ld, \"elapsed\": %.6f, \"bad\": %ld, \"cpu\": %.6f, \"starts\": [], \"lats\": []}\n", done, elapsed, bad, cpu);
    return 0;
}
