// Strongroom console: plain DOM, the gateway's JSON API, CodeMirror 5 for Lua.
// Untrusted text only ever goes into the page as text nodes (never innerHTML).

const $ = (sel) => document.querySelector(sel);
const state = {
  token: sessionStorage.getItem("sr.token"),
  kind: sessionStorage.getItem("sr.kind"),
  id: sessionStorage.getItem("sr.id"),
  groups: [],
  plugin: null, // the plugin open in the editor (null: not saved yet)
  editor: null,
};

const SAMPLE = `-- input: the request body; return a value for the response body.
function run(input)
  local key = assert(Sobject { name = input.key })
  local out = key:encrypt { plain = Blob.from_bytes(input.text or ""), alg = "AES" }
  print("encrypted", #(input.text or ""), "bytes")
  return { cipher = out.cipher:base64(), iv = out.iv:base64() }
end
`;

class ApiError extends Error {
  constructor(status, body) {
    super((body && body.message) || `HTTP ${status}`);
    this.status = status;
    this.body = body || {};
  }
}

async function api(method, path, body, auth) {
  const headers = { Accept: "application/json" };
  if (auth) headers.Authorization = auth;
  else if (state.token) headers.Authorization = `Bearer ${state.token}`;
  const init = { method, headers };
  if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const resp = await fetch(path, init);
  if (resp.status === 204) return null;
  const data = await resp.json().catch(() => null);
  if (!resp.ok) {
    if (resp.status === 401 && !auth) logout("Your session ended: log in again.");
    throw new ApiError(resp.status, data);
  }
  return data;
}

// -- small DOM helpers -------------------------------------------------------------------

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (k === "dataset") Object.assign(node.dataset, v);
    else node.setAttribute(k, v);
  }
  for (const c of children.flat(Infinity)) {
    if (c !== null && c !== undefined) node.append(c instanceof Node ? c : String(c));
  }
  return node;
}

function flash(message, kind = "error") {
  const box = $("#flash");
  box.textContent = message;
  box.className = kind;
  box.hidden = false;
  clearTimeout(flash.timer);
  flash.timer = setTimeout(() => (box.hidden = true), 6000);
}

function clearFlash() {
  clearTimeout(flash.timer);
  $("#flash").hidden = true;
}

function guard(fn) {
  return async (event) => {
    if (event && event.preventDefault) event.preventDefault();
    try {
      await fn(event);
    } catch (err) {
      flash(err.body && err.body.error ? `${err.body.error}: ${err.message}` : err.message);
    }
  };
}

function fillTable(table, rows, cells, onClick) {
  const tbody = table.querySelector("tbody");
  tbody.replaceChildren(
    ...rows.map((row) => {
      const tr = el("tr", {}, cells(row).map((c) => el("td", {}, c)));
      if (onClick) tr.addEventListener("click", () => onClick(row, tr));
      return tr;
    }),
  );
  if (!rows.length) tbody.append(el("tr", {}, el("td", { colspan: "9", class: "muted" }, "none")));
}

// One date format everywhere: "2026-11-30 22:30:15" (UTC). The API gives both
// "20261130T223015Z" (objects' created_at) and ISO 8601 with milliseconds (audit).
function when(stamp, withMillis = false) {
  if (!stamp) return "";
  const s = String(stamp);
  const m = s.match(/^(\d{4})-?(\d{2})-?(\d{2})T(\d{2}):?(\d{2}):?(\d{2})(\.\d+)?Z?$/);
  if (!m) return s;
  const ms = withMillis && m[7] ? m[7].slice(0, 4) : "";
  return `${m[1]}-${m[2]}-${m[3]} ${m[4]}:${m[5]}:${m[6]}${ms}`;
}

const short = (id) => (id ? String(id).slice(0, 8) : "");
const groupName = (gid) => (state.groups.find((g) => g.group_id === gid) || {}).name || short(gid);
const pretty = (v) => (v === undefined ? "" : JSON.stringify(v, null, 2));

