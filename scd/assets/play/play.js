// scd play: show each panel's newest frame, send the keys. Plain JS, no build step.
// Frames arrive as binary messages (4-byte header length, JSON header, PNG); each shown frame is
// acknowledged, and the server sends a panel's next frame only after that, so a slow or hidden tab
// skips frames instead of queueing them.
"use strict";

const KEYS = {  // key -> action name; digits pick actions by number
  ArrowUp: "up", w: "up", W: "up", ArrowDown: "down", s: "down", S: "down",
  ArrowLeft: "left", a: "left", A: "left", ArrowRight: "right", d: "right", D: "right",
};
const HINTS = { up: "↑ W", down: "↓ S", left: "← A", right: "→ D" };

const socket = new WebSocket(`ws://${location.host}/ws`);
socket.binaryType = "arraybuffer";
const decoder = new TextDecoder();
const panels = [];        // {root, canvas, context, fields, drawn}
const pending = [];       // newest undisplayed frame per panel
let state = null;
let actionNames = [];
const held = new Set();
let drawScheduled = false;

const $ = (id) => document.getElementById(id);
const send = (message) => { if (socket.readyState === WebSocket.OPEN) socket.send(JSON.stringify(message)); };

function panelTitle(p) {
  return p.arch === "scd" ? `SCD · ${p.name}` : `causal baseline · ${p.name}`;
}

function buildPanels(list) {
  const main = $("panels");
  main.replaceChildren();
  panels.length = 0;
  list.forEach((p, i) => {
    const root = document.createElement("figure");
    root.className = "panel";
    root.id = `panel-${i}`;
    root.innerHTML = `<figcaption><span class="name"></span><span class="muted steps"></span></figcaption>
      <canvas width="32" height="32"></canvas>
      <div class="stats"><span class="fps">– fps</span><span class="p50">p50 – ms</span>
      <span class="index muted">frame –</span><span class="dropped muted"></span><span class="behind" hidden></span></div>`;
    root.querySelector(".name").textContent = root.querySelector(".name").title = panelTitle(p);  // cut to one line: the whole of it on hover
    root.querySelector(".steps").textContent = `${p.steps} steps` + (p.samples > 1 ? `, median of ${p.samples}` : "");
    main.append(root);
    const fields = {};
    for (const k of ["fps", "p50", "index", "dropped", "behind"]) fields[k] = root.querySelector(`.${k}`);
    const canvas = root.querySelector("canvas");
    panels.push({ root, canvas, context: canvas.getContext("2d"), fields, drawn: 0 });
  });
}

function buildActions(names, count) {
  const box = $("actions");
  box.replaceChildren();
  actionNames = names.length ? names : Array.from({ length: count }, (_, i) => String(i));
  if (!count) {
    box.textContent = "this model takes no actions: frames roll forward by themselves";
    return;
  }
  actionNames.forEach((name, i) => {
    const b = document.createElement("button");
    b.type = "button";
    b.dataset.action = i;
    b.textContent = `${name} ${HINTS[name] || (i < 9 ? String(i + 1) : "")}`;
    b.addEventListener("pointerdown", () => press(i));
    b.addEventListener("pointerup", () => release(i));
    b.addEventListener("pointerleave", () => release(i));
    box.append(b);
  });
}

function onState(s) {
  if (s.type === "error") {
    $("error").hidden = false;
    $("error").textContent = `stopped: ${s.message}`;
    return;
  }
  const first = state === null;
  state = s;
  if (first || panels.length !== s.panels.length) buildPanels(s.panels);
  if (first) buildActions(s.actions, s.num_actions);
  $("fps").textContent = s.fps;
  $("paced").checked = s.paced;
  $("pause").firstChild.textContent = s.paused ? "Resume " : "Pause ";
  const parts = [`seed ${s.seed}`, `episode ${s.episode}`, s.prompt ? `prompt ${s.prompt}` : "prompt: a synthetic world clip"];
  if (s.recording) parts.push(`recording to ${s.recording}`);
  if (s.paused) parts.push("paused");
  $("info").textContent = parts.join(" · ");
}

function onFrame(buffer) {
  const length = new DataView(buffer).getUint32(0);
  const head = JSON.parse(decoder.decode(new Uint8Array(buffer, 4, length)));
  const blob = new Blob([new Uint8Array(buffer, 4 + length)], { type: "image/png" });
  if (pending[head.panel]) send({ type: "ack", panel: head.panel });  // replaced before it was shown
  pending[head.panel] = { head, blob };
  if (!drawScheduled) {
    drawScheduled = true;
    requestAnimationFrame(draw);  // never runs in a hidden tab: no acks, so the server sends nothing
  }
}

