// Metrics: /metrics polled into 15 minutes of history kept in this page, drawn with uPlot.
import { html, useEffect, useRef, useState } from "./vendor/htm-preact.js";
import uPlot from "./vendor/uPlot.js";
import { request } from "./api.js";
import { buckets, parse, quantile, sum } from "./prom.js";

const POLL_MS = 2000;
const WINDOW_S = 15 * 60;
const TTFT_WINDOW_S = 60; // percentiles over the last minute's first tokens
const history = []; // snapshots: {t, tokensIn, tokensOut, requests: {class: n}, ttft, queued, running}
const listeners = new Set();
let polling = null;

function snapshot(samples) {
  const requests = {};
  for (const s of samples) {
    if (s.name !== "ortserve_requests_total") continue;
    const klass = `${(s.labels.status || "?")[0]}xx`;
    requests[klass] = (requests[klass] || 0) + s.value;
  }
  return {
    t: Date.now() / 1000,
    tokensIn: sum(samples, "ortserve_tokens_total", { kind: "prompt" }),
    tokensOut: sum(samples, "ortserve_tokens_total", { kind: "generated" }),
    requests,
    ttft: buckets(samples, "ortserve_time_to_first_token_seconds"),
    queued: sum(samples, "ortserve_queued_turns"),
    running: sum(samples, "ortserve_running_turns"),
  };
}

async function poll() {
  try {
    const text = await (await request("metrics")).text();
    history.push(snapshot(parse(text)));
    while (history.length && history[0].t < history[history.length - 1].t - WINDOW_S) history.shift();
    for (const listener of listeners) listener();
  } catch {
    // the server is away or the key is missing: the next poll tries again
  }
}

// Starts polling once for the page's lifetime, so history builds up whatever tab is shown.
export function startMetrics() {
  if (polling) return;
  poll();
  polling = setInterval(poll, POLL_MS);
}

// A counter's per-second rate between consecutive snapshots (null at a reset).
function rate(read) {
  return history.map((h, i) => {
    if (i === 0) return null;
    const dt = h.t - history[i - 1].t;
    const dv = read(h) - read(history[i - 1]);
    return dt > 0 && dv >= 0 ? dv / dt : null;
  });
}

function ttftSeries(q) {
  return history.map((h) => {
    const before = history.find((b) => b.t >= h.t - TTFT_WINDOW_S) || history[0];
    return before === h ? null : quantile(q, before.ttft, h.ttft);
  });
}

function statusClasses() {
  const classes = new Set(history.flatMap((h) => Object.keys(h.requests)));
  return [...classes].sort();
}

const CHARTS = [
  { id: "tokens", title: "Tokens per second", unit: "tokens/s",
    series: () => [["in (prompt)", rate((h) => h.tokensIn)], ["out (generated)", rate((h) => h.tokensOut)]] },
  { id: "ttft", title: "Time to first token (last minute)", unit: "s",
    series: () => [["p50", ttftSeries(0.5)], ["p95", ttftSeries(0.95)], ["p99", ttftSeries(0.99)]] },
  { id: "queue", title: "Queue depth", unit: "turns",
    series: () => [["queued", history.map((h) => h.queued)], ["running", history.map((h) => h.running)]] },
  { id: "requests", title: "Requests per second by status", unit: "req/s",
    series: () => statusClasses().map((k) => [k, rate((h) => h.requests[k] || 0)]) },
];

const COLOURS = ["#1f6feb", "#c2410c", "#15803d", "#7e22ce"];

export function Metrics() {
  const [, setTick] = useState(0);
  useEffect(() => {
    const listener = () => setTick((n) => n + 1);
    listeners.add(listener);
    return () => listeners.delete(listener);
  }, []);
  return html`<div class="metrics">
    <p>Polled from /metrics every ${POLL_MS / 1000} s; the last 15 minutes are kept in this page.</p>
    <div class="charts">${CHARTS.map((c) => html`<${Chart} key=${c.id} chart=${c} />`)}</div>
  </div>`;
}

function Chart({ chart }) {
  const box = useRef(null);
  const plot = useRef(null);
  const series = chart.series();
  const data = [history.map((h) => h.t), ...series.map(([, values]) => values)];
  const labels = series.map(([label]) => label).join("|");
  const points = series.reduce((n, [, values]) => n + values.filter((v) => v !== null).length, 0);
  useEffect(() => {
    plot.current?.destroy();
    plot.current = new uPlot(options(chart, series, box.current), data, box.current);
    return () => plot.current?.destroy();
  }, [labels]);
  useEffect(() => plot.current?.setData(data), [history.length, history[history.length - 1]?.t]);
  useEffect(() => {
    const resize = () => plot.current?.setSize({ width: width(box.current), height: 180 });
    window.addEventListener("resize", resize);
    return () => window.removeEventListener("resize", resize);
  }, []);
  return html`<figure class="chart" data-chart=${chart.id} data-points=${points}>
    <figcaption>${chart.title} (${chart.unit})</figcaption>
    <div ref=${box} role="img" aria-label=${`${chart.title}: ${points} points`}></div>
  </figure>`;
}

function width(element) {
  return Math.max(240, (element?.clientWidth || 320) - 8);
}

function options(chart, series, element) {
  return {
    width: width(element),
    height: 180,
    series: [{}, ...series.map(([label], i) => ({ label, stroke: COLOURS[i % COLOURS.length], width: 2, spanGaps: false }))],
    axes: [{}, { size: 50 }],
    scales: { x: { time: true } },
    legend: { live: false },
  };
}