// Loads of one kind can overlap (a view's own load, then a form's reload after a
// change; a click on a key row, then a new key): only the newest may render, so an
// older answer that comes back later never overwrites a newer one.
const turns = {};
function turn(name) {
  const mine = (turns[name] = (turns[name] || 0) + 1);
  return () => turns[name] === mine;
}

// -- session -------------------------------------------------------------------------------

async function login(event) {
  event.preventDefault();
  const key = $("#login-key").value.trim();
  try {
    const s = await api("POST", "/sys/v1/session/auth", undefined, `Basic ${key}`);
    Object.assign(state, { token: s.access_token, kind: s.kind, id: s.entity_id });
    sessionStorage.setItem("sr.token", s.access_token);
    sessionStorage.setItem("sr.kind", s.kind);
    sessionStorage.setItem("sr.id", s.entity_id);
    $("#login-key").value = "";
    clearFlash();
    await enter();
  } catch (err) {
    flash(`Log in failed: ${err.message}`);
  }
}

function logout(message) {
  if (state.token) api("POST", "/sys/v1/session/terminate").catch(() => {});
  state.token = null;
  sessionStorage.clear();
  $("#nav").hidden = $("#who").hidden = true;
  show("login");
  if (typeof message === "string") flash(message, "info");
}

async function enter() {
  document.body.classList.toggle("is-admin", state.kind === "admin");
  $("#who-name").textContent = `${state.kind} ${short(state.id)}`;
  $("#nav").hidden = $("#who").hidden = false;
  await loadGroups();
  await show("keys");
}

// -- views ---------------------------------------------------------------------------------

const loaders = {
  groups: loadGroups,
  apps: loadApps,
  keys: loadKeys,
  plugins: loadPlugins,
  audit: loadAudit,
};

async function show(view) {
  for (const s of document.querySelectorAll(".view")) s.hidden = s.id !== `view-${view}`;
  for (const b of document.querySelectorAll("#nav button")) {
    b.classList.toggle("active", b.dataset.view === view);
  }
  if (loaders[view]) await guard(loaders[view])();
  if (view === "editor" && state.editor) state.editor.refresh();
}

async function loadGroups() {
  const current = turn("groups");
  const groups = await api("GET", "/sys/v1/groups");
  if (!current()) return;
  state.groups = groups;
  fillTable($("#groups-table"), state.groups, (g) => [g.name, g.description, short(g.group_id), when(g.created_at)]);
  for (const sel of document.querySelectorAll(".group-select")) {
    sel.replaceChildren(...state.groups.map((g) => el("option", { value: g.group_id }, g.name)));
  }
  for (const box of document.querySelectorAll(".group-picks")) {
    const checked = new Set(pickedGroups(box));
    box.replaceChildren(
      ...state.groups.map((g) =>
        el("label", { class: "pick" }, Object.assign(el("input", { type: "checkbox", value: g.group_id }), { checked: checked.has(g.group_id) }), g.name),
      ),
    );
  }
}

function pickedGroups(box) {
  return [...box.querySelectorAll("input:checked")].map((i) => i.value);
}

function setPicked(box, ids) {
  for (const i of box.querySelectorAll("input")) i.checked = ids.includes(i.value);
}

async function createGroup(event) {
  const f = event.target;
  await api("POST", "/sys/v1/groups", { name: f.name.value, description: f.description.value });
  f.reset();
  await loadGroups();
  flash("Group created.", "info");
}

// DSM's AppPermissions: how many there are, to show a group with all of them as "all".
const ALL_APP_PERMISSIONS = 33;

// An app's groups: DSM's map of group id -> the app's permissions in that group.
function appGroups(groups) {
  return Object.entries(groups || {})
    .map(([gid, perms]) => `${groupName(gid)}: ${perms.length >= ALL_APP_PERMISSIONS ? "all" : perms.join(" ") || "none"}`)
    .join("; ");
}

