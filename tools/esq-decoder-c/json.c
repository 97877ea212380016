/* Strict JSON parser (RFC 8259): no NaN/Infinity, no duplicate keys, strict UTF-8,
 * integers kept exact in [-2**63, 2**64), floats must be finite. */
#include "json.h"
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_DEPTH 200

typedef struct {
    const unsigned char *p, *end;
    int depth;
    char *err;
    size_t errlen;
} P;

static int perr(P *ps, const char *msg) {
    if (!ps->err[0]) snprintf(ps->err, ps->errlen, "%s", msg);
    return 0;
}

static void ws(P *ps) {
    while (ps->p < ps->end && (*ps->p == ' ' || *ps->p == '\t' || *ps->p == '\n' || *ps->p == '\r')) ps->p++;
}

int utf8_valid(const unsigned char *s, size_t n, size_t *ncodepoints) {
    size_t i = 0, cps = 0;
    while (i < n) {
        unsigned c = s[i];
        if (c < 0x80) { i++; cps++; continue; }
        int len; unsigned cp, min;
        if (c >= 0xC2 && c <= 0xDF) { len = 2; cp = c & 0x1F; min = 0x80; }
        else if (c >= 0xE0 && c <= 0xEF) { len = 3; cp = c & 0x0F; min = 0x800; }
        else if (c >= 0xF0 && c <= 0xF4) { len = 4; cp = c & 0x07; min = 0x10000; }
        else return 0;
        if (i + len > n) return 0;
        for (int k = 1; k < len; k++) {
            if ((s[i + k] & 0xC0) != 0x80) return 0;
            cp = cp << 6 | (s[i + k] & 0x3F);
        }
        if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return 0;
        i += len; cps++;
    }
    if (ncodepoints) *ncodepoints = cps;
    return 1;
}

static J *newj(int type) {
    J *j = calloc(1, sizeof *j);
    if (!j) { fprintf(stderr, "out of memory\n"); exit(3); }
    j->type = type;
    return j;
}

static void put_utf8(unsigned char **o, unsigned cp) {
    unsigned char *q = *o;
    if (cp < 0x80) *q++ = cp;
    else if (cp < 0x800) { *q++ = 0xC0 | cp >> 6; *q++ = 0x80 | (cp & 0x3F); }
    else if (cp < 0x10000) { *q++ = 0xE0 | cp >> 12; *q++ = 0x80 | ((cp >> 6) & 0x3F); *q++ = 0x80 | (cp & 0x3F); }
    else { *q++ = 0xF0 | cp >> 18; *q++ = 0x80 | ((cp >> 12) & 0x3F); *q++ = 0x80 | ((cp >> 6) & 0x3F); *q++ = 0x80 | (cp & 0x3F); }
    *o = q;
}

static int hex4(P *ps, unsigned *v) {
    if (ps->end - ps->p < 4) return perr(ps, "truncated \\u escape");
    unsigned x = 0;
    for (int i = 0; i < 4; i++) {
        unsigned c = ps->p[i];
        x <<= 4;
        if (c >= '0' && c <= '9') x |= c - '0';
        else if (c >= 'a' && c <= 'f') x |= c - 'a' + 10;
        else if (c >= 'A' && c <= 'F') x |= c - 'A' + 10;
        else return perr(ps, "bad \\u escape");
    }
    ps->p += 4;
    *v = x;
    return 1;
}

