// trimcpp serve's chat page. It talks to the server's public routes only: /v1/models, /openapi.json
// (the methods), the OpenAI-compatible /v1/chat/completions (streamed) and /v1/trimcpp/preload,
// which encodes a picture the moment it is attached. Everything the model or the user wrote is put
// into the page as text (textContent), never as markup. The API key, if the server asks for one,
// lives in this page's memory only.
"use strict";

const $ = (id) => document.getElementById(id);

const state = {
  history: [], // the conversation's messages, as the server gets them
  pending: [], // attached, not sent yet: {url, name, status, chip}
  attaching: Promise.resolve(), // attaches run one after another
  turn: Promise.resolve(), // the turn in progress (a picture attached meanwhile waits for it)
  busy: false, // a turn is in progress
  stop: false, // Stop was pressed during this turn
  controller: null, // the answer in flight
  apiKey: null,
  asking: null, // the API key dialog, while it is open
  chat: 0, // bumped by "new chat": answers and preloads of an older chat are dropped
};

// --- the server ---

async function api(path, init = {}) {
  for (;;) {
    const headers = { "Content-Type": "application/json" };
    if (state.apiKey !== null) headers.Authorization = `Bearer ${state.apiKey}`;
    const response = await fetch(path, { ...init, headers });
    if (response.status !== 401) return response;
    state.asking = state.asking || askKey().finally(() => { state.asking = null; });
    const key = await state.asking;
    if (key === null) return response;
    state.apiKey = key;
  }
}

function askKey() {
  const dialog = $("key-dialog");
  $("key").value = "";
  dialog.returnValue = "";
  return new Promise((resolve) => {
    // Closed by its buttons (a method="dialog" form) or by Escape (returnValue stays "").
    dialog.addEventListener("close", () => resolve(dialog.returnValue === "ok" ? $("key").value : null), { once: true });
    dialog.showModal();
  });
}

async function apiError(response) {
  const text = await response.text();
  try {
    const body = JSON.parse(text);
    return { message: (body.error && body.error.message) || body.detail || text, code: body.error && body.error.code };
  } catch {
    return { message: text || `HTTP ${response.status}`, code: null };
  }
}

// The events of a streamed answer; null for the final [DONE].
async function* events(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    for (let end = buffer.indexOf("\n"); end >= 0; end = buffer.indexOf("\n")) {
      const line = buffer.slice(0, end).replace(/\r$/, "");
      buffer = buffer.slice(end + 1);
      if (!line.startsWith("data:")) continue;
      const data = line.slice(5).trim();
      yield data === "[DONE]" ? null : JSON.parse(data);
    }
  }
}

function imagePart(url) {
  return { type: "image_url", image_url: { url } };
}

function model() {
  return $("model").value || undefined;
}

// --- the page ---

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function seconds(value) {
  return `${value < 10 ? value.toFixed(2) : value.toFixed(1)} s`;
}

