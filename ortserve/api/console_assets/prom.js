// Prometheus text format -> samples, and the few sums and quantiles the charts need.

const LINE = /^([a-zA-Z_:][\w:]*)(?:\{(.*)\})?\s+(\S+)/;
const LABEL = /(\w+)="((?:[^"\\]|\\.)*)"/g;

// [{name, labels: {...}, value}] for every sample line (comments skipped).
export function parse(text) {
  const samples = [];
  for (const line of text.split("\n")) {
    if (!line || line.startsWith("#")) continue;
    const match = line.match(LINE);
    if (!match) continue;
    const labels = {};
    for (const [, key, value] of (match[2] || "").matchAll(LABEL)) labels[key] = value;
    samples.push({ name: match[1], labels, value: Number(match[3]) });
  }
  return samples;
}

// The sum of `name` over the samples whose labels include `where`.
export function sum(samples, name, where = {}) {
  return samples
    .filter((s) => s.name === name && Object.entries(where).every(([k, v]) => s.labels[k] === v))
    .reduce((total, s) => total + s.value, 0);
}

// Cumulative bucket counts of a histogram summed over its other labels: [[le, count], ...].
export function buckets(samples, name) {
  const byLe = new Map();
  for (const s of samples) {
    if (s.name !== `${name}_bucket`) continue;
    const le = s.labels.le === "+Inf" ? Infinity : Number(s.labels.le);
    byLe.set(le, (byLe.get(le) || 0) + s.value);
  }
  return [...byLe.entries()].sort((a, b) => a[0] - b[0]);
}

// histogram_quantile over the observations between two bucket snapshots (null: none).
export function quantile(q, before, after) {
  const counts = after.map(([le, n], i) => [le, n - (before[i]?.[1] || 0)]);
  const total = counts.length ? counts[counts.length - 1][1] : 0;
  if (total <= 0) return null;
  const rank = q * total;
  let lower = 0;
  let below = 0;
  for (const [le, n] of counts) {
    if (n >= rank) {
      if (le === Infinity) return lower; // beyond the last finite bucket: its bound
      return lower + ((le - lower) * (rank - below)) / Math.max(n - below, 1e-9);
    }
    lower = le;
    below = n;
  }
  return lower;
}
