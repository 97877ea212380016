/* esqdecode: decode a packed .esq archive (FORMAT.md, format versions 1-3) back to the
 * ONNX/TFLite file it holds.  Written from docs/FORMAT.md only.
 * Usage: esqdecode IN.esq OUT */
#define _GNU_SOURCE
#include <errno.h>
#include <lzma.h>
#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <zlib.h>

#include "json.h"
#include "sha256.h"

#define HEADER_LIMIT (16u << 20)

static void fail(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "FormatError: ");
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, "\n");
    va_end(ap);
    exit(2);  /* bad input, as edgesqueeze exits */
}

static void *xmalloc(size_t n) {
    void *p = malloc(n ? n : 1);
    if (!p) { fprintf(stderr, "out of memory (%zu bytes)\n", n); exit(3); }
    return p;
}
static void *xcalloc(size_t n, size_t sz) {
    void *p = calloc(n ? n : 1, sz ? sz : 1);
    if (!p) { fprintf(stderr, "out of memory\n"); exit(3); }
    return p;
}

static uint16_t rd16(const uint8_t *p) { return (uint16_t)(p[0] | p[1] << 8); }
static uint32_t rd32(const uint8_t *p) { return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24; }
static uint64_t rd64(const uint8_t *p) { return (uint64_t)rd32(p) | (uint64_t)rd32(p + 4) << 32; }
static float f32_from_bits(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
static uint32_t bits_from_f32(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static float rdf32(const uint8_t *p) { return f32_from_bits(rd32(p)); }
static void wr32(uint8_t *p, uint32_t v) { p[0] = v; p[1] = v >> 8; p[2] = v >> 16; p[3] = v >> 24; }

static float f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h >> 15) << 31, exp = (h >> 10) & 0x1F, man = h & 0x3FF, u;
    if (exp == 0) {
        if (man == 0) u = sign;
        else { /* subnormal: normalize */
            int e = -1;
            do { man <<= 1; e++; } while (!(man & 0x400));
            man &= 0x3FF;
            u = sign | (uint32_t)(127 - 15 - e) << 23 | man << 13;
        }
    } else if (exp == 31) u = sign | 0x7F800000u | man << 13;
    else u = sign | (exp + 127 - 15) << 23 | man << 13;
    return f32_from_bits(u);
}

/* ------------------------------------------------------------------ JSON helpers */

static const char *jtype(const J *j) {
    static const char *n[] = {"null", "boolean", "integer", "float", "string", "array", "object"};
    return j ? n[j->type] : "missing";
}

static int is_uint(const J *j) { return j && j->type == JT_INT && !j->neg; }

static uint64_t need_uint(const J *j, const char *what) {
    if (!j) fail("%s: missing", what);
    if (j->type != JT_INT) fail("%s: must be an integer, not %s", what, jtype(j));
    if (j->neg) fail("%s: must be non-negative", what);
    return j->u;
}

/* signed integer within (lo, hi) both as int64 */
static int64_t need_int_range(const J *j, const char *what, int64_t lo, int64_t hi) {
    if (!j) fail("%s: missing", what);
    if (j->type != JT_INT) fail("%s: must be an integer, not %s", what, jtype(j));
    if (j->neg) {
        if (j->u > (uint64_t)INT64_MAX + 1 || -(__int128)j->u < lo) fail("%s: out of range", what);
        return (int64_t)(-(__int128)j->u);
    }
    if (j->u > (uint64_t)hi) fail("%s: out of range", what);
    return (int64_t)j->u;
}

static int str_is(const J *j, const char *s) {
    return j && j->type == JT_STR && j->slen == strlen(s) && !memcmp(j->s, s, j->slen);
}

static void exact_keys(const J *obj, const char *what, const char **keys, int nkeys) {
    if (!obj || obj->type != JT_OBJ) fail("%s: must be an object", what);
    for (size_t i = 0; i < obj->n; i++) {
        int ok = 0;
        for (int k = 0; k < nkeys; k++)
            if (strlen(keys[k]) == obj->klens[i] && !memcmp(keys[k], obj->keys[i], obj->klens[i])) ok = 1;
        if (!ok) fail("%s: unknown key '%s'", what, obj->keys[i]);
    }
    for (int k = 0; k < nkeys; k++)
        if (!json_get(obj, keys[k])) fail("%s: missing key '%s'", what, keys[k]);
}

/* ------------------------------------------------------------------ container */

typedef struct {
    const char *name;
    uint64_t offset, length;
    uint32_t crc;
    J *info;
    const uint8_t *data;
} Sec;

typedef struct {
    int version;
    J *root, *meta;
    Sec *secs;
    size_t nsecs;
} Archive;

static uint8_t *inflate_raw_limited(const uint8_t *in, size_t inlen, size_t limit, size_t *outlen, const char *what) {
    /* inflate a raw DEFLATE stream, at most limit+1 bytes out; refuse damaged/truncated,
       trailing input, or output past limit.  The buffer grows, never allocated from a declared size. */
    z_stream zs;
    memset(&zs, 0, sizeof zs);
    if (inflateInit2(&zs, -15) != Z_OK) fail("%s: inflateInit failed", what);
    size_t cap = 65536, len = 0;
    if (cap > limit + 1) cap = limit + 1;
    uint8_t *out = xmalloc(cap);
    zs.next_in = (Bytef *)in;
    zs.avail_in = (uInt)inlen; /* callers keep inlen < 4 GiB */
    int ret;
    for (;;) {
        if (len == cap) {
            if (cap >= limit + 1) { inflateEnd(&zs); fail("%s: inflates past its limit", what); }
            cap = cap * 2 > limit + 1 ? limit + 1 : cap * 2;
            out = realloc(out, cap);
            if (!out) { fprintf(stderr, "out of memory\n"); exit(3); }
        }
        zs.next_out = out + len;
        zs.avail_out = (uInt)(cap - len);
        ret = inflate(&zs, Z_NO_FLUSH);
        len = cap - zs.avail_out;
        if (ret == Z_STREAM_END) break;
        if (ret == Z_BUF_ERROR && zs.avail_in == 0) { inflateEnd(&zs); fail("%s: truncated DEFLATE stream", what); }
        if (ret != Z_OK && ret != Z_BUF_ERROR) { inflateEnd(&zs); fail("%s: damaged DEFLATE stream (%s)", what, zs.msg ? zs.msg : "?"); }
    }
    size_t rest = zs.avail_in;
    inflateEnd(&zs);
    if (rest) fail("%s: bytes follow the DEFLATE stream", what);
    if (len > limit) fail("%s: inflates past its limit", what);
    *outlen = len;
    return out;
}

