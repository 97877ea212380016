#ifndef JSON_H
#define JSON_H
#include <stddef.h>
#include <stdint.h>
enum { JT_NULL, JT_BOOL, JT_INT, JT_FLOAT, JT_STR, JT_ARR, JT_OBJ };
typedef struct J {
    int type;
    int b;          /* bool */
    int neg;        /* int: negative (magnitude in u) */
    uint64_t u;     /* int magnitude */
    double d;       /* float value (also approx value of ints) */
    char *s; size_t slen;
    size_t n;       /* array/object element count */
    struct J **items;
    char **keys; size_t *klens;
} J;
J *json_parse(const unsigned char *s, size_t n, char *err, size_t errlen);
J *json_get(const J *obj, const char *key);
int utf8_valid(const unsigned char *s, size_t n, size_t *ncodepoints);
#endif
