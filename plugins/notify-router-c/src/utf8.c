#include "utf8.h"

size_t utf8_sequence(const uint8_t *text, size_t len, bool *well_formed) {
    uint8_t lead = text[0];
    size_t continuations;
    /* The range the first continuation byte must fall in; the later ones are all 80..BF.
     * The narrower ranges after E0, ED, F0 and F4 are what exclude overlong forms,
     * surrogates and code points past U+10FFFF. */
    uint8_t low = 0x80, high = 0xBF;

    if (lead < 0x80) {
        *well_formed = true;
        return 1;
    } else if (lead >= 0xC2 && lead <= 0xDF) {
        continuations = 1;
    } else if (lead == 0xE0) {
        continuations = 2;
        low = 0xA0;
    } else if (lead == 0xED) {
        continuations = 2;
        high = 0x9F;
    } else if (lead >= 0xE1 && lead <= 0xEF) {
        continuations = 2;
    } else if (lead == 0xF0) {
        continuations = 3;
        low = 0x90;
    } else if (lead == 0xF4) {
        continuations = 3;
        high = 0x8F;
    } else if (lead >= 0xF1 && lead <= 0xF3) {
        continuations = 3;
    } else {
        /* 80..BF (a continuation byte), C0, C1 (only overlong forms) and F5..FF. */
        *well_formed = false;
        return 1;
    }

    for (size_t i = 1; i <= continuations; i++) {
        if (i == len || text[i] < low || text[i] > high) {
            *well_formed = false;
            return i; /* the lead and the continuations that were still plausible */
        }
        low = 0x80;
        high = 0xBF;
    }
    *well_formed = true;
    return continuations + 1;
}

bool utf8_is_valid(const uint8_t *text, size_t len) {
    size_t i = 0;
    while (i < len) {
        /* Plain ASCII is by far the common case: skip it without the full decoder. */
        if (text[i] < 0x80) {
            i++;
            continue;
        }
        bool well_formed;
        i += utf8_sequence(text + i, len - i, &well_formed);
        if (!well_formed) {
            return false;
        }
    }
    return true;
}
