/* dzip.c: the .dzip reader declared in dzip.h, written from docs/format.md.
 *
 * Layout of this file: memory and errors; checksums; inflate (RFC 1950/1951, with the
 * version 5 preset dictionary); JSON; canonical Huffman streams; the header's checks;
 * the tensor layouts; dzip_read. Everything read from the file is bounded before use.
 */
#include "dzip.h"
#include "huffman.h"

#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_HEADER (64u << 20)        /* unpacked header bytes */
#define MAX_ELEMENTS ((int64_t)1 << 28) /* decoded values of a file with no model */
#define MAX_JSON_DEPTH 64
#define MAX_CLUSTERS 256
#define MAX_KERNEL 16
#define CHUNK 32                        /* kernels per mixed-radix block */
#define BIG_LIMBS 20                    /* 640 bits: > 32 * log2(C(16, 8)) = 437 */

/* ------------------------------------------------------------ memory and errors */
typedef struct {
    jmp_buf fail;
    char *error;
    void **blocks;                      /* scratch, freed when dzip_read returns */
    size_t nblocks, capblocks;
} ctx_t;

static void fail(ctx_t *c, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(c->error, 200, fmt, ap);
    va_end(ap);
    longjmp(c->fail, 1);
}

static void *scratch(ctx_t *c, size_t n) {
    void *p;
    if (c->nblocks == c->capblocks) {
        size_t cap = c->capblocks ? 2 * c->capblocks : 64;
        void **b = realloc(c->blocks, cap * sizeof *b);
        if (!b) fail(c, "out of memory");
        c->blocks = b;
        c->capblocks = cap;
    }
    p = calloc(n ? n : 1, 1);
    if (!p) fail(c, "out of memory");
    c->blocks[c->nblocks++] = p;
    return p;
}

static void free_scratch(ctx_t *c) {
    size_t i;
    for (i = 0; i < c->nblocks; i++) free(c->blocks[i]);
    free(c->blocks);
    c->blocks = NULL;
    c->nblocks = c->capblocks = 0;
}

/* ------------------------------------------------------------ checksums */
static uint32_t crc32_of(const uint8_t *p, size_t n) {
    uint32_t table[256], crc = 0xFFFFFFFFu, k, b, v;
    size_t i;
    for (k = 0; k < 256; k++) {  /* no shared state: callers may be threads */
        v = k;
        for (b = 0; b < 8; b++) v = (v & 1) ? 0xEDB88320u ^ (v >> 1) : v >> 1;
        table[k] = v;
    }
    for (i = 0; i < n; i++) crc = table[(crc ^ p[i]) & 0xFF] ^ (crc >> 8);
    return crc ^ 0xFFFFFFFFu;
}

static uint32_t adler32_of(const uint8_t *p, size_t n) {
    uint32_t a = 1, b = 0;
    size_t i;
    for (i = 0; i < n; i++) {
        a = (a + p[i]) % 65521u;
        b = (b + a) % 65521u;
    }
    return (b << 16) | a;
}

