/*
 * dunix-tracer: follows one job's process tree on one node with ptrace and decides, at
 * each execve/execveat, whether the program runs here or on a peer (through the deputy).
 * Interfaces: docs/run.md ("Tracer", "Tracer protocol").
 *
 * Only exec is stopped by seccomp (SECCOMP_RET_TRACE); fork, clone, exec and exit arrive
 * as ptrace events, so a traced process runs at full speed between those points.
 * Job control stays exact because tracees are attached with PTRACE_SEIZE: a group-stop
 * shows up as PTRACE_EVENT_STOP and is answered with PTRACE_LISTEN (ptrace(2), "Group-stop").
 */
#define _GNU_SOURCE
#include <ctype.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <limits.h>
#include <linux/audit.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/ptrace.h>
#include <sys/resource.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <sys/uio.h>
#include <sys/user.h>
#include <sys/wait.h>
#include <unistd.h>

#define PROG "dunix-tracer"
#define MSG_MAX (2 * PATH_MAX + 256)
#define RED_ZONE 128
#define SETUP_FAILED 125 /* the tracer's own setup of the first process failed (as env(1)) */

enum mode { MODE_LOCAL, MODE_REMOTE, MODE_AUTO };

struct options {
	int sock;
	int have_uid, have_gid, have_groups, have_umask, have_sigign, have_sigblock;
	uid_t uid;
	gid_t gid;
	gid_t *groups;
	size_t ngroups;
	mode_t umask;
	const char *cwd;
	uint64_t sigign, sigblock;
	struct { int res; struct rlimit lim; } *rlimits;
	size_t nrlimits;
	int keep_pgrp;
	char *argv0_deputy;
	enum mode mode;
	char **argv;
};

struct tracee {
	pid_t pid, tgid;
	int remote;  /* the pending exec was redirected to the deputy */
	char *path;  /* path of the pending exec, from its seccomp stop */
};

struct slot {
	char *node;
	long count;
};

static struct options opt = { .sock = -1, .mode = MODE_AUTO };
static struct tracee *tracees;
static size_t ntracees, captracees;
static struct slot *slots;
static size_t nslots, next_slot;
static int deputy_ok;
static int sock_open;

static void die(const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	fprintf(stderr, PROG ": ");
	vfprintf(stderr, fmt, ap);
	fputc('\n', stderr);
	va_end(ap);
	exit(2);
}

static void usage(const char *why)
{
	fprintf(stderr,
		PROG ": %s\n"
		"usage: " PROG " --sock FD [--uid U --gid G --groups G1,G2 --umask 022 --cwd DIR]\n"
		"       [--sigign HEX --sigblock HEX] [--rlimit RES:SOFT:HARD ...] [--keep-pgrp]\n"
		"       [--deputy PATH] [--mode local|remote|auto] -- PROGRAM ARGV...\n", why);
	exit(2);
}

/* ---------------------------------------------------------------- agent messages */

/* One packet: fields joined by '\0'. A dead agent is not our problem: the job goes on. */
static void emit(const char *kind, ...)
{
	char buf[MSG_MAX];
	size_t len = 0;
	const char *field = kind;
	va_list ap;

	if (!sock_open)
		return;
	va_start(ap, kind);
	while (field) {
		size_t n = strlen(field);
		if (len + n + 1 > sizeof buf)
			n = sizeof buf - len - 1;
		if (len)
			buf[len++] = '\0';
		memcpy(buf + len, field, n);
		len += n;
		field = va_arg(ap, const char *);
	}
	va_end(ap);
	while (send(opt.sock, buf, len, MSG_NOSIGNAL) < 0 && errno == EINTR)
		;
}

static void emit_pid(const char *kind, pid_t pid, const char *rest)
{
	char p[16];
	snprintf(p, sizeof p, "%d", pid);
	emit(kind, p, rest, (char *)NULL);
}

