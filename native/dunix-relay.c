/*
 * dunix-relay: one relayed pipe stream's bytes between two hosts, native.
 *
 * The agents' Python relay (dunix/fdmove/relay.py) costs ~1.5 ms of CPU per MB on each
 * side (trio's TLS loops, msgpack, five user-space copies); on 0.5-CPU hosts that held a
 * cross-host pipe to a quarter of iperf3. A stream that has carried enough is handed to
 * this program instead: the sending agent starts `dunix-relay send`, the receiving one
 * `dunix-relay recv`, and the bytes go read(pipe) -> encrypt -> write(socket),
 * read(socket) -> decrypt in place -> write(pipe) on a TCP connection of their own.
 *
 *   dunix-relay send --fd N --listen L --id STREAM    (stdin: the key, 64 hex digits)
 *   dunix-relay recv --fd N --connect HOST:PORT --id STREAM
 *
 * Security: TLS 1.3 with an external pre-shared key (TLS_AES_128_GCM_SHA256, the PSK
 * mixed with an ECDHE exchange). The sending agent makes a fresh random 32-byte key per
 * stream and gives it to the receiving agent inside their mutually authenticated TLS
 * channel (dunix.wire, both certificates from the cluster CA), so only those two agents
 * can complete this handshake: every byte is encrypted and authenticated, and both ends
 * are the cluster's agents. The key comes on stdin (argv is world-readable in /proc).
 *
 * The sender accepts on the listening socket L until a connection completes the handshake
 * (a stranger's connection is dropped) or ACCEPT_TIMEOUT passes. Semantics kept, as the
 * Python relay keeps them:
 *   - EOF: the sender sends an end frame at its pipe's EOF; the receiver writes everything,
 *     closes its pipe (its reader sees EOF), then answers; the sender exits 0 only after
 *     that answer, so whatever the agent says after the sender's exit comes after the
 *     bytes are in the far pipe.
 *   - SIGUSR1 (sender): stop reading and end the stream as at EOF after the frame on its
 *     way: the agent moves the stream's reader elsewhere and wants all it read delivered.
 *   - a far reader gone (EPIPE, or POLLERR on the pipe while idle): the receiver closes
 *     the connection; the sender sees it (also while its pipe is idle) and exits 3; the
 *     agent closes its copy of the pipe and the local writer gets EPIPE/SIGPIPE.
 * Exit: 0 done (EOF delivered), 3 the far side went away, 4 (recv) the local reader went
 * away, 1 failure (handshake, connection lost before the end frame, a forged frame), 2 usage.
 *
 * The fds may be non-blocking (the agent's descriptions are): every wait is a poll().
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/ssl.h>

#ifndef SOCK_BUF
#define SOCK_BUF (4 * 1024 * 1024) /* bounds what a reader that stops holds in flight */
#endif
#define ACCEPT_TIMEOUT_MS 15000
#define KEY_LEN 32
#define EXIT_FAIL 1
#define EXIT_USAGE 2
#define EXIT_PEER_GONE 3
#define EXIT_BROKEN 4

static const unsigned char TLS13_AES128GCM[2] = {0x13, 0x01};
static unsigned char key[KEY_LEN];
static char identity[64];
static const char *prog = "dunix-relay";

static void die(const char *what)
{
    fprintf(stderr, "%s: %s: %s\n", prog, what, strerror(errno));
    exit(EXIT_FAIL);
}

static void tls_fail(const char *what)
{
    fprintf(stderr, "%s: %s: ", prog, what);
    ERR_print_errors_fp(stderr);
    fputc('\n', stderr);
}

static SSL_SESSION *psk_session(SSL *ssl)
{
    const SSL_CIPHER *cipher = SSL_CIPHER_find(ssl, TLS13_AES128GCM);
    SSL_SESSION *sess = SSL_SESSION_new();
    if (cipher == NULL || sess == NULL || !SSL_SESSION_set1_master_key(sess, key, KEY_LEN) ||
        !SSL_SESSION_set_cipher(sess, cipher) ||
        !SSL_SESSION_set_protocol_version(sess, TLS1_3_VERSION)) {
        SSL_SESSION_free(sess);
        return NULL;
    }
    return sess;
}

