/*
 * A strict JSON scanner: it checks that a payload is exactly one JSON value and, for a top-level
 * object, notes what it holds under the keys the router cares about. Nothing is built: no
 * tree, no decoded strings, except the (short) decoded top-level keys compared with those keys.
 *
 * Grammar (RFC 8259):
 *   text   = ws value ws                       ws: space, tab, line feed, carriage return
 *   value  = object | array | string | number | true | false | null
 *   object = "{" ws [ string ws ":" ws value ws *( "," ws string ws ":" ws value ws ) ] "}"
 *   array  = "[" ws [ value ws *( "," ws value ws ) ] "]"
 *   string = '"' *( any character from U+0020 up except '"' and '\' | escape ) '"'
 *   escape = '\' ( '"' | '\' | '/' | 'b' | 'f' | 'n' | 'r' | 't' | 'u' 4HEXDIG )
 *   number = [ "-" ] ( "0" | [1-9] *DIGIT ) [ "." 1*DIGIT ] [ ( "e" | "E" ) [ "+" | "-" ] 1*DIGIT ]
 * So no comments, no trailing commas, no single quotes, no leading zeros or "+", no NaN or
 * Infinity, no byte order mark, nothing after the value but whitespace.
 *
 * The Rust build of the router parses with serde_json, and a payload must get the same
 * verdict from both. RFC 8259 lets a parser set limits and leaves some inputs' meaning open;
 * these are serde_json's choices, made here too:
 *   - depth: at most 127 nested arrays and objects (serde_json fails on the 128th level);
 *   - \u escapes must denote characters: a high surrogate escape must be followed at once
 *     by a low surrogate escape, and a low surrogate escape alone is an error;
 *   - numbers: serde_json turns each number into an f64 (or an integer when it fits) and
 *     fails when that f64 overflows to infinity, e.g. 1e400 or a 310-digit integer; tiny
 *     numbers become 0 and are fine. number_out_of_range() repeats its arithmetic, so the
 *     verdict agrees at the very edge (near 1.8e308) as well.
 * Duplicate keys are allowed; the last one counts, as in serde_json's maps.
 *
 * The caller checks UTF-8 beforehand, so bytes from 0x80 up are taken as they are.
 */
#include "json_scan.h"

#include <float.h>
#include <stdbool.h>
#include <string.h>

enum {
    MAX_DEPTH = 127,
    /* Decoded top-level keys are kept up to this many bytes: longer ones match no wanted key. */
    KEY_CAPACITY = 32,
};

typedef struct {
    const uint8_t *pos;
    const uint8_t *end;
    unsigned depth; /* arrays and objects open around pos */
} scanner;

/* A decoded key, as far as it fits. */
typedef struct {
    uint8_t bytes[KEY_CAPACITY];
    size_t len;
    bool truncated;
} key_text;

static bool scan_value(scanner *s);

/* ---- Characters ---------------------------------------------------------------------- */

static int peek(const scanner *s) { return s->pos < s->end ? *s->pos : -1; }

static bool eat(scanner *s, uint8_t c) {
    if (peek(s) != c) {
        return false;
    }
    s->pos++;
    return true;
}

static bool is_digit(int c) { return c >= '0' && c <= '9'; }

static void skip_whitespace(scanner *s) {
    while (s->pos < s->end &&
           (*s->pos == ' ' || *s->pos == '\t' || *s->pos == '\n' || *s->pos == '\r')) {
        s->pos++;
    }
}

static bool scan_word(scanner *s, const char *word) {
    size_t len = strlen(word);
    if ((size_t)(s->end - s->pos) < len || memcmp(s->pos, word, len) != 0) {
        return false;
    }
    s->pos += len;
    return true;
}

/* ---- Strings ------------------------------------------------------------------------- */

static void key_append(key_text *key, const uint8_t *bytes, size_t len) {
    if (key == NULL || key->truncated) {
        return;
    }
    if (len > KEY_CAPACITY - key->len) {
        key->truncated = true;
        return;
    }
    memcpy(key->bytes + key->len, bytes, len);
    key->len += len;
}

static void key_append_code_point(key_text *key, uint32_t cp) {
    static const uint8_t lead[] = {0, 0, 0xC0, 0xE0, 0xF0}; /* by sequence length */
    uint8_t utf8[4];
    size_t len = cp < 0x80 ? 1 : cp < 0x800 ? 2 : cp < 0x10000 ? 3 : 4;
    for (size_t i = len - 1; i > 0; i--) {
        utf8[i] = (uint8_t)(0x80 | (cp & 0x3F));
        cp >>= 6;
    }
    utf8[0] = (uint8_t)(lead[len] | cp);
    key_append(key, utf8, len);
}