static void read_archive(const uint8_t *f, size_t size, Archive *A) {
    /* 1 */
    if (size < 20) fail("file too short (%zu bytes) for the 20-byte prefix", size);
    /* 2 */
    static const uint8_t magic[8] = {0x89, 'E', 'S', 'Q', 0x0D, 0x0A, 0x1A, 0x0A};
    if (memcmp(f, magic, 8)) {
        if (memmem(f, 8, "ESQ", 3)) fail("magic: damaged newlines (text-mode transfer?)");
        fail("magic: not an .esq file");
    }
    /* 3 */
    int version = rd16(f + 8);
    if (version < 1 || version > 3) fail("version %d not supported (this reader reads 1, 2, 3)", version);
    /* 4 */
    unsigned flags = rd16(f + 10);
    if (flags & ~1u) fail("flags: unknown bits 0x%04x", flags);
    /* 5 */
    uint64_t H = rd64(f + 12);
    if (H > HEADER_LIMIT) fail("header length %llu exceeds the limit", (unsigned long long)H);
    if (size < 52 || H > size - 52) fail("header length %llu exceeds the file", (unsigned long long)H);
    const uint8_t *hdr = f + 20;
    size_t hlen = (size_t)H;
    uint8_t *hbuf = NULL;
    if (flags & 1) {
        hbuf = inflate_raw_limited(hdr, hlen, HEADER_LIMIT, &hlen, "header");
        hdr = hbuf;
    }
    /* 6 */
    char err[256];
    J *root = json_parse(hdr, hlen, err, sizeof err);
    if (!root) fail("header: %s", err);
    /* 7 */
    static const char *topkeys[] = {"format", "version", "meta", "sections"};
    exact_keys(root, "header", topkeys, 4);
    if (!str_is(json_get(root, "format"), "esq")) fail("header: format must be \"esq\"");
    J *jv = json_get(root, "version");
    if (jv->type != JT_INT || jv->neg || jv->u != (uint64_t)version) fail("header: version must be the integer %d of the prefix", version);
    J *meta = json_get(root, "meta");
    if (meta->type != JT_OBJ) fail("header: meta must be an object");
    J *sections = json_get(root, "sections");
    if (sections->type != JT_ARR) fail("header: sections must be an array");
    size_t ns = sections->n;
    Sec *secs = xcalloc(ns, sizeof *secs);
    static const char *seckeys[] = {"name", "offset", "length", "crc32", "info"};
    for (size_t i = 0; i < ns; i++) {
        J *s = sections->items[i];
        char what[64];
        snprintf(what, sizeof what, "section %zu", i);
        exact_keys(s, what, seckeys, 5);
        J *nm = json_get(s, "name");
        size_t ncp;
        if (nm->type != JT_STR || nm->slen == 0) fail("%s: name must be a non-empty string", what);
        utf8_valid((const unsigned char *)nm->s, nm->slen, &ncp);
        if (ncp > 1024) fail("%s: name longer than 1024 characters", what);
        if (memchr(nm->s, 0, nm->slen)) fail("%s: name contains NUL (unsupported by this reader)", what);
        secs[i].name = nm->s;
        snprintf(what, sizeof what, "section '%.40s'", nm->s);
        secs[i].offset = need_uint(json_get(s, "offset"), what);
        secs[i].length = need_uint(json_get(s, "length"), what);
        uint64_t crc = need_uint(json_get(s, "crc32"), what);
        if (crc >= (1ull << 32)) fail("%s: crc32 out of range", what);
        secs[i].crc = (uint32_t)crc;
        secs[i].info = json_get(s, "info");
        if (secs[i].info->type != JT_OBJ) fail("%s: info must be an object", what);
    }
    /* 8 */
    uint64_t P = size - 52 - H;
    uint64_t pos = 0;
    const uint8_t *payload = f + 20 + H;
    for (size_t i = 0; i < ns; i++) {
        for (size_t k = 0; k < i; k++)
            if (!strcmp(secs[k].name, secs[i].name)) fail("section '%s': duplicate name", secs[i].name);
        if (secs[i].offset < pos) fail("section '%s': overlaps or out of order", secs[i].name);
        if (secs[i].offset > pos) fail("section '%s': a hole before it", secs[i].name);
        if (secs[i].length > P - secs[i].offset) fail("section '%s': runs past the payload", secs[i].name);
        secs[i].data = payload + secs[i].offset;
        pos = secs[i].offset + secs[i].length;
    }
    if (pos != P) fail("trailing bytes after the last section");
    /* 9 */
    for (size_t i = 0; i < ns; i++) {
        uLong c = crc32(0L, Z_NULL, 0);
        uint64_t left = secs[i].length;
        const uint8_t *p = secs[i].data;
        while (left) { uInt chunk = left > (1u << 30) ? (1u << 30) : (uInt)left; c = crc32(c, p, chunk); p += chunk; left -= chunk; }
        if ((uint32_t)c != secs[i].crc) fail("section '%s': CRC-32 mismatch (damaged)", secs[i].name);
    }
    /* 10 */
    uint8_t dg[32];
    sha256(f, size - 32, dg);
    if (memcmp(dg, f + size - 32, 32)) fail("file SHA-256 mismatch");
    A->version = version;
    A->root = root;
    A->meta = meta;
    A->secs = secs;
    A->nsecs = ns;
    (void)hbuf;
}

/* ------------------------------------------------------------------ Huffman */

typedef struct {
    int count[25];
    int *sym;
    int maxlen, nused;
} Huff;