static void set_slots(char **f, int n)
{
	for (size_t i = 0; i < nslots; i++)
		free(slots[i].node);
	free(slots);
	slots = NULL;
	nslots = next_slot = 0;
	if (n / 2 == 0)
		return;
	slots = calloc(n / 2, sizeof *slots);
	if (!slots)
		return;
	for (int i = 0; i + 1 < n; i += 2) {
		slots[nslots].node = strdup(f[i]);
		slots[nslots].count = strtol(f[i + 1], NULL, 10);
		if (slots[nslots].node)
			nslots++;
	}
}

static void detach_all_and_exit(void);

/* Reads every queued agent message without blocking. */
static void read_agent(void)
{
	char buf[65536];
	for (;;) {
		ssize_t n = recv(opt.sock, buf, sizeof buf - 1, MSG_DONTWAIT);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
			return;
		if (n <= 0) { /* EOF or error: keep tracing, stop listening */
			sock_open = 0;
			return;
		}
		buf[n] = '\0';
		if (n > 0 && buf[n - 1] == '\0')
			n--;
		char *f[4096];
		int nf = 0;
		for (char *p = buf; nf < 4096;) {
			f[nf++] = p;
			char *end = memchr(p, '\0', buf + n - p);
			if (!end)
				break;
			p = end + 1;
		}
		if (!strcmp(f[0], "slots")) {
			set_slots(f + 1, nf - 1);
		} else if (!strcmp(f[0], "mode") && nf > 1) {
			if (!strcmp(f[1], "local"))
				opt.mode = MODE_LOCAL;
			else if (!strcmp(f[1], "remote"))
				opt.mode = MODE_REMOTE;
			else if (!strcmp(f[1], "auto"))
				opt.mode = MODE_AUTO;
		} else if (!strcmp(f[0], "quit")) {
			detach_all_and_exit();
		}
	}
}

/* ---------------------------------------------------------------- tracee table */

static struct tracee *find(pid_t pid)
{
	for (size_t i = 0; i < ntracees; i++)
		if (tracees[i].pid == pid)
			return &tracees[i];
	return NULL;
}

static struct tracee *add(pid_t pid, pid_t tgid)
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

