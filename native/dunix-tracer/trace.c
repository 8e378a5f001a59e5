/*
 * The tracee table and every ptrace stop. Tracees are attached with PTRACE_SEIZE, so a
 * group-stop shows up as PTRACE_EVENT_STOP and is answered with PTRACE_LISTEN: the
 * process stays stopped, its parent's waitpid(WUNTRACED) sees it, and SIGCONT or SIGKILL
 * wake it (ptrace(2), "Group-stop", "PTRACE_LISTEN"). Signal-delivery-stops hand the
 * signal back unchanged.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ptrace.h>
#include <sys/wait.h>
#include <unistd.h>

#include "tracer.h"

pid_t first_pid;
static struct tracee *tracees;
static size_t ntracees, captracees;

struct tracee *tracee_find(pid_t pid)
{
	for (size_t i = 0; i < ntracees; i++)
		if (tracees[i].pid == pid)
			return &tracees[i];
	return NULL;
}

struct tracee *tracee_add(pid_t pid, pid_t tgid)
{
	if (ntracees == captracees) {
		size_t cap = captracees ? 2 * captracees : 64;
		struct tracee *t = realloc(tracees, cap * sizeof *t);
		if (!t)
			die("out of memory");
		tracees = t;
		captracees = cap;
	}
	struct tracee *t = &tracees[ntracees++];
	*t = (struct tracee){ .pid = pid, .tgid = tgid };
	return t;
}

void forget(pid_t pid)
{
	struct tracee *t = tracee_find(pid);
	if (!t)
		return;
	free(t->path);
	free(t->went);
	free(t->node);
	free(t->saved);
	*t = tracees[--ntracees];
}

/* Processes (not threads) of the job running or runnable now (state R), deputies and
 * `except` left out: what an idle-looking home already carries for this job. */
long running_here(pid_t except)
{
	long n = 0;
	for (size_t i = 0; i < ntracees; i++) {
		struct tracee *t = &tracees[i];
		if (t->pid != t->tgid || t->pid == except || t->deputy || t->remote)
			continue;
		char path[48], buf[512];
		snprintf(path, sizeof path, "/proc/%d/stat", t->pid);
		FILE *f = fopen(path, "re");
		if (!f)
			continue;
		size_t got = fread(buf, 1, sizeof buf - 1, f);
		fclose(f);
		buf[got] = '\0';
		char *close = strrchr(buf, ')');
		if (close && close[1] == ' ' && close[2] == 'R')
			n++;
	}
	return n;
}

int tracee_any_of(pid_t tgid)
{
	for (size_t i = 0; i < ntracees; i++)
		if (tracees[i].tgid == tgid)
			return 1;
	return 0;
}

void want_process(pid_t tgid, enum want want)
{
	for (size_t i = 0; i < ntracees; i++) {
		if (tracees[i].tgid != tgid)
			continue;
		tracees[i].want = want;
		ptrace(PTRACE_INTERRUPT, tracees[i].pid, NULL, NULL);
	}
}

/* A new thread of a process being released is released with it. */
static void inherit_want(struct tracee *t)
{
	struct tracee *leader = t->tgid != t->pid ? tracee_find(t->tgid) : NULL;
	if (leader && leader->want == WANT_RELEASE)
		t->want = WANT_RELEASE;
}

/* Tgid and PPid of a task from /proc; 0 on success. */
static int proc_ids(pid_t pid, pid_t *tgid, pid_t *ppid)
{
	char path[64], buf[4096];
	snprintf(path, sizeof path, "/proc/%d/status", pid);
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return -1;
	ssize_t n = read(fd, buf, sizeof buf - 1);
	close(fd);
	if (n <= 0)
		return -1;
	buf[n] = '\0';
	char *tg = strstr(buf, "\nTgid:"), *pp = strstr(buf, "\nPPid:");
	if (!tg || !pp)
		return -1;
	*tgid = (pid_t)strtol(tg + 6, NULL, 10);
	*ppid = (pid_t)strtol(pp + 6, NULL, 10);
	return 0;
}

/*
 * A task we have not met: an auto-attached child whose first stop came before its
 * parent's fork event (the order is not fixed). Processes are reported here, once.
 */
