/*
 * A growable byte buffer, for the texts the router builds: dead-letter reasons, log lines,
 * dead letters, error messages.
 *
 * The storage comes from malloc, so a finished buffer can be handed to the bindings as an
 * owned string (they release it with free). Running out of memory aborts, which traps the
 * instance: the host then rebuilds it, exactly as the canonical ABI's own allocator does.
 */
#ifndef NOTIFY_ROUTER_BUFFER_H
#define NOTIFY_ROUTER_BUFFER_H

#include <stddef.h>
#include <stdint.h>

typedef struct {
    uint8_t *data; /* NULL while nothing was ever appended */
    size_t len;
    size_t cap;
} buffer;

#define BUFFER_INIT {NULL, 0, 0}

void buf_append(buffer *buf, const void *bytes, size_t len);
void buf_append_byte(buffer *buf, uint8_t byte);
void buf_append_cstr(buffer *buf, const char *text);
void buf_append_u32(buffer *buf, uint32_t value);
void buf_free(buffer *buf);

#endif
