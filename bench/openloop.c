/*
 * openloop: a fixed-rate (open-loop) HTTP/1.1 load generator for bench/_util.py.
 *
 *     openloop HOST PORT REQUEST_FILE RATE DURATION_S CONNECTIONS
 *
 * Why it exists: wrk2 is not packaged in Debian, and the Python generator it replaces
 * (aiohttp on uvloop, one task per request) cost 0.5-1 ms of p50 by itself on a 2-core
 * machine and ~6x this one's CPU, taken from the server under test. This is one thread with epoll and a
 * timerfd: it sleeps until the next request is due.
 *
 * Request i is due at t0 + i/RATE and its latency counts from then, not from when it was
 * sent, so waiting for a free connection behind a slow server shows (no coordinated
 * omission). REQUEST_FILE (one raw request with Content-Length and keep-alive) is sent
 * verbatim, one request in flight per connection. Prints one JSON line on stdout; exits 2
 * on bad arguments or when no connection can be made.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/timerfd.h>
#include <time.h>
#include <unistd.h>

#define NS 1000000000LL
#define LATE_NS 1000000LL        /* a send later than this behind its due time is "late" */
#define RETRY_NS 10000000LL      /* pause before retrying a refused connect */
#define DRAIN_NS (10 * NS)       /* wait for outstanding responses after the last send */
#define TIMER_TAG UINT32_MAX

enum state { DEAD, CONNECTING, IDLE, WRITING, READING };

struct conn {
	int fd;
	enum state state;
	int queued;     /* has an entry in the idle FIFO (maybe stale, see idle_pop) */
	int want_out;   /* EPOLLOUT registered: a partial write is pending */
	size_t sent;
	int64_t due, retry_at;
	char *buf;
	size_t len, cap;
};

struct resp { int status, close, until_eof; };

static struct {
	struct sockaddr_in addr;
	char *req;
	size_t req_len;
	double rate;
	int64_t total, t0, deadline, armed;
	int ep, tfd, nconn, inflight, ndead, last_err;
	struct conn *conns;
	/* Idle connections are used round-robin, not LIFO: none sits idle long enough for the
	 * server's keep-alive timeout to close it just as a request goes out on it. */
	int *idle, idle_head, idle_n;
	/* Due times grow with i, so the FIFO of due requests waiting for a connection is just
	 * the index range [next_send, due_n). */
	int64_t due_n, next_send;
	int64_t *lat, done, last_done;
	long errors, non_2xx, late;
} g;

static int64_t mono_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * NS + ts.tv_nsec;
}

/* From i, never accumulated, so rounding cannot drift the rate. */
static int64_t due(int64_t i) { return g.t0 + (int64_t)((double)i * 1e9 / g.rate); }

static void die(const char *msg, const char *detail)
{
	fprintf(stderr, "openloop: %s%s%s\n", msg, detail ? ": " : "", detail ? detail : "");
	exit(2);
}

/* ---- response parsing: returns the response's length, 0 for "need more", -1 if bad ---- */

static int header_is(const char *p, const char *e, const char *name, const char **v, const char **ve)
{
	size_t k = strlen(name);
	if ((size_t)(e - p) <= k || p[k] != ':' || strncasecmp(p, name, k) != 0)
		return 0;
	for (p += k + 1; p < e && (*p == ' ' || *p == '\t'); p++)
		;
	*v = p;
	*ve = e;
	return 1;
}

static int has_word(const char *v, const char *e, const char *word)
{
	size_t k = strlen(word);
	for (; (size_t)(e - v) >= k; v++)
		if (strncasecmp(v, word, k) == 0)
			return 1;
	return 0;
}