static void forget(pid_t pid)
{
	struct tracee *t = find(pid);
	if (!t)
		return;
	free(t->path);
	*t = tracees[--ntracees];
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
static struct tracee *meet(pid_t pid)
{
	pid_t tgid = pid, ppid = 0;
	if (proc_ids(pid, &tgid, &ppid) < 0)
		tgid = pid;
	struct tracee *t = add(pid, tgid);
	if (tgid == pid && ppid > 0) {
		char p[16], c[16];
		snprintf(p, sizeof p, "%d", ppid);
		snprintf(c, sizeof c, "%d", pid);
		emit("fork", p, c, (char *)NULL);
	}
	return t;
}

/* ---------------------------------------------------------------- tracee memory */

static int read_string(pid_t pid, unsigned long addr, char *buf, size_t size)
{
	size_t got = 0;
	long page = sysconf(_SC_PAGESIZE);
	while (got + 1 < size) {
		size_t chunk = page - ((addr + got) % page);
		if (chunk > size - 1 - got)
			chunk = size - 1 - got;
		struct iovec local = { buf + got, chunk };
		struct iovec remote = { (void *)(addr + got), chunk };
		ssize_t n = process_vm_readv(pid, &local, 1, &remote, 1, 0);
		if (n <= 0) { /* fall back to one word at a time */
			errno = 0;
			long w = ptrace(PTRACE_PEEKDATA, pid, (void *)(addr + got), NULL);
			if (errno)
				return -1;
			n = sizeof w < chunk ? sizeof w : chunk;
			memcpy(buf + got, &w, n);
		}
		char *nul = memchr(buf + got, '\0', n);
		if (nul)
			return 0;
		got += n;
	}
	buf[got] = '\0';
	errno = ENAMETOOLONG;
	return -1;
}

static int write_memory(pid_t pid, unsigned long addr, const void *data, size_t len)
{
	struct iovec local = { (void *)data, len }, remote = { (void *)addr, len };
	if (process_vm_writev(pid, &local, 1, &remote, 1, 0) == (ssize_t)len)
		return 0;
	/* ptrace writes also work on pages process_vm_writev refuses; addr is word aligned */
	for (size_t off = 0; off < len; off += sizeof(long)) {
		long w = 0;
		size_t n = len - off < sizeof w ? len - off : sizeof w;
		if (n < sizeof w) {
			errno = 0;
			w = ptrace(PTRACE_PEEKDATA, pid, (void *)(addr + off), NULL);
			if (errno)
				return -1;
		}
		memcpy(&w, (const char *)data + off, n);
		if (ptrace(PTRACE_POKEDATA, pid, (void *)(addr + off), (void *)w) < 0)
			return -1;
	}
	return 0;
}

/* ---------------------------------------------------------------- exec decision */

static int allowed_device(dev_t rdev)
{
	unsigned ma = major(rdev), mi = minor(rdev);
	if (ma == 1)                   /* null, zero, random, urandom */
		return mi == 3 || mi == 5 || mi == 8 || mi == 9;
	if (ma == 5)                   /* tty, ptmx */
		return mi == 0 || mi == 2;
	return ma >= 136 && ma <= 143; /* /dev/pts/N */
}

static int fd_cloexec(pid_t pid, const char *fd)
{
	char path[320], buf[512];
	if (snprintf(path, sizeof path, "/proc/%d/fdinfo/%s", pid, fd) >= (int)sizeof path)
		return 0;
	int f = open(path, O_RDONLY | O_CLOEXEC);
	if (f < 0)
		return 0;
	ssize_t n = read(f, buf, sizeof buf - 1);
	close(f);
	if (n <= 0)
		return 0;
	buf[n] = '\0';
	char *flags = strstr(buf, "flags:");
	return flags && (strtoul(flags + 6, NULL, 8) & O_CLOEXEC);
}

/* Why this process cannot leave (what it keeps across the exec), or NULL. */
static const char *unmovable_reason(pid_t pid, char *why, size_t size)
{
	char path[64];
	snprintf(path, sizeof path, "/proc/%d/fd", pid);
	DIR *d = opendir(path);
	if (!d) {
		snprintf(why, size, "cannot read %s", path);
		return why;
	}
	const char *reason = NULL;
	struct dirent *e;
	while (!reason && (e = readdir(d))) {
		struct stat st;
		if (e->d_name[0] == '.' || fstatat(dirfd(d), e->d_name, &st, 0) < 0)
			continue;
		int sock = S_ISSOCK(st.st_mode);
		int dev = (S_ISCHR(st.st_mode) && !allowed_device(st.st_rdev)) || S_ISBLK(st.st_mode);
		if ((!sock && !dev) || fd_cloexec(pid, e->d_name))
			continue;
		if (sock) {
			snprintf(why, size, "holds a socket");
		} else {
			char target[PATH_MAX];
			ssize_t n = readlinkat(dirfd(d), e->d_name, target, sizeof target - 1);
			target[n > 0 ? n : 0] = '\0';
			snprintf(why, size, "holds device %s", n > 0 ? target : "?");
		}
		reason = why;
	}
	closedir(d);
	return reason;
}

/* The file the exec names, seen from the tracee, is a regular executable file. */
static int exec_target_ok(pid_t pid, long dirfd, const char *path, int empty_path)
{
	char full[PATH_MAX + 64];
	if (path[0] == '/')
		snprintf(full, sizeof full, "/proc/%d/root%s", pid, path);
	else if (dirfd == AT_FDCWD)
		snprintf(full, sizeof full, "/proc/%d/cwd/%s", pid, path);
	else if (empty_path && !path[0])
		snprintf(full, sizeof full, "/proc/%d/fd/%ld", pid, dirfd);
	else
		snprintf(full, sizeof full, "/proc/%d/fd/%ld/%s", pid, dirfd, path);
	struct stat st;
	return stat(full, &st) == 0 && S_ISREG(st.st_mode) && (st.st_mode & 0111);
}

/* The peer for a remote exec, or -1: round robin, `auto` only over slots left. */
static int pick_slot(void)
{
	if (opt.mode == MODE_LOCAL || nslots == 0)
		return -1;
	for (size_t k = 0; k < nslots; k++) {
		size_t i = (next_slot + k) % nslots;
		if (opt.mode == MODE_REMOTE || slots[i].count > 0)
			return (int)i;
	}
	return -1;
}

/*
 * For execveat with a dirfd, the path the agent gets is made absolute from the dirfd's
 * link in /proc; an fd executed by itself (fexecve) has no path a peer could open.
 */
static int absolute_path(pid_t pid, long dirfd, const char *path, int empty_path,
			 char *out, size_t size)
{
	if (path[0] == '/' || dirfd == AT_FDCWD) {
		snprintf(out, size, "%s", path);
		return 0;
	}
	char link[64], dir[PATH_MAX];
	snprintf(link, sizeof link, "/proc/%d/fd/%ld", pid, dirfd);
	ssize_t n = readlink(link, dir, sizeof dir - 1);
	if (n <= 0 || dir[0] != '/')
		return -1;
	dir[n] = '\0';
	if (strstr(dir, " (deleted)") || !strncmp(dir, "/memfd:", 7))
		return -1;
	int n2 = empty_path && !path[0] ? snprintf(out, size, "%s", dir)
					: snprintf(out, size, "%s/%s", dir, path);
	return n2 < (int)size ? 0 : -1;
}

/* Points the exec at the deputy: new path below the red zone, path register at it. */
static int redirect(pid_t pid, struct user_regs_struct *r, int is_at)
{
	size_t len = strlen(opt.argv0_deputy) + 1;
	unsigned long addr = (r->rsp - RED_ZONE - len) & ~15UL;
	if (write_memory(pid, addr, opt.argv0_deputy, len) < 0)
		return -1;
	if (is_at) {
		r->rdi = (unsigned long)AT_FDCWD;
		r->rsi = addr;
		r->r8 &= ~(unsigned long)AT_EMPTY_PATH;
	} else {
		r->rdi = addr;
	}
	return ptrace(PTRACE_SETREGS, pid, NULL, r) < 0 ? -1 : 0;
}

static void on_exec_stop(pid_t pid)
{
	struct tracee *t = find(pid);
	if (!t)
		t = meet(pid);
	struct user_regs_struct r;
	if (ptrace(PTRACE_GETREGS, pid, NULL, &r) < 0)
		return;
	int is_at = r.orig_rax == __NR_execveat;
	long dirfd = is_at ? (long)(int)r.rdi : AT_FDCWD;
	int empty_path = is_at && (r.r8 & AT_EMPTY_PATH);
	char path[PATH_MAX];
	if (read_string(pid, is_at ? r.rsi : r.rdi, path, sizeof path) < 0)
		return; /* the kernel will fail this exec (EFAULT, ENAMETOOLONG) */
	free(t->path);
	t->path = strdup(path);
	t->remote = 0;

	int slot = pick_slot();
	if (slot < 0 || !exec_target_ok(pid, dirfd, path, empty_path))
		return;
	char why[PATH_MAX + 32], abs[PATH_MAX];
	const char *reason = unmovable_reason(pid, why, sizeof why);
	if (!reason && !deputy_ok)
		reason = "no deputy";
	if (!reason && absolute_path(pid, dirfd, path, empty_path, abs, sizeof abs) < 0)
		reason = "exec of an fd without a path";
	if (!reason && redirect(pid, &r, is_at) < 0)
		reason = "cannot rewrite the exec";
	if (reason) {
		emit_pid("unmovable", pid, reason);
		return;
	}
	if (opt.mode == MODE_AUTO)
		slots[slot].count--;
	next_slot = (size_t)slot + 1;
	t->remote = 1;
	char p[16];
	snprintf(p, sizeof p, "%d", pid);
	emit("remote", p, slots[slot].node, abs, (char *)NULL);
}

/* ---------------------------------------------------------------- stops */

static int is_stop_signal(int sig)
{
	return sig == SIGSTOP || sig == SIGTSTP || sig == SIGTTIN || sig == SIGTTOU;
}

static void on_new_task(pid_t parent, pid_t child, int event)
{
	struct tracee *pt = find(parent);
	if (find(child))
		return; /* its first stop came first and reported it */
	pid_t tgid = child, ppid;
	if (event == PTRACE_EVENT_CLONE && proc_ids(child, &tgid, &ppid) < 0)
		tgid = child;
	add(child, tgid);
	if (tgid == child) {
		char p[16], c[16];
		snprintf(p, sizeof p, "%d", pt ? pt->tgid : parent);
		snprintf(c, sizeof c, "%d", child);
		emit("fork", p, c, (char *)NULL);
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
	struct tracee *t = find(pid);
	if ((pid_t)old != pid && old) {
		struct tracee *o = find((pid_t)old);
		char *path = NULL;
		int remote = 0;
		if (o) {
			path = o->path;
			remote = o->remote;
			o->path = NULL;
			forget((pid_t)old);
		}
		t = find(pid);
		if (!t)
			t = add(pid, pid);
		free(t->path);
		t->path = path;
		t->remote = remote;
	}
	if (!t)
		t = meet(pid);
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
		emit_pid("exec", pid, path);
	}
	free(t->path);
	t->path = NULL;
	t->remote = 0;
}

static void on_status(pid_t pid, int status)
{
	if (WIFEXITED(status) || WIFSIGNALED(status)) {
		struct tracee *t = find(pid);
		if (!t || t->tgid == pid) {
			char s[16];
			snprintf(s, sizeof s, "%d", status);
			emit_pid("exit", pid, s);
		}
		forget(pid);
		return;
	}
	if (!WIFSTOPPED(status))
		return;
	if (!find(pid))
		meet(pid);
	int sig = WSTOPSIG(status), event = (unsigned)status >> 16;
	int inject = 0;
	switch (event) {
	case 0: /* signal-delivery-stop: deliver it as if we were not here */
		inject = sig;
		break;
	case PTRACE_EVENT_STOP:
		if (is_stop_signal(sig)) { /* group-stop: stay stopped until SIGCONT */
			ptrace(PTRACE_LISTEN, pid, NULL, NULL);
			return;
		}
		break; /* first stop of a new task, or the wake-up after LISTEN */
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
	case PTRACE_EVENT_EXEC:
		on_exec_event(pid);
		break;
	default: /* PTRACE_EVENT_EXIT and anything else */
		break;
	}
	ptrace(PTRACE_CONT, pid, NULL, (void *)(long)inject);
}

/* Collects every pending wait status; returns 1 once no tracee is left. */
static int reap(void)
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

static void detach_all_and_exit(void)
{
	alarm(10); /* a tracee that never stops must not keep us: EXITKILL ends it then */
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
			ptrace(PTRACE_DETACH, pid, NULL, (void *)(long)sig);
		}
		forget(pid);
	}
	exit(0);
}