function readDataUrl(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

function setStatus(picture, status, text) {
  picture.status = status;
  picture.chip.dataset.status = status;
  picture.chip.querySelector(".status").textContent = text;
}

function chipFor(picture) {
  const chip = element("div", "chip");
  const remove = element("button", "remove", "\u00d7");
  remove.type = "button";
  remove.title = "remove";
  remove.addEventListener("click", () => {
    state.pending = state.pending.filter((p) => p !== picture);
    chip.remove();
  });
  chip.append(element("span", "name", picture.name), element("span", "status"), remove);
  return chip;
}

function attachFiles(files) {
  for (const file of files) {
    const picture = { url: null, name: file.name, status: "queued", chip: null };
    picture.chip = chipFor(picture);
    setStatus(picture, "queued", "queued");
    $("attachments").append(picture.chip);
    state.pending.push(picture);
    // Attached during a turn, it is preloaded with that turn in the conversation, for the next one.
    const after = state.turn;
    state.attaching = state.attaching.then(() => after).then(() => attach(picture, file))
      .catch((error) => setStatus(picture, "failed", `failed: ${error.message || error}`));
  }
}

// Encodes the picture on the server now (the preload route), with the conversation so far, so that
// the question finds its rows ready; the server also prefills it while it waits.
async function attach(picture, file) {
  if (!state.pending.includes(picture)) return; // removed, or a new chat meanwhile
  setStatus(picture, "reading", "reading");
  picture.url = await readDataUrl(file);
  const thumb = element("img", "thumb");
  thumb.src = picture.url;
  thumb.alt = "";
  picture.chip.prepend(thumb);
  if (!state.pending.includes(picture)) return;
  setStatus(picture, "encoding", "encoding\u2026");
  const chat = state.chat;
  const pictures = state.pending.filter((p) => p.url !== null && p.status !== "failed");
  const body = { model: model(), messages: [...state.history, { role: "user", content: pictures.map((p) => imagePart(p.url)) }] };
  let response;
  try {
    response = await api("v1/trimcpp/preload", { method: "POST", body: JSON.stringify(body) });
  } catch (error) {
    setStatus(picture, "attached", `attached (not encoded ahead: ${error.message || error})`);
    return;
  }
  if (chat !== state.chat) return;
  if (response.ok) {
    const mine = (await response.json()).images[pictures.indexOf(picture)];
    setStatus(picture, "ready", mine.cached ? `ready: ${mine.rows} rows (encoded already)`
      : `ready: ${mine.rows} rows, encoded in ${seconds(mine.encode_seconds)}`);
    return;
  }
  const error = await apiError(response);
  const refused = response.status >= 400 && response.status < 500 && ![401, 409].includes(response.status);
  if (refused && error.code !== "model_not_trimmed") {
    setStatus(picture, "failed", `failed: ${error.message}`); // the picture itself: it is not sent
  } else {
    setStatus(picture, "attached", `attached (not encoded ahead: ${error.message})`);
  }
}

function keepOption() {
  const kind = $("keep-kind").value;
  if (kind === "model") return {};
  if (kind === "all") return { keep: 0 };
  return { keep: Number($("keep-value").value) };
}

function keepLabel(options) {
  if (options.keep === undefined) return "model's setting";
  return options.keep === 0 ? "every row" : `keep ${options.keep}`;
}

function requestBody(messages, options) {
  let extra = {};
  const text = $("extra").value.trim();
  if (text) {
    extra = JSON.parse(text); // a SyntaxError is the turn's error
    if (typeof extra !== "object" || extra === null || Array.isArray(extra)) throw new Error("extra request fields: a JSON object");
  }
  const method = $("method").value;
  const trimcpp = { ...options, ...(method ? { method } : {}), overlay: true, ...(extra.trimcpp || {}) };
  return {
    temperature: Number($("temperature").value), max_tokens: Number($("max-tokens").value), ...extra,
    model: model(), messages, stream: true, trimcpp,
  };
}

function timings(image) {
  const parts = [`kept ${image.kept} of ${image.rows} rows`];
  const spent = image.seconds || {};
  if (image.path === "full") parts.push(`prefilled before you asked (${image.prefilled_rows} rows)`);
  else if (image.preloaded) parts.push("encoded before you asked");
  else parts.push(`encode ${seconds(spent.encode || 0)}`);
  if (spent.wait) parts.push(`waited ${seconds(spent.wait)} for the encode`);
  parts.push(`select ${seconds(spent.select || 0)}`, `image prefill ${seconds(spent.prefill || 0)}`);
  return parts.join(" \u00b7 ");
}

function addTurn(question, pictures) {
  const turn = element("section", "turn");
  const user = element("div", "user");
  for (const picture of pictures) {
    const thumb = element("img", "thumb");
    thumb.src = picture.url;
    thumb.alt = picture.name;
    user.append(thumb);
  }
  user.append(element("p", "question", question));
  const answers = element("div", "answers");
  turn.append(user, answers);
  $("hint").hidden = true;
  $("log").append(turn);
  return answers;
}

// What the answer's images looked like to the LLM: the server draws each picture with the kept
// patches as they are and the others dimmed (libmtmd's geometry stays on the server).
function showImages(info, meta) {
  for (const [i, image] of meta.images.entries()) {
    const line = element("p", "rows", timings(image));
    line.dataset.kept = image.kept;
    line.dataset.rows = image.rows;
    const figures = element("div", "figures");
    figures.dataset.image = i;
    info.append(line, figures);
    for (const panel of image.overlay || []) {
      const picture = element("img", "overlay");
      picture.src = panel.url;
      picture.alt = `image ${i + 1}, ${panel.title}: kept patches bright`;
      const figure = element("figure");
      figure.append(picture, element("figcaption", "", panel.title));
      figures.append(figure);
    }
    if (image.overlay_error) figures.append(element("p", "note", `no overlay: ${image.overlay_error}`));
  }
  if (meta.first_token_seconds !== undefined) info.prepend(element("p", "first-token", `first token ${seconds(meta.first_token_seconds)}`));
}

// One streamed answer into a column of the turn; the answer's text, or null if it failed.
async function ask(messages, options, answers) {
  const column = element("article", "answer");
  column.dataset.state = "streaming";
  const text = element("p", "answer-text");
  const info = element("div", "info");
  column.append(element("h2", "", keepLabel(options)), text, info);
  answers.append(column);
  state.controller = new AbortController();
  let answer = "";
  let meta = null;
  let finished = false;
  try {
    const body = requestBody(messages, options);
    const response = await api("v1/chat/completions", { method: "POST", body: JSON.stringify(body), signal: state.controller.signal });
    if (!response.ok) throw new Error((await apiError(response)).message);
    for await (const event of events(response)) {
      if (event === null) {
        finished = true;
        break;
      }
      if (event.error) throw new Error(event.error.message || JSON.stringify(event.error));
      if (event.trimcpp) meta = { ...meta, ...event.trimcpp };
      const delta = event.choices && event.choices[0] && event.choices[0].delta;
      if (delta && delta.content) {
        answer += delta.content;
        text.textContent = answer;
      }
    }
    column.dataset.state = finished ? "done" : "cut";
    if (!finished) info.append(element("p", "error", "the answer was cut short (the server closed the stream)"));
  } catch (error) {
    if (error.name === "AbortError") {
      column.dataset.state = "stopped";
      info.append(element("p", "note", "stopped"));
    } else {
      column.dataset.state = answer ? "cut" : "failed"; // text that arrived before the error stays
      info.append(element("p", "error", String(error.message || error)));
    }
    if (!answer) answer = null; // nothing came: no answer to keep
  } finally {
    state.controller = null;
  }
  if (meta && meta.images) showImages(info, meta);
  column.dataset.drawn = "yes";
  return answer;
}

// A turn that was not asked or failed: its question and pictures back in the composer.
function giveBack(question, pictures) {
  if (!$("question").value) $("question").value = question;
  for (const picture of [...pictures].reverse()) $("attachments").prepend(picture.chip);
  state.pending = [...pictures, ...state.pending];
}

async function send(event) {
  event.preventDefault();
  const question = $("question").value.trim();
  if (state.busy || (!question && !state.pending.length)) return;
  state.busy = true;
  state.stop = false;
  $("send").disabled = true;
  $("stop").disabled = false;
  $("question").value = "";
  const chat = state.chat;
  const taken = [...state.pending]; // pictures attached from now on wait for the next turn
  let done;
  state.turn = new Promise((resolve) => { done = resolve; });
  try {
    await state.attaching; // the taken pictures read, and encoded or failed
    if (chat !== state.chat) return; // a new chat began meanwhile
    const pictures = taken.filter((p) => state.pending.includes(p) && p.status !== "failed" && p.url !== null);
    for (const picture of taken) picture.chip.remove();
    state.pending = state.pending.filter((p) => !taken.includes(p));
    if (state.stop) return giveBack(question, pictures); // stopped before it was asked
    if (!question && !pictures.length) return;
    const user = { role: "user", content: [...pictures.map((p) => imagePart(p.url)), { type: "text", text: question }] };
    const answers = addTurn(question, pictures);
    const options = keepOption();
    // Compared answers both prefill from scratch: neither finds the other's rows in the KV cache.
    const runs = $("compare").checked && options.keep !== 0
      ? [{ keep: 0, reuse_kv: false }, { ...options, reuse_kv: false }] : [options];
    let answer = null;
    for (const run of runs) {
      if (state.stop) break;
      answer = await ask([...state.history, user], run, answers);
      if (answer === null || state.stop || chat !== state.chat) break;
    }
    if (chat !== state.chat) return; // a new chat began meanwhile
    if (answer === null) { // the turn failed: it stays out of the conversation, its input comes back
      answers.parentElement.dataset.failed = "yes";
      return giveBack(question, pictures);
    }
    state.history.push(user, { role: "assistant", content: answer });
  } finally {
    state.busy = false;
    $("send").disabled = false;
    $("stop").disabled = true;
    done();
  }
}

function newChat() {
  state.chat += 1;
  state.stop = true;
  if (state.controller !== null) state.controller.abort();
  state.history = [];
  for (const picture of state.pending) picture.chip.remove();
  state.pending = [];
  for (const turn of document.querySelectorAll(".turn")) turn.remove();
  $("hint").hidden = false;
}

async function loadChoices() {
  try {
    const response = await api("v1/models");
    if (response.ok) {
      for (const entry of (await response.json()).data) $("model").append(element("option", "", entry.id));
    }
    const schema = await fetch("openapi.json").then((r) => (r.ok ? r.json() : null)).catch(() => null);
    const method = schema?.components?.schemas?.TrimOptions?.properties?.method;
    for (const name of (method?.anyOf || [method]).flatMap((s) => s?.enum || [])) {
      $("method").append(element("option", "", name));
    }
  } finally {
    document.body.dataset.ready = "yes";
  }
}

$("composer").addEventListener("submit", send);
$("question").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    $("composer").requestSubmit();
  }
});
$("stop").addEventListener("click", () => {
  state.stop = true;
  if (state.controller !== null) state.controller.abort();
});
$("new-chat").addEventListener("click", newChat);
$("file").addEventListener("change", (event) => {
  attachFiles([...event.target.files]);
  event.target.value = "";
});
$("keep-kind").addEventListener("change", () => {
  const kind = $("keep-kind").value;
  $("keep-value").hidden = kind === "model" || kind === "all";
  $("keep-value").value = kind === "share" ? "0.11" : "64";
});
document.addEventListener("dragover", (event) => event.preventDefault());
document.addEventListener("drop", (event) => {
  event.preventDefault();
  attachFiles([...event.dataTransfer.files]);
});
document.addEventListener("paste", (event) => {
  const files = [...event.clipboardData.files];
  if (files.length) {
    event.preventDefault();
    attachFiles(files);
  }
});
loadChoices();
