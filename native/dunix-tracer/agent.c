/* The tracer protocol (docs/run.md): events out, slot table and mode in, no round trip. */
#define _GNU_SOURCE
#include <errno.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>

#include "tracer.h"

#define MSG_MAX (2 * PATH_MAX + 256)
#define FIELDS_MAX 4096

struct slot {
	char *node;
	long count;
};

enum mode placement = MODE_AUTO;
int quit_requested;
static int sock = -1;
static struct slot *slots;
static size_t nslots, next_slot;
/* `spill`: where an auto job's execs go, in order, while the home is idle by gossip but
 * this job already keeps `spill_at` of its processes running here (a burst gossip cannot
 * see yet); node "." is the home itself */
static struct slot *spills;
static size_t nspills, next_spill;
static long spill_at = -1;

void agent_init(int fd)
{
	sock = fd;
}

int agent_fd(void)
{
	return sock;
}

/*
 * Events the agent needs only for its process table (`fork`, `exec`, `exit` of a process
 * other than the first, `unmovable`) wait here up to BATCH_DELAY_MS and leave as one
 * `batch` packet: COUNT FIELD... per message, so an empty field survives. A fork-heavy
 * script sent three packets per command, and the agent's Python spent ~75 us on each,
 * inside the host's CPU quota. Every other message flushes the batch first, so the order
 * of all messages is kept.
 */
#define BATCH_BYTES 60000 /* the agent reads packets of up to 64 KiB */
#define BATCH_EVENTS 256
#define BATCH_DELAY_MS 5
#define FIELDS_OUT 8

static char batch[BATCH_BYTES];
static size_t batch_len;
static int batch_events;
static struct timespec batch_since; /* when its oldest event was queued */

static void send_packet(const char *buf, size_t len)
{
	/* blocking: a slow agent slows the job rather than lose its events */
	while (send(sock, buf, len, MSG_NOSIGNAL) < 0 && errno == EINTR)
		;
}

static int collect(const char **f, const char *kind, va_list ap)
{
	int n = 0;
	f[n++] = kind;
	while (n < FIELDS_OUT && (f[n] = va_arg(ap, const char *)))
		n++;
	return n;
}

/* fields '\0'-joined into buf from len on (a '\0' first unless len is 0); the new length */
static size_t join(char *buf, size_t size, size_t len, const char **f, int n)
{
	for (int i = 0; i < n; i++) {
		size_t k = strlen(f[i]);
		if (len && len < size)
			buf[len++] = '\0';
		if (len + k > size)
			k = size - len;
		memcpy(buf + len, f[i], k);
		len += k;
	}
	return len;
}

void flush_events(void)
{
	if (batch_len && sock >= 0)
		send_packet(batch, batch_len);
	batch_len = 0;
	batch_events = 0;
}

/* Appends one message (its field count, then its fields) to the batch. */
static void queue(const char **f, int n)
{
	char msg[MSG_MAX], count[16];
	const char *g[FIELDS_OUT + 1];
	snprintf(count, sizeof count, "%d", n);
	g[0] = count;
	memcpy(g + 1, f, n * sizeof *f);
	size_t len = join(msg, sizeof msg, 0, g, n + 1);
	if (batch_len + 1 + len > sizeof batch)
		flush_events();
	if (!batch_len) {
		batch_len = join(batch, sizeof batch, 0, (const char *[]){ "batch" }, 1);
		clock_gettime(CLOCK_MONOTONIC, &batch_since);
	}
	batch[batch_len++] = '\0';
	memcpy(batch + batch_len, msg, len);
	batch_len += len;
	batch_events++;
}

/* Now: fields joined by '\0' as one packet, or, when a batch waits, as its last message
 * (one packet, so one wake-up of the agent, instead of two: a remote exec's `remote`
 * found the previous deputy's `exit` and its own `fork` waiting). A dead agent is not our
 * problem: the job goes on. */
void emit(const char *kind, ...)
{
	char buf[MSG_MAX];
	const char *f[FIELDS_OUT];
	va_list ap;

	if (sock < 0)
		return;
	va_start(ap, kind);
	int n = collect(f, kind, ap);
	va_end(ap);
	if (batch_len) {
		queue(f, n);
		flush_events();
		return;
	}
	send_packet(buf, join(buf, sizeof buf, 0, f, n));
}

void emit_later(const char *kind, ...)
{
	const char *f[FIELDS_OUT];
	va_list ap;

	if (sock < 0)
		return;
	va_start(ap, kind);
	int n = collect(f, kind, ap);
	va_end(ap);
	queue(f, n);
	if (batch_events >= BATCH_EVENTS)
		flush_events();
}

/* Sends a batch that waited BATCH_DELAY_MS; how long (ms, at most `longest`) the main
 * loop may sleep before the next one is due. */
int flush_if_due(int longest)
{
	if (!batch_len)
		return longest;
	struct timespec now;
	clock_gettime(CLOCK_MONOTONIC, &now);
	long waited = (now.tv_sec - batch_since.tv_sec) * 1000 +
		      (now.tv_nsec - batch_since.tv_nsec) / 1000000;
	long left = BATCH_DELAY_MS - waited;
	if (left <= 0)
		flush_events();
	return left <= 0 ? longest : (int)(left < longest ? left : longest);
}

