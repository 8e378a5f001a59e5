/*
 * Local or remote, decided at an exec's seccomp stop from the table the agent pushed.
 * Remote means: the exec's path register points at the deputy's path, written into the
 * tracee's stack below the red zone, so the same PID runs the deputy with the same argv,
 * envp and fds (PRoot rewrites syscall paths the same way).
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ptrace.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <sys/uio.h>
#include <sys/user.h>
#include <unistd.h>

#include "tracer.h"

#define RED_ZONE 128 /* x86-64 ABI: below rsp, the program's own scratch space */

static char *deputy;
static int deputy_ok;

/* dunix-deputy next to our own binary, unless --deputy says otherwise. */
void place_init(const char *path)
{
	char self[PATH_MAX];
	if (path) {
		deputy = strdup(path);
	} else {
		ssize_t n = readlink("/proc/self/exe", self, sizeof self - 32);
		if (n > 0) {
			self[n] = '\0';
			char *slash = strrchr(self, '/');
			strcpy(slash ? slash + 1 : self, "dunix-deputy");
			deputy = strdup(self);
		}
	}
	deputy_ok = deputy && deputy[0] == '/' && access(deputy, X_OK) == 0;
}

const char *deputy_path(void)
{
	return deputy_ok ? deputy : NULL;
}

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

int write_memory(pid_t pid, unsigned long addr, const void *data, size_t len)
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

static int allowed_device(dev_t rdev)
{
	unsigned ma = major(rdev), mi = minor(rdev);
	if (ma == 1)                   /* null, zero, random, urandom */
		return mi == 3 || mi == 5 || mi == 8 || mi == 9;
	if (ma == 5)                   /* tty, ptmx */
		return mi == 0 || mi == 2;
	return ma >= 136 && ma <= 143; /* /dev/pts/N */
}

/* A small /proc file into buf, NUL-terminated; 0 when it cannot be read. */
static int read_proc(const char *path, char *buf, size_t size)
{
	int f = open(path, O_RDONLY | O_CLOEXEC);
	if (f < 0)
		return 0;
	ssize_t n = read(f, buf, size - 1);
	close(f);
	if (n <= 0)
		return 0;
	buf[n] = '\0';
	return 1;
}

