// Dashboard: the plugins table (polled from api/plugins every 2 s) and the live
// `dashboard:summary` feed (Server-Sent Events from sse?channel=dashboard:summary).
//
// Element contract (for browser tests):
//
//   [data-testid="token"]             token input (filled from ?token=)
//   [data-testid="connect"]           button: (re)connects both the poll and the feed
//   [data-testid="status"]            state of the summary feed; data-state is one of
//                                     connecting | connected | disconnected | error, and the
//                                     text is "connecting…", "connected", "disconnected…", or
//                                     for a refused stream "HTTP <status>: <server's reason>"
//                                     (e.g. "HTTP 401: invalid token")
//   [data-testid="plugins-status"]    state of the plugins poll, same data-state values; text
//                                     "updated HH:MM:SS" when the last poll worked, else
//                                     "HTTP <status>: <reason>" / "network error" / …
//   [data-testid="plugins"]           tbody of the plugins table; one
//     tr[data-plugin="<name>"][data-state="running|parked|failed"] per plugin, in name order,
//     with cells td[data-field=…]:
//       name, state, version (version.version, "–" when none), handled, failed, shed,
//       queue (queue_depth), rate (messages finished, handled + failed, per second between
//       the last two polls; "–" until there are two polls, or when the counters went down)
//     Number cells carry the raw number in data-value ("" when none, plus data-empty).
//     With no plugin (or before the first poll) the tbody holds one tr.empty without
//     data-plugin.
//   [data-testid="summary"]           container of the latest summary; one
//     article[data-source="<source>"] per source in the summary (sources missing from a
//     later summary are removed), holding:
//       [data-field="name"]            the source name
//       [data-field="count"]           messages counted for that source
//       [data-field="<metric>-mean"]   for metric in cpu, memory, requests (always present);
//       [data-field="<metric>-max"]    "–" with data-empty and data-value="" when the source
//       [data-field="<metric>-samples"] has not sent that metric; any further metric object
//                                      ({mean, max, samples}) a summary carries gets its own
//                                      row with the same three fields
//     Number fields carry the raw number in data-value.
//   [data-testid="summary-at"]        the last summary's `at` as HH:MM:SS (data-value: ms)
//   [data-testid="summary-received"]  summaries received since the page loaded
//   [data-testid="dropped"]           events the gateway reported as missed (event: dropped)
//   [data-testid="chart-series"]      select of the charted series (values: cpu-mean, cpu-max,
//                                     memory-mean, memory-max, requests-mean, requests-max,
//                                     requests-total, count-total)
//   [data-testid="chart"]             the canvas; data-points = summaries in the chart (≤ 60),
//                                     data-series = the charted series
//   [data-testid="chart-legend"]      one li[data-series="<line>"] per line drawn (a source
//                                     name, or "total"), with the latest value in .value

import {
  carryToken,
  el,
  fetchJson,
  formatNumber,
  formatTime,
  probe,
  setNumber,
  setStatus,
  tokenFromUrl,
  withParams,
} from './common.js';

const POLL_MS = 2000;
const CHANNEL = 'dashboard:summary';
const HISTORY = 60;
const METRICS = ['cpu', 'memory', 'requests'];
const METRIC_LABELS = { cpu: 'CPU', memory: 'Memory', requests: 'Requests' };
const PALETTE = ['#2358d8', '#d9480f', '#17803d', '#9c36b5', '#0b7285', '#c2255c', '#e67700', '#495057'];

const $ = (id) => document.getElementById(id);
const tokenInput = $('token');
const statusEl = $('status');
const pluginsStatusEl = $('plugins-status');
const pluginsBody = $('plugins');
const summaryEl = $('summary');
const summaryAtEl = $('summary-at');
const summaryReceivedEl = $('summary-received');
const droppedEl = $('dropped');
const seriesSelect = $('chart-series');
const canvas = $('chart');
const legendEl = $('chart-legend');

let token = tokenFromUrl();
// Bumped on every (re)connect; callbacks of an older generation do nothing.
let generation = 0;

// ---------------------------------------------------------------- plugins table