static int use_psk(SSL *ssl, const EVP_MD *md, const unsigned char **id, size_t *idlen,
                   SSL_SESSION **sessp)
{
    (void)md;
    *sessp = psk_session(ssl);
    *id = (const unsigned char *)identity;
    *idlen = strlen(identity);
    return *sessp != NULL;
}

static int find_psk(SSL *ssl, const unsigned char *id, size_t idlen, SSL_SESSION **sessp)
{
    *sessp = NULL; /* an unknown identity: no session, the handshake fails */
    if (idlen == strlen(identity) && memcmp(id, identity, idlen) == 0)
        *sessp = psk_session(ssl);
    return 1;
}

static SSL_CTX *context(int server)
{
    SSL_CTX *ctx = SSL_CTX_new(server ? TLS_server_method() : TLS_client_method());
    if (ctx == NULL || !SSL_CTX_set_min_proto_version(ctx, TLS1_3_VERSION) ||
        !SSL_CTX_set_ciphersuites(ctx, "TLS_AES_128_GCM_SHA256")) {
        tls_fail("TLS context");
        exit(EXIT_FAIL);
    }
    SSL_CTX_set_num_tickets(ctx, 0);
    SSL_CTX_set_read_ahead(ctx, 1); /* a stranger's junk is read whole: dropped with a FIN */
    if (server)
        SSL_CTX_set_psk_find_session_callback(ctx, find_psk);
    else
        SSL_CTX_set_psk_use_session_callback(ctx, use_psk);
    return ctx;
}

static long long now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Wait until fd has `events` (or an error); -1 forever. Returns revents, 0 on timeout. */
static short wait_fd(int fd, short events, int timeout_ms)
{
    struct pollfd p = {.fd = fd, .events = events};
    for (;;) {
        int n = poll(&p, 1, timeout_ms);
        if (n >= 0)
            return n ? p.revents : 0;
        if (errno != EINTR)
            die("poll");
    }
}

/* Drive one SSL call to completion on a non-blocking socket: >0 done, 0 clean close
 * (close_notify), -1 the connection failed. */
static int ssl_wait(SSL *ssl, int sock, int ret, long long deadline)
{
    int err = SSL_get_error(ssl, ret);
    short events;
    if (err == SSL_ERROR_WANT_READ)
        events = POLLIN;
    else if (err == SSL_ERROR_WANT_WRITE)
        events = POLLOUT;
    else if (err == SSL_ERROR_ZERO_RETURN)
        return 0;
    else
        return -1;
    int timeout = -1;
    if (deadline) {
        long long left = deadline - now_ms();
        if (left <= 0)
            return -1;
        timeout = (int)left;
    }
    if (!wait_fd(sock, events, timeout))
        return -1;
    return 1;
}

static int handshake(SSL *ssl, int sock, int server, long long deadline)
{
    for (;;) {
        int ret = server ? SSL_accept(ssl) : SSL_connect(ssl);
        if (ret == 1)
            return 0;
        if (ssl_wait(ssl, sock, ret, deadline) <= 0)
            return -1;
    }
}