async function loadApps() {
  const current = turn("apps");
  const apps = state.kind === "admin" ? await api("GET", "/sys/v1/apps") : [];
  if (!current()) return;
  fillTable($("#apps-table"), apps, (a) => [a.name, appGroups(a.groups), a.enabled ? "yes" : "no", short(a.app_id)]);
}

async function createApp(event) {
  const f = event.target;
  const picked = pickedGroups(f.querySelector(".group-picks"));
  // Blank: every permission in each picked group (the list form); else the same
  // permissions in each (DSM's map form).
  const perms = f.permissions.value.split(/[\s,]+/).filter(Boolean).map((p) => p.toUpperCase());
  const groups = perms.length ? { add_groups: Object.fromEntries(picked.map((g) => [g, perms])) } : { groups: picked };
  const app = await api("POST", "/sys/v1/apps", { name: f.name.value, description: f.description.value, ...groups });
  f.reset();
  $("#app-secret-name").textContent = app.name;
  $("#app-secret-key").textContent = app.credential.api_key;
  $("#app-secret").hidden = false;
  await loadApps();
}

// -- keys ------------------------------------------------------------------------------------

async function loadKeys() {
  const current = turn("keys");
  const keys = await api("GET", "/crypto/v1/keys?limit=1000");
  if (!current()) return;
  fillTable(
    $("#keys-table"),
    keys,
    (k) => [k.name, k.obj_type, k.key_size || k.elliptic_curve || "", groupName(k.group_id), (k.key_ops || []).join(" ")],
    guard(async (k) => {
      const shown = turn("key-detail");
      const full = await api("GET", `/crypto/v1/keys/${encodeURIComponent(k.kid)}`);
      if (shown()) showKey(full);
    }),
  );
}

// -- public keys: the SubjectPublicKeyInfo in pub_key, re-encoded (as the client's _pubkey.py) --

const b64bytes = (b64) => Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
const bytesB64 = (bytes) => btoa(String.fromCharCode(...bytes));
const b64url = (bytes) => bytesB64(bytes).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
const hex = (bytes) => [...bytes].map((b) => b.toString(16).padStart(2, "0")).join("");

// One DER element at `at` -> {tag, body, end}.
function tlv(d, at) {
  const tag = d[at];
  let n = d[at + 1];
  at += 2;
  if (n & 0x80) {
    const w = n & 0x7f;
    n = 0;
    for (let i = 0; i < w; i++) n = n * 256 + d[at + i];
    at += w;
  }
  if (at + n > d.length) throw new Error("truncated DER");
  return { tag, body: d.subarray(at, at + n), end: at + n };
}

function children(d) {
  const out = [];
  for (let at = 0; at < d.length; ) {
    const e = tlv(d, at);
    out.push(e);
    at = e.end;
  }
  return out;
}

const CURVES = {
  "2a8648ce3d030107": ["P-256", "nistp256", 32],
  "2b81040022": ["P-384", "nistp384", 48],
  "2b81040023": ["P-521", "nistp521", 66],
  "2b8104000a": ["secp256k1", null, 32],
};

function parseSpki(der) {
  const [alg, bits] = children(tlv(der, 0).body);
  const [oid, params] = children(alg.body);
  const key = bits.body.subarray(1);
  const strip = (b) => { let i = 0; while (i < b.length - 1 && b[i] === 0) i++; return b.subarray(i); };
  switch (hex(oid.body)) {
    case "2a864886f70d010101": {
      const [n, e] = children(tlv(key, 0).body);
      return { kind: "RSA", n: strip(n.body), e: strip(e.body) };
    }
    case "2a8648ce3d0201": {
      const [crv, ssh, size] = CURVES[hex(params.body)] || [];
      if (!crv) throw new Error("unknown curve");
      return { kind: "EC", crv, ssh, size, point: key };
    }
    case "2b6570":
      return { kind: "Ed25519", x: key };
  }
  throw new Error("unknown key algorithm");
}

function sshString(bytes) {
  const out = new Uint8Array(4 + bytes.length);
  new DataView(out.buffer).setUint32(0, bytes.length);
  out.set(bytes, 4);
  return out;
}