static void huff_build(Huff *h, const uint8_t *lens, int nsym, const char *what) {
    memset(h->count, 0, sizeof h->count);
    h->sym = xmalloc(sizeof(int) * (size_t)(nsym ? nsym : 1));
    h->maxlen = 0; h->nused = 0;
    for (int s = 0; s < nsym; s++) { h->count[lens[s]]++; if (lens[s] > h->maxlen) h->maxlen = lens[s]; }
    h->count[0] = 0;
    /* Kraft sum <= 1 */
    uint64_t kraft = 0;
    for (int l = 1; l <= 24; l++) kraft += (uint64_t)h->count[l] << (24 - l);
    if (kraft > (1ull << 24)) fail("%s: code lengths oversubscribed (Kraft sum > 1)", what);
    int offs[26]; offs[1] = 0;
    for (int l = 1; l < 25; l++) offs[l + 1] = offs[l] + h->count[l];
    for (int s = 0; s < nsym; s++) if (lens[s]) h->sym[offs[lens[s]]++] = s;
    for (int l = 1; l <= 24; l++) h->nused += h->count[l];
}

typedef struct { const uint8_t *p; uint64_t pos; } Bits;
static inline int getbit(Bits *b) { int v = (b->p[b->pos >> 3] >> (7 - (b->pos & 7))) & 1; b->pos++; return v; }

static int huff_decode(const Huff *h, Bits *b, uint64_t limit) {
    int code = 0, first = 0, index = 0;
    for (int len = 1; len <= h->maxlen; len++) {
        if (b->pos >= limit) return -2;
        code |= getbit(b);
        int count = h->count[len];
        if (code - count < first) return h->sym[index + (code - first)];
        index += count; first += count; first <<= 1; code <<= 1;
    }
    return -1;
}

static uint64_t bits_read(const uint8_t *p, uint64_t pos, int width) {
    uint64_t v = 0;
    for (int i = 0; i < width; i++, pos++) v = v << 1 | ((p[pos >> 3] >> (7 - (pos & 7))) & 1);
    return v;
}

static void check_pad_zero(const uint8_t *p, uint64_t from_bit, uint64_t nbytes, const char *what) {
    for (uint64_t pos = from_bit; pos < nbytes * 8; pos++)
        if ((p[pos >> 3] >> (7 - (pos & 7))) & 1) fail("%s: non-zero padding bits", what);
}

/* Decode a chunked Huffman stream of n symbols into out[]. */
static void huff_stream(int version, const uint8_t *s, uint64_t len, uint64_t n, uint64_t C,
                        const Huff *h, uint16_t *out, const char *what) {
    if (n == 0) { if (len) fail("%s: stream of no symbols must have no bytes", what); return; }
    if (h->nused == 0) fail("%s: symbols but no code", what);
    uint64_t m = (n + C - 1) / C;
    uint64_t *cbits = xmalloc(sizeof(uint64_t) * m);
    uint64_t hdr = 0;
    uint64_t nrec = version == 1 ? m : m - 1;
    if (version == 1) {
        if (m > len / 2) fail("%s: chunk index runs past the stream", what);
        for (uint64_t c = 0; c < m; c++) cbits[c] = rd16(s + 2 * c);
        hdr = 2 * m;
    } else if (m > 1) {
        if (len < 3) fail("%s: chunk index runs past the stream", what);
        unsigned base = rd16(s), width = s[2];
        if (width > 16) fail("%s: index width %u > 16", what, width);
        uint64_t ibits = (m - 1) * width, ibytes = (ibits + 7) / 8;
        if (ibytes > len - 3) fail("%s: chunk index runs past the stream", what);
        const uint8_t *ip = s + 3;
        for (uint64_t c = 0; c < m - 1; c++) cbits[c] = base + bits_read(ip, c * width, (int)width);
        check_pad_zero(ip, ibits, ibytes, what);
        hdr = 3 + ibytes;
    }
    const uint8_t *codes = s + hdr;
    uint64_t clen = len - hdr, cbitsz = clen * 8;
    uint64_t start = 0;
    for (uint64_t c = 0; c < m; c++) {
        uint64_t cnt = (n - c + m - 1) / m;
        int recorded = c < nrec;
        uint64_t end;
        if (recorded) {
            if (cbits[c] < cnt || cbits[c] > cnt * (uint64_t)h->maxlen) fail("%s: chunk %llu records %llu bits for %llu symbols", what, (unsigned long long)c, (unsigned long long)cbits[c], (unsigned long long)cnt);
            if (cbits[c] > cbitsz - start || start > cbitsz) fail("%s: chunk %llu runs past the stream", what, (unsigned long long)c);
            end = start + cbits[c];
        } else end = cbitsz;
        Bits b = {codes, start};
        for (uint64_t j = 0; j < cnt; j++) {
            int v = huff_decode(h, &b, end);
            if (v == -2) fail("%s: chunk %llu runs past its bits", what, (unsigned long long)c);
            if (v < 0) fail("%s: invalid code in chunk %llu", what, (unsigned long long)c);
            out[c + j * m] = (uint16_t)v;
        }
        if (recorded && b.pos != end) fail("%s: chunk %llu does not use exactly its recorded bits", what, (unsigned long long)c);
        start = b.pos;
    }
    /* the codes must end in the last byte, zero padded */
    if ((start + 7) / 8 != clen) fail("%s: stream size does not match its codes", what);
    check_pad_zero(codes, start, clen, what);
    free(cbits);
}

/* ------------------------------------------------------------------ shared tensors */

enum { DT_INT8, DT_UINT8, DT_INT16, DT_INT32, DT_FLOAT32 };
static const char *dt_names[] = {"int8", "uint8", "int16", "int32", "float32"};
static const int dt_size[] = {1, 1, 2, 4, 4};
static const int64_t dt_min[] = {-128, 0, -32768, INT32_MIN, 0};
static const int64_t dt_max[] = {127, 255, 32767, INT32_MAX, 0};

typedef struct {
    Sec *sec;
    int is_product;
    /* tensor */
    uint64_t at;
    int dtype;
    int64_t offset;
    int ndim;
    uint64_t shape[64];
    uint64_t numel;          /* coded tensor */
    uint64_t out_numel;      /* after space-to-depth */
    uint64_t span;           /* bytes in the inner file */
    int s2d;
    int requant, derived, has_zero;
    uint64_t scale_at, C;
    int qmax;
    float zero;
    float *vals;             /* decoded (rearranged) floats */
    int cb_finite;
    /* product */
    uint64_t n, a, b;
} Item;

