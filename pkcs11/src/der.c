/* The little DER the module reads and writes: SubjectPublicKeyInfo (RSA, EC,
 * Ed25519) and ECDSA-Sig-Value. Every read is bounds-checked. */
#include <stdlib.h>
#include <string.h>

#include "sr.h"

struct tlv {
    unsigned tag;
    const unsigned char *v;
    size_t len;
};

/* Read one TLV at *p (< end); advances *p past it. */
static int tlv(const unsigned char **p, const unsigned char *end, struct tlv *t) {
    const unsigned char *q = *p;
    if (end - q < 2)
        return -1;
    t->tag = *q++;
    size_t len = *q++;
    if (len & 0x80) {
        size_t k = len & 0x7f;
        if (k == 0 || k > 4 || (size_t)(end - q) < k)
            return -1;
        len = 0;
        while (k--)
            len = (len << 8) | *q++;
    }
    if ((size_t)(end - q) < len)
        return -1;
    t->v = q;
    t->len = len;
    *p = q + len;
    return 0;
}

static const unsigned char OID_RSA[] = {0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01};
static const unsigned char OID_EC[] = {0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01};
static const unsigned char OID_ED25519[] = {0x2b, 0x65, 0x70};

static const unsigned char *strip_zeros(const unsigned char *v, size_t *len) {
    while (*len > 1 && v[0] == 0) {
        v++;
        (*len)--;
    }
    return v;
}

int sr_parse_spki(const unsigned char *der, size_t len, struct sr_pub *out) {
    const unsigned char *p = der, *end = der + len, *q, *qend;
    struct tlv spki, alg, oid, bits, params;
    memset(out, 0, sizeof *out);
    if (tlv(&p, end, &spki) || spki.tag != 0x30)
        return -1;
    q = spki.v;
    qend = spki.v + spki.len;
    if (tlv(&q, qend, &alg) || alg.tag != 0x30 || tlv(&q, qend, &bits) || bits.tag != 0x03 ||
        bits.len < 1 || bits.v[0] != 0)
        return -1;
    const unsigned char *a = alg.v, *aend = alg.v + alg.len;
    const unsigned char *params_start;
    if (tlv(&a, aend, &oid) || oid.tag != 0x06)
        return -1;
    params_start = a;
    const unsigned char *key = bits.v + 1;
    size_t key_len = bits.len - 1;
    if (oid.len == sizeof OID_RSA && !memcmp(oid.v, OID_RSA, oid.len)) {
        const unsigned char *k = key, *kend = key + key_len, *r;
        struct tlv seq, n, e;
        if (tlv(&k, kend, &seq) || seq.tag != 0x30)
            return -1;
        r = seq.v;
        if (tlv(&r, seq.v + seq.len, &n) || n.tag != 0x02 || tlv(&r, seq.v + seq.len, &e) ||
            e.tag != 0x02)
            return -1;
        out->kind = 1;
        out->n_len = n.len;
        out->n = strip_zeros(n.v, &out->n_len);
        out->e_len = e.len;
        out->e = strip_zeros(e.v, &out->e_len);
        return 0;
    }
    if (oid.len == sizeof OID_EC && !memcmp(oid.v, OID_EC, oid.len)) {
        if (tlv(&a, aend, &params) || params.tag != 0x06)
            return -1;
        out->kind = 2;
        out->params = params_start;
        out->params_len = (size_t)(a - params_start);
        out->point = key;
        out->point_len = key_len;
        return 0;
    }
    if (oid.len == sizeof OID_ED25519 && !memcmp(oid.v, OID_ED25519, oid.len)) {
        out->kind = 3;
        /* CKA_EC_PARAMS of Ed25519: the OID itself (RFC 8410 id-Ed25519). */
        out->params = oid.v - 2;
        out->params_len = oid.len + 2;
        out->point = key;
        out->point_len = key_len;
        return 0;
    }
    return -1;
}

int sr_ecdsa_der_to_raw(const unsigned char *der, size_t len, unsigned char *out, size_t size) {
    const unsigned char *p = der, *end = der + len, *q;
    struct tlv seq, r, s;
    if (tlv(&p, end, &seq) || seq.tag != 0x30)
        return -1;
    q = seq.v;
    if (tlv(&q, seq.v + seq.len, &r) || r.tag != 0x02 || tlv(&q, seq.v + seq.len, &s) ||
        s.tag != 0x02)
        return -1;
    const unsigned char *rv = strip_zeros(r.v, &r.len), *sv = strip_zeros(s.v, &s.len);
    if (r.len > size || s.len > size)
        return -1;
    memset(out, 0, 2 * size);
    memcpy(out + size - r.len, rv, r.len);
    memcpy(out + 2 * size - s.len, sv, s.len);
    return 0;
}

static size_t put_int(unsigned char *o, const unsigned char *v, size_t n) {
    while (n > 1 && v[0] == 0) {
        v++;
        n--;
    }
    size_t pad = (v[0] & 0x80) ? 1 : 0, i = 0;
    o[i++] = 0x02;
    o[i++] = (unsigned char)(n + pad);
    if (pad)
        o[i++] = 0;
    memcpy(o + i, v, n);
    return i + n;
}