static void tune(int sock)
{
    int size = SOCK_BUF, one = 1;
    if (size > 0) {
        setsockopt(sock, SOL_SOCKET, SO_SNDBUF, &size, sizeof size);
        setsockopt(sock, SOL_SOCKET, SO_RCVBUF, &size, sizeof size);
    }
    setsockopt(sock, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    fcntl(sock, F_SETFL, fcntl(sock, F_GETFL) | O_NONBLOCK);
}

/* Accept until one connection completes the PSK handshake. */
static SSL *accept_peer(SSL_CTX *ctx, int listener, int *sockp)
{
    long long deadline = now_ms() + ACCEPT_TIMEOUT_MS;
    fcntl(listener, F_SETFL, fcntl(listener, F_GETFL) | O_NONBLOCK);
    for (;;) {
        long long left = deadline - now_ms();
        if (left <= 0 || !wait_fd(listener, POLLIN, (int)left)) {
            fprintf(stderr, "%s: no peer connected within %d ms\n", prog, ACCEPT_TIMEOUT_MS);
            exit(EXIT_FAIL);
        }
        int sock = accept4(listener, NULL, NULL, SOCK_CLOEXEC);
        if (sock < 0) {
            if (errno == EAGAIN || errno == EINTR || errno == ECONNABORTED)
                continue;
            die("accept");
        }
        tune(sock);
        SSL *ssl = SSL_new(ctx);
        SSL_set_fd(ssl, sock);
        if (handshake(ssl, sock, 1, deadline) == 0) {
            close(listener);
            *sockp = sock;
            return ssl;
        }
        tls_fail("a connection failed the handshake, dropped");
        SSL_free(ssl);
        close(sock);
    }
}

static SSL *connect_peer(SSL_CTX *ctx, const char *where, int *sockp)
{
    char host[256];
    const char *colon = strrchr(where, ':');
    if (colon == NULL || (size_t)(colon - where) >= sizeof host) {
        fprintf(stderr, "%s: bad address %s\n", prog, where);
        exit(EXIT_USAGE);
    }
    memcpy(host, where, colon - where);
    host[colon - where] = '\0';
    struct addrinfo hints = {.ai_socktype = SOCK_STREAM, .ai_flags = AI_NUMERICHOST}, *ai;
    int rc = getaddrinfo(host, colon + 1, &hints, &ai);
    if (rc != 0) {
        fprintf(stderr, "%s: %s: %s\n", prog, where, gai_strerror(rc));
        exit(EXIT_FAIL);
    }
    int sock = socket(ai->ai_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (sock < 0)
        die("socket");
    int size = SOCK_BUF;
    if (size > 0)
        setsockopt(sock, SOL_SOCKET, SO_RCVBUF, &size, sizeof size); /* before the SYN */
    if (connect(sock, ai->ai_addr, ai->ai_addrlen) < 0)
        die("connect");
    freeaddrinfo(ai);
    tune(sock);
    SSL *ssl = SSL_new(ctx);
    SSL_set_fd(ssl, sock);
    if (handshake(ssl, sock, 0, now_ms() + ACCEPT_TIMEOUT_MS) != 0) {
        tls_fail("handshake");
        exit(EXIT_FAIL);
    }
    *sockp = sock;
    return ssl;
}

/*
 * After the handshake the bytes leave TLS's record layer: both relays derive AES-128-GCM
 * keys from the session (RFC 8446 7.5 exporter, one key per direction) and the data goes
 * as frames of up to FRAME_MAX bytes:
 *
 *   length (4 bytes, big-endian; 0 = the end of the stream) | ciphertext | tag (16 bytes)
 *
 * with the length as additional data and the nonce the exporter's IV xor a frame counter,
 * as TLS 1.3 builds its own (RFC 8446 5.3). Why not TLS records: they hold 16 KiB at most
 * (RFC 8446 5.1), and with OpenSSL each costs a copy into its buffers on the way out and
 * one out of them on the way in; perf on a 0.5-CPU receiving host showed that memmove
 * costing as much as the decryption. Here the sender reads the pipe into the frame it
 * writes to the socket and encrypts it there, and the receiver decrypts in place in
 * the buffer it writes to the pipe: one write() per pipe read, 64 KiB GSO packets as
 * iperf3's, and only authenticated bytes reach the pipe (a frame is written after its
 * tag checked). The end is a frame too, so a connection cut short is never taken for EOF;
 * the receiver's one answer (an empty frame under its own key, after it wrote all and
 * closed its pipe) is what lets the sender exit 0. Frame size: measured on 0.5-CPU hosts
 * (1 GiB dd | dd, A/B in one cluster, busy 2-core machine), 256 KiB frames carried less
 * than OpenSSL's records (~445 against ~480 MB/s: the sending host spent more), 1 MiB
 * frames with a receiver that drains the socket first 478-564.
 */
#define FRAME_MAX (1024 * 1024) /* the pipe's size: one read of a full pipe, one frame */
#define HEAD 4
#define TAG 16
#define IV_LEN 12
#define RECV_FRAMES 2 /* the receiver reads up to this many whole frames at once */

struct aead {
    EVP_CIPHER_CTX *ctx;
    unsigned char iv[IV_LEN];
    unsigned long long seq;
};

/* The keys of one direction; 0, or -1 if TLS would not export them. */
static int aead_init(struct aead *a, SSL *ssl, const char *label, int encrypt)
{
    unsigned char km[16 + IV_LEN];
    if (SSL_has_pending(ssl)) /* nothing follows the handshake before the first frame */
        return -1;
    if (SSL_export_keying_material(ssl, km, sizeof km, label, strlen(label), NULL, 0, 0) != 1)
        return -1;
    memcpy(a->iv, km + 16, IV_LEN);
    a->seq = 0;
    a->ctx = EVP_CIPHER_CTX_new();
    int ok = a->ctx != NULL &&
             (encrypt ? EVP_EncryptInit_ex(a->ctx, EVP_aes_128_gcm(), NULL, km, NULL)
                      : EVP_DecryptInit_ex(a->ctx, EVP_aes_128_gcm(), NULL, km, NULL));
    OPENSSL_cleanse(km, sizeof km);
    return ok ? 0 : -1;
}

static void aead_nonce(struct aead *a, unsigned char *nonce)
{
    memcpy(nonce, a->iv, IV_LEN);
    for (int i = 0; i < 8; i++)
        nonce[IV_LEN - 1 - i] ^= (unsigned char)(a->seq >> (8 * i));
    a->seq++;
}

/* Seal len bytes of in into frame: header, ciphertext, tag; returns the frame's size. */
static size_t seal(struct aead *a, const char *in, size_t len, unsigned char *frame)
{
    unsigned char nonce[IV_LEN];
    int outl;
    aead_nonce(a, nonce);
    frame[0] = (unsigned char)(len >> 24);
    frame[1] = (unsigned char)(len >> 16);
    frame[2] = (unsigned char)(len >> 8);
    frame[3] = (unsigned char)len;
    if (!EVP_EncryptInit_ex(a->ctx, NULL, NULL, NULL, nonce) ||
        !EVP_EncryptUpdate(a->ctx, NULL, &outl, frame, HEAD) ||
        (len && !EVP_EncryptUpdate(a->ctx, frame + HEAD, &outl, (const unsigned char *)in,
                                   (int)len)) ||
        !EVP_EncryptFinal_ex(a->ctx, frame + HEAD + len, &outl) ||
        !EVP_CIPHER_CTX_ctrl(a->ctx, EVP_CTRL_GCM_GET_TAG, TAG, frame + HEAD + len)) {
        tls_fail("encrypting");
        exit(EXIT_FAIL);
    }
    return HEAD + len + TAG;
}

/* Open a whole frame in place (its payload stays at frame + HEAD); 0, or -1 if forged. */
static int open_frame(struct aead *a, unsigned char *frame, size_t len)
{
    unsigned char nonce[IV_LEN];
    int outl;
    aead_nonce(a, nonce);
    return EVP_DecryptInit_ex(a->ctx, NULL, NULL, NULL, nonce) &&
                   EVP_DecryptUpdate(a->ctx, NULL, &outl, frame, HEAD) &&
                   (!len || EVP_DecryptUpdate(a->ctx, frame + HEAD, &outl, frame + HEAD,
                                              (int)len)) &&
                   EVP_CIPHER_CTX_ctrl(a->ctx, EVP_CTRL_GCM_SET_TAG, TAG, frame + HEAD + len) &&
                   EVP_DecryptFinal_ex(a->ctx, frame + HEAD + len, &outl) == 1
               ? 0
               : -1;
}

static size_t frame_len(const unsigned char *head)
{
    return (size_t)head[0] << 24 | (size_t)head[1] << 16 | (size_t)head[2] << 8 | head[3];
}

/* Write all of data to the non-blocking socket or pipe; 0, or -1 once its far end (the
 * receiver, the pipe's reader) is gone. */
static int write_all(int fd, const void *data, size_t len)
{
    const char *buf = data;
    while (len) {
        ssize_t n = write(fd, buf, len);
        if (n > 0) {
            buf += n;
            len -= (size_t)n;
            continue;
        }
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && errno == EAGAIN) {
            if (!(wait_fd(fd, POLLOUT, -1) & POLLOUT)) /* POLLERR: no reader any more */
                return -1;
            continue;
        }
        return -1; /* EPIPE, ECONNRESET */
    }
    return 0;
}

/* Read exactly len bytes from the non-blocking socket; 0, or -1 at EOF or failure. */
static int sock_read_all(int sock, unsigned char *buf, size_t len)
{
    while (len) {
        ssize_t n = read(sock, buf, len);
        if (n > 0) {
            buf += n;
            len -= (size_t)n;
            continue;
        }
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && errno == EAGAIN) {
            wait_fd(sock, POLLIN, -1);
            continue;
        }
        return -1;
    }
    return 0;
}