static void parse_shape(J *js, Item *t, const char *what) {
    if (!js || js->type != JT_ARR) fail("%s: shape must be a list", what);
    if (js->n > 64) fail("%s: too many dimensions", what);
    t->ndim = (int)js->n;
    unsigned __int128 ne = 1;
    for (size_t i = 0; i < js->n; i++) {
        t->shape[i] = need_uint(js->items[i], what);
        ne *= t->shape[i];
        if (ne > ((unsigned __int128)1 << 40)) fail("%s: shape too large", what);
    }
    t->numel = (uint64_t)ne;
}

static void decode_stream(int version, int coding, const uint8_t *s, uint64_t len, uint64_t count,
                          uint64_t C, const Huff *h, uint64_t alpha, uint16_t *out, const char *what) {
    if (coding == 0) {
        huff_stream(version, s, len, count, C, h, out, what);
    } else if (coding == 1) {
        if (alpha > 256) fail("%s: DEFLATE coding for an alphabet over 256 symbols", what);
        if (len > 0xFFFFFFFFu) fail("%s: stream too large", what);
        size_t got;
        uint8_t *b = inflate_raw_limited(s, (size_t)len, (size_t)count, &got, what);
        if (got != count) fail("%s: DEFLATE stream gives %zu symbols, not %llu", what, got, (unsigned long long)count);
        for (uint64_t i = 0; i < count; i++) {
            if (b[i] >= alpha) fail("%s: symbol %u outside its alphabet of %llu", what, b[i], (unsigned long long)alpha);
            out[i] = b[i];
        }
        free(b);
    } else if (coding == 2) {
        if (alpha > 2) fail("%s: bits coding for an alphabet over 2 symbols", what);
        if (len != (count + 7) / 8) fail("%s: bits stream has %llu bytes, not %llu", what, (unsigned long long)len, (unsigned long long)((count + 7) / 8));
        for (uint64_t i = 0; i < count; i++) {
            int v = (s[i >> 3] >> (7 - (i & 7))) & 1;
            if ((uint64_t)v >= alpha) fail("%s: symbol outside its alphabet", what);
            out[i] = (uint16_t)v;
        }
        check_pad_zero(s, count, len, what);
    } else fail("%s: unknown stream coding %d", what, coding);
}

/* Decode a shared tensor section into float32 values (t->numel of them). */
static float *decode_shared(int version, Item *t, const char *what) {
    Sec *sec = t->sec;
    J *info = sec->info;
    parse_shape(json_get(info, "shape"), t, what);
    J *jaxis = json_get(info, "axis");
    int axis = -1; /* FORMAT.md lists axis as a field; the reference reader treats a missing one as null */
    if (jaxis && jaxis->type != JT_NULL) {
        uint64_t a = need_uint(jaxis, "axis");
        if (a >= (uint64_t)t->ndim) fail("%s: axis out of range", what);
        axis = (int)a;
    }
    uint64_t k = need_uint(json_get(info, "k"), "k");
    J *jcb = json_get(info, "cb");
    int cbsz;
    if (str_is(jcb, "f32")) cbsz = 4; else if (str_is(jcb, "f16")) cbsz = 2; else fail("%s: cb must be \"f32\" or \"f16\"", what);
    uint64_t n = need_uint(json_get(info, "n"), "n");
    uint64_t w = need_uint(json_get(info, "w"), "w");
    if (w > 8) fail("%s: w must be 0 to 8", what);
    uint64_t ng = 0;
    J *jng = json_get(info, "ng");
    if (w > 0) ng = need_uint(jng, "ng");
    /* a dense section's ng is ignored (the reference reader does so; FORMAT.md is silent) */
    J *jsizes = json_get(info, "sizes");
    if (!jsizes || jsizes->type != JT_ARR || jsizes->n != 5) fail("%s: sizes must be a list of 5", what);
    uint64_t sizes[5];
    unsigned __int128 tot = 0;
    for (int i = 0; i < 5; i++) { sizes[i] = need_uint(jsizes->items[i], "sizes"); tot += sizes[i]; }
    if (tot != sec->length) fail("%s: sizes do not add up to the section length", what);
    uint64_t C = 256;
    J *jc = json_get(info, "c");
    if (jc) { C = need_uint(jc, "c"); if (C < 1 || C > 4096) fail("%s: c must be 1 to 4096", what); }
    int z = 0;
    J *jz = json_get(info, "z");
    if (jz) {
        if (version < 3) fail("%s: z in a version-%d file", what, version);
        uint64_t zz = need_uint(jz, "z");
        if (zz > 15 || (zz & 3) == 3 || (zz >> 2) == 3) fail("%s: z %llu is not a coding", what, (unsigned long long)zz);
        z = (int)zz;
    }
    int zi = z & 3, zg = z >> 2;
    if (w == 0 && zg != 0) fail("%s: gap coding in a dense section", what);
    if (w == 0 && sizes[4] != 0) fail("%s: gap stream in a dense section", what);
    if (w == 0 && n != t->numel) fail("%s: dense section codes %llu of %llu positions", what, (unsigned long long)n, (unsigned long long)t->numel);
    if (w > 0 && n > t->numel) fail("%s: more coded positions than elements", what);
    if (w > 0 && ng < n) fail("%s: fewer gap symbols than weights", what);
    if (w > 0 && ng > (((uint64_t)1) << 40)) fail("%s: ng too large", what);

    const uint8_t *p = sec->data;
    /* ks */
    uint64_t nslices = 1, stride = 1, *cboff = NULL, *ks = NULL, alpha_idx = k;
    if (axis >= 0) {
        nslices = t->shape[axis];
        for (int d = axis + 1; d < t->ndim; d++) stride *= t->shape[d];
        if (sizes[0] != 2 * nslices) fail("%s: ks part size mismatch", what);
        ks = xmalloc(sizeof(uint64_t) * (nslices ? nslices : 1));
        cboff = xmalloc(sizeof(uint64_t) * (nslices ? nslices : 1));
        uint64_t sum = 0, mx = 0;
        for (uint64_t i = 0; i < nslices; i++) {
            ks[i] = rd16(p + 2 * i);
            if (ks[i] > 256) fail("%s: slice codebook over 256 values", what);
            cboff[i] = sum; sum += ks[i];
            if (ks[i] > mx) mx = ks[i];
        }
        if (sum != k) fail("%s: ks do not add up to k", what);
        alpha_idx = mx;
    } else {
        if (sizes[0] != 0) fail("%s: ks part without an axis", what);
        if (k > 256) fail("%s: codebook over 256 values", what);
    }
    if (alpha_idx < 1) fail("%s: empty index alphabet", what);
    p += sizes[0];
    /* codebook */
    if (k > (1u << 24) || sizes[1] != k * (uint64_t)cbsz) fail("%s: codebook part size mismatch", what);
    float *cb = xmalloc(sizeof(float) * k);
    t->cb_finite = 1;
    for (uint64_t i = 0; i < k; i++) {
        cb[i] = cbsz == 4 ? rdf32(p + 4 * i) : f16_to_f32(rd16(p + 2 * i));
        if (!isfinite(cb[i])) t->cb_finite = 0;
    }
    p += sizes[1];
    /* lengths */
    uint64_t alpha_gap = w ? (1ull << w) : 0;
    uint64_t nib = (zi == 0 ? alpha_idx : 0) + (w && zg == 0 ? alpha_gap : 0);
    if (sizes[2] != (nib + 1) / 2) fail("%s: lengths part size mismatch", what);
    uint8_t *lens = xmalloc(nib + 1);
    for (uint64_t i = 0; i < nib; i++) lens[i] = (p[i / 2] >> (i & 1 ? 0 : 4)) & 15;
    if (nib & 1 && (p[nib / 2] & 15)) fail("%s: lengths padding nibble not zero", what);
    Huff hi = {0}, hg = {0};
    uint64_t li = 0;
    char w2[1200];
    snprintf(w2, sizeof w2, "%s idx", what);
    if (zi == 0) { huff_build(&hi, lens, (int)alpha_idx, w2); li = alpha_idx; }
    snprintf(w2, sizeof w2, "%s gap", what);
    if (w && zg == 0) huff_build(&hg, lens + li, (int)alpha_gap, w2);
    p += sizes[2];
    /* streams */
    uint16_t *idx = xmalloc(sizeof(uint16_t) * (n ? n : 1));
    snprintf(w2, sizeof w2, "%s idx stream", what);
    decode_stream(version, zi, p, sizes[3], n, C, &hi, alpha_idx, idx, w2);
    p += sizes[3];
    uint16_t *gap = NULL;
    if (w) {
        gap = xmalloc(sizeof(uint16_t) * (ng ? ng : 1));
        snprintf(w2, sizeof w2, "%s gap stream", what);
        decode_stream(version, zg, p, sizes[4], ng, C, &hg, alpha_gap, gap, w2);
    }
    /* place the values */
    float *vals = xcalloc(t->numel, sizeof(float));
    uint64_t E = alpha_gap - 1;
    uint64_t run = 0, j = 0;
    for (uint64_t i = 0; w ? i < ng : i < n; i++) {
        uint64_t pos;
        if (w) {
            uint64_t g = gap[i];
            run += g + (g != E);
            if (g == E) continue;
            if (j >= n) fail("%s: more weights in the gap stream than coded positions", what);
            pos = run - 1;
            if (pos >= t->numel) fail("%s: a gap lands outside the tensor", what);
        } else pos = i;
        uint64_t sl = axis >= 0 ? (pos / stride) % nslices : 0;
        uint64_t ix = idx[j];
        uint64_t kk = axis >= 0 ? ks[sl] : k;
        if (ix >= kk) fail("%s: index %llu outside its codebook of %llu", what, (unsigned long long)ix, (unsigned long long)kk);
        vals[pos] = cb[(axis >= 0 ? cboff[sl] : 0) + ix];
        j++;
    }
    if (j != n) fail("%s: gap stream places %llu weights, not %llu", what, (unsigned long long)j, (unsigned long long)n);
    free(idx); free(gap); free(lens); free(cb); free(ks); free(cboff); free(hi.sym); free(hg.sym);
    return vals;
}

