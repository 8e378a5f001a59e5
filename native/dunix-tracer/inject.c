/*
 * Syscall injection: a tracee in a ptrace-stop is made to call execve(path, argv, envp)
 * as if it had done so itself, keeping its PID, parent, fds, blocked mask and pending
 * signals (what exec keeps). Used by `deputize` (control.c).
 *
 * How (x86_64): save the registers; find a `syscall` instruction (0f 05) the tracee can
 * jump to: at rip-2 when it stopped inside a system call (an interrupted syscall, or a
 * fork child's first stop), else in an executable mapping (the vDSO first: its clock
 * fallbacks contain one; a static binary has its own); write the strings and the argv
 * and envp arrays below the red zone of its stack; set rip there, rax = __NR_execve and
 * orig_rax = -1 so the kernel does not apply syscall restart to our registers
 * (arch/x86/kernel/signal.c, arch_do_signal_or_restart). The tracee then runs through the
 * seccomp stop (the job's filter) to the exec event. It is resumed with PTRACE_SYSCALL so
 * that a failed exec shows as a syscall-exit-stop: the saved registers go back, with the
 * restart the kernel would have done for an interrupted call.
 *
 * Other architectures need their own register names and syscall instruction; until then
 * inject_exec() refuses with an error.
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
#include <sys/syscall.h>
#include <sys/user.h>
#include <sys/wait.h>
#include <unistd.h>

#include "tracer.h"

#if defined(__x86_64__)

#define RED_ZONE 128
#define USER64_CS 0x33 /* the code segment of 64-bit user mode */
#define SCAN_MAX (64UL << 20) /* bytes of one mapping searched for a syscall instruction */

/* errno values of an interrupted call that the kernel restarts (include/linux/errno.h) */
#define ERESTARTSYS 512
#define ERESTARTNOINTR 513
#define ERESTARTNOHAND 514
#define ERESTART_RESTARTBLOCK 516

static int mem_open(pid_t pid)
{
	char path[64];
	snprintf(path, sizeof path, "/proc/%d/mem", pid);
	return open(path, O_RDONLY | O_CLOEXEC);
}

static int is_syscall_at(int mem, unsigned long addr)
{
	unsigned char b[2];
	return pread(mem, b, 2, (off_t)addr) == 2 && b[0] == 0x0f && b[1] == 0x05;
}

/* The first 0f 05 in [start, end), or 0. */
static unsigned long scan(int mem, unsigned long start, unsigned long end)
{
	static unsigned char buf[65536 + 1];
	if (end - start > SCAN_MAX)
		end = start + SCAN_MAX;
	for (unsigned long at = start; at < end;) {
		size_t want = end - at < 65536 ? end - at : 65536;
		ssize_t n = pread(mem, buf, want + (at + want < end), (off_t)at);
		if (n < 2)
			return 0;
		for (ssize_t i = 0; i + 1 < n; i++)
			if (buf[i] == 0x0f && buf[i + 1] == 0x05)
				return at + (unsigned long)i;
		at += want;
	}
	return 0;
}

/* A `syscall` instruction in an executable mapping; the vDSO first. */
static unsigned long find_in_maps(pid_t pid, int mem)
{
	char path[64], line[PATH_MAX + 128];
	snprintf(path, sizeof path, "/proc/%d/maps", pid);
	unsigned long found = 0;
	for (int pass = 0; pass < 2 && !found; pass++) {
		FILE *f = fopen(path, "re");
		if (!f)
			return 0;
		while (!found && fgets(line, sizeof line, f)) {
			unsigned long start, end;
			char perms[8];
			if (sscanf(line, "%lx-%lx %7s", &start, &end, perms) != 3 || perms[2] != 'x')
				continue;
			if ((pass == 0) != (strstr(line, "[vdso]") != NULL))
				continue;
			found = scan(mem, start, end);
		}
		fclose(f);
	}
	return found;
}

/* The registers of an interrupted call as the kernel would restart it. */
static void as_restarted(struct user_regs_struct *r)
{
	if ((long)r->orig_rax < 0)
		return;
	switch ((long)r->rax) {
	case -ERESTARTSYS:
	case -ERESTARTNOINTR:
	case -ERESTARTNOHAND:
		r->rax = r->orig_rax;
		r->rip -= 2;
		break;
	case -ERESTART_RESTARTBLOCK:
		r->rax = __NR_restart_syscall;
		r->rip -= 2;
		break;
	}
	r->orig_rax = (unsigned long)-1;
}

/* Copies s into blob at *off; its address in the tracee (blob lands at base). */
static unsigned long put(char *blob, size_t *off, unsigned long base, const char *s)
{
	size_t at = *off, n = strlen(s) + 1;
	memcpy(blob + at, s, n);
	*off = at + n;
	return base + at;
}

