// Chat: joins `chat:<room>` (moderated messages) and `chat:notice:<room>` (moderation
// notices) over the gateway's WebSocket, and publishes what the user writes on
// `chat:in:<room>` as {"user_id": …, "message": …}, the format chat-moderator expects.
//
// Element contract (for browser tests):
//
//   [data-testid="join-form"]  the join form; [data-testid="room"] (default "lobby", or
//                              ?room=), [data-testid="user"] (or ?user=), [data-testid="token"]
//                              (or ?token=), [data-testid="join"] (submit),
//                              [data-testid="leave"] (enabled while joined). The room, user
//                              and token fields are disabled while joined.
//   [data-testid="room-title"] "#<room>" once joined
//   [data-testid="status"]     data-state is connecting | connected | disconnected | error;
//                              text "connecting…", "connected", "disconnected", or
//                              "disconnected: <reason> (code N)" after the socket closed
//                              (1008 policy, 1009 message too big, 1011 server error,
//                              4001 token expired; the server's close reason when it gives
//                              one), or "HTTP <status>: <reason>" when the gateway refused
//                              the upgrade (e.g. "HTTP 401: invalid token"). After an
//                              unexpected drop of an open connection (1001, 1006, 1011–1014)
//                              it reconnects by itself ("…, reconnecting in N s").
//   [data-testid="messages"]   list of messages received on chat:<room>, oldest first (the
//                              last 500); each li[data-testid="message"] has
//                                data-user="<user_id>", data-moderated="true|false",
//                                class "mine" when sent under this page's user id,
//                                [data-field="user"]  the user id,
//                                [data-field="text"]  the (masked) message text,
//                                [data-field="time"]  HH:MM:SS of `ts` (datetime: ISO),
//                                [data-testid="moderated"]  marker, only when moderated;
//                              a payload that is not a moderator message is shown as
//                              li[data-testid="message"][data-raw] with its text in
//                              [data-field="text"] and no data-user.
//   [data-testid="feedback"]   empty (and hidden) unless there is something to say; its
//                              data-kind says what:
//                                muted     "You are muted in this room"
//                                too_long  "Message too long (312 > 280 characters)"
//                                notice    "Message rejected: <reason>" (other notice reasons)
//                                error     "Not sent: <error>" for an error frame answering
//                                          one of this page's publishes (the text goes back
//                                          into the input if it is empty), else
//                                          "Error: <error>"
//                                dropped   "N messages were missed (connection too slow)"
//                                invalid   a join form problem
//                              Only notices whose user_id is this page's user id are shown.
//                              Sending a message clears it.
//   [data-testid="input"], [data-testid="send"]  enabled only while connected; Enter sends.
//                              Each publish carries "id": 1, 2, 3, … (per page).

import { carryToken, el, formatTime, paramFromUrl, probe, setStatus, tokenFromUrl, withParams } from './common.js';

const MAX_MESSAGES = 500;
const RETRY_CODES = new Set([1001, 1006, 1011, 1012, 1013, 1014]);
const CLOSE_REASONS = {
  1000: 'closed',
  1001: 'server going away',
  1006: 'connection lost',
  1008: 'policy violation',
  1009: 'message too big',
  1011: 'server error',
  1012: 'server restarting',
  1013: 'try again later',
  4001: 'token expired',
};

const $ = (id) => document.getElementById(id);
const joinForm = $('join-form');
const joinFields = $('join-fields');
const roomInput = $('room');
const userInput = $('user');
const tokenInput = $('token');
const leaveButton = $('leave');
const roomTitle = $('room-title');
const statusEl = $('status');
const messagesEl = $('messages');
const feedbackEl = $('feedback');
const composer = $('composer');
const input = $('input');
const sendButton = $('send');

// The joined room: { room, user, token, opened (connected at least once), socket, retry }.
let membership = null;
let nextId = 1;
const pending = new Map(); // publish id -> text, until the gateway answers ok or error

// ---------------------------------------------------------------- feedback

function showFeedback(kind, text) {
  feedbackEl.dataset.kind = kind;
  feedbackEl.textContent = text;
}

function clearFeedback() {
  delete feedbackEl.dataset.kind;
  feedbackEl.textContent = '';
}

// ---------------------------------------------------------------- messages

function atBottom() {
  return messagesEl.scrollHeight - messagesEl.scrollTop - messagesEl.clientHeight < 40;
}

function appendMessage(item) {
  const follow = atBottom();
  messagesEl.append(item);
  while (messagesEl.childElementCount > MAX_MESSAGES) messagesEl.firstElementChild.remove();
  if (follow) messagesEl.scrollTop = messagesEl.scrollHeight;
}

