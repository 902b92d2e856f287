/* libstrongroom-pkcs11: a PKCS#11 v2.40 module whose token is strongroomd.
 *
 * One slot, one token. The PIN is an app's API key; every operation is a
 * request to the daemon, which applies groups, key_ops and audit to it. The
 * module holds no key material: it caches the key list (names, types, public
 * keys) so that finding objects and reading attributes cost no round trip.
 *
 * Locking: g_lock guards sessions and the object table and is never held
 * across a request to the daemon (conn.c has its own lock and pipelines
 * requests from many threads on one connection). Every call on a session
 * starts with session_lock() (or session_check(), op_lock()), which checks
 * initialisation, the handle and the login under g_lock; an operation is
 * copied with its buffers (op_dup) before a request is made without the lock,
 * so a C_Finalize or C_CloseAllSessions in another thread frees nothing that
 * request still reads.
 */
#define _GNU_SOURCE
#include <ctype.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <unistd.h>

#include "sr.h"

#define EXPORT __attribute__((visibility("default")))
#define SLOT_ID 1
#define MAX_SESSIONS 4096
#define MAX_BUFFER (4u * 1024 * 1024)

struct sr_config sr_cfg;

/* ------------------------------------------------------------- key table */

enum { T_NONE, T_AES, T_DES3, T_HMAC, T_SECRET, T_RSA, T_EC, T_CERT };
static const char *TYPE_NAMES[] = {"", "AES", "DES3", "HMAC", "SECRET", "RSA", "EC", "CERTIFICATE"};

enum {
    OP_ENCRYPT = 1 << 0,
    OP_DECRYPT = 1 << 1,
    OP_SIGN = 1 << 2,
    OP_VERIFY = 1 << 3,
    OP_WRAPKEY = 1 << 4,
    OP_UNWRAPKEY = 1 << 5,
    OP_DERIVEKEY = 1 << 6,
    OP_MACGENERATE = 1 << 7,
    OP_MACVERIFY = 1 << 8,
    OP_EXPORT = 1 << 9,
    OP_AGREEKEY = 1 << 10,
    OP_APPMANAGEABLE = 1 << 11,
    OP_HIGHVOLUME = 1 << 12,
};
static const char *OP_NAMES[] = {"ENCRYPT",   "DECRYPT",     "SIGN",       "VERIFY",       "WRAPKEY",
                                 "UNWRAPKEY", "DERIVEKEY",   "MACGENERATE", "MACVERIFY",    "EXPORT",
                                 "AGREEKEY",  "APPMANAGEABLE", "HIGHVOLUME"};
#define N_OPS 13

/* ops each type may hold (mirrors the daemon's ALLOWED_OPS) */
static unsigned allowed_ops(int type) {
    unsigned common = OP_EXPORT | OP_APPMANAGEABLE | OP_HIGHVOLUME;
    switch (type) {
    case T_AES:
        return common | OP_ENCRYPT | OP_DECRYPT | OP_WRAPKEY | OP_UNWRAPKEY | OP_DERIVEKEY |
               OP_MACGENERATE | OP_MACVERIFY;
    case T_DES3:
        return common | OP_ENCRYPT | OP_DECRYPT | OP_WRAPKEY | OP_UNWRAPKEY | OP_DERIVEKEY;
    case T_HMAC:
        return common | OP_MACGENERATE | OP_MACVERIFY | OP_DERIVEKEY;
    case T_SECRET:
        return common | OP_DERIVEKEY;
    case T_RSA:
        return common | OP_SIGN | OP_VERIFY | OP_ENCRYPT | OP_DECRYPT | OP_WRAPKEY | OP_UNWRAPKEY;
    case T_EC:
        return common | OP_SIGN | OP_VERIFY | OP_AGREEKEY | OP_DERIVEKEY;
    }
    return common;
}

struct key {
    char kid[64];
    char name[260];
    int type;
    CK_ULONG bits;
    char curve[16];
    unsigned ops;
    int transient;
    unsigned gen; /* connection generation of a transient key */
    int public_only;
    int present;
    int destroyed; /* deleted through this module: its other objects destroy as no-ops */
    unsigned char *spki;
    size_t spki_len;
    struct sr_pub pub;
    unsigned char *cert; /* a certificate's DER, fetched when first asked for */
    size_t cert_len;
    struct sr_cert c;
};

struct obj {
    int key;
    CK_OBJECT_CLASS cls;
    int destroyed; /* C_DestroyObject was called on this handle */
};

static struct key *keys;
static size_t n_keys, cap_keys;
static struct obj *objs;
static size_t n_objs, cap_objs;

/* ------------------------------------------------------------- sessions */

enum { OPS_ENCRYPT, OPS_DECRYPT, OPS_SIGN, OPS_VERIFY, OPS_DIGEST, N_OPSLOTS };

struct mspec {
    CK_MECHANISM_TYPE mech;
    const char *hash; /* hash_alg / digest alg */
    const char *mode; /* daemon mode string */
    const char *mgf;  /* PSS/OAEP mgf1 hash */
    unsigned char iv[16];
    size_t iv_len;
    unsigned char *aad;
    size_t aad_len;
    CK_ULONG tag_bits;
};

struct op {
    int active;
    struct mspec m;
    CK_OBJECT_HANDLE key;
    unsigned char *buf; /* multi-part input */
    size_t len, cap;
    int multipart;
    unsigned char *in; /* single-part: input of the cached result */
    size_t in_len;
    unsigned char *res; /* result kept after a length query */
    size_t res_len;
    int have_res;
    int res_final; /* the kept result is a Final's (or single-part), not an Update's */
    int stream;    /* multi-part through the daemon's streaming paths */
    int started;   /* the stream's init was sent */
    unsigned char state[64];
    size_t state_len;
};

struct session {
    int used;
    CK_FLAGS flags;
    int finding;
    CK_OBJECT_HANDLE *found;
    size_t n_found, pos;
    struct op ops[N_OPSLOTS];
};

static pthread_mutex_t g_lock = PTHREAD_MUTEX_INITIALIZER;
static int g_init;
static pid_t g_pid;
static struct session *sessions; /* handle = index + 1 */
static size_t n_open;

/* ------------------------------------------------------------- helpers */

static void pad(CK_UTF8CHAR *dst, size_t n, const char *src) {
    size_t l = strlen(src);
    memset(dst, ' ', n);
    memcpy(dst, src, l < n ? l : n);
}

static void op_clear(struct op *o) {
    free(o->buf);
    free(o->in);
    free(o->res);
    free(o->m.aad);
    memset(o, 0, sizeof *o);
}

/* caller holds g_lock; NULL after C_Finalize (sessions is gone) */
static struct session *get_session(CK_SESSION_HANDLE h) {
    if (!sessions || h == 0 || h > MAX_SESSIONS || !sessions[h - 1].used)
        return NULL;
    return &sessions[h - 1];
}

/* caller holds g_lock */
static int initialised(void) { return g_init && g_pid == getpid(); }

static CK_RV check_init(void) {
    pthread_mutex_lock(&g_lock);
    int ok = initialised();
    pthread_mutex_unlock(&g_lock);
    return ok ? CKR_OK : CKR_CRYPTOKI_NOT_INITIALIZED;
}

static CK_RV map_error(const sr_resp *r) {
    const char *e = r->error;
    if (r->status < 400)
        return CKR_OK;
    if (!strcmp(e, "bad_credentials"))
        return CKR_PIN_INCORRECT;
    if (!strcmp(e, "unauthenticated") || !strcmp(e, "token_expired"))
        return CKR_USER_NOT_LOGGED_IN;
    if (!strcmp(e, "key_op_not_permitted") || !strcmp(e, "forbidden"))
        return CKR_KEY_FUNCTION_NOT_PERMITTED;
    if (!strcmp(e, "not_found"))
        return CKR_KEY_HANDLE_INVALID;
    if (!strcmp(e, "bad_tag"))
        return CKR_ENCRYPTED_DATA_INVALID;
    if (!strcmp(e, "unsupported_algorithm"))
        return CKR_KEY_TYPE_INCONSISTENT;
    if (!strcmp(e, "invalid_key_size"))
        return CKR_KEY_SIZE_RANGE;
    if (!strcmp(e, "too_large"))
        return CKR_DATA_LEN_RANGE;
    if (!strcmp(e, "name_exists") || !strcmp(e, "conflict"))
        return CKR_ATTRIBUTE_VALUE_INVALID;
    if (r->status == 400)
        return CKR_ARGUMENTS_BAD;
    if (r->status == 429)
        return CKR_FUNCTION_FAILED;
    if (r->status >= 500)
        return CKR_DEVICE_ERROR;
    return CKR_FUNCTION_FAILED;
}

/* Call and map: CKR_OK only for a 2xx answer (then *r must be freed). */
static CK_RV call(const char *method, const char *path, sr_body *b, sr_resp *r) {
    CK_RV rv = sr_call(method, path, b, r);
    if (rv != CKR_OK)
        return rv;
    rv = map_error(r);
    if (rv != CKR_OK)
        sr_resp_free(r);
    return rv;
}

static int logged_in(void) { return sr_conn_logged_in(); }

/* What a call on a session needs besides the session itself. */
enum { NEED_SESSION = 0, NEED_LOGIN = 1 };

/* The prelude of every call on a session: the library is initialised in this
 * process, h is an open session and, with NEED_LOGIN, the user is logged in.
 * On CKR_OK g_lock is held and *ps is the session; on an error it is not held.
 * Checked under the lock, so a C_Finalize in another thread is seen here. */
static CK_RV session_lock(CK_SESSION_HANDLE h, int need, struct session **ps) {
    CK_RV rv = CKR_OK;
    pthread_mutex_lock(&g_lock);
    if (!initialised())
        rv = CKR_CRYPTOKI_NOT_INITIALIZED;
    else if (!(*ps = get_session(h)))
        rv = CKR_SESSION_HANDLE_INVALID;
    else if (need == NEED_LOGIN && !logged_in())
        rv = CKR_USER_NOT_LOGGED_IN;
    if (rv != CKR_OK)
        pthread_mutex_unlock(&g_lock);
    return rv;
}

/* The same prelude for a call that needs no lock after it. */
static CK_RV session_check(CK_SESSION_HANDLE h, int need) {
    struct session *s;
    CK_RV rv = session_lock(h, need, &s);
    if (rv == CKR_OK)
        pthread_mutex_unlock(&g_lock);
    return rv;
}

/* session_lock, and the session's operation in slot must be active: *po. */
static CK_RV op_lock(CK_SESSION_HANDLE h, int slot, struct op **po) {
    struct session *s;
    CK_RV rv = session_lock(h, NEED_SESSION, &s);
    if (rv != CKR_OK)
        return rv;
    if (!s->ops[slot].active) {
        pthread_mutex_unlock(&g_lock);
        return CKR_OPERATION_NOT_INITIALIZED;
    }
    *po = &s->ops[slot];
    return CKR_OK;
}

/* Log in with the configured API key, if there is one. */
static void auto_login(void) {
    if (sr_cfg.api_key[0] && !logged_in()) {
        sr_resp r;
        if (sr_conn_login(sr_cfg.api_key, strlen(sr_cfg.api_key), &r) == CKR_OK)
            sr_resp_free(&r);
    }
}

/* ------------------------------------------------------------- key table */

static int type_of(const char *s, size_t n) {
    for (int i = 1; i <= T_CERT; i++)
        if (strlen(TYPE_NAMES[i]) == n && !memcmp(TYPE_NAMES[i], s, n))
            return i;
    return T_NONE;
}

static void copy_str(char *dst, size_t cap, const char *s, size_t n) {
    if (n >= cap)
        n = cap - 1;
    memcpy(dst, s, n);
    dst[n] = 0;
}

static int find_obj(int key, CK_OBJECT_CLASS cls) {
    for (size_t i = 0; i < n_objs; i++)
        if (objs[i].key == key && objs[i].cls == cls)
            return (int)i;
    return -1;
}

static int add_obj(int key, CK_OBJECT_CLASS cls) {
    int i = find_obj(key, cls);
    if (i >= 0)
        return i;
    if (n_objs == cap_objs) {
        size_t c = cap_objs ? cap_objs * 2 : 64;
        struct obj *o = realloc(objs, c * sizeof *o);
        if (!o)
            return -1;
        objs = o;
        cap_objs = c;
    }
    objs[n_objs].key = key;
    objs[n_objs].cls = cls;
    objs[n_objs].destroyed = 0;
    return (int)n_objs++;
}

/* Insert or update a key from its sobject; caller holds g_lock. Returns index. */
static int upsert_key(const msgpack_object *so, unsigned gen) {
    const char *s;
    size_t n;
    const unsigned char *b;
    if (sr_get_str(so, "kid", &s, &n) || n >= sizeof keys[0].kid)
        return -1;
    size_t i;
    for (i = 0; i < n_keys; i++)
        if (strlen(keys[i].kid) == n && !memcmp(keys[i].kid, s, n))
            break;
    if (i == n_keys) {
        if (n_keys == cap_keys) {
            size_t c = cap_keys ? cap_keys * 2 : 32;
            struct key *k = realloc(keys, c * sizeof *k);
            if (!k)
                return -1;
            keys = k;
            cap_keys = c;
        }
        memset(&keys[i], 0, sizeof keys[i]);
        copy_str(keys[i].kid, sizeof keys[i].kid, s, n);
        n_keys++;
    }
    struct key *k = &keys[i];
    k->name[0] = 0;
    if (sr_get_str(so, "name", &s, &n) == 0)
        copy_str(k->name, sizeof k->name, s, n);
    k->type = sr_get_str(so, "obj_type", &s, &n) == 0 ? type_of(s, n) : T_NONE;
    k->bits = (CK_ULONG)sr_get_int(so, "key_size", 0);
    k->curve[0] = 0;
    if (sr_get_str(so, "elliptic_curve", &s, &n) == 0)
        copy_str(k->curve, sizeof k->curve, s, n);
    k->ops = 0;
    const msgpack_object *ops = sr_get(so, "key_ops");
    if (ops && ops->type == MSGPACK_OBJECT_ARRAY)
        for (uint32_t j = 0; j < ops->via.array.size; j++) {
            const msgpack_object *o = &ops->via.array.ptr[j];
            if (o->type != MSGPACK_OBJECT_STR)
                continue;
            for (int q = 0; q < N_OPS; q++)
                if (strlen(OP_NAMES[q]) == o->via.str.size &&
                    !memcmp(OP_NAMES[q], o->via.str.ptr, o->via.str.size))
                    k->ops |= 1u << q;
        }
    k->transient = sr_get_bool(so, "transient", 0);
    k->gen = gen;
    k->public_only = sr_get_bool(so, "public_only", 0) || k->type == T_CERT;
    if (sr_get_bool(so, "enabled", 1) == 0)
        k->ops = k->ops & (OP_EXPORT | OP_APPMANAGEABLE); /* a disabled key does nothing */
    if (sr_get_bin(so, "pub_key", &b, &n) == 0 &&
        !(k->spki && k->spki_len == n && !memcmp(k->spki, b, n))) {
        free(k->spki);
        k->spki = malloc(n);
        if (k->spki) {
            memcpy(k->spki, b, n);
            k->spki_len = n;
            if (sr_parse_spki(k->spki, n, &k->pub))
                memset(&k->pub, 0, sizeof k->pub);
        }
    }
    k->present = 1;
    if (k->type == T_RSA || k->type == T_EC || k->type == T_CERT) {
        if (k->type == T_CERT)
            add_obj((int)i, CKO_CERTIFICATE);
        if (!k->public_only)
            add_obj((int)i, CKO_PRIVATE_KEY);
        add_obj((int)i, CKO_PUBLIC_KEY);
    } else if (k->type != T_NONE) {
        add_obj((int)i, CKO_SECRET_KEY);
    }
    return (int)i;
}

/* Fetch the key list the app can see. */
static CK_RV refresh(void) {
    unsigned gen = sr_conn_generation();
    size_t off = 0;
    int first = 1;
    for (;;) {
        sr_body b;
        sr_resp r;
        sr_body_init(&b);
        sr_map(&b, 2);
        sr_kv_int(&b, "limit", 10000);
        sr_kv_int(&b, "offset", (int64_t)off);
        CK_RV rv = call("GET", "/crypto/v1/keys", &b, &r);
        sr_body_free(&b);
        if (rv != CKR_OK)
            return rv;
        if (!r.body || r.body->type != MSGPACK_OBJECT_ARRAY) {
            sr_resp_free(&r);
            return CKR_DEVICE_ERROR;
        }
        gen = sr_conn_generation();
        pthread_mutex_lock(&g_lock);
        if (first)
            for (size_t i = 0; i < n_keys; i++)
                keys[i].present = 0;
        first = 0;
        uint32_t cnt = r.body->via.array.size;
        for (uint32_t i = 0; i < cnt; i++)
            upsert_key(&r.body->via.array.ptr[i], gen);
        pthread_mutex_unlock(&g_lock);
        sr_resp_free(&r);
        if (cnt < 10000)
            return CKR_OK;
        off += cnt;
    }
}

/* caller holds g_lock */
static struct key *obj_key(CK_OBJECT_HANDLE h, struct obj **po) {
    if (h == 0 || h > n_objs)
        return NULL;
    struct obj *o = &objs[h - 1];
    struct key *k = &keys[o->key];
    if (!k->present || (k->transient && k->gen != sr_conn_generation()))
        return NULL;
    if (po)
        *po = o;
    return k;
}

/* A key descriptor for requests: {"kid": ...} or {"transient_key": ...} */
static void put_desc(sr_body *b, const char *field, const char *kid, int transient) {
    sr_str(b, field);
    sr_map(b, 1);
    sr_kv_str(b, transient ? "transient_key" : "kid", kid);
}

/* ------------------------------------------------------------- attributes */

static const CK_BBOOL T = CK_TRUE, F = CK_FALSE;

static CK_KEY_TYPE key_type(const struct key *k) {
    switch (k->type) {
    case T_AES:
        return CKK_AES;
    case T_DES3:
        return CKK_DES3;
    case T_HMAC:
    case T_SECRET:
        return CKK_GENERIC_SECRET;
    case T_RSA:
        return CKK_RSA;
    case T_EC:
        return k->pub.kind == 3 || !strcmp(k->curve, "Ed25519") ? CKK_EC_EDWARDS : CKK_EC;
    case T_CERT:
        return k->pub.kind == 1 ? CKK_RSA : k->pub.kind == 3 ? CKK_EC_EDWARDS : CKK_EC;
    }
    return CKK_VENDOR_DEFINED;
}

/* The key pair a certificate is for: a key this app sees with a private half
 * and the certificate's public key (the same SubjectPublicKeyInfo). The
 * certificate takes its CKA_ID, the convention by which Java's KeyStore
 * (SunPKCS11), libp11 and GnuTLS pair a certificate with its private key.
 * The certificate itself when there is none. Caller holds g_lock. */
static const struct key *cert_owner(const struct key *c) {
    for (size_t i = 0; c->spki && i < n_keys; i++) {
        const struct key *k = &keys[i];
        if (k != c && k->present && !k->public_only && (k->type == T_RSA || k->type == T_EC) &&
            !(k->transient && k->gen != sr_conn_generation()) && k->spki &&
            k->spki_len == c->spki_len && !memcmp(k->spki, c->spki, c->spki_len))
            return k;
    }
    return c;
}

/* An attribute of a CKO_CERTIFICATE (X.509). The DER-derived ones need
 * k->cert (cert_fetch); without it they are CKR_ATTRIBUTE_SENSITIVE. */