const ascii = (s) => new TextEncoder().encode(s);
const mpint = (b) => sshString(b[0] & 0x80 ? Uint8Array.from([0, ...b]) : b);
const concat = (...parts) => Uint8Array.from(parts.flatMap((p) => [...p]));

function publicKeyText(k, format) {
  const der = b64bytes(k.pub_key);
  if (format === "DER") return bytesB64(der);
  if (format === "PEM") {
    return `-----BEGIN PUBLIC KEY-----\n${bytesB64(der).match(/.{1,64}/g).join("\n")}\n-----END PUBLIC KEY-----`;
  }
  const f = parseSpki(der);
  if (format === "JWK") {
    let jwk;
    if (f.kind === "RSA") jwk = { kty: "RSA", n: b64url(f.n), e: b64url(f.e) };
    else if (f.kind === "EC") {
      jwk = { kty: "EC", crv: f.crv, x: b64url(f.point.subarray(1, 1 + f.size)), y: b64url(f.point.subarray(1 + f.size)) };
    } else jwk = { kty: "OKP", crv: "Ed25519", x: b64url(f.x) };
    return JSON.stringify({ ...jwk, kid: k.kid }, null, 2);
  }
  let name, blob;
  if (f.kind === "RSA") [name, blob] = ["ssh-rsa", concat(sshString(ascii("ssh-rsa")), mpint(f.e), mpint(f.n))];
  else if (f.kind === "EC") {
    if (!f.ssh) return `OpenSSH has no key type for the curve ${f.crv}.`;
    name = `ecdsa-sha2-${f.ssh}`;
    blob = concat(sshString(ascii(name)), sshString(ascii(f.ssh)), sshString(f.point));
  } else [name, blob] = ["ssh-ed25519", concat(sshString(ascii("ssh-ed25519")), sshString(f.x))];
  return `${name} ${bytesB64(blob)} ${k.name}`;
}

function showKey(k) {
  const rows = [
    ["kid", k.kid],
    ["type", k.obj_type],
    ["size", k.key_size],
    ["curve", k.elliptic_curve],
    ["group", `${groupName(k.group_id)} (${short(k.group_id)})`],
    ["key ops", (k.key_ops || []).join(", ")],
    ["created", when(k.created_at)],
    ["creator", k.creator ? Object.entries(k.creator).map(([a, b]) => `${a} ${short(b)}`).join(", ") : ""],
    ["enabled", String(k.enabled)],
    ["description", k.description],
  ].filter(([, v]) => v !== undefined && v !== null && v !== "");
  const box = $("#key-detail");
  const parts = [el("h3", {}, k.name), el("dl", {}, rows.map(([a, b]) => [el("dt", {}, a), el("dd", {}, b)]))];
  if (k.pub_key) {
    const out = el("pre", { id: "pub-key", class: "pem" }, publicKeyText(k, "PEM"));
    const pick = el(
      "select",
      { id: "pub-format", "aria-label": "Public key format" },
      ["PEM", "DER", "JWK", "OpenSSH"].map((f) => el("option", { value: f.toUpperCase() }, f === "DER" ? "DER (base64)" : f)),
    );
    pick.addEventListener("change", () => (out.textContent = publicKeyText(k, pick.value)));
    parts.push(el("div", { class: "row pub-head" }, el("h4", {}, "Public key"), pick), out);
  }
  box.replaceChildren(...parts);
  box.hidden = false;
}

// The new-key form shows only the fields that the chosen type takes.
const KEY_FIELDS = {
  AES: { sizes: [128, 192, 256], size: 256 },
  RSA: { sizes: [2048, 3072, 4096], size: 2048 },
  HMAC: { sizes: [256, 384, 512], size: 256 },
  SECRET: { sizes: [128, 256, 512], size: 256 },
  DES3: {},
  EC: { curve: true },
};