static long parse_head(const char *buf, size_t len, struct resp *r, long *clen, int *chunked)
{
	const char *end = memmem(buf, len, "\r\n\r\n", 4), *p, *eol, *v, *ve;
	if (!end)
		return 0;
	if (end - buf < 12 || memcmp(buf, "HTTP/1.", 7) != 0 || buf[8] != ' ')
		return -1;
	r->status = 0;
	for (p = buf + 9; p < buf + 12; p++) {
		if (*p < '0' || *p > '9')
			return -1;
		r->status = r->status * 10 + (*p - '0');
	}
	r->close = buf[7] == '0';   /* HTTP/1.0 closes unless it says keep-alive */
	*clen = -1;
	*chunked = 0;
	for (p = (const char *)memmem(buf, len, "\r\n", 2) + 2; p < end + 2; p = eol + 2) {
		eol = memmem(p, (size_t)(end + 2 - p), "\r\n", 2);
		if (header_is(p, eol, "content-length", &v, &ve)) {
			if (v == ve)
				return -1;
			for (*clen = 0; v < ve && *v >= '0' && *v <= '9'; v++)
				*clen = *clen * 10 + (*v - '0');
		} else if (header_is(p, eol, "transfer-encoding", &v, &ve)) {
			*chunked = has_word(v, ve, "chunked");
		} else if (header_is(p, eol, "connection", &v, &ve)) {
			r->close = has_word(v, ve, "close") || (r->close && !has_word(v, ve, "keep-alive"));
		}
	}
	return end + 4 - buf;
}

static int hexval(char c)
{
	if (c >= '0' && c <= '9')
		return c - '0';
	c |= 0x20;
	return c >= 'a' && c <= 'f' ? c - 'a' + 10 : -1;
}

/* Re-parsed from the start on every read: fine for the small bodies benchmarked here. */
static long parse_chunked(const char *buf, size_t len, size_t pos)
{
	for (;;) {
		const char *eol = memmem(buf + pos, len - pos, "\r\n", 2), *p = buf + pos;
		size_t size = 0;
		if (!eol)
			return 0;
		for (; p < eol && hexval(*p) >= 0; p++) {
			if (size > SIZE_MAX / 32)
				return -1;
			size = size * 16 + (size_t)hexval(*p);
		}
		if (p == buf + pos || (p < eol && *p != ';' && *p != ' ' && *p != '\t'))
			return -1;   /* anything after the size must be an extension */
		pos = (size_t)(eol + 2 - buf);
		if (size == 0)
			break;
		if (size > len - pos || len - pos - size < 2)
			return 0;
		if (memcmp(buf + pos + size, "\r\n", 2) != 0)
			return -1;
		pos += size + 2;
	}
	for (;;) {   /* optional trailers, up to an empty line */
		const char *eol = memmem(buf + pos, len - pos, "\r\n", 2);
		if (!eol)
			return 0;
		if (eol == buf + pos)
			return (long)pos + 2;
		pos = (size_t)(eol + 2 - buf);
	}
}

static long parse_response(const char *buf, size_t len, struct resp *r)
{
	long clen;
	int chunked;
	long head = parse_head(buf, len, r, &clen, &chunked);
	r->until_eof = 0;
	if (head <= 0)
		return head;
	if (chunked)
		return parse_chunked(buf, len, (size_t)head);
	if (clen < 0 && (r->status == 204 || r->status == 304))
		clen = 0;   /* bodyless by definition */
	if (clen >= 0)
		return len - (size_t)head >= (size_t)clen ? head + clen : 0;
	if (!r->close)
		return -1;   /* no framing on a keep-alive connection (nor a 1xx: no Expect is sent) */
	r->until_eof = 1;
	return 0;
}

/* ---- connections ---- */

static void ep_ctl(int op, struct conn *c, uint32_t events)
{
	struct epoll_event ev = {.events = events, .data.u32 = (uint32_t)(c - g.conns)};
	epoll_ctl(g.ep, op, c->fd, &ev);
}

static void idle_push(struct conn *c)
{
	c->state = IDLE;
	if (!c->queued) {   /* a stale entry still sits in the ring: it now points at an idle one */
		c->queued = 1;
		g.idle[(g.idle_head + g.idle_n++) % g.nconn] = (int)(c - g.conns);
	}
}

static struct conn *idle_pop(void)
{
	while (g.idle_n > 0) {
		struct conn *c = &g.conns[g.idle[g.idle_head]];
		g.idle_head = (g.idle_head + 1) % g.nconn;
		g.idle_n--;
		c->queued = 0;
		if (c->state == IDLE)   /* it may have closed since it was queued */
			return c;
	}
	return NULL;
}