static uint32_t le32(const uint8_t *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

/* ------------------------------------------------------------ inflate */
static const char HEADER_DICT[] =
    "\"running_mean\",\"running_var\",\"num_batches_tracked\",downsample.shortcut.features."
    "classifier.embeddings.attention.self_attn.q_proj.k_proj.v_proj.out_proj.mlp.fc1.fc2."
    "norm.ln.encoder.decoder.head.blocks.stem.weight_ih_l0\",\"weight_hh_l0\",\"bias_ih_l0\","
    "\"bias_hh_l0\",{\"name\":\"fc.weight\",\"linear.weight\","
    "\"model\":{\"arch\":\"lenet5\",\"num_classes\":10,\"mean\":[0.1307],\"std\":[0.3081]},"
    "\"mean\":[0.485,0.456,0.406],\"std\":[0.229,0.224,0.225]},\"task\":\"mnist\","
    "\"model\":{\"arch\":\"resnet20\",\"num_classes\":10,\"mean\":[0.4914,0.4822,0.4465],"
    "\"std\":[0.247,0.2435,0.2616]},\"task\":\"cifar10\",\"tensors\":[{\"name\":\"conv1.weight\","
    "\"shape\":[16,3,3,3],\"dtype\":\"float32\",\"encoding\":\"raw\",\"store\":\"float16\"},"
    "\"encoding\":\"alias\",\"of\":\"dtype\":\"int64\",\"store\":\"int64\"},{\"name\":\""
    "\"codebook_dtype\":\"int8\",\"encoding\":\"dense\",\"index_nbits\":"
    "\"codebook_dtype\":\"float16\",\"encoding\":\"sparse\",\"gap_bits\":5,\"entries\":"
    ",\"gap_nbits\":,\"index_nbits\":},{\"name\":\"layer1.0.conv1.weight\",\"shape\":[16,16,3,3],"
    "\"dtype\":\"float32\",\"clusters\":},{\"name\":\"layer1.0.bn1\",\"shape\":[16],\"dtype\":\"float32\","
    "\"encoding\":\"bn\",\"eps\":1e-05,\"store\":\"int8\"},{\"name\":\"layer1.0.conv2.weight\","
    "\"shape\":[64,64,3,3],\"dtype\":\"float32\",\"clusters\":,\"codebook_dtype\":\"int8\","
    "\"encoding\":\"kernel\",\"gap_bits\":3,\"entries\":,\"gap_nbits\":,\"count_nbits\":,"
    "\"subset_nbits\":,\"index_nbits\":";

typedef struct {
    ctx_t *c;
    const uint8_t *in;
    size_t inlen, inpos;
    uint32_t bitbuf;
    int bitcnt;
    uint8_t *out;                       /* c->blocks[slot]: freed with the scratch */
    size_t outlen, outcap, outmax, slot;
} inflater;

typedef struct {
    short count[16];
    short symbol[288];
} huff_table;

static int getbits(inflater *s, int n) {
    uint32_t v = s->bitbuf;
    while (s->bitcnt < n) {
        if (s->inpos >= s->inlen) fail(s->c, "the header's zlib stream is truncated");
        v |= (uint32_t)s->in[s->inpos++] << s->bitcnt;
        s->bitcnt += 8;
    }
    s->bitbuf = v >> n;
    s->bitcnt -= n;
    return (int)(v & ((1u << n) - 1));
}

static void put(inflater *s, uint8_t b) {
    if (s->outlen == s->outcap) {
        size_t cap = 2 * s->outcap;
        uint8_t *p;
        if (s->outlen >= s->outmax) fail(s->c, "header too large");
        if (cap > s->outmax) cap = s->outmax;
        p = realloc(s->out, cap + 1);
        if (!p) fail(s->c, "out of memory");
        s->out = p;
        s->c->blocks[s->slot] = p;
        s->outcap = cap;
    }
    s->out[s->outlen++] = b;
}

/* A decoding table from code lengths; -1 if they over-subscribe (incomplete is allowed
 * only as DEFLATE allows: checked by the caller through the returned left count). */
static int build(huff_table *h, const short *length, int n) {
    short offs[16];
    int sym, len, left = 1;
    memset(h->count, 0, sizeof h->count);
    for (sym = 0; sym < n; sym++) h->count[length[sym]]++;
    if (h->count[0] == n) return 0;
    for (len = 1; len < 16; len++) {
        left <<= 1;
        left -= h->count[len];
        if (left < 0) return -1;
    }
    offs[1] = 0;
    for (len = 1; len < 15; len++) offs[len + 1] = (short)(offs[len] + h->count[len]);
    for (sym = 0; sym < n; sym++)
        if (length[sym] != 0) h->symbol[offs[length[sym]]++] = (short)sym;
    return left;
}

static int decode_sym(inflater *s, const huff_table *h) {
    int code = 0, first = 0, index = 0, len, count;
    for (len = 1; len < 16; len++) {
        code |= getbits(s, 1);
        count = h->count[len];
        if (code - count < first) return h->symbol[index + (code - first)];
        index += count;
        first += count;
        first <<= 1;
        code <<= 1;
    }
    fail(s->c, "the header's zlib stream holds an invalid code");
    return -1;
}

static const short LBASE[29] = {3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 15, 17, 19, 23, 27, 31,
                                35, 43, 51, 59, 67, 83, 99, 115, 131, 163, 195, 227, 258};
static const short LEXT[29] = {0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2,
                               3, 3, 3, 3, 4, 4, 4, 4, 5, 5, 5, 5, 0};
static const short DBASE[30] = {1, 2, 3, 4, 5, 7, 9, 13, 17, 25, 33, 49, 65, 97, 129, 193,
                                257, 385, 513, 769, 1025, 1537, 2049, 3073, 4097, 6145,
                                8193, 12289, 16385, 24577};
static const short DEXT[30] = {0, 0, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6,
                               7, 7, 8, 8, 9, 9, 10, 10, 11, 11, 12, 12, 13, 13};

static void codes(inflater *s, const huff_table *lc, const huff_table *dc) {
    int sym;
    for (;;) {
        sym = decode_sym(s, lc);
        if (sym < 256) {
            put(s, (uint8_t)sym);
        } else if (sym == 256) {
            return;
        } else {
            int len, dist;
            sym -= 257;
            if (sym >= 29) fail(s->c, "the header's zlib stream holds a bad length");
            len = LBASE[sym] + getbits(s, LEXT[sym]);
            sym = decode_sym(s, dc);
            if (sym >= 30) fail(s->c, "the header's zlib stream holds a bad distance");
            dist = DBASE[sym] + getbits(s, DEXT[sym]);
            if ((size_t)dist > s->outlen) fail(s->c, "the header's zlib stream reaches back too far");
            while (len--) put(s, s->out[s->outlen - (size_t)dist]);
        }
    }
}

static void fixed_block(inflater *s) {
    huff_table lc, dc;
    short lengths[288];
    int i;
    for (i = 0; i < 144; i++) lengths[i] = 8;
    for (; i < 256; i++) lengths[i] = 9;
    for (; i < 280; i++) lengths[i] = 7;
    for (; i < 288; i++) lengths[i] = 8;
    build(&lc, lengths, 288);
    for (i = 0; i < 30; i++) lengths[i] = 5;
    build(&dc, lengths, 30);
    codes(s, &lc, &dc);
}

static void dynamic_block(inflater *s) {
    static const short order[19] = {16, 17, 18, 0, 8, 7, 9, 6, 10, 5, 11, 4, 12, 3, 13, 2, 14, 1, 15};
    short lengths[320];
    huff_table lc, dc;
    int nlen = getbits(s, 5) + 257, ndist = getbits(s, 5) + 1, ncode = getbits(s, 4) + 4;
    int i, err;
    if (nlen > 286 || ndist > 30) fail(s->c, "the header's zlib stream has bad table sizes");
    for (i = 0; i < 19; i++) lengths[order[i]] = i < ncode ? (short)getbits(s, 3) : 0;
    if (build(&lc, lengths, 19) != 0) fail(s->c, "the header's zlib stream has a bad code table");
    for (i = 0; i < nlen + ndist;) {
        int sym = decode_sym(s, &lc), len = 0, rep;
        if (sym < 16) {
            lengths[i++] = (short)sym;
            continue;
        }
        if (sym == 16) {
            if (i == 0) fail(s->c, "the header's zlib stream repeats nothing");
            len = lengths[i - 1];
            rep = 3 + getbits(s, 2);
        } else if (sym == 17) {
            rep = 3 + getbits(s, 3);
        } else {
            rep = 11 + getbits(s, 7);
        }
        if (i + rep > nlen + ndist) fail(s->c, "the header's zlib stream has too many lengths");
        while (rep--) lengths[i++] = (short)len;
    }
    if (lengths[256] == 0) fail(s->c, "the header's zlib stream has no end code");
    err = build(&lc, lengths, nlen);
    if (err < 0 || (err > 0 && nlen - lc.count[0] != 1))
        fail(s->c, "the header's zlib stream has a bad literal code");
    err = build(&dc, lengths + nlen, ndist);
    if (err < 0 || (err > 0 && ndist - dc.count[0] != 1))
        fail(s->c, "the header's zlib stream has a bad distance code");
    codes(s, &lc, &dc);
}

/* The JSON text of a header: a zlib stream, with the preset dictionary from version 5.
 * Returns a NUL-terminated scratch buffer and its length. */
static char *unpack_header(ctx_t *c, const uint8_t *in, size_t len, int version, size_t *n) {
    inflater s;
    size_t dictlen = 0, start;
    int last, cmf, flg;
    char *text;
    memset(&s, 0, sizeof s);
    s.c = c;
    if (len < 6) fail(c, "header too short");
    cmf = in[0];
    flg = in[1];
    if ((cmf & 15) != 8 || (cmf >> 4) > 7 || (cmf * 256 + flg) % 31 != 0)
        fail(c, "unreadable header (not a zlib stream)");
    s.in = in;
    s.inlen = len;
    s.inpos = 2;
    if (flg & 0x20) {
        uint32_t want;
        if (version < 5) fail(c, "unreadable header (a dictionary before version 5)");
        dictlen = sizeof HEADER_DICT - 1;
        want = adler32_of((const uint8_t *)HEADER_DICT, dictlen);
        if (len < 6 + 4 || ((uint32_t)in[2] << 24 | (uint32_t)in[3] << 16 |
                            (uint32_t)in[4] << 8 | in[5]) != want)
            fail(c, "unreadable header (another dictionary)");
        s.inpos = 6;
    }
    s.outmax = dictlen + MAX_HEADER;
    s.outcap = dictlen + 4096;
    s.out = scratch(c, s.outcap + 1);
    s.slot = c->nblocks - 1;
    memcpy(s.out, HEADER_DICT, dictlen);
    s.outlen = dictlen;
    do {
        int type;
        last = getbits(&s, 1);
        type = getbits(&s, 2);
        if (type == 0) {
            uint32_t blen, nlen;
            s.bitbuf = 0;
            s.bitcnt = 0;
            if (s.inpos + 4 > s.inlen) fail(c, "the header's zlib stream is truncated");
            blen = s.in[s.inpos] | (uint32_t)s.in[s.inpos + 1] << 8;
            nlen = s.in[s.inpos + 2] | (uint32_t)s.in[s.inpos + 3] << 8;
            s.inpos += 4;
            if (blen != (~nlen & 0xFFFFu)) fail(c, "the header's zlib stream is damaged");
            if (s.inpos + blen > s.inlen) fail(c, "the header's zlib stream is truncated");
            while (blen--) put(&s, s.in[s.inpos++]);
        } else if (type == 1) {
            fixed_block(&s);
        } else if (type == 2) {
            dynamic_block(&s);
        } else {
            fail(c, "the header's zlib stream has a bad block type");
        }
    } while (!last);
    if (s.inpos + 4 > s.inlen) fail(c, "the header's zlib stream lacks its checksum");
    start = dictlen;
    if (adler32_of(s.out + start, s.outlen - start) !=
        ((uint32_t)s.in[s.inpos] << 24 | (uint32_t)s.in[s.inpos + 1] << 16 |
         (uint32_t)s.in[s.inpos + 2] << 8 | s.in[s.inpos + 3]))
        fail(c, "unreadable header (checksum of the unpacked text)");
    *n = s.outlen - start;
    text = (char *)s.out + start;
    text[*n] = '\0';
    return text;
}

/* ------------------------------------------------------------ JSON */
enum { J_NULL, J_BOOL, J_NUM, J_STR, J_ARR, J_OBJ };

typedef struct jv {
    int type;
    int is_int, int_ok;                 /* a number written without . or e; fits int64 */
    int64_t ival;
    double num;
    char *str;                          /* J_STR: UTF-8, NUL-terminated */
    size_t len;
    size_t n;                           /* J_ARR, J_OBJ: items */
    struct jv **items;
    char **keys;
} jv;

typedef struct {
    ctx_t *c;
    const char *p, *end;
    int depth;
} jparser;

static void jws(jparser *j) {
    while (j->p < j->end && (*j->p == ' ' || *j->p == '\t' || *j->p == '\n' || *j->p == '\r'))
        j->p++;
}

static void jfail(jparser *j) { fail(j->c, "unreadable header (not JSON)"); }

static void utf8_put(char *out, size_t *k, uint32_t cp) {
    if (cp < 0x80) {
        out[(*k)++] = (char)cp;
    } else if (cp < 0x800) {
        out[(*k)++] = (char)(0xC0 | cp >> 6);
        out[(*k)++] = (char)(0x80 | (cp & 0x3F));
    } else if (cp < 0x10000) {
        out[(*k)++] = (char)(0xE0 | cp >> 12);
        out[(*k)++] = (char)(0x80 | ((cp >> 6) & 0x3F));
        out[(*k)++] = (char)(0x80 | (cp & 0x3F));
    } else {
        out[(*k)++] = (char)(0xF0 | cp >> 18);
        out[(*k)++] = (char)(0x80 | ((cp >> 12) & 0x3F));
        out[(*k)++] = (char)(0x80 | ((cp >> 6) & 0x3F));
        out[(*k)++] = (char)(0x80 | (cp & 0x3F));
    }
}

static int hex4(jparser *j, uint32_t *v) {
    int i;
    *v = 0;
    if (j->end - j->p < 4) return 0;
    for (i = 0; i < 4; i++) {
        char ch = *j->p++;
        *v <<= 4;
        if (ch >= '0' && ch <= '9') *v |= (uint32_t)(ch - '0');
        else if (ch >= 'a' && ch <= 'f') *v |= (uint32_t)(ch - 'a' + 10);
        else if (ch >= 'A' && ch <= 'F') *v |= (uint32_t)(ch - 'A' + 10);
        else return 0;
    }
    return 1;
}

static char *jstring(jparser *j, size_t *len) {
    const char *q = ++j->p;
    char *out;
    size_t k = 0;
    while (q < j->end && *q != '"') q += (*q == '\\' && q + 1 < j->end) ? 2 : 1;
    if (q >= j->end) jfail(j);
    out = scratch(j->c, (size_t)(q - j->p) + 1);  /* unescaping never lengthens it */
    while (*j->p != '"') {
        unsigned char ch = (unsigned char)*j->p++;
        if (ch < 0x20) jfail(j);
        if (ch != '\\') {
            out[k++] = (char)ch;
            continue;
        }
        ch = (unsigned char)*j->p++;
        switch (ch) {
        case '"': case '\\': case '/': out[k++] = (char)ch; break;
        case 'b': out[k++] = '\b'; break;
        case 'f': out[k++] = '\f'; break;
        case 'n': out[k++] = '\n'; break;
        case 'r': out[k++] = '\r'; break;
        case 't': out[k++] = '\t'; break;
        case 'u': {
            uint32_t cp, lo;
            if (!hex4(j, &cp)) jfail(j);
            if (cp >= 0xD800 && cp < 0xDC00 && j->end - j->p >= 6 && j->p[0] == '\\' &&
                j->p[1] == 'u') {
                const char *save = j->p;
                j->p += 2;
                if (hex4(j, &lo) && lo >= 0xDC00 && lo < 0xE000)
                    cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
                else
                    j->p = save;
            }
            utf8_put(out, &k, cp);  /* 6 escape bytes give at most 4 */
            break;
        }
        default: jfail(j);
        }
    }
    j->p++;
    out[k] = '\0';
    *len = k;
    return out;
}

static jv *jvalue(jparser *j);

static jv *jcontainer(jparser *j, int obj) {
    jv *v = scratch(j->c, sizeof *v);
    size_t cap = 0;
    v->type = obj ? J_OBJ : J_ARR;
    if (++j->depth > MAX_JSON_DEPTH) fail(j->c, "unreadable header (nested too deeply)");
    j->p++;
    jws(j);
    if (j->p < j->end && *j->p == (obj ? '}' : ']')) {
        j->p++;
        j->depth--;
        return v;
    }
    for (;;) {
        char *key = NULL;
        jv *item;
        jws(j);
        if (obj) {
            size_t kl;
            if (j->p >= j->end || *j->p != '"') jfail(j);
            key = jstring(j, &kl);
            jws(j);
            if (j->p >= j->end || *j->p != ':') jfail(j);
            j->p++;
        }
        item = jvalue(j);
        if (v->n == cap) {
            size_t nc = cap ? 2 * cap : 8;
            jv **items = scratch(j->c, nc * sizeof *items);
            char **keys = scratch(j->c, nc * sizeof *keys);
            if (v->n) {
                memcpy(items, v->items, v->n * sizeof *items);
                memcpy(keys, v->keys, v->n * sizeof *keys);
            }
            v->items = items;
            v->keys = keys;
            cap = nc;
        }
        v->items[v->n] = item;
        v->keys[v->n] = key;
        v->n++;
        jws(j);
        if (j->p < j->end && *j->p == ',') {
            j->p++;
            continue;
        }
        if (j->p < j->end && *j->p == (obj ? '}' : ']')) {
            j->p++;
            break;
        }
        jfail(j);
    }
    j->depth--;
    return v;
}

static jv *jnumber(jparser *j) {
    const char *s = j->p;
    jv *v = scratch(j->c, sizeof *v);
    char buf[400];
    int frac = 0;
    if (j->p < j->end && *j->p == '-') j->p++;
    if (j->p >= j->end) jfail(j);
    if (*j->p == '0') {
        j->p++;
    } else if (*j->p >= '1' && *j->p <= '9') {
        while (j->p < j->end && *j->p >= '0' && *j->p <= '9') j->p++;
    } else {
        jfail(j);
    }
    if (j->p < j->end && *j->p == '.') {
        frac = 1;
        j->p++;
        if (j->p >= j->end || *j->p < '0' || *j->p > '9') jfail(j);
        while (j->p < j->end && *j->p >= '0' && *j->p <= '9') j->p++;
    }
    if (j->p < j->end && (*j->p == 'e' || *j->p == 'E')) {
        frac = 1;
        j->p++;
        if (j->p < j->end && (*j->p == '+' || *j->p == '-')) j->p++;
        if (j->p >= j->end || *j->p < '0' || *j->p > '9') jfail(j);
        while (j->p < j->end && *j->p >= '0' && *j->p <= '9') j->p++;
    }
    v->type = J_NUM;
    v->is_int = !frac;
    if ((size_t)(j->p - s) >= sizeof buf) {
        v->num = frac ? 0 : 1e300;  /* a longer literal: no field takes it */
        v->int_ok = 0;
        return v;
    }
    memcpy(buf, s, (size_t)(j->p - s));
    buf[j->p - s] = '\0';
    v->num = strtod(buf, NULL);
    if (!frac) {
        const char *d = buf + (buf[0] == '-');
        uint64_t acc = 0;
        v->int_ok = 1;
        for (; *d; d++) {
            if (acc > (UINT64_C(1) << 62)) { v->int_ok = 0; break; }
            acc = acc * 10 + (uint64_t)(*d - '0');
        }
        if (v->int_ok && acc > (UINT64_C(1) << 62)) v->int_ok = 0;
        v->ival = buf[0] == '-' ? -(int64_t)acc : (int64_t)acc;
    }
    return v;
}

static jv *jvalue(jparser *j) {
    jv *v;
    jws(j);
    if (j->p >= j->end) jfail(j);
    switch (*j->p) {
    case '{': return jcontainer(j, 1);
    case '[': return jcontainer(j, 0);
    case '"':
        v = scratch(j->c, sizeof *v);
        v->type = J_STR;
        v->str = jstring(j, &v->len);
        return v;
    case 't': case 'f': case 'n': {
        const char *word = *j->p == 't' ? "true" : *j->p == 'f' ? "false" : "null";
        size_t n = strlen(word);
        if ((size_t)(j->end - j->p) < n || memcmp(j->p, word, n) != 0) jfail(j);
        j->p += n;
        v = scratch(j->c, sizeof *v);
        v->type = *word == 'n' ? J_NULL : J_BOOL;
        v->ival = *word == 't';
        return v;
    }
    case 'N': case 'I':
    case '-':
        if (j->end - j->p >= 3 && !memcmp(j->p, "NaN", 3)) {
            j->p += 3;
            v = scratch(j->c, sizeof *v);
            v->type = J_NUM;
            v->num = NAN;
            return v;
        }
        {  /* Python's json reads these too: a number no field accepts */
            int neg = *j->p == '-';
            if (j->end - j->p >= 8 + neg && !memcmp(j->p + neg, "Infinity", 8)) {
                j->p += 8 + neg;
                v = scratch(j->c, sizeof *v);
                v->type = J_NUM;
                v->num = neg ? -HUGE_VAL : HUGE_VAL;
                return v;
            }
        }
        return jnumber(j);
    default: return jnumber(j);
    }
}

/* Valid UTF-8 (surrogate code points allowed, as Python's decoder here allows them). */
static int utf8_ok(const unsigned char *s, size_t n) {
    size_t i = 0, need, k;
    while (i < n) {
        unsigned char b = s[i];
        uint32_t cp;
        if (b < 0x80) {
            i++;
            continue;
        }
        if (b >= 0xC2 && b <= 0xDF) { need = 1; cp = b & 0x1Fu; }
        else if (b >= 0xE0 && b <= 0xEF) { need = 2; cp = b & 0x0Fu; }
        else if (b >= 0xF0 && b <= 0xF4) { need = 3; cp = b & 0x07u; }
        else return 0;
        if (n - i <= need) return 0;
        for (k = 1; k <= need; k++) {
            if ((s[i + k] & 0xC0) != 0x80) return 0;
            cp = cp << 6 | (s[i + k] & 0x3Fu);
        }
        if ((need == 2 && cp < 0x800) || (need == 3 && (cp < 0x10000 || cp > 0x10FFFF)))
            return 0;
        i += need + 1;
    }
    return 1;
}

static jv *jget(const jv *o, const char *key) {
    size_t i;
    if (!o || o->type != J_OBJ) return NULL;
    for (i = o->n; i-- > 0;)  /* the last of duplicate keys, as Python's json keeps */
        if (strcmp(o->keys[i], key) == 0) return o->items[i];
    return NULL;
}

/* ------------------------------------------------------------ canonical Huffman */
typedef struct {
    int count[16];
    int order[300];
    int used;
} hcode;

/* Code lengths, 4-bit nibbles high first, of n symbols from exactly (n + 1) / 2 bytes. */
static void code_from_nibbles(ctx_t *c, hcode *h, const uint8_t *p, size_t size, int n) {
    int sym, len, k = 0;
    uint64_t kraft = 0;
    unsigned char lengths[300];
    if (n > 300 || size != (size_t)(n + 1) / 2) fail(c, "code-length table has the wrong size");
    for (sym = 0; sym < n; sym++)
        lengths[sym] = (unsigned char)(sym % 2 ? p[sym / 2] & 15 : p[sym / 2] >> 4);
    memset(h->count, 0, sizeof h->count);
    for (sym = 0; sym < n; sym++) if (lengths[sym]) h->count[lengths[sym]]++;
    for (len = 1; len < 16; len++) kraft += (uint64_t)h->count[len] << (15 - len);
    if (kraft > (1u << 15)) fail(c, "Huffman code lengths violate the Kraft inequality");
    for (len = 1; len < 16; len++)
        for (sym = 0; sym < n; sym++)
            if (lengths[sym] == len) h->order[k++] = sym;
    h->used = k;
}

/* Exactly count symbols from exactly nbits bits of p[0..size) (huffman.h): a short
 * stream, bits left over or a pattern that is no code word is refused. */
static int *huff_decode(ctx_t *c, const hcode *h, const uint8_t *p, size_t size,
                        int64_t nbits, int64_t count) {
    int *out, status;
    if (nbits < 0 || (uint64_t)nbits > 8 * (uint64_t)size || count < 0 ||
        count > (nbits > 0 ? nbits : 0))
        fail(c, "%s", dz_huff_error(DZ_HUFF_SIZES));  /* before allocating */
    out = scratch(c, (size_t)(count ? count : 1) * sizeof *out);
    status = dz_huff_decode(p, size, nbits, count, h->count, h->order, h->used, out,
                            (int)sizeof *out);
    if (status != DZ_HUFF_OK) fail(c, "%s", dz_huff_error(status));
    return out;
}

/* ------------------------------------------------------------ values */
static float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1F, man = h & 0x3FF, bits;
    float f;
    if (exp == 0) {
        if (man == 0) {
            bits = sign;
        } else {  /* subnormal: normalize */
            exp = 1;
            while (!(man & 0x400)) { man <<= 1; exp--; }
            man &= 0x3FF;
            bits = sign | ((exp + 112) << 23) | (man << 13);
        }
    } else if (exp == 31) {
        bits = sign | 0x7F800000u | (man << 13);
    } else {
        bits = sign | ((exp + 112) << 23) | (man << 13);
    }
    memcpy(&f, &bits, 4);
    return f;
}