void emit_pid(const char *kind, pid_t pid, const char *rest)
{
	char p[16];
	snprintf(p, sizeof p, "%d", pid);
	emit(kind, p, rest, (char *)NULL);
}

void emit_pid_later(const char *kind, pid_t pid, const char *rest)
{
	char p[16];
	snprintf(p, sizeof p, "%d", pid);
	emit_later(kind, p, rest, (char *)NULL);
}

static void fill_table(struct slot **table, size_t *count, size_t *next, char **f, int n)
{
	for (size_t i = 0; i < *count; i++)
		free((*table)[i].node);
	free(*table);
	*table = NULL;
	*count = *next = 0;
	if (n / 2 == 0 || !(*table = calloc(n / 2, sizeof **table)))
		return;
	for (int i = 0; i + 1 < n; i += 2) {
		(*table)[*count].node = strdup(f[i]);
		(*table)[*count].count = strtol(f[i + 1], NULL, 10);
		if ((*table)[*count].node)
			(*count)++;
	}
}

static void set_slots(char **f, int n)
{
	fill_table(&slots, &nslots, &next_slot, f, n);
}

/* spill AT NODE COUNT ...: AT < 0 turns spilling off */
static void set_spill(char **f, int n)
{
	spill_at = n > 0 ? strtol(f[0], NULL, 10) : -1;
	fill_table(&spills, &nspills, &next_spill, f + 1, n - 1);
}

static void set_mode(const char *m)
{
	if (!strcmp(m, "local"))
		placement = MODE_LOCAL;
	else if (!strcmp(m, "remote"))
		placement = MODE_REMOTE;
	else if (!strcmp(m, "auto"))
		placement = MODE_AUTO;
}

/* Reads every queued agent message without blocking. */
void read_agent(void)
{
	static char buf[65536];
	static char *f[FIELDS_MAX];
	while (sock >= 0) {
		ssize_t n = recv(sock, buf, sizeof buf - 1, MSG_DONTWAIT);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
			return;
		if (n <= 0) { /* EOF or error: keep tracing, stop talking */
			sock = -1;
			return;
		}
		buf[n] = '\0';
		if (buf[n - 1] == '\0')
			n--;
		int nf = 0;
		for (char *p = buf; nf < FIELDS_MAX;) {
			f[nf++] = p;
			char *end = memchr(p, '\0', buf + n - p);
			if (!end)
				break;
			p = end + 1;
		}
		if (!strcmp(f[0], "slots"))
			set_slots(f + 1, nf - 1);
		else if (!strcmp(f[0], "spill"))
			set_spill(f + 1, nf - 1);
		else if (!strcmp(f[0], "mode") && nf > 1)
			set_mode(f[1]);
		else if (!strcmp(f[0], "release") || !strcmp(f[0], "seize") ||
			 !strcmp(f[0], "deputize") || !strcmp(f[0], "hold") ||
			 !strcmp(f[0], "resume"))
			queue_command(f, nf);
		else if (!strcmp(f[0], "quit"))
			quit_requested = 1; /* by the main loop, when no tracee is in our hands */
	}
}

/* `remote`: any peer in the table; `auto`: only one with a slot left. */
int pick_slot(void)
{
	if (placement == MODE_LOCAL || nslots == 0)
		return -1;
	for (size_t k = 0; k < nslots; k++) {
		size_t i = (next_slot + k) % nslots;
		if (placement == MODE_REMOTE || slots[i].count > 0)
			return (int)i;
	}
	return -1;
}

/* An auto job's spill peer (slot index + SPILL_BASE), or -1: only once `running` of its
 * processes (not counting the one at its exec) run here already. */
int pick_spill(long running)
{
	if (placement != MODE_AUTO || spill_at < 0 || running < spill_at)
		return -1;
	for (size_t i = next_spill; i < nspills; i++)
		if (spills[i].count > 0)
			return SPILL_BASE + (int)i;
	return -1;
}

/* Auto mode with spill entries left (only then are running processes counted). */
int spill_armed(void)
{
	if (placement != MODE_AUTO || spill_at < 0)
		return 0;
	for (size_t i = next_spill; i < nspills; i++)
		if (spills[i].count > 0)
			return 1;
	return 0;
}

int spill_is_home(int slot)
{
	return slot >= SPILL_BASE && !strcmp(spills[slot - SPILL_BASE].node, ".");
}

const char *use_slot(int i)
{
	if (i >= SPILL_BASE) {
		i -= SPILL_BASE;
		spills[i].count--; /* the order is kept: next entry once this one is used up */
		next_spill = spills[i].count > 0 ? (size_t)i : (size_t)i + 1;
		return spills[i].node;
	}
	if (placement == MODE_AUTO)
		slots[i].count--;
	next_slot = (size_t)i + 1;
	return slots[i].node;
}