let pollTimer = null;
let previousTotals = new Map(); // plugin name -> { finished, at }
const pluginRows = new Map(); // plugin name -> tr

function pluginsOf(answer) {
  // The gateway gives the admin report's plugin array; accept the admin endpoint's whole
  // object ({"plugins": [...], ...}) as well.
  if (Array.isArray(answer)) return answer;
  if (answer && Array.isArray(answer.plugins)) return answer.plugins;
  throw new Error('api/plugins: unexpected answer');
}

function showPluginsPlaceholder(text) {
  pluginRows.clear();
  pluginsBody.replaceChildren(el('tr', { class: 'empty' }, el('td', { colspan: 8, text })));
}

function pluginRow(name) {
  let row = pluginRows.get(name);
  if (row) return row;
  const cell = (field, numeric) => el('td', { 'data-field': field, class: numeric ? 'num' : undefined });
  row = el(
    'tr',
    { 'data-plugin': name },
    el('td', { 'data-field': 'name', class: 'mono', text: name }),
    cell('state'),
    cell('version'),
    cell('handled', true),
    cell('failed', true),
    cell('shed', true),
    cell('queue', true),
    cell('rate', true),
  );
  pluginRows.set(name, row);
  return row;
}

function field(row, name) {
  return row.querySelector(`[data-field="${name}"]`);
}

function renderPlugins(plugins, at) {
  const seen = new Set();
  const rows = [];
  const totals = new Map();
  for (const plugin of plugins) {
    if (!plugin || typeof plugin.name !== 'string') continue;
    const name = plugin.name;
    seen.add(name);
    const row = pluginRow(name);
    const state = typeof plugin.state === 'string' ? plugin.state : 'unknown';
    const stats = plugin.stats && typeof plugin.stats === 'object' ? plugin.stats : null;
    const version = plugin.version && typeof plugin.version === 'object' ? plugin.version : null;
    row.dataset.state = state;

    // State, with why it failed or until when it is parked.
    const stateCell = field(row, 'state');
    const badge = el('span', { class: `state state-${state}`, text: state });
    const details = [];
    if (state === 'parked' && stats && typeof stats.parked_until_ms === 'number') {
      details.push(`until ${formatTime(stats.parked_until_ms)}`);
    }
    const loadError = plugin.load_error;
    if (loadError && typeof loadError === 'object') {
      details.push(`${loadError.kind ?? 'error'}: ${loadError.message ?? ''}`);
    }
    stateCell.replaceChildren(badge, ...details.map((text) => el('span', { class: 'sub', text })));

    const versionCell = field(row, 'version');
    versionCell.textContent = version && typeof version.version === 'string' ? version.version : '–';
    versionCell.title = version
      ? [version.declared_name, typeof version.hash === 'string' ? version.hash.slice(0, 16) : '']
          .filter(Boolean)
          .join(' · ')
      : '';

    setNumber(field(row, 'handled'), stats?.handled);
    const failedCell = field(row, 'failed');
    setNumber(failedCell, stats?.failed);
    failedCell.title = stats && typeof stats.last_error === 'string' ? `last error: ${stats.last_error}` : '';
    setNumber(field(row, 'shed'), stats?.shed);
    setNumber(field(row, 'queue'), typeof plugin.queue_depth === 'number' ? plugin.queue_depth : undefined);

    // Messages per second: finished messages (handled + failed) between two polls.
    let rate;
    if (stats && typeof stats.handled === 'number' && typeof stats.failed === 'number') {
      const finished = stats.handled + stats.failed;
      totals.set(name, { finished, at });
      const before = previousTotals.get(name);
      if (before && at > before.at && finished >= before.finished) {
        rate = (finished - before.finished) / ((at - before.at) / 1000);
      }
    }
    setNumber(field(row, 'rate'), rate, (value) =>
      value.toLocaleString('en-US', { maximumFractionDigits: 1 }),
    );
    rows.push(row);
  }
  previousTotals = totals;
  for (const name of [...pluginRows.keys()]) {
    if (!seen.has(name)) pluginRows.delete(name);
  }
  if (rows.length === 0) {
    showPluginsPlaceholder('No plugins.');
  } else {
    pluginsBody.replaceChildren(...rows);
  }
}