/* ---------------------------------------------------------------- the first process */

static void child_fail(const char *what, const char *arg)
{
	dprintf(2, PROG ": %s%s%s: %s\n", what, arg ? " " : "", arg ? arg : "", strerror(errno));
	_exit(SETUP_FAILED);
}

/* Only execve and execveat of x86_64 stop; everything else runs untouched. */
static void install_filter(void)
{
	struct sock_filter code[] = {
		BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, arch)),
		BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, AUDIT_ARCH_X86_64, 0, 4),
		BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
		BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_execve, 1, 0),
		BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_execveat, 0, 1),
		BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_TRACE),
		BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
	};
	struct sock_fprog prog = { sizeof code / sizeof code[0], code };
	if (prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog) == 0)
		return;
	/* not privileged (a developer's run): the kernel then wants no_new_privs */
	if (errno != EACCES || prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0 ||
	    prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog) < 0)
		child_fail("seccomp", NULL);
}

static void run_child(int ready, const sigset_t *orig_mask, const struct sigaction *orig_chld)
{
	char c;
	/* wait until seized: an exec before that would fail with ENOSYS under the filter */
	while (read(ready, &c, 1) < 0 && errno == EINTR)
		;
	close(ready);
	if (!opt.keep_pgrp && setpgid(0, 0) < 0)
		child_fail("setpgid", NULL);
	install_filter();
	if (opt.have_groups || opt.have_uid)
		if (setgroups(opt.ngroups, opt.groups) < 0)
			child_fail("setgroups", NULL);
	if (opt.have_gid && setresgid(opt.gid, opt.gid, opt.gid) < 0)
		child_fail("setresgid", NULL);
	if (opt.have_uid && setresuid(opt.uid, opt.uid, opt.uid) < 0)
		child_fail("setresuid", NULL);
	if (opt.have_umask)
		umask(opt.umask);
	if (opt.cwd && chdir(opt.cwd) < 0)
		child_fail("chdir", opt.cwd);
	sigaction(SIGCHLD, orig_chld, NULL);
	if (opt.have_sigign) {
		for (int s = 1; s < 65; s++) {
			if (s == SIGKILL || s == SIGSTOP || (s > 31 && s < SIGRTMIN))
				continue;
			signal(s, (opt.sigign >> (s - 1)) & 1 ? SIG_IGN : SIG_DFL);
		}
	}
	sigset_t mask = *orig_mask;
	if (opt.have_sigblock) {
		sigemptyset(&mask);
		for (int s = 1; s < 65; s++)
			if ((opt.sigblock >> (s - 1)) & 1)
				sigaddset(&mask, s);
	}
	sigprocmask(SIG_SETMASK, &mask, NULL);
	for (size_t i = 0; i < opt.nrlimits; i++)
		if (setrlimit(opt.rlimits[i].res, &opt.rlimits[i].lim) < 0)
			child_fail("setrlimit", NULL);
	execvp(opt.argv[0], opt.argv);
	/* as a shell reports it */
	int code = errno == ENOENT ? 127 : 126;
	dprintf(2, "%s: %s\n", opt.argv[0], strerror(errno));
	_exit(code);
}

