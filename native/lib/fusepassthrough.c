/* libfusepassthrough: FUSE passthrough (kernel 6.9+) for pyfuse3 on libfuse 3.14.
 *
 * With passthrough, a read or write on a file opened with FOPEN_PASSTHROUGH and a backing id
 * goes straight to the backing file inside the kernel; the server never sees it
 * (Documentation/filesystems/fuse-passthrough.rst). libfuse 3.14 and pyfuse3 3.5 know
 * nothing of it, so this library, loaded RTLD_GLOBAL before pyfuse3
 * (dunix/storagefs/passthrough.py), does three things:
 *
 * - interposes fuse_session_mount: after libfuse's own, the session gets a custom io
 *   (fuse_session_custom_io, libfuse 3.14) whose read notes the kernel's INIT request and
 *   whose writev adds FUSE_PASSTHROUGH (flags2) and max_stack_depth to the INIT reply, when
 *   the kernel offered it;
 * - interposes fuse_reply_open and fuse_reply_create: when Python gave the handle being
 *   replied a backing id (dunix_pt_give, just before its open/create returns), the reply's
 *   fuse_open_out gets FOPEN_PASSTHROUGH and the id in its third field (padding in 3.14's
 *   headers), and loses FOPEN_KEEP_CACHE (the kernel refuses the two together: EIO);
 * - exports dunix_pt_open/dunix_pt_close (FUSE_DEV_IOC_BACKING_OPEN/CLOSE on the session's
 *   /dev/fuse descriptor) for Python to get and drop backing ids;
 * - interposes fuse_session_new (ahead of libfuselocks: RTLD_NEXT) to answer the kernel's
 *   getxattr("security.capability") here for inodes Python marked as having none
 *   (dunix_pt_nocaps). Without FUSE_HANDLE_KILLPRIV_V2 the kernel asks it before every
 *   write (file_remove_privs -> security_inode_need_killpriv), passthrough writes
 *   included: one trip to Python per write, half the speed of a passthrough write.
 *
 * One thread serves the session (pyfuse3 on trio), so the handle given and the reply that
 * carries it follow each other without anything in between.
 *
 * Not linked to libfuse3 (its functions are looked up when called): a library's symbols
 * interpose only when it comes before libfuse3 in the global scope, and libfuselocks pulls
 * libfuse3 in after itself, so this one is loaded first.
 */
#define _GNU_SOURCE
#define FUSE_USE_VERSION 35
#include <dlfcn.h>
#include <link.h>
#include <errno.h>
#include <fuse_lowlevel.h>
#include <stdint.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/uio.h>
#include <unistd.h>

/* The kernel ABI parts libfuse 3.14's headers lack (include/uapi/linux/fuse.h, 7.40). */
#define K_FUSE_INIT 26
#define K_INIT_EXT (1u << 30)
#define K_PASSTHROUGH2 (1u << (37 - 32)) /* FUSE_PASSTHROUGH, in flags2 */
/* FUSE_DIRECT_IO_ALLOW_MMAP (6.6+), in flags2: a FOPEN_DIRECT_IO file may be mmapped
 * MAP_SHARED (through the page cache); without it such an mmap fails with ENODEV. Asked
 * for peers' files, opened direct_io (dunix/storagefs/fs.py open) */
#define K_DIO_MMAP2 (1u << (36 - 32))
#define K_FOPEN_KEEP_CACHE (1u << 1)
#define K_FOPEN_PASSTHROUGH (1u << 7)
/* FILESYSTEM_MAX_STACK_DEPTH: backing files may sit on a stacked fs (overlayfs roots);
 * the price is that /dunix/fs cannot be the lower layer of an overlay itself. */
#define STACK_DEPTH 2