async function poll(gen) {
  const started = performance.now();
  try {
    const answer = await fetchJson('api/plugins', token);
    if (gen !== generation) return;
    renderPlugins(pluginsOf(answer), performance.now());
    setStatus(pluginsStatusEl, 'connected', `updated ${formatTime(Date.now())}`);
  } catch (error) {
    if (gen !== generation) return;
    // Rates need two consecutive answers.
    previousTotals = new Map();
    setStatus(pluginsStatusEl, 'error', error.message || String(error));
    if (pluginRows.size === 0) showPluginsPlaceholder('Could not load the plugins.');
  }
  if (gen !== generation) return;
  const elapsed = performance.now() - started;
  pollTimer = setTimeout(() => poll(gen), Math.max(0, POLL_MS - elapsed));
}

function stopPolling() {
  clearTimeout(pollTimer);
  pollTimer = null;
  previousTotals = new Map();
}

// ---------------------------------------------------------------- summary feed

let feed = null;
let retryTimer = null;
let retryDelay = 0;
let received = 0;
let dropped = 0;
const history = []; // { at, sources } of the last HISTORY summaries
const sourceCards = new Map(); // source name -> article

function closeFeed() {
  clearTimeout(retryTimer);
  retryTimer = null;
  if (feed) {
    feed.close();
    feed = null;
  }
}

function openFeed(gen) {
  closeFeed();
  const url = withParams('sse', [['channel', CHANNEL], ['token', token]]);
  // Keep an error on show while retrying; it is replaced once the stream opens.
  if (statusEl.dataset.state !== 'error') setStatus(statusEl, 'connecting', 'connecting…');
  const source = new EventSource(url);
  feed = source;

  source.addEventListener('open', () => {
    if (feed !== source) return;
    retryDelay = 0;
    setStatus(statusEl, 'connected');
  });

  source.addEventListener('message', (event) => {
    if (feed !== source) return;
    onFeedMessage(event.data);
  });

  source.addEventListener('dropped', (event) => {
    if (feed !== source) return;
    try {
      const n = JSON.parse(event.data).dropped;
      if (typeof n === 'number' && n > 0) dropped += n;
    } catch {
      return;
    }
    setNumber(droppedEl, dropped);
  });

  source.addEventListener('error', () => {
    if (feed !== source) return;
    if (source.readyState === EventSource.CONNECTING) {
      // The stream broke; the browser reconnects by itself.
      setStatus(statusEl, 'disconnected', 'disconnected, reconnecting…');
      return;
    }
    // Closed for good: the gateway refused the request (401/403/…) or is not there. The
    // browser does not say why, so ask with a plain request.
    source.close();
    feed = null;
    if (statusEl.dataset.state !== 'error') setStatus(statusEl, 'disconnected');
    probe(url, { accept: 'text/event-stream' }).then((reason) => {
      if (gen !== generation || feed !== null) return;
      if (reason) setStatus(statusEl, 'error', reason);
      else setStatus(statusEl, 'disconnected', 'disconnected, retrying…');
      // A refused token or grant will not fix itself: wait for Connect.
      if (reason && /^HTTP 40[13]\b/.test(reason)) return;
      retryDelay = Math.min(30000, retryDelay ? retryDelay * 2 : 2000);
      retryTimer = setTimeout(() => {
        if (gen === generation) openFeed(gen);
      }, retryDelay);
    });
  });
}

function onFeedMessage(data) {
  let summary;
  try {
    const frame = JSON.parse(data);
    if (frame.channel !== CHANNEL || typeof frame.payload !== 'string') return;
    summary = JSON.parse(frame.payload);
  } catch {
    console.warn('dashboard: ignored an event that is not a summary');
    return;
  }
  if (!summary || typeof summary !== 'object' || !summary.sources || typeof summary.sources !== 'object') {
    console.warn('dashboard: ignored a summary without sources');
    return;
  }
  received += 1;
  setNumber(summaryReceivedEl, received);
  renderSummary(summary);
  history.push({ at: summary.at, sources: summary.sources });
  if (history.length > HISTORY) history.splice(0, history.length - HISTORY);
  drawChart();
}

