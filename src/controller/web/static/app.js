// wisp's web page: the few things a server-rendered page cannot do alone. Text from the
// controller is only ever put into the page as text (textContent), never as markup; the HTML
// swapped in by refresh() is the controller's own rendering, escaped there.
"use strict";

// Pages with <main data-refresh="MS"> are fetched again every MS milliseconds and their
// <main> swapped in, so a node coming online or a build moving on shows without a reload.
function refresh(main) {
  const every = parseInt(main.dataset.refresh, 10);
  if (!every) return;
  let busy = false;
  setInterval(async () => {
    if (busy || document.hidden) return;
    busy = true;
    try {
      const r = await fetch(location.href, { credentials: "same-origin", headers: { "X-Wisp-Refresh": "1" } });
      if (r.redirected || !r.ok) return;
      const doc = new DOMParser().parseFromString(await r.text(), "text/html");
      const fresh = doc.querySelector("main");
      const live = document.querySelector("main");
      if (fresh && live) {
        for (const id of ["live"]) {
          const a = live.querySelector("#" + id), b = fresh.querySelector("#" + id);
          if (a && b) a.replaceWith(document.importNode(b, true));
        }
      }
    } catch (e) {
      /* the controller is away: try again at the next tick */
    } finally {
      busy = false;
    }
  }, every);
}