/* ---------------------------------------------------------------- command line */

static unsigned long long number(const char *s, int base, const char *what)
{
	char *end;
	errno = 0;
	unsigned long long v = strtoull(s, &end, base);
	if (errno || !*s || *end || *s == '-')
		die("bad %s: %s", what, s);
	return v;
}

static rlim_t rlim_value(const char *s)
{
	if (!strcmp(s, "unlimited") || !strcmp(s, "inf") || !strcmp(s, "-1"))
		return RLIM_INFINITY;
	return (rlim_t)number(s, 10, "rlimit value");
}

static int rlimit_resource(const char *name)
{
	static const struct { const char *name; int res; } names[] = {
		{ "AS", RLIMIT_AS }, { "CORE", RLIMIT_CORE }, { "CPU", RLIMIT_CPU },
		{ "DATA", RLIMIT_DATA }, { "FSIZE", RLIMIT_FSIZE }, { "LOCKS", RLIMIT_LOCKS },
		{ "MEMLOCK", RLIMIT_MEMLOCK }, { "MSGQUEUE", RLIMIT_MSGQUEUE },
		{ "NICE", RLIMIT_NICE }, { "NOFILE", RLIMIT_NOFILE }, { "NPROC", RLIMIT_NPROC },
		{ "RSS", RLIMIT_RSS }, { "RTPRIO", RLIMIT_RTPRIO }, { "RTTIME", RLIMIT_RTTIME },
		{ "SIGPENDING", RLIMIT_SIGPENDING }, { "STACK", RLIMIT_STACK },
	};
	if (isdigit((unsigned char)name[0]))
		return (int)number(name, 10, "rlimit resource");
	if (!strncasecmp(name, "RLIMIT_", 7))
		name += 7;
	for (size_t i = 0; i < sizeof names / sizeof names[0]; i++)
		if (!strcasecmp(name, names[i].name))
			return names[i].res;
	die("unknown rlimit resource: %s", name);
	return -1;
}