function isMetric(value) {
  return value && typeof value === 'object' && !Array.isArray(value) && ('mean' in value || 'max' in value);
}

function metricRow(card, metric) {
  let row = card.querySelector(`tr[data-metric="${CSS.escape(metric)}"]`);
  if (row) return row;
  row = el(
    'tr',
    { 'data-metric': metric },
    el('th', { scope: 'row', text: METRIC_LABELS[metric] ?? metric }),
    el('td', { class: 'num', 'data-field': `${metric}-mean` }),
    el('td', { class: 'num', 'data-field': `${metric}-max` }),
    el('td', { class: 'num', 'data-field': `${metric}-samples` }),
  );
  card.querySelector('tbody').append(row);
  return row;
}

function sourceCard(name) {
  let card = sourceCards.get(name);
  if (card) return card;
  card = el(
    'article',
    { class: 'source', 'data-source': name },
    el(
      'header',
      {},
      el('h3', { class: 'mono', 'data-field': 'name', text: name }),
      el('span', { class: 'count' }, el('span', { 'data-field': 'count' }), ' messages'),
    ),
    el(
      'table',
      {},
      el(
        'thead',
        {},
        el(
          'tr',
          {},
          el('th', { scope: 'col' }),
          el('th', { scope: 'col', class: 'num', text: 'mean' }),
          el('th', { scope: 'col', class: 'num', text: 'max' }),
          el('th', { scope: 'col', class: 'num', text: 'samples' }),
        ),
      ),
      el('tbody'),
    ),
  );
  for (const metric of METRICS) metricRow(card, metric);
  sourceCards.set(name, card);
  return card;
}

function renderSummary(summary) {
  setNumber(summaryAtEl, summary.at, formatTime);
  const names = Object.keys(summary.sources).sort();
  const cards = [];
  for (const name of names) {
    const data = summary.sources[name];
    if (!data || typeof data !== 'object') continue;
    const card = sourceCard(name);
    setNumber(card.querySelector('[data-field="count"]'), data.count);
    const metrics = new Set(METRICS);
    for (const [key, value] of Object.entries(data)) {
      if (isMetric(value)) metrics.add(key);
    }
    for (const metric of metrics) {
      const row = metricRow(card, metric);
      const value = isMetric(data[metric]) ? data[metric] : {};
      setNumber(row.querySelector(`[data-field="${CSS.escape(metric)}-mean"]`), value.mean);
      setNumber(row.querySelector(`[data-field="${CSS.escape(metric)}-max"]`), value.max);
      setNumber(row.querySelector(`[data-field="${CSS.escape(metric)}-samples"]`), value.samples);
    }
    cards.push(card);
  }
  const keep = new Set(cards);
  for (const [name, card] of sourceCards) {
    if (!keep.has(card)) sourceCards.delete(name);
  }
  // Re-appending existing cards keeps their elements (and tests' handles) alive.
  summaryEl.replaceChildren(...cards);
}

// ---------------------------------------------------------------- chart

const sum = (values) => values.reduce((a, b) => a + b, 0);
const finite = (value) => typeof value === 'number' && Number.isFinite(value);

// Each series maps one summary's sources to { line name: value }.
const SERIES = {
  'cpu-mean': { label: 'CPU, mean per source', metric: 'cpu', stat: 'mean' },
  'cpu-max': { label: 'CPU, max per source', metric: 'cpu', stat: 'max' },
  'memory-mean': { label: 'Memory, mean per source', metric: 'memory', stat: 'mean' },
  'memory-max': { label: 'Memory, max per source', metric: 'memory', stat: 'max' },
  'requests-mean': { label: 'Requests, mean per source', metric: 'requests', stat: 'mean' },
  'requests-max': { label: 'Requests, max per source', metric: 'requests', stat: 'max' },
  'requests-total': {
    label: 'Requests, total of all sources',
    total: (sources) =>
      Math.round(
        sum(
          Object.values(sources).map((s) =>
            s && finite(s.requests?.mean) && finite(s.requests?.samples) ? s.requests.mean * s.requests.samples : 0,
          ),
        ),
      ),
  },
  'count-total': {
    label: 'Messages, total of all sources',
    total: (sources) => sum(Object.values(sources).map((s) => (s && finite(s.count) ? s.count : 0))),
  },
};

