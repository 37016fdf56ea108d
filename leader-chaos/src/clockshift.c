/*
 * Steps the wall clock of the process it is preloaded into (LD_PRELOAD) by the offset
 * written in the file that LEADER_CLOCKSHIFT_FILE names: seconds with a sign, such as
 * "+1.500000" or "-0.250000", re-read at most every 10 ms. Monotonic clocks stay true.
 *
 * Written for the chaos suite's store clock steps on redis-server, whose jemalloc cannot
 * run under libfaketime (jemalloc reads the clock while libfaketime initialises itself).
 * This library never allocates and never looks symbols up: it reads the real clocks and
 * the file through raw system calls, so it initialises nothing.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#define NS 1000000000LL

static volatile int64_t offset_ns;
static volatile int64_t read_at_ns;

static int64_t monotonic_ns(void) {
    struct timespec ts;
    if (syscall(SYS_clock_gettime, CLOCK_MONOTONIC, &ts) != 0) {
        return 0;
    }
    return (int64_t)ts.tv_sec * NS + ts.tv_nsec;
}

/* "+S.ffffff" (sign optional, up to nine decimals) in nanoseconds; 0 when malformed. */
static int64_t parse(const char *s, long n) {
    long i = 0;
    int64_t sign = 1, whole = 0, frac = 0, scale = NS;
    if (i < n && (s[i] == '+' || s[i] == '-')) {
        sign = s[i] == '-' ? -1 : 1;
        i++;
    }
    for (; i < n && s[i] >= '0' && s[i] <= '9'; i++) {
        whole = whole * 10 + (s[i] - '0');
    }
    if (i < n && s[i] == '.') {
        for (i++; i < n && s[i] >= '0' && s[i] <= '9' && scale > 1; i++) {
            scale /= 10;
            frac += (s[i] - '0') * scale;
        }
    }
    return sign * (whole * NS + frac);
}

static int64_t offset(void) {
    int64_t now = monotonic_ns();
    if (read_at_ns != 0 && now - read_at_ns < 10000000) {
        return offset_ns;
    }
    read_at_ns = now;
    const char *path = getenv("LEADER_CLOCKSHIFT_FILE");
    if (path == NULL) {
        return 0;
    }
    long fd = syscall(SYS_openat, AT_FDCWD, path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        return offset_ns;
    }
    char buf[64];
    long n = syscall(SYS_read, fd, buf, sizeof buf);
    syscall(SYS_close, fd);
    if (n > 0) {
        offset_ns = parse(buf, n);
    }
    return offset_ns;
}

static void shift(struct timespec *ts) {
    int64_t t = (int64_t)ts->tv_sec * NS + ts->tv_nsec + offset();
    ts->tv_sec = (time_t)(t / NS);
    ts->tv_nsec = (long)(t % NS);
    if (ts->tv_nsec < 0) {
        ts->tv_nsec += NS;
        ts->tv_sec -= 1;
    }
}

int clock_gettime(clockid_t clock, struct timespec *ts) {
    long r = syscall(SYS_clock_gettime, clock, ts);
    if (r == 0 && (clock == CLOCK_REALTIME || clock == CLOCK_REALTIME_COARSE)) {
        shift(ts);
    }
    return (int)r;
}

int gettimeofday(struct timeval *restrict tv, void *restrict tz) {
    (void)tz;
    struct timespec ts;
    int r = clock_gettime(CLOCK_REALTIME, &ts);
    if (r == 0) {
        tv->tv_sec = ts.tv_sec;
        tv->tv_usec = ts.tv_nsec / 1000;
    }
    return r;
}

time_t time(time_t *out) {
    struct timespec ts;
    if (clock_gettime(CLOCK_REALTIME, &ts) != 0) {
        return (time_t)-1;
    }
    if (out != NULL) {
        *out = ts.tv_sec;
    }
    return ts.tv_sec;
}