/* SIGUSR1 to the sender: end the stream after what it read (the agent re-points it) */
static volatile sig_atomic_t finish_now;

static void on_finish(int sig)
{
    (void)sig;
    finish_now = 1;
}

static const char LABEL_DATA[] = "EXPORTER-dunix-relay data";
static const char LABEL_DONE[] = "EXPORTER-dunix-relay done";

static int run_send(int fd, int listener)
{
    SSL_CTX *ctx = context(1);
    int sock;
    SSL *ssl = accept_peer(ctx, listener, &sock);
    struct aead data, done;
    if (aead_init(&data, ssl, LABEL_DATA, 1) < 0 || aead_init(&done, ssl, LABEL_DONE, 0) < 0) {
        tls_fail("exporting keys");
        return EXIT_FAIL;
    }
    SSL_free(ssl); /* TLS's part is over; the socket stays */
    unsigned char *frame = malloc(HEAD + FRAME_MAX + TAG);
    char *buf = (char *)frame + HEAD; /* read into the frame, sealed in place */
    if (frame == NULL)
        die("malloc");
    while (!finish_now) {
        ssize_t n = read(fd, buf, FRAME_MAX);
        if (n > 0) {
            if (write_all(sock, frame, seal(&data, buf, (size_t)n, frame)) < 0)
                return EXIT_PEER_GONE;
            continue;
        }
        if (n == 0)
            break;
        if (errno == EINTR)
            continue;
        if (errno != EAGAIN) {
            fprintf(stderr, "%s: reading fd %d: %s; taken as EOF\n", prog, fd, strerror(errno));
            break;
        }
        struct pollfd p[2] = {{.fd = fd, .events = POLLIN}, {.fd = sock, .events = POLLIN}};
        if (poll(p, 2, -1) < 0 && errno != EINTR)
            die("poll");
        if (p[1].revents)
            return EXIT_PEER_GONE; /* the receiver says nothing before the end: it hung up */
    }
    /* EOF: the end frame, then wait until the receiver has written all and says so */
    close(fd);
    if (write_all(sock, frame, seal(&data, NULL, 0, frame)) < 0)
        return EXIT_PEER_GONE;
    unsigned char answer[HEAD + TAG];
    if (sock_read_all(sock, answer, sizeof answer) < 0 || frame_len(answer) != 0 ||
        open_frame(&done, answer, 0) < 0)
        return EXIT_PEER_GONE; /* it hung up without its answer: not all written */
    return 0;
}

