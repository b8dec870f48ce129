// trimcpp serve's chat page. It talks to the server's public routes only: /v1/models, the
// OpenAI-compatible /v1/chat/completions (streamed) and /v1/trimcpp/preload, which encodes a
// picture the moment it is attached. Everything the model or the user wrote is put into the page
// as text (textContent), never as markup. The API key, if the server asks for one, lives in this
// page's memory only.
"use strict";

const $ = (id) => document.getElementById(id);
const DIM = 0.3; // a dropped patch keeps this share of its brightness (as `trimcpp show`)

const state = {
  history: [], // the conversation's messages, as the server gets them
  pictures: [], // data: URLs of the pictures sent so far, in prompt order
  pending: [], // attached, not sent yet: {url, name, status, chip}
  attaching: Promise.resolve(), // attaches run one after another
  controller: null, // the answer in flight
  apiKey: null,
  chat: 0, // bumped by "new chat": answers and preloads of an older chat are dropped
};

// --- the server ---

async function api(path, init = {}) {
  for (;;) {
    const headers = { "Content-Type": "application/json" };
    if (state.apiKey !== null) headers.Authorization = `Bearer ${state.apiKey}`;
    const response = await fetch(path, { ...init, headers });
    if (response.status !== 401) return response;
    const key = await askKey();
    if (key === null) return response;
    state.apiKey = key;
  }
}

function askKey() {
  const dialog = $("key-dialog");
  $("key").value = "";
  return new Promise((resolve) => {
    const done = (event) => {
      event.preventDefault();
      dialog.close();
      $("key-form").removeEventListener("submit", done);
      resolve(event.submitter && event.submitter.value === "ok" ? $("key").value : null);
    };
    $("key-form").addEventListener("submit", done);
    dialog.showModal();
  });
}

async function errorText(response) {
  const text = await response.text();
  try {
    const body = JSON.parse(text);
    return (body.error && body.error.message) || body.detail || text;
  } catch {
    return text || `HTTP ${response.status}`;
  }
}

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
      if (data === "[DONE]") return;
      yield JSON.parse(data);
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

function loadImage(url) {
  return new Promise((resolve, reject) => {
    const image = new Image();
    image.onload = () => resolve(image);
    image.onerror = () => reject(new Error("the browser cannot show this picture"));
    image.src = url;
  });
}

function setStatus(picture, status, text) {
  picture.status = status;
  picture.chip.dataset.status = status;
  picture.chip.querySelector(".status").textContent = text;
}

// Encodes the picture on the server now (the preload route), with the conversation so far, so that
// the question finds its rows ready; the server also prefills it while it waits.
async function attach(file) {
  const chat = state.chat;
  const chip = element("div", "chip");
  chip.append(element("span", "name", file.name), element("span", "status", "reading"));
  const remove = element("button", "remove", "\u00d7");
  remove.type = "button";
  remove.title = "remove";
  chip.append(remove);
  $("attachments").append(chip);
  const picture = { url: null, name: file.name, status: "reading", chip };
  remove.addEventListener("click", () => {
    state.pending = state.pending.filter((p) => p !== picture);
    chip.remove();
  });
  try {
    picture.url = await readDataUrl(file);
  } catch (error) {
    setStatus(picture, "failed", `failed: ${error}`);
    return;
  }
  const thumb = element("img", "thumb");
  thumb.src = picture.url;
  thumb.alt = "";
  chip.prepend(thumb);
  state.pending.push(picture);
  setStatus(picture, "encoding", "encoding\u2026");
  const pictures = state.pending.filter((p) => p.status !== "failed");
  const content = pictures.map((p) => imagePart(p.url));
  const body = { model: model(), messages: [...state.history, { role: "user", content }] };
  let response;
  try {
    response = await api("v1/trimcpp/preload", { method: "POST", body: JSON.stringify(body) });
  } catch (error) {
    setStatus(picture, "failed", `failed: ${error}`);
    return;
  }
  if (chat !== state.chat) return;
  if (!response.ok) {
    const why = await errorText(response);
    if (why.includes("does not prune images")) setStatus(picture, "attached", "attached (this model encodes it with the question)");
    else setStatus(picture, "failed", `failed: ${why}`);
    return;
  }
  const mine = (await response.json()).images[pictures.indexOf(picture)];
  setStatus(picture, "ready", mine.cached ? `ready: ${mine.rows} rows (encoded already)`
    : `ready: ${mine.rows} rows, encoded in ${seconds(mine.encode_seconds)}`);
}

function attachFiles(files) {
  for (const file of files) state.attaching = state.attaching.then(() => attach(file));
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
  const trimcpp = { ...options, ...(method ? { method } : {}), masks: true, ...(extra.trimcpp || {}) };
  return {
    model: model(), messages, stream: true, temperature: Number($("temperature").value),
    max_tokens: Number($("max-tokens").value), ...extra, trimcpp,
  };
}

function timings(image, firstToken) {
  const parts = [`kept ${image.kept} of ${image.rows} rows`];
  const spent = image.seconds || {};
  if (image.path === "full") parts.push(`prefilled before you asked (${image.prefilled_rows} rows)`);
  else if (image.preloaded) parts.push("encoded before you asked");
  else parts.push(`encode ${seconds(spent.encode || 0)}`);
  if (spent.wait) parts.push(`waited ${seconds(spent.wait)} for the encode`);
  parts.push(`select ${seconds(spent.select || 0)}`, `image prefill ${seconds(spent.prefill || 0)}`);
  if (firstToken !== undefined) parts.push(`first token ${seconds(firstToken)}`);
  return parts.join(" \u00b7 ");
}