struct k_in_header {
	uint32_t len, opcode;
	uint64_t unique, nodeid;
	uint32_t uid, gid, pid;
	uint16_t total_extlen, padding;
};
struct k_init_in {
	uint32_t major, minor, max_readahead, flags, flags2;
};
struct k_out_header {
	uint32_t len;
	int32_t error;
	uint64_t unique;
};
struct k_init_out {
	uint32_t major, minor, max_readahead, flags;
	uint16_t max_background, congestion_threshold;
	uint32_t max_write, time_gran;
	uint16_t max_pages, map_alignment;
	uint32_t flags2, max_stack_depth;
	uint32_t unused[6];
};
struct k_open_out {
	uint64_t fh;
	uint32_t open_flags;
	int32_t backing_id;
};
struct k_backing_map {
	int32_t fd;
	uint32_t flags;
	uint64_t padding;
};
#define K_BACKING_OPEN _IOW(229, 1, struct k_backing_map)
#define K_BACKING_CLOSE _IOW(229, 2, uint32_t)

enum {
	PT_HOOKED = 1,  /* the session got our io */
	PT_OFFERED = 2, /* the kernel's INIT offered FUSE_PASSTHROUGH */
	PT_ASKED = 4,   /* our INIT reply asked for it */
	PT_DIO_MMAP_OFFERED = 8, /* the kernel's INIT offered FUSE_DIRECT_IO_ALLOW_MMAP */
	PT_DIO_MMAP = 16,        /* our INIT reply asked for it */
};

static int dev_fd = -1;
static int state;
static uint64_t init_unique;
static int init_pending;
/* given by Python for the next open/create reply; armed while that reply is written */
static uint64_t given_fh;
static int32_t given_id;
static int given;
static uint64_t armed_fh;
static int32_t armed_id;
static int armed;

int dunix_pt_state(void) { return state; }

/* Inodes known to have no security.capability xattr: open addressing, 0 = empty slot. */
#define NOCAPS_SLOTS 8192
static uint64_t nocaps[NOCAPS_SLOTS];
static const uint64_t NOCAPS_GONE = UINT64_MAX; /* a removed entry (keeps probe chains) */

static size_t nocaps_slot(uint64_t ino) { return (ino * 0x9E3779B97F4A7C15ull) % NOCAPS_SLOTS; }

static int nocaps_has(uint64_t ino)
{
	for (size_t n = 0, i = nocaps_slot(ino); n < NOCAPS_SLOTS; n++, i = (i + 1) % NOCAPS_SLOTS) {
		if (nocaps[i] == ino)
			return 1;
		if (nocaps[i] == 0)
			return 0;
	}
	return 0;
}

/* Mark (on=1) or unmark inode ino: "no security.capability". A full table marks nothing. */
void dunix_pt_nocaps(uint64_t ino, int on)
{
	if (ino == 0 || ino == NOCAPS_GONE)
		return;
	size_t free_slot = NOCAPS_SLOTS;
	for (size_t n = 0, i = nocaps_slot(ino); n < NOCAPS_SLOTS; n++, i = (i + 1) % NOCAPS_SLOTS) {
		if (nocaps[i] == ino) {
			if (!on)
				nocaps[i] = NOCAPS_GONE;
			return;
		}
		if (nocaps[i] == NOCAPS_GONE && free_slot == NOCAPS_SLOTS)
			free_slot = i;
		if (nocaps[i] == 0) {
			if (free_slot == NOCAPS_SLOTS)
				free_slot = i;
			break;
		}
	}
	if (on && free_slot != NOCAPS_SLOTS)
		nocaps[free_slot] = ino;
}

/* A backing id for descriptor fd (a file the server opened read-write), or -errno. */
int dunix_pt_open(int fd)
{
	struct k_backing_map map = {.fd = fd, .flags = 0, .padding = 0};
	if (dev_fd < 0)
		return -ENODEV;
	int id = ioctl(dev_fd, K_BACKING_OPEN, &map);
	return id < 0 ? -errno : id;
}

int dunix_pt_close(int id)
{
	uint32_t value = (uint32_t)id;
	if (dev_fd < 0)
		return -ENODEV;
	return ioctl(dev_fd, K_BACKING_CLOSE, &value) < 0 ? -errno : 0;
}

/* The open or create about to be replied with handle fh passes through to backing id. */
void dunix_pt_give(uint64_t fh, int32_t id)
{
	given_fh = fh;
	given_id = id;
	given = 1;
}

