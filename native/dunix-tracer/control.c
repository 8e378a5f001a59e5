/*
 * The agent's hands on single processes (docs/run.md, "Tracer protocol"):
 *
 *   release PID     stop tracing PID (only it), leave it group-stopped so that CRIU can
 *                   seize it; answers `released PID`.
 *   seize PID [cont]
 *                   trace it again; a process we stopped for the release goes on, and
 *                   with `cont` any stopped one (CRIU restores a process stopped as it
 *                   was dumped: a released one is); answers `seized PID`.
 *   deputize PID NODE
 *                   PID (seized first if need be) execs the deputy in place, by syscall
 *                   injection (inject.c); answers `deputized PID NODE` at its exec event,
 *                   before the deputy runs.
 *   hold 1|0        new processes stay at their first stop (not run yet) until
 *   resume PID      ... lets one go; `release` and `deputize` also work there.
 *
 * Any of them can fail: `error PID REASON`. Commands are queued by read_agent() and run
 * from the main loop, never inside the handling of another stop.
 *
 * A released process must stay stopped: its seccomp filter (inherited from the job's first
 * process) turns an exec without a tracer into ENOSYS (kernel/seccomp.c, SECCOMP_RET_TRACE).
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <limits.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ptrace.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include "tracer.h"

#define RELEASED_MAX 256

int hold_forks;

/* Released processes: the tracer stays while one may come back (`seize`, `deputize`). */
struct released {
	pid_t pid;
	int pidfd;       /* readable once it has exited: then nobody will seize it again */
	int was_stopped; /* in a group-stop of its own before the release: leave it so */
};
static struct released released[RELEASED_MAX];
static int nreleased;

struct command {
	char *f[3];
	int n;
	struct command *next;
};
static struct command *commands, **commands_tail = &commands;

static void error_reply(pid_t pid, const char *reason)
{
	char p[16];
	snprintf(p, sizeof p, "%d", pid);
	emit("error", p, reason, (char *)NULL);
}

static struct released *released_find(pid_t pid)
{
	for (int i = 0; i < nreleased; i++)
		if (released[i].pid == pid)
			return &released[i];
	return NULL;
}

static void released_drop(pid_t pid)
{
	struct released *r = released_find(pid);
	if (!r)
		return;
	if (r->pidfd >= 0)
		close(r->pidfd);
	*r = released[--nreleased];
}

int released_pending(void)
{
	for (int i = 0; i < nreleased;) {
		struct pollfd p = { released[i].pidfd, POLLIN, 0 };
		if (released[i].pidfd < 0 || poll(&p, 1, 0) > 0)
			released_drop(released[i].pid); /* gone: the job cannot wait for it */
		else
			i++;
	}
	return nreleased;
}

/* At `quit`: the job goes on without us, so the stops our releases made end too. */
void released_continue_all(void)
{
	for (int i = 0; i < nreleased; i++)
		if (!released[i].was_stopped && released[i].pidfd >= 0)
			syscall(SYS_pidfd_send_signal, released[i].pidfd, SIGCONT, NULL, 0);
}

int released_pollfds(struct pollfd *p, int max)
{
	int n = 0;
	for (int i = 0; i < nreleased && n < max; i++)
		if (released[i].pidfd >= 0)
			p[n++] = (struct pollfd){ released[i].pidfd, POLLIN, 0 };
	return n;
}

/* ------------------------------------------------------------------ release */

static void detach_released(struct tracee *t, int sig)
{
	pid_t tid = t->pid, tgid = t->tgid;
	ptrace(PTRACE_DETACH, tid, NULL, (void *)(long)sig);
	forget(tid);
	if (!tracee_any_of(tgid))
		emit_pid("released", tgid, NULL);
}

static void cmd_release(pid_t pid)
{
	struct tracee *t = tracee_find(pid);
	if (!t || t->tgid != pid) {
		error_reply(pid, released_find(pid) ? "released already" : "no such process traced");
		return;
	}
	if (t->want != WANT_NONE || t->injected) {
		error_reply(pid, "busy with another command");
		return;
	}
	if (nreleased == RELEASED_MAX) {
		error_reply(pid, "too many released processes");
		return;
	}
	int pidfd = (int)syscall(SYS_pidfd_open, pid, 0);
	released[nreleased++] = (struct released){ pid, pidfd, t->stopped };
	if (!t->stopped)
		kill(pid, SIGSTOP); /* the group-stop CRIU finds, and keeps after our detach */
	if (t->held) { /* at its first stop, not run yet: the SIGSTOP waits for it */
		t->held = 0;
		detach_released(t, 0);
		return;
	}
	want_process(pid, WANT_RELEASE);
}

