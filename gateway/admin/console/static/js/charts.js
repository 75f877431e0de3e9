// Time-series cards on uPlot (vendored, window.uPlot): a title, the latest values in words, and a chart
// that follows its container's width. The canvas is decoration for screen readers; the words carry it.

import { h } from "./dom.js";

// Distinguishable for common colour-vision deficiencies (after Okabe and Ito), dark enough on white.
export const PALETTE = ["#2f6bd8", "#d4680a", "#1f8a4c", "#a23fb5", "#c33434", "#0f8a9e", "#8a6d00", "#5e6ad2", "#6b7280"];

const AXIS = "#5b6472";
const GRID = "#e8ebf0";
const FONT = '12px system-ui, -apple-system, "Segoe UI", Roboto, sans-serif';

let timeLabelWidth = null;

/** The width of a time label ("00:00:00") in the axis font, in CSS pixels. */
function timeLabel() {
  if (timeLabelWidth === null) {
    const ctx = document.createElement("canvas").getContext("2d");
    ctx.font = FONT;
    timeLabelWidth = ctx.measureText("00:00:00").width;
  }
  return timeLabelWidth;
}

/**
 * The time axis's splits, without the labels that would not fit in the canvas: uPlot centres a label on
 * its tick, so one near either edge would be cut (the tick and its grid line stay).
 */
function fitTimeLabels(u, splits) {
  const half = timeLabel() / 2;
  const left = u.bbox.left / (window.devicePixelRatio || 1);
  return splits.map((t) => {
    const x = left + u.valToPos(t, "x");
    return x - half >= 0 && x + half <= u.width ? t : null;
  });
}

/**
 * A card with one line chart.
 * series: [{label, color, dash?, fill?}]; format(v) -> text for axis and latest values;
 * floor: the y axis shows at least [0, floor]; ceiling: fixed top (e.g. 1 for ratios);
 * quiet: if set, only the series with a non-zero value in the window are drawn (the 429 reasons), and
 * these words stand in for the chart when there is none.
 */
export function lineChart({ title, description, series, format, floor = 1, ceiling = null, height = 170, id, quiet = null }) {
  const latest = h("p", { class: "chart-latest" });
  const plot = h("div", { class: "chart-plot", "aria-hidden": "true" });
  const note = quiet ? h("p", { class: "chart-empty", hidden: true }, quiet) : null;
  if (note) note.style.height = `${height}px`; // the card keeps its size (CSSOM: the CSP allows no inline style)
  const card = h(
    "figure",
    { class: "card chart-card", "data-chart": id, "data-points": "0" },
    h("figcaption", {}, h("h3", { class: "chart-title" }, title), description ? h("p", { class: "chart-desc" }, description) : null),
    latest,
    plot,
    note,
  );
  const opts = {
    width: 400,
    height,
    // Room on the right for half a time label, which uPlot centres on its tick: one at the right end
    // then fits (and fitTimeLabels drops any that still would not).
    padding: [10, Math.ceil(timeLabel() / 2) + 2, 0, 0],
    // The card's own line of latest values names the series; uPlot's legend would repeat it.
    legend: { show: false },
    cursor: { drag: { x: false, y: false }, points: { size: 6 } },
    scales: {
      x: { time: true },
      y: { range: (u, lo, hi) => [0, ceiling !== null ? ceiling : Math.max(floor, (hi || 0) * 1.15)] },
    },
    series: [
      {},
      ...series.map((s) => ({
        label: s.label,
        stroke: s.color,
        width: 2,
        dash: s.dash,
        fill: s.fill,
        points: { show: false },
        spanGaps: false,
      })),
    ],
    axes: [
      {
        stroke: AXIS,
        font: FONT,
        space: 80,
        grid: { stroke: GRID, width: 1 },
        ticks: { stroke: GRID, width: 1 },
        filter: fitTimeLabels,
        values: (u, splits) => splits.map((t) => (t === null ? null : new Date(t * 1000).toLocaleTimeString("en-GB"))),
      },
      {
        stroke: AXIS,
        font: FONT,
        size: 64,
        grid: { stroke: GRID, width: 1 },
        ticks: { stroke: GRID, width: 1 },
        values: (u, splits) => splits.map((v) => format(v)),
      },
    ],
  };
  const u = new window.uPlot(opts, [[], ...series.map(() => [])], plot);
  const drawn = series.map(() => true);
  const resize = new ResizeObserver(() => {
    const width = Math.floor(plot.clientWidth);
    if (width > 0 && width !== u.width) u.setSize({ width, height });
  });
  resize.observe(plot);

  return {
    el: card,
    /** xs: unix seconds; ys: one array per series (null where unknown). */
    update(xs, ys) {
      u.setData([xs, ...ys]);
      const last = ys.map((col) => {
        for (let i = col.length - 1; i >= 0; i -= 1) if (col[i] !== null && col[i] !== undefined) return col[i];
        return null;
      });
      card.dataset.points = String(ys[0].filter((v) => v !== null && v !== undefined).length);
      card.dataset.last = last.map((v) => (v === null ? "" : String(v))).join(" ");
      // With `quiet`, a series that stayed empty or at zero over the whole window is neither drawn nor
      // named (seven reasons at zero would draw one unlabelled line); with none left, the note stands in.
      const shown = series.map((s, i) => i).filter((i) => !quiet || ys[i].some((v) => v));
      if (quiet) {
        series.forEach((s, i) => {
          const show = shown.includes(i);
          if (show !== drawn[i]) u.setSeries(i + 1, { show });
          drawn[i] = show;
        });
        plot.hidden = shown.length === 0;
        note.hidden = shown.length > 0;
      }
      card.dataset.series = shown.map((i) => series[i].label).join("|");
      latest.replaceChildren(
        ...(shown.length
          ? shown.map((i) => {
              const swatch = h("span", { class: series[i].dash ? "swatch swatch-dashed" : "swatch" });
              // The colour is the series', set through the CSSOM (the CSP allows no inline style).
              swatch.style.background = series[i].color;
              return h("span", { class: "latest-item" }, swatch, `${series[i].label} `, h("strong", {}, format(last[i])));
            })
          : []),
      );
    },
    destroy() {
      resize.disconnect();
      u.destroy();
    },
  };
}