static bool scan_hex4(scanner *s, uint32_t *unit) {
    if (s->end - s->pos < 4) {
        return false;
    }
    *unit = 0;
    for (int i = 0; i < 4; i++) {
        uint8_t c = *s->pos++;
        int digit = is_digit(c)                ? c - '0'
                    : (c >= 'a' && c <= 'f') ? c - 'a' + 10
                    : (c >= 'A' && c <= 'F') ? c - 'A' + 10
                                             : -1;
        if (digit < 0) {
            return false;
        }
        *unit = *unit << 4 | (uint32_t)digit;
    }
    return true;
}

/* After "\u": one escape, or two that form a surrogate pair; yields the code point. */
static bool scan_unicode_escape(scanner *s, uint32_t *cp) {
    uint32_t high, low;
    if (!scan_hex4(s, &high) || (high >= 0xDC00 && high <= 0xDFFF)) {
        return false;
    }
    if (high < 0xD800 || high > 0xDBFF) {
        *cp = high;
        return true;
    }
    if (!eat(s, '\\') || !eat(s, 'u') || !scan_hex4(s, &low) || low < 0xDC00 || low > 0xDFFF) {
        return false;
    }
    *cp = 0x10000 + ((high - 0xD800) << 10) + (low - 0xDC00);
    return true;
}

/* A string; when key is not NULL, its decoded text goes there. */
static bool scan_string(scanner *s, key_text *key) {
    if (!eat(s, '"')) {
        return false;
    }
    while (s->pos < s->end) {
        uint8_t c = *s->pos++;
        if (c == '"') {
            return true;
        }
        if (c < 0x20) {
            return false; /* control characters must be escaped */
        }
        if (c != '\\') {
            key_append(key, &c, 1);
            continue;
        }
        if (s->pos == s->end) {
            return false;
        }
        uint8_t decoded;
        switch (*s->pos++) {
        case '"': decoded = '"'; break;
        case '\\': decoded = '\\'; break;
        case '/': decoded = '/'; break;
        case 'b': decoded = '\b'; break;
        case 'f': decoded = '\f'; break;
        case 'n': decoded = '\n'; break;
        case 'r': decoded = '\r'; break;
        case 't': decoded = '\t'; break;
        case 'u': {
            uint32_t cp;
            if (!scan_unicode_escape(s, &cp)) {
                return false;
            }
            key_append_code_point(key, cp);
            continue;
        }
        default: return false;
        }
        key_append(key, &decoded, 1);
    }
    return false; /* no closing quote */
}

/* ---- Numbers ------------------------------------------------------------------------- */

/* 1e289 to 1e308, each rounded to the nearest double by the compiler, as in serde_json's
 * own table. Smaller powers cannot overflow: even 2^64 * 1e288 is below 1.9e307. */
static const double LARGE_POWERS_OF_TEN[] = {
    1e289, 1e290, 1e291, 1e292, 1e293, 1e294, 1e295, 1e296, 1e297, 1e298,
    1e299, 1e300, 1e301, 1e302, 1e303, 1e304, 1e305, 1e306, 1e307, 1e308,
};

/* Whether serde_json's f64 for significand * 10^exponent is infinite: it multiplies the
 * significand, rounded to a double, by the double nearest 10^exponent (dividing for negative
 * exponents, which cannot overflow), and gives up past 10^308. */
static bool number_out_of_range(uint64_t significand, int32_t exponent) {
    if (significand == 0 || exponent < 289) {
        return false;
    }
    if (exponent > 308) {
        return true;
    }
    return (double)significand * LARGE_POWERS_OF_TEN[exponent - 289] > DBL_MAX;
}

static int32_t saturating_add(int32_t a, int64_t b) {
    int64_t sum = (int64_t)a + b;
    return sum > INT32_MAX ? INT32_MAX : sum < INT32_MIN ? INT32_MIN : (int32_t)sum;
}

/* Whether value * 10 + digit would not fit in a uint64_t. */
static bool decimal_overflows(uint64_t value, unsigned digit) {
    return value > (UINT64_MAX - digit) / 10;
}

/* A number. Along with the grammar, it tracks the value the way serde_json does: the first
 * digits as a u64 significand, as long as they fit; integer digits past that count as a
 * power of ten; fraction digits past that are dropped; then the exponent is added, with an
 * exponent too large for an i32 meaning overflow (unless the significand is 0 or the
 * exponent negative). */