/* The stop a release waited for; 1 when the thread was detached here. */
static int release_stop(struct tracee *t, int status)
{
	int sig = WSTOPSIG(status), event = (unsigned)status >> 16;
	if (event == 0 && sig != (SIGTRAP | 0x80)) { /* signal-delivery: it gets it untraced */
		detach_released(t, sig);
		return 1;
	}
	if (event == PTRACE_EVENT_STOP) { /* interrupt or group-stop: the SIGSTOP does the rest */
		detach_released(t, 0);
		return 1;
	}
	return 0; /* fork, exec, exit events: as usual; the interrupt is still to come */
}

/* ------------------------------------------------------------------ seize */

/* Seizes every thread of pid; 0, or -1 with errno from the leader's seize. */
static int seize_process(pid_t pid, int quiet)
{
	if (ptrace(PTRACE_SEIZE, pid, NULL, (void *)(long)TRACE_OPTIONS) < 0)
		return -1;
	tracee_add(pid, pid)->quiet = quiet;
	char dir[64];
	snprintf(dir, sizeof dir, "/proc/%d/task", pid);
	/* threads it makes meanwhile are auto-attached by the ones already seized */
	for (int again = 1; again;) {
		again = 0;
		DIR *d = opendir(dir);
		if (!d)
			break;
		struct dirent *e;
		while ((e = readdir(d))) {
			pid_t tid = (pid_t)atoi(e->d_name);
			if (tid <= 0 || tracee_find(tid))
				continue;
			if (ptrace(PTRACE_SEIZE, tid, NULL, (void *)(long)TRACE_OPTIONS) == 0) {
				tracee_add(tid, pid)->quiet = quiet;
				again = 1;
			}
		}
		closedir(d);
	}
	return 0;
}

static void cmd_seize(pid_t pid, int cont)
{
	if (tracee_find(pid)) {
		error_reply(pid, "traced already");
		return;
	}
	struct released *r = released_find(pid);
	int resume = cont || (r && !r->was_stopped);
	if (seize_process(pid, resume) < 0) {
		char why[128];
		snprintf(why, sizeof why, "cannot seize: %s", strerror(errno));
		error_reply(pid, why);
		return;
	}
	if (r && r->was_stopped && !cont) {
		struct tracee *t = tracee_find(pid);
		t->stopped = 1; /* reported at the release already */
	}
	released_drop(pid);
	if (resume)
		kill(pid, SIGCONT); /* the stop was ours: it goes on as before the release */
	emit_pid("seized", pid, NULL);
}

/* ------------------------------------------------------------------ deputize */

static void start_injection(struct tracee *t, int group_stopped)
{
	const char *deputy = deputy_path();
	char env[PATH_MAX + 32], err[256];
	const char *sock = getenv("DUNIX_DEPUTY_SOCKET"); /* the test and debug knob */
	char *argv[] = { "dunix-deputy", "--migrated", NULL };
	char *envp[] = { NULL, NULL };
	if (sock && *sock && snprintf(env, sizeof env, "DUNIX_DEPUTY_SOCKET=%s", sock) <
				     (int)sizeof env)
		envp[0] = env;
	pid_t pid = t->pid;
	if (inject_exec(t, deputy, argv, envp, err, sizeof err) < 0) {
		t->want = WANT_NONE;
		free(t->node);
		t->node = NULL;
		error_reply(pid, err);
		ptrace(PTRACE_CONT, pid, NULL, NULL);
		return;
	}
	t->injected = 1;
	t->remote = 1; /* its exec event is not reported as `exec` */
	t->cont_after = group_stopped;
	ptrace(PTRACE_SYSCALL, pid, NULL, NULL); /* a failed exec shows as a syscall-exit-stop */
}