static CK_RV cert_attr(const struct key *k, CK_ATTRIBUTE_TYPE t, const void **p, CK_ULONG *n,
                       unsigned char *scratch) {
    CK_ULONG u;
    const CK_BBOOL *b = NULL;
    switch (t) {
    case CKA_CLASS:
        u = CKO_CERTIFICATE;
        goto ulong;
    case CKA_CERTIFICATE_TYPE:
        u = CKC_X_509;
        goto ulong;
    case CKA_CERTIFICATE_CATEGORY:
        u = 0; /* unspecified */
        goto ulong;
    case CKA_JAVA_MIDP_SECURITY_DOMAIN:
        u = 0;
        goto ulong;
    case CKA_TOKEN:
        b = k->transient ? &F : &T;
        break;
    case CKA_PRIVATE:
    case CKA_TRUSTED:
    case CKA_COPYABLE:
        b = &F;
        break;
    case CKA_MODIFIABLE:
    case CKA_DESTROYABLE:
        b = &T;
        break;
    case CKA_LABEL:
        *p = k->name;
        *n = strlen(k->name);
        return CKR_OK;
    case CKA_ID:
        *p = cert_owner(k)->kid;
        *n = strlen(*p);
        return CKR_OK;
    case CKA_START_DATE:
    case CKA_END_DATE:
    case CKA_URL:
    case CKA_HASH_OF_SUBJECT_PUBLIC_KEY:
    case CKA_HASH_OF_ISSUER_PUBLIC_KEY:
        *p = scratch;
        *n = 0;
        return CKR_OK;
    case CKA_PUBLIC_KEY_INFO:
        if (!k->spki)
            return CKR_ATTRIBUTE_TYPE_INVALID;
        *p = k->spki;
        *n = k->spki_len;
        return CKR_OK;
    case CKA_VALUE:
    case CKA_SUBJECT:
    case CKA_ISSUER:
    case CKA_SERIAL_NUMBER:
        if (!k->cert)
            return CKR_ATTRIBUTE_SENSITIVE;
        if (t == CKA_VALUE) {
            *p = k->cert;
            *n = k->cert_len;
        } else if (!k->c.serial) { /* not X.509 DER we can read: only the value */
            return CKR_ATTRIBUTE_TYPE_INVALID;
        } else if (t == CKA_SUBJECT) {
            *p = k->c.subject;
            *n = k->c.subject_len;
        } else if (t == CKA_ISSUER) {
            *p = k->c.issuer;
            *n = k->c.issuer_len;
        } else {
            *p = k->c.serial;
            *n = k->c.serial_len;
        }
        return CKR_OK;
    default:
        return CKR_ATTRIBUTE_TYPE_INVALID;
    }
    *p = b;
    *n = sizeof(CK_BBOOL);
    return CKR_OK;
ulong:
    memcpy(scratch, &u, sizeof u);
    *p = scratch;
    *n = sizeof u;
    return CKR_OK;
}

static int cert_der_attr(CK_ATTRIBUTE_TYPE t) {
    return t == CKA_VALUE || t == CKA_SUBJECT || t == CKA_ISSUER || t == CKA_SERIAL_NUMBER;
}

/* The value of one attribute. scratch holds at least 1024 bytes.
 * CKR_ATTRIBUTE_TYPE_INVALID / CKR_ATTRIBUTE_SENSITIVE when it has none.
 * CKA_VALUE of an exportable secret key is fetched by the caller. */
static CK_RV attr_value(const struct obj *o, const struct key *k, CK_ATTRIBUTE_TYPE t,
                        const void **p, CK_ULONG *n, unsigned char *scratch) {
#define BOOL(v)                                                                                    \
    do {                                                                                           \
        *p = (v) ? &T : &F;                                                                        \
        *n = sizeof(CK_BBOOL);                                                                     \
        return CKR_OK;                                                                             \
    } while (0)
#define ULONG(v)                                                                                   \
    do {                                                                                           \
        CK_ULONG _v = (v);                                                                         \
        memcpy(scratch, &_v, sizeof _v);                                                           \
        *p = scratch;                                                                              \
        *n = sizeof(CK_ULONG);                                                                     \
        return CKR_OK;                                                                             \
    } while (0)
    if (o->cls == CKO_CERTIFICATE)
        return cert_attr(k, t, p, n, scratch);
    int secret = o->cls == CKO_SECRET_KEY, priv = o->cls == CKO_PRIVATE_KEY,
        pub = o->cls == CKO_PUBLIC_KEY;
    int exportable = (k->ops & OP_EXPORT) != 0;
    int mac = k->type == T_HMAC;
    switch (t) {
    case CKA_CLASS:
        ULONG(o->cls);
    case CKA_TOKEN:
        BOOL(!k->transient);
    case CKA_PRIVATE:
        BOOL(!pub);
    case CKA_MODIFIABLE:
        BOOL(1);
    case CKA_COPYABLE:
        BOOL(0);
    case CKA_DESTROYABLE:
        BOOL(1);
    case CKA_LABEL:
        *p = k->name;
        *n = strlen(k->name);
        return CKR_OK;
    case CKA_ID:
        *p = k->kid;
        *n = strlen(k->kid);
        return CKR_OK;
    case CKA_KEY_TYPE:
        ULONG(key_type(k));
    case CKA_LOCAL:
        BOOL(0);
    case CKA_KEY_GEN_MECHANISM:
        ULONG(CK_UNAVAILABLE_INFORMATION);
    case CKA_START_DATE:
    case CKA_END_DATE:
        *p = scratch;
        *n = 0;
        return CKR_OK;
    case CKA_DERIVE:
        BOOL(!pub && (k->ops & (OP_DERIVEKEY | OP_AGREEKEY)));
    case CKA_SUBJECT:
        if (secret)
            break;
        *p = scratch;
        *n = 0;
        return CKR_OK;
    }
    if (secret || priv) {
        switch (t) {
        case CKA_SENSITIVE:
        case CKA_ALWAYS_SENSITIVE:
            BOOL(!exportable);
        case CKA_EXTRACTABLE:
            BOOL(exportable);
        case CKA_NEVER_EXTRACTABLE:
            BOOL(!exportable);
        case CKA_DECRYPT:
            BOOL(k->ops & OP_DECRYPT);
        case CKA_SIGN:
            BOOL(k->ops & (mac ? OP_MACGENERATE : OP_SIGN) || (k->type == T_AES && (k->ops & OP_MACGENERATE)));
        case CKA_UNWRAP:
            BOOL(k->ops & OP_UNWRAPKEY);
        case CKA_SIGN_RECOVER:
            BOOL(0);
        case CKA_WRAP_WITH_TRUSTED:
            BOOL(0);
        case CKA_ALWAYS_AUTHENTICATE:
            if (priv)
                BOOL(0);
            break;
        }
    }
    if (secret || pub) {
        switch (t) {
        case CKA_ENCRYPT:
            BOOL(k->ops & OP_ENCRYPT);
        case CKA_VERIFY:
            BOOL(k->ops & (mac ? OP_MACVERIFY : OP_VERIFY) || (k->type == T_AES && (k->ops & OP_MACVERIFY)));
        case CKA_WRAP:
            BOOL(k->ops & OP_WRAPKEY);
        case CKA_VERIFY_RECOVER:
            BOOL(0);
        case CKA_TRUSTED:
            BOOL(0);
        }
    }
    if (secret) {
        switch (t) {
        case CKA_VALUE_LEN:
            ULONG(k->type == T_DES3 ? 24 : k->bits / 8);
        case CKA_VALUE:
            return exportable ? CKR_ATTRIBUTE_TYPE_INVALID : CKR_ATTRIBUTE_SENSITIVE;
        }
        return CKR_ATTRIBUTE_TYPE_INVALID;
    }
    /* asymmetric */
    if (t == CKA_PUBLIC_KEY_INFO && k->spki) {
        *p = k->spki;
        *n = k->spki_len;
        return CKR_OK;
    }
    if (k->pub.kind == 1) {
        switch (t) {
        case CKA_MODULUS:
            *p = k->pub.n;
            *n = k->pub.n_len;
            return CKR_OK;
        case CKA_PUBLIC_EXPONENT:
            *p = k->pub.e;
            *n = k->pub.e_len;
            return CKR_OK;
        case CKA_MODULUS_BITS: {
            CK_ULONG bits = k->pub.n_len * 8;
            for (unsigned char c = k->pub.n[0]; c && !(c & 0x80); c <<= 1)
                bits--;
            ULONG(bits);
        }
        case CKA_PRIVATE_EXPONENT:
        case CKA_PRIME_1:
        case CKA_PRIME_2:
        case CKA_EXPONENT_1:
        case CKA_EXPONENT_2:
        case CKA_COEFFICIENT:
            if (priv)
                return CKR_ATTRIBUTE_SENSITIVE;
        }
    } else if (k->pub.kind == 2 || k->pub.kind == 3) {
        switch (t) {
        case CKA_EC_PARAMS:
            *p = k->pub.params;
            *n = k->pub.params_len;
            return CKR_OK;
        case CKA_EC_POINT: {
            size_t l = k->pub.point_len, i = 0;
            if (l > 1000)
                break;
            scratch[i++] = 0x04;
            if (l >= 0x80) {
                if (l >= 0x100) {
                    scratch[i++] = 0x82;
                    scratch[i++] = (unsigned char)(l >> 8);
                } else {
                    scratch[i++] = 0x81;
                }
            }
            scratch[i++] = (unsigned char)l;
            memcpy(scratch + i, k->pub.point, l);
            *p = scratch;
            *n = (CK_ULONG)(i + l);
            return CKR_OK;
        }
        case CKA_VALUE:
            if (priv)
                return CKR_ATTRIBUTE_SENSITIVE;
        }
    }
    return CKR_ATTRIBUTE_TYPE_INVALID;
#undef BOOL
#undef ULONG
}

/* ------------------------------------------------------------- mechanisms */

struct mech_info {
    CK_MECHANISM_TYPE type;
    CK_ULONG min, max;
    CK_FLAGS flags;
};

#define SV (CKF_SIGN | CKF_VERIFY)
#define ED (CKF_ENCRYPT | CKF_DECRYPT)
#define WU (CKF_WRAP | CKF_UNWRAP)
#define ECF (CKF_EC_F_P | CKF_EC_NAMEDCURVE | CKF_EC_UNCOMPRESS)
static const struct mech_info MECHS[] = {
    {CKM_RSA_PKCS_KEY_PAIR_GEN, 2048, 4096, CKF_GENERATE_KEY_PAIR},
    {CKM_RSA_PKCS, 2048, 4096, SV | ED},
    {CKM_RSA_PKCS_OAEP, 2048, 4096, ED | WU},
    {CKM_RSA_PKCS_PSS, 2048, 4096, SV},
    {CKM_SHA1_RSA_PKCS, 2048, 4096, SV},
    {CKM_SHA256_RSA_PKCS, 2048, 4096, SV},
    {CKM_SHA384_RSA_PKCS, 2048, 4096, SV},
    {CKM_SHA512_RSA_PKCS, 2048, 4096, SV},
    {CKM_SHA1_RSA_PKCS_PSS, 2048, 4096, SV},
    {CKM_SHA256_RSA_PKCS_PSS, 2048, 4096, SV},
    {CKM_SHA384_RSA_PKCS_PSS, 2048, 4096, SV},
    {CKM_SHA512_RSA_PKCS_PSS, 2048, 4096, SV},
    {CKM_EC_KEY_PAIR_GEN, 256, 521, CKF_GENERATE_KEY_PAIR | ECF},
    {CKM_ECDSA, 256, 521, SV | ECF},
    {CKM_ECDSA_SHA1, 256, 521, SV | ECF},
    {CKM_ECDSA_SHA256, 256, 521, SV | ECF},
    {CKM_ECDSA_SHA384, 256, 521, SV | ECF},
    {CKM_ECDSA_SHA512, 256, 521, SV | ECF},
    {CKM_ECDH1_DERIVE, 256, 521, CKF_DERIVE | ECF},
    {CKM_EC_EDWARDS_KEY_PAIR_GEN, 255, 255, CKF_GENERATE_KEY_PAIR},
    {CKM_EDDSA, 255, 255, SV},
    {CKM_AES_KEY_GEN, 16, 32, CKF_GENERATE},
    {CKM_AES_GCM, 16, 32, ED},
    {CKM_AES_CBC, 16, 32, ED},
    {CKM_AES_CBC_PAD, 16, 32, ED},
    {CKM_AES_CTR, 16, 32, ED},
    {CKM_AES_ECB, 16, 32, ED},
    {CKM_AES_KEY_WRAP, 16, 32, WU},
    {CKM_AES_KEY_WRAP_PAD, 16, 32, WU},
    {CKM_AES_CMAC, 16, 32, SV},
    {CKM_DES3_KEY_GEN, 24, 24, CKF_GENERATE},
    {CKM_DES3_CBC, 24, 24, ED},
    {CKM_DES3_CBC_PAD, 24, 24, ED},
    {CKM_DES3_ECB, 24, 24, ED},
    {CKM_GENERIC_SECRET_KEY_GEN, 14, 512, CKF_GENERATE},
    {CKM_SHA_1_HMAC, 14, 512, SV},
    {CKM_SHA256_HMAC, 14, 512, SV},
    {CKM_SHA384_HMAC, 14, 512, SV},
    {CKM_SHA512_HMAC, 14, 512, SV},
    {CKM_SHA_1, 0, 0, CKF_DIGEST},
    {CKM_SHA256, 0, 0, CKF_DIGEST},
    {CKM_SHA384, 0, 0, CKF_DIGEST},
    {CKM_SHA512, 0, 0, CKF_DIGEST},
};
#define N_MECHS (sizeof MECHS / sizeof MECHS[0])

static const char *hash_of_mech(CK_MECHANISM_TYPE m) {
    switch (m) {
    case CKM_SHA_1:
    case CKM_SHA1_RSA_PKCS:
    case CKM_SHA1_RSA_PKCS_PSS:
    case CKM_ECDSA_SHA1:
    case CKM_SHA_1_HMAC:
    case CKG_MGF1_SHA1:
        return "SHA1";
    case CKM_SHA256:
    case CKM_SHA256_RSA_PKCS:
    case CKM_SHA256_RSA_PKCS_PSS:
    case CKM_ECDSA_SHA256:
    case CKM_SHA256_HMAC:
    case CKG_MGF1_SHA256:
        return "SHA256";
    case CKM_SHA384:
    case CKM_SHA384_RSA_PKCS:
    case CKM_SHA384_RSA_PKCS_PSS:
    case CKM_ECDSA_SHA384:
    case CKM_SHA384_HMAC:
    case CKG_MGF1_SHA384:
        return "SHA384";
    case CKM_SHA512:
    case CKM_SHA512_RSA_PKCS:
    case CKM_SHA512_RSA_PKCS_PSS:
    case CKM_ECDSA_SHA512:
    case CKM_SHA512_HMAC:
    case CKG_MGF1_SHA512:
        return "SHA512";
    }
    return NULL;
}

static size_t hash_len(const char *h) {
    if (!h)
        return 0;
    if (!strcmp(h, "SHA1"))
        return 20;
    if (!strcmp(h, "SHA256"))
        return 32;
    if (!strcmp(h, "SHA384"))
        return 48;
    return 64;
}

static const char *mgf_hash(CK_RSA_PKCS_MGF_TYPE g) {
    switch (g) {
    case CKG_MGF1_SHA1:
        return "SHA1";
    case CKG_MGF1_SHA256:
        return "SHA256";
    case CKG_MGF1_SHA384:
        return "SHA384";
    case CKG_MGF1_SHA512:
        return "SHA512";
    }
    return NULL;
}

/* Check a mechanism against the operation and key type; fill *m. */
static CK_RV parse_mech(CK_MECHANISM_PTR pm, int slot, const struct key *k, struct mspec *m) {
    memset(m, 0, sizeof *m);
    m->mech = pm->mechanism;
    if (slot == OPS_DIGEST || !k) { /* C_DigestInit: no key, a digest mechanism */
        switch (pm->mechanism) {
        case CKM_SHA_1:
        case CKM_SHA256:
        case CKM_SHA384:
        case CKM_SHA512:
            if (slot != OPS_DIGEST)
                break;
            m->hash = hash_of_mech(pm->mechanism);
            return CKR_OK;
        }
        return CKR_MECHANISM_INVALID;
    }
    int sym = k->type == T_AES || k->type == T_DES3;
    switch (pm->mechanism) {
    case CKM_RSA_PKCS:
        if (k->type != T_RSA && !(k->type == T_CERT && k->pub.kind == 1))
            return CKR_KEY_TYPE_INCONSISTENT;
        m->mode = "PKCS1_V15";
        return CKR_OK;
    case CKM_RSA_PKCS_OAEP: {
        if (k->type != T_RSA && !(k->type == T_CERT && k->pub.kind == 1))
            return CKR_KEY_TYPE_INCONSISTENT;
        if (slot != OPS_ENCRYPT && slot != OPS_DECRYPT)
            return CKR_MECHANISM_INVALID;
        CK_RSA_PKCS_OAEP_PARAMS *pp = pm->pParameter;
        if (!pp || pm->ulParameterLen != sizeof *pp)
            return CKR_MECHANISM_PARAM_INVALID;
        const char *h = hash_of_mech(pp->hashAlg), *g = mgf_hash(pp->mgf);
        if (!h || !g || strcmp(h, g) || (pp->source && pp->ulSourceDataLen))
            return CKR_MECHANISM_PARAM_INVALID;
        if (!strcmp(h, "SHA1"))
            m->mode = "OAEP_MGF1_SHA1";
        else if (!strcmp(h, "SHA256"))
            m->mode = "OAEP_MGF1_SHA256";
        else
            return CKR_MECHANISM_PARAM_INVALID;
        return CKR_OK;
    }
    case CKM_RSA_PKCS_PSS:
    case CKM_SHA1_RSA_PKCS_PSS:
    case CKM_SHA256_RSA_PKCS_PSS:
    case CKM_SHA384_RSA_PKCS_PSS:
    case CKM_SHA512_RSA_PKCS_PSS: {
        if (slot != OPS_SIGN && slot != OPS_VERIFY)
            return CKR_MECHANISM_INVALID;
        if (key_type(k) != CKK_RSA)
            return CKR_KEY_TYPE_INCONSISTENT;
        CK_RSA_PKCS_PSS_PARAMS *pp = pm->pParameter;
        if (!pp || pm->ulParameterLen != sizeof *pp)
            return CKR_MECHANISM_PARAM_INVALID;
        const char *h = hash_of_mech(pp->hashAlg);
        if (!h || !mgf_hash(pp->mgf) || pp->sLen != hash_len(h))
            return CKR_MECHANISM_PARAM_INVALID;
        if (pm->mechanism != CKM_RSA_PKCS_PSS && strcmp(h, hash_of_mech(pm->mechanism)))
            return CKR_MECHANISM_PARAM_INVALID;
        m->hash = h;
        m->mgf = mgf_hash(pp->mgf);
        m->mode = "PSS";
        return CKR_OK;
    }
    case CKM_SHA1_RSA_PKCS:
    case CKM_SHA256_RSA_PKCS:
    case CKM_SHA384_RSA_PKCS:
    case CKM_SHA512_RSA_PKCS:
        if (slot != OPS_SIGN && slot != OPS_VERIFY)
            return CKR_MECHANISM_INVALID;
        if (key_type(k) != CKK_RSA)
            return CKR_KEY_TYPE_INCONSISTENT;
        m->hash = hash_of_mech(pm->mechanism);
        return CKR_OK;
    case CKM_ECDSA:
    case CKM_ECDSA_SHA1:
    case CKM_ECDSA_SHA256:
    case CKM_ECDSA_SHA384:
    case CKM_ECDSA_SHA512:
        if (slot != OPS_SIGN && slot != OPS_VERIFY)
            return CKR_MECHANISM_INVALID;
        if (key_type(k) != CKK_EC)
            return CKR_KEY_TYPE_INCONSISTENT;
        m->hash = hash_of_mech(pm->mechanism);
        return CKR_OK;
    case CKM_EDDSA:
        if (slot != OPS_SIGN && slot != OPS_VERIFY)
            return CKR_MECHANISM_INVALID;
        if (key_type(k) != CKK_EC_EDWARDS)
            return CKR_KEY_TYPE_INCONSISTENT;
        if (pm->pParameter && pm->ulParameterLen) {
            CK_BYTE *pp = pm->pParameter; /* CK_EDDSA_PARAMS: only pure Ed25519 */
            if (pp[0])
                return CKR_MECHANISM_PARAM_INVALID;
        }
        return CKR_OK;
    case CKM_SHA_1_HMAC:
    case CKM_SHA256_HMAC:
    case CKM_SHA384_HMAC:
    case CKM_SHA512_HMAC:
        if (slot != OPS_SIGN && slot != OPS_VERIFY)
            return CKR_MECHANISM_INVALID;
        if (k->type != T_HMAC)
            return CKR_KEY_TYPE_INCONSISTENT;
        m->hash = hash_of_mech(pm->mechanism);
        return CKR_OK;
    case CKM_AES_CMAC:
        if (slot != OPS_SIGN && slot != OPS_VERIFY)
            return CKR_MECHANISM_INVALID;
        if (k->type != T_AES)
            return CKR_KEY_TYPE_INCONSISTENT;
        m->hash = "CMAC";
        return CKR_OK;
    case CKM_AES_GCM: {
        if (slot != OPS_ENCRYPT && slot != OPS_DECRYPT)
            return CKR_MECHANISM_INVALID;
        if (k->type != T_AES)
            return CKR_KEY_TYPE_INCONSISTENT;
        CK_GCM_PARAMS *gp = pm->pParameter;
        if (!gp || pm->ulParameterLen != sizeof *gp || gp->ulIvLen != 12 || !gp->pIv ||
            (gp->ulAADLen && !gp->pAAD) || gp->ulTagBits < 96 || gp->ulTagBits > 128 ||
            gp->ulTagBits % 8)
            return CKR_MECHANISM_PARAM_INVALID;
        memcpy(m->iv, gp->pIv, 12);
        m->iv_len = 12;
        if (gp->ulAADLen) {
            m->aad = malloc(gp->ulAADLen);
            if (!m->aad)
                return CKR_HOST_MEMORY;
            memcpy(m->aad, gp->pAAD, gp->ulAADLen);
            m->aad_len = gp->ulAADLen;
        }
        m->tag_bits = gp->ulTagBits;
        m->mode = "GCM";
        return CKR_OK;
    }
    case CKM_AES_CBC:
    case CKM_AES_CBC_PAD:
    case CKM_DES3_CBC:
    case CKM_DES3_CBC_PAD: {
        if (slot != OPS_ENCRYPT && slot != OPS_DECRYPT)
            return CKR_MECHANISM_INVALID;
        int aes = pm->mechanism == CKM_AES_CBC || pm->mechanism == CKM_AES_CBC_PAD;
        if (!sym || (aes != (k->type == T_AES)))
            return CKR_KEY_TYPE_INCONSISTENT;
        size_t bl = aes ? 16 : 8;
        if (!pm->pParameter || pm->ulParameterLen != bl)
            return CKR_MECHANISM_PARAM_INVALID;
        memcpy(m->iv, pm->pParameter, bl);
        m->iv_len = bl;
        m->mode = (pm->mechanism == CKM_AES_CBC_PAD || pm->mechanism == CKM_DES3_CBC_PAD) ? "CBC"
                                                                                          : "CBCNOPAD";
        return CKR_OK;
    }
    case CKM_AES_CTR: {
        if (slot != OPS_ENCRYPT && slot != OPS_DECRYPT)
            return CKR_MECHANISM_INVALID;
        if (k->type != T_AES)
            return CKR_KEY_TYPE_INCONSISTENT;
        CK_AES_CTR_PARAMS *cp = pm->pParameter;
        if (!cp || pm->ulParameterLen != sizeof *cp || cp->ulCounterBits == 0 || cp->ulCounterBits > 128)
            return CKR_MECHANISM_PARAM_INVALID;
        memcpy(m->iv, cp->cb, 16);
        m->iv_len = 16;
        m->mode = "CTR";
        return CKR_OK;
    }
    case CKM_AES_ECB:
    case CKM_DES3_ECB:
        if (slot != OPS_ENCRYPT && slot != OPS_DECRYPT)
            return CKR_MECHANISM_INVALID;
        if (!sym || ((pm->mechanism == CKM_AES_ECB) != (k->type == T_AES)))
            return CKR_KEY_TYPE_INCONSISTENT;
        m->mode = "ECB";
        return CKR_OK;
    }
    return CKR_MECHANISM_INVALID;
}