static uint16_t float_to_half(float f) {  /* round to nearest even, as NumPy casts */
    uint32_t x, sign, man;
    int exp;
    memcpy(&x, &f, 4);
    sign = (x >> 16) & 0x8000;
    exp = (int)((x >> 23) & 0xFF);
    man = x & 0x7FFFFF;
    if (exp == 255) return (uint16_t)(sign | 0x7C00 | (man ? 0x200 : 0));
    exp = exp - 127 + 15;
    if (exp >= 31) return (uint16_t)(sign | 0x7C00);
    if (exp <= 0) {
        uint32_t m, shift, half, rest;
        if (exp < -10) return (uint16_t)sign;
        m = man | 0x800000;
        shift = (uint32_t)(14 - exp);
        half = 1u << (shift - 1);
        rest = m & ((1u << shift) - 1);
        m >>= shift;
        if (rest > half || (rest == half && (m & 1))) m++;
        return (uint16_t)(sign | m);
    }
    {
        uint32_t h = sign | ((uint32_t)exp << 10) | (man >> 13), rest = man & 0x1FFF;
        if (rest > 0x1000 || (rest == 0x1000 && (h & 1))) h++;
        return (uint16_t)h;
    }
}

static const char *const DTYPE_NAMES[] = {"float32", "float16", "bfloat16", "int64", "int32",
                                          "uint8", "bool", NULL};