static int fd_cloexec(pid_t pid, const char *fd)
{
	char path[320], buf[512];
	if (snprintf(path, sizeof path, "/proc/%d/fdinfo/%s", pid, fd) >= (int)sizeof path)
		return 0;
	if (!read_proc(path, buf, sizeof buf))
		return 0;
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

/* State letter and parent of a task from /proc/PID/stat; 0 on failure. */
static char stat_of(pid_t pid, pid_t *ppid)
{
	char path[48], buf[512];
	snprintf(path, sizeof path, "/proc/%d/stat", pid);
	if (!read_proc(path, buf, sizeof buf))
		return 0;
	char *close_paren = strrchr(buf, ')');
	char state;
	int parent;
	if (!close_paren || sscanf(close_paren + 1, " %c %d", &state, &parent) != 2)
		return 0;
	*ppid = parent;
	return state;
}

/*
 * The job's processes running here, for the spill mark, without the exec-ing one and
 * without its parent: a shell that just forked it is still running at that moment but
 * about to wait for it (a sequential script must not spill; a shell starting a burst
 * in the background is cheap), so only the burst's earlier members count.
 */
static long running_besides(pid_t pid)
{
	long running = running_here(pid);
	pid_t ppid = 0, unused;
	if (running > 0 && stat_of(pid, &ppid) && ppid > 0) {
		struct tracee *p = tracee_find(ppid);
		if (p && p->pid == p->tgid && !p->deputy && !p->remote &&
		    stat_of(ppid, &unused) == 'R')
			running--;
	}
	return running;
}

/* Points the exec at the deputy: new path below the red zone, path register at it. */
static int redirect(pid_t pid, struct user_regs_struct *r, int is_at)
{
	size_t len = strlen(deputy) + 1;
	unsigned long addr = (r->rsp - RED_ZONE - len) & ~15UL;
	if (write_memory(pid, addr, deputy, len) < 0)
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

/* Its options with or without TRACEEXEC (children inherit them: kept in the table). */
int exec_event(struct tracee *t, int on)
{
	if (!t->opts_unknown && t->quiet_exec == !on)
		return 0;
	long opts = TRACE_OPTIONS & ~(on ? 0 : PTRACE_O_TRACEEXEC);
	if (ptrace(PTRACE_SETOPTIONS, t->pid, NULL, (void *)opts) < 0)
		return -1;
	t->quiet_exec = !on;
	t->opts_unknown = 0;
	return 0;
}

static int place(struct tracee *t, pid_t pid);

/*
 * A plain local exec by a process's leader needs no exec event: it is reported here, at
 * its seccomp stop, and runs without a second stop (one stop fewer per command of a
 * fork-heavy script). Only when the file is there and executable (a failed exec is not
 * reported; execvp tries every PATH entry); if it still fails (ENOEXEC, a bad ELF), the
 * agent's table names a program that did not start, until the next (ps reads /proc).
 * Remote, a deputy's, an injected or a thread's exec keep the event: the table changes
 * there (deputy, a thread taking the leader's pid).
 */
void on_exec_stop(pid_t pid)
{
	struct tracee *t = tracee_find(pid);
	if (!t)
		t = tracee_meet(pid);
	int quiet = place(t, pid) && t->path && !t->remote && !t->deputy && t->pid == t->tgid &&
		    !t->injected && t->want == WANT_NONE;
	if (exec_event(t, !quiet) == 0 && quiet)
		emit_pid_later("exec", pid, t->path);
	else if (quiet) /* still traced with the event: reported there */
		exec_event(t, 1);
}

/* Local or remote; 1 for a local exec of a file that is there and executable. */
static int place(struct tracee *t, pid_t pid)
{
	struct user_regs_struct r;
	if (ptrace(PTRACE_GETREGS, pid, NULL, &r) < 0)
		return 0;
	int is_at = r.orig_rax == __NR_execveat;
	long dirfd = is_at ? (long)(int)r.rdi : AT_FDCWD;
	int empty_path = is_at && (r.r8 & AT_EMPTY_PATH);
	char path[PATH_MAX];
	free(t->path);
	t->path = NULL;
	free(t->went);
	t->went = NULL;
	t->remote = 0;
	if (read_string(pid, is_at ? r.rsi : r.rdi, path, sizeof path) < 0)
		return 0; /* the kernel will fail this exec (EFAULT, ENAMETOOLONG) */
	t->path = strdup(path);
	if (t->deputy)
		return 0; /* a deputy running its program here after all (`local`), or a first exec
			 * placed here already (--first-local); cleared by the exec event */

	read_agent(); /* decide with the latest table, even if its SIGCHLD came first */
	int slot = pick_slot();
	if (slot < 0 && spill_armed())
		slot = pick_spill(running_besides(pid));
	int target_ok = exec_target_ok(pid, dirfd, path, empty_path);
	if (slot < 0 || !target_ok)
		return target_ok;
	if (spill_is_home(slot)) { /* the home's share of the burst */
		use_slot(slot);
		return 1;
	}
	char why[PATH_MAX + 32], abs[PATH_MAX];
	const char *reason = unmovable_reason(pid, why, sizeof why);
	if (!reason && !deputy_ok)
		reason = "no deputy";
	if (!reason && absolute_path(pid, dirfd, path, empty_path, abs, sizeof abs) < 0)
		reason = "exec of an fd without a path";
	if (!reason && redirect(pid, &r, is_at) < 0)
		reason = "cannot rewrite the exec";
	if (reason) {
		emit_pid_later("unmovable", pid, reason);
		return 1;
	}
	/* reported at its exec event (trace.c), before the deputy runs: by then exec has
	 * closed the close-on-exec fds and set argv and the environment, so the agent can take
	 * what the program needs at once instead of after the deputy's hello */
	const char *node = use_slot(slot);
	size_t nlen = strlen(node), alen = strlen(abs);
	t->went = malloc(nlen + alen + 2);
	if (!t->went)
		die("out of memory");
	memcpy(t->went, node, nlen + 1);
	memcpy(t->went + nlen + 1, abs, alen + 1);
	t->remote = 1;
	return 0;
}