// ANSI SGR (colours, bold, underline) to spans; other escape sequences are dropped.
const ESC = /\x1b\[([0-9;]*)([A-Za-z])|\x1b[()][A-Za-z0-9]|\x1b[=>]/g;
class Ansi {
  constructor() { this.fg = -1; this.bg = -1; this.bold = false; this.under = false; }
  apply(params) {
    const ps = params === "" ? [0] : params.split(";").map((x) => parseInt(x || "0", 10));
    for (let i = 0; i < ps.length; i++) {
      const p = ps[i];
      if (p === 0) { this.fg = -1; this.bg = -1; this.bold = false; this.under = false; }
      else if (p === 1) this.bold = true;
      else if (p === 4) this.under = true;
      else if (p === 22) this.bold = false;
      else if (p === 24) this.under = false;
      else if (p >= 30 && p <= 37) this.fg = p - 30;
      else if (p >= 90 && p <= 97) this.fg = p - 90 + 8;
      else if (p === 39) this.fg = -1;
      else if (p >= 40 && p <= 47) this.bg = p - 40;
      else if (p === 49) this.bg = -1;
      else if ((p === 38 || p === 48) && ps[i + 1] === 5) i += 2; // 256 colours: not rendered
      else if ((p === 38 || p === 48) && ps[i + 1] === 2) i += 4; // true colour: not rendered
    }
  }
  cls() {
    const c = [];
    if (this.fg >= 0) c.push("f" + this.fg);
    if (this.bg >= 0) c.push("g" + this.bg);
    if (this.bold) c.push("b");
    if (this.under) c.push("u");
    return c.join(" ");
  }
  // Append `text` to `frag` as text nodes and spans.
  render(text, frag) {
    let last = 0;
    const put = (s) => {
      if (!s) return;
      const cls = this.cls();
      if (!cls) { frag.appendChild(document.createTextNode(s)); return; }
      const span = document.createElement("span");
      span.className = cls;
      span.textContent = s;
      frag.appendChild(span);
    };
    ESC.lastIndex = 0;
    for (let m; (m = ESC.exec(text)); ) {
      put(text.slice(last, m.index));
      if (m[2] === "m") this.apply(m[1]);
      last = ESC.lastIndex;
    }
    put(text.slice(last));
  }
}

// The live log: server-sent events from the controller's log follower, drawn at most ten times
// a second as one block per draw's worth of text (blocks out of view are not laid out again), at most MAX_LINES lines kept (older ones are dropped
// from the top, with a note; text that would be dropped at once is never drawn), and the view
// kept at the bottom unless the reader scrolled up. Memory stays bounded however fast the step
// writes.
const MAX_LINES = 20000;
const DRAW_EVERY = 100;
function newlines(s) {
  let n = 0;
  for (let i = s.indexOf("\n"); i !== -1; i = s.indexOf("\n", i + 1)) n++;
  return n;
}
// The last MAX_LINES lines of `text` (which has more).
function lastLines(text) {
  let cut = text.length;
  for (let k = 0; k < MAX_LINES + 1; k++) cut = text.lastIndexOf("\n", cut - 1);
  return text.slice(cut + 1);
}
function liveLog(pre) {
  const note = document.getElementById("lognote");
  const status = document.getElementById("logstatus");
  const ansi = new Ansi();
  let pending = "";
  let pendingLines = 0;
  let lines = 0;
  let dropped = false;
  let follow = true;
  let scheduled = false;
  pre.addEventListener("scroll", () => {
    follow = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
  });
  const dropFromTop = () => {
    while (lines > MAX_LINES && pre.firstChild) {
      lines -= parseInt(pre.firstChild.dataset.lines || "0", 10);
      pre.removeChild(pre.firstChild);
      dropped = true;
    }
  };
  const draw = () => {
    scheduled = false;
    if (!pending) return;
    let text = pending;
    let n = pendingLines;
    pending = "";
    pendingLines = 0;
    if (n > MAX_LINES) {
      // More than the view keeps: only the last MAX_LINES lines are drawn.
      text = lastLines(text);
      n = MAX_LINES;
      pre.replaceChildren();
      lines = 0;
      dropped = true;
    }
    const chunk = document.createElement("div");
    chunk.className = "chunk";
    chunk.dataset.lines = String(n);
    if (text.indexOf("\x1b") === -1 && text.indexOf("==> ") === -1) {
      chunk.textContent = text;
    } else {
      for (const part of text.split(/(\n)/)) {
        if (part === "\n") chunk.appendChild(document.createTextNode("\n"));
        else if (part.startsWith("==> ")) {
          const s = document.createElement("span");
          s.className = "mark";
          s.textContent = part;
          chunk.appendChild(s);
        } else ansi.render(part, chunk);
      }
    }
    pre.appendChild(chunk);
    lines += n;
    dropFromTop();
    if (dropped && note) note.hidden = false;
    if (follow) pre.scrollTop = pre.scrollHeight;
  };
  const es = new EventSource(pre.dataset.src);
  es.onmessage = (e) => {
    pending += e.data;
    pendingLines += newlines(e.data);
    if (pendingLines > 2 * MAX_LINES) {
      // Far behind: keep only what can still be shown.
      pending = lastLines(pending);
      pendingLines = MAX_LINES;
      pre.replaceChildren();
      lines = 0;
      dropped = true;
    }
    // At most ten draws a second: each one lays the view out again.
    if (!scheduled) { scheduled = true; setTimeout(() => requestAnimationFrame(draw), DRAW_EVERY); }
  };
  es.addEventListener("skipped", (e) => {
    const el = document.getElementById("logskipped");
    if (el) { el.hidden = false; el.querySelector("b").textContent = e.data; }
  });
  es.addEventListener("end", () => {
    es.close();
    draw();
    if (status) status.textContent = "log complete";
  });
  es.onerror = () => { if (status) status.textContent = "reconnecting…"; };
  es.onopen = () => { if (status) status.textContent = "live"; };
}

// A file chosen for upload is read into the pipeline text box (no multipart form needed).
function upload(input) {
  input.addEventListener("change", () => {
    const f = input.files && input.files[0];
    if (!f) return;
    f.text().then((t) => { document.getElementById("yaml").value = t; });
  });
}

document.addEventListener("DOMContentLoaded", () => {
  const main = document.querySelector("main");
  if (main) refresh(main);
  const log = document.getElementById("log");
  if (log) liveLog(log);
  const file = document.getElementById("file");
  if (file) upload(file);
});