static const char *const FLOAT_STORES[] = {"float32", "float16", "int64", "int32", "uint8",
                                           "bool", NULL};
static const int FLOAT_SIZES[] = {4, 2, 8, 4, 1, 1};

/* A stored value as the declared dtype holds it, then as float32 (NumPy's astype). */
static float as_dtype(double v, int64_t iv, int is_int, const char *dtype) {
    if (!strcmp(dtype, "float32") || !strcmp(dtype, "bfloat16")) return is_int ? (float)iv : (float)v;
    if (!strcmp(dtype, "float16")) return half_to_float(float_to_half(is_int ? (float)iv : (float)v));
    if (!strcmp(dtype, "bool")) return (is_int ? iv != 0 : v != 0) ? 1.0f : 0.0f;
    if (!is_int) {
        if (!(fabs(v) < 9.2e18)) return 0.0f;  /* no int64 holds it: not a file deepzip writes */
        iv = (int64_t)v;
    }
    if (!strcmp(dtype, "int32")) return (float)(int32_t)(uint32_t)(uint64_t)iv;
    if (!strcmp(dtype, "uint8")) return (float)(uint8_t)(uint64_t)iv;
    return (float)iv;
}

static int index_of(const char *const *names, const char *s) {
    int i;
    for (i = 0; names[i]; i++) if (!strcmp(names[i], s)) return i;
    return -1;
}

