// notify-router, JavaScript build: checks notifications and hands each one to the gateway for
// its kind. Behaviour is that of the Rust notify-router (see ../notify-router/README.md).
//
// The module is turned into a component by ComponentizeJS, which runs it in StarlingMonkey
// (SpiderMonkey compiled to WebAssembly). How its bindings map the WIT contract:
// - imports of `switchyard:plugin/host` are plain functions; `list<u8>` arrives and leaves as a
//   Uint8Array, enums are their case names as strings ('info');
// - a host function returning `result<T, error>` returns T, or throws an Error whose own
//   `payload` property is the `error` variant, `{ tag: 'unavailable', val: 'text' }`;
// - the exported `handle` returns `result<_, error>`: returning normally is `ok`, throwing
//   anything with an own `payload` property is `err(payload)`. Any other exception traps.

import { publish, callOutput, log } from 'switchyard:plugin/host@0.6.0';

const PREFIX = 'notifications:';
const DEAD_LETTERS = 'notifications:dead';
const DEAD_KIND = 'dead';

// Each kind this router knows, with the fields that must be non-empty strings, in the order
// they are checked. Every kind is also the name of the output its notifications go to.
const REQUIRED_FIELDS = new Map([
  ['email', ['to', 'subject']],
  ['sms', ['phone', 'message']],
  ['push', ['device_id']],
]);

// `ignoreBOM: true` on both decoders: by default a TextDecoder silently drops a leading byte
// order mark, which would turn a payload that is not JSON (U+FEFF is not JSON whitespace) into
// one that is, and would drop the mark from the dead letter's copy of the payload.
const strictUtf8 = new TextDecoder('utf-8', { fatal: true, ignoreBOM: true });
// Non-fatal: each invalid sequence becomes U+FFFD, the same way Rust's from_utf8_lossy does.
const lossyUtf8 = new TextDecoder('utf-8', { ignoreBOM: true });
const utf8 = new TextEncoder();

// serde_json, which the Rust build parses with, refuses more arrays and objects nested in one
// another than this; JSON.parse accepts far more. (Checked against the Rust build.)
const MAX_DEPTH = 127;

// Quick looks at the text, each ruling out one thing serde_json refuses (see `parseJson`):
// - nesting too deep needs more opening brackets than MAX_DEPTH (counting those in strings);
const MANY_OPENINGS = new RegExp(`^(?:[^[{]*[[{]){${MAX_DEPTH + 1}}`);
// - the usual nesting bombs (`[[[[`, `{"a":{"a":`, `[1,[1,`) open more than MAX_DEPTH brackets
//   with no closing one in between. (The look-behind lets a search start only at the first
//   opening bracket of such a run, which keeps it linear.)
const OPENING_CHAIN = new RegExp(
  `(?<![[{][^\\]}[{]*)[[{](?:[^\\]}[{]*[[{]){${MAX_DEPTH}}`,
);
// - a number beyond f64 (1.8e308) needs an exponent of three digits or more, or, as an
//   exponent of two digits adds at most 99, 210 digits or more in a row;
const LONG_NUMBER = /[eE][+-]?\d{3}|\d{210}/;
// - an unpaired surrogate needs a surrogate escape.
const SURROGATE_ESCAPE = /\\u[dD][89a-fA-F]/;

/** An `error` variant of the WIT contract, thrown to make `handle` return it. */
class PluginError extends Error {
  constructor(tag, text) {
    super(text);
    // The bindings look for an own `payload` property on what `handle` throws.
    Object.defineProperty(this, 'payload', { value: { tag, val: text }, enumerable: true });
  }
}

/** The `error` variant a host call failed with; anything else is a bug and is rethrown. */
function errorVariant(exception) {
  if (exception !== null && typeof exception === 'object' && Object.hasOwn(exception, 'payload')) {
    return exception.payload;
  }
  throw exception;
}

