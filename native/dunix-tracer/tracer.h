/* The parts of dunix-tracer (see ../dunix-tracer.c) and what they share. */
#ifndef DUNIX_TRACER_H
#define DUNIX_TRACER_H

#include <poll.h>
#include <stddef.h>
#include <sys/ptrace.h>
#include <sys/types.h>

#define PROG "dunix-tracer"

/* Every tracee gets these, at the first seize and at a `seize` from the agent. TRACESYSGOOD
 * only matters while an injected exec runs (PTRACE_SYSCALL, see inject.c). No TRACEEXIT:
 * the exit status comes with the reaping anyway, and its stop cost every task one more
 * stop (two context switches) for nothing. */
#define TRACE_OPTIONS                                                                    \
	(PTRACE_O_TRACEFORK | PTRACE_O_TRACEVFORK | PTRACE_O_TRACECLONE |                \
	 PTRACE_O_TRACEEXEC | PTRACE_O_TRACESECCOMP | PTRACE_O_TRACESYSGOOD |             \
	 PTRACE_O_EXITKILL)

/* What the agent asked for a process, done at its next ptrace-stop (control.c). */
enum want { WANT_NONE, WANT_RELEASE, WANT_DEPUTIZE };

enum mode { MODE_LOCAL, MODE_REMOTE, MODE_AUTO };

struct tracee {
	pid_t pid, tgid;
	int remote; /* the pending exec was redirected to the deputy */
	int deputy; /* it is the deputy now: its next exec (the agent's `local`) stays here */
	int stopped; /* in a group-stop (reported once as `stopped`, then `continued`) */
	char *path; /* path of the pending exec, from its seccomp stop */
	char *went; /* remote: "NODE\0ABSPATH", reported at the exec event */
	enum want want;
	int fresh;    /* a new task before its first stop */
	int held;     /* kept in a ptrace-stop by us (its first stop, under `hold`) */
	int quiet;    /* a group-stop we caused (release/seize): not reported */
	int injected; /* runs the exec we injected (inject.c): syscall stops are ours */
	int cont_after; /* the group was stopped when the exec was injected: SIGCONT after */
	char *node;   /* WANT_DEPUTIZE: the peer the process went to */
	void *saved;  /* registers before the injection, to undo a failed exec */
	int quiet_exec;   /* its ptrace options lack TRACEEXEC (place.c: plain local execs) */
	int opts_unknown; /* met before its parent's event: options not known */
};

/* dunix-tracer.c */
void die(const char *fmt, ...) __attribute__((noreturn, format(printf, 1, 2)));

/* agent.c: the tracer protocol of docs/run.md, one '\0'-joined message per packet */
extern enum mode placement;
extern int quit_requested;
void agent_init(int sock);
int agent_fd(void);                   /* -1 once the agent is gone */
void emit(const char *kind, ...);     /* fields up to a NULL; sends the batch first */
void emit_pid(const char *kind, pid_t pid, const char *rest);
void emit_later(const char *kind, ...); /* process-table events: batched (agent.c) */
void emit_pid_later(const char *kind, pid_t pid, const char *rest);
void flush_events(void);
int flush_if_due(int longest);        /* poll timeout (ms) until the batch is due */
void read_agent(void);                /* never blocks; commands are queued for control.c */
int pick_slot(void);                  /* a peer for a remote exec, or -1 */
#define SPILL_BASE 100000             /* use_slot() index of a spill-table peer */
int spill_armed(void);                /* auto mode with a spill table pushed */
int pick_spill(long running);         /* a spill peer once `running` reach the mark */
int spill_is_home(int slot);          /* a spill entry that keeps the exec here */
long running_here(pid_t except);      /* traced processes running user code now */
const char *use_slot(int slot);       /* takes it: round robin, auto counts down */

/* trace.c: the tracee table and every ptrace stop */
extern pid_t first_pid;               /* the job's first process: its exit is not batched */
struct tracee *tracee_add(pid_t pid, pid_t tgid);
struct tracee *tracee_find(pid_t pid);
struct tracee *tracee_meet(pid_t pid);
int reap(void);                       /* 1 once no tracee is left */
void detach_all_and_exit(void) __attribute__((noreturn));

void forget(pid_t pid);
int tracee_any_of(pid_t tgid);        /* a thread of that process is traced */
void want_process(pid_t tgid, enum want want); /* for every thread, and interrupt it */
int is_stop_signal(int sig);

/* place.c: local or remote at an exec's seccomp stop */
void place_init(const char *deputy);
void on_exec_stop(pid_t pid);
const char *deputy_path(void);        /* NULL when there is no usable deputy */
int write_memory(pid_t pid, unsigned long addr, const void *data, size_t len);
int exec_event(struct tracee *t, int on); /* TRACEEXEC on or off for it; 0 when done */

/* control.c: the agent's `release`, `seize`, `deputize`, `hold`, `resume` */
extern int hold_forks;                /* new processes stay at their first stop */
void queue_command(char **f, int n);  /* from read_agent() */
void run_commands(void);              /* from the main loop, outside any stop handling */
int on_wanted_stop(struct tracee *t, int status); /* 1: handled, leave the tracee alone */
void on_wanted_exit(struct tracee *t); /* before it is forgotten */
int released_pending(void);           /* released processes still alive (no `done` yet) */
int released_pollfds(struct pollfd *p, int max);
void released_continue_all(void);     /* at `quit` */
void on_deputy_exec(struct tracee *t); /* the injected exec ran: report it */

/* inject.c: make a stopped tracee execve the deputy (x86_64 only) */
int inject_exec(struct tracee *t, const char *path, char *const argv[], char *const envp[],
		char *err, size_t errsize);
int injected_stop(struct tracee *t, int status, char *err, size_t errsize);

#endif
