/* The connection to strongroomd: one Unix socket shared by every thread.
 *
 * Requests are pipelined: a thread writes its frame (under the lock) and
 * waits for the answer with its id. Whoever finds nobody reading becomes the
 * reader (leader/follower): it reads frames without the lock and hands each
 * to the thread waiting for that id. A broken connection fails every request
 * in flight with CKR_DEVICE_ERROR; the next request connects again and logs
 * in again with the API key it keeps, so a restarted daemon is picked up.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include "sr.h"

#define MAX_FRAME (64u * 1024 * 1024)

struct pending {
    uint64_t id;
    int done;
    CK_RV rv;
    char *buf;
    size_t len;
    struct pending *next;
};

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cond = PTHREAD_COND_INITIALIZER;
static int fd = -1;
static int reading;
static uint64_t next_id;
static struct pending *waiting;
static char *api_key; /* kept to log in again after a reconnect */
static size_t api_key_len;
static unsigned generation;
static int reader_fd = -1;
static int stale_fd = -1; /* dropped while a reader was on it: the reader closes it */

/* ---------------------------------------------------------------- bodies */

void sr_body_init(sr_body *b) {
    msgpack_sbuffer_init(&b->sb);
    msgpack_packer_init(&b->pk, &b->sb, msgpack_sbuffer_write);
}
void sr_body_free(sr_body *b) { msgpack_sbuffer_destroy(&b->sb); }
void sr_map(sr_body *b, size_t n) { msgpack_pack_map(&b->pk, n); }
void sr_strn(sr_body *b, const char *s, size_t n) {
    msgpack_pack_str(&b->pk, n);
    msgpack_pack_str_body(&b->pk, s, n);
}
void sr_str(sr_body *b, const char *s) { sr_strn(b, s, strlen(s)); }
void sr_bin(sr_body *b, const void *p, size_t n) {
    msgpack_pack_bin(&b->pk, n);
    msgpack_pack_bin_body(&b->pk, p, n);
}
void sr_int(sr_body *b, int64_t v) { msgpack_pack_int64(&b->pk, v); }
void sr_bool(sr_body *b, int v) {
    if (v)
        msgpack_pack_true(&b->pk);
    else
        msgpack_pack_false(&b->pk);
}
void sr_kv_str(sr_body *b, const char *k, const char *v) {
    sr_str(b, k);
    sr_str(b, v);
}
void sr_kv_bin(sr_body *b, const char *k, const void *p, size_t n) {
    sr_str(b, k);
    sr_bin(b, p, n);
}
void sr_kv_int(sr_body *b, const char *k, int64_t v) {
    sr_str(b, k);
    sr_int(b, v);
}

/* ------------------------------------------------------------- responses */

void sr_resp_free(sr_resp *r) {
    msgpack_unpacked_destroy(&r->up);
    free(r->raw);
    r->raw = NULL;
    r->body = NULL;
}

static int key_is(const msgpack_object *k, const char *key) {
    size_t n = strlen(key);
    return k->type == MSGPACK_OBJECT_STR && k->via.str.size == n && memcmp(k->via.str.ptr, key, n) == 0;
}

const msgpack_object *sr_get(const msgpack_object *map, const char *key) {
    if (!map || map->type != MSGPACK_OBJECT_MAP)
        return NULL;
    for (uint32_t i = 0; i < map->via.map.size; i++)
        if (key_is(&map->via.map.ptr[i].key, key))
            return &map->via.map.ptr[i].val;
    return NULL;
}

int sr_get_str(const msgpack_object *map, const char *key, const char **p, size_t *n) {
    const msgpack_object *o = sr_get(map, key);
    if (!o || o->type != MSGPACK_OBJECT_STR)
        return -1;
    *p = o->via.str.ptr;
    *n = o->via.str.size;
    return 0;
}

int sr_get_bin(const msgpack_object *map, const char *key, const unsigned char **p, size_t *n) {
    const msgpack_object *o = sr_get(map, key);
    if (!o || o->type != MSGPACK_OBJECT_BIN)
        return -1;
    *p = (const unsigned char *)o->via.bin.ptr;
    *n = o->via.bin.size;
    return 0;
}