function keyTypeChanged() {
  const f = $("#key-form");
  const spec = KEY_FIELDS[f.obj_type.value] || {};
  $("#key-size-field").hidden = !spec.sizes;
  $("#key-curve-field").hidden = !spec.curve;
  if (spec.sizes) {
    f.key_size.replaceChildren(...spec.sizes.map((n) => el("option", { value: n }, n)));
    f.key_size.value = String(spec.size);
  }
}

async function createKey(event) {
  const f = event.target;
  const body = { name: f.name.value, obj_type: f.obj_type.value, group_id: f.group_id.value };
  const spec = KEY_FIELDS[body.obj_type] || {};
  if (spec.curve) body.elliptic_curve = f.elliptic_curve.value;
  if (spec.sizes) body.key_size = Number(f.key_size.value);
  const shown = turn("key-detail");
  const k = await api("POST", "/crypto/v1/keys", body);
  f.name.value = "";
  await loadKeys();
  if (shown()) showKey(k);
}

// -- plugins -----------------------------------------------------------------------------------

async function loadPlugins() {
  const current = turn("plugins");
  const plugins = await api("GET", "/sys/v1/plugins");
  if (!current()) return;
  fillTable(
    $("#plugins-table"),
    plugins,
    (p) => [p.name, p.version, p.groups.map(groupName).join(", "), p.enabled ? "yes" : "no", when(p.updated_at || p.created_at)],
    guard(async (p) => openEditor(await api("GET", `/sys/v1/plugins/${p.plugin_id}`))),
  );
}

function openEditor(plugin) {
  state.plugin = plugin;
  if (!state.editor) {
    state.editor = CodeMirror($("#editor"), {
      mode: "lua",
      lineNumbers: true,
      matchBrackets: true,
      indentUnit: 2,
      tabSize: 2,
    });
  }
  state.editor.setValue(plugin ? (plugin.source ? plugin.source.code : "") : SAMPLE);
  $("#plugin-name").value = plugin ? plugin.name : "";
  $("#plugin-description").value = plugin ? plugin.description : "";
  setPicked($("#plugin-groups"), plugin ? plugin.groups : state.groups.slice(0, 1).map((g) => g.group_id));
  $("#editor-title").textContent = plugin ? `Plugin ${plugin.name}` : "New plugin";
  $("#plugin-version").textContent = plugin ? `version ${plugin.version}` : "not saved";
  $("#plugin-invoke").disabled = !plugin;
  const admin = state.kind === "admin";
  state.editor.setOption("readOnly", !admin);
  $("#editor").hidden = !admin;
  $("#editor-note").hidden = admin;
  for (const i of document.querySelectorAll("#plugin-name, #plugin-description, #plugin-groups input")) i.disabled = !admin;
  $("#run-panel").hidden = $("#invoke-audit").hidden = true;
  show("editor");
}

async function savePlugin() {
  const body = {
    name: $("#plugin-name").value.trim(),
    description: $("#plugin-description").value,
    groups: pickedGroups($("#plugin-groups")),
    source: { language: "LUA", code: state.editor.getValue() },
  };
  try {
    const p = state.plugin
      ? await api("PATCH", `/sys/v1/plugins/${state.plugin.plugin_id}`, body)
      : await api("POST", "/sys/v1/plugins", body);
    state.plugin = p;
    $("#editor-title").textContent = `Plugin ${p.name}`;
    $("#plugin-version").textContent = `saved: version ${p.version}`;
    $("#plugin-invoke").disabled = false;
  } catch (err) {
    if (err.status !== 400) throw err;
    showRun("Save failed", { error: err.body });
  }
}

function input() {
  const text = $("#plugin-input").value.trim();
  try {
    return text ? JSON.parse(text) : null;
  } catch (err) {
    throw new Error(`The input is not JSON: ${err.message}`);
  }
}

async function testPlugin() {
  const body = { code: state.editor.getValue(), input: input(), groups: pickedGroups($("#plugin-groups")) };
  try {
    const out = await api("POST", "/sys/v1/plugins/test", body);
    showRun(`Test run: ${out.status}`, out);
  } catch (err) {
    if (err.status !== 400) throw err;
    showRun("Test run refused", { error: err.body });
  }
}

