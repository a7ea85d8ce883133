/* Request/response latency client.
 *   pingpong HOST PORT SIZE ITERS WARMUP MODE MAX_SECONDS
 * MODE "persistent": one TCP_NODELAY connection, each sample = write SIZE bytes, read SIZE bytes back.
 * MODE "conn": each sample = connect, write SIZE bytes, read them back, close (new connection + first byte).
 * Stops after ITERS measured samples or MAX_SECONDS, whichever comes first, so quick runs stay bounded on a slow
 * path.  Every reply is compared with what was sent: a path that corrupts bytes fails instead of looking fast.
 * Prints one JSON object (microseconds) on stdout; exits non-zero with a reason on stderr. */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

static double now_us(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec * 1e6 + (double)t.tv_nsec / 1e3;
}

static int by_value(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static struct sockaddr_in target;

static int dial(void) {
    int fd = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    struct timeval stall = {.tv_sec = 10}; /* a stalled path fails the measure instead of hanging it */
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &stall, sizeof stall);
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &stall, sizeof stall);
    if (connect(fd, (struct sockaddr *)&target, sizeof target)) { perror("connect"); exit(3); }
    return fd;
}

static void round_trip(int fd, char *out, char *in, int size, unsigned seq) {
    memset(out, 'a' + (int)(seq % 26), (size_t)size);
    for (int off = 0; off < size;) {
        ssize_t w = write(fd, out + off, (size_t)(size - off));
        if (w <= 0) { perror("write"); exit(4); }
        off += (int)w;
    }
    for (int off = 0; off < size;) {
        ssize_t r = read(fd, in + off, (size_t)(size - off));
        if (r < 0) {
            const char *why = errno == EAGAIN || errno == EWOULDBLOCK ? "no reply within 10 s" : strerror(errno);
            fprintf(stderr, "read after %d of %d bytes: %s\n", off, size, why);
            exit(5);
        }
        if (r == 0) { fprintf(stderr, "read: connection closed after %d of %d bytes\n", off, size); exit(5); }
        off += (int)r;
    }
    if (memcmp(out, in, (size_t)size)) { fprintf(stderr, "echo mismatch at sample %u\n", seq); exit(6); }
}

int main(int argc, char **argv) {
    if (argc != 8) { fprintf(stderr, "usage: pingpong HOST PORT SIZE ITERS WARMUP persistent|conn MAX_SECONDS\n"); return 2; }
    int size = atoi(argv[3]), iters = atoi(argv[4]), warm = atoi(argv[5]);
    int per_conn = strcmp(argv[6], "conn") == 0;
    double deadline = now_us() + atof(argv[7]) * 1e6;
    target.sin_family = AF_INET;
    target.sin_port = htons((uint16_t)atoi(argv[2]));
    if (inet_pton(AF_INET, argv[1], &target.sin_addr) != 1 || size < 1 || iters < 1) { fprintf(stderr, "bad arguments\n"); return 2; }
    char *out = malloc((size_t)size), *in = malloc((size_t)size);
    double *lat = malloc(sizeof(double) * (size_t)iters);
    int fd = per_conn ? -1 : dial(), n = 0;
    double started = 0;
    for (unsigned i = 0; n < iters; i++) {
        if (i == (unsigned)warm) started = now_us();
        double t0 = now_us();
        if (per_conn) fd = dial();
        round_trip(fd, out, in, size, i);
        double t1 = now_us();
        if (per_conn) close(fd);
        if (i >= (unsigned)warm) lat[n++] = t1 - t0;
        if (t1 > deadline && n > 0) break;
    }
    double elapsed = (now_us() - started) / 1e6, sum = 0;
    if (!per_conn) close(fd);
    for (int i = 0; i < n; i++) sum += lat[i];
    qsort(lat, (size_t)n, sizeof(double), by_value);
#define Q(q) lat[(int)((q) * (n - 1))]
    printf("{\"size\": %d, \"mode\": \"%s\", \"samples\": %d, \"elapsed_s\": %.4f, \"rate_per_s\": %.1f, "
           "\"min\": %.2f, \"p50\": %.2f, \"p90\": %.2f, \"p99\": %.2f, \"p999\": %.2f, \"max\": %.2f, \"mean\": %.2f}\n",
           size, per_conn ? "conn" : "persistent", n, elapsed, n / elapsed, lat[0], Q(0.5), Q(0.9), Q(0.99), Q(0.999),
           lat[n - 1], sum / n);
    return 0;
}