static void parse_args(int argc, char **argv)
{
	int i;
	for (i = 1; i < argc; i++) {
		const char *a = argv[i];
		if (!strcmp(a, "--")) {
			i++;
			break;
		}
		if (!strcmp(a, "--keep-pgrp")) {
			opt.keep_pgrp = 1;
			continue;
		}
		if (strncmp(a, "--", 2))
			usage("expected an option or --");
		if (i + 1 >= argc)
			usage("option needs a value");
		const char *v = argv[++i];
		if (!strcmp(a, "--sock")) {
			opt.sock = (int)number(v, 10, "--sock");
		} else if (!strcmp(a, "--uid")) {
			opt.uid = (uid_t)number(v, 10, "--uid");
			opt.have_uid = 1;
		} else if (!strcmp(a, "--gid")) {
			opt.gid = (gid_t)number(v, 10, "--gid");
			opt.have_gid = 1;
		} else if (!strcmp(a, "--groups")) {
			opt.have_groups = 1;
			opt.groups = calloc(strlen(v) / 2 + 1, sizeof *opt.groups);
			char *copy = strdup(v), *save = NULL;
			if (!opt.groups || !copy)
				die("out of memory");
			for (char *g = strtok_r(copy, ",", &save); g; g = strtok_r(NULL, ",", &save))
				opt.groups[opt.ngroups++] = (gid_t)number(g, 10, "--groups");
			free(copy);
		} else if (!strcmp(a, "--umask")) {
			opt.umask = (mode_t)number(v, 8, "--umask") & 0777;
			opt.have_umask = 1;
		} else if (!strcmp(a, "--cwd")) {
			opt.cwd = v;
		} else if (!strcmp(a, "--sigign")) {
			opt.sigign = number(v, 16, "--sigign");
			opt.have_sigign = 1;
		} else if (!strcmp(a, "--sigblock")) {
			opt.sigblock = number(v, 16, "--sigblock");
			opt.have_sigblock = 1;
		} else if (!strcmp(a, "--rlimit")) {
			char *copy = strdup(v), *c1, *c2;
			if (!copy || !(c1 = strchr(copy, ':')) || !(c2 = strchr(c1 + 1, ':')))
				die("bad --rlimit (want RES:SOFT:HARD): %s", v);
			*c1 = *c2 = '\0';
			opt.rlimits = realloc(opt.rlimits, (opt.nrlimits + 1) * sizeof *opt.rlimits);
			if (!opt.rlimits)
				die("out of memory");
			opt.rlimits[opt.nrlimits].res = rlimit_resource(copy);
			opt.rlimits[opt.nrlimits].lim.rlim_cur = rlim_value(c1 + 1);
			opt.rlimits[opt.nrlimits].lim.rlim_max = rlim_value(c2 + 1);
			opt.nrlimits++;
			free(copy);
		} else if (!strcmp(a, "--deputy")) {
			opt.argv0_deputy = strdup(v);
		} else if (!strcmp(a, "--mode")) {
			if (!strcmp(v, "local"))
				opt.mode = MODE_LOCAL;
			else if (!strcmp(v, "remote"))
				opt.mode = MODE_REMOTE;
			else if (!strcmp(v, "auto"))
				opt.mode = MODE_AUTO;
			else
				usage("--mode is local, remote or auto");
		} else {
			usage("unknown option");
		}
	}
	if (i >= argc)
		usage("no program given");
	if (opt.sock < 0)
		usage("--sock FD is required");
	opt.argv = argv + i;
}

