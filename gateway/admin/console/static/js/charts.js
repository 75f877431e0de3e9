// Time-series cards on uPlot (vendored, window.uPlot): a title, the latest values in words, and a chart
// that follows its container's width. The canvas is decoration for screen readers; the words carry it.

import { h } from "./dom.js";

// Distinguishable for common colour-vision deficiencies (after Okabe and Ito), dark enough on white.
export const PALETTE = ["#2f6bd8", "#d4680a", "#1f8a4c", "#a23fb5", "#c33434", "#0f8a9e", "#8a6d00", "#5e6ad2", "#6b7280"];

const AXIS = "#5b6472";
const GRID = "#e8ebf0";
const FONT = '12px system-ui, -apple-system, "Segoe UI", Roboto, sans-serif';

/**
 * A card with one line chart.
 * series: [{label, color, dash?, fill?}]; format(v) -> text for axis and latest values;
 * floor: the y axis shows at least [0, floor]; ceiling: fixed top (e.g. 1 for ratios);
 * quiet: if set, the words shown instead of series that were zero all along.
 */
export function lineChart({ title, description, series, format, floor = 1, ceiling = null, height = 170, id, quiet = null }) {
  const latest = h("p", { class: "chart-latest" });
  const plot = h("div", { class: "chart-plot", "aria-hidden": "true" });
  const card = h(
    "figure",
    { class: "card chart-card", "data-chart": id, "data-points": "0" },
    h("figcaption", {}, h("h3", { class: "chart-title" }, title), description ? h("p", { class: "chart-desc" }, description) : null),
    latest,
    plot,
  );
  const opts = {
    width: 400,
    height,
    // Room on the right for the last time label, which uPlot centres on its tick.
    padding: [10, 24, 0, 0],
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
        values: (u, splits) => splits.map((t) => new Date(t * 1000).toLocaleTimeString("en-GB")),
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
      // Series that stayed empty or at zero over the whole window can be left out of the words (the
      // 429 reasons); the line is still drawn.
      const shown = series.map((s, i) => i).filter((i) => !quiet || ys[i].some((v) => v));
      latest.replaceChildren(
        ...(shown.length
          ? shown.map((i) => {
              const swatch = h("span", { class: series[i].dash ? "swatch swatch-dashed" : "swatch" });
              // The colour is the series', set through the CSSOM (the CSP allows no inline style).
              swatch.style.background = series[i].color;
              return h("span", { class: "latest-item" }, swatch, `${series[i].label} `, h("strong", {}, format(last[i])));
            })
          : [quiet]),
      );
    },
    destroy() {
      resize.disconnect();
      u.destroy();
    },
  };
}
