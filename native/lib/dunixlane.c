/* libdunixlane: the storagefs bulk lane's frames (dunix/storagefs/bulk.py), native.
 *
 * The lane's connections start as mutual TLS (Python's ssl, the cluster CA); inside it the
 * caller sends fresh random keys, then both ends close TLS (close_notify both ways) and go
 * on over the same TCP connection with these frames: a 4-byte big-endian length (the
 * associated data), the payload encrypted with AES-128-GCM, a 16-byte tag. Each direction
 * has its own key and a 12-byte IV; a frame's nonce is the IV xored with its sequence
 * number (as TLS 1.3 does), so a frame replayed, dropped or moved fails authentication.
 *
 * Why: with Python's ssl the host reading or writing a peer's file spent its CPU quota on
 * what surrounds the cipher, not the cipher: OpenSSL copies every 16 KiB record between
 * its buffer and ours (memmove), Python zeroes each block it receives into and frees it,
 * and takes and drops the GIL per record; the lane also negotiated AES-256. Here a write's
 * pieces are encrypted straight into the frame that is written, and a received frame is
 * decrypted in place in the caller's buffer; ctypes drops the GIL once per call.
 *
 * Sockets may be non-blocking (Python's timeouts make them so): waits are poll()s of at
 * most timeout_ms (negative: no limit). Results: >= 0 done, or -errno (-EBADMSG: a frame
 * failed authentication or is too long; -ENODATA: a clean EOF before a frame began).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>
#include <unistd.h>

#include <openssl/evp.h>

#define HEAD 4
#define TAG 16
#define KEY_LEN 16
#define IV_LEN 12
/* A frame is encrypted (and decrypted) CHUNK bytes at a time, each piece written to the
 * socket (or opened) while it is still in the cache: sealing a whole 4 MiB block first
 * and then writing it made the kernel read it back from memory (the sending host spent
 * more than with OpenSSL's 16 KiB records). The tag still covers the whole frame. */
#define CHUNK (32 * 1024)

struct dir {
	EVP_CIPHER_CTX *ctx;
	unsigned char iv[IV_LEN];
	uint64_t seq;
};

struct lane {
	struct dir tx, rx;
	unsigned char *frame; /* where lane_send seals a chunk: HEAD + CHUNK + TAG bytes */
	unsigned char head[HEAD]; /* the length lane_recv_len read, for lane_recv_rest */
	int has_head;
};

static int dir_init(struct dir *d, const unsigned char *key, const unsigned char *iv, int enc)
{
	d->ctx = EVP_CIPHER_CTX_new();
	memcpy(d->iv, iv, IV_LEN);
	d->seq = 0;
	if (d->ctx == NULL)
		return -1;
	return (enc ? EVP_EncryptInit_ex(d->ctx, EVP_aes_128_gcm(), NULL, key, NULL)
		    : EVP_DecryptInit_ex(d->ctx, EVP_aes_128_gcm(), NULL, key, NULL)) == 1
		       ? 0
		       : -1;
}

static void nonce(struct dir *d, unsigned char *out)
{
	memcpy(out, d->iv, IV_LEN);
	for (int i = 0; i < 8; i++)
		out[IV_LEN - 1 - i] ^= (unsigned char)(d->seq >> (8 * i));
	d->seq++;
}

void lane_free(struct lane *l)
{
	if (l == NULL)
		return;
	EVP_CIPHER_CTX_free(l->tx.ctx);
	EVP_CIPHER_CTX_free(l->rx.ctx);
	free(l->frame);
	free(l);
}

/* keys and IVs of both directions */
struct lane *lane_new(const unsigned char *key_tx, const unsigned char *iv_tx,
		      const unsigned char *key_rx, const unsigned char *iv_rx)
{
	struct lane *l = calloc(1, sizeof *l);
	if (l == NULL)
		return NULL;
	l->frame = malloc(HEAD + CHUNK + TAG);
	if (l->frame == NULL || dir_init(&l->tx, key_tx, iv_tx, 1) < 0 ||
	    dir_init(&l->rx, key_rx, iv_rx, 0) < 0) {
		lane_free(l);
		return NULL;
	}
	return l;
}