/* ------------------------------------------------------------- one operation */

static int ecdsa_size(const struct key *k) {
    if (!strcmp(k->curve, "NistP384"))
        return 48;
    if (!strcmp(k->curve, "NistP521"))
        return 66;
    return 32;
}

static const char *hash_by_len(size_t n) {
    switch (n) {
    case 20:
        return "SHA1";
    case 32:
        return "SHA256";
    case 48:
        return "SHA384";
    case 64:
        return "SHA512";
    }
    return NULL;
}

/* DigestInfo prefixes (RFC 8017 9.2 note 1) */
static const struct {
    const char *hash;
    unsigned char p[19];
    size_t n;
} DIGEST_INFO[] = {
    {"SHA1", {0x30, 0x21, 0x30, 0x09, 0x06, 0x05, 0x2b, 0x0e, 0x03, 0x02, 0x1a, 0x05, 0x00, 0x04, 0x14}, 15},
    {"SHA256", {0x30, 0x31, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x01, 0x05, 0x00, 0x04, 0x20}, 19},
    {"SHA384", {0x30, 0x41, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x02, 0x05, 0x00, 0x04, 0x30}, 19},
    {"SHA512", {0x30, 0x51, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x03, 0x05, 0x00, 0x04, 0x40}, 19},
};

struct keyref {
    char kid[64];
    int transient;
    int type;
    int ecsize;
    CK_ULONG modlen;
};

/* What a request needs to know of a key, copied out under the lock. */
static CK_RV keyref_of(CK_OBJECT_HANDLE h, struct keyref *r, struct key *copy) {
    struct key *k = obj_key(h, NULL);
    if (!k)
        return CKR_KEY_HANDLE_INVALID;
    strcpy(r->kid, k->kid);
    r->transient = k->transient;
    r->type = k->type;
    r->ecsize = ecdsa_size(k);
    r->modlen = k->pub.kind == 1 ? k->pub.n_len : 0;
    if (copy)
        *copy = *k;
    return CKR_OK;
}

/* Sign (or MAC, or verify when sig != NULL). Result malloc'd into *out. */
static CK_RV do_sign(const struct mspec *m, const struct keyref *kr, const unsigned char *in,
                     size_t len, const unsigned char *sig, size_t sig_len, unsigned char **out,
                     size_t *out_len) {
    sr_body b;
    sr_resp r;
    CK_RV rv;
    int verify = sig != NULL;
    int mac = m->mech == CKM_AES_CMAC || (m->mech >= CKM_SHA_1_HMAC && m->mech <= CKM_SHA512_HMAC &&
                                          kr->type == T_HMAC);
    const char *path;
    unsigned char dersig[160];
    size_t der_len = 0;
    sr_body_init(&b);
    if (mac) {
        path = verify ? "/crypto/v1/macverify" : "/crypto/v1/mac";
        sr_map(&b, verify ? 4 : 3);
        put_desc(&b, "key", kr->kid, kr->transient);
        sr_kv_str(&b, "alg", m->hash);
        sr_kv_bin(&b, "data", in, len);
        if (verify)
            sr_kv_bin(&b, "mac", sig, sig_len);
    } else {
        const char *hash = m->hash, *field = "data";
        const unsigned char *msg = in;
        size_t msg_len = len;
        path = verify ? "/crypto/v1/verify" : "/crypto/v1/sign";
        switch (m->mech) {
        case CKM_RSA_PKCS: {
            size_t i;
            for (i = 0; i < 4; i++)
                if (len == DIGEST_INFO[i].n + hash_len(DIGEST_INFO[i].hash) &&
                    !memcmp(in, DIGEST_INFO[i].p, DIGEST_INFO[i].n))
                    break;
            if (i == 4) {
                sr_body_free(&b);
                return CKR_DATA_INVALID; /* only DigestInfo of SHA-1/2 can be signed */
            }
            hash = DIGEST_INFO[i].hash;
            msg = in + DIGEST_INFO[i].n;
            msg_len = len - DIGEST_INFO[i].n;
            field = "hash";
            break;
        }
        case CKM_RSA_PKCS_PSS:
            if (len != hash_len(hash)) {
                sr_body_free(&b);
                return CKR_DATA_LEN_RANGE;
            }
            field = "hash";
            break;
        case CKM_ECDSA:
            hash = hash_by_len(len);
            if (!hash) {
                sr_body_free(&b);
                return CKR_DATA_LEN_RANGE;
            }
            field = "hash";
            break;
        }
        if (verify && (m->mech == CKM_ECDSA || (m->mech >= CKM_ECDSA_SHA1 && m->mech <= CKM_ECDSA_SHA512))) {
            if (sig_len != 2 * (size_t)kr->ecsize) {
                sr_body_free(&b);
                return CKR_SIGNATURE_LEN_RANGE;
            }
            der_len = sr_ecdsa_raw_to_der(sig, sig_len, dersig);
            sig = dersig;
            sig_len = der_len;
        }
        if (verify && kr->modlen && sig_len != kr->modlen) {
            sr_body_free(&b);
            return CKR_SIGNATURE_LEN_RANGE;
        }
        int n = 2 + (hash != NULL) + (m->mode != NULL) + verify;
        sr_map(&b, (size_t)n);
        put_desc(&b, "key", kr->kid, kr->transient);
        sr_kv_bin(&b, field, msg, msg_len);
        if (hash)
            sr_kv_str(&b, "hash_alg", hash);
        if (m->mode) {
            sr_str(&b, "mode");
            if (!strcmp(m->mode, "PSS")) {
                sr_map(&b, 1);
                sr_str(&b, "PSS");
                sr_map(&b, 1);
                sr_str(&b, "mgf");
                sr_map(&b, 1);
                sr_str(&b, "mgf1");
                sr_map(&b, 1);
                sr_kv_str(&b, "hash", m->mgf);
            } else {
                sr_str(&b, m->mode);
            }
        }
        if (verify)
            sr_kv_bin(&b, "signature", sig, sig_len);
    }
    rv = call("POST", path, &b, &r);
    sr_body_free(&b);
    if (rv != CKR_OK) {
        if (verify && rv == CKR_ENCRYPTED_DATA_INVALID)
            rv = CKR_SIGNATURE_INVALID;
        return rv;
    }
    if (verify) {
        const msgpack_object *res = sr_get(r.body, "result");
        rv = res && res->type == MSGPACK_OBJECT_BOOLEAN && res->via.boolean ? CKR_OK
                                                                             : CKR_SIGNATURE_INVALID;
        sr_resp_free(&r);
        return rv;
    }
    const unsigned char *s;
    size_t n;
    if (sr_get_bin(r.body, mac ? "mac" : "signature", &s, &n)) {
        sr_resp_free(&r);
        return CKR_DEVICE_ERROR;
    }
    int ecdsa = m->mech == CKM_ECDSA || (m->mech >= CKM_ECDSA_SHA1 && m->mech <= CKM_ECDSA_SHA512);
    size_t olen = ecdsa ? 2 * (size_t)kr->ecsize : n;
    *out = malloc(olen ? olen : 1);
    if (!*out) {
        sr_resp_free(&r);
        return CKR_HOST_MEMORY;
    }
    if (ecdsa) {
        if (sr_ecdsa_der_to_raw(s, n, *out, (size_t)kr->ecsize)) {
            free(*out);
            sr_resp_free(&r);
            return CKR_DEVICE_ERROR;
        }
    } else {
        memcpy(*out, s, n);
    }
    *out_len = olen;
    sr_resp_free(&r);
    return CKR_OK;
}

static CK_RV do_crypt(const struct mspec *m, const struct keyref *kr, int decrypt,
                      const unsigned char *in, size_t len, unsigned char **out, size_t *out_len) {
    sr_body b;
    sr_resp r;
    size_t tag_len = m->tag_bits / 8;
    const char *alg = kr->type == T_CERT ? "RSA" : TYPE_NAMES[kr->type];
    if (!strcmp(m->mode, "ECB") || !strcmp(m->mode, "CBCNOPAD")) {
        size_t bl = kr->type == T_AES ? 16 : 8;
        if (len % bl)
            return decrypt ? CKR_ENCRYPTED_DATA_LEN_RANGE : CKR_DATA_LEN_RANGE;
    }
    if (decrypt && !strcmp(m->mode, "GCM") && len < tag_len)
        return CKR_ENCRYPTED_DATA_LEN_RANGE;
    if (decrypt && kr->modlen && len != kr->modlen)
        return CKR_ENCRYPTED_DATA_LEN_RANGE;
    int n = 4 + (m->iv_len > 0) + (m->aad_len > 0) + (!strcmp(m->mode, "GCM"));
    sr_body_init(&b);
    sr_map(&b, (size_t)n);
    put_desc(&b, "key", kr->kid, kr->transient);
    sr_kv_str(&b, "alg", alg);
    sr_kv_str(&b, "mode", m->mode);
    if (decrypt && !strcmp(m->mode, "GCM")) {
        sr_kv_bin(&b, "cipher", in, len - tag_len);
        sr_kv_bin(&b, "tag", in + len - tag_len, tag_len);
    } else {
        sr_kv_bin(&b, decrypt ? "cipher" : "plain", in, len);
        if (!strcmp(m->mode, "GCM"))
            sr_kv_int(&b, "tag_len", (int64_t)m->tag_bits);
    }
    if (m->iv_len)
        sr_kv_bin(&b, "iv", m->iv, m->iv_len);
    if (m->aad_len)
        sr_kv_bin(&b, "ad", m->aad, m->aad_len);
    CK_RV rv = call("POST", decrypt ? "/crypto/v1/decrypt" : "/crypto/v1/encrypt", &b, &r);
    sr_body_free(&b);
    if (rv != CKR_OK)
        return rv;
    const unsigned char *c, *t = NULL;
    size_t cn, tn = 0;
    if (sr_get_bin(r.body, decrypt ? "plain" : "cipher", &c, &cn)) {
        sr_resp_free(&r);
        return CKR_DEVICE_ERROR;
    }
    if (!decrypt)
        sr_get_bin(r.body, "tag", &t, &tn);
    *out = malloc(cn + tn + 1);
    if (!*out) {
        sr_resp_free(&r);
        return CKR_HOST_MEMORY;
    }
    memcpy(*out, c, cn);
    if (tn)
        memcpy(*out + cn, t, tn);
    *out_len = cn + tn;
    sr_resp_free(&r);
    return CKR_OK;
}

static CK_RV do_digest(const struct mspec *m, const unsigned char *in, size_t len,
                       unsigned char **out, size_t *out_len) {
    sr_body b;
    sr_resp r;
    const unsigned char *d;
    size_t n;
    sr_body_init(&b);
    sr_map(&b, 2);
    sr_kv_str(&b, "alg", m->hash);
    sr_kv_bin(&b, "data", in, len);
    CK_RV rv = call("POST", "/crypto/v1/digest", &b, &r);
    sr_body_free(&b);
    if (rv != CKR_OK)
        return rv;
    if (sr_get_bin(r.body, "digest", &d, &n) || !(*out = malloc(n))) {
        sr_resp_free(&r);
        return CKR_DEVICE_ERROR;
    }
    memcpy(*out, d, n);
    *out_len = n;
    sr_resp_free(&r);
    return CKR_OK;
}

/* ------------------------------------------------------------- op plumbing */

/* Append n bytes to a growing malloc'd buffer. */
static CK_RV grow_append(unsigned char **p, size_t *len, size_t *cap, const unsigned char *v,
                         size_t n) {
    if (*len + n + 1 > *cap) {
        size_t c = (*len + n) * 2 + 64;
        unsigned char *nb = realloc(*p, c);
        if (!nb)
            return CKR_HOST_MEMORY;
        *p = nb;
        *cap = c;
    }
    if (n)
        memcpy(*p + *len, v, n);
    *len += n;
    return CKR_OK;
}

static CK_RV op_init(CK_SESSION_HANDLE hs, int slot, CK_MECHANISM_PTR pm, CK_OBJECT_HANDLE hk) {
    struct session *s;
    CK_RV rv = session_lock(hs, slot == OPS_DIGEST ? NEED_SESSION : NEED_LOGIN, &s);
    if (rv != CKR_OK)
        return rv;
    struct op *o = &s->ops[slot];
    struct obj *ob = NULL;
    struct key *k = NULL;
    if (!pm) {
        rv = CKR_ARGUMENTS_BAD;
        goto out;
    }
    if (o->active) {
        rv = CKR_OPERATION_ACTIVE;
        goto out;
    }
    if (slot != OPS_DIGEST) {
        k = obj_key(hk, &ob);
        if (!k) {
            rv = CKR_KEY_HANDLE_INVALID;
            goto out;
        }
        /* The class must fit the operation; key_ops are the daemon's to check. */
        if (((slot == OPS_SIGN || slot == OPS_DECRYPT) && ob->cls == CKO_PUBLIC_KEY) ||
            ((slot == OPS_VERIFY || slot == OPS_ENCRYPT) && ob->cls == CKO_PRIVATE_KEY)) {
            rv = CKR_KEY_TYPE_INCONSISTENT;
            goto out;
        }
    }
    struct mspec m;
    rv = parse_mech(pm, slot, k, &m);
    if (rv != CKR_OK)
        goto out;
    op_clear(o);
    o->active = 1;
    o->m = m;
    o->key = hk;
    o->stream = (slot == OPS_ENCRYPT || slot == OPS_DECRYPT) && m.mode &&
                (!strcmp(m.mode, "GCM") || !strcmp(m.mode, "CBC") || !strcmp(m.mode, "CBCNOPAD") ||
                 !strcmp(m.mode, "CTR"));
out:
    pthread_mutex_unlock(&g_lock);
    return rv;
}

static unsigned char *memdup(const unsigned char *p, size_t n, int *err) {
    if (!p)
        return NULL;
    unsigned char *d = malloc(n ? n : 1);
    if (!d)
        *err = 1;
    else if (n)
        memcpy(d, p, n);
    return d;
}

/* A private copy of an op, its buffers too: the request is made without the
 * lock, and C_Finalize or C_CloseAllSessions in another thread may free the
 * session's own meanwhile. The copy is freed with op_clear. */
static CK_RV op_dup(struct op *dst, const struct op *src) {
    int err = 0;
    *dst = *src;
    dst->buf = memdup(src->buf, src->len, &err);
    dst->cap = src->buf ? src->len : 0;
    dst->in = memdup(src->in, src->in_len, &err);
    dst->res = memdup(src->res, src->res_len, &err);
    dst->m.aad = memdup(src->m.aad, src->m.aad_len, &err);
    if (err) {
        op_clear(dst);
        return CKR_HOST_MEMORY;
    }
    return CKR_OK;
}

static void op_end(CK_SESSION_HANDLE hs, int slot) {
    struct op *o;
    if (op_lock(hs, slot, &o) == CKR_OK) {
        op_clear(o);
        pthread_mutex_unlock(&g_lock);
    }
}

/* Copy the op out of the session for a request (so no lock is held); a key
 * that is gone ends the operation. Free the copy with op_clear. */
static CK_RV op_begin(CK_SESSION_HANDLE hs, int slot, struct op *copy, struct keyref *kr) {
    struct op *o;
    CK_RV rv = op_lock(hs, slot, &o);
    if (rv != CKR_OK)
        return rv;
    if (slot != OPS_DIGEST && kr)
        rv = keyref_of(o->key, kr, NULL);
    if (rv == CKR_OK)
        rv = op_dup(copy, o);
    if (rv != CKR_OK)
        op_clear(o);
    pthread_mutex_unlock(&g_lock);
    return rv;
}