/* dunix-deputy next to our own binary, unless --deputy says otherwise. */
static void find_deputy(void)
{
	if (!opt.argv0_deputy) {
		char self[PATH_MAX];
		ssize_t n = readlink("/proc/self/exe", self, sizeof self - 32);
		if (n > 0) {
			self[n] = '\0';
			char *slash = strrchr(self, '/');
			strcpy(slash ? slash + 1 : self, "dunix-deputy");
			opt.argv0_deputy = strdup(self);
		}
	}
	deputy_ok = opt.argv0_deputy && opt.argv0_deputy[0] == '/' &&
		    access(opt.argv0_deputy, X_OK) == 0;
}

/* The job owns every inherited fd; we keep only stderr (messages), the socket and sigfd. */
static void drop_job_fds(int keep)
{
	int null = open("/dev/null", O_RDWR | O_CLOEXEC);
	if (null >= 0) {
		dup3(null, 0, O_CLOEXEC);
		dup3(null, 1, O_CLOEXEC);
		if (null > 2)
			close(null);
	}
	DIR *d = opendir("/proc/self/fd");
	if (!d)
		return;
	int fds[1024], n = 0;
	struct dirent *e;
	while ((e = readdir(d)) && n < 1024) {
		int fd = atoi(e->d_name);
		if (e->d_name[0] != '.' && fd > 2 && fd != opt.sock && fd != keep && fd != dirfd(d))
			fds[n++] = fd;
	}
	closedir(d);
	for (int i = 0; i < n; i++)
		close(fds[i]);
}