static ssize_t pt_read(int fd, void *buf, size_t len, void *userdata)
{
	(void)userdata;
	ssize_t res = read(fd, buf, len);
	if (res >= (ssize_t)(sizeof(struct k_in_header) + sizeof(struct k_init_in))) {
		const struct k_in_header *in = buf;
		if (in->opcode == K_FUSE_INIT) {
			const struct k_init_in *arg = (const void *)(in + 1);
			init_unique = in->unique;
			init_pending = 1;
			if ((arg->flags & K_INIT_EXT) && (arg->flags2 & K_PASSTHROUGH2))
				state |= PT_OFFERED;
			if ((arg->flags & K_INIT_EXT) && (arg->flags2 & K_DIO_MMAP2))
				state |= PT_DIO_MMAP_OFFERED;
		}
	}
	return res;
}

static ssize_t pt_writev(int fd, struct iovec *iov, int count, void *userdata)
{
	(void)userdata;
	const struct k_out_header *out = iov[0].iov_base;
	if (count != 2 || out->error != 0)
		return writev(fd, iov, count);
	char copy[sizeof(struct k_init_out) + 256];
	size_t len = iov[1].iov_len;
	if (init_pending && out->unique == init_unique && len >= sizeof(struct k_init_out) &&
	    len <= sizeof(copy)) {
		init_pending = 0;
		if (!(state & (PT_OFFERED | PT_DIO_MMAP_OFFERED)))
			return writev(fd, iov, count);
		memcpy(copy, iov[1].iov_base, len);
		struct k_init_out *arg = (void *)copy;
		arg->flags |= K_INIT_EXT;
		if (state & PT_OFFERED) {
			arg->flags2 |= K_PASSTHROUGH2;
			arg->max_stack_depth = STACK_DEPTH;
			state |= PT_ASKED;
		}
		if (state & PT_DIO_MMAP_OFFERED) {
			arg->flags2 |= K_DIO_MMAP2;
			state |= PT_DIO_MMAP;
		}
		struct iovec v[2] = {iov[0], {copy, len}};
		return writev(fd, v, 2);
	}
	if (armed && len >= sizeof(struct k_open_out) && len <= sizeof(copy)) {
		memcpy(copy, iov[1].iov_base, len);
		struct k_open_out *arg = (void *)(copy + len - sizeof(struct k_open_out));
		if (arg->fh == armed_fh) {
			arg->open_flags = (arg->open_flags & ~K_FOPEN_KEEP_CACHE) | K_FOPEN_PASSTHROUGH;
			arg->backing_id = armed_id;
			struct iovec v[2] = {iov[0], {copy, len}};
			return writev(fd, v, 2);
		}
	}
	return writev(fd, iov, count);
}

static void *libfuse(void) { return dlopen("libfuse3.so.3", RTLD_NOW | RTLD_NOLOAD); }

/* Arm the patch for this reply when Python gave its handle; a stale gift is dropped. */
static void arm(const struct fuse_file_info *fi)
{
	armed = given && fi && fi->fh == given_fh;
	armed_fh = given_fh;
	armed_id = given_id;
	given = 0;
}

typedef int (*reply_open_fn)(fuse_req_t, const struct fuse_file_info *);
typedef int (*reply_create_fn)(fuse_req_t, const struct fuse_entry_param *,
			       const struct fuse_file_info *);
typedef int (*mount_fn)(struct fuse_session *, const char *);
typedef int (*session_fd_fn)(struct fuse_session *);
typedef int (*custom_io_fn)(struct fuse_session *, const struct fuse_custom_io *, int);

int fuse_reply_open(fuse_req_t req, const struct fuse_file_info *fi)
{
	void *lib = libfuse();
	reply_open_fn real = lib ? (reply_open_fn)dlvsym(lib, "fuse_reply_open", "FUSE_3.0") : NULL;
	if (!real)
		return -ENOSYS;
	arm(fi);
	int res = real(req, fi);
	armed = 0;
	return res;
}

int fuse_reply_create(fuse_req_t req, const struct fuse_entry_param *e,
		      const struct fuse_file_info *fi)
{
	void *lib = libfuse();
	reply_create_fn real =
		lib ? (reply_create_fn)dlvsym(lib, "fuse_reply_create", "FUSE_3.0") : NULL;
	if (!real)
		return -ENOSYS;
	arm(fi);
	int res = real(req, e, fi);
	armed = 0;
	return res;
}