function showMessage(payload) {
  let message = null;
  try {
    message = JSON.parse(payload);
  } catch {
    message = null;
  }
  const userId =
    message && (typeof message.user_id === 'string' || typeof message.user_id === 'number')
      ? String(message.user_id)
      : null;
  if (!message || typeof message !== 'object' || userId === null || typeof message.message !== 'string') {
    // Not a moderator message: show it as it came, marked.
    appendMessage(
      el(
        'li',
        { class: 'message raw', 'data-testid': 'message', 'data-raw': true },
        el('div', { class: 'line' }, el('span', { class: 'who', text: '(unformatted)' })),
        el('p', { class: 'text', 'data-field': 'text', text: payload }),
      ),
    );
    return;
  }
  const moderated = message.moderated === true;
  const ts = typeof message.ts === 'number' && Number.isFinite(message.ts) ? message.ts : Date.now();
  const line = el(
    'div',
    { class: 'line' },
    el('span', { class: 'who', 'data-field': 'user', text: userId }),
    el('time', { 'data-field': 'time', datetime: new Date(ts).toISOString(), text: formatTime(ts) }),
  );
  if (moderated) {
    line.append(
      el('span', {
        class: 'marker',
        'data-testid': 'moderated',
        title: 'The moderator masked words in this message',
        text: 'moderated',
      }),
    );
  }
  appendMessage(
    el(
      'li',
      {
        class: membership && userId === membership.user ? 'message mine' : 'message',
        'data-testid': 'message',
        'data-user': userId,
        'data-moderated': String(moderated),
      },
      line,
      el('p', { class: 'text', 'data-field': 'text', text: message.message }),
    ),
  );
}

function showNotice(payload) {
  let notice;
  try {
    notice = JSON.parse(payload);
  } catch {
    return;
  }
  if (!notice || typeof notice !== 'object' || !membership) return;
  if (String(notice.user_id) !== membership.user) return;
  if (typeof notice.room === 'string' && notice.room !== membership.room) return;
  if (notice.reason === 'muted') {
    showFeedback('muted', 'You are muted in this room');
  } else if (notice.reason === 'too_long') {
    const length = Number.isFinite(notice.length) ? notice.length : '?';
    const limit = Number.isFinite(notice.limit) ? notice.limit : '?';
    showFeedback('too_long', `Message too long (${length} > ${limit} characters)`);
  } else {
    showFeedback('notice', `Message rejected: ${String(notice.reason ?? 'unknown reason')}`);
  }
}

// ---------------------------------------------------------------- connection

function setComposer(enabled) {
  input.disabled = !enabled;
  sendButton.disabled = !enabled;
}

function setJoined(joined) {
  joinFields.disabled = joined;
  leaveButton.disabled = !joined;
}

function wsUrl(current) {
  const url = new URL(
    withParams('ws', [
      ['channel', `chat:${current.room}`],
      ['channel', `chat:notice:${current.room}`],
      ['token', current.token],
    ]),
    window.location.href,
  );
  const http = url.href;
  url.protocol = url.protocol === 'https:' ? 'wss:' : 'ws:';
  return { ws: url.href, http };
}

function closeText(event) {
  const reason = event.reason || CLOSE_REASONS[event.code] || 'closed';
  return `disconnected: ${reason} (code ${event.code})`;
}

function endMembership(current, state, text) {
  if (membership !== current) return;
  clearTimeout(current.retry);
  membership = null;
  setStatus(statusEl, state, text);
  setComposer(false);
  setJoined(false);
}

function scheduleReconnect(current, text) {
  current.delay = Math.min(30000, current.delay ? current.delay * 2 : 1000);
  setStatus(statusEl, 'disconnected', `${text}, reconnecting in ${Math.round(current.delay / 1000)} s`);
  current.retry = setTimeout(() => {
    if (membership === current) open(current);
  }, current.delay);
}