size_t sr_ecdsa_raw_to_der(const unsigned char *raw, size_t len, unsigned char *out) {
    size_t half = len / 2, i;
    unsigned char body[2 * 70];
    if (half == 0 || half > 66)
        return 0;
    i = put_int(body, raw, half);
    i += put_int(body + i, raw + half, half);
    size_t o = 0;
    out[o++] = 0x30;
    if (i >= 0x80)
        out[o++] = 0x81;
    out[o++] = (unsigned char)i;
    memcpy(out + o, body, i);
    return o + i;
}

/* The fields of an X.509 certificate PKCS#11 shows: each a whole TLV. */
int sr_parse_cert(const unsigned char *der, size_t len, struct sr_cert *out) {
    const unsigned char *p = der, *end = der + len, *q, *qend, *start;
    struct tlv cert, tbs, t;
    memset(out, 0, sizeof *out);
    if (tlv(&p, end, &cert) || cert.tag != 0x30)
        return -1;
    q = cert.v;
    if (tlv(&q, cert.v + cert.len, &tbs) || tbs.tag != 0x30)
        return -1;
    q = tbs.v;
    qend = tbs.v + tbs.len;
    start = q;
    if (tlv(&q, qend, &t))
        return -1;
    if (t.tag == 0xa0) { /* [0] version */
        start = q;
        if (tlv(&q, qend, &t))
            return -1;
    }
    if (t.tag != 0x02)
        return -1;
    out->serial = start;
    out->serial_len = (size_t)(q - start);
    if (tlv(&q, qend, &t) || t.tag != 0x30) /* signature AlgorithmIdentifier */
        return -1;
    start = q;
    if (tlv(&q, qend, &t) || t.tag != 0x30)
        return -1;
    out->issuer = start;
    out->issuer_len = (size_t)(q - start);
    if (tlv(&q, qend, &t) || t.tag != 0x30) /* validity */
        return -1;
    start = q;
    if (tlv(&q, qend, &t) || t.tag != 0x30)
        return -1;
    out->subject = start;
    out->subject_len = (size_t)(q - start);
    return 0;
}

/* ---- writing ---- */

static void der_grow(struct sr_der *d, size_t more) {
    if (d->err || d->n + more <= d->cap)
        return;
    size_t c = (d->n + more) * 2 + 64;
    unsigned char *p = realloc(d->p, c);
    if (!p) {
        d->err = 1;
        return;
    }
    d->p = p;
    d->cap = c;
}

void sr_der_init(struct sr_der *d) { memset(d, 0, sizeof *d); }

void sr_der_free(struct sr_der *d) {
    if (d->p)
        memset(d->p, 0, d->cap); /* private key material passes through here */
    free(d->p);
    memset(d, 0, sizeof *d);
}

void sr_der_raw(struct sr_der *d, const void *v, size_t n) {
    der_grow(d, n);
    if (d->err)
        return;
    if (n)
        memcpy(d->p + d->n, v, n);
    d->n += n;
}

void sr_der_tlv(struct sr_der *d, unsigned tag, const void *v, size_t n) {
    unsigned char h[6];
    size_t i = 0;
    h[i++] = (unsigned char)tag;
    if (n < 0x80) {
        h[i++] = (unsigned char)n;
    } else if (n < 0x100) {
        h[i++] = 0x81;
        h[i++] = (unsigned char)n;
    } else if (n < 0x10000) {
        h[i++] = 0x82;
        h[i++] = (unsigned char)(n >> 8);
        h[i++] = (unsigned char)n;
    } else {
        h[i++] = 0x83;
        h[i++] = (unsigned char)(n >> 16);
        h[i++] = (unsigned char)(n >> 8);
        h[i++] = (unsigned char)n;
    }
    sr_der_raw(d, h, i);
    sr_der_raw(d, v, n);
}

void sr_der_uint(struct sr_der *d, const unsigned char *v, size_t n) {
    while (n > 1 && v[0] == 0) {
        v++;
        n--;
    }
    if (n == 0) {
        sr_der_tlv(d, 0x02, "\0", 1);
        return;
    }
    if (v[0] & 0x80) {
        unsigned char *t = malloc(n + 1);
        if (!t) {
            d->err = 1;
            return;
        }
        t[0] = 0;
        memcpy(t + 1, v, n);
        sr_der_tlv(d, 0x02, t, n + 1);
        memset(t, 0, n + 1);
        free(t);
    } else {
        sr_der_tlv(d, 0x02, v, n);
    }
}

/* Wrap everything written so far in one TLV. */
void sr_der_wrap(struct sr_der *d, unsigned tag) {
    struct sr_der o;
    sr_der_init(&o);
    sr_der_tlv(&o, tag, d->p, d->n);
    o.err |= d->err;
    sr_der_free(d);
    *d = o;
}