struct tracee *tracee_meet(pid_t pid)
{
	pid_t tgid = pid, ppid = 0;
	if (proc_ids(pid, &tgid, &ppid) < 0)
		tgid = pid;
	struct tracee *t = tracee_add(pid, tgid);
	t->fresh = 1;
	t->opts_unknown = 1;
	inherit_want(t);
	if (tgid == pid && ppid > 0) {
		char p[16], c[16];
		snprintf(p, sizeof p, "%d", ppid);
		snprintf(c, sizeof c, "%d", pid);
		if (hold_forks) /* the agent decides where it goes: now */
			emit("fork", p, c, (char *)NULL);
		else
			emit_later("fork", p, c, (char *)NULL);
	}
	return t;
}

int is_stop_signal(int sig)
{
	return sig == SIGSTOP || sig == SIGTSTP || sig == SIGTTIN || sig == SIGTTOU;
}

static void on_new_task(pid_t parent, pid_t child, int event)
{
	struct tracee *pt = tracee_find(parent);
	if (tracee_find(child))
		return; /* its first stop came first and reported it */
	pid_t tgid = child, ppid;
	if (event == PTRACE_EVENT_CLONE && proc_ids(child, &tgid, &ppid) < 0)
		tgid = child;
	struct tracee *t = tracee_add(child, tgid);
	t->fresh = 1;
	t->quiet_exec = pt ? pt->quiet_exec : 0; /* the options are copied at fork */
	t->opts_unknown = pt ? pt->opts_unknown : 1;
	inherit_want(t);
	if (tgid == child) {
		char p[16], c[16];
		snprintf(p, sizeof p, "%d", pt ? pt->tgid : parent);
		snprintf(c, sizeof c, "%d", child);
		if (hold_forks) /* the agent decides where it goes: now */
			emit("fork", p, c, (char *)NULL);
		else
			emit_later("fork", p, c, (char *)NULL);
	}
}

/*
 * After an exec by a non-leader thread the process continues under the leader's pid;
 * the event message is the thread's old id (ptrace(2), "execve(2) under ptrace").
 */
static void on_exec_event(pid_t pid)
{
	unsigned long old = 0;
	ptrace(PTRACE_GETEVENTMSG, pid, NULL, &old);
	struct tracee *t = tracee_find(pid);
	if ((pid_t)old != pid && old) {
		struct tracee *o = tracee_find((pid_t)old);
		char *path = NULL, *went = NULL;
		int remote = 0;
		if (o) {
			path = o->path;
			went = o->went;
			remote = o->remote;
			o->path = NULL;
			o->went = NULL;
			forget((pid_t)old);
		}
		t = tracee_find(pid);
		if (!t)
			t = tracee_add(pid, pid);
		free(t->path);
		free(t->went);
		t->path = path;
		t->went = went;
		t->remote = remote;
		t->quiet_exec = 0; /* the exec-ing thread's options: with the event */
		t->opts_unknown = 0;
	}
	if (!t)
		t = tracee_meet(pid);
	t->tgid = pid;
	if (!t->remote) {
		char exe[PATH_MAX];
		const char *path = t->path;
		if (!path) { /* an exec the filter did not stop (another ABI) */
			char link[64];
			snprintf(link, sizeof link, "/proc/%d/exe", pid);
			ssize_t n = readlink(link, exe, sizeof exe - 1);
			exe[n > 0 ? n : 0] = '\0';
			path = exe;
		}
		emit_pid_later("exec", pid, path);
	} else if (t->went) { /* the deputy runs from here on: its fds and argv are final */
		char p[16];
		snprintf(p, sizeof p, "%d", pid);
		emit("remote", p, t->went, t->went + strlen(t->went) + 1, (char *)NULL);
	}
	t->deputy = t->remote;
	free(t->path);
	t->path = NULL;
	free(t->went);
	t->went = NULL;
	t->remote = 0;
}