static int run_recv(int fd, const char *where)
{
    SSL_CTX *ctx = context(0);
    int sock;
    SSL *ssl = connect_peer(ctx, where, &sock);
    struct aead data, done;
    if (aead_init(&data, ssl, LABEL_DATA, 0) < 0 || aead_init(&done, ssl, LABEL_DONE, 1) < 0) {
        tls_fail("exporting keys");
        return EXIT_FAIL;
    }
    SSL_free(ssl);
    /* the socket is read as far as it has data (up to RECV_FRAMES whole frames), then
     * every whole frame is opened in place and written out */
    const size_t frame_max = HEAD + FRAME_MAX + TAG, cap = RECV_FRAMES * frame_max;
    unsigned char *buf = malloc(cap);
    if (buf == NULL)
        die("malloc");
    size_t start = 0, have = 0; /* bytes not yet handled: buf[start, start + have) */
    int status = -1;
    while (status < 0) {
        while (status < 0 && have >= HEAD) {
            unsigned char *frame = buf + start;
            size_t len = frame_len(frame);
            if (len > FRAME_MAX) {
                fprintf(stderr, "%s: a frame of %zu bytes: not from our sender\n", prog, len);
                status = EXIT_FAIL;
            } else if (have < HEAD + len + TAG) {
                break;
            } else if (open_frame(&data, frame, len) < 0) {
                fprintf(stderr, "%s: a frame failed authentication\n", prog);
                status = EXIT_FAIL;
            } else if (len == 0) {
                status = 0;
            } else if (write_all(fd, frame + HEAD, len) < 0) {
                status = EXIT_BROKEN;
            } else {
                start += HEAD + len + TAG;
                have -= HEAD + len + TAG;
            }
        }
        if (status >= 0)
            break;
        if (cap - start - have < frame_max) { /* room for a whole frame at the end */
            memmove(buf, buf + start, have);
            start = 0;
        }
        ssize_t n = read(sock, buf + start + have, cap - start - have);
        if (n > 0) {
            have += (size_t)n;
            /* more may be there: read on before writing, as long as a frame fits */
            while (cap - start - have >= frame_max) {
                n = read(sock, buf + start + have, cap - start - have);
                if (n <= 0)
                    break;
                have += (size_t)n;
            }
            continue;
        }
        if (n == 0 || (errno != EAGAIN && errno != EINTR)) {
            fprintf(stderr, "%s: connection lost before the end\n", prog);
            status = EXIT_FAIL;
            break;
        }
        if (errno == EINTR)
            continue;
        /* nothing to read: wait for data, or for our reader to go away (POLLERR) */
        struct pollfd p[2] = {{.fd = sock, .events = POLLIN}, {.fd = fd, .events = 0}};
        if (poll(p, 2, -1) < 0 && errno != EINTR)
            die("poll");
        if (p[1].revents & (POLLERR | POLLHUP))
            status = EXIT_BROKEN;
    }
    close(fd); /* the reader sees EOF (or is gone) before the sender hears of it */
    if (status == 0) {
        unsigned char answer[HEAD + TAG];
        seal(&done, NULL, 0, answer);
        (void)write_all(sock, answer, sizeof answer);
    }
    close(sock);
    return status;
}