static int parse_string(P *ps, char **out, size_t *outlen) {
    /* ps->p at opening quote */
    ps->p++;
    const unsigned char *start = ps->p;
    /* worst case output length <= input length */
    const unsigned char *q = start;
    while (q < ps->end && *q != '"') { if (*q == '\\') q++; q++; }
    if (q >= ps->end) return perr(ps, "unterminated string");
    unsigned char *buf = malloc((size_t)(q - start) + 1), *o = buf;
    if (!buf) { fprintf(stderr, "out of memory\n"); exit(3); }
    while (1) {
        if (ps->p >= ps->end) { free(buf); return perr(ps, "unterminated string"); }
        unsigned c = *ps->p;
        if (c == '"') { ps->p++; break; }
        if (c < 0x20) { free(buf); return perr(ps, "control character in string"); }
        if (c != '\\') { *o++ = c; ps->p++; continue; }
        ps->p++;
        if (ps->p >= ps->end) { free(buf); return perr(ps, "unterminated string"); }
        c = *ps->p++;
        switch (c) {
        case '"': *o++ = '"'; break;
        case '\\': *o++ = '\\'; break;
        case '/': *o++ = '/'; break;
        case 'b': *o++ = '\b'; break;
        case 'f': *o++ = '\f'; break;
        case 'n': *o++ = '\n'; break;
        case 'r': *o++ = '\r'; break;
        case 't': *o++ = '\t'; break;
        case 'u': {
            unsigned cp;
            if (!hex4(ps, &cp)) { free(buf); return 0; }
            if (cp >= 0xD800 && cp <= 0xDBFF) {
                unsigned lo;
                if (ps->end - ps->p < 6 || ps->p[0] != '\\' || ps->p[1] != 'u') { free(buf); return perr(ps, "lone surrogate in string"); }
                ps->p += 2;
                if (!hex4(ps, &lo)) { free(buf); return 0; }
                if (lo < 0xDC00 || lo > 0xDFFF) { free(buf); return perr(ps, "lone surrogate in string"); }
                cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
            } else if (cp >= 0xDC00 && cp <= 0xDFFF) { free(buf); return perr(ps, "lone surrogate in string"); }
            put_utf8(&o, cp);
            break;
        }
        default: free(buf); return perr(ps, "bad escape in string");
        }
    }
    *o = 0;
    *out = (char *)buf;
    *outlen = (size_t)(o - buf);
    return 1;
}

static J *parse_value(P *ps);

static J *parse_number(P *ps) {
    const unsigned char *s = ps->p;
    int neg = 0, isint = 1;
    if (ps->p < ps->end && *ps->p == '-') { neg = 1; ps->p++; }
    if (ps->p >= ps->end || *ps->p < '0' || *ps->p > '9') { perr(ps, "bad number"); return NULL; }
    if (*ps->p == '0') ps->p++;
    else while (ps->p < ps->end && *ps->p >= '0' && *ps->p <= '9') ps->p++;
    const unsigned char *intend = ps->p;
    if (ps->p < ps->end && *ps->p == '.') {
        isint = 0; ps->p++;
        if (ps->p >= ps->end || *ps->p < '0' || *ps->p > '9') { perr(ps, "bad number"); return NULL; }
        while (ps->p < ps->end && *ps->p >= '0' && *ps->p <= '9') ps->p++;
    }
    if (ps->p < ps->end && (*ps->p == 'e' || *ps->p == 'E')) {
        isint = 0; ps->p++;
        if (ps->p < ps->end && (*ps->p == '+' || *ps->p == '-')) ps->p++;
        if (ps->p >= ps->end || *ps->p < '0' || *ps->p > '9') { perr(ps, "bad number"); return NULL; }
        while (ps->p < ps->end && *ps->p >= '0' && *ps->p <= '9') ps->p++;
    }
    if (isint) {
        J *j = newj(JT_INT);
        unsigned __int128 v = 0;
        for (const unsigned char *d = s + neg; d < intend; d++) {
            v = v * 10 + (*d - '0');
            if (v > ((unsigned __int128)1 << 64)) { perr(ps, "integer out of range"); free(j); return NULL; }
        }
        if (!neg && v >= ((unsigned __int128)1 << 64)) { perr(ps, "integer out of range"); free(j); return NULL; }
        if (neg && v > ((unsigned __int128)1 << 63)) { perr(ps, "integer out of range"); free(j); return NULL; }
        j->neg = neg && v != 0;
        j->u = (uint64_t)v;
        j->d = neg ? -(double)v : (double)v;
        return j;
    }
    size_t len = (size_t)(ps->p - s);
    char *tmp = malloc(len + 1);
    memcpy(tmp, s, len); tmp[len] = 0;
    double d = strtod(tmp, NULL);
    free(tmp);
    if (isinf(d) || isnan(d)) { perr(ps, "number overflows"); return NULL; }
    J *j = newj(JT_FLOAT);
    j->d = d;
    return j;
}