typedef int (*reply_err_fn)(fuse_req_t, int);
typedef struct fuse_session *(*session_new_fn)(struct fuse_args *,
					       const struct fuse_lowlevel_ops *, size_t, void *);
static struct fuse_lowlevel_ops ops;
static void (*orig_getxattr)(fuse_req_t, fuse_ino_t, const char *, size_t);
static reply_err_fn reply_err;

static void pt_getxattr(fuse_req_t req, fuse_ino_t ino, const char *name, size_t size)
{
	if (reply_err && strcmp(name, "security.capability") == 0 && nocaps_has(ino)) {
		reply_err(req, ENODATA);
		return;
	}
	orig_getxattr(req, ino, name, size);
}

struct next_search {
	const char *symbol;
	int past_self;
	void *found;
};

static int next_in(struct dl_phdr_info *info, size_t size, void *data)
{
	(void)size;
	struct next_search *search = data;
	Dl_info self;
	if (!info->dlpi_name || !info->dlpi_name[0])
		return 0;
	if (!search->past_self) {
		search->past_self = dladdr((void *)next_in, &self) && self.dli_fname &&
				    strcmp(self.dli_fname, info->dlpi_name) == 0;
		return 0;
	}
	void *handle = dlopen(info->dlpi_name, RTLD_LAZY | RTLD_NOLOAD);
	if (!handle)
		return 0;
	void *sym = dlsym(handle, search->symbol);
	Dl_info where;
	/* dlsym also searches the object's dependencies: only its own definition counts */
	if (sym && dladdr(sym, &where) && where.dli_fname &&
	    strcmp(where.dli_fname, info->dlpi_name) == 0 && !strstr(info->dlpi_name, "libfuse3")) {
		search->found = sym;
	}
	dlclose(handle);
	return search->found != NULL;
}

/* What RTLD_NEXT would give if it searched every library loaded after this one (glibc's
 * RTLD_NEXT searches only a dlopened object's own dependencies). */
static void *next_definition(const char *symbol)
{
	struct next_search search = {symbol, 0, NULL};
	dl_iterate_phdr(next_in, &search);
	return search.found;
}

struct fuse_session *fuse_session_new(struct fuse_args *args,
				      const struct fuse_lowlevel_ops *op, size_t op_size,
				      void *userdata)
{
	/* the next definition (libfuselocks', loaded after this one), else libfuse's own */
	session_new_fn next = (session_new_fn)next_definition("fuse_session_new");
	void *lib = libfuse();
	if (!next && lib)
		next = (session_new_fn)dlvsym(lib, "fuse_session_new", "FUSE_3.0");
	if (!next)
		return NULL;
	reply_err = lib ? (reply_err_fn)dlvsym(lib, "fuse_reply_err", "FUSE_3.0") : NULL;
	memset(&ops, 0, sizeof(ops));
	memcpy(&ops, op, op_size < sizeof(ops) ? op_size : sizeof(ops));
	if (ops.getxattr && reply_err) {
		orig_getxattr = ops.getxattr;
		ops.getxattr = pt_getxattr;
	}
	return next(args, &ops, sizeof(ops), userdata);
}

int fuse_session_mount(struct fuse_session *se, const char *mountpoint)
{
	void *lib = libfuse();
	mount_fn real = lib ? (mount_fn)dlvsym(lib, "fuse_session_mount", "FUSE_3.0") : NULL;
	if (!real)
		return -1;
	int res = real(se, mountpoint);
	if (res != 0)
		return res;
	static const struct fuse_custom_io io = {.writev = pt_writev, .read = pt_read};
	session_fd_fn session_fd = (session_fd_fn)dlvsym(lib, "fuse_session_fd", "FUSE_3.0");
	custom_io_fn custom_io = (custom_io_fn)dlvsym(lib, "fuse_session_custom_io", "FUSE_3.0");
	if (!session_fd || !custom_io)
		return 0; /* a libfuse before 3.14: no passthrough, the mount works */
	int fd = session_fd(se);
	if (custom_io(se, &io, fd) == 0) {
		dev_fd = fd;
		state = PT_HOOKED;
	}
	return 0;
}