async function invokePlugin() {
  const p = state.plugin;
  let out;
  try {
    out = { status: 200, result: await api("POST", `/sys/v1/plugins/${p.plugin_id}`, input()) };
  } catch (err) {
    if (!err.status || err.status === 401) throw err;
    out = { status: err.status, error: err.body, traceback: err.body.traceback, invocation_id: err.body.invocation_id };
  }
  showRun(`Invocation: ${out.status}`, out);
  if (state.kind !== "admin") return; // the audit trail is for admins
  let inv = out.invocation_id;
  if (!inv) {
    const last = await api("GET", `/sys/v1/logs?object_id=${encodeURIComponent(p.plugin_id)}&limit=1`);
    inv = last.length ? last[0].invocation_id : null;
  }
  if (inv) {
    const recs = await api("GET", `/sys/v1/logs?invocation_id=${encodeURIComponent(inv)}&limit=500`);
    // Printed output is never audited; the daemon keeps recent ones in memory.
    // It is shown before the audit tree, so the panel is complete once it appears.
    try {
      const printed = await api("GET", `/sys/v1/plugins/invocations/${encodeURIComponent(inv)}/output`);
      $("#run-output").textContent = printed.output;
    } catch (err) {
      if (err.status !== 404) throw err; // nothing printed, or no longer kept
    }
    const box = $("#invoke-audit");
    renderAudit(box.querySelector(".audit-tree"), recs, true);
    box.hidden = false;
  }
}

function showRun(title, out) {
  $("#run-panel").hidden = false;
  $("#run-title").textContent = title;
  const st = out.stats || {};
  const stats = [];
  if (st.elapsed_ms !== undefined) stats.push(`time ${st.elapsed_ms.toFixed(1)} ms`);
  // The sandbox counts instructions in steps of 1,000 (its hook's period): 0 means fewer.
  if (st.instructions !== undefined) {
    stats.push(st.instructions > 0 ? `${st.instructions.toLocaleString("en")} instructions` : "under 1,000 instructions");
  }
  if (st.memory_peak !== undefined) stats.push(`memory peak ${(st.memory_peak / 1024).toFixed(0)} KiB`);
  if (st.api_calls !== undefined) stats.push(`${st.api_calls} API calls`);
  if (out.invocation_id) stats.push(`invocation ${short(out.invocation_id)}`);
  $("#run-stats").replaceChildren(...stats.map((s) => el("span", {}, s)));
  const error = out.error;
  const errBox = $("#run-error");
  errBox.hidden = !error;
  errBox.replaceChildren(error ? lineLinks(`${error.error}: ${error.message}`) : "");
  const tb = out.traceback || (error && error.traceback);
  $("#run-traceback").hidden = !tb;
  $("#run-traceback").replaceChildren(tb ? lineLinks(tb) : "");
  $("#run-result").textContent = error ? "" : pretty(out.result);
  $("#run-output").textContent = out.output || "";
}

// "test:3:" (test runs) or "<plugin name>:3:" become links that move the editor to line 3.
function lineLinks(text) {
  const names = new Set(["test", $("#plugin-name").value.trim()].filter(Boolean));
  const frag = document.createDocumentFragment();
  const re = /([\w.-]+):(\d+):/g;
  let at = 0;
  for (const m of text.matchAll(re)) {
    if (!names.has(m[1])) continue;
    frag.append(text.slice(at, m.index));
    const line = Number(m[2]);
    frag.append(el("a", { href: "#", class: "line-link", dataset: { line }, onclick: (e) => { e.preventDefault(); gotoLine(line); } }, m[0]));
    at = m.index + m[0].length;
  }
  frag.append(text.slice(at));
  return frag;
}

function gotoLine(line) {
  const cm = state.editor;
  const handle = cm.addLineClass(line - 1, "background", "cm-flash-line");
  cm.focus();
  cm.setCursor({ line: line - 1, ch: 0 });
  cm.scrollIntoView({ line: line - 1, ch: 0 }, 80);
  setTimeout(() => cm.removeLineClass(handle, "background", "cm-flash-line"), 1500);
}

