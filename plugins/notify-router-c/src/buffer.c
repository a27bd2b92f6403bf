#include "buffer.h"

#include <stdlib.h>
#include <string.h>

static void buf_reserve(buffer *buf, size_t extra) {
    if (buf->cap - buf->len >= extra) {
        return;
    }
    if (extra > SIZE_MAX / 2 - buf->len) {
        abort();
    }
    size_t cap = buf->cap ? buf->cap : 64;
    while (cap - buf->len < extra) {
        cap *= 2;
    }
    uint8_t *data = realloc(buf->data, cap);
    if (data == NULL) {
        abort();
    }
    buf->data = data;
    buf->cap = cap;
}

void buf_append(buffer *buf, const void *bytes, size_t len) {
    if (len == 0) {
        return;
    }
    buf_reserve(buf, len);
    memcpy(buf->data + buf->len, bytes, len);
    buf->len += len;
}

void buf_append_byte(buffer *buf, uint8_t byte) {
    buf_reserve(buf, 1);
    buf->data[buf->len++] = byte;
}

void buf_append_cstr(buffer *buf, const char *text) {
    buf_append(buf, text, strlen(text));
}

void buf_append_u32(buffer *buf, uint32_t value) {
    char digits[10];
    size_t n = 0;
    do {
        digits[n++] = (char)('0' + value % 10);
        value /= 10;
    } while (value != 0);
    while (n > 0) {
        buf_append_byte(buf, (uint8_t)digits[--n]);
    }
}

void buf_free(buffer *buf) {
    free(buf->data);
    buf->data = NULL;
    buf->len = 0;
    buf->cap = 0;
}