/* Keep a result after a length query / short buffer (the op stays active). */
static void op_keep(CK_SESSION_HANDLE hs, int slot, const unsigned char *in, size_t in_len,
                    unsigned char *res, size_t res_len, int final) {
    struct op *o;
    if (op_lock(hs, slot, &o) == CKR_OK) {
        free(o->res);
        free(o->in);
        o->res = NULL;
        o->have_res = 0;
        o->in = malloc(in_len ? in_len : 1);
        if (o->in) {
            if (in_len)
                memcpy(o->in, in, in_len);
            o->in_len = in_len;
            o->res = res;
            o->res_len = res_len;
            o->have_res = 1;
            o->res_final = final;
            res = NULL;
        }
        pthread_mutex_unlock(&g_lock);
    }
    free(res);
}

/* Hand a result to the caller under PKCS#11's length rules: a length query
 * (out NULL) and a short buffer keep the operation and its result; the
 * result taken ends it. */
static CK_RV deliver(CK_SESSION_HANDLE hs, int slot, const unsigned char *in, size_t in_len,
                     unsigned char *res, size_t res_len, CK_BYTE_PTR out, CK_ULONG_PTR out_len) {
    if (!out || *out_len < res_len) {
        CK_RV rv = out ? CKR_BUFFER_TOO_SMALL : CKR_OK;
        *out_len = res_len;
        op_keep(hs, slot, in, in_len, res, res_len, 1);
        return rv;
    }
    memcpy(out, res, res_len);
    *out_len = res_len;
    free(res);
    op_end(hs, slot);
    return CKR_OK;
}

/* A single-part call (C_Sign, C_Encrypt, C_Decrypt, C_Digest) or a Final
 * (in == NULL: the buffered input). Any error but a short buffer ends the
 * operation (PKCS#11 2.40 5.8: C_Encrypt "always terminates the active
 * encryption operation unless it returns CKR_BUFFER_TOO_SMALL or is a
 * successful call ... to determine the length"), bad arguments too. */
static CK_RV run_op(CK_SESSION_HANDLE hs, int slot, CK_BYTE_PTR in, CK_ULONG in_len,
                    CK_BYTE_PTR out, CK_ULONG_PTR out_len, int final) {
    struct op o;
    struct keyref kr;
    CK_RV rv = op_begin(hs, slot, &o, &kr);
    if (rv != CKR_OK)
        return rv;
    unsigned char *res = NULL;
    size_t res_len = 0;
    const unsigned char *data = final ? o.buf : in;
    size_t len = final ? o.len : in_len;
    if (!out_len || (!final && !in && in_len))
        rv = CKR_ARGUMENTS_BAD;
    else if (!final && o.multipart)
        rv = CKR_OPERATION_ACTIVE;
    if (rv != CKR_OK)
        goto fail;
    if (!data)
        data = (const unsigned char *)"";
    if (o.have_res && o.in_len == len && (len == 0 || !memcmp(o.in, data, len))) {
        res = o.res; /* the result of a length query: taken from the copy */
        res_len = o.res_len;
        o.res = NULL;
    } else if (slot == OPS_SIGN)
        rv = do_sign(&o.m, &kr, data, len, NULL, 0, &res, &res_len);
    else if (slot == OPS_DIGEST)
        rv = do_digest(&o.m, data, len, &res, &res_len);
    else
        rv = do_crypt(&o.m, &kr, slot == OPS_DECRYPT, data, len, &res, &res_len);
    if (rv != CKR_OK)
        goto fail;
    rv = deliver(hs, slot, data, len, res, res_len, out, out_len);
    op_clear(&o);
    return rv;
fail:
    op_end(hs, slot);
    op_clear(&o);
    return rv;
}

/* C_DigestUpdate, C_SignUpdate, C_VerifyUpdate: the part is buffered for the
 * Final. An error ends the operation. */
static CK_RV op_update(CK_SESSION_HANDLE hs, int slot, CK_BYTE_PTR part, CK_ULONG len) {
    struct op *o;
    CK_RV rv = op_lock(hs, slot, &o);
    if (rv != CKR_OK)
        return rv;
    o->multipart = 1;
    if (!part && len)
        rv = CKR_ARGUMENTS_BAD;
    else if (o->len + len > MAX_BUFFER)
        rv = CKR_DATA_LEN_RANGE;
    else if (len)
        rv = grow_append(&o->buf, &o->len, &o->cap, part, len);
    if (rv != CKR_OK)
        op_clear(o);
    pthread_mutex_unlock(&g_lock);
    return rv;
}

/* ------------------------------------------------------------- streaming */

/* Multi-part AES GCM/CBC/CBC_PAD/CTR and DES3 CBC/CBC_PAD go through the
 * daemon's streaming paths: /crypto/v1/{encrypt,decrypt}/init at the first
 * Update that has data, one update request per Update (split into pieces of
 * at most a field), final at Final. The daemon's state changes at every step;
 * the op keeps the newest. A GCM decryption keeps back the last tag_bits/8
 * bytes of its input (in the op's buffer): they are the tag, given at final.
 * A stream that never started (no data) ends as a single-part call. */

#define STREAM_PIECE (1024u * 1024) /* the daemon's max_field */

static CK_RV stream_state(const sr_resp *r, unsigned char *state, size_t *state_len) {
    const unsigned char *st;
    size_t n;
    if (sr_get_bin(r->body, "state", &st, &n) || n == 0 || n > 64)
        return CKR_DEVICE_ERROR;
    memcpy(state, st, n);
    *state_len = n;
    return CKR_OK;
}

static CK_RV stream_init(const struct mspec *m, const struct keyref *kr, int decrypt,
                         unsigned char *state, size_t *state_len) {
    sr_body b;
    sr_resp r;
    sr_body_init(&b);
    sr_map(&b, 3 + (m->iv_len > 0) + (m->aad_len > 0));
    put_desc(&b, "key", kr->kid, kr->transient);
    sr_kv_str(&b, "alg", TYPE_NAMES[kr->type]);
    sr_kv_str(&b, "mode", m->mode);
    if (m->iv_len)
        sr_kv_bin(&b, "iv", m->iv, m->iv_len);
    if (m->aad_len)
        sr_kv_bin(&b, "ad", m->aad, m->aad_len);
    CK_RV rv = call("POST", decrypt ? "/crypto/v1/decrypt/init" : "/crypto/v1/encrypt/init", &b, &r);
    sr_body_free(&b);
    if (rv != CKR_OK)
        return rv;
    rv = stream_state(&r, state, state_len);
    sr_resp_free(&r);
    return rv;
}

/* One update request per piece; the output appended to *out. */
static CK_RV stream_send(const struct keyref *kr, int decrypt, unsigned char *state,
                         size_t *state_len, const unsigned char *in, size_t len,
                         unsigned char **out, size_t *out_len, size_t *out_cap) {
    const char *path = decrypt ? "/crypto/v1/decrypt/update" : "/crypto/v1/encrypt/update";
    for (size_t off = 0; off < len;) {
        size_t n = len - off < STREAM_PIECE ? len - off : STREAM_PIECE;
        sr_body b;
        sr_resp r;
        sr_body_init(&b);
        sr_map(&b, 3);
        put_desc(&b, "key", kr->kid, kr->transient);
        sr_kv_bin(&b, "state", state, *state_len);
        sr_kv_bin(&b, decrypt ? "cipher" : "plain", in + off, n);
        CK_RV rv = call("POST", path, &b, &r);
        sr_body_free(&b);
        if (rv != CKR_OK)
            return rv;
        const unsigned char *c;
        size_t cn;
        rv = stream_state(&r, state, state_len);
        if (rv == CKR_OK && sr_get_bin(r.body, decrypt ? "plain" : "cipher", &c, &cn))
            rv = CKR_DEVICE_ERROR;
        if (rv == CKR_OK)
            rv = grow_append(out, out_len, out_cap, c, cn);
        sr_resp_free(&r);
        if (rv != CKR_OK)
            return rv;
        off += n;
    }
    return CKR_OK;
}

/* Write an Update's outcome back into the session's op. hold: the new
 * GCM-decryption tail (taken), or NULL to leave the buffer as it is. */
static void stream_commit(CK_SESSION_HANDLE hs, int slot, const struct op *c, unsigned char *hold,
                          size_t hold_len, int set_hold) {
    struct op *o;
    if (op_lock(hs, slot, &o) == CKR_OK) {
        o->multipart = 1;
        o->started = c->started;
        memcpy(o->state, c->state, c->state_len);
        o->state_len = c->state_len;
        if (set_hold) {
            free(o->buf);
            o->buf = hold;
            o->len = hold_len;
            o->cap = hold_len;
            hold = NULL;
        }
        pthread_mutex_unlock(&g_lock);
    }
    free(hold);
}

/* Hand an Update's output over; keep it after a length query or a short buffer. */
static CK_RV deliver_update(CK_SESSION_HANDLE hs, int slot, const unsigned char *in, size_t in_len,
                            unsigned char *res, size_t res_len, CK_BYTE_PTR out,
                            CK_ULONG_PTR out_len) {
    if (!out || *out_len < res_len) {
        CK_RV rv = out ? CKR_BUFFER_TOO_SMALL : CKR_OK;
        *out_len = res_len;
        op_keep(hs, slot, in, in_len, res, res_len, 0);
        return rv;
    }
    if (res_len)
        memcpy(out, res, res_len);
    *out_len = res_len;
    free(res);
    struct op *o;
    if (op_lock(hs, slot, &o) == CKR_OK) {
        free(o->res);
        free(o->in);
        o->res = o->in = NULL;
        o->res_len = o->in_len = 0;
        o->have_res = o->res_final = 0;
        pthread_mutex_unlock(&g_lock);
    }
    return CKR_OK;
}

/* C_EncryptUpdate, C_DecryptUpdate. An error but a short buffer ends the
 * operation. */
static CK_RV crypt_update(CK_SESSION_HANDLE hs, int slot, CK_BYTE_PTR in, CK_ULONG n,
                          CK_BYTE_PTR out, CK_ULONG_PTR on) {
    struct op o;
    struct keyref kr;
    CK_RV rv = op_begin(hs, slot, &o, &kr);
    if (rv != CKR_OK)
        return rv;
    unsigned char *joined = NULL, *hold = NULL, *res = NULL;
    if (!on || (!in && n)) {
        rv = CKR_ARGUMENTS_BAD;
        goto fail;
    }
    if (!o.stream) { /* buffered: everything comes out at Final */
        op_clear(&o);
        if (!out) { /* a length query consumes nothing */
            *on = 0;
            return CKR_OK;
        }
        rv = op_update(hs, slot, in, n);
        if (rv == CKR_OK)
            *on = 0;
        return rv;
    }
    const unsigned char *data = in ? in : (const unsigned char *)"";
    if (o.have_res) {
        /* The output of an earlier call with this input, not yet taken. */
        if (o.res_final || o.in_len != n || (n && memcmp(o.in, data, n))) {
            rv = CKR_FUNCTION_FAILED;
            goto fail;
        }
        res = o.res;
        o.res = NULL;
        rv = deliver_update(hs, slot, data, n, res, o.res_len, out, on);
        op_clear(&o);
        return rv;
    }
    int decrypt = slot == OPS_DECRYPT;
    int gcm_dec = decrypt && !strcmp(o.m.mode, "GCM");
    size_t tag_len = o.m.tag_bits / 8;
    const unsigned char *send = data;
    size_t send_len = n, hold_len = 0;
    if (gcm_dec) {
        size_t total = o.len + n;
        joined = malloc(total + 1);
        hold = malloc((total < tag_len ? total : tag_len) + 1);
        if (!joined || !hold) {
            rv = CKR_HOST_MEMORY;
            goto fail;
        }
        if (o.len)
            memcpy(joined, o.buf, o.len);
        if (n)
            memcpy(joined + o.len, data, n);
        hold_len = total < tag_len ? total : tag_len;
        send = joined;
        send_len = total - hold_len;
        memcpy(hold, joined + send_len, hold_len);
    }
    size_t res_len = 0, res_cap = 0;
    if (send_len && !o.started) {
        rv = stream_init(&o.m, &kr, decrypt, o.state, &o.state_len);
        if (rv == CKR_OK)
            o.started = 1;
    }
    if (rv == CKR_OK && send_len)
        rv = stream_send(&kr, decrypt, o.state, &o.state_len, send, send_len, &res, &res_len,
                         &res_cap);
    if (rv == CKR_OK && !res)
        rv = grow_append(&res, &res_len, &res_cap, NULL, 0);
    if (rv != CKR_OK)
        goto fail;
    free(joined);
    stream_commit(hs, slot, &o, hold, hold_len, gcm_dec);
    op_clear(&o);
    return deliver_update(hs, slot, data, n, res, res_len, out, on);
fail:
    free(joined);
    free(hold);
    free(res);
    op_end(hs, slot);
    op_clear(&o);
    return rv;
}

/* C_EncryptFinal, C_DecryptFinal. */
static CK_RV crypt_final(CK_SESSION_HANDLE hs, int slot, CK_BYTE_PTR out, CK_ULONG_PTR on) {
    struct op o;
    struct keyref kr;
    CK_RV rv = op_begin(hs, slot, &o, &kr);
    if (rv != CKR_OK)
        return rv;
    unsigned char *res = NULL;
    size_t res_len = 0, res_cap = 0;
    if (!on)
        rv = CKR_ARGUMENTS_BAD;
    else if (o.have_res && !o.res_final) /* an Update's output was never taken */
        rv = CKR_FUNCTION_FAILED;
    if (rv != CKR_OK)
        goto fail;
    if (!o.stream || !o.started) {
        op_clear(&o);
        return run_op(hs, slot, NULL, 0, out, on, 1);
    }
    if (o.have_res) {
        res = o.res;
        o.res = NULL;
        rv = deliver(hs, slot, (const unsigned char *)"", 0, res, o.res_len, out, on);
        op_clear(&o);
        return rv;
    }
    int decrypt = slot == OPS_DECRYPT;
    int gcm = !strcmp(o.m.mode, "GCM");
    size_t tag_len = o.m.tag_bits / 8;
    if (decrypt && gcm && o.len != tag_len) {
        rv = CKR_ENCRYPTED_DATA_LEN_RANGE;
        goto fail;
    }
    sr_body b;
    sr_resp r;
    sr_body_init(&b);
    sr_map(&b, 2 + (gcm ? 1 : 0));
    put_desc(&b, "key", kr.kid, kr.transient);
    sr_kv_bin(&b, "state", o.state, o.state_len);
    if (gcm && decrypt)
        sr_kv_bin(&b, "tag", o.buf, o.len);
    else if (gcm)
        sr_kv_int(&b, "tag_len", (int64_t)o.m.tag_bits);
    rv = call("POST", decrypt ? "/crypto/v1/decrypt/final" : "/crypto/v1/encrypt/final", &b, &r);
    sr_body_free(&b);
    if (rv != CKR_OK)
        goto fail;
    const unsigned char *c, *t = NULL;
    size_t cn, tn = 0;
    if (sr_get_bin(r.body, decrypt ? "plain" : "cipher", &c, &cn))
        rv = CKR_DEVICE_ERROR;
    if (rv == CKR_OK && !decrypt && gcm && (sr_get_bin(r.body, "tag", &t, &tn) || tn != tag_len))
        rv = CKR_DEVICE_ERROR;
    if (rv == CKR_OK)
        rv = grow_append(&res, &res_len, &res_cap, c, cn);
    if (rv == CKR_OK && tn)
        rv = grow_append(&res, &res_len, &res_cap, t, tn);
    sr_resp_free(&r);
    if (rv != CKR_OK)
        goto fail;
    op_clear(&o);
    /* The daemon ended the stream: a length query keeps the result. */
    return deliver(hs, slot, (const unsigned char *)"", 0, res, res_len, out, on);
fail:
    free(res);
    op_end(hs, slot);
    op_clear(&o);
    return rv;
}

/* A started stream a closing session leaves behind. */
struct stream_left {
    char kid[64];
    int transient, decrypt, gcm;
    unsigned char state[64];
    size_t state_len;
};

/* Under the lock: take the session's started streams out (at most 2). */
static size_t streams_take(struct session *s, struct stream_left *left) {
    size_t n = 0;
    for (int slot = OPS_ENCRYPT; slot <= OPS_DECRYPT; slot++) {
        struct op *o = &s->ops[slot];
        struct key *k = o->active && o->stream && o->started ? obj_key(o->key, NULL) : NULL;
        if (!k)
            continue;
        struct stream_left *l = &left[n++];
        strcpy(l->kid, k->kid);
        l->transient = k->transient;
        l->decrypt = slot == OPS_DECRYPT;
        l->gcm = !strcmp(o->m.mode, "GCM");
        memcpy(l->state, o->state, o->state_len);
        l->state_len = o->state_len;
        op_clear(o); /* the operation ends with its stream */
    }
    return n;
}

/* End the started streams of every session (before a logout). */
static void streams_end(const struct stream_left *left, size_t n);
static void end_all_streams(void) {
    pthread_mutex_lock(&g_lock);
    size_t n = 0;
    for (size_t i = 0; sessions && i < MAX_SESSIONS; i++)
        for (int slot = OPS_ENCRYPT; slot <= OPS_DECRYPT; slot++)
            n += sessions[i].used && sessions[i].ops[slot].active && sessions[i].ops[slot].started;
    struct stream_left *left = n ? malloc(n * sizeof *left) : NULL;
    size_t got = 0;
    for (size_t i = 0; left && sessions && i < MAX_SESSIONS && got < n; i++)
        if (sessions[i].used) {
            struct stream_left two[2];
            size_t k = streams_take(&sessions[i], two);
            for (size_t j = 0; j < k && got < n; j++)
                left[got++] = two[j];
        }
    pthread_mutex_unlock(&g_lock);
    streams_end(left, got);
    free(left);
}

/* Without the lock: end them in the daemon (final ends a stream whatever it
 * answers), so they do not count against the caller's open streams until
 * the daemon's idle timeout. Best effort. */
static void streams_end(const struct stream_left *left, size_t n) {
    static const unsigned char no_tag[16];
    for (size_t i = 0; i < n; i++) {
        const struct stream_left *l = &left[i];
        sr_body b;
        sr_resp r;
        sr_body_init(&b);
        sr_map(&b, 2 + (l->gcm && l->decrypt));
        put_desc(&b, "key", l->kid, l->transient);
        sr_kv_bin(&b, "state", l->state, l->state_len);
        if (l->gcm && l->decrypt)
            sr_kv_bin(&b, "tag", no_tag, sizeof no_tag);
        if (sr_call("POST", l->decrypt ? "/crypto/v1/decrypt/final" : "/crypto/v1/encrypt/final",
                    &b, &r) == CKR_OK)
            sr_resp_free(&r);
        sr_body_free(&b);
    }
}


/* ====================================================================== */
/*                          the PKCS#11 functions                          */
/* ====================================================================== */

