/* libfuselocks: FUSE lock requests (getlk, setlk, flock) for pyfuse3, which has none.
 *
 * pyfuse3 3.5 fills a struct fuse_lowlevel_ops without getlk/setlk/flock, so libfuse never
 * asks the kernel for FUSE_POSIX_LOCKS / FUSE_FLOCK_LOCKS at INIT and the kernel keeps
 * every lock local to the host (fs/fuse/file.c: fc->no_lock, fc->no_flock). This library,
 * loaded RTLD_GLOBAL before pyfuse3 (dunix/storagefs/locks.py), interposes
 * fuse_session_new: it copies pyfuse3's ops, adds getlk/setlk/flock handlers and wraps
 * flush and release (where the kernel says a lock owner closed the file), then calls the
 * real fuse_session_new. libfuse then asks for both lock capabilities at INIT (do_init
 * sets them when the handlers exist).
 *
 * Every lock event goes to one Python callback (a ctypes CFUNCTYPE) with plain integers;
 * Python answers getlk/setlk/flock later with dunix_fl_reply (the request stays open while
 * a blocking lock waits). flush and release events are reported first, then handed to
 * pyfuse3's own handlers unchanged. An interrupted request (a signal to a process waiting
 * in F_SETLKW) is reported as DUNIX_FL_INTERRUPT; Python answers it with EINTR.
 */
#define _GNU_SOURCE
#define FUSE_USE_VERSION 35
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <fuse_lowlevel.h>
#include <stdint.h>
#include <string.h>

enum {
	DUNIX_FL_GETLK = 0,
	DUNIX_FL_SETLK = 1,
	DUNIX_FL_FLOCK = 2,
	DUNIX_FL_CLOSE_POSIX = 3, /* flush: drop the owner's POSIX locks */
	DUNIX_FL_CLOSE_FLOCK = 4, /* release with flock_release: drop the owner's flock */
	DUNIX_FL_INTERRUPT = 5,
	DUNIX_FL_RELEASE = 6, /* every release: open file description locks go with the file */
};

/* cmd, req, ino, fh, owner, type (F_RDLCK/F_WRLCK/F_UNLCK), start, end (inclusive;
 * INT64_MAX: to the end), pid, sleep. Returns 0 when Python answers req itself later, an
 * errno to have it answered here with that error. */
typedef int (*dunix_fl_cb)(int cmd, void *req, uint64_t ino, uint64_t fh, uint64_t owner,
			   int type, int64_t start, int64_t end, int pid, int sleep);

static dunix_fl_cb callback;
static struct fuse_lowlevel_ops ops;
static void (*orig_flush)(fuse_req_t, fuse_ino_t, struct fuse_file_info *);
static void (*orig_release)(fuse_req_t, fuse_ino_t, struct fuse_file_info *);
static int active;

void dunix_fl_set_callback(dunix_fl_cb cb) { callback = cb; }

/* 1 once a session was created with the lock handlers (the interposition worked). */
int dunix_fl_active(void) { return active; }

int dunix_fl_reply(void *req, int error, int type, int64_t start, int64_t end, int pid)
{
	if (error)
		return fuse_reply_err(req, error);
	if (type < 0) /* setlk, flock: success */
		return fuse_reply_err(req, 0);
	struct flock lk;
	memset(&lk, 0, sizeof(lk));
	lk.l_type = type;
	lk.l_whence = SEEK_SET;
	lk.l_start = start;
	lk.l_len = (end == INT64_MAX) ? 0 : end - start + 1;
	lk.l_pid = pid;
	return fuse_reply_lock(req, &lk);
}

static int64_t lock_end(const struct flock *lk)
{
	return lk->l_len == 0 ? INT64_MAX : lk->l_start + lk->l_len - 1;
}

static void interrupted(fuse_req_t req, void *data)
{
	(void)data;
	if (callback)
		callback(DUNIX_FL_INTERRUPT, req, 0, 0, 0, 0, 0, 0, 0, 0);
}

static void dispatch(int cmd, fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi,
		     int type, int64_t start, int64_t end, int pid, int sleep)
{
	int err = ENOSYS;
	if (callback)
		err = callback(cmd, req, ino, fi->fh, fi->lock_owner, type, start, end, pid, sleep);
	if (err)
		fuse_reply_err(req, err);
	else if (sleep)
		fuse_req_interrupt_func(req, interrupted, NULL);
}

static void fl_getlk(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi,
		     struct flock *lk)
{
	dispatch(DUNIX_FL_GETLK, req, ino, fi, lk->l_type, lk->l_start, lock_end(lk), lk->l_pid, 0);
}

static void fl_setlk(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi,
		     struct flock *lk, int sleep)
{
	dispatch(DUNIX_FL_SETLK, req, ino, fi, lk->l_type, lk->l_start, lock_end(lk), lk->l_pid,
		 sleep);
}

static void fl_flock(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi, int op)
{
	int type = (op & LOCK_UN) ? F_UNLCK : (op & LOCK_EX) ? F_WRLCK : F_RDLCK;
	dispatch(DUNIX_FL_FLOCK, req, ino, fi, type, 0, INT64_MAX, 0, !(op & LOCK_NB));
}

static void fl_flush(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
	if (callback)
		callback(DUNIX_FL_CLOSE_POSIX, NULL, ino, fi->fh, fi->lock_owner, F_UNLCK, 0,
			 INT64_MAX, 0, 0);
	orig_flush(req, ino, fi);
}

static void fl_release(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
	if (callback && fi->flock_release)
		callback(DUNIX_FL_CLOSE_FLOCK, NULL, ino, fi->fh, fi->lock_owner, F_UNLCK, 0,
			 INT64_MAX, 0, 0);
	if (callback)
		callback(DUNIX_FL_RELEASE, NULL, ino, fi->fh, 0, F_UNLCK, 0, INT64_MAX, 0, 0);
	orig_release(req, ino, fi);
}

typedef struct fuse_session *(*session_new_fn)(struct fuse_args *,
					       const struct fuse_lowlevel_ops *, size_t, void *);

struct fuse_session *fuse_session_new(struct fuse_args *args,
				      const struct fuse_lowlevel_ops *op, size_t op_size,
				      void *userdata)
{
	session_new_fn real = NULL;
	void *lib = dlopen("libfuse3.so.3", RTLD_NOW | RTLD_NOLOAD);
	if (lib)
		real = (session_new_fn)dlvsym(lib, "fuse_session_new", "FUSE_3.0");
	if (!real)
		return NULL;
	memset(&ops, 0, sizeof(ops));
	memcpy(&ops, op, op_size < sizeof(ops) ? op_size : sizeof(ops));
	if (ops.flush && ops.release && !ops.getlk && !ops.setlk && !ops.flock) {
		orig_flush = ops.flush;
		orig_release = ops.release;
		ops.flush = fl_flush;
		ops.release = fl_release;
		ops.getlk = fl_getlk;
		ops.setlk = fl_setlk;
		ops.flock = fl_flock;
		active = 1;
	}
	return real(args, &ops, sizeof(ops), userdata);
}