static J *parse_value(P *ps) {
    ws(ps);
    if (ps->p >= ps->end) { perr(ps, "unexpected end of JSON"); return NULL; }
    unsigned c = *ps->p;
    if (c == '{' || c == '[') {
        if (++ps->depth > MAX_DEPTH) { perr(ps, "nesting too deep"); return NULL; }
        int obj = c == '{';
        J *j = newj(obj ? JT_OBJ : JT_ARR);
        size_t cap = 0;
        ps->p++;
        ws(ps);
        if (ps->p < ps->end && *ps->p == (obj ? '}' : ']')) { ps->p++; ps->depth--; return j; }
        while (1) {
            char *key = NULL; size_t klen = 0;
            ws(ps);
            if (obj) {
                if (ps->p >= ps->end || *ps->p != '"') { perr(ps, "expected string key"); return NULL; }
                if (!parse_string(ps, &key, &klen)) return NULL;
                for (size_t i = 0; i < j->n; i++)
                    if (j->klens[i] == klen && !memcmp(j->keys[i], key, klen)) { perr(ps, "duplicate key in object"); return NULL; }
                ws(ps);
                if (ps->p >= ps->end || *ps->p != ':') { perr(ps, "expected ':'"); return NULL; }
                ps->p++;
            }
            J *v = parse_value(ps);
            if (!v) return NULL;
            if (j->n == cap) {
                cap = cap ? cap * 2 : 8;
                j->items = realloc(j->items, cap * sizeof *j->items);
                j->keys = realloc(j->keys, cap * sizeof *j->keys);
                j->klens = realloc(j->klens, cap * sizeof *j->klens);
            }
            j->items[j->n] = v; j->keys[j->n] = key; j->klens[j->n] = klen; j->n++;
            ws(ps);
            if (ps->p >= ps->end) { perr(ps, "unexpected end of JSON"); return NULL; }
            if (*ps->p == ',') { ps->p++; continue; }
            if (*ps->p == (obj ? '}' : ']')) { ps->p++; break; }
            perr(ps, "expected ',' or closing bracket");
            return NULL;
        }
        ps->depth--;
        return j;
    }
    if (c == '"') {
        J *j = newj(JT_STR);
        if (!parse_string(ps, &j->s, &j->slen)) return NULL;
        return j;
    }
    if (c == '-' || (c >= '0' && c <= '9')) return parse_number(ps);
    if (ps->end - ps->p >= 4 && !memcmp(ps->p, "true", 4)) { ps->p += 4; J *j = newj(JT_BOOL); j->b = 1; return j; }
    if (ps->end - ps->p >= 5 && !memcmp(ps->p, "false", 5)) { ps->p += 5; return newj(JT_BOOL); }
    if (ps->end - ps->p >= 4 && !memcmp(ps->p, "null", 4)) { ps->p += 4; return newj(JT_NULL); }
    perr(ps, "invalid JSON value (NaN/Infinity are refused)");
    return NULL;
}

J *json_parse(const unsigned char *s, size_t n, char *err, size_t errlen) {
    err[0] = 0;
    if (!utf8_valid(s, n, NULL)) { snprintf(err, errlen, "header is not valid UTF-8"); return NULL; }
    P ps = {s, s + n, 0, err, errlen};
    J *j = parse_value(&ps);
    if (!j) return NULL;
    ws(&ps);
    if (ps.p != ps.end) { snprintf(err, errlen, "extra data after JSON value"); return NULL; }
    return j;
}

J *json_get(const J *obj, const char *key) {
    if (!obj || obj->type != JT_OBJ) return NULL;
    size_t kl = strlen(key);
    for (size_t i = 0; i < obj->n; i++)
        if (obj->klens[i] == kl && !memcmp(obj->keys[i], key, kl)) return obj->items[i];
    return NULL;
}