/**
 * Decides what to do with a notification of `kind` from its payload alone: `null` to deliver
 * it, otherwise the reason to dead-letter it.
 */
function rejection(kind, payload) {
  const fields = REQUIRED_FIELDS.get(kind);
  if (fields === undefined) {
    return `unknown notification kind "${kind}"`;
  }
  // UTF-8 first, so the reason says "not UTF-8" rather than "not JSON". Reasons carry no
  // parser details: every build of this router gives the same dead letters for the same input.
  let text;
  try {
    text = strictUtf8.decode(payload);
  } catch {
    return 'payload is not valid UTF-8';
  }
  const object = parseJson(text);
  if (object === undefined) {
    return 'payload is not valid JSON';
  }
  if (object === null || typeof object !== 'object' || Array.isArray(object)) {
    return 'payload must be a JSON object';
  }
  for (const field of fields) {
    // Own properties only: `{}` has no "to", whatever Object.prototype holds.
    if (!Object.hasOwn(object, field)) {
      return `missing field "${field}"`;
    }
    const value = object[field];
    if (typeof value !== 'string' || value === '') {
      return `field "${field}" must be a non-empty string`;
    }
  }
  return null;
}

/**
 * Parses `text` as one JSON value, or returns `undefined` when the Rust build would call it
 * invalid. JSON.parse already follows the strict RFC 8259 grammar; serde_json, which the Rust
 * build parses with, also refuses three things that the grammar allows:
 * - more than MAX_DEPTH arrays and objects nested in one another;
 * - numbers too large for an f64, which JSON.parse turns into Infinity;
 * - escapes of UTF-16 surrogates that are not part of a pair, such as "\ud800": a Rust string
 *   cannot hold one, JSON.parse keeps it.
 * A quick look at the text (a native regular expression) rules each out for nearly every
 * payload; only what it cannot rule out is checked in full, by code that an interpreter runs
 * slowly.
 */
function parseJson(text) {
  // A nesting bomb is refused before parsing: JSON.parse would spend tens of MiB and far more
  // time on it than the Rust build's quick refusal. The exact scan of the text is slow, so it
  // only runs on text that looks like one.
  if (OPENING_CHAIN.test(text) && nestsTooDeep(text)) {
    return undefined;
  }
  let value;
  try {
    value = JSON.parse(text);
  } catch {
    return undefined;
  }
  // Any other nesting is checked on the parsed value: far quicker than scanning the text.
  if (MANY_OPENINGS.test(text) && nestedTooDeep(value, 1)) {
    return undefined;
  }
  if (LONG_NUMBER.test(text) && !everyLeaf(value, isFiniteIfNumber)) {
    return undefined;
  }
  if (SURROGATE_ESCAPE.test(text) && !everyLeaf(value, isWellFormedIfString)) {
    return undefined;
  }
  return value;
}

/**
 * Whether `text` nests arrays and objects more than MAX_DEPTH deep, brackets in strings aside.
 * Exact for JSON text; for anything else the answer does not matter, as JSON.parse refuses it.
 */
function nestsTooDeep(text) {
  let depth = 0;
  for (let i = 0; i < text.length; i++) {
    switch (text.charCodeAt(i)) {
      case 0x22: // "
        i = closingQuote(text, i);
        break;
      case 0x5b: // [
      case 0x7b: // {
        if (++depth > MAX_DEPTH) {
          return true;
        }
        break;
      case 0x5d: // ]
      case 0x7d: // }
        depth--;
        break;
    }
  }
  return false;
}

/** Index of the quote that closes the string opening at `open` (the text's end if none). */
function closingQuote(text, open) {
  for (let i = text.indexOf('"', open + 1); i >= 0; i = text.indexOf('"', i + 1)) {
    // A quote after an odd number of backslashes is escaped.
    let backslashes = 0;
    while (text.charCodeAt(i - 1 - backslashes) === 0x5c) {
      backslashes++;
    }
    if (backslashes % 2 === 0) {
      return i;
    }
  }
  return text.length;
}