static int grid_bits(const char *store) {  /* "int2".."int8" -> 2..8, else 0 */
    if (strlen(store) == 4 && !strncmp(store, "int", 3) && store[3] >= '2' && store[3] <= '8')
        return store[3] - '0';
    return 0;
}

static uint64_t grid_bytes(uint64_t n, int bits) { return 4 + (n * (uint64_t)bits + 7) / 8; }

/* One group of n values on a bits-bit grid: float16 lo and step, then the levels, most
 * significant bit first; value = lo + q * step in float32. */
static void grid_decode(ctx_t *c, const uint8_t *p, uint64_t n, int bits, float *out) {
    float lo = half_to_float((uint16_t)(p[0] | p[1] << 8));
    float step = half_to_float((uint16_t)(p[2] | p[3] << 8));
    uint64_t i, pos = 32;
    if (!isfinite(lo) || !isfinite(step)) fail(c, "a grid's lo or step is not a finite number");
    for (i = 0; i < n; i++) {
        unsigned q = 0;
        int b;
        float scaled;
        for (b = 0; b < bits; b++, pos++) q = q << 1 | ((p[pos >> 3] >> (7 - (pos & 7))) & 1);
        scaled = (float)q * step;
        out[i] = lo + scaled;
    }
}

/* ------------------------------------------------------------ the header's checks */
typedef struct {
    const jv *e;
    const char *name, *enc, *dtype;
    int ndim;
    int64_t shape[DZIP_MAX_DIMS];
    uint64_t numel;
    size_t off[8], size[8];             /* parts, in the order of the encoding's list */
    int nparts;
} entry_t;

static const char *const ENCODINGS[] = {"raw", "bn", "dense", "sparse", "kernel", "alias", NULL};
static const char *const PART_NAMES[6][8] = {
    {"data"}, {"data"}, {"codebook", "index_lengths", "indices"},
    {"codebook", "index_lengths", "indices", "gap_lengths", "gaps"},
    {"codebook", "index_lengths", "indices", "gap_lengths", "gaps", "count_lengths", "counts",
     "subsets"},
    {NULL}};
static const int NPARTS[6] = {1, 1, 3, 5, 8, 0};

static int64_t jint(ctx_t *c, const jv *e, const char *key, int64_t lo, int64_t hi) {
    const jv *v = jget(e, key);
    if (!v || v->type != J_NUM || !v->is_int || !v->int_ok || v->ival < lo || v->ival > hi)
        fail(c, "bad '%s' in header", key);
    return v->ival;
}

static const char *jstr(ctx_t *c, const jv *e, const char *key) {
    const jv *v = jget(e, key);
    size_t chars = 0, i;
    if (!v || v->type != J_STR) fail(c, "bad '%s' in a tensor entry", key);
    for (i = 0; i < v->len; i++) chars += ((unsigned char)v->str[i] & 0xC0) != 0x80;
    if (chars == 0 || chars > 1000) fail(c, "bad '%s' in a tensor entry", key);
    return v->str;
}

static const char *jchoice(ctx_t *c, const jv *e, const char *key, const char *const *allowed) {
    const jv *v = jget(e, key);
    if (!v || v->type != J_STR || strlen(v->str) != v->len || index_of(allowed, v->str) < 0)
        fail(c, "bad %s in a tensor entry", key);
    return v->str;
}

static const char *jstore(ctx_t *c, const jv *e, const char *key) {
    const jv *v = jget(e, key);
    if (!v || v->type != J_STR || strlen(v->str) != v->len ||
        (index_of(FLOAT_STORES, v->str) < 0 && !grid_bits(v->str)))
        fail(c, "bad %s in a tensor entry", key);
    return v->str;
}

static int enc_id(const char *enc) { return index_of(ENCODINGS, enc); }

static uint64_t sat_mul(uint64_t a, uint64_t b) {
    if (a && b > (UINT64_C(1) << 62) / a) return UINT64_C(1) << 62;
    return a * b;
}

static int kernel_size(const entry_t *t) {
    uint64_t size = 1;
    int i;
    if (t->ndim < 3) return 0;
    for (i = 2; i < t->ndim; i++) size = sat_mul(size, (uint64_t)t->shape[i]);
    return size >= 2 && size <= MAX_KERNEL ? (int)size : 0;
}

/* The sizes its fields fix, of every part but the coded streams (those: -1). */
static void fixed_sizes(ctx_t *c, const entry_t *t, int64_t sizes[8]) {
    int id = enc_id(t->enc), i;
    for (i = 0; i < 8; i++) sizes[i] = -1;
    if (id == 5) return;
    if (id <= 1) {
        const char *store = jstore(c, t->e, "store");
        uint64_t groups = id == 1 ? 2 : 1, n;
        int bits = grid_bits(store);
        n = bits ? sat_mul(groups, grid_bytes(t->numel, bits))
                 : sat_mul(sat_mul(groups, t->numel),
                           (uint64_t)FLOAT_SIZES[index_of(FLOAT_STORES, store)]);
        sizes[0] = (int64_t)n;
        return;
    }
    {
        int64_t k = jint(c, t->e, "clusters", 0, MAX_CLUSTERS);
        const char *book = jstore(c, t->e, "codebook_dtype");
        int bits = grid_bits(book);
        if (!bits && strcmp(book, "float16") && strcmp(book, "float32"))
            fail(c, "bad codebook_dtype in a tensor entry");
        sizes[0] = bits ? (int64_t)grid_bytes((uint64_t)k, bits)
                        : k * FLOAT_SIZES[index_of(FLOAT_STORES, book)];
        sizes[1] = (k + 2) / 2;
        if (id >= 3) sizes[3] = ((1 << jint(c, t->e, "gap_bits", 1, 8)) + 1) / 2;
        if (id == 4) {
            int size = kernel_size(t);
            if (!size) fail(c, "'%s': the kernel layout needs 3+ dimensions and kernels of "
                               "2..16 weights", t->name);
            sizes[1] = (k + 1) / 2;
            sizes[5] = (size + 2) / 2;
        }
    }
}

static void read_shape(ctx_t *c, entry_t *t) {
    const jv *s = jget(t->e, "shape");
    size_t i;
    if (!s || s->type != J_ARR || s->n > DZIP_MAX_DIMS) fail(c, "'%s': bad shape", t->name);
    t->ndim = (int)s->n;
    t->numel = 1;
    for (i = 0; i < s->n; i++) {
        const jv *d = s->items[i];
        if (d->type != J_NUM || !d->is_int || !d->int_ok || d->ival < 0 ||
            d->ival >= ((int64_t)1 << 31))
            fail(c, "'%s': bad shape", t->name);
        t->shape[i] = d->ival;
        t->numel = sat_mul(t->numel, (uint64_t)d->ival);
    }
}

/* Version 4 and later: the parts lie back to back, sizes from the entries. */
static void layout(ctx_t *c, entry_t *ts, size_t n, size_t data_len) {
    static const char *const STREAM_BITS[8] = {NULL, NULL, "index_nbits", NULL, "gap_nbits",
                                               NULL, "count_nbits", "subset_nbits"};
    uint64_t offset = 0;
    size_t i;
    int k;
    for (i = 0; i < n; i++) {
        entry_t *t = &ts[i];
        int64_t sizes[8];
        int id;
        if (t->e->type != J_OBJ || jget(t->e, "parts"))
            fail(c, "bad tensor entry (version 4 entries list no parts)");
        t->name = jstr(c, t->e, "name");
        t->enc = jchoice(c, t->e, "encoding", ENCODINGS);
        read_shape(c, t);
        fixed_sizes(c, t, sizes);
        id = enc_id(t->enc);
        for (k = 0; k < 8; k++)
            if (STREAM_BITS[k] && k < NPARTS[id])
                sizes[k] = (jint(c, t->e, STREAM_BITS[k], 0, 8 * (int64_t)data_len) + 7) / 8;
        t->nparts = NPARTS[id];
        for (k = 0; k < t->nparts; k++) {
            t->off[k] = (size_t)offset;
            t->size[k] = (size_t)sizes[k];
            offset += (uint64_t)sizes[k];
            if (offset > data_len)
                fail(c, "'%s': its parts run past the end of the file (truncated?)", t->name);
        }
    }
    if (offset != data_len) fail(c, "the data area holds bytes that no entry accounts for");
}