/* SubjectPublicKeyInfo of an EC/Ed25519 key: params = the curve's DER OID. */
int sr_spki_ec(const unsigned char *params, size_t params_len, const unsigned char *point,
               size_t point_len, struct sr_der *out) {
    struct sr_der alg, bits;
    sr_der_init(&alg);
    sr_der_init(&bits);
    int ed = params_len == 5 && !memcmp(params + 2, OID_ED25519, 3);
    if (ed) {
        sr_der_raw(&alg, params, params_len);
    } else {
        sr_der_tlv(&alg, 0x06, OID_EC, sizeof OID_EC);
        sr_der_raw(&alg, params, params_len);
    }
    sr_der_wrap(&alg, 0x30);
    sr_der_raw(&bits, "\0", 1);
    sr_der_raw(&bits, point, point_len);
    sr_der_wrap(&bits, 0x03);
    sr_der_init(out);
    sr_der_raw(out, alg.p, alg.n);
    sr_der_raw(out, bits.p, bits.n);
    sr_der_wrap(out, 0x30);
    int err = alg.err || bits.err || out->err;
    sr_der_free(&alg);
    sr_der_free(&bits);
    return err ? -1 : 0;
}

int sr_spki_rsa(const unsigned char *n, size_t n_len, const unsigned char *e, size_t e_len,
                struct sr_der *out) {
    struct sr_der key;
    sr_der_init(&key);
    sr_der_uint(&key, n, n_len);
    sr_der_uint(&key, e, e_len);
    sr_der_wrap(&key, 0x30);
    sr_der_init(out);
    sr_der_tlv(out, 0x06, OID_RSA, sizeof OID_RSA);
    sr_der_raw(out, "\x05\x00", 2);
    sr_der_wrap(out, 0x30); /* AlgorithmIdentifier */
    /* BIT STRING: unused-bits byte then the RSAPublicKey */
    struct sr_der bits;
    sr_der_init(&bits);
    sr_der_raw(&bits, "\0", 1);
    sr_der_raw(&bits, key.p, key.n);
    sr_der_tlv(out, 0x03, bits.p, bits.n);
    sr_der_wrap(out, 0x30);
    int err = key.err || bits.err || out->err;
    sr_der_free(&key);
    sr_der_free(&bits);
    return err ? -1 : 0;
}

/* PKCS#8 PrivateKeyInfo around an RSAPrivateKey (all eight numbers). */
int sr_pkcs8_rsa(const unsigned char *const v[8], const size_t len[8], struct sr_der *out) {
    struct sr_der key;
    sr_der_init(&key);
    sr_der_tlv(&key, 0x02, "\0", 1);
    for (int i = 0; i < 8; i++)
        sr_der_uint(&key, v[i], len[i]);
    sr_der_wrap(&key, 0x30);
    sr_der_init(out);
    sr_der_tlv(out, 0x02, "\0", 1);
    sr_der_raw(out, "\x30\x0d\x06\x09", 4);
    sr_der_raw(out, OID_RSA, sizeof OID_RSA);
    sr_der_raw(out, "\x05\x00", 2);
    sr_der_tlv(out, 0x04, key.p, key.n);
    sr_der_wrap(out, 0x30);
    int err = key.err || out->err;
    sr_der_free(&key);
    return err ? -1 : 0;
}

/* PKCS#8 of an EC private value d (padded to size bytes) or of an Ed25519 seed. */
int sr_pkcs8_ec(const unsigned char *params, size_t params_len, const unsigned char *d,
                size_t d_len, size_t size, struct sr_der *out) {
    struct sr_der key, alg;
    unsigned char padded[80];
    int ed = params_len == 5 && !memcmp(params + 2, OID_ED25519, 3);
    if (d_len > size || size > sizeof padded)
        return -1;
    memset(padded, 0, sizeof padded);
    memcpy(padded + size - d_len, d, d_len);
    sr_der_init(&key);
    sr_der_init(&alg);
    if (ed) {
        sr_der_tlv(&key, 0x04, padded, size); /* CurvePrivateKey */
        sr_der_raw(&alg, params, params_len);
    } else {
        sr_der_tlv(&key, 0x02, "\x01", 1);
        sr_der_tlv(&key, 0x04, padded, size);
        sr_der_wrap(&key, 0x30); /* ECPrivateKey */
        sr_der_tlv(&alg, 0x06, OID_EC, sizeof OID_EC);
        sr_der_raw(&alg, params, params_len);
    }
    sr_der_wrap(&alg, 0x30);
    sr_der_init(out);
    sr_der_tlv(out, 0x02, "\0", 1);
    sr_der_raw(out, alg.p, alg.n);
    sr_der_tlv(out, 0x04, key.p, key.n);
    sr_der_wrap(out, 0x30);
    memset(padded, 0, sizeof padded);
    int err = key.err || alg.err || out->err;
    sr_der_free(&key);
    sr_der_free(&alg);
    return err ? -1 : 0;
}