static void read_config(void) {
    memset(&sr_cfg, 0, sizeof sr_cfg);
    strcpy(sr_cfg.token_label, "strongroom");
    sr_cfg.timeout_ms = 120000;
    const char *sd = getenv("STRONGROOM_STATE_DIR");
    snprintf(sr_cfg.socket, sizeof sr_cfg.socket, "%s/strongroomd.sock", sd && *sd ? sd : "var");
    char key_file[512] = "";
    const char *path = getenv("STRONGROOM_PKCS11_CONFIG");
    if (path && *path) {
        FILE *f = fopen(path, "r");
        char line[1200];
        while (f && fgets(line, sizeof line, f)) {
            char *p = line, *eq, *v, *e;
            while (isspace((unsigned char)*p))
                p++;
            if (*p == '#' || !(eq = strchr(p, '=')))
                continue;
            *eq = 0;
            for (e = eq; e > p && isspace((unsigned char)e[-1]); e--)
                e[-1] = 0;
            v = eq + 1;
            while (isspace((unsigned char)*v))
                v++;
            for (e = v + strlen(v); e > v && isspace((unsigned char)e[-1]); e--)
                e[-1] = 0;
            if (!strcmp(p, "socket"))
                snprintf(sr_cfg.socket, sizeof sr_cfg.socket, "%s", v);
            else if (!strcmp(p, "token_label"))
                snprintf(sr_cfg.token_label, sizeof sr_cfg.token_label, "%s", v);
            else if (!strcmp(p, "api_key_file"))
                snprintf(key_file, sizeof key_file, "%s", v);
            else if (!strcmp(p, "timeout"))
                sr_cfg.timeout_ms = atoi(v) > 0 ? atoi(v) * 1000 : sr_cfg.timeout_ms;
        }
        if (f)
            fclose(f);
    }
    const char *env = getenv("STRONGROOM_SOCKET");
    if (env && *env)
        snprintf(sr_cfg.socket, sizeof sr_cfg.socket, "%s", env);
    env = getenv("STRONGROOM_PKCS11_API_KEY_FILE");
    if (env && *env)
        snprintf(key_file, sizeof key_file, "%s", env);
    if (key_file[0]) {
        FILE *f = fopen(key_file, "r");
        if (f) {
            if (fgets(sr_cfg.api_key, sizeof sr_cfg.api_key, f)) {
                char *e = sr_cfg.api_key + strlen(sr_cfg.api_key);
                while (e > sr_cfg.api_key && isspace((unsigned char)e[-1]))
                    *--e = 0;
            }
            fclose(f);
        }
    }
}

static void reset_state(void) {
    if (sessions)
        for (size_t i = 0; i < MAX_SESSIONS; i++)
            if (sessions[i].used) {
                for (int j = 0; j < N_OPSLOTS; j++)
                    op_clear(&sessions[i].ops[j]);
                free(sessions[i].found);
            }
    free(sessions);
    sessions = NULL;
    for (size_t i = 0; i < n_keys; i++) {
        free(keys[i].spki);
        free(keys[i].cert);
    }
    free(keys);
    keys = NULL;
    n_keys = cap_keys = 0;
    free(objs);
    objs = NULL;
    n_objs = cap_objs = 0;
    n_open = 0;
    g_init = 0;
}

static void atfork_prepare(void) { pthread_mutex_lock(&g_lock); }
static void atfork_parent(void) { pthread_mutex_unlock(&g_lock); }
static int g_forked; /* initialised in the parent when this child was forked */
static void atfork_child(void) {
    pthread_mutex_init(&g_lock, NULL);
    sr_conn_after_fork_child();
    /* The child must call C_Initialize again (PKCS#11 2.40, 6.7.7). */
    g_forked = g_init;
    reset_state();
}
static pthread_once_t once = PTHREAD_ONCE_INIT;
static void register_atfork(void) { pthread_atfork(atfork_prepare, atfork_parent, atfork_child); }

EXPORT CK_RV C_Initialize(CK_VOID_PTR pInitArgs) {
    if (pInitArgs) {
        CK_C_INITIALIZE_ARGS *a = pInitArgs;
        int fns = (a->CreateMutex != NULL) + (a->DestroyMutex != NULL) + (a->LockMutex != NULL) +
                  (a->UnlockMutex != NULL);
        if (a->pReserved)
            return CKR_ARGUMENTS_BAD;
        if (fns != 0 && fns != 4)
            return CKR_ARGUMENTS_BAD;
        if (fns == 4 && !(a->flags & CKF_OS_LOCKING_OK))
            return CKR_CANT_LOCK;
    }
    pthread_once(&once, register_atfork);
    pthread_mutex_lock(&g_lock);
    if (g_init && g_pid == getpid()) {
        pthread_mutex_unlock(&g_lock);
        return CKR_CRYPTOKI_ALREADY_INITIALIZED;
    }
    reset_state();
    read_config();
    sessions = calloc(MAX_SESSIONS, sizeof *sessions);
    if (!sessions) {
        pthread_mutex_unlock(&g_lock);
        return CKR_HOST_MEMORY;
    }
    sr_conn_init();
    g_pid = getpid();
    g_init = 1;
    g_forked = 0;
    pthread_mutex_unlock(&g_lock);
    return CKR_OK;
}

EXPORT CK_RV C_Finalize(CK_VOID_PTR pReserved) {
    if (pReserved)
        return CKR_ARGUMENTS_BAD;
    CK_RV rv = check_init();
    if (rv != CKR_OK && g_forked && !g_init) {
        /* A forked child finalising what its parent initialised (python-pkcs11's
         * reinitialize): the fork already dropped everything; nothing to do. */
        g_forked = 0;
        return CKR_OK;
    }
    if (rv != CKR_OK)
        return rv;
    sr_conn_close();
    pthread_mutex_lock(&g_lock);
    reset_state();
    pthread_mutex_unlock(&g_lock);
    memset(sr_cfg.api_key, 0, sizeof sr_cfg.api_key);
    return CKR_OK;
}

EXPORT CK_RV C_GetInfo(CK_INFO_PTR p) {
    CK_RV rv = check_init();
    if (rv != CKR_OK)
        return rv;
    if (!p)
        return CKR_ARGUMENTS_BAD;
    memset(p, 0, sizeof *p);
    p->cryptokiVersion.major = 2;
    p->cryptokiVersion.minor = 40;
    pad(p->manufacturerID, 32, "Strongroom");
    pad(p->libraryDescription, 32, "Strongroom PKCS#11 provider");
    p->libraryVersion.major = 0;
    p->libraryVersion.minor = 1;
    return CKR_OK;
}

extern CK_FUNCTION_LIST sr_function_list;

EXPORT CK_RV C_GetFunctionList(CK_FUNCTION_LIST_PTR_PTR pp) {
    if (!pp)
        return CKR_ARGUMENTS_BAD;
    *pp = &sr_function_list;
    return CKR_OK;
}

EXPORT CK_RV C_GetSlotList(CK_BBOOL present, CK_SLOT_ID_PTR list, CK_ULONG_PTR count) {
    CK_RV rv = check_init();
    (void)present;
    if (rv != CKR_OK)
        return rv;
    if (!count)
        return CKR_ARGUMENTS_BAD;
    if (list) {
        if (*count < 1) {
            *count = 1;
            return CKR_BUFFER_TOO_SMALL;
        }
        list[0] = SLOT_ID;
    }
    *count = 1;
    return CKR_OK;
}

EXPORT CK_RV C_GetSlotInfo(CK_SLOT_ID slot, CK_SLOT_INFO_PTR p) {
    CK_RV rv = check_init();
    if (rv != CKR_OK)
        return rv;
    if (slot != SLOT_ID)
        return CKR_SLOT_ID_INVALID;
    if (!p)
        return CKR_ARGUMENTS_BAD;
    memset(p, 0, sizeof *p);
    pad(p->slotDescription, 64, "Strongroom daemon");
    pad(p->manufacturerID, 32, "Strongroom");
    p->flags = CKF_TOKEN_PRESENT;
    return CKR_OK;
}

EXPORT CK_RV C_GetTokenInfo(CK_SLOT_ID slot, CK_TOKEN_INFO_PTR p) {
    CK_RV rv = check_init();
    if (rv != CKR_OK)
        return rv;
    if (slot != SLOT_ID)
        return CKR_SLOT_ID_INVALID;
    if (!p)
        return CKR_ARGUMENTS_BAD;
    memset(p, 0, sizeof *p);
    pad(p->label, 32, sr_cfg.token_label);
    pad(p->manufacturerID, 32, "Strongroom");
    pad(p->model, 16, "strongroomd");
    pad(p->serialNumber, 16, "1");
    p->flags = CKF_RNG | CKF_TOKEN_INITIALIZED | CKF_USER_PIN_INITIALIZED;
    if (!sr_cfg.api_key[0])
        p->flags |= CKF_LOGIN_REQUIRED;
    p->ulMaxSessionCount = CK_EFFECTIVELY_INFINITE;
    p->ulSessionCount = CK_UNAVAILABLE_INFORMATION;
    p->ulMaxRwSessionCount = CK_EFFECTIVELY_INFINITE;
    p->ulRwSessionCount = CK_UNAVAILABLE_INFORMATION;
    p->ulMaxPinLen = 1024;
    p->ulMinPinLen = 1;
    p->ulTotalPublicMemory = CK_UNAVAILABLE_INFORMATION;
    p->ulFreePublicMemory = CK_UNAVAILABLE_INFORMATION;
    p->ulTotalPrivateMemory = CK_UNAVAILABLE_INFORMATION;
    p->ulFreePrivateMemory = CK_UNAVAILABLE_INFORMATION;
    p->hardwareVersion.major = 0;
    p->firmwareVersion.major = 0;
    memset(p->utcTime, ' ', 16);
    return CKR_OK;
}

EXPORT CK_RV C_GetMechanismList(CK_SLOT_ID slot, CK_MECHANISM_TYPE_PTR list, CK_ULONG_PTR count) {
    CK_RV rv = check_init();
    if (rv != CKR_OK)
        return rv;
    if (slot != SLOT_ID)
        return CKR_SLOT_ID_INVALID;
    if (!count)
        return CKR_ARGUMENTS_BAD;
    if (list) {
        if (*count < N_MECHS) {
            *count = N_MECHS;
            return CKR_BUFFER_TOO_SMALL;
        }
        for (size_t i = 0; i < N_MECHS; i++)
            list[i] = MECHS[i].type;
    }
    *count = N_MECHS;
    return CKR_OK;
}

EXPORT CK_RV C_GetMechanismInfo(CK_SLOT_ID slot, CK_MECHANISM_TYPE type, CK_MECHANISM_INFO_PTR p) {
    CK_RV rv = check_init();
    if (rv != CKR_OK)
        return rv;
    if (slot != SLOT_ID)
        return CKR_SLOT_ID_INVALID;
    if (!p)
        return CKR_ARGUMENTS_BAD;
    for (size_t i = 0; i < N_MECHS; i++)
        if (MECHS[i].type == type) {
            p->ulMinKeySize = MECHS[i].min;
            p->ulMaxKeySize = MECHS[i].max;
            /* CKF_HW: the daemon (its HSM) performs it, not this library */
            p->flags = MECHS[i].flags | CKF_HW;
            return CKR_OK;
        }
    return CKR_MECHANISM_INVALID;
}

EXPORT CK_RV C_OpenSession(CK_SLOT_ID slot, CK_FLAGS flags, CK_VOID_PTR app, CK_NOTIFY notify,
                           CK_SESSION_HANDLE_PTR ph) {
    (void)app;
    (void)notify;
    CK_RV rv = check_init();
    if (rv != CKR_OK)
        return rv;
    if (slot != SLOT_ID)
        return CKR_SLOT_ID_INVALID;
    if (!ph)
        return CKR_ARGUMENTS_BAD;
    if (!(flags & CKF_SERIAL_SESSION))
        return CKR_SESSION_PARALLEL_NOT_SUPPORTED;
    pthread_mutex_lock(&g_lock);
    size_t i;
    for (i = 0; i < MAX_SESSIONS && sessions[i].used; i++)
        ;
    if (i == MAX_SESSIONS) {
        pthread_mutex_unlock(&g_lock);
        return CKR_SESSION_COUNT;
    }
    memset(&sessions[i], 0, sizeof sessions[i]);
    sessions[i].used = 1;
    sessions[i].flags = flags;
    n_open++;
    *ph = i + 1;
    pthread_mutex_unlock(&g_lock);
    auto_login();
    return CKR_OK;
}

static void close_session(struct session *s) {
    for (int j = 0; j < N_OPSLOTS; j++)
        op_clear(&s->ops[j]);
    free(s->found);
    memset(s, 0, sizeof *s);
    n_open--;
}

EXPORT CK_RV C_CloseSession(CK_SESSION_HANDLE h) {
    struct stream_left left[2];
    struct session *s;
    CK_RV rv = session_lock(h, NEED_SESSION, &s);
    if (rv != CKR_OK)
        return rv;
    size_t n_left = streams_take(s, left);
    pthread_mutex_unlock(&g_lock);
    streams_end(left, n_left);
    rv = session_lock(h, NEED_SESSION, &s);
    if (rv != CKR_OK)
        return rv;
    close_session(s);
    /* The last session closed logs the user out; under the lock, so that a
     * session opened meanwhile by another thread is not logged out under it. */
    if (n_open == 0 && !sr_cfg.api_key[0])
        sr_conn_logout();
    pthread_mutex_unlock(&g_lock);
    return CKR_OK;
}

EXPORT CK_RV C_CloseAllSessions(CK_SLOT_ID slot) {
    CK_RV rv = check_init();
    if (rv != CKR_OK)
        return rv;
    if (slot != SLOT_ID)
        return CKR_SLOT_ID_INVALID;
    end_all_streams();
    pthread_mutex_lock(&g_lock);
    for (size_t i = 0; sessions && i < MAX_SESSIONS; i++)
        if (sessions[i].used)
            close_session(&sessions[i]);
    if (!sr_cfg.api_key[0])
        sr_conn_logout();
    pthread_mutex_unlock(&g_lock);
    return CKR_OK;
}

EXPORT CK_RV C_GetSessionInfo(CK_SESSION_HANDLE h, CK_SESSION_INFO_PTR p) {
    struct session *s;
    CK_RV rv = session_lock(h, NEED_SESSION, &s);
    if (rv != CKR_OK)
        return rv;
    if (!p) {
        pthread_mutex_unlock(&g_lock);
        return CKR_ARGUMENTS_BAD;
    }
    int rw = (s->flags & CKF_RW_SESSION) != 0;
    p->slotID = SLOT_ID;
    p->flags = s->flags;
    p->ulDeviceError = 0;
    pthread_mutex_unlock(&g_lock);
    int in = logged_in();
    p->state = in ? (rw ? CKS_RW_USER_FUNCTIONS : CKS_RO_USER_FUNCTIONS)
                  : (rw ? CKS_RW_PUBLIC_SESSION : CKS_RO_PUBLIC_SESSION);
    return CKR_OK;
}

EXPORT CK_RV C_Login(CK_SESSION_HANDLE h, CK_USER_TYPE user, CK_UTF8CHAR_PTR pin, CK_ULONG len) {
    CK_RV rv = session_check(h, NEED_SESSION);
    if (rv != CKR_OK)
        return rv;
    if (user == CKU_CONTEXT_SPECIFIC)
        return CKR_OPERATION_NOT_INITIALIZED;
    if (user != CKU_USER)
        return CKR_USER_TYPE_INVALID;
    if (logged_in())
        return CKR_USER_ALREADY_LOGGED_IN;
    if (!pin)
        return CKR_ARGUMENTS_BAD; /* no protected authentication path here */
    if (len == 0 || len > 1024)
        return CKR_PIN_INCORRECT;
    sr_resp r;
    rv = sr_conn_login((const char *)pin, len, &r);
    if (rv != CKR_OK)
        return rv;
    if (r.status == 200)
        rv = CKR_OK;
    else if (r.status == 401 || r.status == 400)
        rv = CKR_PIN_INCORRECT;
    else
        rv = map_error(&r);
    sr_resp_free(&r);
    if (rv == CKR_OK)
        refresh();
    return rv;
}

EXPORT CK_RV C_Logout(CK_SESSION_HANDLE h) {
    CK_RV rv = session_check(h, NEED_LOGIN);
    if (rv != CKR_OK)
        return rv;
    end_all_streams();
    sr_conn_logout();
    return CKR_OK;
}

/* ---------------------------------------------------------------- objects */

static CK_RV export_value(const struct keyref *kr, unsigned char **v, size_t *n);

/* Keep a certificate's DER with its key; caller holds g_lock; takes v. */
static void cert_store(struct key *k, unsigned char *v, size_t n) {
    if (k->cert) {
        free(v);
        return;
    }
    k->cert = v;
    k->cert_len = n;
    if (sr_parse_cert(v, n, &k->c))
        memset(&k->c, 0, sizeof k->c);
}

/* Fetch the DER of the certificate object ho if it is one and not yet known
 * (POST /crypto/v1/keys/export). No lock held on entry. */
static CK_RV cert_fetch(CK_OBJECT_HANDLE ho) {
    struct keyref kr;
    struct obj *o;
    pthread_mutex_lock(&g_lock);
    struct key *k = obj_key(ho, &o);
    int need = k && o->cls == CKO_CERTIFICATE && !k->cert;
    if (need)
        keyref_of(ho, &kr, NULL);
    pthread_mutex_unlock(&g_lock);
    if (!need)
        return CKR_OK;
    unsigned char *v = NULL;
    size_t n = 0;
    CK_RV rv = export_value(&kr, &v, &n);
    if (rv != CKR_OK)
        return rv;
    pthread_mutex_lock(&g_lock);
    k = obj_key(ho, NULL);
    if (k && !strcmp(k->kid, kr.kid))
        cert_store(k, v, n);
    else
        free(v);
    pthread_mutex_unlock(&g_lock);
    return CKR_OK;
}

static int matches(const struct obj *o, const struct key *k, CK_ATTRIBUTE_PTR t, CK_ULONG n) {
    unsigned char scratch[1100];
    for (CK_ULONG i = 0; i < n; i++) {
        const void *p;
        CK_ULONG len;
        if (attr_value(o, k, t[i].type, &p, &len, scratch) != CKR_OK)
            return 0;
        if (len != t[i].ulValueLen || (len && (!t[i].pValue || memcmp(p, t[i].pValue, len))))
            return 0;
    }
    return 1;
}

EXPORT CK_RV C_FindObjectsInit(CK_SESSION_HANDLE h, CK_ATTRIBUTE_PTR t, CK_ULONG n) {
    struct session *s;
    CK_RV rv = session_lock(h, NEED_SESSION, &s);
    if (rv != CKR_OK)
        return rv;
    int active = s->finding;
    pthread_mutex_unlock(&g_lock);
    if (!t && n)
        return CKR_ARGUMENTS_BAD;
    if (active)
        return CKR_OPERATION_ACTIVE;
    auto_login();
    int in = logged_in();
    if (in) {
        rv = refresh();
        if (rv != CKR_OK)
            return rv;
        int der = 0;
        for (CK_ULONG i = 0; i < n; i++)
            der |= cert_der_attr(t[i].type);
        for (CK_OBJECT_HANDLE ho = 1; der; ho++) {
            pthread_mutex_lock(&g_lock);
            int more = ho <= n_objs;
            pthread_mutex_unlock(&g_lock);
            if (!more)
                break;
            rv = cert_fetch(ho);
            if (rv == CKR_DEVICE_ERROR)
                return rv; /* other errors: the certificate just does not match */
        }
    }
    rv = session_lock(h, NEED_SESSION, &s);
    if (rv != CKR_OK)
        return rv;
    free(s->found);
    s->found = calloc(n_objs + 1, sizeof *s->found);
    s->n_found = s->pos = 0;
    if (!s->found) {
        pthread_mutex_unlock(&g_lock);
        return CKR_HOST_MEMORY;
    }
    if (in)
        for (size_t i = 0; i < n_objs; i++) {
            struct obj *o;
            struct key *k = obj_key(i + 1, &o);
            if (k && matches(o, k, t, n))
                s->found[s->n_found++] = i + 1;
        }
    s->finding = 1;
    pthread_mutex_unlock(&g_lock);
    return CKR_OK;
}

EXPORT CK_RV C_FindObjects(CK_SESSION_HANDLE h, CK_OBJECT_HANDLE_PTR out, CK_ULONG max,
                           CK_ULONG_PTR count) {
    struct session *s;
    CK_RV rv = session_lock(h, NEED_SESSION, &s);
    if (rv != CKR_OK)
        return rv;
    if (!out || !count)
        rv = CKR_ARGUMENTS_BAD;
    else if (!s->finding)
        rv = CKR_OPERATION_NOT_INITIALIZED;
    else {
        CK_ULONG c = 0;
        while (c < max && s->pos < s->n_found)
            out[c++] = s->found[s->pos++];
        *count = c;
    }
    pthread_mutex_unlock(&g_lock);
    return rv;
}

