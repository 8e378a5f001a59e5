/*
 * dunix-tracer: follows one job's process tree on one node with ptrace and decides, at
 * each execve/execveat, whether the program runs here or on a peer (through the deputy).
 * Interfaces: docs/run.md ("Tracer", "Tracer protocol").
 *
 * Only exec is stopped by seccomp (SECCOMP_RET_TRACE); fork, clone, exec and exit arrive
 * as ptrace events, so a traced process runs at full speed between those points.
 *
 * This file: the command line, the job's first process, the main loop. The other parts
 * are in dunix-tracer/ (agent.c: protocol; trace.c: stops; place.c: exec placement).
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
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <sys/ptrace.h>
#include <sys/resource.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include "dunix-tracer/tracer.h"

#define SETUP_FAILED 125 /* the tracer's own setup of the first process failed (as env(1)) */

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
	int ctty; /* --ctty FD: the job's controlling terminal */
	int first_local; /* the first exec was placed already: it runs here */
	/* --home-only: every exec of the job runs here, for good (`dunix run --placement
	 * local`): no seccomp filter and no exec event, so a command costs two stops (the
	 * parent's fork event, the child's first stop) instead of three; `mode` and `slots`
	 * cannot send anything away then, and `exec` is not reported (ps reads /proc) */
	int home_only;
	const char *deputy;
	char **argv;
};

static struct options opt = { .sock = -1, .ctty = -1 };

void die(const char *fmt, ...)
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
		"       [--first-local] [--home-only] [--ctty FD]\n"
		"       [--deputy PATH] [--mode local|remote|auto] -- PROGRAM ARGV...\n", why);
	exit(2);
}

/* ---------------------------------------------------------------- the first process */

static void child_fail(const char *what, const char *arg)
{
	dprintf(2, PROG ": %s%s%s: %s\n", what, arg ? " " : "", arg ? arg : "", strerror(errno));
	_exit(SETUP_FAILED);
}

/*
 * A hard limit above ours needs CAP_SYS_RESOURCE, which even root may lack (see
 * DESIGN.md, "Facts"): then the job gets our hard limit, as a shell's ulimit would cap it.
 */
