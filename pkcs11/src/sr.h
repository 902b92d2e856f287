/* libstrongroom-pkcs11: shared declarations.
 *
 * conn.c   the connection to strongroomd (framing, msgpack, pipelined calls)
 * der.c    the little DER the module needs (SubjectPublicKeyInfo, ECDSA)
 * p11.c    the PKCS#11 functions, objects and sessions
 */
#ifndef SR_H
#define SR_H

#include <stddef.h>
#include <stdint.h>

#include <msgpack.h>
#include <p11-kit/pkcs11.h>

/* ---- configuration (p11.c fills it at C_Initialize) ---- */
struct sr_config {
    char socket[512];
    char token_label[33];
    char api_key[1024]; /* optional: log in without C_Login (ssh-keygen -D, sshd hosts) */
    int timeout_ms;
};
extern struct sr_config sr_cfg;

/* ---- request bodies ---- */
typedef struct {
    msgpack_sbuffer sb;
    msgpack_packer pk;
} sr_body;

void sr_body_init(sr_body *b);
void sr_body_free(sr_body *b);
void sr_map(sr_body *b, size_t n);
void sr_str(sr_body *b, const char *s);
void sr_strn(sr_body *b, const char *s, size_t n);
void sr_bin(sr_body *b, const void *p, size_t n);
void sr_int(sr_body *b, int64_t v);
void sr_bool(sr_body *b, int v);
void sr_kv_str(sr_body *b, const char *k, const char *v);
void sr_kv_bin(sr_body *b, const char *k, const void *p, size_t n);
void sr_kv_int(sr_body *b, const char *k, int64_t v);

/* ---- responses ---- */
typedef struct {
    int status;
    msgpack_unpacked up;
    msgpack_object *body; /* NULL when absent */
    char *raw;            /* the frame payload, kept for the zone's references */
    char error[48];       /* error code from an error body, or "" */
} sr_resp;

void sr_resp_free(sr_resp *r);
const msgpack_object *sr_get(const msgpack_object *map, const char *key);
int sr_get_str(const msgpack_object *map, const char *key, const char **p, size_t *n);
int sr_get_bin(const msgpack_object *map, const char *key, const unsigned char **p, size_t *n);
int sr_get_bool(const msgpack_object *map, const char *key, int dflt);
int64_t sr_get_int(const msgpack_object *map, const char *key, int64_t dflt);

/* Send one request and wait for its answer. body may be NULL (msgpack nil).
 * Returns CKR_OK with *out filled (any HTTP status), or CKR_DEVICE_ERROR
 * when the daemon cannot be reached or the connection broke. */
CK_RV sr_call(const char *method, const char *path, sr_body *body, sr_resp *out);

/* Connection life. */
void sr_conn_init(void);
void sr_conn_close(void);
void sr_conn_after_fork_child(void);
/* The API key to log in with on every new connection (NULL: log out). */
CK_RV sr_conn_login(const char *api_key, size_t len, sr_resp *out);
void sr_conn_logout(void);
int sr_conn_logged_in(void);
/* Increments each time a new connection is made: transient keys of older
 * connections are gone. */
unsigned sr_conn_generation(void);

/* ---- DER ---- */
struct sr_pub {
    int kind; /* 0 none, 1 RSA, 2 EC, 3 Ed25519 */
    const unsigned char *n, *e;
    size_t n_len, e_len;
    const unsigned char *params, *point; /* params: DER OID; point: raw 04||X||Y or 32 bytes */
    size_t params_len, point_len;
};
int sr_parse_spki(const unsigned char *der, size_t len, struct sr_pub *out);
/* X.509: serial (INTEGER), issuer and subject (Name), each the whole DER TLV */
struct sr_cert {
    const unsigned char *serial, *issuer, *subject;
    size_t serial_len, issuer_len, subject_len;
};
int sr_parse_cert(const unsigned char *der, size_t len, struct sr_cert *out);
/* DER ECDSA-Sig-Value -> r||s of size bytes each; 0 on success */
int sr_ecdsa_der_to_raw(const unsigned char *der, size_t len, unsigned char *out, size_t size);
/* r||s -> DER; returns DER length, out must hold 2*half+8 */
size_t sr_ecdsa_raw_to_der(const unsigned char *raw, size_t len, unsigned char *out);

/* DER writing: a growing buffer; err set on allocation failure */
struct sr_der {
    unsigned char *p;
    size_t n, cap;
    int err;
};
void sr_der_init(struct sr_der *d);
void sr_der_free(struct sr_der *d); /* wipes */
void sr_der_raw(struct sr_der *d, const void *v, size_t n);
void sr_der_tlv(struct sr_der *d, unsigned tag, const void *v, size_t n);
void sr_der_uint(struct sr_der *d, const unsigned char *v, size_t n);
void sr_der_wrap(struct sr_der *d, unsigned tag);
/* Key encodings for import (0 on success; out initialised by them). */
int sr_spki_ec(const unsigned char *params, size_t params_len, const unsigned char *point,
               size_t point_len, struct sr_der *out);
int sr_spki_rsa(const unsigned char *n, size_t n_len, const unsigned char *e, size_t e_len,
                struct sr_der *out);
/* v: n, e, d, p, q, d mod (p-1), d mod (q-1), q^-1 mod p */
int sr_pkcs8_rsa(const unsigned char *const v[8], const size_t len[8], struct sr_der *out);
int sr_pkcs8_ec(const unsigned char *params, size_t params_len, const unsigned char *d,
                size_t d_len, size_t size, struct sr_der *out);

#endif