EXPORT CK_RV C_FindObjectsFinal(CK_SESSION_HANDLE h) {
    struct session *s;
    CK_RV rv = session_lock(h, NEED_SESSION, &s);
    if (rv != CKR_OK)
        return rv;
    if (!s->finding)
        rv = CKR_OPERATION_NOT_INITIALIZED;
    else {
        free(s->found);
        s->found = NULL;
        s->finding = 0;
    }
    pthread_mutex_unlock(&g_lock);
    return rv;
}

/* The value of an exportable secret key, through /crypto/v1/keys/export. */
static CK_RV export_value(const struct keyref *kr, unsigned char **v, size_t *n) {
    sr_body b;
    sr_resp r;
    const unsigned char *p;
    sr_body_init(&b);
    sr_map(&b, 1);
    sr_kv_str(&b, kr->transient ? "transient_key" : "kid", kr->kid);
    CK_RV rv = call("POST", "/crypto/v1/keys/export", &b, &r);
    sr_body_free(&b);
    if (rv != CKR_OK)
        return rv == CKR_KEY_FUNCTION_NOT_PERMITTED ? CKR_ATTRIBUTE_SENSITIVE : rv;
    if (sr_get_bin(r.body, "value", &p, n) || !(*v = malloc(*n + 1))) {
        sr_resp_free(&r);
        return CKR_DEVICE_ERROR;
    }
    memcpy(*v, p, *n);
    sr_resp_free(&r);
    return CKR_OK;
}

EXPORT CK_RV C_GetAttributeValue(CK_SESSION_HANDLE h, CK_OBJECT_HANDLE ho, CK_ATTRIBUTE_PTR t,
                                 CK_ULONG n) {
    struct session *s;
    CK_RV rv = session_check(h, NEED_SESSION), result = CKR_OK;
    if (rv != CKR_OK)
        return rv;
    if (!t && n)
        return CKR_ARGUMENTS_BAD;
    int want_value = 0;
    struct keyref kr;
    for (CK_ULONG i = 0; i < n; i++)
        if (cert_der_attr(t[i].type)) {
            if (logged_in() && cert_fetch(ho) == CKR_DEVICE_ERROR)
                return CKR_DEVICE_ERROR;
            break;
        }
    rv = session_lock(h, NEED_SESSION, &s);
    if (rv != CKR_OK)
        return rv;
    struct obj *o;
    struct key *k = logged_in() ? obj_key(ho, &o) : NULL;
    if (!k) {
        pthread_mutex_unlock(&g_lock);
        return CKR_OBJECT_HANDLE_INVALID;
    }
    unsigned char scratch[1100];
    for (CK_ULONG i = 0; i < n; i++) {
        const void *p;
        CK_ULONG len;
        rv = attr_value(o, k, t[i].type, &p, &len, scratch);
        if (rv == CKR_ATTRIBUTE_TYPE_INVALID && t[i].type == CKA_VALUE && o->cls == CKO_SECRET_KEY) {
            want_value = 1; /* exportable: fetched below */
            continue;
        }
        if (rv != CKR_OK) {
            t[i].ulValueLen = CK_UNAVAILABLE_INFORMATION;
            if (result == CKR_OK || rv == CKR_ATTRIBUTE_SENSITIVE)
                result = rv;
            continue;
        }
        if (!t[i].pValue)
            t[i].ulValueLen = len;
        else if (t[i].ulValueLen < len) {
            t[i].ulValueLen = CK_UNAVAILABLE_INFORMATION;
            if (result == CKR_OK)
                result = CKR_BUFFER_TOO_SMALL;
        } else {
            memcpy(t[i].pValue, p, len);
            t[i].ulValueLen = len;
        }
    }
    if (want_value)
        keyref_of(ho, &kr, NULL);
    pthread_mutex_unlock(&g_lock);
    if (want_value) {
        unsigned char *v = NULL;
        size_t vn = 0;
        rv = export_value(&kr, &v, &vn);
        for (CK_ULONG i = 0; i < n; i++) {
            if (t[i].type != CKA_VALUE)
                continue;
            if (rv != CKR_OK) {
                t[i].ulValueLen = CK_UNAVAILABLE_INFORMATION;
                if (result == CKR_OK || rv == CKR_ATTRIBUTE_SENSITIVE)
                    result = rv == CKR_ATTRIBUTE_SENSITIVE ? rv : rv;
            } else if (!t[i].pValue) {
                t[i].ulValueLen = vn;
            } else if (t[i].ulValueLen < vn) {
                t[i].ulValueLen = CK_UNAVAILABLE_INFORMATION;
                if (result == CKR_OK)
                    result = CKR_BUFFER_TOO_SMALL;
            } else {
                memcpy(t[i].pValue, v, vn);
                t[i].ulValueLen = vn;
            }
        }
        if (v) {
            memset(v, 0, vn);
            free(v);
        }
    }
    return result;
}

EXPORT CK_RV C_SetAttributeValue(CK_SESSION_HANDLE h, CK_OBJECT_HANDLE ho, CK_ATTRIBUTE_PTR t,
                                 CK_ULONG n) {
    struct session *s;
    struct keyref kr;
    CK_RV rv = session_lock(h, NEED_LOGIN, &s);
    if (rv != CKR_OK)
        return rv;
    if (!t && n)
        rv = CKR_ARGUMENTS_BAD;
    else if (keyref_of(ho, &kr, NULL) != CKR_OK)
        rv = CKR_OBJECT_HANDLE_INVALID;
    pthread_mutex_unlock(&g_lock);
    if (rv != CKR_OK)
        return rv;
    const CK_ATTRIBUTE *label = NULL;
    for (CK_ULONG i = 0; i < n; i++) {
        if (t[i].type == CKA_LABEL)
            label = &t[i];
        else
            return CKR_ATTRIBUTE_READ_ONLY;
    }
    if (!label)
        return CKR_OK;
    if (!label->pValue || !label->ulValueLen)
        return CKR_ATTRIBUTE_VALUE_INVALID;
    char path[128];
    sr_body b;
    sr_resp r;
    snprintf(path, sizeof path, "/crypto/v1/keys/%s", kr.kid);
    sr_body_init(&b);
    sr_map(&b, 1);
    sr_str(&b, "name");
    sr_strn(&b, label->pValue, label->ulValueLen);
    rv = call("PATCH", path, &b, &r);
    sr_body_free(&b);
    if (rv != CKR_OK)
        return rv == CKR_ARGUMENTS_BAD ? CKR_ATTRIBUTE_VALUE_INVALID : rv;
    pthread_mutex_lock(&g_lock);
    if (r.body && r.body->type == MSGPACK_OBJECT_MAP)
        upsert_key(r.body, sr_conn_generation());
    pthread_mutex_unlock(&g_lock);
    sr_resp_free(&r);
    return CKR_OK;
}

/* ---------------------------------------------------------- new keys */

struct tmpl {
    const char *label;
    size_t label_len;
    int token; /* -1 unset */
    int extractable;
    unsigned ops, ops_set;
    CK_ULONG value_len, modulus_bits;
    const unsigned char *ec_params, *value, *exponent;
    size_t ec_params_len, value_len_bytes, exponent_len;
    CK_KEY_TYPE key_type;
    int key_type_set;
    CK_OBJECT_CLASS cls;
    int cls_set;
    /* key import: RSA numbers (n, e, d, p, q, dp, dq, qinv) and the EC point */
    const unsigned char *rsa[8];
    size_t rsa_len[8];
    const unsigned char *ec_point;
    size_t ec_point_len;
};

static const CK_ATTRIBUTE_TYPE RSA_ATTRS[8] = {
    CKA_MODULUS, CKA_PUBLIC_EXPONENT, CKA_PRIVATE_EXPONENT, CKA_PRIME_1,
    CKA_PRIME_2, CKA_EXPONENT_1,      CKA_EXPONENT_2,       CKA_COEFFICIENT,
};

static int tbool(const CK_ATTRIBUTE *a) {
    return a->pValue && a->ulValueLen == sizeof(CK_BBOOL) && *(CK_BBOOL *)a->pValue;
}

static CK_RV read_tmpl(CK_ATTRIBUTE_PTR t, CK_ULONG n, struct tmpl *o, int mac) {
    if (!t && n)
        return CKR_ARGUMENTS_BAD;
    for (CK_ULONG i = 0; i < n; i++) {
        const CK_ATTRIBUTE *a = &t[i];
        unsigned bit = 0;
        switch (a->type) {
        case CKA_LABEL:
            o->label = a->pValue;
            o->label_len = a->ulValueLen;
            break;
        case CKA_TOKEN:
            o->token = tbool(a);
            break;
        case CKA_EXTRACTABLE:
            o->extractable = tbool(a);
            break;
        case CKA_SENSITIVE:
        case CKA_PRIVATE:
        case CKA_ID:
        case CKA_MODIFIABLE:
        case CKA_SUBJECT:
        case CKA_START_DATE:
        case CKA_END_DATE:
        case CKA_DESTROYABLE:
        case CKA_COPYABLE:
        case CKA_ALWAYS_AUTHENTICATE:
        case CKA_SIGN_RECOVER:
        case CKA_VERIFY_RECOVER:
        case CKA_CERTIFICATE_TYPE:
        case CKA_ISSUER:
        case CKA_SERIAL_NUMBER:
        case CKA_TRUSTED:
            break; /* accepted; the daemon decides */
        case CKA_ENCRYPT:
            bit = OP_ENCRYPT;
            break;
        case CKA_DECRYPT:
            bit = OP_DECRYPT;
            break;
        case CKA_SIGN:
            bit = mac ? OP_MACGENERATE : OP_SIGN;
            break;
        case CKA_VERIFY:
            bit = mac ? OP_MACVERIFY : OP_VERIFY;
            break;
        case CKA_WRAP:
            bit = OP_WRAPKEY;
            break;
        case CKA_UNWRAP:
            bit = OP_UNWRAPKEY;
            break;
        case CKA_DERIVE:
            bit = OP_DERIVEKEY | OP_AGREEKEY;
            break;
        case CKA_VALUE_LEN:
            if (!a->pValue || a->ulValueLen != sizeof(CK_ULONG))
                return CKR_ATTRIBUTE_VALUE_INVALID;
            o->value_len = *(CK_ULONG *)a->pValue;
            break;
        case CKA_MODULUS_BITS:
            if (!a->pValue || a->ulValueLen != sizeof(CK_ULONG))
                return CKR_ATTRIBUTE_VALUE_INVALID;
            o->modulus_bits = *(CK_ULONG *)a->pValue;
            break;
        case CKA_PUBLIC_EXPONENT:
            o->exponent = a->pValue;
            o->exponent_len = a->ulValueLen;
            o->rsa[1] = a->pValue;
            o->rsa_len[1] = a->ulValueLen;
            break;
        case CKA_MODULUS:
        case CKA_PRIVATE_EXPONENT:
        case CKA_PRIME_1:
        case CKA_PRIME_2:
        case CKA_EXPONENT_1:
        case CKA_EXPONENT_2:
        case CKA_COEFFICIENT:
            for (int j = 0; j < 8; j++)
                if (RSA_ATTRS[j] == a->type) {
                    o->rsa[j] = a->pValue;
                    o->rsa_len[j] = a->ulValueLen;
                }
            break;
        case CKA_EC_POINT:
            o->ec_point = a->pValue;
            o->ec_point_len = a->ulValueLen;
            break;
        case CKA_EC_PARAMS:
            o->ec_params = a->pValue;
            o->ec_params_len = a->ulValueLen;
            break;
        case CKA_VALUE:
            o->value = a->pValue;
            o->value_len_bytes = a->ulValueLen;
            break;
        case CKA_KEY_TYPE:
            if (!a->pValue || a->ulValueLen != sizeof(CK_KEY_TYPE))
                return CKR_ATTRIBUTE_VALUE_INVALID;
            o->key_type = *(CK_KEY_TYPE *)a->pValue;
            o->key_type_set = 1;
            break;
        case CKA_CLASS:
            if (!a->pValue || a->ulValueLen != sizeof(CK_OBJECT_CLASS))
                return CKR_ATTRIBUTE_VALUE_INVALID;
            o->cls = *(CK_OBJECT_CLASS *)a->pValue;
            o->cls_set = 1;
            break;
        default:
            return CKR_ATTRIBUTE_TYPE_INVALID;
        }
        if (bit) {
            o->ops_set |= bit;
            if (tbool(a))
                o->ops |= bit;
            else
                o->ops &= ~bit;
        }
    }
    return CKR_OK;
}

static void tmpl_init(struct tmpl *t) {
    memset(t, 0, sizeof *t);
    t->token = -1;
}

static int is_mac_type(CK_KEY_TYPE kt) {
    return kt == CKK_GENERIC_SECRET || kt == CKK_SHA_1_HMAC || kt == CKK_SHA256_HMAC ||
           kt == CKK_SHA384_HMAC || kt == CKK_SHA512_HMAC;
}

static const struct {
    const char *name;
    unsigned char der[12];
    size_t len;
} CURVES[] = {
    {"NistP256", {0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07}, 10},
    {"NistP384", {0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x22}, 7},
    {"NistP521", {0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x23}, 7},
    {"SecP256K1", {0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x0a}, 7},
    {"Ed25519", {0x06, 0x03, 0x2b, 0x65, 0x70}, 5},
};

static const char *curve_of(const unsigned char *p, size_t n) {
    for (size_t i = 0; i < sizeof CURVES / sizeof CURVES[0]; i++)
        if (n == CURVES[i].len && !memcmp(p, CURVES[i].der, n))
            return CURVES[i].name;
    /* PrintableString "edwards25519" (RFC 8410 alternative some tools send) */
    if (n == 14 && p[0] == 0x13 && !memcmp(p + 2, "edwards25519", 12))
        return "Ed25519";
    return NULL;
}

static size_t curve_size(const char *name) {
    if (!strcmp(name, "NistP384"))
        return 48;
    if (!strcmp(name, "NistP521"))
        return 66;
    return 32; /* P-256, secp256k1, Ed25519 */
}

/* CKA_EC_POINT or an ECDH public value: the raw point, unwrapped from a DER
 * OCTET STRING when it is one (both forms occur in the wild). */
static int ec_point_raw(const char *curve, const unsigned char *p, size_t n,
                        const unsigned char **out, size_t *out_len) {
    int ed = !strcmp(curve, "Ed25519");
    size_t raw = ed ? 32 : 1 + 2 * curve_size(curve);
    if (!p)
        return -1;
    if (n == raw && (ed || p[0] == 0x04)) {
        *out = p;
        *out_len = n;
        return 0;
    }
    size_t h = 0, l = 0;
    if (n >= 2 && p[0] == 0x04 && p[1] < 0x80) {
        h = 2;
        l = p[1];
    } else if (n >= 3 && p[0] == 0x04 && p[1] == 0x81) {
        h = 3;
        l = p[2];
    }
    if (h && l == raw && h + l == n && (ed || p[h] == 0x04)) {
        *out = p + h;
        *out_len = l;
        return 0;
    }
    return -1;
}

/* A transient key (the session object of PKCS#11): CKA_TOKEN=false in either
 * template, or neither CKA_TOKEN nor CKA_LABEL given. CKA_TOKEN defaults to
 * false in the spec, and Java's KeyPairGenerator, KeyGenerator and public-key
 * imports send neither; a stored key needs a name, so a CKA_LABEL without
 * CKA_TOKEN still makes a stored key, as it always has here. */
static int transient_of(const struct tmpl *a, const struct tmpl *b) {
    if (a->token == 0 || (b && b->token == 0))
        return 1;
    if (a->token == 1 || (b && b->token == 1))
        return 0;
    return !a->label && !(b && b->label);
}

/* The common fields of a create/import/unwrap body: name, key_ops, transient. */
static size_t common_fields(const struct tmpl *a, const struct tmpl *b, int type) {
    size_t n = 0;
    unsigned set = a->ops_set | (b ? b->ops_set : 0);
    int extract = a->extractable || (b && b->extractable);
    (void)type;
    if (a->label || (b && b->label))
        n++;
    if (set || extract)
        n++;
    if (transient_of(a, b))
        n++;
    return n;
}

static void put_common(sr_body *bd, const struct tmpl *a, const struct tmpl *b, int type) {
    const struct tmpl *l = a->label ? a : (b && b->label ? b : NULL);
    unsigned set = a->ops_set | (b ? b->ops_set : 0);
    unsigned ops = (a->ops | (b ? b->ops : 0)) & allowed_ops(type);
    int extract = a->extractable || (b && b->extractable);
    if (l) {
        sr_str(bd, "name");
        sr_strn(bd, l->label, l->label_len);
    }
    if (set || extract) {
        if (!set) /* only CKA_EXTRACTABLE: the type's defaults plus EXPORT */
            ops = 0;
        if (extract)
            ops |= OP_EXPORT;
        if (!set) {
            switch (type) {
            case T_AES:
            case T_DES3:
                ops |= OP_ENCRYPT | OP_DECRYPT | OP_WRAPKEY | OP_UNWRAPKEY;
                break;
            case T_HMAC:
                ops |= OP_MACGENERATE | OP_MACVERIFY;
                break;
            case T_SECRET:
                ops |= OP_DERIVEKEY;
                break;
            case T_RSA:
                ops |= OP_SIGN | OP_VERIFY | OP_ENCRYPT | OP_DECRYPT;
                break;
            case T_EC:
                ops |= OP_SIGN | OP_VERIFY;
                break;
            }
        }
        ops |= OP_APPMANAGEABLE;
        int cnt = 0;
        for (int q = 0; q < N_OPS; q++)
            cnt += (ops >> q) & 1;
        sr_str(bd, "key_ops");
        msgpack_pack_array(&bd->pk, (size_t)cnt);
        for (int q = 0; q < N_OPS; q++)
            if ((ops >> q) & 1)
                sr_str(bd, OP_NAMES[q]);
    }
    if (transient_of(a, b)) {
        sr_str(bd, "transient");
        sr_bool(bd, 1);
    }
}

/* Add the answer's sobject to the table; returns the handle of class cls. */
static CK_OBJECT_HANDLE take_new(sr_resp *r, CK_OBJECT_CLASS cls) {
    CK_OBJECT_HANDLE h = 0;
    pthread_mutex_lock(&g_lock);
    int ki = upsert_key(r->body, sr_conn_generation());
    if (ki >= 0) {
        int oi = find_obj(ki, cls);
        if (oi >= 0)
            h = (CK_OBJECT_HANDLE)oi + 1;
    }
    pthread_mutex_unlock(&g_lock);
    return h;
}

EXPORT CK_RV C_GenerateKey(CK_SESSION_HANDLE h, CK_MECHANISM_PTR pm, CK_ATTRIBUTE_PTR t,
                           CK_ULONG n, CK_OBJECT_HANDLE_PTR ph) {
    CK_RV rv = session_check(h, NEED_LOGIN);
    if (rv != CKR_OK)
        return rv;
    if (!pm || !ph)
        return CKR_ARGUMENTS_BAD;
    int type;
    switch (pm->mechanism) {
    case CKM_AES_KEY_GEN:
        type = T_AES;
        break;
    case CKM_DES3_KEY_GEN:
        type = T_DES3;
        break;
    case CKM_GENERIC_SECRET_KEY_GEN:
        type = T_HMAC;
        break;
    default:
        return CKR_MECHANISM_INVALID;
    }
    struct tmpl a;
    tmpl_init(&a);
    rv = read_tmpl(t, n, &a, type == T_HMAC || type == T_AES); /* AES signs by CMAC */
    if (rv != CKR_OK)
        return rv;
    if (a.cls_set && a.cls != CKO_SECRET_KEY)
        return CKR_TEMPLATE_INCONSISTENT;
    CK_ULONG bits = type == T_DES3 ? 168 : a.value_len * 8;
    if (type != T_DES3 && !a.value_len)
        return CKR_TEMPLATE_INCOMPLETE;
    sr_body b;
    sr_resp r;
    sr_body_init(&b);
    sr_map(&b, 2 + common_fields(&a, NULL, type));
    sr_kv_str(&b, "obj_type", TYPE_NAMES[type]);
    sr_kv_int(&b, "key_size", (int64_t)bits);
    put_common(&b, &a, NULL, type);
    rv = call("POST", "/crypto/v1/keys", &b, &r);
    sr_body_free(&b);
    if (rv != CKR_OK)
        return rv == CKR_ARGUMENTS_BAD ? CKR_TEMPLATE_INCONSISTENT : rv;
    *ph = take_new(&r, CKO_SECRET_KEY);
    sr_resp_free(&r);
    return *ph ? CKR_OK : CKR_DEVICE_ERROR;
}