// -- audit -----------------------------------------------------------------------------------

// Id filters go to the daemon; "action contains" and "failures only" filter what came back.
async function loadAudit() {
  const f = $("#audit-filters");
  const query = new URLSearchParams({ limit: "300" });
  for (const name of ["actor_id", "object_id", "invocation_id"]) {
    const v = f[name].value.trim();
    if (v) query.set(name, v);
  }
  const current = turn("audit");
  let records = await api("GET", `/sys/v1/logs?${query}`);
  if (!current()) return;
  const action = f.action.value.trim().toLowerCase();
  if (action) records = records.filter((r) => r.action.toLowerCase().includes(action));
  if (f.failed.checked) records = records.filter((r) => r.status >= 400);
  renderAudit($("#audit-list"), records);
}

const isInvocation = (r) => r.invocation_id && r.actor_kind !== "plugin" && r.action.startsWith("POST /sys/v1/plugins/");

// Records newest first; a plugin's own operations nest under the invocation that ran them.
function renderAudit(box, records, compact = false) {
  const heads = new Map(records.filter(isInvocation).map((r) => [r.invocation_id, r]));
  const nested = new Map();
  const top = [];
  for (const r of records) {
    if (r.invocation_id && heads.has(r.invocation_id) && heads.get(r.invocation_id) !== r) {
      if (!nested.has(r.invocation_id)) nested.set(r.invocation_id, []);
      nested.get(r.invocation_id).push(r);
    } else top.push(r);
  }
  const row = (r) =>
    el(
      "div",
      { class: `audit-row ${r.status >= 400 ? "failed" : ""}`, dataset: { seq: r.seq } },
      el("span", { class: "time", title: r.time }, compact ? when(r.time, true).slice(11) : when(r.time, true)),
      el("span", { class: "actor" }, `${r.actor_kind || "-"} ${short(r.actor_id)}`),
      el("span", { class: "action" }, r.action),
      el("span", { class: "object" }, short(r.object_id)),
      el("span", { class: "status" }, r.code ? `${r.status} ${r.code}` : r.status),
      r.detail ? el("span", { class: "detail" }, JSON.stringify(r.detail).slice(0, 200)) : null,
    );
  box.replaceChildren(
    ...top.map((r) => {
      const kids = nested.get(r.invocation_id);
      if (!isInvocation(r) || !kids) return el("div", { class: "audit-item" }, row(r));
      kids.sort((a, b) => a.seq - b.seq);
      return el(
        "div",
        { class: "audit-item invocation", dataset: { invocation: r.invocation_id } },
        row(r),
        el("div", { class: "nested" }, kids.map(row)),
      );
    }),
  );
  if (!records.length) box.append(el("p", { class: "muted" }, "no records"));
}

// -- wiring ------------------------------------------------------------------------------------

$("#login-form").addEventListener("submit", login);
$("#logout").addEventListener("click", () => logout());
for (const b of document.querySelectorAll("#nav button")) b.addEventListener("click", () => show(b.dataset.view));
$("#group-form").addEventListener("submit", guard(createGroup));
$("#app-form").addEventListener("submit", guard(createApp));
$("#app-secret-done").addEventListener("click", () => {
  $("#app-secret").hidden = true;
  $("#app-secret-key").textContent = "";
});
$("#key-form").addEventListener("submit", guard(createKey));
$("#plugin-new").addEventListener("click", () => openEditor(null));
$("#plugin-save").addEventListener("click", guard(savePlugin));
$("#plugin-test").addEventListener("click", guard(testPlugin));
$("#plugin-invoke").addEventListener("click", guard(invokePlugin));
$("#audit-filters").addEventListener("submit", guard(loadAudit));
$("#audit-filters").addEventListener("reset", () => setTimeout(guard(loadAudit)));
$("#key-form [name=obj_type]").addEventListener("change", keyTypeChanged);
keyTypeChanged();

if (state.token) enter().catch(() => logout());
else show("login");