static void conn_dead(struct conn *c, int64_t now, int err)
{
	g.last_err = err;
	c->state = DEAD;
	c->retry_at = now + RETRY_NS;
	g.ndead++;
}

static void conn_open(struct conn *c, int64_t now)
{
	int one = 1;
	c->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	c->len = 0;
	c->want_out = 0;
	if (c->fd < 0) {
		conn_dead(c, now, errno);
		return;
	}
	setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
	if (connect(c->fd, (struct sockaddr *)&g.addr, sizeof g.addr) == 0) {
		ep_ctl(EPOLL_CTL_ADD, c, EPOLLIN);
		idle_push(c);
	} else if (errno == EINPROGRESS) {
		c->state = CONNECTING;
		ep_ctl(EPOLL_CTL_ADD, c, EPOLLIN | EPOLLOUT);
	} else {
		int err = errno;
		close(c->fd);
		conn_dead(c, now, err);
	}
}

/* Closes and reconnects; a request in flight on it is lost and counted as an error. */
static void conn_reset(struct conn *c, int64_t now)
{
	if (c->state == WRITING || c->state == READING) {
		g.errors++;
		g.inflight--;
	}
	close(c->fd);
	conn_open(c, now);
}

static void conn_connected(struct conn *c, int64_t now)
{
	int err = 0;
	socklen_t len = sizeof err;
	if (getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0 || err) {
		close(c->fd);
		conn_dead(c, now, err ? err : errno);
		return;
	}
	ep_ctl(EPOLL_CTL_MOD, c, EPOLLIN);
	idle_push(c);
}

/* Returns -1 when the connection was reset. */
static int conn_write(struct conn *c, int64_t now)
{
	while (c->sent < g.req_len) {
		ssize_t n = send(c->fd, g.req + c->sent, g.req_len - c->sent, MSG_NOSIGNAL);
		if (n > 0) {
			c->sent += (size_t)n;
		} else if (errno == EAGAIN) {
			if (!c->want_out)
				ep_ctl(EPOLL_CTL_MOD, c, EPOLLIN | EPOLLOUT);
			c->want_out = 1;
			return 0;
		} else if (errno != EINTR) {
			conn_reset(c, now);
			return -1;
		}
	}
	if (c->want_out)
		ep_ctl(EPOLL_CTL_MOD, c, EPOLLIN);
	c->want_out = 0;
	c->state = READING;
	return 0;
}

static void conn_send(struct conn *c, int64_t now)
{
	c->due = due(g.next_send++);
	if (now - c->due > LATE_NS)
		g.late++;
	c->state = WRITING;
	c->sent = c->len = 0;
	g.inflight++;
	conn_write(c, now);
}

static void complete(struct conn *c, const struct resp *r)
{
	int64_t now = mono_ns();
	g.lat[g.done++] = now - c->due;
	g.last_done = now;
	g.inflight--;
	c->len = 0;
	if (r->status < 200 || r->status > 399)
		g.non_2xx++;
	c->state = IDLE;   /* no longer in flight: a reset below is not an error */
}

/* Returns 1 at EOF or on a socket error, after reading what there was. */
static int conn_fill(struct conn *c)
{
	for (;;) {
		ssize_t n;
		if (c->cap - c->len < 4096) {
			c->cap = c->cap ? 2 * c->cap : 16384;
			if (!(c->buf = realloc(c->buf, c->cap)))
				die("out of memory", NULL);
		}
		n = recv(c->fd, c->buf + c->len, c->cap - c->len, 0);
		if (n > 0) {
			c->len += (size_t)n;
			if (c->len < c->cap)   /* short read: drained, spare a recv() for EAGAIN */
				return 0;
		} else if (n == 0 || (errno != EAGAIN && errno != EINTR)) {
			return 1;
		} else if (errno == EAGAIN) {
			return 0;
		}
	}
}