/* ------------------------------------------------------------------ packed files */

typedef struct { uint64_t off, size; int kind; size_t order; } Span; /* kind: 0 tensor, 1 derived scales, 2 product, 3 requant tensor */

static int span_cmp(const void *a, const void *b) {
    const Span *x = a, *y = b;
    return x->off < y->off ? -1 : x->off > y->off ? 1 : x->order < y->order ? -1 : x->order > y->order; /* ties: header order */
}

static int overlaps(uint64_t a, uint64_t alen, uint64_t b, uint64_t blen) {
    return a < b + blen && b < a + alen && alen && blen;
}

static uint8_t *decompress_skeleton(Sec *s, uint64_t n, int lzma, uint64_t dict) {
    if (n > ((uint64_t)1 << 34)) fail("skeleton: n too large");
    size_t limit = (size_t)n + 1, cap = 1 << 16, len = 0;
    if (cap > limit) cap = limit;
    uint8_t *out = xmalloc(cap);
    if (!lzma) {
        z_stream zs;
        memset(&zs, 0, sizeof zs);
        if (inflateInit(&zs) != Z_OK) fail("skeleton: inflateInit failed");
        const uint8_t *in = s->data;
        uint64_t inleft = s->length;
        int ret;
        for (;;) {
            if (zs.avail_in == 0 && inleft) { uInt c = inleft > (1u << 30) ? (1u << 30) : (uInt)inleft; zs.next_in = (Bytef *)in; zs.avail_in = c; in += c; inleft -= c; }
            if (len == cap) {
                if (cap >= limit) fail("skeleton: decompresses past n");
                cap = cap * 2 > limit ? limit : cap * 2;
                out = realloc(out, cap);
                if (!out) { fprintf(stderr, "out of memory\n"); exit(3); }
            }
            zs.next_out = out + len; zs.avail_out = (uInt)(cap - len > (1u << 30) ? (1u << 30) : cap - len);
            size_t before = zs.avail_out;
            ret = inflate(&zs, Z_NO_FLUSH);
            len += before - zs.avail_out;
            if (ret == Z_STREAM_END) break;
            if (ret == Z_BUF_ERROR && zs.avail_in == 0 && inleft == 0) fail("skeleton: truncated zlib stream");
            if (ret != Z_OK && ret != Z_BUF_ERROR) fail("skeleton: damaged zlib stream (%s)", zs.msg ? zs.msg : "?");
        }
        int rest = zs.avail_in || inleft;
        inflateEnd(&zs);
        if (rest) fail("skeleton: bytes follow the zlib stream");
    } else {
        lzma_options_lzma opt;
        if (lzma_lzma_preset(&opt, 6)) fail("skeleton: lzma preset failed");
        opt.dict_size = (uint32_t)dict;
        lzma_filter filters[2] = {{LZMA_FILTER_LZMA2, &opt}, {LZMA_VLI_UNKNOWN, NULL}};
        lzma_stream ls = LZMA_STREAM_INIT;
        if (lzma_raw_decoder(&ls, filters) != LZMA_OK) fail("skeleton: lzma_raw_decoder failed");
        ls.next_in = s->data;
        ls.avail_in = (size_t)s->length;
        lzma_ret ret;
        for (;;) {
            if (len == cap) {
                if (cap >= limit) fail("skeleton: decompresses past n");
                cap = cap * 2 > limit ? limit : cap * 2;
                out = realloc(out, cap);
                if (!out) { fprintf(stderr, "out of memory\n"); exit(3); }
            }
            ls.next_out = out + len; ls.avail_out = cap - len;
            ret = lzma_code(&ls, LZMA_FINISH);
            len = cap - ls.avail_out;
            if (ret == LZMA_STREAM_END) break;
            if (ret == LZMA_BUF_ERROR) fail("skeleton: truncated LZMA2 stream (no end marker)");
            if (ret != LZMA_OK) fail("skeleton: damaged LZMA2 stream (error %d)", (int)ret);
            if (ls.avail_out != 0 && ls.avail_in == 0) fail("skeleton: truncated LZMA2 stream (no end marker)");
        }
        size_t rest = ls.avail_in;
        lzma_end(&ls);
        if (rest) fail("skeleton: bytes follow the LZMA2 end marker");
    }
    if (len != n) fail("skeleton: decompresses to %zu bytes, not n = %llu", len, (unsigned long long)n);
    return out;
}

