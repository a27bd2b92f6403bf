#include "json_write.h"

#include <stdbool.h>

#include "utf8.h"

static const uint8_t REPLACEMENT_CHARACTER[] = {0xEF, 0xBF, 0xBD}; /* U+FFFD in UTF-8 */

static void append_escaped_ascii(buffer *buf, uint8_t c) {
    static const char hex[] = "0123456789abcdef";
    switch (c) {
    case '"': buf_append_cstr(buf, "\\\""); break;
    case '\\': buf_append_cstr(buf, "\\\\"); break;
    case '\b': buf_append_cstr(buf, "\\b"); break;
    case '\f': buf_append_cstr(buf, "\\f"); break;
    case '\n': buf_append_cstr(buf, "\\n"); break;
    case '\r': buf_append_cstr(buf, "\\r"); break;
    case '\t': buf_append_cstr(buf, "\\t"); break;
    default: {
        const char escape[] = {'\\', 'u', '0', '0', hex[c >> 4], hex[c & 0xF]};
        buf_append(buf, escape, sizeof escape);
    }
    }
}

void json_append_string(buffer *buf, const uint8_t *text, size_t len) {
    buf_append_byte(buf, '"');
    /* Copy runs of bytes that need no change in one go; stop at anything to escape or
     * replace. */
    size_t run_start = 0, i = 0;
    while (i < len) {
        uint8_t c = text[i];
        if (c >= 0x20 && c < 0x80 && c != '"' && c != '\\') {
            i++;
            continue;
        }
        size_t n = 1;
        bool well_formed = true;
        if (c >= 0x80) {
            n = utf8_sequence(text + i, len - i, &well_formed);
            if (well_formed) {
                i += n;
                continue;
            }
        }
        buf_append(buf, text + run_start, i - run_start);
        if (well_formed) {
            append_escaped_ascii(buf, c);
        } else {
            buf_append(buf, REPLACEMENT_CHARACTER, sizeof REPLACEMENT_CHARACTER);
        }
        i += n;
        run_start = i;
    }
    buf_append(buf, text + run_start, len - run_start);
    buf_append_byte(buf, '"');
}