EXPORT CK_RV C_GenerateKeyPair(CK_SESSION_HANDLE h, CK_MECHANISM_PTR pm, CK_ATTRIBUTE_PTR tpub,
                               CK_ULONG npub, CK_ATTRIBUTE_PTR tpriv, CK_ULONG npriv,
                               CK_OBJECT_HANDLE_PTR hpub, CK_OBJECT_HANDLE_PTR hpriv) {
    CK_RV rv = session_check(h, NEED_LOGIN);
    if (rv != CKR_OK)
        return rv;
    if (!pm || !hpub || !hpriv)
        return CKR_ARGUMENTS_BAD;
    struct tmpl a, p;
    tmpl_init(&a);
    tmpl_init(&p);
    if ((rv = read_tmpl(tpub, npub, &a, 0)) != CKR_OK || (rv = read_tmpl(tpriv, npriv, &p, 0)) != CKR_OK)
        return rv;
    int type;
    const char *curve = NULL;
    CK_ULONG bits = 0;
    switch (pm->mechanism) {
    case CKM_RSA_PKCS_KEY_PAIR_GEN:
        type = T_RSA;
        bits = a.modulus_bits ? a.modulus_bits : p.modulus_bits;
        if (!bits)
            return CKR_TEMPLATE_INCOMPLETE;
        if (a.exponent) {
            size_t i = 0;
            while (i < a.exponent_len && a.exponent[i] == 0)
                i++;
            if (a.exponent_len - i != 3 || memcmp(a.exponent + i, "\x01\x00\x01", 3))
                return CKR_ATTRIBUTE_VALUE_INVALID; /* the daemon makes e = 65537 */
        }
        break;
    case CKM_EC_KEY_PAIR_GEN:
    case CKM_EC_EDWARDS_KEY_PAIR_GEN: {
        type = T_EC;
        const struct tmpl *q = a.ec_params ? &a : &p;
        if (!q->ec_params)
            return CKR_TEMPLATE_INCOMPLETE;
        curve = curve_of(q->ec_params, q->ec_params_len);
        if (!curve)
            return CKR_CURVE_NOT_SUPPORTED;
        if ((pm->mechanism == CKM_EC_EDWARDS_KEY_PAIR_GEN) != !strcmp(curve, "Ed25519"))
            return CKR_TEMPLATE_INCONSISTENT;
        break;
    }
    default:
        return CKR_MECHANISM_INVALID;
    }
    sr_body b;
    sr_resp r;
    sr_body_init(&b);
    sr_map(&b, 2 + common_fields(&p, &a, type));
    sr_kv_str(&b, "obj_type", TYPE_NAMES[type]);
    if (curve)
        sr_kv_str(&b, "elliptic_curve", curve);
    else
        sr_kv_int(&b, "key_size", (int64_t)bits);
    put_common(&b, &p, &a, type);
    rv = call("POST", "/crypto/v1/keys", &b, &r);
    sr_body_free(&b);
    if (rv != CKR_OK)
        return rv == CKR_ARGUMENTS_BAD ? CKR_TEMPLATE_INCONSISTENT : rv;
    *hpriv = take_new(&r, CKO_PRIVATE_KEY);
    *hpub = take_new(&r, CKO_PUBLIC_KEY);
    sr_resp_free(&r);
    return *hpriv && *hpub ? CKR_OK : CKR_DEVICE_ERROR;
}

/* PUT /crypto/v1/keys with a value: the answer's object of class cls. */
static CK_RV put_key(const struct tmpl *a, int type, const unsigned char *v, size_t n,
                     CK_OBJECT_CLASS cls, CK_OBJECT_HANDLE_PTR ph) {
    sr_body b;
    sr_resp r;
    sr_body_init(&b);
    sr_map(&b, 2 + common_fields(a, NULL, type));
    sr_kv_str(&b, "obj_type", TYPE_NAMES[type]);
    sr_kv_bin(&b, "value", v, n);
    put_common(&b, a, NULL, type);
    CK_RV rv = call("PUT", "/crypto/v1/keys", &b, &r);
    sr_body_free(&b);
    if (rv != CKR_OK)
        return rv == CKR_ARGUMENTS_BAD ? CKR_ATTRIBUTE_VALUE_INVALID : rv;
    *ph = take_new(&r, cls);
    sr_resp_free(&r);
    return *ph ? CKR_OK : CKR_DEVICE_ERROR;
}

/* C_CreateObject of an RSA or EC private/public key: PKCS#8 or
 * SubjectPublicKeyInfo DER built here from the template, then PUT. */
static CK_RV import_asym(struct tmpl *a, CK_OBJECT_HANDLE_PTR ph) {
    int priv = a->cls == CKO_PRIVATE_KEY;
    struct sr_der d;
    int err;
    if (!a->key_type_set)
        return CKR_TEMPLATE_INCOMPLETE;
    if (a->key_type == CKK_RSA) {
        if (!a->rsa[0] || !a->rsa[1])
            return CKR_TEMPLATE_INCOMPLETE;
        if (priv) {
            for (int i = 2; i < 8; i++)
                if (!a->rsa[i] || !a->rsa_len[i])
                    return CKR_TEMPLATE_INCOMPLETE; /* the CRT numbers too */
            err = sr_pkcs8_rsa(a->rsa, a->rsa_len, &d);
        } else {
            err = sr_spki_rsa(a->rsa[0], a->rsa_len[0], a->rsa[1], a->rsa_len[1], &d);
        }
    } else if (a->key_type == CKK_EC || a->key_type == CKK_EC_EDWARDS) {
        if (!a->ec_params)
            return CKR_TEMPLATE_INCOMPLETE;
        const char *curve = curve_of(a->ec_params, a->ec_params_len);
        if (!curve)
            return CKR_CURVE_NOT_SUPPORTED;
        if ((a->key_type == CKK_EC_EDWARDS) != !strcmp(curve, "Ed25519"))
            return CKR_TEMPLATE_INCONSISTENT;
        /* the curve's OID as this module writes it (not PrintableString forms) */
        const unsigned char *params = NULL;
        size_t params_len = 0;
        for (size_t i = 0; i < sizeof CURVES / sizeof CURVES[0]; i++)
            if (!strcmp(CURVES[i].name, curve)) {
                params = CURVES[i].der;
                params_len = CURVES[i].len;
            }
        if (priv) {
            if (!a->value || !a->value_len_bytes)
                return CKR_TEMPLATE_INCOMPLETE;
            if (a->value_len_bytes > curve_size(curve))
                return CKR_ATTRIBUTE_VALUE_INVALID;
            err = sr_pkcs8_ec(params, params_len, a->value, a->value_len_bytes, curve_size(curve),
                              &d);
        } else {
            const unsigned char *pt;
            size_t pl;
            if (!a->ec_point)
                return CKR_TEMPLATE_INCOMPLETE;
            if (ec_point_raw(curve, a->ec_point, a->ec_point_len, &pt, &pl))
                return CKR_ATTRIBUTE_VALUE_INVALID;
            err = sr_spki_ec(params, params_len, pt, pl, &d);
        }
    } else {
        return CKR_ATTRIBUTE_VALUE_INVALID;
    }
    if (err) {
        sr_der_free(&d);
        return CKR_HOST_MEMORY;
    }
    int type = a->key_type == CKK_RSA ? T_RSA : T_EC;
    if (priv) { /* one Strongroom key is both objects: the public side may do its half */
        static const unsigned pairs[][2] = {
            {OP_SIGN, OP_VERIFY}, {OP_DECRYPT, OP_ENCRYPT}, {OP_UNWRAPKEY, OP_WRAPKEY}};
        for (size_t i = 0; i < 3; i++)
            if ((a->ops & pairs[i][0]) && !(a->ops_set & pairs[i][1])) {
                a->ops |= pairs[i][1];
                a->ops_set |= pairs[i][1];
            }
    }
    CK_RV rv = put_key(a, type, d.p, d.n, a->cls, ph);
    sr_der_free(&d);
    return rv;
}

EXPORT CK_RV C_CreateObject(CK_SESSION_HANDLE h, CK_ATTRIBUTE_PTR t, CK_ULONG n,
                            CK_OBJECT_HANDLE_PTR ph) {
    CK_RV rv = session_check(h, NEED_LOGIN);
    if (rv != CKR_OK)
        return rv;
    if (!ph)
        return CKR_ARGUMENTS_BAD;
    struct tmpl a;
    tmpl_init(&a);
    /* first pass for the key type (HMAC flags differ) */
    for (CK_ULONG i = 0; i < n && t; i++)
        if (t[i].type == CKA_KEY_TYPE && t[i].pValue && t[i].ulValueLen == sizeof(CK_KEY_TYPE))
            a.key_type = *(CK_KEY_TYPE *)t[i].pValue;
    int type;
    CK_OBJECT_CLASS want;
    rv = read_tmpl(t, n, &a, is_mac_type(a.key_type) || a.key_type == CKK_AES);
    if (rv != CKR_OK)
        return rv;
    if (!a.cls_set)
        return CKR_TEMPLATE_INCOMPLETE;
    if (a.cls == CKO_PRIVATE_KEY || a.cls == CKO_PUBLIC_KEY)
        return import_asym(&a, ph);
    if (!a.value)
        return CKR_TEMPLATE_INCOMPLETE;
    if (a.cls == CKO_SECRET_KEY) {
        if (!a.key_type_set)
            return CKR_TEMPLATE_INCOMPLETE;
        type = a.key_type == CKK_AES ? T_AES : a.key_type == CKK_DES3 ? T_DES3
                                           : is_mac_type(a.key_type) ? T_HMAC : T_NONE;
        if (type == T_NONE)
            return CKR_ATTRIBUTE_VALUE_INVALID;
        want = CKO_SECRET_KEY;
    } else if (a.cls == CKO_CERTIFICATE) {
        type = T_CERT;
        want = CKO_CERTIFICATE;
        a.ops_set = 0;
    } else {
        return CKR_ATTRIBUTE_VALUE_INVALID; /* private/public key import: use PUT /crypto/v1/keys */
    }
    sr_body b;
    sr_resp r;
    sr_body_init(&b);
    sr_map(&b, 2 + common_fields(&a, NULL, type));
    sr_kv_str(&b, "obj_type", TYPE_NAMES[type]);
    sr_kv_bin(&b, "value", a.value, a.value_len_bytes);
    put_common(&b, &a, NULL, type);
    rv = call("PUT", "/crypto/v1/keys", &b, &r);
    sr_body_free(&b);
    if (rv != CKR_OK)
        return rv == CKR_ARGUMENTS_BAD ? CKR_ATTRIBUTE_VALUE_INVALID : rv;
    *ph = take_new(&r, want);
    sr_resp_free(&r);
    if (*ph && type == T_CERT) {
        struct sr_cert c;
        unsigned char *v = malloc(a.value_len_bytes ? a.value_len_bytes : 1);
        if (v && !sr_parse_cert(a.value, a.value_len_bytes, &c)) { /* DER: keep it */
            memcpy(v, a.value, a.value_len_bytes);
            pthread_mutex_lock(&g_lock);
            struct key *k = obj_key(*ph, NULL);
            if (k)
                cert_store(k, v, a.value_len_bytes);
            else
                free(v);
            pthread_mutex_unlock(&g_lock);
        } else {
            free(v);
        }
    }
    return *ph ? CKR_OK : CKR_DEVICE_ERROR;
}

EXPORT CK_RV C_DestroyObject(CK_SESSION_HANDLE h, CK_OBJECT_HANDLE ho) {
    CK_RV rv = session_check(h, NEED_LOGIN);
    if (rv != CKR_OK)
        return rv;
    struct keyref kr;
    pthread_mutex_lock(&g_lock);
    rv = keyref_of(ho, &kr, NULL);
    /* A pair's second object after the first was destroyed (the key went
     * with both): already gone, which is what the caller asked for. */
    int gone = rv != CKR_OK && ho && ho <= n_objs && !objs[ho - 1].destroyed &&
               keys[objs[ho - 1].key].destroyed && !keys[objs[ho - 1].key].present;
    if (gone)
        objs[ho - 1].destroyed = 1;
    pthread_mutex_unlock(&g_lock);
    if (gone)
        return CKR_OK;
    if (rv != CKR_OK)
        return CKR_OBJECT_HANDLE_INVALID;
    char path[128];
    sr_resp r;
    snprintf(path, sizeof path, "/crypto/v1/keys/%s", kr.kid);
    rv = call("DELETE", path, NULL, &r);
    if (rv != CKR_OK)
        return rv == CKR_KEY_HANDLE_INVALID ? CKR_OBJECT_HANDLE_INVALID
               : rv == CKR_KEY_FUNCTION_NOT_PERMITTED ? CKR_ACTION_PROHIBITED
                                                      : rv;
    sr_resp_free(&r);
    pthread_mutex_lock(&g_lock);
    struct key *k = obj_key(ho, NULL);
    if (k) {
        k->present = 0; /* the key goes with all of its objects */
        k->destroyed = 1;
        objs[ho - 1].destroyed = 1;
    }
    pthread_mutex_unlock(&g_lock);
    return CKR_OK;
}

/* ---------------------------------------------------------- crypto entry points */

EXPORT CK_RV C_EncryptInit(CK_SESSION_HANDLE h, CK_MECHANISM_PTR m, CK_OBJECT_HANDLE k) {
    return op_init(h, OPS_ENCRYPT, m, k);
}
EXPORT CK_RV C_Encrypt(CK_SESSION_HANDLE h, CK_BYTE_PTR in, CK_ULONG n, CK_BYTE_PTR out,
                       CK_ULONG_PTR on) {
    return run_op(h, OPS_ENCRYPT, in, n, out, on, 0);
}
EXPORT CK_RV C_EncryptUpdate(CK_SESSION_HANDLE h, CK_BYTE_PTR in, CK_ULONG n, CK_BYTE_PTR out,
                             CK_ULONG_PTR on) {
    return crypt_update(h, OPS_ENCRYPT, in, n, out, on);
}
EXPORT CK_RV C_EncryptFinal(CK_SESSION_HANDLE h, CK_BYTE_PTR out, CK_ULONG_PTR on) {
    return crypt_final(h, OPS_ENCRYPT, out, on);
}
EXPORT CK_RV C_DecryptInit(CK_SESSION_HANDLE h, CK_MECHANISM_PTR m, CK_OBJECT_HANDLE k) {
    return op_init(h, OPS_DECRYPT, m, k);
}
EXPORT CK_RV C_Decrypt(CK_SESSION_HANDLE h, CK_BYTE_PTR in, CK_ULONG n, CK_BYTE_PTR out,
                       CK_ULONG_PTR on) {
    return run_op(h, OPS_DECRYPT, in, n, out, on, 0);
}
EXPORT CK_RV C_DecryptUpdate(CK_SESSION_HANDLE h, CK_BYTE_PTR in, CK_ULONG n, CK_BYTE_PTR out,
                             CK_ULONG_PTR on) {
    return crypt_update(h, OPS_DECRYPT, in, n, out, on);
}
EXPORT CK_RV C_DecryptFinal(CK_SESSION_HANDLE h, CK_BYTE_PTR out, CK_ULONG_PTR on) {
    return crypt_final(h, OPS_DECRYPT, out, on);
}
EXPORT CK_RV C_DigestInit(CK_SESSION_HANDLE h, CK_MECHANISM_PTR m) {
    return op_init(h, OPS_DIGEST, m, 0);
}
EXPORT CK_RV C_Digest(CK_SESSION_HANDLE h, CK_BYTE_PTR in, CK_ULONG n, CK_BYTE_PTR out,
                      CK_ULONG_PTR on) {
    return run_op(h, OPS_DIGEST, in, n, out, on, 0);
}
EXPORT CK_RV C_DigestUpdate(CK_SESSION_HANDLE h, CK_BYTE_PTR in, CK_ULONG n) {
    return op_update(h, OPS_DIGEST, in, n);
}
EXPORT CK_RV C_DigestFinal(CK_SESSION_HANDLE h, CK_BYTE_PTR out, CK_ULONG_PTR on) {
    return run_op(h, OPS_DIGEST, NULL, 0, out, on, 1);
}
EXPORT CK_RV C_SignInit(CK_SESSION_HANDLE h, CK_MECHANISM_PTR m, CK_OBJECT_HANDLE k) {
    return op_init(h, OPS_SIGN, m, k);
}
EXPORT CK_RV C_Sign(CK_SESSION_HANDLE h, CK_BYTE_PTR in, CK_ULONG n, CK_BYTE_PTR out,
                    CK_ULONG_PTR on) {
    return run_op(h, OPS_SIGN, in, n, out, on, 0);
}
EXPORT CK_RV C_SignUpdate(CK_SESSION_HANDLE h, CK_BYTE_PTR in, CK_ULONG n) {
    return op_update(h, OPS_SIGN, in, n);
}
EXPORT CK_RV C_SignFinal(CK_SESSION_HANDLE h, CK_BYTE_PTR out, CK_ULONG_PTR on) {
    return run_op(h, OPS_SIGN, NULL, 0, out, on, 1);
}
EXPORT CK_RV C_VerifyInit(CK_SESSION_HANDLE h, CK_MECHANISM_PTR m, CK_OBJECT_HANDLE k) {
    return op_init(h, OPS_VERIFY, m, k);
}

static CK_RV verify_run(CK_SESSION_HANDLE h, CK_BYTE_PTR in, CK_ULONG n, CK_BYTE_PTR sig,
                        CK_ULONG sn, int final) {
    struct op o;
    struct keyref kr;
    CK_RV rv = op_begin(h, OPS_VERIFY, &o, &kr);
    if (rv != CKR_OK)
        return rv;
    if (!sig || (!final && !in && n))
        rv = CKR_ARGUMENTS_BAD;
    else if (!final && o.multipart)
        rv = CKR_OPERATION_ACTIVE;
    else {
        const unsigned char *data = final ? o.buf : in;
        size_t len = final ? o.len : n;
        unsigned char *unused = NULL;
        size_t ul = 0;
        rv = do_sign(&o.m, &kr, data ? data : (const unsigned char *)"", len, sig, sn, &unused,
                     &ul);
        free(unused);
    }
    op_end(h, OPS_VERIFY); /* C_Verify ends the operation whatever it returns */
    op_clear(&o);
    return rv;
}

EXPORT CK_RV C_Verify(CK_SESSION_HANDLE h, CK_BYTE_PTR in, CK_ULONG n, CK_BYTE_PTR sig,
                      CK_ULONG sn) {
    return verify_run(h, in, n, sig, sn, 0);
}
EXPORT CK_RV C_VerifyUpdate(CK_SESSION_HANDLE h, CK_BYTE_PTR in, CK_ULONG n) {
    return op_update(h, OPS_VERIFY, in, n);
}
EXPORT CK_RV C_VerifyFinal(CK_SESSION_HANDLE h, CK_BYTE_PTR sig, CK_ULONG sn) {
    return verify_run(h, NULL, 0, sig, sn, 1);
}

