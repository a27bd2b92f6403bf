/* Checking a payload's JSON without building it: see json_scan.c for the rules. */
#ifndef NOTIFY_ROUTER_JSON_SCAN_H
#define NOTIFY_ROUTER_JSON_SCAN_H

#include <stddef.h>
#include <stdint.h>

typedef enum {
    JSON_INVALID,    /* not exactly one JSON value */
    JSON_NOT_OBJECT, /* one JSON value, but an array, string, number, true, false or null */
    JSON_OBJECT,     /* one JSON object */
} json_shape;

/* What the top-level object holds under one key. */
typedef enum {
    JSON_FIELD_MISSING,         /* no such key */
    JSON_FIELD_NONEMPTY_STRING, /* a string of at least one character */
    JSON_FIELD_OTHER,           /* "" or any value that is not a string */
} json_field;

/*
 * Scans text, which must already be well-formed UTF-8, as one JSON value.
 *
 * For each of the nkeys ASCII keys, fields[i] tells what the top-level object holds under
 * keys[i] (when a key is repeated, its last value counts); fields is meaningful only when
 * the result is JSON_OBJECT.
 */
json_shape json_scan(const uint8_t *text, size_t len, const char *const *keys, size_t nkeys,
                     json_field *fields);

#endif
