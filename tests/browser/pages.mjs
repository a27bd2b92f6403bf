// End-to-end checks of the gateway's chat and dashboard pages in headless Chromium.
//
// usage: BROWSER_TOOLS=<folder install.sh printed> node pages.mjs \
//          --url http://127.0.0.1:PORT/ --chat-token T --dashboard-token T \
//          --redis-port N --artifacts /abs/folder [--redis-host 127.0.0.1] \
//          [--chromium /usr/bin/chromium] [--timeout-ms 15000] [--deadline-ms 180000] \
//          [--muted troll] [--max-length 40] [--banned spam]
//
// The host behind --url must run chat-moderator (publish grant `chat:*`; muting --muted,
// max_length --max-length, banning --banned) and metrics-rollup (publish grant
// `dashboard:summary`, interval_ms = 0), and have nothing else publishing on `chat:lobby` or
// `metrics:*`. The chat token reads `chat:*` and writes `chat:in:*`; the dashboard token reads
// `dashboard:*` and `switchyard:plugins`. redis-cli must be on PATH.
//
// Prints one line per check ("ok   <check> (<ms> ms)"); on the first failure prints
// "FAIL <check>: <why>" with what every page showed (state, console), saves failure-<page>.png
// screenshots, and exits 1. Every wait has a deadline (--timeout-ms), and the whole run one
// more (--deadline-ms); nothing sleeps.
//
// Screenshots written to --artifacts: chat-alice.png, chat-bob.png, chat-troll.png,
// dashboard.png.

import { execFile } from 'node:child_process';
import fs from 'node:fs';
import { createRequire } from 'node:module';
import path from 'node:path';
import { parseArgs, promisify } from 'node:util';

const { values: opts } = parseArgs({
  options: {
    url: { type: 'string' },
    'chat-token': { type: 'string' },
    'dashboard-token': { type: 'string' },
    'redis-host': { type: 'string', default: '127.0.0.1' },
    'redis-port': { type: 'string' },
    artifacts: { type: 'string' },
    chromium: { type: 'string', default: '/usr/bin/chromium' },
    'timeout-ms': { type: 'string', default: '15000' },
    'deadline-ms': { type: 'string', default: '180000' },
    muted: { type: 'string', default: 'troll' },
    'max-length': { type: 'string', default: '40' },
    banned: { type: 'string', default: 'spam' },
  },
  strict: true,
});

function usage(problem) {
  console.error(`pages.mjs: ${problem}`);
  process.exit(2);
}

for (const required of ['url', 'chat-token', 'dashboard-token', 'redis-port', 'artifacts']) {
  if (!opts[required]) usage(`--${required} is required`);
}
if (!process.env.BROWSER_TOOLS) usage('BROWSER_TOOLS must name the folder install.sh installed into');
if (!path.isAbsolute(opts.artifacts)) usage('--artifacts must be an absolute path');

const BASE = new URL(opts.url).href.replace(/\/?$/, '/');
const TIMEOUT = Number(opts['timeout-ms']);
const DEADLINE = Number(opts['deadline-ms']);
const MAX_LENGTH = Number(opts['max-length']);
const MUTED = opts.muted;
const BANNED = opts.banned;
const ARTIFACTS = opts.artifacts;
const ROOM = 'lobby';

// playwright-core lives in the shared tools folder, not beside this script.
const require = createRequire(path.join(process.env.BROWSER_TOOLS, 'package.json'));
const { chromium } = require('playwright-core');

// ---------------------------------------------------------------- checks

let currentCheck = '(setup)';

/** Runs one check and prints its line; a failure propagates to main(). */
async function check(name, body) {
  currentCheck = name;
  const started = performance.now();
  await body();
  console.log(`ok   ${name} (${Math.round(performance.now() - started)} ms)`);
}

class CheckFailed extends Error {}

function fail(message) {
  throw new CheckFailed(message);
}

function assert(condition, message) {
  if (!condition) fail(message);
}

const show = (value) => JSON.stringify(value);

/**
 * Takes snapshots with `probe` until `accept` holds for one, and returns it; fails after the
 * deadline with `what` and the last snapshot. A probe that throws (page navigating) counts as
 * not yet.
 */