/* Versions 2 and 3: the parts are listed, [offset, length] each. */
static void listed_parts(ctx_t *c, entry_t *t, size_t data_len) {
    int id = enc_id(t->enc), k;
    const jv *parts = jget(t->e, "parts");
    if (id == 5 && !parts) {
        t->nparts = 0;
        return;
    }
    if (!parts || parts->type != J_OBJ) fail(c, "'%s': parts must be listed", t->name);
    for (k = 0; k < NPARTS[id]; k++) {
        const jv *p = jget(parts, PART_NAMES[id][k]);
        if (!p || p->type != J_ARR || p->n != 2) fail(c, "'%s': bad part", t->name);
        if (p->items[0]->type != J_NUM || !p->items[0]->is_int || !p->items[0]->int_ok ||
            p->items[1]->type != J_NUM || !p->items[1]->is_int || !p->items[1]->int_ok)
            fail(c, "'%s': bad part", t->name);
        if (p->items[0]->ival < 0 || p->items[1]->ival < 0 ||
            (uint64_t)p->items[0]->ival + (uint64_t)p->items[1]->ival > data_len)
            fail(c, "'%s': a part lies outside the file (truncated?)", t->name);
        t->off[k] = (size_t)p->items[0]->ival;
        t->size[k] = (size_t)p->items[1]->ival;
    }
    {  /* exactly the encoding's parts */
        size_t i, distinct = 0;
        for (i = 0; i < parts->n; i++) {
            size_t j;
            int dup = 0;
            for (j = i + 1; j < parts->n; j++) dup |= !strcmp(parts->keys[i], parts->keys[j]);
            {
            distinct += !dup;
            int known = 0;
            for (j = 0; j < (size_t)NPARTS[id]; j++) known |= !strcmp(PART_NAMES[id][j], parts->keys[i]);
            if (!known) fail(c, "'%s': parts must be exactly the encoding's", t->name);
            }
        }
        if (distinct != (size_t)NPARTS[id]) fail(c, "'%s': parts must be exactly the encoding's", t->name);
    }
    t->nparts = NPARTS[id];
}

typedef struct {
    const char *key;
    int ndim;
    int64_t shape[DZIP_MAX_DIMS];
} produced;

static int same_shape(const produced *p, const entry_t *t) {
    int i;
    if (p->ndim != t->ndim) return 0;
    for (i = 0; i < t->ndim; i++) if (p->shape[i] != t->shape[i]) return 0;
    return 1;
}

/* ------------------------------------------------------------ big numbers (subsets) */
typedef struct {
    uint32_t limb[BIG_LIMBS];           /* little-endian base 2^32 */
} big;

static void big_mul_small(ctx_t *c, big *b, uint32_t m) {
    uint64_t carry = 0;
    int i;
    for (i = 0; i < BIG_LIMBS; i++) {
        uint64_t v = (uint64_t)b->limb[i] * m + carry;
        b->limb[i] = (uint32_t)v;
        carry = v >> 32;
    }
    if (carry) fail(c, "kernel subsets: a block too large");
}

static uint32_t big_divmod_small(big *b, uint32_t d) {
    uint64_t rem = 0;
    int i;
    for (i = BIG_LIMBS - 1; i >= 0; i--) {
        uint64_t v = rem << 32 | b->limb[i];
        b->limb[i] = (uint32_t)(v / d);
        rem = v % d;
    }
    return (uint32_t)rem;
}

static int big_bitlength_minus_one(big b) {  /* bit length of b - 1 (b >= 1) */
    int i, bits = 0;
    for (i = 0; i < BIG_LIMBS; i++) {  /* b -= 1 */
        if (b.limb[i]--) break;
    }
    for (i = BIG_LIMBS - 1; i >= 0; i--)
        if (b.limb[i]) {
            uint32_t v = b.limb[i];
            bits = 32 * i;
            while (v) { bits++; v >>= 1; }
            break;
        }
    return bits;
}

static int big_is_zero(const big *b) {
    int i;
    for (i = 0; i < BIG_LIMBS; i++) if (b->limb[i]) return 0;
    return 1;
}

static uint32_t comb(int n, int k) {
    uint64_t r = 1;
    int i;
    for (i = 1; i <= k; i++) r = r * (uint64_t)(n - k + i) / (uint64_t)i;
    return (uint32_t)r;
}

/* ------------------------------------------------------------ the tensor layouts */
static float *book_values(ctx_t *c, const entry_t *t, int64_t k, const uint8_t *p) {
    const char *store = jget(t->e, "codebook_dtype")->str;
    float *book = scratch(c, (size_t)(k ? k : 1) * sizeof *book);
    int64_t i;
    if (grid_bits(store)) {
        grid_decode(c, p, (uint64_t)k, grid_bits(store), book);
    } else if (!strcmp(store, "float16")) {
        for (i = 0; i < k; i++) book[i] = half_to_float((uint16_t)(p[2 * i] | p[2 * i + 1] << 8));
    } else {
        for (i = 0; i < k; i++) {
            uint32_t u = le32(p + 4 * i);
            memcpy(&book[i], &u, 4);
        }
    }
    return book;
}