static void on_status(pid_t pid, int status)
{
	if (WIFEXITED(status) || WIFSIGNALED(status)) {
		/* a task never met was killed before its first stop: nobody heard of it */
		struct tracee *t = tracee_find(pid);
		if (t && t->tgid == pid) {
			char s[16];
			snprintf(s, sizeof s, "%d", status);
			if (pid == first_pid) /* the job's status */
				emit_pid("exit", pid, s);
			else
				emit_pid_later("exit", pid, s);
		}
		if (t)
			on_wanted_exit(t);
		forget(pid);
		return;
	}
	if (!WIFSTOPPED(status))
		return;
	struct tracee *me = tracee_find(pid);
	if (!me)
		me = tracee_meet(pid);
	if ((me->want != WANT_NONE || me->injected) && on_wanted_stop(me, status))
		return; /* release, deputize: see control.c */
	int sig = WSTOPSIG(status), event = (unsigned)status >> 16;
	int inject = 0;
	switch (event) {
	case 0: /* signal-delivery-stop: deliver it as if we were not here */
		inject = sig;
		break;
	case PTRACE_EVENT_STOP: {
		struct tracee *t = tracee_find(pid);
		if (t && t->quiet && is_stop_signal(sig)) { /* our stop: the SIGCONT is on its way */
			ptrace(PTRACE_LISTEN, pid, NULL, NULL);
			return;
		}
		if (t && t->quiet) {
			t->quiet = 0;
			break;
		}
		int first = t && t->fresh;
		if (t)
			t->fresh = 0;
		if (first && !is_stop_signal(sig)) { /* the first stop of a new task */
			if (hold_forks && t->tgid == pid) {
				t->held = 1; /* until `resume`, `release` or `deputize` */
				return;
			}
			break;
		}
		if (is_stop_signal(sig)) { /* group-stop: stay stopped until SIGCONT */
			if (t && t->tgid == pid && !t->stopped) {
				char s[16];
				snprintf(s, sizeof s, "%d", sig);
				emit_pid("stopped", pid, s); /* the agent mirrors it on the far side */
			}
			if (t)
				t->stopped = 1;
			ptrace(PTRACE_LISTEN, pid, NULL, NULL);
			return;
		}
		if (t && t->stopped) { /* the wake-up after LISTEN: SIGCONT arrived */
			t->stopped = 0;
			if (t->tgid == pid)
				emit_pid("continued", pid, NULL);
		}
		break; /* first stop of a new task, or the wake-up after LISTEN */
	}
	case PTRACE_EVENT_FORK:
	case PTRACE_EVENT_VFORK:
	case PTRACE_EVENT_CLONE: {
		unsigned long child = 0;
		if (ptrace(PTRACE_GETEVENTMSG, pid, NULL, &child) == 0 && child)
			on_new_task(pid, (pid_t)child, event);
		break;
	}
	case PTRACE_EVENT_SECCOMP:
		on_exec_stop(pid);
		break;
	case PTRACE_EVENT_EXEC: {
		on_exec_event(pid);
		struct tracee *t = tracee_find(pid);
		if (t && t->injected)
			on_deputy_exec(t); /* the deputy runs only after the agent heard of it */
		break;
	}
	default: /* PTRACE_EVENT_EXIT and anything else */
		break;
	}
	struct tracee *t = tracee_find(pid);
	/* an injected exec is followed to its syscall-exit-stop, where a failure shows */
	ptrace(t && t->injected ? PTRACE_SYSCALL : PTRACE_CONT, pid, NULL, (void *)(long)inject);
}

/* Collects every pending wait status; returns 1 once no tracee is left. */
int reap(void)
{
	for (;;) {
		int status;
		pid_t pid = waitpid(-1, &status, __WALL | WNOHANG);
		if (pid > 0) {
			on_status(pid, status);
			continue;
		}
		if (pid < 0 && errno == EINTR)
			continue;
		return pid < 0 && errno == ECHILD;
	}
}

void detach_all_and_exit(void)
{
	alarm(10); /* a tracee that never stops must not keep us: EXITKILL ends it then */
	for (size_t i = ntracees; i-- > 0;) {
		if (!tracees[i].held)
			continue;
		/* in our hands already: no stop of its own will come */
		ptrace(PTRACE_DETACH, tracees[i].pid, NULL, NULL);
		forget(tracees[i].pid);
	}
	for (size_t i = 0; i < ntracees; i++)
		ptrace(PTRACE_INTERRUPT, tracees[i].pid, NULL, NULL);
	while (ntracees) {
		int status;
		pid_t pid = waitpid(-1, &status, __WALL);
		if (pid < 0) {
			if (errno == EINTR)
				continue;
			break;
		}
		if (WIFSTOPPED(status)) {
			int event = (unsigned)status >> 16;
			int sig = event == 0 ? WSTOPSIG(status) : 0;
			unsigned long msg = 0;
			ptrace(PTRACE_GETEVENTMSG, pid, NULL, &msg);
			if ((event == PTRACE_EVENT_FORK || event == PTRACE_EVENT_VFORK ||
			     event == PTRACE_EVENT_CLONE) && msg && !tracee_find((pid_t)msg))
				tracee_add((pid_t)msg, (pid_t)msg); /* attached already: wait for it */
			if (event == PTRACE_EVENT_EXEC && (pid_t)msg != pid)
				forget((pid_t)msg); /* gone in the exec, without a status */
			ptrace(PTRACE_DETACH, pid, NULL, (void *)(long)sig);
		}
		forget(pid);
	}
	exit(0);
}