int inject_exec(struct tracee *t, const char *path, char *const argv[], char *const envp[],
		char *err, size_t errsize)
{
	pid_t pid = t->pid;
	struct user_regs_struct r;
	if (ptrace(PTRACE_GETREGS, pid, NULL, &r) < 0) {
		snprintf(err, errsize, "cannot read registers: %s", strerror(errno));
		return -1;
	}
	if (r.cs != USER64_CS) {
		snprintf(err, errsize, "not a 64-bit process");
		return -1;
	}
	if (exec_event(t, 1) < 0) { /* its exec event reports the deputy (place.c) */
		snprintf(err, errsize, "cannot set its options: %s", strerror(errno));
		return -1;
	}
	int mem = mem_open(pid);
	if (mem < 0) {
		snprintf(err, errsize, "cannot open its memory: %s", strerror(errno));
		return -1;
	}
	unsigned long sc = 0;
	if ((long)r.orig_rax >= 0 && r.rip >= 2 && is_syscall_at(mem, r.rip - 2))
		sc = r.rip - 2;
	if (!sc)
		sc = find_in_maps(pid, mem);
	close(mem);
	if (!sc) {
		snprintf(err, errsize, "no syscall instruction found");
		return -1;
	}

	/* below the red zone: [argv pointers][envp pointers][strings], 16-byte aligned */
	size_t nargv = 0, nenvp = 0, strings = strlen(path) + 1;
	while (argv[nargv])
		strings += strlen(argv[nargv++]) + 1;
	while (envp[nenvp])
		strings += strlen(envp[nenvp++]) + 1;
	size_t ptrs = (nargv + 1 + nenvp + 1) * sizeof(unsigned long);
	size_t size = ptrs + strings;
	unsigned long base = (r.rsp - RED_ZONE - size) & ~15UL;
	char *blob = calloc(1, size);
	if (!blob) {
		snprintf(err, errsize, "out of memory");
		return -1;
	}
	unsigned long *p = (unsigned long *)blob;
	size_t off = ptrs;
	unsigned long path_addr = put(blob, &off, base, path);
	for (size_t i = 0; i < nargv; i++)
		*p++ = put(blob, &off, base, argv[i]);
	*p++ = 0;
	unsigned long envp_addr = base + (unsigned long)((char *)p - blob);
	for (size_t i = 0; i < nenvp; i++)
		*p++ = put(blob, &off, base, envp[i]);
	*p = 0;
	int wrote = write_memory(pid, base, blob, size);
	free(blob);
	if (wrote < 0) {
		snprintf(err, errsize, "cannot write its stack: %s", strerror(errno));
		return -1;
	}

	struct user_regs_struct *saved = malloc(sizeof *saved);
	if (!saved) {
		snprintf(err, errsize, "out of memory");
		return -1;
	}
	*saved = r;
	r.rip = sc;
	r.rax = __NR_execve;
	r.orig_rax = (unsigned long)-1;
	r.rdi = path_addr;
	r.rsi = base;
	r.rdx = envp_addr;
	r.rsp = base; /* a signal frame, if one comes first, goes below our data */
	if (ptrace(PTRACE_SETREGS, pid, NULL, &r) < 0) {
		snprintf(err, errsize, "cannot set registers: %s", strerror(errno));
		free(saved);
		return -1;
	}
	free(t->saved);
	t->saved = saved;
	return 0;
}

/*
 * A stop while the injected exec runs: 1 = a syscall stop or the seccomp stop, resume it
 * with PTRACE_SYSCALL; 0 = any other stop, handled as usual; -1 = the exec failed, the
 * registers are restored (err says why) and the caller resumes it.
 */
int injected_stop(struct tracee *t, int status, char *err, size_t errsize)
{
	int sig = WSTOPSIG(status), event = (unsigned)status >> 16;
	if (event == PTRACE_EVENT_SECCOMP)
		return 1; /* our execve at the job's filter: let it run */
	if (event == PTRACE_EVENT_STOP)
		return 1; /* a second trap of ours (seize of a stopped process, then interrupt) */
	if (event != 0 || sig != (SIGTRAP | 0x80))
		return 0;
	struct __ptrace_syscall_info info;
	memset(&info, 0, sizeof info);
	if (ptrace(PTRACE_GET_SYSCALL_INFO, t->pid, (void *)sizeof info, &info) <= 0 ||
	    info.op != PTRACE_SYSCALL_INFO_EXIT)
		return 1;
	int e = info.exit.is_error ? (int)-info.exit.rval : 0;
	struct user_regs_struct *saved = t->saved;
	if (saved) {
		as_restarted(saved);
		ptrace(PTRACE_SETREGS, t->pid, NULL, saved);
	}
	snprintf(err, errsize, "exec of the deputy failed: %s", strerror(e));
	return -1;
}

#else /* not x86_64 */

int inject_exec(struct tracee *t, const char *path, char *const argv[], char *const envp[],
		char *err, size_t errsize)
{
	(void)t, (void)path, (void)argv, (void)envp;
	snprintf(err, errsize, "deputize is written for x86_64 only (this architecture "
			       "needs its registers and syscall instruction in inject.c)");
	return -1;
}

int injected_stop(struct tracee *t, int status, char *err, size_t errsize)
{
	(void)t, (void)status, (void)err, (void)errsize;
	return 0;
}

#endif