function pointsOf(series, sources) {
  if (series.total) return { total: series.total(sources) };
  const points = {};
  for (const [name, data] of Object.entries(sources)) {
    const value = data?.[series.metric]?.[series.stat];
    if (finite(value)) points[name] = value;
  }
  return points;
}

const lineColors = new Map();
function colorOf(line) {
  if (!lineColors.has(line)) lineColors.set(line, PALETTE[lineColors.size % PALETTE.length]);
  return lineColors.get(line);
}

function niceStep(span) {
  const raw = span / 4;
  const power = 10 ** Math.floor(Math.log10(raw));
  const unit = raw / power;
  return (unit <= 1 ? 1 : unit <= 2 ? 2 : unit <= 5 ? 5 : 10) * power;
}

function drawChart() {
  const key = seriesSelect.value in SERIES ? seriesSelect.value : 'cpu-mean';
  const series = SERIES[key];
  canvas.dataset.points = String(history.length);
  canvas.dataset.series = key;

  // Lines: name -> values per summary (null where a summary has none).
  const lines = new Map();
  history.forEach((entry, i) => {
    for (const [line, value] of Object.entries(pointsOf(series, entry.sources))) {
      if (!lines.has(line)) lines.set(line, new Array(history.length).fill(null));
      lines.get(line)[i] = value;
    }
  });
  const names = [...lines.keys()].sort();

  const ratio = window.devicePixelRatio || 1;
  const width = Math.max(200, canvas.clientWidth || 600);
  const height = Math.max(120, canvas.clientHeight || 240);
  if (canvas.width !== Math.round(width * ratio) || canvas.height !== Math.round(height * ratio)) {
    canvas.width = Math.round(width * ratio);
    canvas.height = Math.round(height * ratio);
  }
  const ctx = canvas.getContext('2d');
  if (!ctx) return;
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  ctx.clearRect(0, 0, width, height);

  const style = getComputedStyle(canvas);
  const ink = style.getPropertyValue('--chart-ink').trim() || '#5d6675';
  const gridColor = style.getPropertyValue('--chart-grid').trim() || '#e7eaef';
  ctx.font = `12px ${style.fontFamily || 'sans-serif'}`;
  ctx.textBaseline = 'middle';

  const values = [];
  for (const line of lines.values()) for (const v of line) if (v !== null) values.push(v);
  if (values.length === 0) {
    ctx.fillStyle = ink;
    ctx.textAlign = 'center';
    ctx.fillText(history.length ? 'No data for this series yet' : 'Waiting for summaries…', width / 2, height / 2);
    renderLegend([], lines);
    return;
  }

  let lo = Math.min(0, ...values);
  let hi = Math.max(...values);
  if (hi === lo) hi = lo + (Math.abs(lo) || 1);
  const step = niceStep(hi - lo);
  lo = Math.floor(lo / step) * step;
  hi = Math.ceil(hi / step) * step;

  const ticks = [];
  for (let v = lo; v <= hi + step / 2; v += step) ticks.push(Number(v.toPrecision(12)));
  const labelWidth = Math.max(...ticks.map((v) => ctx.measureText(formatNumber(v)).width));
  const left = Math.ceil(labelWidth) + 14;
  const right = 12;
  const top = 12;
  const bottom = 24;
  const plotW = width - left - right;
  const plotH = height - top - bottom;
  const x = (i) => left + (plotW * i) / (HISTORY - 1);
  const y = (v) => top + plotH - ((v - lo) / (hi - lo)) * plotH;

  // Grid and y labels.
  ctx.lineWidth = 1;
  ctx.textAlign = 'right';
  for (const v of ticks) {
    const py = Math.round(y(v)) + 0.5;
    ctx.strokeStyle = gridColor;
    ctx.beginPath();
    ctx.moveTo(left, py);
    ctx.lineTo(width - right, py);
    ctx.stroke();
    ctx.fillStyle = ink;
    ctx.fillText(formatNumber(v), left - 6, py);
  }

  // Time labels: first and last summary.
  ctx.textBaseline = 'alphabetic';
  ctx.fillStyle = ink;
  const first = history[0]?.at;
  const last = history[history.length - 1]?.at;
  ctx.textAlign = 'left';
  ctx.fillText(formatTime(first), left, height - 6);
  if (history.length > 1) {
    // The latest time under the latest point, unless it would overlap the first label.
    const firstRight = left + ctx.measureText(formatTime(first)).width;
    const lastText = formatTime(last);
    const lastWidth = ctx.measureText(lastText).width;
    const lastLeft = Math.min(x(history.length - 1) - lastWidth / 2, width - right - lastWidth);
    if (lastLeft > firstRight + 12) {
      ctx.textAlign = 'left';
      ctx.fillText(lastText, lastLeft, height - 6);
    }
  }

  // Lines, with a dot on each line's latest point.
  ctx.lineWidth = 2;
  ctx.lineJoin = 'round';
  for (const name of names) {
    const points = lines.get(name);
    const color = colorOf(name);
    ctx.strokeStyle = color;
    ctx.fillStyle = color;
    ctx.beginPath();
    let drawing = false;
    let lastIndex = -1;
    points.forEach((v, i) => {
      if (v === null) {
        drawing = false;
        return;
      }
      if (drawing) ctx.lineTo(x(i), y(v));
      else ctx.moveTo(x(i), y(v));
      drawing = true;
      lastIndex = i;
    });
    ctx.stroke();
    if (lastIndex >= 0) {
      ctx.beginPath();
      ctx.arc(x(lastIndex), y(points[lastIndex]), 2.5, 0, Math.PI * 2);
      ctx.fill();
    }
  }
  renderLegend(names, lines);
}

