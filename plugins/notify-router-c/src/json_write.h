/* Writing JSON text. */
#ifndef NOTIFY_ROUTER_JSON_WRITE_H
#define NOTIFY_ROUTER_JSON_WRITE_H

#include <stddef.h>
#include <stdint.h>

#include "buffer.h"

/*
 * Appends text as a JSON string literal, quotes included.
 *
 * The bytes are decoded as UTF-8 the lossy way: each ill-formed sequence (maximal subpart,
 * see utf8.h) becomes U+FFFD. '"' and '\' are escaped, and so are the control characters
 * U+0000..U+001F (as \b, \f, \n, \r, \t or \u00XX); everything else is written as UTF-8.
 * That is the same text serde_json writes for the same string.
 */
void json_append_string(buffer *buf, const uint8_t *text, size_t len);

#endif
