/*
 * {{name}}: republishes every message on {{name}}:in on {{name}}:out.
 *
 * A starting point: change describe and handle, then the manifest and the test files.
 * Ownership, as the bindings generated into plugin.h define it:
 *   - handle owns the message it is given and frees it;
 *   - what describe and handle return (strings, lists, an error's text) must come from
 *     malloc: the bindings free it once the host has copied it;
 *   - arguments to host functions are only borrowed; what they return belongs to the caller.
 */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "plugin.h"

#define INPUT "{{name}}:in"
#define OUTPUT "{{name}}:out"

/* State lives as long as the instance: messages seen so far. */
static uint64_t seen;

/* malloc that traps when memory runs out, as the bindings' own allocator does. */
static void *allocate(size_t size) {
    void *memory = malloc(size);
    if (memory == NULL) {
        abort();
    }
    return memory;
}

static plugin_string_t borrowed(const char *text) {
    return (plugin_string_t){(uint8_t *)text, strlen(text)};
}

void exports_switchyard_plugin_handler_describe(
    exports_switchyard_plugin_handler_plugin_info_t *ret) {
    switchyard_plugin_types_subscription_t *subscription = allocate(sizeof *subscription);
    subscription->tag = SWITCHYARD_PLUGIN_TYPES_SUBSCRIPTION_CHANNEL;
    plugin_string_dup(&subscription->val.channel, INPUT);
    plugin_string_t *publish = allocate(sizeof *publish);
    plugin_string_dup(publish, OUTPUT);

    plugin_string_dup(&ret->name, "{{name}}");
    plugin_string_dup(&ret->version, "0.1.0");
    ret->subscriptions.ptr = subscription;
    ret->subscriptions.len = 1;
    ret->capabilities.publish.ptr = publish;
    ret->capabilities.publish.len = 1;
    ret->capabilities.invalidate.ptr = NULL;
    ret->capabilities.invalidate.len = 0;
    ret->capabilities.outputs.ptr = NULL;
    ret->capabilities.outputs.len = 0;
}

bool exports_switchyard_plugin_handler_handle(exports_switchyard_plugin_handler_message_t *message,
                                              exports_switchyard_plugin_handler_error_t *err) {
    bool ok;
    if (message->payload.len == 0) {
        err->tag = SWITCHYARD_PLUGIN_TYPES_ERROR_INVALID;
        plugin_string_dup(&err->val.invalid, "empty payload");
        ok = false;
    } else {
        seen++;
        char line[128];
        snprintf(line, sizeof line, "message %" PRIu64 " on %.*s", seen,
                 (int)(message->channel.len > 64 ? 64 : message->channel.len),
                 (const char *)message->channel.ptr);
        plugin_string_t text = borrowed(line);
        switchyard_plugin_host_log(SWITCHYARD_PLUGIN_TYPES_LEVEL_DEBUG, &text);

        /* send queues the message and returns (publish would wait for Redis's reply with the
         * receiver count). A denied send fills err with the host's error: it becomes this
         * message's error as it is. */
        plugin_string_t channel = borrowed(OUTPUT);
        ok = switchyard_plugin_host_send(&channel, &message->payload, err);
    }
    exports_switchyard_plugin_handler_message_free(message);
    return ok;
}