function renderLegend(names, lines) {
  legendEl.replaceChildren(
    ...names.map((name) => {
      const points = lines.get(name);
      let latest;
      for (let i = points.length - 1; i >= 0; i -= 1) {
        if (points[i] !== null) {
          latest = points[i];
          break;
        }
      }
      const swatch = el('span', { class: 'swatch' });
      swatch.style.backgroundColor = colorOf(name);
      return el(
        'li',
        { 'data-series': name },
        swatch,
        el('span', { class: 'mono', text: name }),
        el('span', { class: 'value', text: formatNumber(latest) }),
      );
    }),
  );
}

for (const [value, series] of Object.entries(SERIES)) {
  seriesSelect.append(el('option', { value, text: series.label }));
}
seriesSelect.value = 'cpu-mean';
seriesSelect.addEventListener('change', drawChart);

let resizeFrame = 0;
new ResizeObserver(() => {
  cancelAnimationFrame(resizeFrame);
  resizeFrame = requestAnimationFrame(drawChart);
}).observe(canvas);

// ---------------------------------------------------------------- wiring

function connect() {
  generation += 1;
  const gen = generation;
  stopPolling();
  closeFeed();
  retryDelay = 0;
  carryToken(token);
  if (!token) {
    setStatus(statusEl, 'disconnected', 'disconnected: no token, enter one above');
    setStatus(pluginsStatusEl, 'disconnected', 'no token');
    showPluginsPlaceholder('Enter a token to load the plugins.');
    return;
  }
  setStatus(statusEl, 'connecting', 'connecting…');
  setStatus(pluginsStatusEl, 'connecting', 'loading…');
  if (pluginRows.size === 0) showPluginsPlaceholder('Loading…');
  poll(gen);
  openFeed(gen);
}

$('token-form').addEventListener('submit', (event) => {
  event.preventDefault();
  token = tokenInput.value.trim();
  connect();
});

tokenInput.value = token;
setNumber(summaryReceivedEl, 0);
setNumber(droppedEl, 0);
drawChart();
connect();
