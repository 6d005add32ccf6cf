// The spend forecast chart of the status page, drawn from /status's cost.forecast.
// Built with createElementNS from numbers: no server string is ever parsed as markup, and
// nothing is fetched, so it renders offline. spendForecast(f) returns the nodes to show.
function spendForecast(f) {
  const NS = "http://www.w3.org/2000/svg";
  const W = 380, H = 170, LEFT = 40, RIGHT = 88, TOP = 10, BOTTOM = 20;
  if (!f || typeof f !== "object" || !Array.isArray(f.daily_usd)) return [];
  const money = (value) => { const n = Number(value); return Number.isFinite(n) ? n : 0; };
  const daily = f.daily_usd.map(money);
  const monthEnd = String(f.month_end || ""), asOf = String(f.as_of || "");
  const days = Number(monthEnd.slice(8, 10)) || 31;
  const spent = money(f.spent_usd), projected = money(f.projected_usd);
  const soft = money(f.soft_cap_usd), hard = money(f.hard_cap_usd);
  const top = Math.max(hard, projected, spent, 1) * 1.08;
  const plotW = W - LEFT - RIGHT, plotH = H - TOP - BOTTOM;
  const x = (day) => +(LEFT + (plotW * day) / days).toFixed(1);
  const y = (usd) => +(TOP + plotH * (1 - usd / top)).toFixed(1);

  function node(tag, attrs, text) {
    const child = document.createElementNS(NS, tag);
    for (const [name, value] of Object.entries(attrs)) child.setAttribute(name, String(value));
    if (text !== undefined) child.textContent = String(text);
    return child;
  }
  function dollars(usd) {
    return "$" + usd.toLocaleString("en-US", { minimumFractionDigits: 2,
                                               maximumFractionDigits: 2 });
  }
  function day(iso) {
    const at = new Date(String(iso) + "T12:00:00Z");
    return Number.isNaN(at.getTime()) ? String(iso)
      : at.toLocaleDateString("en-GB", { day: "numeric", month: "short", timeZone: "UTC" });
  }

  const summary = "Spent " + dollars(spent) + " by " + day(asOf) + "; projected " +
    dollars(projected) + " at month end (" + day(monthEnd) + ")";
  const chart = node("svg", { viewBox: "0 0 " + W + " " + H, class: "forecast", role: "img",
                              "aria-label": summary });
  chart.append(node("title", {}, summary),
               node("rect", { class: "frame", x: LEFT, y: TOP, width: plotW, height: plotH }));
  const barW = Math.max(1, plotW / days - 1).toFixed(1);
  daily.forEach((usd, i) => {
    if (usd <= 0) return;
    const bar = node("rect", { class: "day", x: x(i) + 0.5, y: y(usd), width: barW,
                               height: +(y(0) - y(usd)).toFixed(1) });
    bar.append(node("title", {}, "day " + (i + 1) + ": " + dollars(usd)));
    chart.append(bar);
  });
  let total = 0;
  const points = [x(0) + "," + y(0)];
  daily.forEach((usd, i) => { total += usd; points.push(x(i + 1) + "," + y(total)); });
  chart.append(node("polyline", { class: "spent", points: points.join(" ") }),
               node("line", { class: "projection", x1: x(daily.length), y1: y(spent),
                              x2: x(days), y2: y(projected) }));
  // Whole pixels and crisp edges: the cap lines are drawn in exactly their colour.
  for (const [name, usd, dy] of [["soft", soft, 11], ["hard", hard, -3]]) {
    const at = Math.round(y(usd)) + 0.5;
    chart.append(node("line", { class: "cap " + name, "data-usd": usd, x1: LEFT, y1: at,
                                x2: LEFT + plotW, y2: at }),
                 node("text", { class: "cap " + name, x: LEFT + plotW + 4, y: at + dy },
                      name + " cap $" + Math.round(usd).toLocaleString("en-US")));
  }
  chart.append(node("text", { x: LEFT - 4, y: y(0), "text-anchor": "end" }, "$0"),
               node("text", { x: x(0), y: H - 5 }, "1"),
               node("text", { x: x(days), y: H - 5, "text-anchor": "end" }, String(days)));

  const capDay = (iso) => (iso ? day(iso) : "not this month");
  const sentence = "Projected " + dollars(projected) + " by " + day(monthEnd) + " at " +
    dollars(money(f.pace_usd_per_day)) + "/day (the last " + Number(f.pace_days || 7) +
    " days' pace); soft cap " + capDay(f.soft_cap_date) + "; hard cap " +
    capDay(f.hard_cap_date) + ".";
  const text = document.createElement("p");
  text.className = "note forecast-text";
  text.textContent = sentence;
  return [chart, text];
}
