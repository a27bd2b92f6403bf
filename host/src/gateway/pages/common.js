// Helpers shared by the gateway pages (index, dashboard, chat).
//
// Everything that comes from the network is written into the page with textContent or
// attribute setters, never innerHTML, so nothing here escapes HTML.
//
// Endpoints are addressed relative to the page ("api/plugins", "sse", "ws") so the pages
// also work when the gateway is mounted under a path prefix behind a proxy.
//
// Importing this module has one side effect: links marked `data-carry-token` get the
// page's `?token=` appended, so moving between pages keeps the token.

/** The token from the page's own `?token=` (empty string when absent). */
export function tokenFromUrl() {
  const value = new URLSearchParams(window.location.search).get('token');
  return value ? value.trim() : '';
}

/** Another query parameter of the page's own URL (empty string when absent). */
export function paramFromUrl(name) {
  return new URLSearchParams(window.location.search).get(name) ?? '';
}

/**
 * `path` (relative to the page) with query parameters appended, as a string relative to the
 * page. `params` is a list of [name, value] pairs (names may repeat); empty values are
 * skipped.
 */
export function withParams(path, params) {
  const query = new URLSearchParams();
  for (const [name, value] of params) {
    if (value !== undefined && value !== null && value !== '') {
      query.append(name, String(value));
    }
  }
  const text = query.toString();
  return text ? `${path}?${text}` : path;
}

/** Points every `a[data-carry-token]` at its own target plus `?token=` (or none). */
export function carryToken(token) {
  for (const link of document.querySelectorAll('a[data-carry-token]')) {
    const base = link.dataset.base ?? link.getAttribute('href') ?? './';
    link.dataset.base = base;
    link.setAttribute('href', withParams(base, [['token', token]]));
  }
}

/** A failed HTTP request: `status` and a one-line `detail`. */
export class HttpError extends Error {
  constructor(status, detail) {
    super(detail ? `HTTP ${status}: ${detail}` : `HTTP ${status}`);
    this.name = 'HttpError';
    this.status = status;
    this.detail = detail;
  }
}

/**
 * The one-line reason a non-2xx response gives: the first line of a text body (the gateway
 * answers 401/403 with one line of plain text), else the status text. HTML bodies (error
 * pages of other servers) are not shown.
 */
async function reasonOf(response) {
  const type = response.headers.get('content-type') ?? '';
  let line = '';
  if (!type.includes('html')) {
    try {
      line = (await response.text()).trim().split(/\r?\n/, 1)[0] ?? '';
    } catch {
      line = '';
    }
  }
  if (line.length > 200) line = `${line.slice(0, 200)}…`;
  return line || response.statusText || '';
}

/**
 * GETs `path` with the token in the query string and returns the parsed JSON. Throws an
 * HttpError for a non-2xx answer, an Error for a network failure, a timeout or a body that
 * is not JSON.
 */
export async function fetchJson(path, token, { timeoutMs = 5000 } = {}) {
  const controller = new AbortController();
  const timer = setTimeout(() => controller.abort(), timeoutMs);
  try {
    let response;
    try {
      response = await fetch(withParams(path, [['token', token]]), {
        headers: { Accept: 'application/json' },
        cache: 'no-store',
        signal: controller.signal,
      });
    } catch (e) {
      throw new Error(controller.signal.aborted ? 'request timed out' : 'network error');
    }
    if (!response.ok) throw new HttpError(response.status, await reasonOf(response));
    try {
      return await response.json();
    } catch {
      throw new Error(`${path}: the answer is not JSON`);
    }
  } finally {
    clearTimeout(timer);
  }
}

/**
 * Why a stream endpoint (SSE, WebSocket) refused a connection the browser will not explain:
 * repeats the request as a plain GET and returns "HTTP <status>: <reason>" when it fails,
 * or null when it is accepted (the probe is then closed at once) or cannot be made.
 * `ignore` lists statuses that say nothing useful (a WebSocket endpoint answers a plain GET
 * with 400/426 "upgrade required" even when the token is fine).
 */
export async function probe(url, { accept = '*/*', ignore = [], timeoutMs = 5000 } = {}) {
  const controller = new AbortController();
  const timer = setTimeout(() => controller.abort(), timeoutMs);
  try {
    const response = await fetch(url, {
      headers: { Accept: accept },
      cache: 'no-store',
      signal: controller.signal,
    });
    if (response.ok || ignore.includes(response.status)) return null;
    return new HttpError(response.status, await reasonOf(response)).message;
  } catch {
    return null;
  } finally {
    clearTimeout(timer);
    controller.abort();
  }
}

/**
 * Sets a status element: `state` goes to `data-state` (connecting, connected, disconnected,
 * error), `text` (default: the state) to its text.
 */
export function setStatus(element, state, text = state) {
  element.dataset.state = state;
  element.textContent = text;
}

/**
 * A new element. `attrs`: `text` sets textContent, `class` the class list, anything else is
 * set as an attribute (skipped when undefined, null or false). `children`: nodes or strings
 * (added as text).
 */
export function el(tag, attrs = {}, ...children) {
  const element = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (name === 'text') element.textContent = String(value);
    else if (name === 'class') element.className = value;
    else element.setAttribute(name, value === true ? '' : String(value));
  }
  for (const child of children) {
    if (child === undefined || child === null) continue;
    element.append(typeof child === 'string' ? document.createTextNode(child) : child);
  }
  return element;
}

const DASH = '–';

/**
 * A number for display: integers with thousands separators, fractions rounded to a few
 * digits (3 below 1, 2 below 100, else 1), en dash for anything that is not a finite number.
 */
export function formatNumber(value) {
  if (typeof value !== 'number' || !Number.isFinite(value)) return DASH;
  if (Number.isInteger(value)) return value.toLocaleString('en-US');
  const magnitude = Math.abs(value);
  const digits = magnitude >= 100 ? 1 : magnitude >= 1 ? 2 : 3;
  return value.toLocaleString('en-US', { maximumFractionDigits: digits });
}

/** A clock time (HH:MM:SS, local) for milliseconds since the epoch; en dash if invalid. */
export function formatTime(ms) {
  if (typeof ms !== 'number' || !Number.isFinite(ms)) return DASH;
  const date = new Date(ms);
  const pad = (n) => String(n).padStart(2, '0');
  return `${pad(date.getHours())}:${pad(date.getMinutes())}:${pad(date.getSeconds())}`;
}

/**
 * Writes a number into a cell: formatted text, the raw value in `data-value` (empty when
 * there is none) and `data-empty` when there is none.
 */
export function setNumber(element, value, format = formatNumber) {
  const present = typeof value === 'number' && Number.isFinite(value);
  const text = present ? format(value) : DASH;
  if (element.textContent !== text) {
    const updating = element.dataset.value !== undefined;
    element.textContent = text;
    // A short highlight on values that change (not on the first one).
    if (updating && present && typeof element.animate === 'function') {
      element.animate(
        [{ backgroundColor: 'rgba(37, 99, 235, 0.18)' }, { backgroundColor: 'rgba(37, 99, 235, 0)' }],
        { duration: 700, easing: 'ease-out' },
      );
    }
  }
  element.dataset.value = present ? String(value) : '';
  element.toggleAttribute('data-empty', !present);
}

carryToken(tokenFromUrl());