static void decode_shared(ctx_t *c, const entry_t *t, const uint8_t *data, float *out) {
    int id = enc_id(t->enc);
    int64_t k = jget(t->e, "clusters")->ival, numel = (int64_t)t->numel, i;
    const uint8_t *part[8];
    float *book;
    hcode icode, gcode;
    int *runs, *syms;
    int64_t entries, pos;
    int g;
    for (i = 0; i < t->nparts; i++) part[i] = data + t->off[i];
    book = book_values(c, t, k, part[0]);
    memset(out, 0, (size_t)numel * sizeof *out);
    if (id == 2) {
        code_from_nibbles(c, &icode, part[1], t->size[1], (int)k + 1);
        syms = huff_decode(c, &icode, part[2], t->size[2], jget(t->e, "index_nbits")->ival, numel);
        for (i = 0; i < numel; i++) if (syms[i] < k) out[i] = book[syms[i]];
        return;
    }
    g = (int)jget(t->e, "gap_bits")->ival;
    entries = jget(t->e, "entries")->ival;
    code_from_nibbles(c, &gcode, part[3], t->size[3], 1 << g);
    runs = huff_decode(c, &gcode, part[4], t->size[4], jget(t->e, "gap_nbits")->ival, entries);
    if (id == 3) {
        code_from_nibbles(c, &icode, part[1], t->size[1], (int)k + 1);
        syms = huff_decode(c, &icode, part[2], t->size[2], jget(t->e, "index_nbits")->ival, entries);
        pos = -1;
        for (i = 0; i < entries; i++) pos += runs[i] + 1;
        if (pos != numel - 1) fail(c, "sparse entries do not cover the tensor exactly");
        pos = -1;
        for (i = 0; i < entries; i++) {
            pos += runs[i] + 1;
            if (syms[i] < k) out[pos] = book[syms[i]];
        }
        return;
    }
    {  /* kernel */
        int size = kernel_size(t), n, b;
        int64_t kernels = numel / size, live = 0, nonzero = 0, j, at = 0;
        int64_t *where, subset_nbits = jget(t->e, "subset_nbits")->ival, bitpos = 0;
        int *counts, *idx;
        uint32_t *digits;
        uint16_t *patterns;
        uint32_t starts[MAX_KERNEL + 2];
        hcode ccode;
        pos = -1;
        for (i = 0; i < entries; i++) pos += runs[i] + 1;
        if (pos != kernels - 1) fail(c, "kernel entries do not cover the tensor exactly");
        code_from_nibbles(c, &ccode, part[5], t->size[5], size + 1);
        syms = huff_decode(c, &ccode, part[6], t->size[6], jget(t->e, "count_nbits")->ival, entries);
        where = scratch(c, (size_t)(entries ? entries : 1) * sizeof *where);
        counts = scratch(c, (size_t)(entries ? entries : 1) * sizeof *counts);
        pos = -1;
        for (i = 0; i < entries; i++) {
            pos += runs[i] + 1;
            if (syms[i] < size) {
                where[live] = pos;
                counts[live] = syms[i] + 1;
                nonzero += counts[live];
                live++;
            }
        }
        digits = scratch(c, (size_t)(live ? live : 1) * sizeof *digits);
        for (j = 0; j < live; j += CHUNK) {  /* mixed-radix blocks, most significant first */
            int64_t m = live - j < CHUNK ? live - j : CHUNK, q;
            big prod, v;
            int nb;
            memset(&prod, 0, sizeof prod);
            memset(&v, 0, sizeof v);
            prod.limb[0] = 1;
            for (q = 0; q < m; q++) big_mul_small(c, &prod, comb(size, counts[j + q]));
            nb = big_bitlength_minus_one(prod);
            if (bitpos + nb > subset_nbits)
                fail(c, "kernel subsets stream is shorter than its counts need");
            for (q = 0; q < nb; q++, bitpos++) {
                const uint8_t *s = part[7];
                big_mul_small(c, &v, 2);
                v.limb[0] |= (uint32_t)((s[bitpos >> 3] >> (7 - (bitpos & 7))) & 1);
            }
            for (q = m - 1; q >= 0; q--) digits[j + q] = big_divmod_small(&v, comb(size, counts[j + q]));
            if (!big_is_zero(&v)) fail(c, "kernel subsets stream holds an impossible value");
        }
        if (bitpos != subset_nbits) fail(c, "kernel subsets stream has bits left over");
        if (nonzero && !k) fail(c, "nonzero weights but an empty codebook");
        code_from_nibbles(c, &icode, part[1], t->size[1], (int)k);
        idx = huff_decode(c, &icode, part[2], t->size[2], jget(t->e, "index_nbits")->ival, nonzero);
        /* patterns of `size` bits in rank order, per count of ones */
        patterns = scratch(c, ((size_t)1 << size) * sizeof *patterns);
        for (n = 0; n <= size + 1; n++) starts[n] = 0;
        for (i = 0; i < ((int64_t)1 << size); i++) {
            int ones = 0;
            for (b = 0; b < size; b++) ones += (int)((i >> b) & 1);
            starts[ones + 1]++;
        }
        for (n = 1; n <= size + 1; n++) starts[n] += starts[n - 1];
        {
            uint32_t fill[MAX_KERNEL + 1];
            for (n = 0; n <= size; n++) fill[n] = starts[n];
            for (i = 0; i < ((int64_t)1 << size); i++) {
                int ones = 0;
                for (b = 0; b < size; b++) ones += (int)((i >> b) & 1);
                patterns[fill[ones]++] = (uint16_t)i;
            }
        }
        for (j = 0; j < live; j++) {
            uint16_t pattern = patterns[starts[counts[j]] + digits[j]];
            for (b = 0; b < size; b++)
                if ((pattern >> b) & 1) out[where[j] * size + b] = book[idx[at++]];
        }
    }
}

static void decode_raw(ctx_t *c, const entry_t *t, const uint8_t *p, uint64_t n, float *out) {
    const char *store = jget(t->e, "store")->str, *dtype = t->dtype;
    int bits = grid_bits(store);
    uint64_t i;
    if (bits) {
        grid_decode(c, p, n, bits, out);
        for (i = 0; i < n; i++) out[i] = as_dtype(out[i], 0, 0, dtype);
        return;
    }
    for (i = 0; i < n; i++) {
        if (!strcmp(store, "float32")) {
            uint32_t u = le32(p + 4 * i);
            float f;
            memcpy(&f, &u, 4);
            out[i] = as_dtype(f, 0, 0, dtype);
        } else if (!strcmp(store, "float16")) {
            out[i] = as_dtype(half_to_float((uint16_t)(p[2 * i] | p[2 * i + 1] << 8)), 0, 0,
                              dtype);
        } else if (!strcmp(store, "int64")) {
            uint64_t u = 0;
            int64_t v;
            int b;
            for (b = 7; b >= 0; b--) u = u << 8 | p[8 * i + (uint64_t)b];
            memcpy(&v, &u, 8);
            out[i] = as_dtype(0, v, 1, dtype);
        } else if (!strcmp(store, "int32")) {
            uint32_t u = le32(p + 4 * i);
            int32_t v;
            memcpy(&v, &u, 4);
            out[i] = as_dtype(0, v, 1, dtype);
        } else if (!strcmp(store, "uint8")) {
            out[i] = as_dtype(0, p[i], 1, dtype);
        } else {  /* bool */
            if (p[i] > 1)
                fail(c, "tensor '%s': a bool stored as a byte other than 0 or 1", t->name);
            out[i] = as_dtype(0, p[i], 1, dtype);
        }
    }
}

/* ------------------------------------------------------------ dzip_read */
static dzip_tensor *add_tensor(ctx_t *c, dzip_file *f, const char *name, const char *dtype,
                               int ndim, const int64_t *shape) {
    dzip_tensor *t = &f->tensors[f->count];
    int i;
    t->numel = 1;
    t->ndim = ndim;
    for (i = 0; i < ndim; i++) {
        t->shape[i] = shape[i];
        t->numel *= shape[i];
    }
    t->name = malloc(strlen(name) + 1);
    if (!t->name) fail(c, "out of memory");
    strcpy(t->name, name);
    f->count++;
    snprintf(t->dtype, sizeof t->dtype, "%s", dtype);
    if (t->numel) {
        t->data = malloc((size_t)t->numel * sizeof *t->data);
        if (!t->data) fail(c, "out of memory");
    }
    return t;
}

