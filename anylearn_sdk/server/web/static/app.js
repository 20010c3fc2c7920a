// anylearn's web page: the log follower and the metric charts. No inline script anywhere
// (the Content-Security-Policy forbids it); everything the server sends is put in the page
// as text (textContent), never as HTML.
"use strict";

(function () {
  const COLORS = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#be185d"];
  const TERMINAL = new Set(["SUCCEEDED", "FAILED", "CANCELLED"]);

  function sleep(ms) {
    return new Promise((resolve) => setTimeout(resolve, ms));
  }

  function setState(state) {
    const badge = document.getElementById("state");
    if (!badge || !state || badge.dataset.state === state) return;
    badge.textContent = state;
    badge.dataset.state = state;
    const cancel = document.getElementById("cancel");
    if (cancel) cancel.disabled = TERMINAL.has(state);
    const register = document.getElementById("register");
    if (register) register.disabled = state !== "SUCCEEDED";
  }

  // The log, followed by byte offset: through network drops and backend restarts (a failed
  // read is tried again from the same offset), until the task has ended and the log is read.
  async function followLog(pre) {
    const task = pre.dataset.task;
    const decoder = new TextDecoder("utf-8");
    let offset = 0;
    for (;;) {
      let state = "";
      let grew = false;
      try {
        const response = await fetch(`/tasks/${encodeURIComponent(task)}/log?offset=${offset}`, {
          headers: { Accept: "text/plain" },
          credentials: "same-origin",
        });
        if (response.status === 401 || response.status === 404) return;
        if (!response.ok) throw new Error(String(response.status));
        const bytes = new Uint8Array(await response.arrayBuffer());
        const next = Number(response.headers.get("X-Anylearn-Next-Offset"));
        state = response.headers.get("X-Anylearn-Task-State") || "";
        if (bytes.length) {
          const atBottom = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
          pre.append(document.createTextNode(decoder.decode(bytes, { stream: true })));
          if (atBottom) pre.scrollTop = pre.scrollHeight;
          grew = true;
        }
        offset = Number.isFinite(next) ? next : offset + bytes.length;
        setState(state);
      } catch (err) {
        await sleep(2000);
        continue;
      }
      if (grew) continue;
      if (TERMINAL.has(state)) return;
      await sleep(1000);
    }
  }

  function chartFor(container, title, labels) {
    const box = document.createElement("div");
    box.className = "chart";
    box.dataset.key = title;
    container.append(box);
    const width = Math.max(300, Math.min(container.clientWidth - 20, 900));
    const series = [{ label: "step" }].concat(
      labels.map((label, i) => ({ label: label, stroke: COLORS[i % COLORS.length], width: 2 }))
    );
    const empty = [[]].concat(labels.map(() => []));
    const plot = new uPlot({ title: title, width: width, height: 220, series: series, scales: { x: { time: false } } }, empty, box);
    plot.box = box;
    return plot;
  }

  // One chart per key, growing while the task runs.
  async function followMetrics(section) {
    const task = section.dataset.task;
    const charts = new Map();
    for (;;) {
      let state = "";
      try {
        const response = await fetch(`/tasks/${encodeURIComponent(task)}/metrics`, { credentials: "same-origin" });
        if (response.status === 401 || response.status === 404) return;
        if (!response.ok) throw new Error(String(response.status));
        const body = await response.json();
        state = body.state;
        const keys = Object.keys(body.series).sort();
        if (keys.length) document.getElementById("no-metrics").hidden = true;
        for (const key of keys) {
          const s = body.series[key];
          if (!charts.has(key)) charts.set(key, chartFor(section, key, [key]));
          const chart = charts.get(key);
          chart.setData([s.steps, s.values]);
          chart.box.dataset.points = String(s.values.length);
        }
        setState(state);
      } catch (err) {
        await sleep(2000);
        continue;
      }
      if (TERMINAL.has(state)) return;
      await sleep(2000);
    }
  }

  // Compare: each key's series of every task on one chart, on the union of their steps.
  async function overlay(section) {
    const tasks = section.dataset.tasks.split(",").filter(Boolean);
    const keys = section.dataset.keys.split("\n").filter(Boolean);
    const bodies = await Promise.all(
      tasks.map((t) => fetch(`/tasks/${encodeURIComponent(t)}/metrics`, { credentials: "same-origin" }).then((r) => r.json()))
    );
    for (const key of keys) {
      const steps = new Set();
      for (const body of bodies) for (const step of (body.series[key] || { steps: [] }).steps) steps.add(step);
      const xs = Array.from(steps).sort((a, b) => a - b);
      const columns = bodies.map((body) => {
        const s = body.series[key];
        const byStep = new Map();
        if (s) s.steps.forEach((step, i) => byStep.set(step, s.values[i]));
        return xs.map((x) => (byStep.has(x) ? byStep.get(x) : null));
      });
      const chart = chartFor(section, key, tasks);
      chart.setData([xs].concat(columns));
    }
  }

  document.addEventListener("DOMContentLoaded", () => {
    const pre = document.getElementById("log");
    if (pre) followLog(pre);
    const charts = document.getElementById("charts");
    if (charts) followMetrics(charts);
    const compared = document.getElementById("overlay");
    if (compared) overlay(compared);
  });
})();
