// The search page's script: the search lives in the URL (?q=&mode=&limit=), answers come from
// /search as JSON and are drawn with textContent only, and the modes follow /readyz.
"use strict";
(function () {
  const form = document.getElementById("search");
  const input = document.getElementById("q");
  const list = document.getElementById("results");
  const status = document.getElementById("status");
  const more = document.getElementById("more");
  const radios = Array.from(form.querySelectorAll("input[name=mode]"));
  const LIMIT_DEFAULT = Number(document.body.dataset.limitDefault);
  const LIMIT_MAX = Number(document.body.dataset.limitMax);

  let shown = null; // the search on screen: {q, mode, limit, ids}
  let inFlight = null; // AbortController of the latest request; an older answer never overwrites it

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text; // textContent: data can never become markup
    return node;
  }

  // Text with the query's words in <mark> elements, built as nodes (see hebrew.js).
  function highlighted(tag, className, text, query) {
    const node = el(tag, className);
    for (const piece of window.memfitHebrew.segments(text, query)) {
      node.append(piece.match ? el("mark", "", piece.text) : document.createTextNode(piece.text));
    }
    return node;
  }

  function setStatus(text, isError) {
    status.className = isError ? "status error" : "status";
    status.textContent = text;
  }

  // ---- state <-> URL -------------------------------------------------------------------------
  function fromUrl() {
    const params = new URLSearchParams(location.search);
    // A bad mode or limit is passed on as is: the API's 400 says what it accepts.
    return { q: (params.get("q") || "").trim(), mode: params.get("mode") || radios[0].value,
             limit: params.get("limit") || String(LIMIT_DEFAULT) };
  }

  function toUrl(search) {
    const params = new URLSearchParams({ q: search.q, mode: search.mode });
    if (Number(search.limit) !== LIMIT_DEFAULT) params.set("limit", search.limit);
    return `${location.pathname}?${params}`;
  }

  function fillForm(search) {
    input.value = search.q;
    const radio = radios.find((r) => r.value === search.mode);
    if (radio) radio.checked = true;
  }

  // ---- results -------------------------------------------------------------------------------
  function render(result, search, words) {
    const li = el("li", "result");
    li.tabIndex = -1; // "more results" moves the focus here
    const head = el("div", "head");
    head.append(words ? highlighted("strong", "title", result.title, search.q) : el("strong", "title", result.title),
                el("span", "score", result.score.toFixed(3)));
    li.append(head);
    if (result.body) li.append(words ? highlighted("p", "body", result.body, search.q) : el("p", "body", result.body));
    const matched = new Set((result.matched_tags || []).map((t) => t.name));
    const tags = el("div", "tags");
    for (const name of result.tags) tags.append(el("span", matched.has(name) ? "tag matched" : "tag", name));
    li.append(tags);
    return li;
  }

  function countText(total, tookMs, added) {
    if (!total) return `לא נמצאו תוצאות · ${tookMs} מילישניות`;
    const count = total === 1 ? "תוצאה אחת" : `${total} תוצאות`;
    return added === undefined ? `${count} · ${tookMs} מילישניות` : `נוספו ${added} · ${count} בסך הכול · ${tookMs} מילישניות`;
  }

  // Runs a search; with append, shows only the answers not on screen yet (the API has no offset).
  async function run(search, append) {
    if (inFlight) inFlight.abort();
    const controller = new AbortController();
    inFlight = controller;
    setStatus("מחפש…");
    list.setAttribute("aria-busy", "true");
    const params = new URLSearchParams({ q: search.q, mode: search.mode, limit: search.limit });
    let data, response;
    try {
      response = await fetch(`/search?${params}`, { headers: { Accept: "application/json" },
                                                    signal: controller.signal });
      data = await response.json();
    } catch (error) {
      if (controller.signal.aborted) return;
      // No answer, or one that is not JSON (a proxy's error page): shown as an error either way.
      data = { error: { message: `אין תשובה תקינה מהשרת (${error.message})` } };
      response = null;
    }
    if (controller !== inFlight) return;
    inFlight = null;
    list.removeAttribute("aria-busy");
    if (!response || !response.ok) {
      if (!append) { list.replaceChildren(); shown = null; more.hidden = true; }
      setStatus(`שגיאה: ${data.error ? data.error.message : response.statusText}`, true);
      if (response && response.status === 503) refreshModes(); // the model may have just failed
      return;
    }
    const radio = radios.find((r) => r.value === data.mode);
    const words = radio ? radio.dataset.highlight === "words" : false;
    const ids = append && shown ? shown.ids : new Set();
    const fresh = data.results.filter((r) => !ids.has(r.id));
    const nodes = fresh.map((r) => render(r, search, words));
    if (append) list.append(...nodes); else list.replaceChildren(...nodes);
    fresh.forEach((r) => ids.add(r.id));
    shown = { ...search, ids };
    // Fewer answers than asked means there are no more; LIMIT_MAX is the API's ceiling.
    more.hidden = data.count < Number(search.limit) || Number(search.limit) >= LIMIT_MAX;
    setStatus(countText(ids.size, data.took_ms, append ? fresh.length : undefined));
    if (append) (nodes[0] || list.lastElementChild || input).focus();
  }

  function clear() {
    if (inFlight) inFlight.abort();
    inFlight = null;
    shown = null;
    list.replaceChildren();
    list.removeAttribute("aria-busy");
    more.hidden = true;
    setStatus("");
  }

  // ---- modes follow /readyz ------------------------------------------------------------------
  async function refreshModes() {
    let semantic;
    try {
      const response = await fetch("/readyz", { headers: { Accept: "application/json" } });
      semantic = (await response.json()).semantic; // also read on 503: the database may be the cause
    } catch (error) {
      return; // keep what the server drew
    }
    if (!semantic) return;
    for (const radio of radios) {
      if (radio.dataset.semantic === "none") continue;
      const template = JSON.parse(radio.dataset.notes)[semantic.state];
      const note = template ? template.replace("{error}", semantic.error || "?") : "";
      const noteEl = document.getElementById(`note-${radio.value}`);
      noteEl.textContent = note;
      noteEl.hidden = !note;
      if (radio.dataset.semantic === "required") radio.disabled = Boolean(note);
    }
    const checked = radios.find((r) => r.checked);
    if (checked && checked.disabled) {
      const usable = radios.find((r) => !r.disabled);
      if (usable) usable.checked = true;
    }
  }

  // ---- events --------------------------------------------------------------------------------
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const checked = radios.find((r) => r.checked) || radios[0];
    const search = { q: input.value.trim(), mode: checked.value, limit: String(LIMIT_DEFAULT) };
    if (!search.q) {
      setStatus("מה לחפש? השדה ריק", true);
      input.focus();
      return;
    }
    const url = toUrl(search);
    // A new search is a new history entry; searching the same thing again is not.
    if (url === location.pathname + location.search) history.replaceState(null, "", url);
    else history.pushState(null, "", url);
    run(search, false);
  });

  more.addEventListener("click", () => {
    if (!shown) return;
    const { ids, ...previous } = shown; // ids: what is on screen, not part of the search
    const search = { ...previous, limit: String(Math.min(Number(shown.limit) + LIMIT_DEFAULT, LIMIT_MAX)) };
    // The URL keeps the longer list for a shared link, without a history entry per click.
    history.replaceState(null, "", toUrl(search));
    run(search, true);
  });

  function fromLocation() {
    const search = fromUrl();
    fillForm(search);
    if (search.q) run(search, false); else clear();
  }

  window.addEventListener("popstate", fromLocation);
  refreshModes();
  fromLocation();
})();