int main(int argc, char **argv)
{
	parse_args(argc, argv);
	if (fcntl(opt.sock, F_SETFD, FD_CLOEXEC) < 0)
		die("--sock %d: %s", opt.sock, strerror(errno));
	sock_open = 1;
	find_deputy();

	/* SIGCHLD arrives through a signalfd so one poll() serves tracees and the agent */
	struct sigaction orig_chld, dfl = { .sa_handler = SIG_DFL };
	sigaction(SIGCHLD, &dfl, &orig_chld);
	sigset_t orig_mask, chld;
	sigemptyset(&chld);
	sigaddset(&chld, SIGCHLD);
	sigprocmask(SIG_BLOCK, &chld, &orig_mask);
	int sigfd = signalfd(-1, &chld, SFD_CLOEXEC | SFD_NONBLOCK);
	if (sigfd < 0)
		die("signalfd: %s", strerror(errno));

	int ready[2];
	if (pipe2(ready, O_CLOEXEC) < 0)
		die("pipe: %s", strerror(errno));
	pid_t pid = fork();
	if (pid < 0)
		die("fork: %s", strerror(errno));
	if (pid == 0) {
		close(ready[1]);
		close(sigfd);
		run_child(ready[0], &orig_mask, &orig_chld);
	}
	close(ready[0]);
	if (!opt.keep_pgrp)
		setpgid(pid, pid); /* also here, so the group exists before anyone signals it */
	long options = PTRACE_O_TRACEFORK | PTRACE_O_TRACEVFORK | PTRACE_O_TRACECLONE |
		       PTRACE_O_TRACEEXEC | PTRACE_O_TRACESECCOMP | PTRACE_O_TRACEEXIT |
		       PTRACE_O_EXITKILL;
	if (ptrace(PTRACE_SEIZE, pid, NULL, (void *)options) < 0) {
		int e = errno;
		kill(pid, SIGKILL);
		die("PTRACE_SEIZE: %s", strerror(e));
	}
	add(pid, pid);
	emit_pid("started", pid, NULL);
	close(ready[1]); /* the first process may go on */
	drop_job_fds(sigfd);
	/* job-control and hangup signals are for the job, not for us */
	signal(SIGINT, SIG_IGN);
	signal(SIGQUIT, SIG_IGN);
	signal(SIGHUP, SIG_IGN);
	signal(SIGTSTP, SIG_IGN);
	signal(SIGTTIN, SIG_IGN);
	signal(SIGTTOU, SIG_IGN);
	signal(SIGPIPE, SIG_IGN);

	for (;;) {
		struct pollfd p[2] = { { sigfd, POLLIN, 0 }, { sock_open ? opt.sock : -1, POLLIN, 0 } };
		if (poll(p, 2, 1000) < 0 && errno != EINTR)
			die("poll: %s", strerror(errno));
		if (p[0].revents) { /* SIGCHLD coalesces; reap() collects every status */
			struct signalfd_siginfo si[16];
			if (read(sigfd, si, sizeof si) < 0 && errno != EAGAIN)
				die("signalfd: %s", strerror(errno));
		}
		if (p[1].revents)
			read_agent();
		if (reap()) {
			emit("done", (char *)NULL);
			return 0;
		}
	}
}