int sr_get_bool(const msgpack_object *map, const char *key, int dflt) {
    const msgpack_object *o = sr_get(map, key);
    if (!o || o->type != MSGPACK_OBJECT_BOOLEAN)
        return dflt;
    return o->via.boolean;
}

int64_t sr_get_int(const msgpack_object *map, const char *key, int64_t dflt) {
    const msgpack_object *o = sr_get(map, key);
    if (!o)
        return dflt;
    if (o->type == MSGPACK_OBJECT_POSITIVE_INTEGER)
        return (int64_t)o->via.u64;
    if (o->type == MSGPACK_OBJECT_NEGATIVE_INTEGER)
        return o->via.i64;
    return dflt;
}

/* ------------------------------------------------------------------ I/O */

static int write_all(int s, const char *p, size_t n) {
    while (n) {
        ssize_t w = send(s, p, n, MSG_NOSIGNAL);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

static int read_all(int s, char *p, size_t n, int timeout_ms) {
    while (n) {
        struct pollfd pf = {.fd = s, .events = POLLIN};
        int r = poll(&pf, 1, timeout_ms);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            return -1;
        ssize_t got = recv(s, p, n, 0);
        if (got < 0 && errno == EINTR)
            continue;
        if (got <= 0)
            return -1;
        p += got;
        n -= (size_t)got;
    }
    return 0;
}

static int read_frame(int s, char **buf, size_t *len) {
    unsigned char h[4];
    if (read_all(s, (char *)h, 4, sr_cfg.timeout_ms))
        return -1;
    uint32_t n = ((uint32_t)h[0] << 24) | ((uint32_t)h[1] << 16) | ((uint32_t)h[2] << 8) | h[3];
    if (n > MAX_FRAME)
        return -1;
    char *p = malloc(n ? n : 1);
    if (!p)
        return -1;
    if (read_all(s, p, n, sr_cfg.timeout_ms)) {
        free(p);
        return -1;
    }
    *buf = p;
    *len = n;
    return 0;
}

/* One request as a frame: the body is packed already and appended as is. */
static void build_frame(msgpack_sbuffer *out, uint64_t id, const char *method, const char *path,
                        sr_body *body) {
    msgpack_packer pk;
    msgpack_sbuffer_init(out);
    msgpack_sbuffer_write(out, "\0\0\0\0", 4);
    msgpack_packer_init(&pk, out, msgpack_sbuffer_write);
    msgpack_pack_map(&pk, 4);
    msgpack_pack_str(&pk, 2);
    msgpack_pack_str_body(&pk, "id", 2);
    msgpack_pack_uint64(&pk, id);
    msgpack_pack_str(&pk, 6);
    msgpack_pack_str_body(&pk, "method", 6);
    msgpack_pack_str(&pk, strlen(method));
    msgpack_pack_str_body(&pk, method, strlen(method));
    msgpack_pack_str(&pk, 4);
    msgpack_pack_str_body(&pk, "path", 4);
    msgpack_pack_str(&pk, strlen(path));
    msgpack_pack_str_body(&pk, path, strlen(path));
    msgpack_pack_str(&pk, 4);
    msgpack_pack_str_body(&pk, "body", 4);
    if (body && body->sb.size)
        msgpack_sbuffer_write(out, body->sb.data, body->sb.size);
    else
        msgpack_pack_nil(&pk);
    uint32_t n = (uint32_t)(out->size - 4);
    out->data[0] = (char)(n >> 24);
    out->data[1] = (char)(n >> 16);
    out->data[2] = (char)(n >> 8);
    out->data[3] = (char)n;
}

static int frame_id(const char *buf, size_t len, uint64_t *id) {
    /* Parse the whole map; responses are small next to the work they stand for. */
    msgpack_unpacked up;
    size_t off = 0;
    int ok = -1;
    msgpack_unpacked_init(&up);
    if (msgpack_unpack_next(&up, buf, len, &off) == MSGPACK_UNPACK_SUCCESS) {
        const msgpack_object *o = sr_get(&up.data, "id");
        if (o && o->type == MSGPACK_OBJECT_POSITIVE_INTEGER) {
            *id = o->via.u64;
            ok = 0;
        }
    }
    msgpack_unpacked_destroy(&up);
    return ok;
}

static CK_RV decode_resp(char *buf, size_t len, sr_resp *out) {
    size_t off = 0;
    memset(out, 0, sizeof *out);
    msgpack_unpacked_init(&out->up);
    out->raw = buf;
    if (msgpack_unpack_next(&out->up, buf, len, &off) != MSGPACK_UNPACK_SUCCESS ||
        out->up.data.type != MSGPACK_OBJECT_MAP) {
        sr_resp_free(out);
        return CKR_DEVICE_ERROR;
    }
    out->status = (int)sr_get_int(&out->up.data, "status", 500);
    const msgpack_object *b = sr_get(&out->up.data, "body");
    out->body = (msgpack_object *)b;
    if (out->status >= 400 && b) {
        const char *e;
        size_t n;
        if (sr_get_str(b, "error", &e, &n) == 0) {
            if (n >= sizeof out->error)
                n = sizeof out->error - 1;
            memcpy(out->error, e, n);
            out->error[n] = 0;
        }
    }
    return CKR_OK;
}

/* Fail everything in flight; caller holds the lock. */
static void drop_connection(void) {
    if (fd >= 0) {
        if (reading && reader_fd == fd) {
            /* Never close under a reader: the number could be reused. */
            shutdown(fd, SHUT_RDWR);
            stale_fd = fd;
        } else {
            close(fd);
        }
    }
    fd = -1;
    for (struct pending *p = waiting; p; p = p->next)
        if (!p->done) {
            p->done = 1;
            p->rv = CKR_DEVICE_ERROR;
        }
    pthread_cond_broadcast(&cond);
}

/* Synchronous exchange on a fresh connection (nothing else in flight). */
static int sync_call(const char *method, const char *path, sr_body *body, sr_resp *out) {
    msgpack_sbuffer f;
    char *buf;
    size_t len;
    uint64_t id = ++next_id, got;
    build_frame(&f, id, method, path, body);
    int bad = write_all(fd, f.data, f.size);
    msgpack_sbuffer_destroy(&f);
    if (bad || read_frame(fd, &buf, &len))
        return -1;
    if (frame_id(buf, len, &got) || got != id) {
        free(buf);
        return -1;
    }
    return decode_resp(buf, len, out) == CKR_OK ? 0 : -1;
}

static void auth_body(sr_body *b, const char *key, size_t len) {
    sr_body_init(b);
    sr_map(b, 1);
    sr_str(b, "api_key");
    sr_strn(b, key, len);
}

/* Connect (and log in again); caller holds the lock. */
static CK_RV ensure_connected(void) {
    if (fd >= 0)
        return CKR_OK;
    int s = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (s < 0)
        return CKR_DEVICE_ERROR;
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    if (strlen(sr_cfg.socket) >= sizeof sa.sun_path) {
        close(s);
        return CKR_DEVICE_ERROR;
    }
    strcpy(sa.sun_path, sr_cfg.socket);
    if (connect(s, (struct sockaddr *)&sa, sizeof sa) < 0) {
        close(s);
        return CKR_DEVICE_ERROR;
    }
    fd = s;
    generation++;
    if (api_key) {
        sr_body b;
        sr_resp r;
        auth_body(&b, api_key, api_key_len);
        int bad = sync_call("POST", "/sys/v1/session/auth", &b, &r);
        sr_body_free(&b);
        if (bad) {
            drop_connection();
            return CKR_DEVICE_ERROR;
        }
        int status = r.status;
        sr_resp_free(&r);
        if (status != 200) {
            /* The key was revoked meanwhile: stay connected, logged out. */
            free(api_key);
            api_key = NULL;
            return CKR_USER_NOT_LOGGED_IN;
        }
    }
    return CKR_OK;
}

CK_RV sr_call(const char *method, const char *path, sr_body *body, sr_resp *out) {
    struct pending me = {0};
    msgpack_sbuffer f;
    CK_RV rv;

    pthread_mutex_lock(&lock);
    rv = ensure_connected();
    if (rv != CKR_OK) {
        pthread_mutex_unlock(&lock);
        return rv;
    }
    me.id = ++next_id;
    build_frame(&f, me.id, method, path, body);
    if (write_all(fd, f.data, f.size)) {
        msgpack_sbuffer_destroy(&f);
        drop_connection();
        pthread_mutex_unlock(&lock);
        return CKR_DEVICE_ERROR;
    }
    msgpack_sbuffer_destroy(&f);
    me.next = waiting;
    waiting = &me;
    while (!me.done) {
        if (!reading) {
            int s = fd;
            char *buf = NULL;
            size_t len = 0;
            uint64_t id;
            reading = 1;
            reader_fd = s;
            pthread_mutex_unlock(&lock);
            int bad = read_frame(s, &buf, &len);
            pthread_mutex_lock(&lock);
            reading = 0;
            reader_fd = -1;
            if (s == stale_fd) {
                close(s);
                stale_fd = -1;
                if (!bad)
                    free(buf);
            } else if (bad) {
                if (fd == s)
                    drop_connection();
            } else if (frame_id(buf, len, &id) == 0) {
                struct pending *p;
                for (p = waiting; p && p->id != id; p = p->next)
                    ;
                if (p && !p->done) {
                    p->done = 1;
                    p->rv = CKR_OK;
                    p->buf = buf;
                    p->len = len;
                    buf = NULL;
                }
                free(buf);
            } else {
                free(buf);
            }
            pthread_cond_broadcast(&cond);
        } else {
            pthread_cond_wait(&cond, &lock);
        }
    }
    for (struct pending **pp = &waiting; *pp; pp = &(*pp)->next)
        if (*pp == &me) {
            *pp = me.next;
            break;
        }
    /* Wake a waiter to take over reading. */
    pthread_cond_broadcast(&cond);
    pthread_mutex_unlock(&lock);
    if (me.rv != CKR_OK)
        return me.rv;
    return decode_resp(me.buf, me.len, out);
}

CK_RV sr_conn_login(const char *key, size_t len, sr_resp *out) {
    sr_body b;
    auth_body(&b, key, len);
    CK_RV rv = sr_call("POST", "/sys/v1/session/auth", &b, out);
    sr_body_free(&b);
    if (rv == CKR_OK && out->status == 200) {
        pthread_mutex_lock(&lock);
        free(api_key);
        api_key = malloc(len + 1);
        if (api_key) {
            memcpy(api_key, key, len);
            api_key[len] = 0;
            api_key_len = len;
        }
        pthread_mutex_unlock(&lock);
    }
    return rv;
}

void sr_conn_logout(void) {
    sr_resp r;
    pthread_mutex_lock(&lock);
    int had = api_key != NULL;
    if (api_key) {
        memset(api_key, 0, api_key_len);
        free(api_key);
    }
    api_key = NULL;
    pthread_mutex_unlock(&lock);
    if (had && sr_call("POST", "/sys/v1/session/terminate", NULL, &r) == CKR_OK)
        sr_resp_free(&r);
}

int sr_conn_logged_in(void) {
    pthread_mutex_lock(&lock);
    int v = api_key != NULL;
    pthread_mutex_unlock(&lock);
    return v;
}

unsigned sr_conn_generation(void) {
    pthread_mutex_lock(&lock);
    unsigned g = generation;
    pthread_mutex_unlock(&lock);
    return g;
}

void sr_conn_init(void) {}

void sr_conn_close(void) {
    pthread_mutex_lock(&lock);
    drop_connection();
    if (api_key) {
        memset(api_key, 0, api_key_len);
        free(api_key);
    }
    api_key = NULL;
    pthread_mutex_unlock(&lock);
}

/* In a forked child: the parent's threads and their requests do not exist
 * here, and the socket is the parent's. Forget both (never write on it). */
void sr_conn_after_fork_child(void) {
    pthread_mutex_init(&lock, NULL);
    pthread_cond_init(&cond, NULL);
    if (fd >= 0)
        close(fd);
    if (stale_fd >= 0 && stale_fd != fd) /* its reader was a parent's thread */
        close(stale_fd);
    fd = stale_fd = reader_fd = -1;
    reading = 0;
    waiting = NULL;
    if (api_key) {
        memset(api_key, 0, api_key_len);
        free(api_key);
    }
    api_key = NULL;
}