// The picture with the patches the LLM saw as they are and the others dimmed: the server's mask
// (libmtmd's geometry, computed there) decides which pixels are which.
async function overlay(pictureUrl, mask) {
  const [picture, shape] = await Promise.all([loadImage(pictureUrl), loadImage(mask.png)]);
  const canvas = element("canvas", "overlay");
  canvas.width = shape.naturalWidth;
  canvas.height = shape.naturalHeight;
  const context = canvas.getContext("2d");
  context.imageSmoothingEnabled = false;
  context.drawImage(shape, 0, 0);
  const kept = context.getImageData(0, 0, canvas.width, canvas.height).data;
  context.imageSmoothingEnabled = true;
  context.drawImage(picture, 0, 0, canvas.width, canvas.height);
  const pixels = context.getImageData(0, 0, canvas.width, canvas.height);
  for (let i = 0; i < kept.length; i += 4) {
    if (kept[i] < 128) {
      for (let c = 0; c < 3; c++) pixels.data[i + c] = Math.round(pixels.data[i + c] * DIM);
    }
  }
  context.putImageData(pixels, 0, 0);
  const figure = element("figure");
  figure.append(canvas, element("figcaption", "", mask.title));
  return figure;
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

// One streamed answer into a column of the turn; the answer's text, or null if there is none.
async function ask(messages, options, answers, pictures) {
  const chat = state.chat;
  const column = element("article", "answer");
  column.dataset.state = "streaming";
  const text = element("p", "answer-text");
  const info = element("div", "info");
  column.append(element("h2", "", keepLabel(options)), text, info);
  answers.append(column);
  state.controller = new AbortController();
  $("stop").disabled = false;
  let answer = "";
  let meta = null;
  try {
    const body = requestBody(messages, options);
    const response = await api("v1/chat/completions", { method: "POST", body: JSON.stringify(body), signal: state.controller.signal });
    if (!response.ok) throw new Error(await errorText(response));
    for await (const event of events(response)) {
      if (event.error) throw new Error(event.error.message || JSON.stringify(event.error));
      if (event.trimcpp) meta = event.trimcpp;
      const delta = event.choices && event.choices[0] && event.choices[0].delta;
      if (delta && delta.content) {
        answer += delta.content;
        text.textContent = answer;
      }
    }
    column.dataset.state = "done";
  } catch (error) {
    if (error.name === "AbortError") {
      column.dataset.state = "stopped";
      info.append(element("p", "note", "stopped"));
    } else {
      column.dataset.state = "failed";
      column.dataset.drawn = "yes";
      info.append(element("p", "error", String(error.message || error)));
      return null;
    }
  } finally {
    state.controller = null;
    $("stop").disabled = true;
  }
  if (meta && chat === state.chat) {
    for (const [i, image] of meta.images.entries()) {
      const line = element("p", "rows", timings(image, meta.first_token_seconds));
      line.dataset.kept = image.kept;
      line.dataset.rows = image.rows;
      const figures = element("div", "figures");
      figures.dataset.image = i;
      info.append(line, figures);
      if (image.masks) {
        for (const mask of image.masks) figures.append(await overlay(pictures[i], mask));
      } else if (image.mask_error) {
        figures.append(element("p", "note", `no overlay: ${image.mask_error}`));
      }
    }
  }
  column.dataset.drawn = "yes";
  return answer;
}

async function send(event) {
  event.preventDefault();
  const question = $("question").value.trim();
  if (state.controller !== null) return;
  const pictures = state.pending.filter((p) => p.status !== "failed" && p.url !== null);
  if (!question && !pictures.length) return;
  for (const picture of state.pending) picture.chip.remove();
  state.pending = [];
  $("question").value = "";
  const user = { role: "user", content: [...pictures.map((p) => imagePart(p.url)), { type: "text", text: question }] };
  const messages = [...state.history, user];
  const promptPictures = [...state.pictures, ...pictures.map((p) => p.url)];
  const answers = addTurn(question, pictures);
  const options = keepOption();
  // Compared answers both prefill from scratch: neither finds the other's rows in the KV cache.
  const runs = $("compare").checked && options.keep !== 0
    ? [{ keep: 0, reuse_kv: false }, { ...options, reuse_kv: false }] : [options];
  let answer = null;
  for (const run of runs) {
    answer = await ask(messages, run, answers, promptPictures);
    if (answer === null) return; // the turn failed: it stays out of the conversation
  }
  state.history.push(user, { role: "assistant", content: answer });
  state.pictures = promptPictures;
}

function newChat() {
  if (state.controller !== null) state.controller.abort();
  state.chat += 1;
  state.history = [];
  state.pictures = [];
  for (const picture of state.pending) picture.chip.remove();
  state.pending = [];
  for (const turn of document.querySelectorAll(".turn")) turn.remove();
  $("hint").hidden = false;
}

async function loadChoices() {
  const response = await api("v1/models");
  if (response.ok) {
    for (const entry of (await response.json()).data) $("model").append(element("option", "", entry.id));
  }
  const schema = await fetch("openapi.json").then((r) => (r.ok ? r.json() : null)).catch(() => null);
  const methods = schema && schema.components.schemas.TrimOptions.properties.method.enum;
  for (const name of methods || []) $("method").append(element("option", "", name));
  document.body.dataset.ready = "yes";
}

$("composer").addEventListener("submit", send);
$("question").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) {
    event.preventDefault();
    $("composer").requestSubmit();
  }
});
$("stop").addEventListener("click", () => state.controller && state.controller.abort());
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
