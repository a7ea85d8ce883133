/* Echo backend for the latency measures: one epoll loop, TCP_NODELAY, partial writes kept per connection.
 * A single thread keeps the backend's own cost small and predictable, so differences between configurations
 * come from the path in between, not from the server.  Usage: echo_server PORT */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#define BUF 65536
#define MAXFD 65536

struct conn { char *pending; size_t off, len; };
static struct conn conns[MAXFD];

static void drop(int ep, int fd) {
    epoll_ctl(ep, EPOLL_CTL_DEL, fd, NULL);
    free(conns[fd].pending);
    memset(&conns[fd], 0, sizeof conns[fd]);
    close(fd);
}

/* Returns 0 when everything queued was written, 1 when the socket is full, -1 on error. */
static int flush(int fd) {
    struct conn *c = &conns[fd];
    while (c->off < c->len) {
        ssize_t w = write(fd, c->pending + c->off, c->len - c->off);
        if (w < 0) return (errno == EAGAIN || errno == EWOULDBLOCK) ? 1 : -1;
        c->off += (size_t)w;
    }
    c->off = c->len = 0;
    return 0;
}

int main(int argc, char **argv) {
    if (argc != 2) { fprintf(stderr, "usage: echo_server PORT\n"); return 2; }
    signal(SIGPIPE, SIG_IGN);
    int one = 1, lfd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)atoi(argv[1]))};
    if (bind(lfd, (struct sockaddr *)&a, sizeof a) || listen(lfd, 4096)) { perror("bind/listen"); return 1; }
    int ep = epoll_create1(0);
    struct epoll_event ev = {.events = EPOLLIN, .data.fd = lfd}, evs[256];
    epoll_ctl(ep, EPOLL_CTL_ADD, lfd, &ev);
    static char buf[BUF];
    for (;;) {
        int n = epoll_wait(ep, evs, 256, -1);
        for (int i = 0; i < n; i++) {
            int fd = evs[i].data.fd;
            if (fd == lfd) {
                int c;
                while ((c = accept4(lfd, NULL, NULL, SOCK_NONBLOCK)) >= 0) {
                    if (c >= MAXFD) { close(c); continue; }
                    setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                    struct epoll_event ce = {.events = EPOLLIN | EPOLLRDHUP, .data.fd = c};
                    epoll_ctl(ep, EPOLL_CTL_ADD, c, &ce);
                }
                continue;
            }
            struct conn *c = &conns[fd];
            if (c->len) { /* waiting for room to write what was read earlier */
                int r = flush(fd);
                if (r < 0) { drop(ep, fd); continue; }
                if (r == 0) {
                    struct epoll_event ce = {.events = EPOLLIN | EPOLLRDHUP, .data.fd = fd};
                    epoll_ctl(ep, EPOLL_CTL_MOD, fd, &ce);
                }
                continue;
            }
            ssize_t r = read(fd, buf, BUF);
            if (r == 0 || (r < 0 && errno != EAGAIN)) { drop(ep, fd); continue; }
            if (r < 0) continue;
            c->pending = c->pending ? c->pending : malloc(BUF);
            memcpy(c->pending, buf, (size_t)r);
            c->off = 0;
            c->len = (size_t)r;
            int f = flush(fd);
            if (f < 0) { drop(ep, fd); continue; }
            if (f == 1) {
                struct epoll_event ce = {.events = EPOLLOUT, .data.fd = fd};
                epoll_ctl(ep, EPOLL_CTL_MOD, fd, &ce);
            }
        }
    }
}