static void cmd_deputize(pid_t pid, const char *node)
{
	if (!deputy_path()) {
		error_reply(pid, "no deputy");
		return;
	}
	struct tracee *t = tracee_find(pid);
	if (!t) {
		struct released *r = released_find(pid);
		int was_stopped = r ? r->was_stopped : 0;
		if (seize_process(pid, 1) < 0) {
			char why[128];
			snprintf(why, sizeof why, "cannot seize: %s", strerror(errno));
			error_reply(pid, why);
			return;
		}
		released_drop(pid);
		t = tracee_find(pid);
		t->stopped = was_stopped;
	}
	if (t->tgid != pid) {
		error_reply(pid, "not a process");
		return;
	}
	if (t->want != WANT_NONE || t->injected) {
		error_reply(pid, "busy with another command");
		return;
	}
	t->want = WANT_DEPUTIZE;
	t->node = strdup(node);
	if (t->held) {
		t->held = 0;
		start_injection(t, 0);
		return;
	}
	ptrace(PTRACE_INTERRUPT, pid, NULL, NULL);
}

void on_deputy_exec(struct tracee *t)
{
	char p[16];
	snprintf(p, sizeof p, "%d", t->pid);
	emit("deputized", p, t->node ? t->node : "", (char *)NULL);
	if (t->cont_after) {
		/* CRIU or the release left the group stopped; the process runs elsewhere now,
		 * and its parent is told so (CLD_CONTINUED), as after any SIGCONT */
		t->stopped = 0;
		kill(t->pid, SIGCONT);
	}
	t->want = WANT_NONE;
	t->injected = t->cont_after = 0;
	free(t->node);
	free(t->saved);
	t->node = NULL;
	t->saved = NULL;
}

/* ------------------------------------------------------------------ stops and exits */

int on_wanted_stop(struct tracee *t, int status)
{
	if (t->injected) {
		char err[256];
		int r = injected_stop(t, status, err, sizeof err);
		if (r < 0) { /* the exec failed: the registers are back, the process goes on */
			pid_t pid = t->pid;
			t->want = WANT_NONE;
			t->injected = t->remote = t->cont_after = 0;
			free(t->node);
			t->node = NULL;
			error_reply(pid, err);
			ptrace(PTRACE_CONT, pid, NULL, NULL);
			return 1;
		}
		if (r > 0) {
			ptrace(PTRACE_SYSCALL, t->pid, NULL, NULL);
			return 1;
		}
		return 0;
	}
	if (t->want == WANT_RELEASE)
		return release_stop(t, status);
	if (t->want == WANT_DEPUTIZE && ((unsigned)status >> 16) == PTRACE_EVENT_STOP) {
		start_injection(t, is_stop_signal(WSTOPSIG(status)));
		return 1;
	}
	return 0;
}

void on_wanted_exit(struct tracee *t)
{
	if (t->want != WANT_NONE && t->tgid == t->pid)
		error_reply(t->pid, "exited");
	if (t->tgid == t->pid)
		released_drop(t->pid);
}

/* ------------------------------------------------------------------ the queue */

void queue_command(char **f, int n)
{
	struct command *c = calloc(1, sizeof *c);
	if (!c)
		die("out of memory");
	for (int i = 0; i < n && i < 3; i++)
		if (!(c->f[i] = strdup(f[i])))
			die("out of memory");
	c->n = n < 3 ? n : 3;
	*commands_tail = c;
	commands_tail = &c->next;
}

static pid_t pid_field(const char *s)
{
	char *end;
	long v = strtol(s, &end, 10);
	return *s && !*end && v > 0 && v < (1L << 30) ? (pid_t)v : 0;
}

static void run_command(struct command *c)
{
	const char *kind = c->f[0];
	if (!strcmp(kind, "hold")) {
		hold_forks = c->n > 1 && !strcmp(c->f[1], "1");
		return;
	}
	pid_t pid = c->n > 1 ? pid_field(c->f[1]) : 0;
	if (!pid) {
		fprintf(stderr, PROG ": %s without a pid\n", kind);
		return;
	}
	if (!strcmp(kind, "release")) {
		cmd_release(pid);
	} else if (!strcmp(kind, "seize")) {
		cmd_seize(pid, c->n > 2 && !strcmp(c->f[2], "cont"));
	} else if (!strcmp(kind, "deputize")) {
		if (c->n < 3)
			error_reply(pid, "deputize needs a node");
		else
			cmd_deputize(pid, c->f[2]);
	} else if (!strcmp(kind, "resume")) {
		struct tracee *t = tracee_find(pid);
		if (t && t->held) {
			t->held = 0;
			ptrace(PTRACE_CONT, pid, NULL, NULL);
		}
	}
}

void run_commands(void)
{
	while (commands) {
		struct command *c = commands;
		commands = c->next;
		if (!commands)
			commands_tail = &commands;
		run_command(c);
		for (int i = 0; i < 3; i++)
			free(c->f[i]);
		free(c);
	}
}
