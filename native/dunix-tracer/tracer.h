/* The parts of dunix-tracer (see ../dunix-tracer.c) and what they share. */
#ifndef DUNIX_TRACER_H
#define DUNIX_TRACER_H

#include <stddef.h>
#include <sys/types.h>

#define PROG "dunix-tracer"

enum mode { MODE_LOCAL, MODE_REMOTE, MODE_AUTO };

struct tracee {
	pid_t pid, tgid;
	int remote; /* the pending exec was redirected to the deputy */
	int deputy; /* it is the deputy now: its next exec (the agent's `local`) stays here */
	int stopped; /* in a group-stop (reported once as `stopped`, then `continued`) */
	char *path; /* path of the pending exec, from its seccomp stop */
};

/* dunix-tracer.c */
void die(const char *fmt, ...) __attribute__((noreturn, format(printf, 1, 2)));

/* agent.c: the tracer protocol of docs/run.md, one '\0'-joined message per packet */
extern enum mode placement;
extern int quit_requested;
void agent_init(int sock);
int agent_fd(void);                   /* -1 once the agent is gone */
void emit(const char *kind, ...);     /* fields up to a NULL */
void emit_pid(const char *kind, pid_t pid, const char *rest);
void read_agent(void);                /* never blocks */
int pick_slot(void);                  /* a peer for a remote exec, or -1 */
const char *use_slot(int slot);       /* takes it: round robin, auto counts down */

/* trace.c: the tracee table and every ptrace stop */
struct tracee *tracee_add(pid_t pid, pid_t tgid);
struct tracee *tracee_find(pid_t pid);
struct tracee *tracee_meet(pid_t pid);
int reap(void);                       /* 1 once no tracee is left */
void detach_all_and_exit(void) __attribute__((noreturn));

/* place.c: local or remote at an exec's seccomp stop */
void place_init(const char *deputy);
void on_exec_stop(pid_t pid);

#endif
