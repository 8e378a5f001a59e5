/*
 * dunix-relay: one relayed pipe stream's bytes between two hosts, native.
 *
 * The agents' Python relay (dunix/fdmove/relay.py) costs ~1.5 ms of CPU per MB on each
 * side (trio's TLS loops, msgpack, five user-space copies); on 0.5-CPU hosts that held a
 * cross-host pipe to a quarter of iperf3. A stream that has carried enough is handed to
 * this program instead: the sending agent starts `dunix-relay send`, the receiving one
 * `dunix-relay recv`, and the bytes go read(pipe) -> SSL_write, SSL_read -> write(pipe)
 * on a TCP connection of their own.
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
 *   - EOF: the sender sends close_notify at its pipe's EOF; the receiver writes everything,
 *     closes its pipe (its reader sees EOF), then closes the connection; the sender exits
 *     only after that, so whatever the agent says after the sender's exit comes after the
 *     bytes are in the far pipe.
 *   - a far reader gone (EPIPE, or POLLERR on the pipe while idle): the receiver closes
 *     the connection; the sender sees it (also while its pipe is idle) and exits 3; the
 *     agent closes its copy of the pipe and the local writer gets EPIPE/SIGPIPE.
 * Exit: 0 done (EOF delivered), 3 the far side went away, 4 (recv) the local reader went
 * away, 1 failure (handshake, connection lost without close_notify), 2 usage.
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
#include <openssl/ssl.h>

#define BUF_SIZE (1024 * 1024)
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
    SSL_CTX_set_read_ahead(ctx, 1);
    SSL_CTX_set_default_read_buffer_len(ctx, 256 * 1024);
    SSL_CTX_set_mode(ctx, SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
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

/* Write all of buf to the socket; 0, or -1 if the connection failed. */
static int ssl_write_all(SSL *ssl, int sock, const char *buf, size_t len)
{
    while (len) {
        size_t done = 0;
        int ret = SSL_write_ex(ssl, buf, len, &done);
        if (ret == 1) {
            buf += done;
            len -= done;
            continue;
        }
        if (ssl_wait(ssl, sock, ret, 0) <= 0)
            return -1;
    }
    return 0;
}

/* The far side said nothing but may have closed: is the connection over? */
static int peer_closed(SSL *ssl, int sock)
{
    char byte;
    size_t got;
    int ret = SSL_read_ex(ssl, &byte, 1, &got);
    (void)sock;
    if (ret == 1)
        return 0; /* unexpected data; ignored */
    int err = SSL_get_error(ssl, ret);
    return err != SSL_ERROR_WANT_READ && err != SSL_ERROR_WANT_WRITE;
}

static int run_send(int fd, int listener)
{
    SSL_CTX *ctx = context(1);
    int sock;
    SSL *ssl = accept_peer(ctx, listener, &sock);
    char *buf = malloc(BUF_SIZE);
    if (buf == NULL)
        die("malloc");
    for (;;) {
        ssize_t n = read(fd, buf, BUF_SIZE);
        if (n > 0) {
            if (ssl_write_all(ssl, sock, buf, (size_t)n) < 0)
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
        if (p[1].revents && peer_closed(ssl, sock))
            return EXIT_PEER_GONE;
    }
    /* EOF: close_notify, then wait until the receiver has written all and hung up */
    close(fd);
    int ret;
    while ((ret = SSL_shutdown(ssl)) < 0)
        if (ssl_wait(ssl, sock, ret, 0) <= 0)
            return EXIT_PEER_GONE;
    for (;;) {
        char drain[256];
        size_t got;
        ret = SSL_read_ex(ssl, drain, sizeof drain, &got);
        if (ret == 1)
            continue;
        int w = ssl_wait(ssl, sock, ret, 0);
        if (w == 0)
            return 0; /* the receiver's close_notify: everything is written */
        if (w < 0)
            return EXIT_PEER_GONE; /* it hung up without its close_notify: not all written */
    }
}

/* Write all of buf into the pipe; 0, or -1 when its reader went away. */
static int pipe_write_all(int fd, const char *buf, size_t len)
{
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
            short ev = wait_fd(fd, POLLOUT, -1);
            if (ev & POLLERR)
                return -1;
            continue;
        }
        return -1; /* EPIPE and the like */
    }
    return 0;
}

static int run_recv(int fd, const char *where)
{
    SSL_CTX *ctx = context(0);
    int sock;
    SSL *ssl = connect_peer(ctx, where, &sock);
    char *buf = malloc(BUF_SIZE);
    if (buf == NULL)
        die("malloc");
    int status = -1;
    while (status < 0) {
        size_t have = 0;
        int ret = 1;
        /* as much as TLS has now (one record per call), up to the buffer */
        while (have < BUF_SIZE) {
            size_t got = 0;
            ret = SSL_read_ex(ssl, buf + have, BUF_SIZE - have, &got);
            if (ret != 1)
                break;
            have += got;
        }
        if (have && pipe_write_all(fd, buf, have) < 0) {
            status = EXIT_BROKEN;
            break;
        }
        if (ret == 1)
            continue;
        int err = SSL_get_error(ssl, ret);
        if (err == SSL_ERROR_ZERO_RETURN) {
            status = 0;
            break;
        }
        if (err != SSL_ERROR_WANT_READ && err != SSL_ERROR_WANT_WRITE) {
            fprintf(stderr, "%s: connection lost before the end\n", prog);
            status = EXIT_FAIL;
            break;
        }
        /* nothing to read: wait for data, or for our reader to go away (POLLERR) */
        struct pollfd p[2] = {{.fd = sock, .events = err == SSL_ERROR_WANT_READ ? POLLIN : POLLOUT},
                              {.fd = fd, .events = 0}};
        if (poll(p, 2, -1) < 0 && errno != EINTR)
            die("poll");
        if (p[1].revents & (POLLERR | POLLHUP))
            status = EXIT_BROKEN;
    }
    close(fd); /* the reader sees EOF (or is gone) before the sender hears of it */
    if (status == 0) {
        int ret;
        while ((ret = SSL_shutdown(ssl)) < 0)
            if (ssl_wait(ssl, sock, ret, now_ms() + 1000) <= 0)
                break;
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
    if (read_key() < 0) {
        fprintf(stderr, "%s: no key on stdin\n", prog);
        return EXIT_USAGE;
    }
    return sending ? run_send(fd, listener) : run_recv(fd, where);
}