static void store_value(uint8_t *dst, int dtype, int64_t q) {
    switch (dt_size[dtype]) {
    case 1: dst[0] = (uint8_t)q; break;
    case 2: dst[0] = (uint8_t)q; dst[1] = (uint8_t)(q >> 8); break;
    case 4: wr32(dst, (uint32_t)q); break;
    }
}

static int hexlower(const J *j) {
    if (!j || j->type != JT_STR || j->slen != 64) return 0;
    for (size_t i = 0; i < 64; i++) {
        char c = j->s[i];
        if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'))) return 0;
    }
    return 1;
}

int main(int argc, char **argv) {
    if (argc != 3) { fprintf(stderr, "usage: %s IN.esq OUT\n", argv[0]); return 2; }
    FILE *fp = fopen(argv[1], "rb");
    if (!fp) { perror(argv[1]); return 2; }
    fseek(fp, 0, SEEK_END);
    long fsz = ftell(fp);
    fseek(fp, 0, SEEK_SET);
    uint8_t *file = xmalloc((size_t)fsz);
    if (fread(file, 1, (size_t)fsz, fp) != (size_t)fsz) { perror("read"); return 2; }
    fclose(fp);

    Archive A;
    read_archive(file, (size_t)fsz, &A);

    /* packed step 1: meta.packed */
    J *pk = json_get(A.meta, "packed");
    if (!pk || pk->type != JT_OBJ) fail("meta.packed missing: not a packed file");
    J *pname = json_get(pk, "name"), *pfmt = json_get(pk, "format"), *pbytes = json_get(pk, "bytes"), *psha = json_get(pk, "sha256");
    if (!pname || pname->type != JT_STR || pname->slen == 0) fail("meta.packed.name must be a non-empty string");
    {   /* a plain file name: not . or .., at most 255 characters, no '/', '\\' or NUL */
        size_t ncp = 0;
        for (size_t i = 0; i < pname->slen; i++) ncp += ((unsigned char)pname->s[i] & 0xC0) != 0x80;
        if (str_is(pname, ".") || str_is(pname, "..") || ncp > 255 || memchr(pname->s, '/', pname->slen)
            || memchr(pname->s, '\\', pname->slen) || memchr(pname->s, 0, pname->slen))
            fail("meta.packed.name must be a plain file name");
    }
    if (!pfmt || pfmt->type != JT_STR) fail("meta.packed.format must be a string");
    if (!is_uint(pbytes) || pbytes->u >= (1ull << 34)) fail("meta.packed.bytes must be an integer in [0, 2**34)");
    if (!hexlower(psha)) fail("meta.packed.sha256 must be 64 lowercase hex digits");
    uint64_t BYTES = pbytes->u;

    /* parse section infos */
    Sec *skel = NULL;
    Item *items = xcalloc(A.nsecs, sizeof *items);
    size_t nit = 0;
    for (size_t i = 0; i < A.nsecs; i++) {
        Sec *s = &A.secs[i];
        J *info = s->info, *enc = json_get(info, "enc");
        char what[1100];
        snprintf(what, sizeof what, "section '%s'", s->name);
        if (!strcmp(s->name, "skeleton")) {
            if (!str_is(enc, "skeleton")) fail("%s: enc must be \"skeleton\"", what);
            skel = s;
            continue;
        }
        Item *t = &items[nit++];
        t->sec = s;
        if (str_is(enc, "product")) {
            t->is_product = 1;
            t->at = need_uint(json_get(info, "at"), "product at");
            t->n = need_uint(json_get(info, "n"), "product n");
            t->a = need_uint(json_get(info, "a"), "product a");
            t->b = need_uint(json_get(info, "b"), "product b");
            if (t->n < 1) fail("%s: n must be >= 1", what);
            if (t->n > (1ull << 36)) fail("%s: n too large", what);
            if (s->length != 0) fail("%s: a product's content must be empty", what);
            t->span = 4 * t->n;
            continue;
        }
        if (!str_is(enc, "shared")) fail("%s: enc must be \"shared\" or \"product\"", what);
        t->at = need_uint(json_get(info, "at"), "at");
        J *jd = json_get(info, "dtype");
        t->dtype = -1;
        for (int d = 0; d < 5; d++) if (str_is(jd, dt_names[d])) t->dtype = d;
        if (t->dtype < 0) fail("%s: unknown dtype", what);
        J *joff = json_get(info, "offset");
        t->offset = joff ? need_int_range(joff, "offset", -(1ll << 32) + 1, (1ll << 32) - 1) : 0;
        if (t->dtype == DT_FLOAT32 && t->offset != 0) fail("%s: float32 tensors take no offset", what);
        parse_shape(json_get(info, "shape"), t, what);
        t->out_numel = t->numel;
        J *js2d = json_get(info, "space_to_depth");
        if (js2d) {
            uint64_t B = need_uint(js2d, "space_to_depth");
            if (B < 2 || B > 8) fail("%s: space_to_depth must be 2 to 8", what);
            if (t->ndim != 4) fail("%s: space_to_depth needs a 4-D shape", what);
            t->s2d = (int)B;
            t->out_numel = t->shape[0] * ((t->shape[1] + B - 1) / B) * ((t->shape[2] + B - 1) / B) * B * B * t->shape[3];
        }
        t->span = t->out_numel * dt_size[t->dtype];
        J *rq = json_get(info, "requant");
        if (rq) {
            if (rq->type != JT_OBJ) fail("%s: requant must be an object", what);
            if (t->dtype == DT_FLOAT32) fail("%s: requant needs an integer dtype", what);
            if (t->ndim < 1) fail("%s: requant needs a first dimension", what);
            t->requant = 1;
            t->C = t->shape[0];
            t->scale_at = need_uint(json_get(rq, "scale_at"), "requant.scale_at");
            t->qmax = (int)need_int_range(json_get(rq, "qmax"), "requant.qmax", 1, 32767);
            if (-t->qmax + t->offset < dt_min[t->dtype] || t->qmax + t->offset > dt_max[t->dtype]) fail("%s: qmax +- offset outside the dtype", what);
            J *sc = json_get(rq, "scales");
            if (sc) {
                if (sc->type != JT_OBJ || !str_is(json_get(sc, "from"), "max_abs")) fail("%s: requant.scales must be {\"from\": \"max_abs\"}", what);
                t->derived = 1;
                J *zj = json_get(sc, "zero");
                if (zj) {
                    if (zj->type == JT_INT) {
                        if (zj->neg || zj->u == 0) fail("%s: scales.zero must be positive", what);
                        uint64_t x = zj->u;
                        while (!(x & 1)) x >>= 1;
                        if (x >= (1u << 24)) fail("%s: scales.zero is not a float32 value", what);
                        t->zero = (float)zj->u;
                    } else if (zj->type == JT_FLOAT) {
                        float fz = (float)zj->d;
                        if (!(zj->d > 0) || !isfinite(fz) || (double)fz != zj->d) fail("%s: scales.zero is not a positive float32 value", what);
                        t->zero = fz;
                    } else fail("%s: scales.zero must be a number", what);
                    t->has_zero = 1;
                }
            }
        }
    }
    if (!skel) fail("no skeleton section");
    /* skeleton info */
    J *si = skel->info;
    J *codec = json_get(si, "codec");
    int lz;
    if (str_is(codec, "zlib")) lz = 0; else if (str_is(codec, "lzma")) lz = 1; else fail("skeleton: codec must be zlib or lzma");
    uint64_t skn = need_uint(json_get(si, "n"), "skeleton n");
    uint64_t dict = 0;
    if (lz) { dict = need_uint(json_get(si, "dict"), "skeleton dict"); if (dict < 4096 || dict > (64u << 20)) fail("skeleton: dict must be 4 KiB to 64 MiB"); }

    /* step 4 layout from the headers: spans */
    size_t nsp = 0;
    Span *sp = xcalloc(nit * 2 + 1, sizeof *sp);
    for (size_t i = 0; i < nit; i++) {
        Item *t = &items[i];
        if (t->span > BYTES || t->at > BYTES - t->span) fail("section '%s': span runs past the file", t->sec->name);
        sp[nsp] = (Span){t->at, t->span, t->is_product ? 2 : t->requant ? 3 : 0, nsp}; nsp++;
        if (t->derived) {
            if (t->C > (1ull << 36) || 4 * t->C > BYTES || t->scale_at > BYTES - 4 * t->C) fail("section '%s': scales run past the file", t->sec->name);
            sp[nsp] = (Span){t->scale_at, 4 * t->C, 1, nsp}; nsp++;
        }
    }
    qsort(sp, nsp, sizeof *sp, span_cmp);
    {
        uint64_t outlen = 0, skpos = 0;
        for (size_t i = 0; i < nsp; i++) {
            if (sp[i].off < outlen) fail("spans overlap at inner offset %llu", (unsigned long long)sp[i].off);
            uint64_t cp = sp[i].off - outlen;
            if (cp > skn - skpos) fail("spans run past the skeleton");
            skpos += cp; outlen += cp + sp[i].size;
        }
        outlen += skn - skpos;
        if (outlen != BYTES) fail("skeleton and spans give %llu bytes, not meta.packed.bytes %llu", (unsigned long long)outlen, (unsigned long long)BYTES);
    }
    /* scale / product factor placement checks (headers only) */
    for (size_t i = 0; i < nit; i++) {
        Item *t = &items[i];
        if (t->requant && !t->derived) {
            if (t->C > (1ull << 36) || 4 * t->C > BYTES || t->scale_at > BYTES - 4 * t->C) fail("section '%s': scales outside the file", t->sec->name);
            for (size_t k = 0; k < nsp; k++)
                if ((sp[k].kind == 2 || sp[k].kind == 3) && overlaps(t->scale_at, 4 * t->C, sp[k].off, sp[k].size))
                    fail("section '%s': stored scales overlap a requantized tensor or product", t->sec->name);
        }
        if (t->is_product) {
            if (4 > BYTES || t->a > BYTES - 4) fail("section '%s': factor a outside the file", t->sec->name);
            if (t->b > BYTES - t->span) fail("section '%s': factor b outside the file", t->sec->name);
            for (size_t k = 0; k < nsp; k++) {
                if (sp[k].kind != 2) continue;
                if (overlaps(t->a, 4, sp[k].off, sp[k].size)) fail("section '%s': factor a inside a product", t->sec->name);
                if (overlaps(t->b, t->span, sp[k].off, sp[k].size)) fail("section '%s': factor b inside a product", t->sec->name);
            }
        }
    }

    /* step 2: skeleton */
    uint8_t *sk = decompress_skeleton(skel, skn, lz, dict);

    /* step 3: decode tensors */
    int version = A.version;
    for (size_t i = 0; i < nit; i++) {
        Item *t = &items[i];
        if (t->is_product) continue;
        char what[1100];
        snprintf(what, sizeof what, "section '%s'", t->sec->name);
        float *v = decode_shared(version, t, what);
        if (t->s2d) {
            uint64_t B = (uint64_t)t->s2d, O = t->shape[0], kh = t->shape[1], kw = t->shape[2], C = t->shape[3];
            uint64_t ah = (kh + B - 1) / B, aw = (kw + B - 1) / B, CC = B * B * C;
            float *r = xcalloc(t->out_numel, sizeof(float));
            for (uint64_t o = 0; o < O; o++)
                for (uint64_t a = 0; a < ah; a++)
                    for (uint64_t b = 0; b < aw; b++)
                        for (uint64_t c = 0; c < C; c++)
                            for (uint64_t dy = 0; dy < B; dy++)
                                for (uint64_t dx = 0; dx < B; dx++) {
                                    uint64_t y = B * a + dy, x = B * b + dx;
                                    if (y >= kh || x >= kw) continue;
                                    r[((o * ah + a) * aw + b) * CC + c * B * B + dy * B + dx] = v[((o * kh + y) * kw + x) * C + c];
                                }
            free(v);
            v = r;
        }
        t->vals = v;
        if (!t->requant && t->dtype != DT_FLOAT32) {
            for (uint64_t e = 0; e < t->out_numel; e++) {
                float f = v[e];
                if (!isfinite(f) || f != truncf(f) || fabsf(f) > 4e18f) fail("%s: value %g + offset is not an integer", what, (double)f);
                int64_t q = (int64_t)f + t->offset;
                if (q < dt_min[t->dtype] || q > dt_max[t->dtype]) fail("%s: value %lld outside %s", what, (long long)q, dt_names[t->dtype]);
            }
        }
        if (t->requant && !t->cb_finite) fail("%s: requantized codebook not finite", what);
    }

    /* step 4: splice */
    uint8_t *out = xmalloc((size_t)BYTES);
    {
        uint64_t outlen = 0, skpos = 0;
        for (size_t i = 0; i < nsp; i++) {
            uint64_t cp = sp[i].off - outlen;
            memcpy(out + outlen, sk + skpos, (size_t)cp);
            skpos += cp; outlen += cp;
            memset(out + outlen, 0, (size_t)sp[i].size);
            outlen += sp[i].size;
        }
        memcpy(out + outlen, sk + skpos, (size_t)(skn - skpos));
    }
    free(sk);
    for (size_t i = 0; i < nit; i++) {
        Item *t = &items[i];
        if (t->is_product || t->requant) continue;
        uint8_t *dst = out + t->at;
        for (uint64_t e = 0; e < t->out_numel; e++) {
            if (t->dtype == DT_FLOAT32) wr32(dst + 4 * e, bits_from_f32(t->vals[e]));
            else store_value(dst + e * dt_size[t->dtype], t->dtype, (int64_t)t->vals[e] + t->offset);
        }
    }
    /* step 5: derived scales, then requantized tensors */
    for (size_t i = 0; i < nit; i++) {
        Item *t = &items[i];
        if (!t->derived) continue;
        uint64_t per = t->C ? t->out_numel / t->C : 0;
        for (uint64_t c = 0; c < t->C; c++) {
            float m = 0;
            for (uint64_t e = 0; e < per; e++) { float a = fabsf(t->vals[c * per + e]); if (a > m) m = a; }
            float s;
            if (m > 0) s = m / (float)t->qmax;
            else {
                if (!t->has_zero) fail("section '%s': all-zero channel %llu and no scales.zero", t->sec->name, (unsigned long long)c);
                s = t->zero;
            }
            wr32(out + t->scale_at + 4 * c, bits_from_f32(s));
        }
    }
    for (size_t i = 0; i < nit; i++) {
        Item *t = &items[i];
        if (!t->requant) continue;
        uint64_t per = t->C ? t->out_numel / t->C : 0;
        for (uint64_t c = 0; c < t->C; c++) {
            float s = rdf32(out + t->scale_at + 4 * c);
            if (!(s > 0) || !isfinite(s)) fail("section '%s': scale %llu not a positive finite float", t->sec->name, (unsigned long long)c);
            for (uint64_t e = 0; e < per; e++) {
                float v = t->vals[c * per + e];
                float q = rintf(v / s);
                if (q > t->qmax) q = (float)t->qmax;
                if (q < -t->qmax) q = (float)-t->qmax;
                int64_t qi = (int64_t)q + t->offset;
                if (qi < dt_min[t->dtype] || qi > dt_max[t->dtype]) fail("section '%s': requantized value outside the dtype", t->sec->name);
                store_value(out + t->at + (c * per + e) * dt_size[t->dtype], t->dtype, qi);
            }
        }
    }
    /* step 6: products */
    for (size_t i = 0; i < nit; i++) {
        Item *t = &items[i];
        if (!t->is_product) continue;
        float a = rdf32(out + t->a);
        for (uint64_t e = 0; e < t->n; e++) {
            float b = rdf32(out + t->b + 4 * e);
            float r = a * b;
            wr32(out + t->at + 4 * e, bits_from_f32(r));
        }
    }
    /* step 7: SHA-256 */
    uint8_t dg[32];
    char hex[65];
    sha256(out, (size_t)BYTES, dg);
    for (int i = 0; i < 32; i++) sprintf(hex + 2 * i, "%02x", dg[i]);
    if (memcmp(hex, psha->s, 64)) fail("decoded file SHA-256 %s does not match meta.packed.sha256 %.64s", hex, psha->s);

    FILE *fo = fopen(argv[2], "wb");
    if (!fo) { perror(argv[2]); return 2; }
    if (fwrite(out, 1, (size_t)BYTES, fo) != (size_t)BYTES || fclose(fo)) { perror("write"); return 2; }
    printf("%s: %llu bytes (%.*s, %.*s), SHA-256 checked\n", argv[2], (unsigned long long)BYTES,
           (int)pname->slen, pname->s, (int)pfmt->slen, pfmt->s);
    return 0;
}