let decodes = 0;

function draw() {
  drawScheduled = false;
  pending.forEach((item, i) => {
    if (!item || !panels[i]) return;
    pending[i] = null;
    const ticket = ++decodes;
    createImageBitmap(item.blob, { colorSpaceConversion: "none", premultiplyAlpha: "none" })
      .then((bitmap) => { show(panels[i], item.head, bitmap, ticket); })
      .catch(() => {})  // an undecodable frame is skipped
      .finally(() => send({ type: "ack", panel: i }));
  });
}

// the picture, its frame number and its stats change together, in one task
function show(panel, head, bitmap, ticket) {
  if (ticket < panel.drawn) { bitmap.close(); return; }  // a newer frame is already on screen
  panel.drawn = ticket;
  const canvas = panel.canvas;
  if (canvas.width !== bitmap.width || canvas.height !== bitmap.height) {
    canvas.width = bitmap.width;
    canvas.height = bitmap.height;
  }
  panel.context.drawImage(bitmap, 0, 0);
  bitmap.close();
  canvas.dataset.index = head.index;
  canvas.dataset.episode = head.episode;
  const f = panel.fields;
  f.fps.textContent = `${head.fps.toFixed(1)} fps`;
  f.p50.textContent = `p50 ${head.p50_ms.toFixed(1)} ms`;
  f.index.textContent = `frame ${head.index}`;
  f.dropped.textContent = head.dropped ? `${head.dropped} skipped` : "";
  f.behind.hidden = !head.behind;
  f.behind.textContent = head.behind ? `not keeping up: ${head.fps.toFixed(1)} of ${head.target_fps} fps` : "";
}

function actionFor(event) {
  const name = KEYS[event.key];
  if (name !== undefined) {
    const index = actionNames.indexOf(name);
    if (index >= 0) return index;
    return ["up", "down", "left", "right"].indexOf(name) < actionNames.length ? ["up", "down", "left", "right"].indexOf(name) : -1;
  }
  if (/^[1-9]$/.test(event.key) && Number(event.key) <= actionNames.length) return Number(event.key) - 1;
  return -1;
}

function press(action) {
  if (held.has(action)) return;
  held.add(action);
  send({ type: "press", action });
  document.querySelector(`#actions [data-action="${action}"]`)?.classList.add("held");
}

function release(action) {
  if (!held.delete(action)) return;
  send({ type: "release", action });
  document.querySelector(`#actions [data-action="${action}"]`)?.classList.remove("held");
}

function releaseAll() {
  for (const action of [...held]) release(action);
  send({ type: "release" });
}

document.addEventListener("keydown", (event) => {
  if (event.ctrlKey || event.metaKey || event.altKey) return;
  const action = actionFor(event);
  if (action >= 0) {
    event.preventDefault();
    if (!event.repeat) press(action);
    return;
  }
  if (event.repeat) return;
  if (event.key === " ") { event.preventDefault(); send({ type: "pause", paused: !(state && state.paused) }); }
  else if (event.key === "r" || event.key === "R") send({ type: "reset" });
  else if (event.key === "n" || event.key === "N") send({ type: "seed" });
  else if (event.key === "f" || event.key === "F") send({ type: "pace", paced: !(state && state.paced) });
});
document.addEventListener("keyup", (event) => {
  const action = actionFor(event);
  if (action >= 0) release(action);
});
window.addEventListener("blur", releaseAll);
document.addEventListener("visibilitychange", () => { if (document.hidden) releaseAll(); });

$("pause").addEventListener("click", () => send({ type: "pause", paused: !(state && state.paused) }));
$("reset").addEventListener("click", () => send({ type: "reset" }));
$("seed").addEventListener("click", () => send({ type: "seed" }));
$("paced").addEventListener("change", (e) => send({ type: "pace", paced: e.target.checked }));

socket.addEventListener("open", () => { $("connection").textContent = "live"; });
socket.addEventListener("close", () => {
  $("connection").textContent = "disconnected: scd play has stopped (start it again and reload)";
});
socket.addEventListener("message", (event) => {
  if (typeof event.data === "string") onState(JSON.parse(event.data));
  else onFrame(event.data);
});