function open(current) {
  const urls = wsUrl(current);
  setStatus(statusEl, 'connecting', 'connecting…');
  let socket;
  try {
    socket = new WebSocket(urls.ws);
  } catch (error) {
    endMembership(current, 'error', `cannot connect: ${error.message}`);
    return;
  }
  current.socket = socket;
  let opened = false;

  socket.addEventListener('open', () => {
    if (membership !== current || current.socket !== socket) return;
    opened = true;
    current.opened = true;
    current.delay = 0;
    setStatus(statusEl, 'connected');
    setComposer(true);
    input.focus();
  });

  socket.addEventListener('message', (event) => {
    if (membership !== current || current.socket !== socket) return;
    onFrame(current, event.data);
  });

  socket.addEventListener('close', (event) => {
    if (membership !== current || current.socket !== socket) return;
    current.socket = null;
    setComposer(false);
    pending.clear();
    if (opened) {
      if (RETRY_CODES.has(event.code)) scheduleReconnect(current, closeText(event));
      else endMembership(current, event.code === 1000 ? 'disconnected' : 'error', closeText(event));
      return;
    }
    // Never opened: the browser does not say why; a plain request shows a refusal's status.
    setStatus(statusEl, 'disconnected');
    probe(urls.http, { ignore: [400, 405, 426] }).then((reason) => {
      if (membership !== current) return;
      const refused = reason && /^HTTP 40[13]\b/.test(reason);
      if (current.opened && !refused) {
        // It worked before: the gateway is probably restarting.
        scheduleReconnect(current, reason ?? closeText(event));
      } else {
        endMembership(current, 'error', reason ?? `disconnected: could not connect (code ${event.code})`);
      }
    });
  });
}

function onFrame(current, data) {
  let frame;
  try {
    frame = JSON.parse(data);
  } catch {
    return;
  }
  if (!frame || typeof frame !== 'object') return;
  switch (frame.type) {
    case 'message': {
      const payload = typeof frame.payload === 'string' ? frame.payload : '';
      if (frame.channel === `chat:${current.room}`) showMessage(payload);
      else if (frame.channel === `chat:notice:${current.room}`) showNotice(payload);
      break;
    }
    case 'ok':
      pending.delete(frame.request);
      break;
    case 'error': {
      const text = typeof frame.error === 'string' && frame.error ? frame.error : 'request refused';
      if (pending.has(frame.request)) {
        const unsent = pending.get(frame.request);
        pending.delete(frame.request);
        if (!input.value) input.value = unsent;
        showFeedback('error', `Not sent: ${text}`);
      } else {
        showFeedback('error', `Error: ${text}`);
      }
      break;
    }
    case 'dropped': {
      const n = typeof frame.dropped === 'number' ? frame.dropped : '?';
      showFeedback('dropped', `${n} messages were missed (connection too slow)`);
      break;
    }
    default:
      break;
  }
}

function leave() {
  const current = membership;
  if (!current) return;
  membership = null;
  clearTimeout(current.retry);
  if (current.socket) current.socket.close(1000, 'left');
  pending.clear();
  setStatus(statusEl, 'disconnected');
  setComposer(false);
  setJoined(false);
}

// ---------------------------------------------------------------- forms

joinForm.addEventListener('submit', (event) => {
  event.preventDefault();
  if (membership) return;
  const room = roomInput.value.trim();
  const user = userInput.value.trim();
  const token = tokenInput.value.trim();
  if (!room || /[:*?[\]\\]/.test(room)) {
    showFeedback('invalid', 'Room names must not be empty or contain : * ? [ ] \\');
    return;
  }
  if (!user) {
    showFeedback('invalid', 'Enter a user id');
    return;
  }
  if (!token) {
    showFeedback('invalid', 'Enter a token');
    return;
  }
  clearFeedback();
  if (roomTitle.textContent !== `#${room}`) messagesEl.replaceChildren();
  roomTitle.textContent = `#${room}`;
  carryToken(token);
  membership = { room, user, token, opened: false, socket: null, retry: null, delay: 0 };
  setJoined(true);
  open(membership);
});

leaveButton.addEventListener('click', leave);

composer.addEventListener('submit', (event) => {
  event.preventDefault();
  const current = membership;
  const socket = current?.socket;
  if (!socket || socket.readyState !== WebSocket.OPEN) return;
  const text = input.value;
  if (!text.trim()) return;
  const id = nextId;
  nextId += 1;
  socket.send(
    JSON.stringify({
      type: 'publish',
      channel: `chat:in:${current.room}`,
      payload: JSON.stringify({ user_id: current.user, message: text }),
      id,
    }),
  );
  pending.set(id, text);
  if (pending.size > 100) pending.delete(pending.keys().next().value);
  input.value = '';
  clearFeedback();
  input.focus();
});

roomInput.value = paramFromUrl('room').trim() || 'lobby';
userInput.value = paramFromUrl('user').trim();
tokenInput.value = tokenFromUrl();
setStatus(statusEl, 'disconnected');
setComposer(false);
setJoined(false);