static void conn_read(struct conn *c, int64_t now)
{
	struct resp r;
	int eof = conn_fill(c);
	long n;
	if (c->state == IDLE) {   /* the server closed a keep-alive connection (or babbled) */
		if (eof || c->len)
			conn_reset(c, now);
		return;
	}
	size_t have = c->len;   /* complete() empties the buffer */
	n = parse_response(c->buf, c->len, &r);
	if (n == 0 && eof && r.until_eof)
		n = (long)c->len;
	if (n == 0 && !eof)
		return;
	if (n > 0)
		complete(c, &r);
	/* Bytes past the answer (or a request not fully sent) leave the connection out of step. */
	if (n <= 0 || r.close || eof || c->sent < g.req_len || (size_t)n != have)
		conn_reset(c, now);
	else
		idle_push(c);
}

static void on_event(struct conn *c, uint32_t events, int64_t now)
{
	if (c->state == CONNECTING) {
		conn_connected(c, now);
		return;
	}
	if ((events & EPOLLOUT) && c->state == WRITING && conn_write(c, now) < 0)
		return;
	if (events & (EPOLLIN | EPOLLERR | EPOLLHUP))
		conn_read(c, now);
}

/* ---- scheduling ---- */

static void arm(int64_t at)
{
	struct itimerspec its = {.it_value = {.tv_sec = at / NS, .tv_nsec = at % NS}};
	if (at != g.armed && timerfd_settime(g.tfd, TFD_TIMER_ABSTIME, &its, NULL) == 0)
		g.armed = at;
}

static void dispatch(int64_t now)
{
	struct conn *c;
	while (g.due_n < g.total && due(g.due_n) <= now)
		g.due_n++;
	while (g.next_send < g.due_n && (c = idle_pop()))
		conn_send(c, now);
	arm(g.due_n < g.total ? due(g.due_n) : g.deadline);
}

static void retry_dead(int64_t now)
{
	for (int i = 0; g.ndead && i < g.nconn; i++) {
		if (g.conns[i].state == DEAD && g.conns[i].retry_at <= now) {
			g.ndead--;
			conn_open(&g.conns[i], now);
		}
	}
}

static void run(void)
{
	struct epoll_event evs[256];
	for (;;) {
		int64_t now = mono_ns();
		uint64_t ticks;
		retry_dead(now);
		dispatch(now);
		if (g.next_send == g.total && g.inflight == 0)
			return;
		if (now >= g.deadline) {   /* what never went out or never came back */
			g.errors += (long)(g.total - g.next_send) + g.inflight;
			return;
		}
		int n = epoll_wait(g.ep, evs, 256, g.ndead ? 10 : -1);
		now = mono_ns();
		for (int i = 0; i < n; i++) {
			if (evs[i].data.u32 == TIMER_TAG) {
				if (read(g.tfd, &ticks, sizeof ticks) < 0)
					continue;   /* re-armed meanwhile: nothing to clear */
			} else {
				on_event(&g.conns[evs[i].data.u32], evs[i].events, now);
			}
		}
	}
}

/* ---- set-up and report ---- */

static void read_request(const char *path)
{
	FILE *f = fopen(path, "rb");
	long size;
	if (!f || fseek(f, 0, SEEK_END) != 0 || (size = ftell(f)) <= 0)
		die("cannot read a request from", path);
	rewind(f);
	g.req = malloc((size_t)size);
	if (!g.req || fread(g.req, 1, (size_t)size, f) != (size_t)size)
		die("cannot read", path);
	g.req_len = (size_t)size;
	fclose(f);
}

static void open_all(void)
{
	int ok = 0;
	struct epoll_event evs[64];
	int64_t give_up = mono_ns() + 5 * NS;
	for (int i = 0; i < g.nconn; i++)
		conn_open(&g.conns[i], 0);
	for (;;) {   /* wait until every connect has succeeded or failed */
		int pending = 0;
		for (int i = 0; i < g.nconn; i++)
			pending += g.conns[i].state == CONNECTING;
		if (!pending || mono_ns() > give_up)
			break;
		int n = epoll_wait(g.ep, evs, 64, 100);
		for (int i = 0; i < n; i++)
			if (g.conns[evs[i].data.u32].state == CONNECTING)
				conn_connected(&g.conns[evs[i].data.u32], 0);
	}
	for (int i = 0; i < g.nconn; i++)
		ok += g.conns[i].state == IDLE;
	if (!ok)
		die("cannot connect", g.last_err ? strerror(g.last_err) : "timed out");
}