/* ---------------------------------------------------------- wrap / unwrap / derive */

static CK_RV wrap_mode(CK_MECHANISM_PTR pm, const struct key *k, const char **alg,
                       const char **mode) {
    switch (pm->mechanism) {
    case CKM_AES_KEY_WRAP:
    case CKM_AES_KEY_WRAP_PAD:
        if (k->type != T_AES)
            return CKR_WRAPPING_KEY_TYPE_INCONSISTENT;
        if (pm->pParameter && pm->ulParameterLen)
            return CKR_MECHANISM_PARAM_INVALID; /* only the default IV */
        *alg = "AES";
        *mode = pm->mechanism == CKM_AES_KEY_WRAP ? "KW" : "KWP";
        return CKR_OK;
    case CKM_RSA_PKCS_OAEP: {
        if (key_type(k) != CKK_RSA)
            return CKR_WRAPPING_KEY_TYPE_INCONSISTENT;
        CK_RSA_PKCS_OAEP_PARAMS *pp = pm->pParameter;
        if (!pp || pm->ulParameterLen != sizeof *pp || pp->hashAlg != CKM_SHA_1 ||
            pp->mgf != CKG_MGF1_SHA1 || (pp->source && pp->ulSourceDataLen))
            return CKR_MECHANISM_PARAM_INVALID;
        *alg = "RSA";
        *mode = "OAEP_MGF1_SHA1";
        return CKR_OK;
    }
    }
    return CKR_MECHANISM_INVALID;
}

EXPORT CK_RV C_WrapKey(CK_SESSION_HANDLE h, CK_MECHANISM_PTR pm, CK_OBJECT_HANDLE hw,
                       CK_OBJECT_HANDLE hk, CK_BYTE_PTR out, CK_ULONG_PTR on) {
    CK_RV rv = session_check(h, NEED_LOGIN);
    if (rv != CKR_OK)
        return rv;
    if (!pm || !on)
        return CKR_ARGUMENTS_BAD;
    struct keyref w, s;
    struct key wk;
    const char *alg = NULL, *mode = NULL;
    pthread_mutex_lock(&g_lock);
    if (keyref_of(hw, &w, &wk) != CKR_OK)
        rv = CKR_WRAPPING_KEY_HANDLE_INVALID;
    else if (keyref_of(hk, &s, NULL) != CKR_OK)
        rv = CKR_KEY_HANDLE_INVALID;
    else
        rv = wrap_mode(pm, &wk, &alg, &mode);
    pthread_mutex_unlock(&g_lock);
    if (rv != CKR_OK)
        return rv;
    sr_body b;
    sr_resp r;
    sr_body_init(&b);
    sr_map(&b, 4);
    put_desc(&b, "key", w.kid, w.transient);
    put_desc(&b, "subject", s.kid, s.transient);
    sr_kv_str(&b, "alg", alg);
    sr_kv_str(&b, "mode", mode);
    rv = call("POST", "/crypto/v1/wrapkey", &b, &r);
    sr_body_free(&b);
    if (rv != CKR_OK)
        return rv == CKR_KEY_FUNCTION_NOT_PERMITTED ? CKR_KEY_NOT_WRAPPABLE : rv;
    const unsigned char *wk_p;
    size_t wn;
    if (sr_get_bin(r.body, "wrapped_key", &wk_p, &wn)) {
        sr_resp_free(&r);
        return CKR_DEVICE_ERROR;
    }
    if (!out)
        rv = CKR_OK;
    else if (*on < wn)
        rv = CKR_BUFFER_TOO_SMALL;
    else
        memcpy(out, wk_p, wn);
    *on = wn;
    sr_resp_free(&r);
    return rv;
}

EXPORT CK_RV C_UnwrapKey(CK_SESSION_HANDLE h, CK_MECHANISM_PTR pm, CK_OBJECT_HANDLE hw,
                         CK_BYTE_PTR wrapped, CK_ULONG wn, CK_ATTRIBUTE_PTR t, CK_ULONG n,
                         CK_OBJECT_HANDLE_PTR ph) {
    CK_RV rv = session_check(h, NEED_LOGIN);
    if (rv != CKR_OK)
        return rv;
    if (!pm || !wrapped || !ph)
        return CKR_ARGUMENTS_BAD;
    struct keyref w;
    struct key wk;
    const char *alg = NULL, *mode = NULL;
    pthread_mutex_lock(&g_lock);
    if (keyref_of(hw, &w, &wk) != CKR_OK)
        rv = CKR_UNWRAPPING_KEY_HANDLE_INVALID;
    else
        rv = wrap_mode(pm, &wk, &alg, &mode);
    pthread_mutex_unlock(&g_lock);
    if (rv != CKR_OK)
        return rv == CKR_WRAPPING_KEY_TYPE_INCONSISTENT ? CKR_UNWRAPPING_KEY_TYPE_INCONSISTENT : rv;
    struct tmpl a;
    tmpl_init(&a);
    for (CK_ULONG i = 0; i < n && t; i++)
        if (t[i].type == CKA_KEY_TYPE && t[i].pValue && t[i].ulValueLen == sizeof(CK_KEY_TYPE))
            a.key_type = *(CK_KEY_TYPE *)t[i].pValue;
    if ((rv = read_tmpl(t, n, &a, is_mac_type(a.key_type) || a.key_type == CKK_AES)) != CKR_OK)
        return rv;
    if (!a.key_type_set || (a.cls_set && a.cls != CKO_SECRET_KEY))
        return CKR_TEMPLATE_INCONSISTENT; /* secret keys only */
    int type = a.key_type == CKK_AES ? T_AES : a.key_type == CKK_DES3 ? T_DES3
                                       : is_mac_type(a.key_type) ? T_HMAC : T_NONE;
    if (type == T_NONE)
        return CKR_TEMPLATE_INCONSISTENT;
    sr_body b;
    sr_resp r;
    sr_body_init(&b);
    sr_map(&b, 5 + common_fields(&a, NULL, type));
    put_desc(&b, "key", w.kid, w.transient);
    sr_kv_str(&b, "alg", alg);
    sr_kv_str(&b, "mode", mode);
    sr_kv_str(&b, "obj_type", TYPE_NAMES[type]);
    sr_kv_bin(&b, "wrapped_key", wrapped, wn);
    put_common(&b, &a, NULL, type);
    rv = call("POST", "/crypto/v1/unwrapkey", &b, &r);
    sr_body_free(&b);
    if (rv != CKR_OK)
        return rv == CKR_ENCRYPTED_DATA_INVALID ? CKR_WRAPPED_KEY_INVALID : rv;
    *ph = take_new(&r, CKO_SECRET_KEY);
    sr_resp_free(&r);
    return *ph ? CKR_OK : CKR_DEVICE_ERROR;
}

static void delete_key(const char *kid) {
    char path[128];
    sr_resp r;
    snprintf(path, sizeof path, "/crypto/v1/keys/%s", kid);
    if (call("DELETE", path, NULL, &r) == CKR_OK)
        sr_resp_free(&r);
}

/* CKM_ECDH1_DERIVE (CKD_NULL): the peer's point becomes a transient public
 * key (PUT /crypto/v1/keys), then POST /crypto/v1/agree makes the new key;
 * the daemon keeps the leading CKA_VALUE_LEN bytes of the shared x. */
EXPORT CK_RV C_DeriveKey(CK_SESSION_HANDLE h, CK_MECHANISM_PTR pm, CK_OBJECT_HANDLE hb,
                         CK_ATTRIBUTE_PTR t, CK_ULONG n, CK_OBJECT_HANDLE_PTR ph) {
    CK_RV rv = session_check(h, NEED_LOGIN);
    if (rv != CKR_OK)
        return rv;
    if (!pm || !ph)
        return CKR_ARGUMENTS_BAD;
    if (pm->mechanism != CKM_ECDH1_DERIVE)
        return CKR_MECHANISM_INVALID;
    CK_ECDH1_DERIVE_PARAMS *dp = pm->pParameter;
    if (!dp || pm->ulParameterLen != sizeof *dp || !dp->pPublicData || !dp->ulPublicDataLen)
        return CKR_MECHANISM_PARAM_INVALID;
    if (dp->kdf != CKD_NULL || dp->ulSharedDataLen)
        return CKR_MECHANISM_PARAM_INVALID; /* the daemon offers the raw shared secret only */
    struct keyref base;
    struct key bk;
    struct obj *bo = NULL;
    unsigned char params[32]; /* copied: bk's pointers are the table's */
    size_t params_len = 0;
    pthread_mutex_lock(&g_lock);
    struct key *k = obj_key(hb, &bo);
    if (!k)
        rv = CKR_KEY_HANDLE_INVALID;
    else if (bo->cls != CKO_PRIVATE_KEY || key_type(k) != CKK_EC || k->pub.kind != 2 ||
             k->pub.params_len > sizeof params)
        rv = CKR_KEY_TYPE_INCONSISTENT;
    else {
        rv = keyref_of(hb, &base, &bk);
        params_len = k->pub.params_len;
        memcpy(params, k->pub.params, params_len);
    }
    pthread_mutex_unlock(&g_lock);
    if (rv != CKR_OK)
        return rv;
    struct tmpl a;
    tmpl_init(&a);
    for (CK_ULONG i = 0; i < n && t; i++)
        if (t[i].type == CKA_KEY_TYPE && t[i].pValue && t[i].ulValueLen == sizeof(CK_KEY_TYPE))
            a.key_type = *(CK_KEY_TYPE *)t[i].pValue;
    if ((rv = read_tmpl(t, n, &a,
                        a.key_type == CKK_AES ||
                            (is_mac_type(a.key_type) && a.key_type != CKK_GENERIC_SECRET))) != CKR_OK)
        return rv;
    if (a.cls_set && a.cls != CKO_SECRET_KEY)
        return CKR_TEMPLATE_INCONSISTENT;
    int type = !a.key_type_set || a.key_type == CKK_GENERIC_SECRET ? T_SECRET
               : a.key_type == CKK_AES                            ? T_AES
               : is_mac_type(a.key_type)                          ? T_HMAC
                                                                  : T_NONE;
    if (type == T_NONE)
        return CKR_TEMPLATE_INCONSISTENT;
    size_t size = curve_size(bk.curve);
    CK_ULONG bytes = a.value_len ? a.value_len : (type == T_AES ? 32 : size);
    if (bytes > size)
        return CKR_KEY_SIZE_RANGE;
    if (type == T_AES && bytes != 16 && bytes != 24 && bytes != 32)
        return CKR_ATTRIBUTE_VALUE_INVALID;
    const unsigned char *pt;
    size_t pl;
    if (ec_point_raw(bk.curve, dp->pPublicData, dp->ulPublicDataLen, &pt, &pl))
        return CKR_MECHANISM_PARAM_INVALID;
    /* the peer's public key, for as long as this call */
    struct sr_der spki;
    if (sr_spki_ec(params, params_len, pt, pl, &spki)) {
        sr_der_free(&spki);
        return CKR_HOST_MEMORY;
    }
    sr_body b;
    sr_resp r;
    sr_body_init(&b);
    sr_map(&b, 4);
    sr_kv_str(&b, "obj_type", "EC");
    sr_kv_bin(&b, "value", spki.p, spki.n);
    sr_str(&b, "transient");
    sr_bool(&b, 1);
    sr_kv_str(&b, "name", "pkcs11-ecdh-peer");
    rv = call("PUT", "/crypto/v1/keys", &b, &r);
    sr_body_free(&b);
    sr_der_free(&spki);
    if (rv != CKR_OK)
        return rv == CKR_ARGUMENTS_BAD ? CKR_MECHANISM_PARAM_INVALID : rv;
    const char *ks;
    size_t kn;
    char peer[64];
    if (sr_get_str(r.body, "kid", &ks, &kn) || kn >= sizeof peer) {
        sr_resp_free(&r);
        return CKR_DEVICE_ERROR;
    }
    memcpy(peer, ks, kn);
    peer[kn] = 0;
    sr_resp_free(&r);
    sr_body_init(&b);
    sr_map(&b, 5 + common_fields(&a, NULL, type));
    put_desc(&b, "private_key", base.kid, base.transient);
    put_desc(&b, "public_key", peer, 1);
    sr_kv_str(&b, "mechanism", "diffie_hellman");
    sr_kv_str(&b, "key_type", TYPE_NAMES[type]);
    sr_kv_int(&b, "key_size", (int64_t)bytes * 8);
    put_common(&b, &a, NULL, type);
    rv = call("POST", "/crypto/v1/agree", &b, &r);
    sr_body_free(&b);
    delete_key(peer);
    if (rv != CKR_OK)
        return rv == CKR_ARGUMENTS_BAD ? CKR_TEMPLATE_INCONSISTENT : rv;
    *ph = take_new(&r, CKO_SECRET_KEY);
    sr_resp_free(&r);
    return *ph ? CKR_OK : CKR_DEVICE_ERROR;
}

EXPORT CK_RV C_GenerateRandom(CK_SESSION_HANDLE h, CK_BYTE_PTR out, CK_ULONG n) {
    CK_RV rv = session_check(h, NEED_SESSION);
    if (rv != CKR_OK)
        return rv;
    if (!out && n)
        return CKR_ARGUMENTS_BAD;
    while (n) {
        ssize_t got = getrandom(out, n, 0);
        if (got <= 0)
            return CKR_FUNCTION_FAILED;
        out += got;
        n -= (CK_ULONG)got;
    }
    return CKR_OK;
}

/* The module's random bytes are the kernel's (getrandom): no seed is taken.
 * CKR_RANDOM_SEED_NOT_SUPPORTED is the code PKCS#11 2.40 5.15 gives for it. */
EXPORT CK_RV C_SeedRandom(CK_SESSION_HANDLE h, CK_BYTE_PTR seed, CK_ULONG n) {
    CK_RV rv = session_check(h, NEED_SESSION);
    if (rv != CKR_OK)
        return rv;
    return !seed && n ? CKR_ARGUMENTS_BAD : CKR_RANDOM_SEED_NOT_SUPPORTED;
}

/* ---------------------------------------------------------- not supported */

/* Their parameters are the API's, unused by design. */
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wunused-parameter"
#define NS(name, args)                                                                             \
    EXPORT CK_RV name args {                                                                       \
        CK_RV rv = check_init();                                                                   \
        return rv != CKR_OK ? rv : CKR_FUNCTION_NOT_SUPPORTED;                                     \
    }
NS(C_InitToken, (CK_SLOT_ID a, CK_UTF8CHAR_PTR b, CK_ULONG c, CK_UTF8CHAR_PTR d))
NS(C_InitPIN, (CK_SESSION_HANDLE a, CK_UTF8CHAR_PTR b, CK_ULONG c))
NS(C_SetPIN, (CK_SESSION_HANDLE a, CK_UTF8CHAR_PTR b, CK_ULONG c, CK_UTF8CHAR_PTR d, CK_ULONG e))
NS(C_GetOperationState, (CK_SESSION_HANDLE a, CK_BYTE_PTR b, CK_ULONG_PTR c))
NS(C_SetOperationState,
   (CK_SESSION_HANDLE a, CK_BYTE_PTR b, CK_ULONG c, CK_OBJECT_HANDLE d, CK_OBJECT_HANDLE e))
NS(C_CopyObject,
   (CK_SESSION_HANDLE a, CK_OBJECT_HANDLE b, CK_ATTRIBUTE_PTR c, CK_ULONG d, CK_OBJECT_HANDLE_PTR e))
NS(C_GetObjectSize, (CK_SESSION_HANDLE a, CK_OBJECT_HANDLE b, CK_ULONG_PTR c))
NS(C_DigestKey, (CK_SESSION_HANDLE a, CK_OBJECT_HANDLE b))
NS(C_SignRecoverInit, (CK_SESSION_HANDLE a, CK_MECHANISM_PTR b, CK_OBJECT_HANDLE c))
NS(C_SignRecover, (CK_SESSION_HANDLE a, CK_BYTE_PTR b, CK_ULONG c, CK_BYTE_PTR d, CK_ULONG_PTR e))
NS(C_VerifyRecoverInit, (CK_SESSION_HANDLE a, CK_MECHANISM_PTR b, CK_OBJECT_HANDLE c))
NS(C_VerifyRecover, (CK_SESSION_HANDLE a, CK_BYTE_PTR b, CK_ULONG c, CK_BYTE_PTR d, CK_ULONG_PTR e))
NS(C_DigestEncryptUpdate,
   (CK_SESSION_HANDLE a, CK_BYTE_PTR b, CK_ULONG c, CK_BYTE_PTR d, CK_ULONG_PTR e))
NS(C_DecryptDigestUpdate,
   (CK_SESSION_HANDLE a, CK_BYTE_PTR b, CK_ULONG c, CK_BYTE_PTR d, CK_ULONG_PTR e))
NS(C_SignEncryptUpdate,
   (CK_SESSION_HANDLE a, CK_BYTE_PTR b, CK_ULONG c, CK_BYTE_PTR d, CK_ULONG_PTR e))
NS(C_DecryptVerifyUpdate,
   (CK_SESSION_HANDLE a, CK_BYTE_PTR b, CK_ULONG c, CK_BYTE_PTR d, CK_ULONG_PTR e))
NS(C_WaitForSlotEvent, (CK_FLAGS a, CK_SLOT_ID_PTR b, CK_VOID_PTR c))
#pragma GCC diagnostic pop

EXPORT CK_RV C_GetFunctionStatus(CK_SESSION_HANDLE h) {
    (void)h;
    CK_RV rv = check_init();
    return rv != CKR_OK ? rv : CKR_FUNCTION_NOT_PARALLEL;
}
EXPORT CK_RV C_CancelFunction(CK_SESSION_HANDLE h) {
    (void)h;
    CK_RV rv = check_init();
    return rv != CKR_OK ? rv : CKR_FUNCTION_NOT_PARALLEL;
}

CK_FUNCTION_LIST sr_function_list = {
    {2, 40},
    C_Initialize,
    C_Finalize,
    C_GetInfo,
    C_GetFunctionList,
    C_GetSlotList,
    C_GetSlotInfo,
    C_GetTokenInfo,
    C_GetMechanismList,
    C_GetMechanismInfo,
    C_InitToken,
    C_InitPIN,
    C_SetPIN,
    C_OpenSession,
    C_CloseSession,
    C_CloseAllSessions,
    C_GetSessionInfo,
    C_GetOperationState,
    C_SetOperationState,
    C_Login,
    C_Logout,
    C_CreateObject,
    C_CopyObject,
    C_DestroyObject,
    C_GetObjectSize,
    C_GetAttributeValue,
    C_SetAttributeValue,
    C_FindObjectsInit,
    C_FindObjects,
    C_FindObjectsFinal,
    C_EncryptInit,
    C_Encrypt,
    C_EncryptUpdate,
    C_EncryptFinal,
    C_DecryptInit,
    C_Decrypt,
    C_DecryptUpdate,
    C_DecryptFinal,
    C_DigestInit,
    C_Digest,
    C_DigestUpdate,
    C_DigestKey,
    C_DigestFinal,
    C_SignInit,
    C_Sign,
    C_SignUpdate,
    C_SignFinal,
    C_SignRecoverInit,
    C_SignRecover,
    C_VerifyInit,
    C_Verify,
    C_VerifyUpdate,
    C_VerifyFinal,
    C_VerifyRecoverInit,
    C_VerifyRecover,
    C_DigestEncryptUpdate,
    C_DecryptDigestUpdate,
    C_SignEncryptUpdate,
    C_DecryptVerifyUpdate,
    C_GenerateKey,
    C_GenerateKeyPair,
    C_WrapKey,
    C_UnwrapKey,
    C_DeriveKey,
    C_SeedRandom,
    C_GenerateRandom,
    C_GetFunctionStatus,
    C_CancelFunction,
    C_WaitForSlotEvent,
};
