/*
 * UTF-8 as Unicode defines it (Table 3-7, "Well-Formed UTF-8 Byte Sequences"): no overlong
 * forms, no surrogates (U+D800..U+DFFF), nothing above U+10FFFF.
 */
#ifndef NOTIFY_ROUTER_UTF8_H
#define NOTIFY_ROUTER_UTF8_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/*
 * Measures the sequence that starts at text[0] (len must be at least 1).
 *
 * When it is a well-formed character, sets *well_formed and returns its length (1 to 4).
 * Otherwise clears *well_formed and returns the length of its "maximal subpart": the longest
 * prefix that could still have begun a well-formed character, or 1 when text[0] cannot begin
 * one at all. Replacing each maximal subpart with one U+FFFD and going on after it is the
 * standard lossy decoding (Unicode's recommended practice, Rust's String::from_utf8_lossy,
 * WHATWG's TextDecoder).
 */
size_t utf8_sequence(const uint8_t *text, size_t len, bool *well_formed);

/* Whether all of text is well-formed UTF-8. */
bool utf8_is_valid(const uint8_t *text, size_t len);

#endif