static int cmp_i64(const void *a, const void *b)
{
	int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
	return (x > y) - (x < y);
}

/* Nearest rank, rounding half to even like Python's round() in bench/_util.py. */
static void put_pct(const char *name, double pct)
{
	double x = pct / 100.0 * (double)g.done;
	int64_t rank = (int64_t)x;
	if (x - (double)rank > 0.5 || (x - (double)rank == 0.5 && (rank & 1)))
		rank++;
	rank = rank - 1 < 0 ? 0 : rank - 1 > g.done - 1 ? g.done - 1 : rank - 1;
	if (g.done)
		printf(", \"%s\": %.4f", name, (double)g.lat[rank] / 1e6);
	else
		printf(", \"%s\": null", name);
}

static void report(void)
{
	double elapsed = (double)(g.last_done - g.t0) / 1e9;
	double rps = g.done && elapsed > 0 ? (double)g.done / elapsed : 0.0;
	qsort(g.lat, (size_t)g.done, sizeof *g.lat, cmp_i64);
	printf("{\"generator\": \"c-openloop\", \"target_rps\": %g, \"rps\": %.2f, "
	       "\"achieved_rps\": %.2f, \"requests\": %lld",
	       g.rate, rps, rps, (long long)g.done);
	put_pct("p50_ms", 50);
	put_pct("p75_ms", 75);
	put_pct("p90_ms", 90);
	put_pct("p99_ms", 99);
	put_pct("p999_ms", 99.9);
	put_pct("max_ms", 100);
	printf(", \"errors\": %ld, \"non_2xx\": %ld, \"late_sends\": %ld}\n", g.errors, g.non_2xx,
	       g.late);
}

int main(int argc, char **argv)
{
	struct epoll_event tev = {.events = EPOLLIN, .data.u32 = TIMER_TAG};
	double duration;
	int port;
	if (argc != 7)
		die("usage: openloop HOST PORT REQUEST_FILE RATE DURATION_S CONNECTIONS", NULL);
	port = atoi(argv[2]);
	g.rate = strtod(argv[4], NULL);
	duration = strtod(argv[5], NULL);
	g.nconn = atoi(argv[6]);
	g.addr.sin_family = AF_INET;
	g.addr.sin_port = htons((uint16_t)port);
	if (inet_pton(AF_INET, argv[1], &g.addr.sin_addr) != 1)
		die("HOST must be an IPv4 address", argv[1]);
	if (port < 1 || port > 65535 || !(g.rate > 0) || !(duration > 0) || g.nconn < 1)
		die("PORT, RATE, DURATION_S and CONNECTIONS must be positive", NULL);
	g.total = (int64_t)(g.rate * duration);
	if (g.total < 1)
		die("RATE * DURATION_S is less than one request", NULL);
	read_request(argv[3]);
	g.conns = calloc((size_t)g.nconn, sizeof *g.conns);
	g.idle = calloc((size_t)g.nconn, sizeof *g.idle);
	g.lat = malloc((size_t)g.total * sizeof *g.lat);
	if (!g.conns || !g.idle || !g.lat)
		die("out of memory", NULL);
	/* timerfd expiries are otherwise deferred by up to the 50 us default timer slack */
	prctl(PR_SET_TIMERSLACK, 1UL, 0UL, 0UL, 0UL);
	g.ep = epoll_create1(EPOLL_CLOEXEC);
	g.tfd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
	if (g.ep < 0 || g.tfd < 0 || epoll_ctl(g.ep, EPOLL_CTL_ADD, g.tfd, &tev) < 0)
		die("epoll/timerfd", strerror(errno));
	open_all();
	g.t0 = g.last_done = mono_ns();
	g.deadline = g.t0 + (int64_t)(duration * 1e9) + DRAIN_NS;
	run();
	report();
	return 0;
}
