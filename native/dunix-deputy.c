/*
 * dunix-deputy: what a process runs on its home node once its exec went to another node
 * (docs/run.md, "Deputy"). It keeps the PID, the parent, the fds until the agent has
 * copied them, and relays signals and the final status through the agent.
 *
 * Phase 1 (before `ready`) changes nothing the program inherited: no handler, no mask
 * change, no fd closed, because the agent reads SigIgn/SigBlk from /proc/PID/status and
 * takes the fds with pidfd_getfd. exec(2) already reset every caught signal to its
 * default, so a signal arriving now does what it would have done to the fresh program.
 * Phase 2 (after `ready`) closes every fd but the socket, catches every catchable signal
 * that is not ignored (SIGCHLD excepted) and forwards it as `signal SIG`.
 *
 * Protocol: SOCK_SEQPACKET, one message per packet, fields separated by '\0'.
 *   deputy -> agent: `hello` SOCKFD [`migrated`], `signal` SIG
 *   agent -> deputy: `ready`, `exit` CODE, `killed` SIG, `stop` SIG, and before `ready`
 *   only: `local` PATH (the remote start failed: exec PATH here, as the program asked)
 * The socket is /run/dunix/hosts/<nodename>/deputy.sock, else /run/dunix/deputy.sock;
 * DUNIX_DEPUTY_SOCKET overrides both (a test and debug knob).
 *
 * A migration deputy: the tracer made a process that ran here exec us (`deputize`) after
 * CRIU moved it; argv is exactly {"dunix-deputy", "--migrated"}. Its hello carries
 * `migrated`: the agent attaches it to the restored process instead of starting a program,
 * and `local` means nothing to it (there is no program to run here).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <sys/utsname.h>
#include <unistd.h>

#ifndef SYS_close_range
#define SYS_close_range 436 /* the same number on every architecture */
#endif

static int sig_pipe[2] = {-1, -1};
static volatile sig_atomic_t continued;

static void on_signal(int sig, siginfo_t *info, void *uc)
{
	int saved = errno;
	unsigned char b = (unsigned char)sig;

	(void)uc;
	/* A fault of the deputy's own (SIGSEGV from the kernel, si_code > 0) must not loop
	 * forever: let it take the default action when the instruction runs again. Faults
	 * sent with kill(2) have si_code <= 0 and are forwarded. */
	if (info->si_code > 0 && (sig == SIGSEGV || sig == SIGBUS || sig == SIGILL ||
				  sig == SIGFPE || sig == SIGSYS)) {
		signal(sig, SIG_DFL);
		return;
	}
	if (sig == SIGCONT)
		continued = 1;
	/* Non-blocking: when the pipe is full the signal is dropped, as the kernel
	 * coalesces a pending standard signal anyway. */
	if (write(sig_pipe[1], &b, 1) < 0) {
		/* nothing to do */
	}
	errno = saved;
}