/** Whether parsed JSON nests deeper than MAX_DEPTH, `container` being at `depth`. */
function nestedTooDeep(container, depth) {
  if (depth > MAX_DEPTH) {
    return true;
  }
  // Only containers are visited: scalars cannot nest.
  if (Array.isArray(container)) {
    for (let i = 0; i < container.length; i++) {
      const item = container[i];
      if (typeof item === 'object' && item !== null && nestedTooDeep(item, depth + 1)) {
        return true;
      }
    }
    return false;
  }
  for (const key in container) {
    const item = container[key];
    if (typeof item === 'object' && item !== null && nestedTooDeep(item, depth + 1)) {
      return true;
    }
  }
  return false;
}

/**
 * Whether `test` holds for every number, string, boolean, null and object key in `value`.
 * (The recursion is bounded: nesting was checked first.)
 */
function everyLeaf(value, test) {
  if (typeof value !== 'object' || value === null) {
    return test(value);
  }
  if (Array.isArray(value)) {
    for (let i = 0; i < value.length; i++) {
      if (!everyLeaf(value[i], test)) {
        return false;
      }
    }
    return true;
  }
  for (const key in value) {
    if (!test(key) || !everyLeaf(value[key], test)) {
      return false;
    }
  }
  return true;
}

function isFiniteIfNumber(leaf) {
  return typeof leaf !== 'number' || Number.isFinite(leaf);
}

function isWellFormedIfString(leaf) {
  return typeof leaf !== 'string' || leaf.isWellFormed();
}

/** The dead letter for a message on `channel`, as bytes to publish. */
function deadLetter(channel, reason, payload) {
  const letter = { channel, reason, payload: lossyUtf8.decode(payload) };
  return utf8.encode(JSON.stringify(letter));
}

/** Parks the message on the dead-letter channel; a failed publish is thrown as its error. */
function reject(message, reason) {
  log('info', `dead-lettering message on ${message.channel}: ${reason}`);
  publish(DEAD_LETTERS, deadLetter(message.channel, reason, message.payload));
}

/**
 * Calls the gateway for `kind`. A webhook that answers with a non-2xx status did not take the
 * notification, so that counts as a failure too; status 0 means the output has no status.
 */
function deliver(kind, payload) {
  const { status } = callOutput(kind, payload);
  if (status === 0 || (status >= 200 && status <= 299)) {
    return;
  }
  const text = `gateway answered HTTP status ${status}`;
  // These may well succeed later: let the host treat them as transient.
  if (status === 408 || status === 429 || (status >= 500 && status <= 599)) {
    throw new PluginError('unavailable', text);
  }
  throw new PluginError('failed', text);
}

export const handler = {
  describe() {
    return {
      name: 'notify-router',
      version: '0.1.0',
      subscriptions: [{ tag: 'pattern', val: `${PREFIX}*` }],
      capabilities: {
        publish: [DEAD_LETTERS],
        invalidate: [],
        outputs: [...REQUIRED_FIELDS.keys()],
      },
    };
  },

  handle(message) {
    const { channel, payload } = message;
    if (!channel.startsWith(PREFIX)) {
      throw new PluginError('invalid', `${channel} is not a ${PREFIX} channel`);
    }
    const kind = channel.slice(PREFIX.length);
    // Our own dead letters come back through `notifications:*`: never route them again.
    if (kind === DEAD_KIND) {
      return;
    }
    const reason = rejection(kind, payload);
    if (reason !== null) {
      // Malformed: parked where someone can look at it, and handled.
      reject(message, reason);
      return;
    }
    try {
      deliver(kind, payload);
    } catch (exception) {
      const { val: text } = errorVariant(exception);
      reject(message, `output ${kind} failed: ${text}`);
      throw exception;
    }
  },
};