async function eventually(what, probe, accept, timeout = TIMEOUT) {
  const deadline = performance.now() + timeout;
  let last;
  for (;;) {
    try {
      last = await probe();
      if (accept(last)) return last;
    } catch (error) {
      last = { probeError: String(error?.message ?? error) };
    }
    if (performance.now() >= deadline) {
      fail(`${what}: not so after ${timeout / 1000} s; last seen ${show(last)}`);
    }
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
}

// ---------------------------------------------------------------- pages

const pages = new Map(); // label -> { page, log: [lines] }

async function newPage(browser, label) {
  const context = await browser.newContext({ viewport: { width: 1100, height: 760 } });
  context.setDefaultTimeout(TIMEOUT);
  const page = await context.newPage();
  const log = [];
  page.on('console', (message) => log.push(`console.${message.type()}: ${message.text()}`));
  page.on('pageerror', (error) => log.push(`pageerror: ${error.message}`));
  page.on('requestfailed', (request) =>
    log.push(`requestfailed: ${request.url()} ${request.failure()?.errorText ?? ''}`),
  );
  pages.set(label, { page, log });
  return page;
}

async function screenshot(page, name) {
  const file = path.join(ARTIFACTS, name);
  // Value-change highlights (700 ms) are finished first, so the shot shows settled values.
  await page.screenshot({ path: file, fullPage: true, animations: 'disabled' });
  const size = fs.statSync(file).size;
  assert(size > 0, `${file} is empty`);
  return file;
}

/** Errors the pages reported: uncaught exceptions and console errors. */
function pageErrors() {
  const errors = [];
  for (const [label, { log }] of pages) {
    for (const line of log) {
      if (line.startsWith('pageerror:') || line.startsWith('console.error:')) errors.push(`${label}: ${line}`);
    }
  }
  return errors;
}

// ---------------------------------------------------------------- chat

/** What a chat page shows, as plain data. */
function chatState(page) {
  return page.evaluate(() => {
    const q = (selector, root = document) => root.querySelector(selector);
    const testid = (id) => q(`[data-testid="${id}"]`);
    const status = testid('status');
    const feedback = testid('feedback');
    // The join fields are disabled through their fieldset, which `.disabled` does not show.
    const disabled = (id) => testid(id).matches(':disabled');
    return {
      title: testid('room-title').textContent,
      status: { state: status.dataset.state, text: status.textContent },
      joined: !disabled('leave') && disabled('room') && disabled('user') && disabled('token') && disabled('join'),
      canSend: !disabled('input') && !disabled('send'),
      input: testid('input').value,
      feedback: {
        kind: feedback.dataset.kind ?? null,
        text: feedback.textContent,
        visible: feedback.getClientRects().length > 0 && feedback.offsetHeight > 0,
      },
      messages: [...testid('messages').querySelectorAll('li[data-testid="message"]')].map((li) => ({
        user: li.dataset.user ?? null,
        raw: li.hasAttribute('data-raw'),
        moderated: li.dataset.moderated ?? null,
        marker: Boolean(q('[data-testid="moderated"]', li)),
        mine: li.classList.contains('mine'),
        shownUser: q('[data-field="user"]', li)?.textContent ?? null,
        text: q('[data-field="text"]', li)?.textContent ?? null,
        time: q('[data-field="time"]', li)?.textContent ?? null,
        datetime: q('[data-field="time"]', li)?.getAttribute('datetime') ?? null,
      })),
    };
  });
}

const lines = (state) => state.messages.map((m) => `${m.user}: ${m.text}`);
const hasLine = (state, line) => lines(state).includes(line);

/** Opens the chat page and joins the room; via the form, or with ?user= and ?token=. */
async function join(browser, user, { viaUrl = false } = {}) {
  const page = await newPage(browser, user);
  const token = opts['chat-token'];
  if (viaUrl) {
    const query = new URLSearchParams({ user, token });
    await page.goto(`${BASE}chat.html?${query}`);
  } else {
    await page.goto(`${BASE}chat.html`);
    await page.getByTestId('user').fill(user);
    await page.getByTestId('token').fill(token);
  }
  assert((await page.getByTestId('room').inputValue()) === ROOM, `the room field does not default to ${ROOM}`);
  assert((await page.getByTestId('user').inputValue()) === user, `the user field does not hold ${user}`);
  await page.getByTestId('join').click();
  await eventually(
    `${user}'s page joins #${ROOM}`,
    () => chatState(page),
    (s) => s.status.state === 'connected' && s.title === `#${ROOM}` && s.joined && s.canSend,
  );
  return page;
}

async function send(page, text) {
  const input = page.getByTestId('input');
  await input.fill(text);
  await input.press('Enter');
}

/** Waits until every page in `who` shows `line` ("user: text") and returns their states. */
async function seenBy(who, line, what) {
  const states = {};
  for (const [label, page] of Object.entries(who)) {
    states[label] = await eventually(`${label} sees ${what}`, () => chatState(page), (s) => hasLine(s, line));
  }
  return states;
}

function messageOf(state, line) {
  return state.messages.find((m) => `${m.user}: ${m.text}` === line);
}

async function chat(browser) {
  const greeting = 'hi, bob here';
  const hello = 'hello bob';
  const spam = `this is ${BANNED}, buy now`;
  const masked = `this is ${'*'.repeat(BANNED.length)}, buy now`;
  const trollText = 'everybody look at my channel';
  const long = 'this message goes on and on and on, well past the limit of the room';
  const bye = 'bye for now';
  assert(long.length > MAX_LENGTH, 'the long message is not longer than --max-length');
  assert(trollText.length <= MAX_LENGTH && spam.length <= MAX_LENGTH, 'a test message is too long');

  let bob;
  let alice;
  let troll;

  // Bob joins first and sees his own message: his subscription is then in place (the gateway
  // reads a socket's frames only once it has subscribed it), so he gets everything after.
  await check('chat: bob joins #lobby (user and token from the URL)', async () => {
    bob = await join(browser, 'bob', { viaUrl: true });
    await send(bob, greeting);
    const { bob: state } = await seenBy({ bob }, `bob: ${greeting}`, 'his own greeting');
    const mine = messageOf(state, `bob: ${greeting}`);
    assert(mine.mine && mine.moderated === 'false' && !mine.marker, `bob's greeting: ${show(mine)}`);
    assert(/^\d\d:\d\d:\d\d$/.test(mine.time) && !Number.isNaN(Date.parse(mine.datetime)), `time: ${show(mine)}`);
    assert(state.input === '', 'the input was not cleared after sending');
  });

  await check('chat: alice joins #lobby (user and token typed into the form)', async () => {
    alice = await join(browser, 'alice');
  });

  await check('chat: alice says "hello bob", both see it', async () => {
    await send(alice, hello);
    const states = await seenBy({ alice, bob }, `alice: ${hello}`, "alice's hello");
    const atAlice = messageOf(states.alice, `alice: ${hello}`);
    const atBob = messageOf(states.bob, `alice: ${hello}`);
    assert(atAlice.mine && !atBob.mine, `"mine" marks the sender's own messages only: ${show([atAlice, atBob])}`);
    for (const m of [atAlice, atBob]) {
      assert(m.moderated === 'false' && !m.marker && m.shownUser === 'alice', `not moderated: ${show(m)}`);
    }
  });

  await check(`chat: bob's "${BANNED}" is masked and marked moderated for both`, async () => {
    await send(bob, spam);
    const states = await seenBy({ alice, bob }, `bob: ${masked}`, "bob's masked message");
    for (const [label, state] of Object.entries(states)) {
      const m = messageOf(state, `bob: ${masked}`);
      assert(m.moderated === 'true' && m.marker, `${label}: no moderated marker on ${show(m)}`);
      assert(!lines(state).some((line) => line.includes(spam)), `${label} shows the unmasked text`);
    }
  });

  await check(`chat: muted user ${MUTED} is told so`, async () => {
    troll = await join(browser, MUTED);
    await send(troll, trollText);
    await eventually(
      `${MUTED} sees the muted feedback`,
      () => chatState(troll),
      (s) => s.feedback.kind === 'muted' && s.feedback.text === 'You are muted in this room' && s.feedback.visible,
    );
  });

  await check('chat: an over-long message gets the too-long feedback', async () => {
    await send(alice, long);
    const expected = `Message too long (${long.length} > ${MAX_LENGTH} characters)`;
    await eventually(
      'alice sees the too-long feedback',
      () => chatState(alice),
      (s) => s.feedback.kind === 'too_long' && s.feedback.text === expected && s.feedback.visible,
    );
  });

  // Redis delivers one connection's messages in order, and the moderator handles its input in
  // order: once everyone has bob's "bye" (sent after both drops were answered), whatever the
  // muted or over-long message could have produced would have arrived before it.
  await check('chat: nobody received the muted or the over-long message', async () => {
    await send(bob, bye);
    const states = await seenBy({ alice, bob, [MUTED]: troll }, `bob: ${bye}`, "bob's bye");
    const expected = {
      bob: [`bob: ${greeting}`, `alice: ${hello}`, `bob: ${masked}`, `bob: ${bye}`],
      alice: [`alice: ${hello}`, `bob: ${masked}`, `bob: ${bye}`],
      [MUTED]: [`bob: ${bye}`],
    };
    for (const [label, state] of Object.entries(states)) {
      assert(
        show(lines(state)) === show(expected[label]),
        `${label}'s messages are ${show(lines(state))}, expected ${show(expected[label])}`,
      );
      assert(!state.messages.some((m) => m.raw), `${label} shows an unformatted message`);
    }
    // Notices are for their user only, and sending clears one's own.
    assert(states.bob.feedback.kind === null && states.bob.feedback.text === '', `bob's feedback: ${show(states.bob.feedback)}`);
    assert(!states.bob.feedback.visible, 'bob sees an empty feedback box');
    assert(states[MUTED].feedback.kind === 'muted', `${MUTED}'s feedback: ${show(states[MUTED].feedback)}`);
    assert(states.alice.feedback.kind === 'too_long', `alice's feedback: ${show(states.alice.feedback)}`);
  });

  await check('chat: screenshots chat-alice.png, chat-bob.png, chat-troll.png', async () => {
    await screenshot(alice, 'chat-alice.png');
    await screenshot(bob, 'chat-bob.png');
    await screenshot(troll, 'chat-troll.png');
  });

  return 6; // messages chat-moderator handled: greeting, hello, spam, muted, too long, bye
}

// ---------------------------------------------------------------- dashboard

/** What the dashboard shows, as plain data. */
function dashboardState(page) {
  return page.evaluate(() => {
    const testid = (id) => document.querySelector(`[data-testid="${id}"]`);
    const number = (cell) =>
      cell ? { text: cell.textContent, value: cell.dataset.value ?? null, empty: cell.hasAttribute('data-empty') } : null;
    const fields = (root) =>
      Object.fromEntries([...root.querySelectorAll('[data-field]')].map((cell) => [cell.dataset.field, number(cell)]));
    const status = (element) => ({ state: element.dataset.state, text: element.textContent });
    return {
      status: status(testid('status')),
      pluginsStatus: status(testid('plugins-status')),
      plugins: Object.fromEntries(
        [...testid('plugins').querySelectorAll('tr[data-plugin]')].map((row) => [
          row.dataset.plugin,
          { ...fields(row), rowState: row.dataset.state ?? null },
        ]),
      ),
      sources: Object.fromEntries(
        [...testid('summary').querySelectorAll('article[data-source]')].map((card) => [card.dataset.source, fields(card)]),
      ),
      received: testid('summary-received').dataset.value,
      chartPoints: testid('chart').dataset.points,
      legend: [...testid('chart-legend').querySelectorAll('li[data-series]')].map((li) => li.dataset.series),
    };
  });
}

const execFileAsync = promisify(execFile);

/** PUBLISH with redis-cli, as an operator would; returns how many subscribers got it. */
async function publishMetrics(source, sample) {
  const args = ['-h', opts['redis-host'], '-p', opts['redis-port'], 'PUBLISH', `metrics:${source}`, JSON.stringify(sample)];
  let stdout;
  try {
    ({ stdout } = await execFileAsync('redis-cli', args, { timeout: TIMEOUT }));
  } catch (error) {
    fail(`redis-cli ${args.join(' ')} failed: ${error.message}`);
  }
  const receivers = Number.parseInt(stdout.trim(), 10);
  assert(receivers >= 1, `redis-cli PUBLISH metrics:${source}: no subscriber got it (answer ${show(stdout)})`);
}

const close = (a, b) => Math.abs(a - b) < 1e-9;

/** Whether a source card shows these raw numbers (data-value). */
function showsNumbers(card, expected) {
  if (!card) return false;
  return Object.entries(expected).every(([field, value]) => {
    const cell = card[field];
    if (!cell) return false;
    if (value === null) return cell.empty && cell.value === '' && cell.text === '–';
    return cell.value !== '' && close(Number(cell.value), value);
  });
}

async function dashboard(browser, chatHandled) {
  let page;
  let first;

  await check('dashboard: opens with the token from the URL, feed and plugins connected', async () => {
    page = await newPage(browser, 'dashboard');
    await page.goto(`${BASE}dashboard.html?token=${encodeURIComponent(opts['dashboard-token'])}`);
    // The summary feed opens only once the gateway has subscribed it (SSE answers after).
    const state = await eventually(
      'the dashboard connects',
      () => dashboardState(page),
      (s) => s.status.state === 'connected' && s.pluginsStatus.state === 'connected',
    );
    assert(/^updated \d\d:\d\d:\d\d$/.test(state.pluginsStatus.text), `plugins status: ${show(state.pluginsStatus)}`);
    assert(Object.keys(state.sources).length === 0 && state.received === '0', `a summary before any metrics: ${show(state)}`);
  });

  await check('dashboard: plugins table lists chat-moderator and metrics-rollup as running', async () => {
    const state = await eventually(
      'both plugins are listed',
      () => dashboardState(page),
      (s) => s.plugins['chat-moderator'] && s.plugins['metrics-rollup'],
    );
    for (const name of ['chat-moderator', 'metrics-rollup']) {
      const row = state.plugins[name];
      assert(row.rowState === 'running', `${name}'s data-state is ${show(row.rowState)}`);
      assert(row.name.text === name && row.state.text === 'running', `${name}'s row: ${show(row)}`);
      assert(row.handled.value !== '' && row.failed.value === '0', `${name}'s counters: ${show(row)}`);
    }
  });

  await check('dashboard: redis-cli PUBLISH metrics:web-1 shows up on the web-1 card', async () => {
    await publishMetrics('web-1', { cpu: 0.5, memory: 100, requests: 10 });
    const state = await eventually(
      'the web-1 card shows the first sample',
      () => dashboardState(page),
      (s) =>
        showsNumbers(s.sources['web-1'], {
          count: 1,
          'cpu-mean': 0.5,
          'cpu-max': 0.5,
          'cpu-samples': 1,
          'memory-mean': 100,
          'requests-mean': 10,
        }),
    );
    first = state.sources['web-1'];
    assert(first.name.text === 'web-1', `card name: ${show(first.name)}`);
    assert(first.count.text === '1' && first['cpu-mean'].text === '0.5', `shown: ${show(first)}`);
    assert(state.received === '1', `summaries received: ${state.received}`);
  });

  await check("dashboard: a second PUBLISH changes web-1's numbers", async () => {
    await publishMetrics('web-1', { cpu: 0.9, memory: 300, requests: 30 });
    const state = await eventually(
      'the web-1 card shows both samples',
      () => dashboardState(page),
      (s) =>
        showsNumbers(s.sources['web-1'], {
          count: 2,
          'cpu-mean': 0.7,
          'cpu-max': 0.9,
          'cpu-samples': 2,
          'memory-mean': 200,
          'memory-max': 300,
          'requests-mean': 20,
          'requests-max': 30,
        }),
    );
    const second = state.sources['web-1'];
    for (const field of ['count', 'cpu-mean', 'cpu-max', 'memory-mean', 'memory-max', 'requests-mean', 'requests-max']) {
      assert(second[field].text !== first[field].text, `${field} still reads ${show(second[field].text)}`);
    }
    assert(state.received === '2', `summaries received: ${state.received}`);
  });

  await check('dashboard: a second source gets its own card, with "–" for metrics it never sent', async () => {
    await publishMetrics('web-2', { requests: 5 });
    const state = await eventually(
      'the web-2 card appears',
      () => dashboardState(page),
      (s) =>
        showsNumbers(s.sources['web-2'], { count: 1, 'requests-mean': 5, 'cpu-mean': null, 'memory-max': null }) &&
        showsNumbers(s.sources['web-1'], { count: 2 }),
    );
    assert(show(Object.keys(state.sources)) === show(['web-1', 'web-2']), `cards: ${show(Object.keys(state.sources))}`);
    const chart = await eventually(
      'the chart holds the three summaries',
      () => dashboardState(page),
      (s) => s.chartPoints === '3',
    );
    assert(show(chart.legend) === show(['web-1']), `chart legend (cpu-mean): ${show(chart.legend)}`);
  });

  await check('dashboard: the plugins table counts what the plugins handled', async () => {
    // The table is polled every 2 s.
    await eventually(
      `chat-moderator handled ${chatHandled} and metrics-rollup 3, none failed`,
      () => dashboardState(page),
      (s) =>
        s.plugins['chat-moderator']?.handled.value === String(chatHandled) &&
        s.plugins['metrics-rollup']?.handled.value === '3' &&
        s.plugins['chat-moderator'].failed.value === '0' &&
        s.plugins['metrics-rollup'].failed.value === '0',
    );
  });

  await check('dashboard: screenshot dashboard.png', async () => {
    await screenshot(page, 'dashboard.png');
  });
}

// ---------------------------------------------------------------- main

async function diagnose() {
  for (const [label, { page, log }] of pages) {
    console.error(`--- page ${label}: ${page.url()}`);
    try {
      const state = label === 'dashboard' ? await dashboardState(page) : await chatState(page);
      console.error(`state: ${show(state)}`);
    } catch (error) {
      console.error(`state: unavailable (${error.message})`);
    }
    for (const line of log) console.error(line);
    try {
      const file = path.join(ARTIFACTS, `failure-${label}.png`);
      await page.screenshot({ path: file, fullPage: true });
      console.error(`screenshot: ${file}`);
    } catch (error) {
      console.error(`screenshot: failed (${error.message})`);
    }
  }
}

async function main() {
  // Exiting closes the browser too (playwright-core kills what it launched on exit).
  setTimeout(() => {
    console.error(`FAIL ${currentCheck}: the run took longer than ${DEADLINE / 1000} s`);
    process.exit(1);
  }, DEADLINE).unref();
  fs.mkdirSync(ARTIFACTS, { recursive: true });
  // Screenshots are overwritten (another run may be reading them); only stale failure shots go.
  for (const name of fs.readdirSync(ARTIFACTS)) {
    if (/^failure-.*\.png$/.test(name)) fs.rmSync(path.join(ARTIFACTS, name), { force: true });
  }
  let browser;
  try {
    await check(`launch ${opts.chromium} (headless)`, async () => {
      browser = await chromium.launch({
        executablePath: opts.chromium,
        args: ['--no-sandbox'],
        timeout: 2 * TIMEOUT,
      });
    });
    const handled = await chat(browser);
    await dashboard(browser, handled);
    await check('no JavaScript errors on any page', async () => {
      const errors = pageErrors();
      assert(errors.length === 0, errors.join('\n'));
    });
  } catch (error) {
    const why = error instanceof CheckFailed ? error.message : (error?.stack ?? String(error));
    console.error(`FAIL ${currentCheck}: ${why}`);
    if (browser) await diagnose();
    process.exitCode = 1;
  } finally {
    if (browser) await browser.close().catch(() => {});
  }
}

await main();
// Nothing should be left running, but a stray handle must not keep the test waiting.
process.exit(process.exitCode ?? 0);