static int wait_for(int fd, short events, int timeout_ms)
{
	struct pollfd p = {.fd = fd, .events = events};
	for (;;) {
		int n = poll(&p, 1, timeout_ms);
		if (n > 0)
			return 0;
		if (n == 0)
			return -ETIMEDOUT;
		if (errno != EINTR)
			return -errno;
	}
}

static int write_all(int fd, const unsigned char *buf, size_t len, int timeout_ms)
{
	while (len) {
		ssize_t n = write(fd, buf, len);
		if (n > 0) {
			buf += n;
			len -= (size_t)n;
		} else if (n < 0 && errno == EAGAIN) {
			int err = wait_for(fd, POLLOUT, timeout_ms);
			if (err)
				return err;
		} else if (n < 0 && errno != EINTR) {
			return -errno;
		}
	}
	return 0;
}

/* 0 filled; -ENODATA: EOF before the first byte; -ECONNRESET: EOF mid-way; -errno */
static int read_all(int fd, unsigned char *buf, size_t len, int timeout_ms)
{
	size_t got = 0;
	while (got < len) {
		ssize_t n = read(fd, buf + got, len - got);
		if (n > 0) {
			got += (size_t)n;
		} else if (n == 0) {
			return got ? -ECONNRESET : -ENODATA;
		} else if (errno == EAGAIN) {
			int err = wait_for(fd, POLLIN, timeout_ms);
			if (err)
				return err;
		} else if (errno != EINTR) {
			return -errno;
		}
	}
	return 0;
}

static void put_len(unsigned char *head, size_t len)
{
	head[0] = (unsigned char)(len >> 24);
	head[1] = (unsigned char)(len >> 16);
	head[2] = (unsigned char)(len >> 8);
	head[3] = (unsigned char)len;
}


static int seal_begin(struct dir *d, unsigned char *head, size_t len)
{
	unsigned char nc[IV_LEN];
	int outl;
	nonce(d, nc);
	put_len(head, len);
	return EVP_EncryptInit_ex(d->ctx, NULL, NULL, NULL, nc) &&
	       EVP_EncryptUpdate(d->ctx, NULL, &outl, head, HEAD);
}

static int seal_end(struct dir *d, unsigned char *tag)
{
	int outl;
	return EVP_EncryptFinal_ex(d->ctx, tag, &outl) &&
	       EVP_CIPHER_CTX_ctrl(d->ctx, EVP_CTRL_GCM_GET_TAG, TAG, tag);
}

/* Seal the n pieces as one frame and write it, CHUNK bytes at a time through the lane's
 * buffer. */
int lane_send(struct lane *l, int fd, const struct iovec *iov, int n, int timeout_ms)
{
	size_t len = 0;
	for (int i = 0; i < n; i++)
		len += iov[i].iov_len;
	if (len > INT32_MAX)
		return -EMSGSIZE;
	if (!seal_begin(&l->tx, l->frame, len))
		return -EIO;
	size_t fill = HEAD; /* bytes in l->frame not written yet */
	for (int i = 0; i < n; i++) {
		const unsigned char *in = iov[i].iov_base;
		size_t left = iov[i].iov_len;
		while (left) {
			size_t room = HEAD + CHUNK - fill;
			size_t take = left < room ? left : room;
			int outl;
			if (!EVP_EncryptUpdate(l->tx.ctx, l->frame + fill, &outl, in, (int)take))
				return -EIO;
			fill += take;
			in += take;
			left -= take;
			if (fill == HEAD + CHUNK) {
				int err = write_all(fd, l->frame, fill, timeout_ms);
				if (err)
					return err;
				fill = 0;
			}
		}
	}
	if (!seal_end(&l->tx, l->frame + fill))
		return -EIO;
	return write_all(fd, l->frame, fill + TAG, timeout_ms);
}