static void set_limit(int res, struct rlimit lim)
{
	struct rlimit now;
	if (setrlimit(res, &lim) == 0)
		return;
	if (errno == EPERM && getrlimit(res, &now) == 0 && lim.rlim_max > now.rlim_max) {
		lim.rlim_max = now.rlim_max;
		if (lim.rlim_cur > lim.rlim_max)
			lim.rlim_cur = lim.rlim_max;
		if (setrlimit(res, &lim) == 0)
			return;
	}
	child_fail("setrlimit", NULL);
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

/* --ctty FD: the job's own terminal (a pty the agent relays). The tracer, a session
 * leader, takes it as its controlling terminal; the first process's group becomes the
 * foreground one. So Ctrl-C, Ctrl-Z and SIGWINCH reach the job's foreground group,
 * /dev/tty opens, and that group is not orphaned (its parent, the tracer, is in the same
 * session): the kernel drops SIGTSTP from the terminal to an orphaned group. */
static void take_terminal(int fd)
{
	if (ioctl(fd, TIOCSCTTY, 0) < 0)
		die("TIOCSCTTY on fd %d: %s", fd, strerror(errno));
}

static void give_terminal(int fd, pid_t pgrp)
{
	if (tcsetpgrp(fd, pgrp) < 0)
		fprintf(stderr, PROG ": tcsetpgrp: %s\n", strerror(errno));
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
	if (!opt.home_only)
		install_filter();
	for (size_t i = 0; i < opt.nrlimits; i++) /* while root: a hard limit may go up */
		set_limit(opt.rlimits[i].res, opt.rlimits[i].lim);
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
		/* The raw syscall, not sigaction(3): glibc refuses its internal signals 32 and
		 * 33, which an agent's threads may have left ignored and exec would keep. */
		for (int s = 1; s < 65; s++) {
			if (s == SIGKILL || s == SIGSTOP)
				continue;
			struct { void *handler; unsigned long flags; void *restorer; uint64_t mask; } ka = {
				.handler = (opt.sigign >> (s - 1)) & 1 ? SIG_IGN : SIG_DFL,
			};
			syscall(SYS_rt_sigaction, s, &ka, NULL, sizeof ka.mask);
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
		if (!strcmp(a, "--first-local")) {
			opt.first_local = 1;
			continue;
		}
		if (!strcmp(a, "--home-only")) {
			opt.home_only = 1;
			continue;
		}
		if (strncmp(a, "--", 2))
			usage("expected an option or --");
		if (i + 1 >= argc)
			usage("option needs a value");
		const char *v = argv[++i];
		if (!strcmp(a, "--sock")) {
			opt.sock = (int)number(v, 10, "--sock");
		} else if (!strcmp(a, "--ctty")) {
			opt.ctty = (int)number(v, 10, "--ctty");
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
			opt.deputy = v;
		} else if (!strcmp(a, "--mode")) {
			if (!strcmp(v, "local"))
				placement = MODE_LOCAL;
			else if (!strcmp(v, "remote"))
				placement = MODE_REMOTE;
			else if (!strcmp(v, "auto"))
				placement = MODE_AUTO;
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

/*
 * --warm: started before its job (the agent keeps one ready, so a remote exec does not
 * wait for a tracer to be spawned and exec'd); its command line, environment and fds come
 * in one `spawn` packet: NFDS TARGET... NENV VAR=VALUE... ARG..., the fds as SCM_RIGHTS in
 * TARGET order. Then it goes on as if started with those. EOF: not needed after all.
 */
#define WARM_FDS 253 /* SCM_MAX_FD */
static void warm_start(int sock, int *argc, char ***argv)
{
	static char buf[65536];
	static char cbuf[CMSG_SPACE(WARM_FDS * sizeof(int))];
	struct iovec iov = { buf, sizeof buf - 1 };
	struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = cbuf,
			     .msg_controllen = sizeof cbuf };
	ssize_t n;
	while ((n = recvmsg(sock, &mh, MSG_CMSG_CLOEXEC)) < 0 && errno == EINTR)
		;
	if (n <= 0)
		exit(0);
	if (mh.msg_flags & (MSG_TRUNC | MSG_CTRUNC))
		die("--warm: spawn packet too large");
	buf[n] = '\0';
	char **f = calloc((size_t)n + 2, sizeof *f);
	int nf = 0;
	for (char *p = buf; p <= buf + n; p += strlen(p) + 1)
		f[nf++] = p;
	int *fds = NULL, nfds = 0;
	for (struct cmsghdr *c = CMSG_FIRSTHDR(&mh); c; c = CMSG_NXTHDR(&mh, c))
		if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS) {
			fds = (int *)CMSG_DATA(c);
			nfds = (int)((c->cmsg_len - CMSG_LEN(0)) / sizeof(int));
		}
	if (nf < 3 || strcmp(f[0], "spawn") || atoi(f[1]) != nfds || nf < 3 + nfds)
		die("--warm: bad spawn packet");
	int parked[WARM_FDS];
	for (int k = 0; k < nfds; k++) { /* above every target first: none is overwritten */
		parked[k] = fcntl(fds[k], F_DUPFD_CLOEXEC, 801);
		if (parked[k] < 0)
			die("--warm: fcntl: %s", strerror(errno));
		close(fds[k]);
	}
	for (int k = 0; k < nfds; k++) {
		int target = atoi(f[2 + k]);
		if (target == sock || dup2(parked[k], target) < 0)
			die("--warm: cannot place fd %d", target);
	}
	for (int k = 0; k < nfds; k++)
		close(parked[k]);
	int i = 2 + nfds, nenv = i < nf ? atoi(f[i++]) : -1;
	if (nenv < 0 || i + nenv > nf)
		die("--warm: bad spawn packet");
	char **env = calloc((size_t)nenv + 1, sizeof *env);
	for (int k = 0; k < nenv; k++)
		env[k] = f[i++];
	environ = env;
	f[i - 1] = (*argv)[0]; /* the new argv: our name, then the rest of the packet */
	*argv = f + i - 1;
	*argc = nf - i + 1;
	(*argv)[*argc] = NULL;
}

int main(int argc, char **argv)
{
	if (argc == 4 && !strcmp(argv[1], "--sock") && !strcmp(argv[3], "--warm"))
		warm_start((int)number(argv[2], 10, "--sock"), &argc, &argv);
	parse_args(argc, argv);
	if (fcntl(opt.sock, F_SETFD, FD_CLOEXEC) < 0)
		die("--sock %d: %s", opt.sock, strerror(errno));
	agent_init(opt.sock);
	place_init(opt.deputy);

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

	if (opt.ctty >= 0)
		take_terminal(opt.ctty);
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
	if (opt.ctty >= 0)
		give_terminal(opt.ctty, opt.keep_pgrp ? getpgrp() : pid);
	long options = TRACE_OPTIONS & ~(opt.home_only ? PTRACE_O_TRACEEXEC : 0);
	if (ptrace(PTRACE_SEIZE, pid, NULL, (void *)options) < 0) {
		int e = errno;
		kill(pid, SIGKILL);
		die("PTRACE_SEIZE: %s", strerror(e));
	}
	struct tracee *first = tracee_add(pid, pid);
	first_pid = pid;
	first->deputy = opt.first_local; /* its next exec stays here, like a deputy's */
	first->quiet_exec = opt.home_only; /* its children inherit the options */
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
		/* the released processes' pidfds wake us when one ends: maybe the last one */
		struct pollfd p[2 + 64] = { { sigfd, POLLIN, 0 }, { agent_fd(), POLLIN, 0 } };
		int np = 2 + released_pollfds(p + 2, 64);
		if (poll(p, np, flush_if_due(1000)) < 0 && errno != EINTR)
			die("poll: %s", strerror(errno));
		if (p[0].revents) { /* SIGCHLD coalesces; reap() collects every status */
			struct signalfd_siginfo si[16];
			if (read(sigfd, si, sizeof si) < 0 && errno != EAGAIN)
				die("signalfd: %s", strerror(errno));
		}
		if (p[1].revents)
			read_agent();
		run_commands();
		if (reap() && !released_pending()) {
			emit("done", (char *)NULL);
			return 0;
		}
		if (quit_requested) {
			flush_events();
			released_continue_all();
			detach_all_and_exit();
		}
	}
}
