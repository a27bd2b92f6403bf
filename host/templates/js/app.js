// {{name}}: republishes every message on `{{name}}:in` on `{{name}}:out`.
//
// A starting point: change `describe` and `handle`, then the manifest and the test files.
// How ComponentizeJS maps the WIT contract:
// - host functions are plain imports; `list<u8>` is a Uint8Array, enums are strings ('info');
// - a host function returning `result<T, error>` returns T or throws an Error whose own
//   `payload` property is the error variant, e.g. `{ tag: 'denied', val: 'text' }`;
// - `handle` returns normally for ok; throwing anything with an own `payload` property makes
//   it return that error. Any other exception traps, and the host counts a failure.

import { log, send } from 'switchyard:plugin/host@{{wit_version}}';

const INPUT = '{{name}}:in';
const OUTPUT = '{{name}}:out';

/** An error variant of the contract, thrown to make `handle` return it. */
class PluginError extends Error {
  constructor(tag, text) {
    super(text);
    Object.defineProperty(this, 'payload', { value: { tag, val: text }, enumerable: true });
  }
}

// Module state lives as long as the instance: messages seen so far.
let seen = 0;

export const handler = {
  describe() {
    return {
      name: '{{name}}',
      version: '0.1.0',
      subscriptions: [{ tag: 'channel', val: INPUT }],
      capabilities: { publish: [OUTPUT], invalidate: [], outputs: [] },
    };
  },

  handle(message) {
    if (message.payload.length === 0) {
      throw new PluginError('invalid', 'empty payload');
    }
    seen += 1;
    log('debug', `message ${seen} on ${message.channel}`);
    // `send` queues the message and returns (`publish` would wait for Redis's reply with the
    // receiver count). A denied send throws with the host's error as `payload`: rethrown as
    // is, it becomes this message's error.
    send(OUTPUT, message.payload);
  },
};