/* Seal in place: frame has HEAD bytes of room, then len bytes of payload, then TAG bytes of
 * room (the owner's reply around a block it read, no copy); written CHUNK by CHUNK. */
int lane_seal_send(struct lane *l, int fd, unsigned char *frame, size_t len, int timeout_ms)
{
	if (len > INT32_MAX)
		return -EMSGSIZE;
	if (!seal_begin(&l->tx, frame, len))
		return -EIO;
	unsigned char *from = frame; /* not yet written */
	size_t done = 0;
	while (done < len) {
		size_t take = len - done < CHUNK ? len - done : CHUNK;
		int outl;
		unsigned char *at = frame + HEAD + done;
		if (!EVP_EncryptUpdate(l->tx.ctx, at, &outl, at, (int)take))
			return -EIO;
		done += take;
		if (done < len) { /* the last chunk goes out with the tag */
			int err = write_all(fd, from, (size_t)(at + take - from), timeout_ms);
			if (err)
				return err;
			from = at + take;
		}
	}
	if (!seal_end(&l->tx, frame + HEAD + len))
		return -EIO;
	return write_all(fd, from, (size_t)(frame + HEAD + len + TAG - from), timeout_ms);
}

static size_t get_len(const unsigned char *head)
{
	return (size_t)head[0] << 24 | (size_t)head[1] << 16 | (size_t)head[2] << 8 | head[3];
}

/* Read the next frame's length only (the caller then sizes its buffer for
 * lane_recv_rest: HEAD + length + TAG bytes); the length, or -errno. */
long lane_recv_len(struct lane *l, int fd, int timeout_ms)
{
	int err = read_all(fd, l->head, HEAD, timeout_ms);
	if (err)
		return err;
	l->has_head = 1;
	size_t len = get_len(l->head);
	return len > INT32_MAX ? -EBADMSG : (long)len;
}

/* Read one frame into frame[0, cap) and open it in place: returns the payload's length
 * (at frame + HEAD), or -errno. Nothing of a frame that fails its tag is to be used.
 * After lane_recv_len, the frame's length is not read again. */
long lane_recv(struct lane *l, int fd, unsigned char *frame, size_t cap, int timeout_ms)
{
	int err = 0;
	if (l->has_head)
		memcpy(frame, l->head, HEAD);
	else
		err = read_all(fd, frame, HEAD, timeout_ms);
	l->has_head = 0;
	if (err)
		return err;
	size_t len = get_len(frame);
	if (HEAD + len + TAG > cap || len > INT32_MAX)
		return -EBADMSG;
	unsigned char nc[IV_LEN];
	int outl;
	nonce(&l->rx, nc);
	if (!EVP_DecryptInit_ex(l->rx.ctx, NULL, NULL, NULL, nc) ||
	    !EVP_DecryptUpdate(l->rx.ctx, NULL, &outl, frame, HEAD))
		return -EBADMSG;
	/* opened CHUNK by CHUNK as it arrives (in the cache); the caller uses none of it
	 * unless the tag at the end checks */
	for (size_t done = 0; done < len;) {
		size_t take = len - done < CHUNK ? len - done : CHUNK;
		unsigned char *at = frame + HEAD + done;
		err = read_all(fd, at, take, timeout_ms);
		if (err)
			return err == -ENODATA ? -ECONNRESET : err;
		if (!EVP_DecryptUpdate(l->rx.ctx, at, &outl, at, (int)take))
			return -EBADMSG;
		done += take;
	}
	err = read_all(fd, frame + HEAD + len, TAG, timeout_ms);
	if (err)
		return err == -ENODATA ? -ECONNRESET : err;
	if (!EVP_CIPHER_CTX_ctrl(l->rx.ctx, EVP_CTRL_GCM_SET_TAG, TAG, frame + HEAD + len) ||
	    EVP_DecryptFinal_ex(l->rx.ctx, frame + HEAD + len, &outl) != 1)
		return -EBADMSG;
	return (long)len;
}