int dzip_read(const uint8_t *buf, size_t len, dzip_file *out) {
    static const uint8_t MAGIC[8] = {'D', 'Z', 'I', 'P', 0, '\r', '\n', 0x1A};
    ctx_t c;
    char error[200];
    memset(out, 0, sizeof *out);
    memset(&c, 0, sizeof c);
    c.error = error;
    error[0] = '\0';
    if (setjmp(c.fail)) {
        free_scratch(&c);
        dzip_free(out);
        snprintf(out->error, sizeof out->error, "%s", error);
        return -1;
    }
    {
        uint32_t hlen, hcrc, dcrc;
        size_t data_len, n, i, keys = 0, text_len;
        int version;
        const uint8_t *data;
        char *text;
        jparser jp;
        const jv *header, *tensors, *model;
        entry_t *ts;
        produced *seen;
        size_t nseen = 0;
        uint64_t total = 0;
        if (len < 24) fail(&c, "too short to be a .dzip file");
        if (memcmp(buf, MAGIC, 8)) fail(&c, "not a .dzip file (bad magic bytes)");
        version = buf[8] | buf[9] << 8;
        if (version < 2 || version > 5)
            fail(&c, "format version %d; this reader reads 2, 3, 4, 5", version);
        hlen = le32(buf + 12);
        hcrc = le32(buf + 16);
        dcrc = le32(buf + 20);
        if (hlen > len - 24) fail(&c, "truncated header");
        if (crc32_of(buf + 24, hlen) != hcrc) fail(&c, "header checksum mismatch");
        text = unpack_header(&c, buf + 24, hlen, version, &text_len);
        if (!utf8_ok((const unsigned char *)text, text_len)) fail(&c, "unreadable header (not UTF-8)");
        jp.c = &c;
        jp.p = text;
        jp.end = text + text_len;
        jp.depth = 0;
        header = jvalue(&jp);
        jws(&jp);
        if (jp.p != jp.end) fail(&c, "unreadable header (not JSON)");
        tensors = jget(header, "tensors");
        if (header->type != J_OBJ || !tensors || tensors->type != J_ARR)
            fail(&c, "header lacks a tensor list");
        data = buf + 24 + hlen;
        data_len = len - 24 - hlen;
        if (crc32_of(data, data_len) != dcrc) fail(&c, "data checksum mismatch (damaged or truncated)");
        out->version = version;
        n = tensors->n;
        ts = scratch(&c, (n ? n : 1) * sizeof *ts);
        for (i = 0; i < n; i++) ts[i].e = tensors->items[i];
        if (version >= 4) layout(&c, ts, n, data_len);
        seen = scratch(&c, (5 * n + 1) * sizeof *seen);
        for (i = 0; i < n; i++) {  /* every entry whole, before anything is decoded */
            entry_t *t = &ts[i];
            int64_t sizes[8];
            int id, k;
            size_t s;
            if (t->e->type != J_OBJ) fail(&c, "bad tensor entry");
            t->name = jstr(&c, t->e, "name");
            read_shape(&c, t);
            t->enc = jchoice(&c, t->e, "encoding", ENCODINGS);
            t->dtype = jchoice(&c, t->e, "dtype", DTYPE_NAMES);
            id = enc_id(t->enc);
            if (version < 4) listed_parts(&c, t, data_len);
            fixed_sizes(&c, t, sizes);
            for (k = 0; k < t->nparts; k++)
                if (sizes[k] >= 0 && (uint64_t)sizes[k] != t->size[k])
                    fail(&c, "'%s': a part has the wrong size for its entry", t->name);
            if (id == 5) {
                const char *of = jstr(&c, t->e, "of");
                int found = 0;
                for (s = 0; s < nseen; s++)
                    if (!strcmp(seen[s].key, of)) found = same_shape(&seen[s], t);
                if (!found) fail(&c, "'%s': alias of '%s', which comes nowhere before it with "
                                     "that shape", t->name, of);
            } else if (id == 1) {
                const jv *eps = jget(t->e, "eps");
                if (!eps || eps->type != J_NUM || eps->is_int || !(eps->num > 0 && eps->num < 1) ||
                    t->ndim != 1)
                    fail(&c, "'%s': bad BatchNorm entry", t->name);
            } else if (id >= 2) {
                jint(&c, t->e, "index_nbits", 0, 8 * (int64_t)t->size[2]);
                if (id == 2) {
                    if (t->numel > 8 * (uint64_t)t->size[2])
                        fail(&c, "'%s': more weights than bits in the file", t->name);
                } else {
                    int64_t g = jget(t->e, "gap_bits")->ival;
                    size_t other = id == 4 ? t->size[6] : t->size[2];
                    int64_t entries = jint(&c, t->e, "entries", 0,
                                           8 * (int64_t)(t->size[4] < other ? t->size[4] : other));
                    uint64_t units = id == 3 ? t->numel : t->numel / (uint64_t)kernel_size(t);
                    jint(&c, t->e, "gap_nbits", 0, 8 * (int64_t)t->size[4]);
                    if (units > ((uint64_t)entries << g))
                        fail(&c, "'%s': sparse entries cannot cover the tensor", t->name);
                    if (id == 4) {
                        jint(&c, t->e, "count_nbits", entries, 8 * (int64_t)t->size[6]);
                        jint(&c, t->e, "subset_nbits", 0, 8 * (int64_t)t->size[7]);
                    }
                }
            }
            /* the keys it produces */
            if (id == 1) {
                static const char *const BN[5] = {"weight", "bias", "running_mean",
                                                  "running_var", "num_batches_tracked"};
                for (k = 0; k < 5; k++) {
                    size_t klen = strlen(t->name) + strlen(BN[k]) + 2;
                    char *key = scratch(&c, klen);
                    snprintf(key, klen, "%s.%s", t->name, BN[k]);
                    seen[nseen].key = key;
                    seen[nseen].ndim = k == 4 ? 0 : 1;
                    seen[nseen].shape[0] = t->shape[0];
                    nseen++;
                }
                total += sat_mul(4, t->numel) + 1;
            } else {
                seen[nseen].key = t->name;
                seen[nseen].ndim = t->ndim;
                memcpy(seen[nseen].shape, t->shape, sizeof t->shape);
                nseen++;
                total += t->numel;
            }
            for (s = keys; s < nseen; s++) {
                size_t r;
                for (r = 0; r < s; r++)
                    if (!strcmp(seen[r].key, seen[s].key)) fail(&c, "'%s' appears twice", seen[s].key);
            }
            keys = nseen;
            if (total > (uint64_t)MAX_ELEMENTS)
                fail(&c, "declares more values than a reader decodes without a model to check "
                         "them against");
        }
        model = jget(header, "model");
        if (model && model->type != J_NULL && model->type != J_OBJ) fail(&c, "bad model spec");
        if (model && model->type == J_OBJ) {
            const jv *arch = jget(model, "arch");
            if (arch && arch->type == J_STR) snprintf(out->arch, sizeof out->arch, "%s", arch->str);
        }
        /* decode */
        out->tensors = calloc(nseen ? nseen : 1, sizeof *out->tensors);
        if (!out->tensors) fail(&c, "out of memory");
        for (i = 0; i < n; i++) {
            entry_t *t = &ts[i];
            int id = enc_id(t->enc);
            const uint8_t *p = t->nparts ? data + t->off[0] : data;
            if (id == 5) {
                const char *of = jget(t->e, "of")->str;
                size_t s;
                dzip_tensor *src = NULL, *dst;
                for (s = 0; s < out->count; s++)
                    if (!strcmp(out->tensors[s].name, of)) src = &out->tensors[s];
                dst = add_tensor(&c, out, t->name, src->dtype, t->ndim, t->shape);
                if (dst->numel) memcpy(dst->data, src->data, (size_t)dst->numel * sizeof *dst->data);
            } else if (id == 1) {
                static const char *const BN[5] = {"weight", "bias", "running_mean",
                                                  "running_var", "num_batches_tracked"};
                int64_t ch = t->shape[0], j;
                float *both = scratch(&c, (size_t)(2 * ch + 1) * sizeof *both);
                const char *store = jget(t->e, "store")->str;
                double eps = jget(t->e, "eps")->num;
                int bits = grid_bits(store), k;
                if (bits) {
                    grid_decode(&c, p, (uint64_t)ch, bits, both);
                    grid_decode(&c, p + grid_bytes((uint64_t)ch, bits), (uint64_t)ch, bits, both + ch);
                } else {
                    entry_t tmp = *t;
                    tmp.dtype = "float32";
                    decode_raw(&c, &tmp, p, (uint64_t)(2 * ch), both);
                }
                for (k = 0; k < 5; k++) {
                    char key[1100];
                    dzip_tensor *d;
                    snprintf(key, sizeof key, "%s.%s", t->name, BN[k]);
                    d = add_tensor(&c, out, key, k == 4 ? "int64" : "float32", k == 4 ? 0 : 1,
                                   t->shape);
                    for (j = 0; j < d->numel; j++)
                        d->data[j] = k == 0 ? both[j] : k == 1 ? both[ch + j]
                                   : k == 3 ? (float)(1.0 - eps) : 0.0f;
                }
            } else {
                dzip_tensor *d = add_tensor(&c, out, t->name, t->dtype, t->ndim, t->shape);
                if (id == 0) {
                    if (d->numel) decode_raw(&c, t, p, (uint64_t)d->numel, d->data);
                } else {
                    float *tmp = scratch(&c, (size_t)(d->numel ? d->numel : 1) * sizeof *tmp);
                    int64_t j;
                    decode_shared(&c, t, data, tmp);
                    for (j = 0; j < d->numel; j++) d->data[j] = as_dtype(tmp[j], 0, 0, t->dtype);
                }
            }
        }
    }
    free_scratch(&c);
    return 0;
}

void dzip_free(dzip_file *f) {
    size_t i;
    if (!f) return;
    if (f->tensors) {
        for (i = 0; i < f->count; i++) {
            free(f->tensors[i].name);
            free(f->tensors[i].data);
        }
        free(f->tensors);
    }
    f->tensors = NULL;
    f->count = 0;
}