static int read_key(void)
{
    char hex[2 * KEY_LEN + 2];
    size_t have = 0;
    while (have < 2 * KEY_LEN) {
        ssize_t n = read(0, hex + have, 2 * KEY_LEN - have);
        if (n <= 0)
            return -1;
        have += (size_t)n;
    }
    hex[have] = '\0';
    for (int i = 0; i < KEY_LEN; i++) {
        unsigned v;
        if (sscanf(hex + 2 * i, "%2x", &v) != 1)
            return -1;
        key[i] = (unsigned char)v;
    }
    return 0;
}

static void usage(void)
{
    fprintf(stderr, "usage: %s send --fd N --listen L --id STREAM\n"
                    "       %s recv --fd N --connect HOST:PORT --id STREAM\n"
                    "(the key: 64 hex digits on stdin)\n",
            prog, prog);
    exit(EXIT_USAGE);
}

int main(int argc, char **argv)
{
    if (argc < 2)
        usage();
    int sending = strcmp(argv[1], "send") == 0;
    if (!sending && strcmp(argv[1], "recv") != 0)
        usage();
    int fd = -1, listener = -1;
    const char *where = NULL, *id = NULL;
    for (int i = 2; i + 1 < argc; i += 2) {
        if (strcmp(argv[i], "--fd") == 0)
            fd = atoi(argv[i + 1]);
        else if (strcmp(argv[i], "--listen") == 0)
            listener = atoi(argv[i + 1]);
        else if (strcmp(argv[i], "--connect") == 0)
            where = argv[i + 1];
        else if (strcmp(argv[i], "--id") == 0)
            id = argv[i + 1];
        else
            usage();
    }
    if (fd < 0 || id == NULL || (sending ? listener < 0 : where == NULL))
        usage();
    snprintf(identity, sizeof identity, "dunix-stream-%s", id);
    /* the agent that started us owns the stream: never outlive it */
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    signal(SIGPIPE, SIG_IGN);
    struct sigaction finish = {.sa_handler = on_finish}; /* no SA_RESTART: poll returns */
    sigaction(SIGUSR1, &finish, NULL);
    if (read_key() < 0) {
        fprintf(stderr, "%s: no key on stdin\n", prog);
        return EXIT_USAGE;
    }
    return sending ? run_send(fd, listener) : run_recv(fd, where);
}