static int try_connect(const char *path)
{
	struct sockaddr_un sa;
	int fd;

	if (strlen(path) >= sizeof(sa.sun_path)) {
		errno = ENAMETOOLONG;
		return -1;
	}
	memset(&sa, 0, sizeof(sa));
	sa.sun_family = AF_UNIX;
	strcpy(sa.sun_path, path);
	fd = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return -1;
	while (connect(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
		if (errno == EINTR)
			continue;
		int saved = errno;
		close(fd);
		errno = saved;
		return -1;
	}
	return fd;
}

static void die_no_agent(const char *path, int err)
{
	/* stderr may be closed or a pipe already gone: ignore a failing write */
	dprintf(2, "dunix-deputy: no agent: %s: %s\n", path, strerror(err));
	_exit(127);
}

static int connect_agent(void)
{
	const char *env = getenv("DUNIX_DEPUTY_SOCKET");
	char path[PATH_MAX];
	struct utsname un;
	int fd;

	if (env && *env) {
		fd = try_connect(env);
		if (fd < 0)
			die_no_agent(env, errno);
		return fd;
	}
	if (uname(&un) == 0) {
		snprintf(path, sizeof(path), "/run/dunix/hosts/%s/deputy.sock", un.nodename);
		fd = try_connect(path);
		if (fd >= 0)
			return fd;
	}
	fd = try_connect("/run/dunix/deputy.sock");
	if (fd < 0)
		die_no_agent("/run/dunix/deputy.sock", errno);
	return fd;
}

/* The agent is gone: the process is lost, as with a dead host (DESIGN.md, "Failure"). */
static void die_lost(void)
{
	raise(SIGKILL);
	_exit(128 + SIGKILL);
}

static void send_fields(int sock, const char *a, long n, const char *extra)
{
	char buf[64];
	int len = snprintf(buf, sizeof(buf), "%s%c%ld", a, '\0', n);
	if (extra)
		len += snprintf(buf + len, sizeof(buf) - (size_t)len, "%c%s", '\0', extra);
	while (send(sock, buf, (size_t)len, MSG_NOSIGNAL) < 0) {
		if (errno != EINTR)
			die_lost();
	}
}

static void send_msg(int sock, const char *a, long n)
{
	send_fields(sock, a, n, NULL);
}

static int migrated; /* a migration deputy (see the top of this file) */

static void die_by(int sig)
{
	struct sigaction sa;
	struct rlimit no_core = {0, 0};
	sigset_t set;

	/* No core file and no core flag in the status: the core belongs to the remote
	 * process. PR_SET_DUMPABLE also stops a core_pattern pipe, which RLIMIT_CORE
	 * does not (fs/coredump.c). */
	setrlimit(RLIMIT_CORE, &no_core);
	prctl(PR_SET_DUMPABLE, 0, 0, 0, 0);
	if (sig > 0 && sig < NSIG && sig != SIGSTOP && sig != SIGTSTP && sig != SIGTTIN &&
	    sig != SIGTTOU) {
		sigfillset(&set);
		sigprocmask(SIG_SETMASK, &set, NULL);
		memset(&sa, 0, sizeof(sa));
		sa.sa_handler = SIG_DFL;
		sigaction(sig, &sa, NULL);
		sigdelset(&set, sig);
		sigprocmask(SIG_SETMASK, &set, NULL);
		raise(sig);
	}
	_exit((128 + sig) & 0xff);
}

static void close_all_but(int keep)
{
	long max;
	int fd;

	if ((keep == 0 || syscall(SYS_close_range, 0u, (unsigned)keep - 1, 0u) == 0) &&
	    syscall(SYS_close_range, (unsigned)keep + 1, ~0u, 0u) == 0)
		return;
	max = sysconf(_SC_OPEN_MAX);
	if (max < 0 || max > 1 << 20)
		max = 1 << 20;
	for (fd = 0; fd < max; fd++)
		if (fd != keep)
			close(fd);
}

static void become_deputy(int sock)
{
	struct sigaction sa, old;
	sigset_t none;
	int sig;

	close_all_but(sock);
	if (pipe2(sig_pipe, O_CLOEXEC | O_NONBLOCK) < 0)
		die_lost();
	memset(&sa, 0, sizeof(sa));
	sa.sa_sigaction = on_signal;
	sa.sa_flags = SA_RESTART | SA_SIGINFO;
	sigfillset(&sa.sa_mask);
	for (sig = 1; sig < NSIG; sig++) {
		if (sig == SIGKILL || sig == SIGSTOP || sig == SIGCHLD)
			continue;
		/* fails for the signals glibc keeps for itself (32, 33): fine */
		if (sigaction(sig, NULL, &old) < 0 || old.sa_handler == SIG_IGN)
			continue;
		sigaction(sig, &sa, NULL);
	}
	/* A signal the program blocked is blocked on the remote side too (the tracer
	 * sets the mask there): forward it and let it pend there. */
	sigemptyset(&none);
	sigprocmask(SIG_SETMASK, &none, NULL);
}

static long field_num(const char *s, long lo, long hi, int *ok)
{
	char *end;
	long v;

	errno = 0;
	v = strtol(s, &end, 10);
	*ok = s != end && *end == '\0' && errno == 0 && v >= lo && v <= hi;
	return v;
}

/* The remote program stopped: stop with the same signal, so the parent's WSTOPSIG (and
 * the shell's "Stopped (tty input)") is right. The kernel drops a default-action
 * SIGTSTP/SIGTTIN/SIGTTOU in an orphaned process group (kernel/signal.c, get_signal);
 * then no SIGCONT has come when raise() returns, and SIGSTOP, never dropped, is used. */
static void stop_by(int sig, int ready)
{
	struct sigaction dfl, old;

	if (!ready || (sig != SIGTSTP && sig != SIGTTIN && sig != SIGTTOU)) {
		raise(SIGSTOP);
		return;
	}
	memset(&dfl, 0, sizeof(dfl));
	dfl.sa_handler = SIG_DFL;
	continued = 0;
	sigaction(sig, &dfl, &old);
	raise(sig); /* returns after SIGCONT (its handler has run by then) or at once */
	sigaction(sig, &old, NULL);
	if (!continued)
		raise(SIGSTOP);
}

/* Run the program here after all: phase 1 changed nothing, and the socket is CLOEXEC. */
static void exec_local(const char *path, char **argv)
{
	char **sh_argv;
	int argc = 0, err;

	execv(path, argv);
	err = errno;
	if (err == ENOEXEC) { /* what execvp(3) does with a script without #! */
		while (argv[argc])
			argc++;
		sh_argv = calloc((size_t)argc + 2, sizeof(*sh_argv));
		if (sh_argv) {
			sh_argv[0] = "sh";
			sh_argv[1] = (char *)path;
			memcpy(sh_argv + 2, argv + (argc ? 1 : 0),
			       (size_t)(argc ? argc - 1 : 0) * sizeof(*sh_argv));
			execv("/bin/sh", sh_argv);
		}
	}
	dprintf(2, "dunix-deputy: %s: %s\n", path, strerror(err));
	_exit(err == ENOENT ? 127 : 126);
}

/* One message from the agent; returns 1 for `ready`. */
static int obey(char *buf, ssize_t n, int ready, char **argv)
{
	const char *cmd = buf, *arg = "";
	size_t cmdlen = strlen(buf);
	long v;
	int ok;

	if ((ssize_t)cmdlen + 1 < n)
		arg = buf + cmdlen + 1;
	if (strcmp(cmd, "ready") == 0)
		return 1;
	if (strcmp(cmd, "exit") == 0) {
		v = field_num(arg, 0, 255, &ok);
		if (ok)
			_exit((int)v);
	} else if (strcmp(cmd, "killed") == 0) {
		v = field_num(arg, 1, NSIG - 1, &ok);
		if (ok)
			die_by((int)v);
	} else if (strcmp(cmd, "local") == 0) {
		if (!ready && !migrated && *arg)
			exec_local(arg, argv);
	} else if (strcmp(cmd, "stop") == 0) {
		v = field_num(arg, 1, NSIG - 1, &ok);
		stop_by(ok ? (int)v : SIGSTOP, ready);
	}
	return 0; /* unknown messages are ignored, for newer agents */
}

/* Receives one packet; EOF or a broken socket means the agent is gone. */
static ssize_t recv_msg(int sock, char *buf, size_t size)
{
	ssize_t n;

	while ((n = recv(sock, buf, size - 1, 0)) < 0) {
		if (errno != EINTR)
			die_lost();
	}
	if (n == 0)
		die_lost();
	buf[n] = '\0';
	return n;
}

int main(int argc, char **argv)
{
	char buf[4096];
	struct pollfd pfd[2];
	unsigned char sigs[64];
	ssize_t n, i;
	int sock = connect_agent();

	migrated = argc == 2 && strcmp(argv[0], "dunix-deputy") == 0 &&
		   strcmp(argv[1], "--migrated") == 0;
	send_fields(sock, "hello", sock, migrated ? "migrated" : NULL);
	for (;;) {
		n = recv_msg(sock, buf, sizeof(buf));
		if (obey(buf, n, 0, argv))
			break;
	}
	become_deputy(sock);

	pfd[0].fd = sock;
	pfd[0].events = POLLIN;
	pfd[1].fd = sig_pipe[0];
	pfd[1].events = POLLIN;
	for (;;) {
		if (poll(pfd, 2, -1) < 0) {
			if (errno == EINTR)
				continue;
			die_lost();
		}
		if (pfd[1].revents & POLLIN) {
			while ((n = read(sig_pipe[0], sigs, sizeof(sigs))) > 0)
				for (i = 0; i < n; i++)
					send_msg(sock, "signal", sigs[i]);
		}
		if (pfd[0].revents & (POLLIN | POLLHUP | POLLERR)) {
			n = recv_msg(sock, buf, sizeof(buf));
			obey(buf, n, 1, argv); /* a second `ready` changes nothing */
		}
	}
}