static bool scan_number(scanner *s) {
    uint64_t significand = 0;
    int32_t exponent = 0;
    bool full = false;

    eat(s, '-');
    if (eat(s, '0')) {
        /* a lone zero: no more integer digits may follow (the caller rejects them) */
    } else if (is_digit(peek(s))) {
        while (is_digit(peek(s))) {
            unsigned digit = (unsigned)(*s->pos++ - '0');
            if (!full && !decimal_overflows(significand, digit)) {
                significand = significand * 10 + digit;
            } else {
                full = true;
                exponent = saturating_add(exponent, 1);
            }
        }
    } else {
        return false;
    }

    if (eat(s, '.')) {
        if (!is_digit(peek(s))) {
            return false;
        }
        /* serde_json tries each fraction digit afresh, even after the integer part overflowed,
         * and stops at the first that does not fit. */
        full = false;
        while (is_digit(peek(s))) {
            unsigned digit = (unsigned)(*s->pos++ - '0');
            if (!full && !decimal_overflows(significand, digit)) {
                significand = significand * 10 + digit;
                exponent = saturating_add(exponent, -1);
            } else {
                full = true;
            }
        }
    }

    if (eat(s, 'e') || eat(s, 'E')) {
        bool negative = eat(s, '-');
        if (!negative) {
            eat(s, '+');
        }
        if (!is_digit(peek(s))) {
            return false;
        }
        int32_t value = 0;
        bool huge = false;
        while (is_digit(peek(s))) {
            int32_t digit = *s->pos++ - '0';
            if (huge || value > (INT32_MAX - digit) / 10) {
                huge = true;
            } else {
                value = value * 10 + digit;
            }
        }
        if (huge) {
            return negative || significand == 0;
        }
        exponent = saturating_add(exponent, negative ? -(int64_t)value : value);
    }
    return !number_out_of_range(significand, exponent);
}

/* ---- Arrays and objects -------------------------------------------------------------- */

static bool enter(scanner *s) { return ++s->depth <= MAX_DEPTH; }

static bool scan_array(scanner *s) {
    if (!eat(s, '[') || !enter(s)) {
        return false;
    }
    skip_whitespace(s);
    if (!eat(s, ']')) {
        for (;;) {
            if (!scan_value(s)) {
                return false;
            }
            skip_whitespace(s);
            if (eat(s, ']')) {
                break;
            }
            if (!eat(s, ',')) {
                return false;
            }
            skip_whitespace(s);
        }
    }
    s->depth--;
    return true;
}

static json_field classify(const uint8_t *value, const uint8_t *end) {
    /* Every character or escape between the quotes decodes to at least one character. */
    if (*value == '"') {
        return end - value > 2 ? JSON_FIELD_NONEMPTY_STRING : JSON_FIELD_OTHER;
    }
    return JSON_FIELD_OTHER;
}

/* An object. When fields is not NULL (the top level), notes what each of keys holds. */
static bool scan_object(scanner *s, const char *const *keys, size_t nkeys, json_field *fields) {
    if (!eat(s, '{') || !enter(s)) {
        return false;
    }
    skip_whitespace(s);
    if (!eat(s, '}')) {
        for (;;) {
            key_text key = {.len = 0, .truncated = false};
            if (!scan_string(s, fields != NULL ? &key : NULL)) {
                return false;
            }
            skip_whitespace(s);
            if (!eat(s, ':')) {
                return false;
            }
            skip_whitespace(s);
            const uint8_t *value = s->pos;
            if (!scan_value(s)) {
                return false;
            }
            for (size_t i = 0; fields != NULL && i < nkeys; i++) {
                if (!key.truncated && key.len == strlen(keys[i]) &&
                    memcmp(key.bytes, keys[i], key.len) == 0) {
                    fields[i] = classify(value, s->pos);
                }
            }
            skip_whitespace(s);
            if (eat(s, '}')) {
                break;
            }
            if (!eat(s, ',')) {
                return false;
            }
            skip_whitespace(s);
        }
    }
    s->depth--;
    return true;
}

static bool scan_value(scanner *s) {
    switch (peek(s)) {
    case '{': return scan_object(s, NULL, 0, NULL);
    case '[': return scan_array(s);
    case '"': return scan_string(s, NULL);
    case 't': return scan_word(s, "true");
    case 'f': return scan_word(s, "false");
    case 'n': return scan_word(s, "null");
    default: return scan_number(s);
    }
}

/* ---- Entry point --------------------------------------------------------------------- */

json_shape json_scan(const uint8_t *text, size_t len, const char *const *keys, size_t nkeys,
                     json_field *fields) {
    scanner s = {.pos = text, .end = text + len, .depth = 0};
    for (size_t i = 0; i < nkeys; i++) {
        fields[i] = JSON_FIELD_MISSING;
    }
    skip_whitespace(&s);
    bool object = peek(&s) == '{';
    bool ok = object ? scan_object(&s, keys, nkeys, fields) : scan_value(&s);
    skip_whitespace(&s);
    if (!ok || s.pos != s.end) {
        return JSON_INVALID;
    }
    return object ? JSON_OBJECT : JSON_NOT_OBJECT;
}
